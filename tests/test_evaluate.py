"""distill/evaluate.py and distill/ablation.py: the held-out report, the baselines, the arms' data."""

from __future__ import annotations

import numpy as np
import pytest

from answerfirst.distill.ablation import arm_configs, arm_rows
from answerfirst.distill.evaluate import bm25_ndcg, majority, report
from answerfirst.distill.train import TrainConfig
from answerfirst.metrics import confusion_matrix

VALUES = (0.0, 1.0, 2.0, 3.0, 4.0)


def _rows(labels_by_query):
    return [{"id": f"{q}-{i}", "query": q, "doc": f"{q} doc {i}", "label": g}
            for q, labels in labels_by_query.items() for i, g in enumerate(labels)]


def test_confusion_matrix_counts_gold_rows_against_predicted_columns():
    matrix = confusion_matrix([0, 0, 4, 2, 2], [0, 1, 4, 2, 3], 5)
    assert matrix.tolist() == [[1, 1, 0, 0, 0], [0] * 5, [0, 0, 1, 1, 0], [0] * 5, [0, 0, 0, 0, 1]]
    with pytest.raises(ValueError, match="lengths differ"):
        confusion_matrix([0], [0, 1], 5)


def test_report_of_a_perfect_model_and_of_a_teacher_copy():
    rows = _rows({"a": [4, 3, 0, 1], "b": [2, 4, 0, 0]})
    gold = np.eye(5)[[r["label"] for r in rows]]
    out = report(rows, gold, VALUES, teacher_probs=gold, confusion=True)
    assert out["accuracy_gold"] == 1.0 and out["ndcg10_gold"] == pytest.approx(1.0)
    assert out["agreement_teacher"] == 1.0 and out["spearman_teacher"] == pytest.approx(1.0)
    assert out["kl_to_teacher"] == pytest.approx(0.0, abs=1e-9)
    assert np.trace(np.asarray(out["confusion_gold"])) == len(rows)
    # reversed expected grades: the worst ranking, KL large, agreement 0
    flipped = gold[:, ::-1]
    bad = report(rows, flipped, VALUES, teacher_probs=gold)
    assert bad["ndcg10_gold"] < 0.7 and bad["agreement_teacher"] < 0.5 and bad["kl_to_teacher"] > 10
    assert "confusion_gold" not in bad


def test_majority_baseline_predicts_the_most_common_training_grade():
    rows = _rows({"a": [4, 3, 0, 1], "b": [2, 3, 0, 3]})
    out = majority(rows, train_labels=[3, 3, 1, 0], values=VALUES)
    assert out["grade"] == 3 and out["accuracy_gold"] == pytest.approx(3 / 8)
    assert out["ndcg10_gold"] < report(rows, np.eye(5)[[r["label"] for r in rows]], VALUES)["ndcg10_gold"]


def test_bm25_ranks_the_document_that_shares_the_query_words_first():
    rows = [
        {"query": "red running shoes", "doc": "Nike running shoes in red, mesh.", "label": 4},
        {"query": "red running shoes", "doc": "Bodum kettle in white, glass.", "label": 0},
        {"query": "red running shoes", "doc": "Asics running socks in blue.", "label": 1},
        {"query": "oak desk lamp", "doc": "Ikea desk lamp in oak, small.", "label": 4},
        {"query": "oak desk lamp", "doc": "Tefal frying pan, cast iron.", "label": 0},
    ]
    assert bm25_ndcg(rows, VALUES) == pytest.approx(1.0)
    rows[0]["label"], rows[1]["label"] = 0, 4  # now BM25's first document is the wrong one
    assert bm25_ndcg(rows, VALUES) < 0.8


def test_ablation_arms_differ_only_in_their_targets():
    student = TrainConfig(alpha=1.0, beta=0.5, gamma=0.0, max_steps=100)
    configs = arm_configs(student)
    assert configs["kl+trace"] == student
    assert (configs["kl"].alpha, configs["kl"].beta, configs["kl"].gamma) == (1.0, 0.0, 0.0)
    assert configs["gold"] == configs["hard"] and (configs["gold"].alpha, configs["gold"].beta) == (0.0, 0.0)
    for config in configs.values():
        assert (config.max_steps, config.lr, config.seed) == (100, student.lr, student.seed)
    rows = [{"id": "1", "query": "q", "doc": "d", "label": 4, "split": "train", "teacher_probs": [0.1, 0.6, 0.1, 0.1, 0.1],
             "trace": "Matches: type."}]
    assert arm_rows(rows, "gold") == [{"id": "1", "query": "q", "doc": "d", "split": "train", "label": 4}]
    assert arm_rows(rows, "hard") == [{"id": "1", "query": "q", "doc": "d", "split": "train", "label": 1}]
    assert arm_rows(rows, "kl") == rows == arm_rows(rows, "kl+trace")
