"""Session fixtures: a tiny tokenizer and a tiny random Qwen3 checkpoint, built here, never downloaded.

Tests that modify a checkpoint take `tiny_model_dir` (a fresh copy per test); read-only tests share
`tiny_checkpoint` and the `tiny_scorer` loaded from it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from answerfirst.afrl import DEFAULT_RUBRIC

# Text for the tiny tokenizer: the rubric plus product-search phrases, so prompts tokenize to
# realistic multi-character pieces rather than single bytes.
CORPUS = [
    DEFAULT_RUBRIC,
    "Query:\nred running shoes\n\nDocument:\nLightweight red running shoes with a breathable mesh upper.",
    "Query:\nwireless headphones\n\nDocument:\nOver-ear wireless headphones, 30 hour battery, noise cancelling.",
    "Query:\nstainless steel water bottle 1l\n\nDocument:\nInsulated stainless steel bottle, 750 ml, keeps drinks cold.",
    "The document matches the brand, the colour and the size the query asks for.",
    "It misses the size: the query asks for 1 litre and the product holds 750 ml.",
    "Unrelated: a garden hose does not answer a query about laptop chargers.",
    "Prix: 49,90 € — Größe 42 — couleur rouge — 速干 跑步鞋 — 🏃 fast shipping!",
    "Matches: brand, colour. Misses: size. Verdict: partial match.",
] * 20


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from answerfirst.offline import save_random_checkpoint

    return save_random_checkpoint(tmp_path_factory.mktemp("tiny") / "model", CORPUS, vocab_size=600, seed=0)


@pytest.fixture
def tiny_model_dir(tiny_checkpoint, tmp_path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, out)
    return out


@pytest.fixture(scope="session")
def tiny_scorer(tiny_checkpoint):
    import answerfirst

    return answerfirst.load(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_onnx_export(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported to ONNX (fp32 + int8); read-only."""
    pytest.importorskip("onnxruntime")
    from pairs import PAIRS

    from answerfirst.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("tiny-onnx") / "export"
    export_onnx(tiny_checkpoint, out, probe_pairs=PAIRS)
    return out


@pytest.fixture(scope="session")
def tiny_gguf_export(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported to GGUF Q8_0; read-only."""
    pytest.importorskip("llama_cpp")
    from pairs import PAIRS

    from answerfirst.export.gguf import export_gguf

    out = tmp_path_factory.mktemp("tiny-gguf") / "export"
    export_gguf(tiny_checkpoint, out, ("q8_0",), probe_pairs=PAIRS, threads=1)
    return out
