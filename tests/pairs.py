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


# More distinct queries than a PrefixCache holds (2), for the concurrency tests of every backend.
QUERIES = [
    "red running shoes",
    "wireless headphones",
    "stainless steel water bottle 1l",
    "laptop charger",
    "garden hose",
    "Größe 42 rouge",
    "noise cancelling",
]
# ~200,000 characters: what a misbehaving client can send (~32k tokens on a Qwen3 vocabulary).
HUGE_QUERY = "red running shoes with a breathable mesh upper " * 4300


def score_from_threads(scorer, queries=QUERIES, docs=DOCS, repeats: int = 2) -> dict[str, list[np.ndarray]]:
    """Every query scored `repeats` times, each query in its own thread, all started together; query ->
    the (N, K) probabilities of every call. An exception in any thread is raised here."""
    import threading

    barrier = threading.Barrier(len(queries))
    results: dict[str, list[np.ndarray]] = {q: [] for q in queries}
    errors: list[BaseException] = []

    def work(query: str) -> None:
        try:
            barrier.wait()
            for _ in range(repeats):
                results[query].append(as_array(scorer.score(query, docs)))
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            errors.append(e)

    threads = [threading.Thread(target=work, args=(q,)) for q in queries]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def assert_threads_equal_sequential(scorer, atol: float = 1e-6) -> None:
    """Concurrent scoring of distinct queries (more than the prefix cache holds) on one Scorer gives
    exactly what scoring them one after another gives."""
    sequential = {q: as_array(scorer.score(q, DOCS)) for q in QUERIES}
    concurrent = score_from_threads(scorer)
    for query, calls in concurrent.items():
        assert len(calls) == 2
        for probs in calls:
            np.testing.assert_allclose(probs, sequential[query], atol=atol, rtol=0, err_msg=query)
