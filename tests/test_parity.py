"""Parity cannot pass a broken candidate: constant, NaN or inverted scores fail under every variant's
thresholds, a healthy one passes, and the report is plain JSON with the thresholds it was judged by."""

from __future__ import annotations

import json

import numpy as np
import pytest

from answerfirst.afrl import DEFAULT_VALUES, scores_from_logits
from answerfirst.export.gguf import QUANTS
from answerfirst.export.onnx import FP32_THRESHOLDS, INT8_THRESHOLDS
from answerfirst.export.parity import ParityThresholds, measure, parity_report
from answerfirst.runtime.api import NonFiniteScoreError

EVERY_VARIANT = {"onnx fp32": FP32_THRESHOLDS, "onnx int8": INT8_THRESHOLDS} | {
    f"gguf {name}": quant.thresholds for name, quant in QUANTS.items()
}


def _scores(logits):
    return scores_from_logits(np.asarray(logits), DEFAULT_VALUES, [False] * len(logits))


@pytest.fixture(scope="module")
def learned_logits():
    """(40, 5) grade logits of a model that has learned: each pair peaked on its own grade, margins 3-8."""
    rng = np.random.default_rng(0)
    grades = np.arange(40) % 5
    logits = rng.normal(0.0, 1.0, size=(40, 5))
    logits[np.arange(40), grades] += rng.uniform(3.0, 8.0, size=40)
    return logits


def test_every_variant_bounds_the_size_of_the_error_and_the_ranking():
    for name, thresholds in EVERY_VARIANT.items():
        assert thresholds.max_abs_dp is not None and 0 < thresholds.max_abs_dp < 0.5, name
        assert thresholds.min_spearman is not None, name


@pytest.mark.parametrize("variant", sorted(EVERY_VARIANT))
def test_healthy_candidate_passes(variant, learned_logits):
    reference = _scores(learned_logits)
    rng = np.random.default_rng(1)
    # fp32 noise passes every variant's thresholds
    candidate = _scores(learned_logits + rng.normal(0.0, 1e-6, size=learned_logits.shape))
    report = parity_report(reference, candidate, EVERY_VARIANT[variant])
    assert report["passed"], report["failures"]
    assert report["thresholds"] == vars(EVERY_VARIANT[variant])
    json.dumps(report, allow_nan=False)


@pytest.mark.parametrize("variant", sorted(EVERY_VARIANT))
@pytest.mark.parametrize("broken", ["constant", "nan", "inf", "inverted", "shuffled"])
def test_broken_candidate_fails(variant, broken, learned_logits):
    reference = _scores(learned_logits)
    logits = learned_logits.copy()
    if broken == "constant":  # a collapsed quantization: every pair gets the same distribution
        logits[:] = learned_logits.mean(axis=0)
    elif broken == "nan":
        logits[3, 2] = np.nan
    elif broken == "inf":
        logits[7] = np.inf
    elif broken == "inverted":  # expected grades ranked backwards: 4 - grade
        logits = logits[:, ::-1]
    else:  # scores that belong to other pairs
        logits = logits[np.random.default_rng(2).permutation(len(logits))]
    report = parity_report(reference, _scores(logits), EVERY_VARIANT[variant])
    assert not report["passed"]
    assert report["failures"]
    json.dumps(report, allow_nan=False)  # NaN-free: unmeasurable values are null


def test_constant_candidate_fails_even_without_thresholds(learned_logits):
    reference = _scores(learned_logits)
    constant = _scores(np.tile(learned_logits.mean(axis=0), (len(learned_logits), 1)))
    report = parity_report(reference, constant, ParityThresholds())
    assert not report["passed"]
    assert any("collapsed" in f for f in report["failures"])
    assert report["spearman_expected"] is None


def test_nan_spearman_never_counts_as_a_pass():
    """A constant reference (and candidate) leaves Spearman undefined: a variant that needs it fails."""
    flat = _scores(np.zeros((6, 5)))
    report = parity_report(flat, flat, ParityThresholds(max_abs_dp=1.0, min_spearman=0.9))
    assert not report["passed"]
    assert any("spearman not measurable" in f for f in report["failures"])


def test_threshold_failures_name_the_number(learned_logits):
    reference = _scores(learned_logits)
    rng = np.random.default_rng(3)
    candidate = _scores(learned_logits + rng.normal(0.0, 0.5, size=learned_logits.shape))
    report = parity_report(reference, candidate, ParityThresholds(max_abs_dp=1e-3))
    assert not report["passed"]
    assert report["failures"] == [f"max |dp| {report['max_abs_dp']:.4g} > 0.001"]


def test_measure_records_non_finite_logits_as_a_failed_report(learned_logits):
    reference = _scores(learned_logits)

    def nan_candidate():
        raise NonFiniteScoreError("model.onnx gave non-finite grade logits")

    report = measure(reference, nan_candidate, INT8_THRESHOLDS)
    assert not report["passed"] and "non-finite logits" in report["failures"][0]
    assert report["max_abs_dp"] is None and report["pairs"] == len(reference)
    json.dumps(report, allow_nan=False)
    assert measure(reference, lambda: reference, INT8_THRESHOLDS)["passed"]
