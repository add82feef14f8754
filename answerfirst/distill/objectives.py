"""Distillation losses, as pure functions on tensors.

    L = α · τ² · KL(p_teacher^τ ‖ p_student^τ)      first answer position, over the K grade tokens
      + β · CE(trace tokens)                          the teacher's explanation after its grade
      + γ · CE(gold grade)                            where a gold label exists
      + δ · CE(token tags)                            document tokens whose row tags them (sample teacher)

The tag term trains a linear probe on a middle layer to say, for each tagged document token, what
it says of the match (e.g. "attribute not as asked"): a dense, per-token signal that shows a small
model where to compare the query with the page, which the grade alone (one label per sequence)
teaches slowly. The probe is training-only; the saved model is the LM.

The τ² factor keeps the KL term's gradient scale independent of τ (Hinton et al., 2015,
"Distilling the Knowledge in a Neural Network", §2). The teacher arrives as probabilities over the
grades (that is what labelling stores), so its tempered distribution is p_t^(1/τ), renormalised.
"""

from __future__ import annotations

from dataclasses import dataclass

from answerfirst.extras import requires

with requires("train", "answerfirst.distill"):
    import torch
    import torch.nn.functional as F

IGNORE_INDEX = -100
_LOG_FLOOR = 1e-12  # teacher probabilities of exactly 0 must not give log(0)


def tempered_teacher(teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, K) probabilities -> (B, K) softmax(log p / τ)."""
    return torch.softmax(torch.log(teacher_probs.clamp_min(_LOG_FLOOR)) / temperature, dim=-1)


def first_token_kl(grade_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """τ² · KL(p_t^τ ‖ p_s^τ), mean over the batch.

    grade_logits: (B, K) student logits of the grade tokens at the first answer position.
    teacher_probs: (B, K) teacher first-token distribution over the grades (rows sum to 1).
    KL(p ‖ q) = Σ_k p_k (log p_k − log q_k); terms with p_k = 0 contribute 0.
    """
    if grade_logits.shape != teacher_probs.shape:
        raise ValueError(f"grade_logits {tuple(grade_logits.shape)} vs teacher_probs {tuple(teacher_probs.shape)}")
    target = tempered_teacher(teacher_probs.float(), temperature)  # (B, K)
    log_student = F.log_softmax(grade_logits.float() / temperature, dim=-1)  # (B, K)
    kl = torch.where(target > 0, target * (torch.log(target.clamp_min(_LOG_FLOOR)) - log_student), 0.0)
    return temperature**2 * kl.sum(dim=-1).mean()


def trace_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the labelled (explanation) tokens, mean over those tokens.

    logits: (B, T, V) full-vocabulary logits; labels: (B, T), labels[b, t] is the token at t or -100.
    Position t predicts token t + 1, so logits[:, :-1] are scored against labels[:, 1:].
    Returns 0 (with a gradient path) when nothing is labelled.
    """
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B·(T-1), V)
    shifted_labels = labels[:, 1:].reshape(-1)  # (B·(T-1),)
    if not (shifted_labels != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX)


def gold_grade_ce(grade_logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """CE of the gold grade index from the (B, K) grade logits; rows with gold = -100 are skipped.

    Returns 0 (with a gradient path) when no row has a gold grade."""
    if not (gold != IGNORE_INDEX).any():
        return grade_logits.sum() * 0.0
    return F.cross_entropy(grade_logits.float(), gold, ignore_index=IGNORE_INDEX)


def token_tag_ce(tag_logits: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
    """CE of each tagged token's tag, mean over the tagged tokens.

    tag_logits: (B, T, C) the tag probe's logits at every position; tags: (B, T) tag index or -100.
    Returns 0 (with a gradient path) when no token is tagged."""
    if not (tags != IGNORE_INDEX).any():
        return tag_logits.sum() * 0.0
    return F.cross_entropy(tag_logits.reshape(-1, tag_logits.shape[-1]).float(), tags.reshape(-1), ignore_index=IGNORE_INDEX)


@dataclass(frozen=True)
class LossWeights:
    alpha: float = 1.0  # first-token KL to the teacher
    beta: float = 1.0  # trace SFT
    gamma: float = 0.0  # gold grade CE
    temperature: float = 1.0
    delta: float = 0.0  # token-tag CE

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma", "delta"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: loss weights must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")


def distill_loss(
    grade_logits: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_probs: torch.Tensor | None,
    gold: torch.Tensor,
    weights: LossWeights,
    tag_logits: torch.Tensor | None = None,
    tags: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """α·τ²·KL + β·CE(trace) + γ·CE(gold) + δ·CE(tags); returns (total, each term as a float for logging).

    grade_logits (B, K), logits (B, T, V), labels (B, T), teacher_probs (B, K) or None (pure SFT,
    e.g. training the sample teacher on gold data), gold (B,) grade index or -100; tag_logits
    (B, T, C) and tags (B, T) for the tag term (both needed when δ > 0).
    """
    parts: dict[str, torch.Tensor] = {}
    if teacher_probs is not None and weights.alpha > 0:
        parts["kl"] = weights.alpha * first_token_kl(grade_logits, teacher_probs, weights.temperature)
    if weights.beta > 0:
        parts["trace_ce"] = weights.beta * trace_ce(logits, labels)
    if weights.gamma > 0:
        parts["gold_ce"] = weights.gamma * gold_grade_ce(grade_logits, gold)
    if weights.delta > 0:
        if tag_logits is None or tags is None:
            raise ValueError("delta > 0 (the token-tag term) needs tag_logits and tags")
        parts["tag_ce"] = weights.delta * token_tag_ce(tag_logits, tags)
    if not parts:
        raise ValueError("every loss term is switched off (alpha, beta, gamma and delta are 0, or no teacher probs)")
    total = torch.stack(list(parts.values())).sum()
    return total, {name: float(value.detach()) for name, value in parts.items()}
