"""The layer picture of docs/architecture.md, checked on the source: imports run one way
(format -> artifact -> runtime -> tools), and nothing outside runtime/ uses more of a backend
adapter than its public surface."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "answerfirst"

# Lower layers never import higher ones. The package root (`import answerfirst`) re-exports the
# runtime API, so importing it counts as importing the runtime.
LAYERS: dict[str, int] = {
    "answerfirst.afrl": 0, "answerfirst.metrics": 0, "answerfirst.qwen3": 0, "answerfirst.extras": 0,
    "answerfirst.artifact": 1,
    "answerfirst.runtime": 2, "answerfirst": 2,
    "answerfirst.export": 3, "answerfirst.distill": 3, "answerfirst.bench": 3, "answerfirst.demo": 3,
    "answerfirst.serve": 3, "answerfirst.cli": 3, "answerfirst.offline": 3,
}
ADAPTERS = ("answerfirst.runtime._torch", "answerfirst.runtime._onnx", "answerfirst.runtime._openvino", "answerfirst.runtime._llamacpp")
RUNTIME_API = ("answerfirst.runtime", "answerfirst.runtime.api")  # the public runtime: what their __all__ name
# runtime/'s helpers that tools may also use, by their __all__: the CPU's features (the benchmark records
# them) and an export's tokenizer without transformers (the llama.cpp peer of the benchmark reads it).
HELPERS = ("answerfirst.runtime._cpu", "answerfirst.runtime._tokenizer")
# Inside runtime/: what each private module may import from runtime/ (never api.py or the package).
RUNTIME_IMPORTS = {
    "answerfirst.runtime._common": set(),
    "answerfirst.runtime._tokenizer": set(),
    "answerfirst.runtime._cpu": set(),
    "answerfirst.runtime._memory": set(),
    "answerfirst.runtime._torch": {"answerfirst.runtime._common", "answerfirst.runtime._cpu"},
    "answerfirst.runtime._onnx": {"answerfirst.runtime._common", "answerfirst.runtime._cpu", "answerfirst.runtime._tokenizer"},
    "answerfirst.runtime._llamacpp": {"answerfirst.runtime._common", "answerfirst.runtime._cpu", "answerfirst.runtime._tokenizer"},
    # OpenVINO runs the ONNX adapter's graph and scoring logic on another engine
    "answerfirst.runtime._openvino": {"answerfirst.runtime._common", "answerfirst.runtime._cpu", "answerfirst.runtime._memory",
                                      "answerfirst.runtime._onnx", "answerfirst.runtime._tokenizer"},
}
# What code outside runtime/ may use of `scorer.backend`: the Backend protocol (runtime/_common.py),
# plus the torch adapter's documented `model` and `device` (label's trace generation, the ONNX
# exporter's tracing).
BACKEND_SURFACE = {
    "name", "artifact", "max_positions", "context_note", "default_batch_tokens", "grade_logits", "generate",
    "forget_prefixes", "close",
    "model", "device",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    while module not in LAYERS:
        if "." not in module:
            raise AssertionError(f"{module} has no layer in tests/test_architecture.py LAYERS")
        module = module.rsplit(".", 1)[0]
    return LAYERS[module]


def imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in the file, at any depth (lazy imports count)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [alias.name for alias in node.names]
            if node.module == "answerfirst":  # `from answerfirst import artifact` imports a module
                submodules = [n for n in names if (PACKAGE / n).is_dir() or (PACKAGE / f"{n}.py").is_file()]
                found += [(f"answerfirst.{n}", []) for n in submodules]
                names = [n for n in names if n not in submodules]
                if not names:
                    continue
            found.append((node.module, names))
    return [(m, n) for m, n in found if m == "answerfirst" or m.startswith("answerfirst.")]


SOURCES = {module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("importer", sorted(m for m in SOURCES if m != "answerfirst"))
def test_imports_run_one_way(importer):
    upward = [m for m, _ in imports(SOURCES[importer]) if layer(m) > layer(importer)]
    assert not upward, f"{importer} (layer {layer(importer)}) imports a higher layer: {upward}"
    if importer in RUNTIME_IMPORTS:
        inside = {m for m, _ in imports(SOURCES[importer]) if layer(m) == 2}
        assert inside <= RUNTIME_IMPORTS[importer], f"{importer} imports {sorted(inside)} from runtime/"


def test_outside_runtime_only_public_adapter_names_and_backend_surface():
    """Tools (serve/ included) use what runtime/'s modules name in `__all__`, and no other adapter module."""
    public = {name: set(importlib.import_module(name).__all__) for name in (*ADAPTERS, *HELPERS, *RUNTIME_API)}
    problems = []
    for importer, tree in SOURCES.items():
        if importer.startswith("answerfirst.runtime"):
            continue
        for module, names in imports(tree):
            if module.startswith("answerfirst.runtime._") or module in RUNTIME_API:
                private = [n for n in names if n not in public.get(module, set())]
                if module not in public or private:
                    problems.append(f"{importer} imports {private or module} from {module}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "backend":
                if node.attr not in BACKEND_SURFACE:
                    problems.append(f"{importer}:{node.lineno} uses backend.{node.attr}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("module", [*ADAPTERS, "answerfirst.export.onnx", "answerfirst.export.gguf"])
def test_any_module_imports_first_in_a_fresh_process(module):
    """Import order never matters: no cycle between the runtime API and its adapters."""
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_runtime_package_is_the_embedding_api():
    from answerfirst import runtime

    assert set(runtime.__all__) == {"load", "score", "Scorer", "ScorerConfig", "Score"}
    import answerfirst

    assert runtime.score is answerfirst.score and runtime.load is answerfirst.load


def test_extras_are_layered():
    """pyproject's extras as installed: the base and the edge backends pull in no torch stack."""
    from answerfirst.bench.install_size import closure

    heavy = {"torch", "transformers", "accelerate"}
    base, onnx, gguf, torch = (closure(extras)[0] for extras in ((), ("onnx",), ("gguf",), ("torch",)))
    assert {"numpy", "tokenizers"} <= base and not (heavy | {"onnxruntime", "llama-cpp-python"}) & base
    assert "onnxruntime" in onnx and "llama-cpp-python" in gguf and not heavy & (onnx | gguf)
    assert heavy | {"bitsandbytes"} <= torch and "onnxruntime" not in torch
    installed, missing = closure(("all",))
    assert not missing and heavy | {"onnxruntime", "llama-cpp-python", "gradio", "onnx"} <= installed
