"""An edge device installs only what scoring needs.

Fresh venvs with nothing but `answerfirst[onnx]` or `answerfirst[gguf]`, installed with no package
index from the wheels `make venv` keeps in .venv/wheels (llama.cpp is never compiled again), score
the exports this full install makes, exactly as this install scores them, with neither torch nor
transformers importable. A verb or artifact whose extra is missing says which extra to install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pairs import DOCS, PAIRS, QUERY

import answerfirst

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
WHEELS = Path(os.environ.get("ANSWERFIRST_WHEELS", REPO / ".venv" / "wheels"))

# Run inside the edge venv: score the pairs, then try to import what an edge install must not have.
EDGE_SCRIPT = """
import importlib, json, sys
import answerfirst
scorer = answerfirst.load(sys.argv[1], threads=1)
scores = scorer.score_pairs([tuple(p) for p in json.loads(sys.argv[2])])
importable = {}
for name in ("torch", "transformers"):
    try:
        importlib.import_module(name)
        importable[name] = True
    except ImportError:
        importable[name] = False
print(json.dumps({"probs": [list(s.probs) for s in scores], "importable": importable}))
"""


def run(command: list, **kwargs) -> subprocess.CompletedProcess:
    """A subprocess that sees neither this checkout (PYTHONPATH) nor pip settings of this machine."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PIP_")}
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env, timeout=600, **kwargs)


@pytest.fixture(scope="module")
def answerfirst_wheel(tmp_path_factory) -> Path:
    """The package under test as a wheel, built from a copy of the source (no build/ in the checkout)."""
    if not any(WHEELS.glob("llama_cpp_python-*.whl")) or not any(WHEELS.glob("onnxruntime-*.whl")):
        pytest.fail(f"{WHEELS} lacks the edge-install wheels; run `make venv`, which builds llama.cpp once and keeps them there")
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(REPO / "answerfirst", src / "answerfirst", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    done = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, src])
    assert done.returncode == 0, done.stderr[-3000:]
    return dist


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """An ONNX and a GGUF export of the tiny checkpoint, made by this (full) install."""
    from answerfirst.export.gguf import export_gguf
    from answerfirst.export.onnx import export_onnx

    root = tmp_path_factory.mktemp("exports")
    export_onnx(tiny_checkpoint, root / "onnx", probe_pairs=PAIRS, int8=False)
    export_gguf(tiny_checkpoint, root / "gguf", quants=["f32"], probe_pairs=PAIRS)
    return {"onnx": root / "onnx", "gguf": root / "gguf"}


def edge_venv(extra: str, wheel_dir: Path, where: Path) -> Path:
    """A venv of the base interpreter (no site-packages of this one) with only answerfirst[extra]."""
    venv = where / f"venv-{extra}"
    done = run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", venv])
    assert done.returncode == 0, done.stderr
    done = run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-index", "--find-links", WHEELS,
                "--find-links", wheel_dir, f"answerfirst[{extra}]"])
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


@pytest.mark.parametrize("extra", ["onnx", "gguf"])
def test_edge_venv_scores_an_export_without_torch(extra, answerfirst_wheel, exports, tmp_path):
    venv = edge_venv(extra, answerfirst_wheel, tmp_path)
    export = exports[extra]

    done = run([venv / "bin" / "python", "-c", EDGE_SCRIPT, export, json.dumps(PAIRS)], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    assert reply["importable"] == {"torch": False, "transformers": False}
    # Same runtime wheels, same export: the edge install scores exactly as the full one.
    here = answerfirst.load(export, threads=1).score_pairs(PAIRS)
    np.testing.assert_allclose(reply["probs"], [s.probs for s in here], rtol=0, atol=1e-6)

    # The CLI works there too, and a verb or artifact that needs another extra says which, in one line.
    cli = venv / "bin" / "answerfirst"
    done = run([cli, "score", "--model", export, "--query", QUERY, "--doc", DOCS[0], "--json"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    alone = answerfirst.load(export, threads=1).score(QUERY, [DOCS[0]])[0]  # llama.cpp: same batch shape
    assert json.loads(done.stdout)["probs"] == pytest.approx(list(alone.probs), abs=1e-6)
    done = run([cli, "--help"], cwd=tmp_path)
    assert done.returncode == 0 and "score" in done.stdout, done.stderr
    other = "gguf" if extra == "onnx" else "onnx"
    for command, wanted in (
        (["train", "--help"], 'pip install "answerfirst[train]"'),
        (["score", "--model", exports[other], "--query", QUERY, "--doc", DOCS[0]], f'pip install "answerfirst[{other}]"'),
        (["demo", "--model", export], 'pip install "answerfirst[demo]"'),
    ):
        done = run([cli, *command], cwd=tmp_path)
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and wanted in lines[0] and "Traceback" not in done.stderr, (command, done.stderr)
