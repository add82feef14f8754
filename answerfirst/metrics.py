"""Ranking and agreement metrics shared by training evaluation, RL, export parity and the benchmark.

Plain numpy, no scipy: these run inside the core package.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def rankdata(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties get the average of the ranks they span (as scipy.stats.rankdata)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or sorted_x[end] != sorted_x[start]:
            ranks[order[start:end]] = (start + 1 + end) / 2.0
            start = end
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of average ranks). NaN when either side is constant."""
    if len(a) != len(b):
        raise ValueError(f"spearman: lengths differ ({len(a)} vs {len(b)})")
    if len(a) < 2:
        return float("nan")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def dcg(gains: Sequence[float], k: int) -> float:
    g = np.asarray(gains, dtype=np.float64)[:k]
    return float(((2.0**g - 1.0) / np.log2(np.arange(2, len(g) + 2))).sum())


def ndcg_at_k(scores: Sequence[float], gold: Sequence[float], k: int = 10) -> float:
    """NDCG@k of ranking documents by `scores` (desc) against graded `gold` relevance, gain 2^g - 1.

    Ties in `scores` are broken by the worst gold grade first, so a constant scorer earns no credit.
    A query whose gold grades are all 0 has no ideal ranking: NaN (callers skip it)."""
    scores, gold = np.asarray(scores, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    ideal = dcg(np.sort(gold)[::-1], k)
    if ideal == 0:
        return float("nan")
    order = np.lexsort((gold, -scores))  # primary: score desc; ties: gold asc (pessimistic)
    return dcg(gold[order], k) / ideal


def mean_ndcg_by_query(query_ids: Sequence[str], scores: Sequence[float], gold: Sequence[float], k: int = 10) -> float:
    """Mean NDCG@k over queries (queries with an all-zero gold column are skipped)."""
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(query_ids):
        groups.setdefault(q, []).append(i)
    values = [ndcg_at_k([scores[i] for i in idx], [gold[i] for i in idx], k) for idx in groups.values()]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of positions where two grade sequences agree."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"agreement: need two equal, non-empty sequences ({len(a)} vs {len(b)})")
    return float(np.mean(np.asarray(a) == np.asarray(b)))


def confusion_matrix(gold: Sequence[int], predicted: Sequence[int], k: int) -> np.ndarray:
    """(k, k) counts: rows are the gold grade, columns the predicted grade."""
    if len(gold) != len(predicted):
        raise ValueError(f"confusion_matrix: lengths differ ({len(gold)} vs {len(predicted)})")
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (np.asarray(gold, dtype=np.int64), np.asarray(predicted, dtype=np.int64)), 1)
    return matrix
