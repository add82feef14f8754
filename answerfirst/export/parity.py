"""Parity: an exported artifact is trusted because its scores were compared with torch at export time.

`parity_report` scores the same probe pairs with the torch fp32 reference and with the exported
variant and records max |Δp| per grade, grade agreement and the Spearman correlation of expected
grades; `passed` says whether the variant met its thresholds. Exporters write the report into the
variant's entry in answerfirst.json; `load()` prefers variants that passed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from answerfirst.afrl import Score
from answerfirst.artifact import Manifest
from answerfirst.metrics import agreement, spearman

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
    """A variant passes when every threshold that is set holds."""

    max_abs_dp: float | None = None  # max over pairs and grades of |p_variant - p_torch|
    min_agreement: float | None = None  # fraction of pairs with the same argmax grade
    min_spearman: float | None = None  # rank correlation of expected grades


def probe_pairs(manifest: Manifest | None) -> list[tuple[str, str]]:
    """The student's held-out probe pairs (manifest info["probe_pairs"]) when it has them, else built-ins."""
    stored = (manifest.info.get("probe_pairs") if manifest else None) or []
    pairs = [(str(q), str(d)) for q, d in stored]
    return pairs or list(BUILTIN_PROBE_PAIRS)


def compare(reference: Sequence[Score], candidate: Sequence[Score]) -> dict[str, float]:
    ref = np.array([s.probs for s in reference])
    cand = np.array([s.probs for s in candidate])
    ref_expected = [s.expected for s in reference]
    cand_expected = [s.expected for s in candidate]
    return {
        "pairs": len(reference),
        "max_abs_dp": float(np.abs(ref - cand).max()),
        "mean_abs_dp": float(np.abs(ref - cand).mean()),
        "grade_agreement": agreement([s.grade for s in reference], [s.grade for s in candidate]),
        "spearman_expected": spearman(ref_expected, cand_expected),
        "max_abs_d_expected": float(np.abs(np.subtract(ref_expected, cand_expected)).max()),
    }


def parity_report(
    reference_scores: Sequence[Score], candidate_scores: Sequence[Score], thresholds: ParityThresholds
) -> dict[str, Any]:
    """Compare two score lists for the same pairs; `passed` and `failures` say how it went."""
    report: dict[str, Any] = compare(reference_scores, candidate_scores)
    failures = []
    if thresholds.max_abs_dp is not None and not report["max_abs_dp"] <= thresholds.max_abs_dp:
        failures.append(f"max |dp| {report['max_abs_dp']:.2e} > {thresholds.max_abs_dp:.0e}")
    if thresholds.min_agreement is not None and not report["grade_agreement"] >= thresholds.min_agreement:
        failures.append(f"grade agreement {report['grade_agreement']:.3f} < {thresholds.min_agreement}")
    spearman_value = report["spearman_expected"]
    if thresholds.min_spearman is not None and not (np.isnan(spearman_value) or spearman_value >= thresholds.min_spearman):
        failures.append(f"spearman {spearman_value:.4f} < {thresholds.min_spearman}")
    report.update(thresholds=asdict(thresholds), passed=not failures, failures=failures)
    return report


def log_report(name: str, report: dict[str, Any]) -> None:
    """Log a parity result; a failure is a WARNING that says exactly what missed, never silent."""
    summary = (
        f"{name}: max|dp|={report['max_abs_dp']:.2e} agreement={report['grade_agreement']:.3f} "
        f"spearman={report['spearman_expected']:.4f} over {report['pairs']} pairs"
    )
    if report["passed"]:
        logger.info("parity PASSED %s", summary)
    else:
        logger.warning("parity FAILED %s — %s", summary, "; ".join(report["failures"]))
