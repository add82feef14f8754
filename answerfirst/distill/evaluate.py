"""Held-out evaluation of relevance models, and the baselines they must beat.

`judge(scorer, rows)` scores every row's (query, doc) with any loaded artifact, one query at a time
(as a search call would), and returns the probabilities; `report(...)` turns probabilities into
the metrics the kit reports everywhere: accuracy and NDCG@10 against gold grades, the confusion
matrix, and agreement / Spearman / KL against a teacher's distributions. `compare(models, sets)`
does both for several models on several held-out sets, beside two baselines: BM25 (`bm25_ndcg`,
the `bm25s` library: what a search team already has) and the majority grade (`majority`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from answerfirst.metrics import agreement, confusion_matrix, mean_ndcg_by_query, spearman

_FLOOR = 1e-12  # probabilities of exactly 0 must not give log(0) in the KL


def judge(scorer: Any, rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """(N, K) grade distributions of `rows` in their order, scored query by query."""
    probs = np.zeros((len(rows), len(scorer.grades)))
    for query, indices in _by_query(rows).items():
        for i, score in zip(indices, scorer.score(query, [rows[i]["doc"] for i in indices]), strict=True):
            probs[i] = score.probs
    return probs


def report(
    rows: Sequence[dict[str, Any]],
    probs: np.ndarray,
    values: Sequence[float],
    teacher_probs: np.ndarray | None = None,
    confusion: bool = False,
) -> dict[str, Any]:
    """Metrics of (N, K) distributions `probs` on `rows` (which carry "query" and, for the gold
    metrics, "label"; a row whose label is None has no gold), and against `teacher_probs` (N, K).

    accuracy_gold: argmax vs gold; ndcg10_gold: mean NDCG@10 per query, ranked by expected grade;
    confusion_gold (with `confusion`): K x K counts, rows = gold grade, columns = predicted grade;
    agreement_teacher: argmax vs the teacher's; spearman_teacher: of expected grades;
    kl_to_teacher: mean KL(teacher ‖ model)."""
    probs = np.asarray(probs, dtype=np.float64)
    values_arr = np.asarray(values, dtype=np.float64)
    expected = probs @ values_arr
    predicted = probs.argmax(axis=1)
    out: dict[str, Any] = {"pairs": len(rows), "queries": len({r["query"] for r in rows})}
    gold_rows = [i for i, r in enumerate(rows) if r.get("label") is not None]
    if gold_rows:
        gold = [int(rows[i]["label"]) for i in gold_rows]
        out["accuracy_gold"] = agreement(predicted[gold_rows].tolist(), gold)
        out["ndcg10_gold"] = mean_ndcg_by_query(
            [rows[i]["query"] for i in gold_rows], expected[gold_rows].tolist(), [values[g] for g in gold], k=10
        )
        if confusion:
            out["confusion_gold"] = confusion_matrix(gold, predicted[gold_rows].tolist(), len(values)).tolist()
    if teacher_probs is not None:
        teacher = np.asarray(teacher_probs, dtype=np.float64)
        out["agreement_teacher"] = agreement(predicted.tolist(), teacher.argmax(axis=1).tolist())
        out["spearman_teacher"] = spearman(expected, teacher @ values_arr)
        kl = (teacher * (np.log(np.clip(teacher, _FLOOR, None)) - np.log(np.clip(probs, _FLOOR, None)))).sum(axis=1)
        out["kl_to_teacher"] = float(kl.mean())
    return out


def bm25_ndcg(rows: Sequence[dict[str, Any]], values: Sequence[float]) -> float:
    """Mean NDCG@10 of ranking each query's candidate documents by BM25 (bm25s defaults: Lucene
    variant, k1 1.5, b 0.75; English stopwords) over an index of every document in `rows`."""
    try:
        import bm25s
    except ImportError:
        raise ImportError('the BM25 baseline needs bm25s: pip install "answerfirst[train]"') from None
    docs = sorted({r["doc"] for r in rows})
    doc_index = {d: i for i, d in enumerate(docs)}
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(docs, stopwords="en", show_progress=False), show_progress=False)
    scores = np.zeros(len(rows))
    for query, indices in _by_query(rows).items():
        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False, return_ids=False)[0]
        all_scores = retriever.get_scores(tokens)
        for i in indices:
            scores[i] = all_scores[doc_index[rows[i]["doc"]]]
    return mean_ndcg_by_query([r["query"] for r in rows], scores.tolist(), [values[int(r["label"])] for r in rows], k=10)


def majority(rows: Sequence[dict[str, Any]], train_labels: Sequence[int], values: Sequence[float]) -> dict[str, float]:
    """The baseline that predicts the most common training grade for every pair: its accuracy, and
    its NDCG@10 (a constant score; ties count pessimistically, see metrics.ndcg_at_k)."""
    grade = Counter(int(g) for g in train_labels).most_common(1)[0][0]
    one_hot = np.zeros((len(rows), len(values)))
    one_hot[:, grade] = 1.0
    return {"grade": grade, **{k: v for k, v in report(rows, one_hot, values).items() if k.endswith("_gold")}}


def compare(
    models: Mapping[str, str | Path],
    sets: Mapping[str, Sequence[dict[str, Any]]],
    train_labels: Sequence[int],
    teacher: str = "teacher",
) -> dict[str, dict[str, dict[str, Any]]]:
    """results[set][model] for every model (name -> artifact) on every held-out set (name -> rows
    with gold labels), with "bm25" and "majority" beside them. A model other than `teacher` is also
    measured against the teacher's distributions on the same rows."""
    import answerfirst

    scorers = {name: answerfirst.load(path) for name, path in models.items()}
    values = next(iter(scorers.values())).prompts.format.values
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for set_name, rows in sets.items():
        probs = {name: judge(scorer, rows) for name, scorer in scorers.items()}
        reference = probs.get(teacher)
        results[set_name] = {
            name: report(rows, p, values, None if name == teacher else reference, confusion=True)
            for name, p in probs.items()
        }
        results[set_name]["bm25"] = {"ndcg10_gold": bm25_ndcg(rows, values)}
        results[set_name]["majority"] = majority(rows, train_labels, values)
    for scorer in scorers.values():
        scorer.close()
    return results


def _by_query(rows: Sequence[dict[str, Any]]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row["query"], []).append(i)
    return groups
