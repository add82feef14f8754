"""Query/document pairs every backend's tests score, so parity is checked on the same inputs."""

from __future__ import annotations

import numpy as np

QUERY = "red running shoes"
DOCS = [
    "Lightweight red running shoes with a breathable mesh upper.",
    "Over-ear wireless headphones, 30 hour battery.",
    "Insulated stainless steel bottle, 750 ml, keeps drinks cold all day long while you run.",
    "Red shoes.",
    "Prix: 49,90 € — Größe 42 — couleur rouge — 速干 跑步鞋",
]
# Two queries: parity reports and score_pairs see more than one prefix.
PAIRS = [(QUERY, d) for d in DOCS] + [("wireless headphones", d) for d in DOCS[:3]]


def as_array(scores) -> np.ndarray:
    """(N, K) probabilities of a list of Score."""
    return np.array([s.probs for s in scores])
