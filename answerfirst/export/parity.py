"""Parity: an exported artifact is trusted because its scores were compared with torch at export time.

`parity_report` scores the same probe pairs with the torch fp32 reference and with the exported
variant and records max |Δp| per grade, grade agreement and the Spearman correlation of expected
grades; `passed` says whether the variant met its thresholds. Exporters write the report into the
variant's entry in answerfirst.json; `load()` prefers variants that passed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from answerfirst.afrl import Score
from answerfirst.artifact import Manifest
from answerfirst.metrics import agreement, spearman
from answerfirst.runtime.api import NonFiniteScoreError

logger = logging.getLogger(__name__)

# Fallback probe set when the student carries none: several queries, documents across the grades.
BUILTIN_PROBE_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (query, doc)
    for query, docs in {
        "red running shoes": [
            "Lightweight red running shoes with a breathable mesh upper and a cushioned sole.",
            "Blue trail running shoes, waterproof, size 44.",
            "Red leather office shoes with a low heel.",
            "Running socks, pack of three, moisture wicking.",
            "Cast iron frying pan, 28 cm, pre-seasoned.",
        ],
        "wireless noise cancelling headphones": [
            "Over-ear wireless headphones with active noise cancelling and a 30 hour battery.",
            "Wired studio headphones with a 3 m cable.",
            "Bluetooth earbuds with a charging case.",
            "Headphone stand made of walnut wood.",
            "Garden hose, 20 m, with a spray nozzle.",
        ],
        "stainless steel water bottle 1 litre": [
            "Insulated stainless steel water bottle, 1 l, keeps drinks cold for 24 hours.",
            "Stainless steel water bottle, 500 ml, leak-proof lid.",
            "Plastic sports bottle, 1 litre, BPA free.",
            "Stainless steel cutlery set for six people.",
            "Paperback novel, 320 pages.",
        ],
        "usb-c laptop charger 65w": [
            "65 W USB-C GaN charger for laptops and phones, foldable plug.",
            "45 W USB-C charger for phones and tablets.",
            "USB-C to USB-C cable, 2 m, 100 W.",
            "Laptop sleeve for 14 inch notebooks.",
            "Ceramic flower pot with a drainage hole.",
        ],
    }.items()
    for doc in docs
)


@dataclass(frozen=True)
class ParityThresholds:
    """A variant passes when every threshold that is set holds, and whatever the thresholds, only when
    its scores are finite, not collapsed to one value, and ranked like the reference (see `sanity`)."""

    max_abs_dp: float | None = None  # max over pairs and grades of |p_variant - p_torch|
    min_agreement: float | None = None  # fraction of pairs with the same argmax grade
    min_spearman: float | None = None  # rank correlation of expected grades


# A candidate whose spread of expected grades is below this share of the reference's has collapsed
# (e.g. every probe pair gets the same score): it fails however close its probabilities happen to be.
COLLAPSE_RATIO = 1e-3


def probe_pairs(manifest: Manifest | None) -> list[tuple[str, str]]:
    """The student's held-out probe pairs (manifest info["probe_pairs"]) when it has them, else built-ins."""
    stored = (manifest.info.get("probe_pairs") if manifest else None) or []
    pairs = [(str(q), str(d)) for q, d in stored]
    return pairs or list(BUILTIN_PROBE_PAIRS)


def compare(reference: Sequence[Score], candidate: Sequence[Score]) -> dict[str, Any]:
    """The parity measurements; a value that cannot be measured (non-finite scores, a constant side
    for Spearman) is None, so the report stays plain JSON."""
    if len(reference) != len(candidate) or not reference:
        raise ValueError(f"parity: need two equal, non-empty score lists ({len(reference)} vs {len(candidate)})")
    ref = np.array([s.probs for s in reference], dtype=np.float64)  # (N, K)
    cand = np.array([s.probs for s in candidate], dtype=np.float64)  # (N, K)
    ref_expected = np.array([s.expected for s in reference], dtype=np.float64)  # (N,)
    cand_expected = np.array([s.expected for s in candidate], dtype=np.float64)  # (N,)
    return {
        "pairs": len(reference),
        "max_abs_dp": _finite(np.abs(ref - cand).max()),
        "mean_abs_dp": _finite(np.abs(ref - cand).mean()),
        "grade_agreement": agreement([s.grade for s in reference], [s.grade for s in candidate]),
        "spearman_expected": _finite(spearman(ref_expected, cand_expected)),
        "max_abs_d_expected": _finite(np.abs(ref_expected - cand_expected).max()),
        "reference_expected_range": _finite(np.ptp(ref_expected)),
        "candidate_expected_range": _finite(np.ptp(cand_expected)),
    }


def sanity(reference: Sequence[Score], candidate: Sequence[Score]) -> list[str]:
    """What fails a candidate under any thresholds: non-finite scores, a collapsed (constant) score,
    or a ranking uncorrelated with or inverted from the reference's."""
    cand = np.array([[*s.probs, s.expected] for s in candidate], dtype=np.float64)
    bad = int((~np.isfinite(cand)).any(axis=1).sum())
    if bad:
        return [f"non-finite scores for {bad} of {len(candidate)} pairs"]
    ref_expected = np.array([s.expected for s in reference], dtype=np.float64)
    cand_expected = cand[:, -1]
    failures = []
    ref_range, cand_range = float(np.ptp(ref_expected)), float(np.ptp(cand_expected))
    if ref_range > 0 and cand_range <= COLLAPSE_RATIO * ref_range:
        failures.append(
            f"collapsed: expected grades span {cand_range:.2e} where the reference's span {ref_range:.2e}"
        )
    rho = spearman(ref_expected, cand_expected)
    if not np.isnan(rho) and rho <= 0:
        failures.append(f"ranking inverted or unrelated (spearman {rho:.4f} <= 0)")
    return failures


def parity_report(
    reference_scores: Sequence[Score], candidate_scores: Sequence[Score], thresholds: ParityThresholds
) -> dict[str, Any]:
    """Compare two score lists for the same pairs; `passed` and `failures` say how it went. A value
    a threshold needs but that cannot be measured (NaN) fails that threshold."""
    report: dict[str, Any] = compare(reference_scores, candidate_scores)
    failures = sanity(reference_scores, candidate_scores)
    checks = (
        ("max |dp|", report["max_abs_dp"], thresholds.max_abs_dp, "<="),
        ("grade agreement", report["grade_agreement"], thresholds.min_agreement, ">="),
        ("spearman", report["spearman_expected"], thresholds.min_spearman, ">="),
    )
    for name, value, bound, sense in checks:
        if bound is None:
            continue
        if value is None:
            failures.append(f"{name} not measurable (non-finite or constant scores), needs {sense} {bound:g}")
        elif (value > bound) if sense == "<=" else (value < bound):
            failures.append(f"{name} {value:.4g} {'>' if sense == '<=' else '<'} {bound:g}")
    report.update(thresholds=asdict(thresholds), passed=not failures, failures=failures)
    return report


def measure(
    reference_scores: Sequence[Score], score_candidate: Callable[[], Sequence[Score]], thresholds: ParityThresholds
) -> dict[str, Any]:
    """parity_report of what `score_candidate()` returns; a candidate whose logits are not finite
    (the Scorer refuses to return them as scores) gets a failed report saying so."""
    try:
        candidate = score_candidate()
    except NonFiniteScoreError as e:
        keys = ("max_abs_dp", "mean_abs_dp", "grade_agreement", "spearman_expected", "max_abs_d_expected")
        return {
            "pairs": len(reference_scores),
            **dict.fromkeys(keys),
            "thresholds": asdict(thresholds),
            "passed": False,
            "failures": [f"non-finite logits: {e}"],
        }
    return parity_report(reference_scores, candidate, thresholds)


def summary(report: dict[str, Any] | None) -> str:
    """One line of a report's numbers (n/a where a value could not be measured)."""
    report = report or {}
    return (
        f"max|dp|={_show(report.get('max_abs_dp'), '.2e')} agreement={_show(report.get('grade_agreement'), '.3f')} "
        f"spearman={_show(report.get('spearman_expected'), '.4f')}"
    )


def log_report(name: str, report: dict[str, Any]) -> None:
    """Log a parity result; a failure is a WARNING that says exactly what missed, never silent."""
    line = f"{name}: {summary(report)} over {report['pairs']} pairs"
    if report["passed"]:
        logger.info("parity PASSED %s", line)
    else:
        logger.warning("parity FAILED %s — %s", line, "; ".join(report["failures"]))


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _show(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
