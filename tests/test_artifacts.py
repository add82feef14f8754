"""Artifacts a user cannot silently run broken: a truncated or corrupt checkpoint, a manifest from a
future release, and `answerfirst verify`. (ONNX and GGUF files: tests/test_onnx.py, tests/test_gguf.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pairs import DOCS, QUERY

import answerfirst
from answerfirst.artifact import FORMAT_VERSION, MANIFEST_NAME, Manifest, ManifestError, checkpoint_hash


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "answerfirst.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def student_dir(tiny_model_dir):
    """A checkpoint with a manifest that records the sha256 of its weights, as training writes it."""
    scorer = answerfirst.load(tiny_model_dir)
    Manifest(
        kind="checkpoint",
        format=scorer.prompts.format,
        grade_token_ids=scorer.prompts.grade_ids,
        source={"model": "tiny", "sha256": checkpoint_hash(tiny_model_dir)},
    ).write(tiny_model_dir)
    return tiny_model_dir


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors_fails_at_load_naming_the_file(student_dir, keep):
    weights = student_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: int(weights.stat().st_size * keep)])
    with pytest.raises(ManifestError, match=r"model\.safetensors is truncated: .* copy the checkpoint again"):
        answerfirst.load(student_dir)


def test_garbled_safetensors_header_fails_at_load_naming_the_file(student_dir):
    weights = student_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\x00" * 32  # inside the JSON header
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"model\.safetensors has a corrupt safetensors header"):
        answerfirst.load(student_dir)
    data[:8] = (10**12).to_bytes(8, "little")  # a header length past the end of the file
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"model\.safetensors is not a complete safetensors file"):
        answerfirst.load(student_dir)


def test_missing_shard_of_a_sharded_checkpoint(student_dir):
    index = {"metadata": {}, "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (student_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ManifestError, match="model-00002-of-00002.safetensors named by .* missing"):
        answerfirst.load(student_dir)


def test_corrupt_weights_of_the_same_size_fail_verify(student_dir):
    expected = answerfirst.load(student_dir, verify=True).score(QUERY, DOCS)  # intact: verifies and scores
    weights = student_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:-96] = b"\x7f\x7f\x7f\x7f"  # a flipped weight, same size: only the checksum sees it
    weights.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"weight files \(model\.safetensors\) do not match the sha256 .* re-train"):
        answerfirst.load(student_dir, verify=True)
    assert answerfirst.load(student_dir).score(QUERY, DOCS) != expected  # loads unverified, but scores differ

    out = run_cli("verify", str(student_dir))
    assert out.returncode == 1
    assert "FAILED" in out.stdout and "model.safetensors" in out.stdout and "Traceback" not in out.stderr


def test_verify_needs_something_recorded(tiny_model_dir):
    with pytest.raises(ManifestError, match="no answerfirst.json, so no recorded checksums"):
        answerfirst.load(tiny_model_dir, verify=True)


def test_cli_verify_of_an_intact_checkpoint(student_dir):
    out = run_cli("verify", str(student_dir))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok      model.safetensors" in out.stdout and "1 of 1 file(s) match" in out.stdout
    (student_dir / "model.safetensors").write_bytes(b"\x01" * 10)
    out = run_cli("verify", str(student_dir))
    assert out.returncode == 1 and "FAILED" in out.stdout and "model.safetensors" in out.stdout


@pytest.mark.parametrize(
    ("version", "fix"),
    [(FORMAT_VERSION + 1, r"newer answerfirst: upgrade \(pip install -U answerfirst\)"), (0, "re-export"), ("1", "re-export")],
)
def test_manifest_format_version_from_another_release(student_dir, version, fix):
    path = student_dir / MANIFEST_NAME
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "format_version": version}))
    with pytest.raises(ManifestError, match=f"{MANIFEST_NAME}: format_version .* not supported .*; .*{fix}"):
        answerfirst.load(student_dir)
