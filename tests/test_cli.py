"""The CLI as a user runs it: a real subprocess, its stdout parsed and compared with the API."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from answerfirst.cli import VERBS


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "answerfirst.cli", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_verb():
    out = run_cli("--help")
    assert out.returncode == 0
    for verb in VERBS:
        assert verb in out.stdout


@pytest.mark.slow
def test_score_json_matches_the_api(tiny_checkpoint, tiny_scorer):
    docs = ["Lightweight red running shoes.", "Garden hose, 20 m."]
    out = run_cli("score", "--model", str(tiny_checkpoint), "--query", "red shoes", "--doc", docs[0], "--doc", docs[1], "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    expected = tiny_scorer.score("red shoes", docs)
    assert [r["doc"] for r in rows] == docs
    np.testing.assert_allclose([r["probs"] for r in rows], [s.probs for s in expected], atol=1e-6)
    assert [r["grade"] for r in rows] == [tiny_scorer.grades[s.grade] for s in expected]
    assert out.stderr == ""  # quiet: no library progress bars, no deprecation warnings, no notices


@pytest.mark.slow
def test_score_precision_bf16_matches_the_api_in_bf16(tiny_checkpoint):
    import answerfirst

    out = run_cli("score", "--model", str(tiny_checkpoint), "--query", "red shoes", "--doc", "red shoes.", "--json",
                  "--precision", "bf16")
    assert out.returncode == 0, out.stderr
    expected = answerfirst.load(tiny_checkpoint, precision="bf16").score("red shoes", ["red shoes."])
    np.testing.assert_allclose(json.loads(out.stdout)["probs"], expected[0].probs, atol=1e-6)
    out = run_cli("score", "--model", str(tiny_checkpoint), "--query", "q", "--doc", "d", "--precision", "fp16")
    assert out.returncode == 2 and "invalid choice: 'fp16'" in out.stderr


@pytest.mark.slow
def test_explain_prints_grade_then_text(tiny_checkpoint, tiny_scorer):
    out = run_cli("explain", "--model", str(tiny_checkpoint), "--query", "red shoes", "--doc", "red running shoes", "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    grade = tiny_scorer.score("red shoes", ["red running shoes"])[0].grade
    first, rest = out.stdout.split("\n", 1)
    assert first == f"grade: {tiny_scorer.grades[grade]}"
    assert rest.rstrip("\n") == "".join(tiny_scorer.explain("red shoes", "red running shoes", max_new_tokens=6))
    assert out.stderr == ""


@pytest.mark.slow
def test_bad_input_is_one_clear_line_not_a_traceback(tiny_checkpoint, tmp_path):
    out = run_cli("score", "--model", str(tiny_checkpoint), "--query", "   ", "--doc", "x")
    assert out.returncode == 2
    assert "error: query is empty" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("score", "--model", str(tmp_path / "missing"), "--query", "q", "--doc", "x")
    assert out.returncode == 2
    assert "could not load a tokenizer" in out.stderr and "Traceback" not in out.stderr
