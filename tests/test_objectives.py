"""Each distillation loss term against a hand computation on small tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from answerfirst.distill.objectives import (
    LossWeights,
    distill_loss,
    first_token_kl,
    gold_grade_ce,
    tempered_teacher,
    token_tag_ce,
    trace_ce,
)


def _softmax(x):
    e = np.exp(np.asarray(x, dtype=np.float64) - np.max(x))
    return e / e.sum()


def test_first_token_kl_matches_hand_computation_at_tau_1():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    teacher = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    expected = 0.0
    for z, p in zip(logits.numpy(), teacher.numpy(), strict=True):
        q = _softmax(z)
        expected += sum(pk * (math.log(pk) - math.log(qk)) for pk, qk in zip(p, q, strict=True))
    expected /= 2
    assert float(first_token_kl(logits, teacher, 1.0)) == pytest.approx(expected, rel=1e-5)


def test_first_token_kl_temperature_tempers_both_sides_and_scales_by_tau_squared():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5]])
    teacher = torch.tensor([[0.6, 0.25, 0.05, 0.1]])
    tau = 2.0
    p = np.asarray(teacher[0], dtype=np.float64) ** (1 / tau)
    p /= p.sum()  # softmax(log p / tau)
    q = _softmax(np.asarray(logits[0], dtype=np.float64) / tau)
    expected = tau**2 * float((p * (np.log(p) - np.log(q))).sum())
    assert float(first_token_kl(logits, teacher, tau)) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(tempered_teacher(teacher, tau)[0].numpy(), p, rtol=1e-5)


def test_first_token_kl_is_zero_when_student_equals_teacher_and_skips_zero_probabilities():
    teacher = torch.tensor([[0.5, 0.5, 0.0]])
    logits = torch.log(torch.tensor([[0.5, 0.5, 1e-30]]))
    assert float(first_token_kl(logits, teacher)) == pytest.approx(0.0, abs=1e-6)
    # A zero teacher probability contributes nothing, whatever the student says there.
    q = _softmax([0.0, 1.0, 3.0])
    expected = 0.5 * (math.log(0.5) - math.log(q[0])) + 0.5 * (math.log(0.5) - math.log(q[1]))
    assert float(first_token_kl(torch.tensor([[0.0, 1.0, 3.0]]), teacher)) == pytest.approx(expected, rel=1e-5)


def test_first_token_kl_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="grade_logits"):
        first_token_kl(torch.zeros(2, 5), torch.full((2, 4), 0.25))


def test_trace_ce_shifts_by_one_and_averages_over_labelled_tokens():
    # B=1, T=4, V=3: labels at t=2 and t=3 are scored by the logits at t=1 and t=2.
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 0.0, 0.0], [0.0, 3.0, 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[-100, -100, 0, 1]])
    expected = -(math.log(_softmax([1.0, 0.0, 0.0])[0]) + math.log(_softmax([0.0, 3.0, 0.0])[1])) / 2
    assert float(trace_ce(logits, labels)) == pytest.approx(expected, rel=1e-6)


def test_trace_ce_is_zero_with_a_gradient_path_when_nothing_is_labelled():
    logits = torch.randn(2, 3, 5, requires_grad=True)
    loss = trace_ce(logits, torch.full((2, 3), -100))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0


def test_gold_grade_ce_by_hand_skipping_unlabelled_rows():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    gold = torch.tensor([0, 2, -100])
    expected = -(math.log(_softmax([2.0, 0.0, 0.0])[0]) + math.log(_softmax([0.0, 1.0, 0.0])[2])) / 2
    assert float(gold_grade_ce(logits, gold)) == pytest.approx(expected, rel=1e-6)
    assert float(gold_grade_ce(logits, torch.full((3,), -100))) == 0.0


def test_distill_loss_is_the_weighted_sum_of_its_terms():
    torch.manual_seed(0)
    grade_logits = torch.randn(3, 5)
    logits = torch.randn(3, 6, 11)
    labels = torch.tensor([[-100, -100, -100, 4, 7, 1]] * 3)
    teacher = torch.softmax(torch.randn(3, 5), dim=-1)
    gold = torch.tensor([1, -100, 4])
    weights = LossWeights(alpha=0.7, beta=0.3, gamma=2.0, temperature=1.5)
    total, parts = distill_loss(grade_logits, logits, labels, teacher, gold, weights)
    kl = float(first_token_kl(grade_logits, teacher, 1.5))
    ce = float(trace_ce(logits, labels))
    gce = float(gold_grade_ce(grade_logits, gold))
    assert parts == pytest.approx({"kl": 0.7 * kl, "trace_ce": 0.3 * ce, "gold_ce": 2.0 * gce}, rel=1e-6)
    assert float(total) == pytest.approx(0.7 * kl + 0.3 * ce + 2.0 * gce, rel=1e-6)
    # Without teacher probabilities (plain SFT) the KL term is absent.
    _, sft_parts = distill_loss(grade_logits, logits, labels, None, gold, weights)
    assert set(sft_parts) == {"trace_ce", "gold_ce"}


def test_token_tag_ce_is_the_mean_ce_over_tagged_tokens_only():
    tag_logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [1.0, 3.0, 0.5]]])  # (1, 3, 3)
    tags = torch.tensor([[0, -100, 2]])
    expected = (-math.log(_softmax([2.0, 0.0, -1.0])[0]) - math.log(_softmax([1.0, 3.0, 0.5])[2])) / 2
    assert float(token_tag_ce(tag_logits, tags)) == pytest.approx(expected, rel=1e-6)
    assert float(token_tag_ce(tag_logits, torch.full((1, 3), -100))) == 0.0


def test_distill_loss_adds_the_tag_term_only_when_delta_is_set():
    torch.manual_seed(1)
    grade_logits, logits = torch.randn(2, 5), torch.randn(2, 4, 9)
    labels, gold = torch.tensor([[-100, 3, 1, 2]] * 2), torch.tensor([1, 4])
    tag_logits, tags = torch.randn(2, 4, 6), torch.tensor([[-100, 5, 0, -100], [3, -100, -100, 4]])
    total, parts = distill_loss(grade_logits, logits, labels, None, gold, LossWeights(beta=1.0, gamma=1.0, delta=0.5),
                                tag_logits, tags)
    assert parts["tag_ce"] == pytest.approx(0.5 * float(token_tag_ce(tag_logits, tags)), rel=1e-6)
    assert float(total) == pytest.approx(sum(parts.values()), rel=1e-6)
    _, no_tags = distill_loss(grade_logits, logits, labels, None, gold, LossWeights(beta=1.0, gamma=1.0), tag_logits, tags)
    assert "tag_ce" not in no_tags
    with pytest.raises(ValueError, match="delta > 0"):
        distill_loss(grade_logits, logits, labels, None, gold, LossWeights(delta=1.0))


def test_distill_loss_refuses_to_run_with_every_term_off():
    with pytest.raises(ValueError, match="switched off"):
        distill_loss(torch.zeros(1, 5), torch.zeros(1, 2, 7), torch.full((1, 2), -100), None, torch.tensor([1]),
                     LossWeights(alpha=1.0, beta=0.0, gamma=0.0))


@pytest.mark.parametrize("field,value", [("alpha", -1.0), ("beta", -0.1), ("gamma", -2.0), ("temperature", 0.0), ("delta", -1.0)])
def test_loss_weights_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LossWeights(**{field: value})
