"""deploy/: the Kubernetes example and its image are parsed and checked against the real CLI, so the
example cannot drift from what `answerfirst serve` accepts; the image's claim that serving an ONNX
export needs no torch is checked by serving one with torch and transformers made unimportable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from answerfirst.cli import build_parser

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"


def serve_args(argv: list[str]):
    """The arguments as `answerfirst serve` parses them (SystemExit on anything it would refuse)."""
    assert argv[0] == "serve", argv
    return build_parser("serve").parse_args(argv)


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs) == 3, [d["kind"] for d in docs]
    return by_kind


def test_deployment_runs_serve_with_health_as_readiness_probe(manifests):
    from answerfirst.serve.app import API_KEY_ENV

    deployment = manifests["Deployment"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    args = serve_args(container["args"])
    assert args.host == "0.0.0.0"  # reachable from the Service, not only from inside the pod
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == args.port
    probe = container["readinessProbe"]["httpGet"]
    assert probe["path"] == "/health" and ports.get(probe["port"], probe["port"]) == args.port
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > args.drain_timeout + pause  # the drain is never SIGKILLed
    assert [e["name"] for e in container["env"]] == [API_KEY_ENV]
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics" and int(annotations["prometheus.io/port"]) == args.port
    assert container["resources"]["limits"]["cpu"] == str(args.threads)  # one scoring thread per core it gets


def test_service_and_autoscaler_point_at_the_deployment(manifests):
    deployment, service, autoscaler = manifests["Deployment"], manifests["Service"], manifests["HorizontalPodAutoscaler"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= {p["name"] for p in container["ports"]}
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert autoscaler["spec"]["minReplicas"] <= deployment["spec"]["replicas"] <= autoscaler["spec"]["maxReplicas"]


def test_image_installs_every_serve_dependency_and_serves_its_model(manifests):
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    instructions = {}
    for line in lines:
        if line and not line.startswith((" ", "#")):
            word, _, rest = line.partition(" ")
            instructions.setdefault(word, []).append(rest)
    (entrypoint,) = instructions["ENTRYPOINT"]
    assert json.loads(entrypoint) == ["answerfirst"]
    args = serve_args(json.loads(instructions["CMD"][0]))
    assert instructions["EXPOSE"] == [str(args.port)] and args.host == "0.0.0.0"
    assert any(copy.split()[-1] == args.model for copy in instructions["COPY"])
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert serve_args(container["args"]).model == args.model
    # The package goes in with its own extras, so the image follows pyproject's serve dependencies.
    (install,) = [rest for rest in instructions["RUN"] if rest.startswith("pip install")]
    (package,) = [word.strip('"') for word in install.split() if word.strip('"').startswith(".[")]
    wanted = set(package[2:-1].split(","))
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert wanted == {"serve", "onnx"} and wanted <= extras.keys(), package  # the image serves an ONNX export


@pytest.mark.slow
def test_serving_an_onnx_export_imports_neither_torch_nor_transformers(tiny_onnx_export):
    script = f"""
import sys
sys.modules["torch"] = None; sys.modules["transformers"] = None  # importing either now fails
from fastapi.testclient import TestClient
import answerfirst
from answerfirst.serve.app import ServeConfig, Service, create_app
service = Service(ServeConfig(model={str(tiny_onnx_export)!r}), lambda: answerfirst.load({str(tiny_onnx_export)!r}))
with TestClient(create_app(service)) as client:
    assert service.wait_loaded(60), service.load_error
    print(client.post("/v1/rerank", json={{"query": "red shoes", "documents": ["red running shoes"]}}).status_code)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "200", out.stderr
