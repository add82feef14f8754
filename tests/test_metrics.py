"""answerfirst/metrics.py against scipy.stats and NDCG worked by hand, on random and tied inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from answerfirst.metrics import agreement, mean_ndcg_by_query, ndcg_at_k, rankdata, spearman

stats = pytest.importorskip("scipy.stats")


def _samples(seed: int):
    """Random vectors, vectors with many ties (few distinct values), and all-equal vectors."""
    rng = np.random.default_rng(seed)
    for n in (2, 3, 7, 40):
        yield rng.normal(size=n)
        yield rng.integers(0, 3, size=n).astype(float)  # heavy ties
        yield np.round(rng.normal(size=n), 1)  # some ties
    yield np.full(5, 2.5)


@pytest.mark.parametrize("seed", range(5))
def test_rankdata_equals_scipy_average_ranks(seed):
    for x in _samples(seed):
        np.testing.assert_array_equal(rankdata(x), stats.rankdata(x, method="average"))


@pytest.mark.parametrize("seed", range(5))
def test_spearman_equals_scipy_with_ties(seed):
    rng = np.random.default_rng(100 + seed)
    for a in _samples(seed):
        for b in (rng.normal(size=len(a)), rng.integers(0, 2, size=len(a)).astype(float), a[::-1].copy(), a.copy()):
            ours = spearman(a, b)
            if np.ptp(a) == 0 or np.ptp(b) == 0:
                assert math.isnan(ours)  # undefined for a constant side, as in scipy (which warns)
                continue
            assert ours == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_spearman_extremes_and_errors():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1.0], [2.0]))
    with pytest.raises(ValueError, match="lengths differ"):
        spearman([1, 2], [1, 2, 3])


def _ndcg_by_hand(gains_in_ranked_order, all_gains, k):
    def dcg(gs):
        return sum((2**g - 1) / math.log2(i + 2) for i, g in enumerate(gs[:k]))

    return dcg(list(gains_in_ranked_order)) / dcg(sorted(all_gains, reverse=True))


def test_ndcg_by_hand_without_ties():
    scores = [0.9, 0.1, 0.5, 0.7]
    gold = [2, 3, 0, 1]
    # ranked by score: doc0 (2), doc3 (1), doc2 (0), doc1 (3)
    expected = _ndcg_by_hand([2, 1, 0, 3], gold, k=10)
    assert ndcg_at_k(scores, gold, k=10) == pytest.approx(expected, abs=1e-12)
    # k=2 only counts the first two ranks against the best two gains (3, 2)
    assert ndcg_at_k(scores, gold, k=2) == pytest.approx(
        (3 / 1 + 1 / math.log2(3)) / (7 / 1 + 3 / math.log2(3)), abs=1e-12
    )


def test_ndcg_ties_rank_the_worst_gold_first():
    # docs 0 and 1 tie on score: the tie is broken pessimistically (gold 0 before gold 4)
    scores = [0.5, 0.5, 0.1]
    gold = [4, 0, 2]
    assert ndcg_at_k(scores, gold) == pytest.approx(_ndcg_by_hand([0, 4, 2], gold, k=10), abs=1e-12)
    # a constant scorer earns the worst ordering, never the ideal one
    gold = [3, 1, 0, 2]
    assert ndcg_at_k([1.0] * 4, gold) == pytest.approx(_ndcg_by_hand(sorted(gold), gold, k=10), abs=1e-12)
    assert ndcg_at_k([1.0] * 4, gold) < 1.0


@pytest.mark.parametrize("seed", range(5))
def test_ndcg_equals_an_independent_sort_on_random_tied_input(seed):
    """Against an independent implementation: sort by (-score, gold) with Python's sort."""
    rng = np.random.default_rng(seed)
    for n in (3, 8, 25):
        scores = np.round(rng.random(n), 1)  # ties likely
        gold = rng.integers(0, 5, size=n)
        if gold.max() == 0:
            continue
        order = sorted(range(n), key=lambda i: (-scores[i], gold[i]))
        for k in (1, 5, 10):
            expected = _ndcg_by_hand([gold[i] for i in order], list(gold), k)
            assert ndcg_at_k(scores, gold, k) == pytest.approx(expected, abs=1e-12)


def test_ndcg_all_zero_gold_is_nan_and_skipped_in_the_mean():
    assert math.isnan(ndcg_at_k([0.3, 0.2], [0, 0]))
    mean = mean_ndcg_by_query(["a", "a", "b", "b"], [0.9, 0.1, 0.5, 0.4], [2, 0, 0, 0])
    assert mean == pytest.approx(1.0)


def test_agreement():
    assert agreement([0, 1, 2, 3], [0, 1, 0, 3]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="equal, non-empty"):
        agreement([], [])
