"""Optional RL refinement of a distilled student: mode-balanced Stepwise-GRPO with elastic trust regions.

    answerfirst rl --student DIR --data teacher.jsonl --out DIR [--preset grpo|dapo|grpo-sft|elastic-sft]

One step:

1. **Group sampling.** For each of `prompts_per_step` training pairs the current student writes G
   answers: a grade token sampled from its distribution over the K grade tokens (the distribution
   the runtime scores with), then an explanation sampled token by token until end of turn.
2. **Stepwise rewards, kept separate.** Step 1 rewards the grade (`grade_reward`: 1 at the gold
   grade, falling linearly with the distance between grade values); step 2 rewards the explanation
   (`explanation_checks`: well-formed, consistent with the grade, within length bounds, grounded in
   query/document terms; the reward is their mean).
3. **Per-step group advantages** (`group_advantages`): each step's rewards are normalised within the
   group of G answers; the grade token is credited with the step-1 advantage, every explanation
   token with the step-2 advantage.
4. **Objective** (`rl_loss`): a token-level clipped policy-gradient surrogate whose clip range is
   elastic (`elastic_clip_bounds`), optional KL to the frozen starting student, plus λ · SFT
   cross-entropy on the teacher traces and the gold grade — the mode-balancing term: the policy
   gradient alone minimises a reverse KL (mode-seeking: it forgets rare rules and can hack the
   reward), the SFT term a forward KL (mode-covering). Standard GRPO (symmetric static clip) and a
   DAPO-style asymmetric clip (Yu et al., 2025, "DAPO", clip-higher) are settings of the same code.

The loop runs on accelerate (the same code on CPU, one GPU, or `accelerate launch`), prints its
config, writes metrics.jsonl (mean reward per step, grade entropy, clip fraction, KL to reference,
held-out reward / gold agreement / NDCG), checkpoints every `save_every` steps and, with
`--resume` and the same settings, continues from the newest checkpoint exactly as if never
stopped (sampling randomness is a function of the step). The output is a student checkpoint with
its answerfirst.json manifest, loadable by `answerfirst.load`.

Data loading, the split, collation, the student forward (`StudentHead`), the held-out metrics and
the output writer are distill/train.py's; the run directory (identity, checkpoints, exact resume,
metrics.jsonl, truncation report, config flags) is distill/runs.py's, shared with train.py. This
module adds what is RL-only.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import random
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from answerfirst.afrl import AFRLFormat, PromptTokenizer
from answerfirst.artifact import checkpoint_hash
from answerfirst.distill import train as distill
from answerfirst.distill.objectives import IGNORE_INDEX, gold_grade_ce, trace_ce
from answerfirst.distill.runs import (
    CHECKPOINTS_DIR,
    METRICS_NAME,
    RunDir,
    add_config_flags,
    add_run_flags,
    config_flag_values,
    log_truncation,
    read_records,
    run_identity,
    truncation_report,
)
from answerfirst.extras import requires

with requires("train", "answerfirst.distill"):
    import torch

logger = logging.getLogger(__name__)

CONFIG_NAME = "rl_config.json"


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

# Named settings of the same objective, for comparison (`--preset`); explicit flags override them.
PRESETS: dict[str, dict[str, float]] = {
    # GRPO (Shao et al., 2024, DeepSeekMath): one static symmetric clip range, no SFT term.
    "grpo": dict(clip_low=0.2, clip_high=0.2, elastic_adv=0.0, elastic_var=0.0, sft_coef=0.0),
    # DAPO's clip-higher: a wider upper bound lets unlikely-but-good tokens grow.
    "dapo": dict(clip_low=0.2, clip_high=0.28, elastic_adv=0.0, elastic_var=0.0, sft_coef=0.0),
    "grpo-sft": dict(clip_low=0.2, clip_high=0.2, elastic_adv=0.0, elastic_var=0.0, sft_coef=0.5),
    "elastic-sft": dict(clip_low=0.2, clip_high=0.2, elastic_adv=1.0, elastic_var=0.5, sft_coef=0.5),
}
DEFAULT_PRESET = "elastic-sft"


@dataclass(frozen=True)
class RLConfig:
    """Settings of one `answerfirst rl` run; saved in the output manifest and in every checkpoint.

    group_size: G answers sampled per prompt. prompts_per_step: prompts per optimisation step.
    policy_epochs: gradient passes over each sampled batch (μ in GRPO); with 1 the ratio is always 1
        and clipping never acts, so the default is 2.
    temperature: sampling temperature; log-probabilities in the ratio use the same temperature.
    clip_low, clip_high: base clip range [1 - clip_low, 1 + clip_high] of the ratio.
    elastic_adv, elastic_var, sigma_ref: the elastic trust region (see `elastic_clip_bounds`);
        both gains 0 = the static clip of GRPO / DAPO.
    kl_coef: weight of the k3 KL estimate to the frozen starting student (0 = off; still measured).
    sft_coef: λ of the SFT auxiliary term; sft_trace_weight, sft_grade_weight split it between
        trace CE and gold-grade CE; sft_batch_size: teacher examples per step.
    grade_weight, explanation_weight: weights of the two steps' policy-gradient terms.
    min_explanation_tokens, max_explanation_tokens: the length rule of the explanation reward.
    max_new_tokens: generation limit of an explanation (an answer cut there is not well-formed).
    eval_fraction: share of queries held out when rows carry no "split" field (whole queries, as
        train.split_rows does, so NDCG is measured on unseen queries).
    threads: torch CPU threads (None = torch's default); 1 is fastest for tiny models on a busy CPU.
    """

    student: str
    data: str
    out: str
    steps: int = 50
    group_size: int = 4
    prompts_per_step: int = 4
    policy_epochs: int = 2
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    elastic_adv: float = 1.0
    elastic_var: float = 0.5
    sigma_ref: float = 0.5
    normalize_std: bool = True
    kl_coef: float = 0.0
    sft_coef: float = 0.5
    sft_trace_weight: float = 1.0
    sft_grade_weight: float = 1.0
    sft_batch_size: int = 8
    grade_weight: float = 1.0
    explanation_weight: float = 1.0
    min_explanation_tokens: int = 4
    max_explanation_tokens: int = 48
    max_new_tokens: int = 56
    max_trace_tokens: int = 128
    max_doc_tokens: int | None = None
    eval_fraction: float = 0.2
    eval_every: int = 5
    eval_batch_size: int = 16
    save_every: int = 10
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None

    def __post_init__(self) -> None:
        positive_ints = (
            "steps", "group_size", "prompts_per_step", "policy_epochs", "sft_batch_size", "min_explanation_tokens",
            "max_explanation_tokens", "max_new_tokens", "max_trace_tokens", "eval_every", "eval_batch_size",
            "save_every",
        )  # fmt: skip
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        non_negative = (
            "weight_decay", "clip_low", "clip_high", "elastic_adv", "elastic_var", "kl_coef", "sft_coef",
            "sft_trace_weight", "sft_grade_weight", "grade_weight", "explanation_weight",
        )  # fmt: skip
        for name in non_negative:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate: must be in (0, 1), got {self.learning_rate}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm: must be > 0, got {self.max_grad_norm}")
        if self.temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {self.temperature}")
        if self.clip_low >= 1:
            raise ValueError(f"clip_low: must be < 1 (the ratio's lower bound is 1 - clip_low), got {self.clip_low}")
        if self.elastic_var > 1:
            raise ValueError(f"elastic_var: must be in [0, 1] (it blends a factor in [1 - elastic_var, 1]), got {self.elastic_var}")
        if self.sigma_ref <= 0:
            raise ValueError(f"sigma_ref: must be > 0, got {self.sigma_ref}")
        if self.grade_weight == 0 and self.explanation_weight == 0:
            raise ValueError("grade_weight, explanation_weight: at least one step must be rewarded")
        if self.min_explanation_tokens > self.max_explanation_tokens:
            raise ValueError(
                f"min_explanation_tokens ({self.min_explanation_tokens}) > max_explanation_tokens "
                f"({self.max_explanation_tokens}); lower the first or raise the second"
            )
        if self.max_new_tokens < self.max_explanation_tokens + 2:
            raise ValueError(
                f"max_new_tokens: must leave room for a newline, max_explanation_tokens "
                f"({self.max_explanation_tokens}) and end of turn; use >= {self.max_explanation_tokens + 2}"
            )
        if not 0 < self.eval_fraction < 1:
            raise ValueError(f"eval_fraction: must be in (0, 1), got {self.eval_fraction}")
        if self.max_doc_tokens is not None and self.max_doc_tokens < 1:
            raise ValueError(f"max_doc_tokens: must be >= 1, got {self.max_doc_tokens}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads: must be a positive integer or None, got {self.threads!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device: 'cpu' or 'cuda' (accelerate launch places processes on GPUs), got {self.device!r}")

    # Fields `--resume` does not compare (runs.py): where the run writes, how fast and how often it
    # logs and saves, where it runs, and `steps` (the learning rate is constant, so a longer run
    # continues the same one). The student and data are compared by content, not by path.
    RESUME_IGNORES: ClassVar[tuple[str, ...]] = (
        "student", "data", "out", "steps", "threads", "device", "eval_every", "save_every",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Step 1 and step 2 rewards
# --------------------------------------------------------------------------------------------


def grade_reward(grade: int, gold: int, values: Sequence[float]) -> float:
    """Step-1 reward in [0, 1]: 1 - |v_grade - v_gold| / (v_max - v_min).

    With the default grades 0..4: the gold grade earns 1, one grade off 0.75, ..., 0 vs 4 earns 0.
    """
    span = max(values) - min(values)
    return 1.0 - abs(values[grade] - values[gold]) / span


_WORD = re.compile(r"[^\W\d_]{3,}")
_STOPWORDS = frozenset(
    "the and for with that this from not but are was were has have had its it's into than then them they "
    "their there what which who why how does did doc document query grade match matches misses".split()
)


def content_terms(text: str) -> set[str]:
    """Lower-cased words of 3+ letters, minus function words and the rubric's own vocabulary."""
    return {w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS}


def grade_phrases(fmt: AFRLFormat) -> dict[int, str]:
    """The rubric's name of each grade (AFRLFormat.grade_names), lower-cased: {4: "exact match", ...}.

    Grades the rubric does not name have no phrase (the consistency rule then only sees explicit
    "grade N" mentions)."""
    return {k: name.lower() for k, name in fmt.grade_names().items()}


def mentioned_grades(text: str, fmt: AFRLFormat, phrases: dict[int, str]) -> set[int]:
    """Grades an explanation names: a rubric phrase as whole words ("relevant" is not found inside
    "irrelevant") or "grade N"."""
    lowered = text.lower()
    found = {k for k, phrase in phrases.items() if re.search(rf"(?<![\w-]){re.escape(phrase)}(?![\w-])", lowered)}
    for m in re.finditer(r"\bgrade\s*[:=]?\s*(\S+?)[\s.,;)]", lowered + " "):
        if m.group(1) in fmt.grades:
            found.add(fmt.grades.index(m.group(1)))
    return found


@dataclass(frozen=True)
class Completion:
    """One sampled answer: the grade index and the explanation ids after the grade token.

    explanation_ids: generated ids after the grade (the "\\n" separator first), ending with the
        end-of-turn id when the model stopped; `stopped` says whether it did.
    """

    grade: int
    explanation_ids: tuple[int, ...]
    stopped: bool


def explanation_checks(
    completion: Completion,
    query: str,
    doc: str,
    prompts: PromptTokenizer,
    min_tokens: int,
    max_tokens: int,
    phrases: dict[int, str] | None = None,
) -> dict[str, float]:
    """The documented step-2 rules, each scored in [0, 1]; the step-2 reward is their mean.

    well_formed: the model ended its turn (no cut-off), the explanation starts with the newline that
        separates it from the grade, has visible text, decodes to valid UTF-8, and contains no
        template markers (the tokenizer's added tokens, such as "<|im_start|>" or "<think>").
    consistent: the grades the text names (rubric phrases such as "partial", or "grade 2") agree with
        the grade it was written for: 1 when it names none or only that grade, 0.5 when it names
        that grade and others, 0 when it names only other grades.
    length: the body (without the separator and end of turn) has min_tokens..max_tokens tokens.
    grounded: 0.5 if it uses a content word of the query, plus 0.5 if it uses one of the document.
    """
    ids = list(completion.explanation_ids)
    body_ids = ids[:-1] if completion.stopped else ids
    raw = prompts.decode(body_ids)
    text = raw.lstrip("\n")
    # every added token (Qwen3: <|im_start|>, <think>, <tool_call>, ...) is template, not prose
    specials = {t.content for t in prompts.tokenizer.added_tokens_decoder.values()} | set(prompts.tokenizer.all_special_tokens)
    well_formed = (
        completion.stopped
        and raw.startswith("\n")
        and bool(text.strip())
        and "\ufffd" not in text
        and not any(marker in text for marker in specials)
    )
    fmt = prompts.format
    named = mentioned_grades(text, fmt, grade_phrases(fmt) if phrases is None else phrases)
    if not named or named == {completion.grade}:
        consistent = 1.0
    elif completion.grade in named:
        consistent = 0.5
    else:
        consistent = 0.0
    body_tokens = len(prompts.encode_text(text.strip())) if text.strip() else 0
    terms = content_terms(text)
    grounded = 0.5 * bool(terms & content_terms(query)) + 0.5 * bool(terms & content_terms(doc))
    return {
        "well_formed": float(well_formed),
        "consistent": consistent,
        "length": float(min_tokens <= body_tokens <= max_tokens),
        "grounded": grounded,
    }


def explanation_reward(checks: dict[str, float]) -> float:
    """Step-2 reward: the mean of the rule checks."""
    return float(sum(checks.values()) / len(checks))


# --------------------------------------------------------------------------------------------
# Advantages, elastic trust regions, the surrogate
# --------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(N, G) rewards of N groups of G answers -> (N, G) advantages of one step.

        A_ij = (r_ij - mean_j r_i) / (std_j r_i + eps)      std over the group, population (ddof 0)

    A group whose rewards are all equal (including G = 1) gets advantage 0: it says nothing about
    which answer is better. normalize_std=False keeps only the mean baseline (Dr. GRPO,
    Liu et al., 2025), so a group's advantage scale follows its reward spread.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (groups, group_size), got shape {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not normalize_std:
        return centred
    return centred / (rewards.std(dim=1, correction=0, keepdim=True) + eps)


def elastic_clip_bounds(
    advantages: torch.Tensor,
    group_std: torch.Tensor,
    clip_low: float,
    clip_high: float,
    elastic_adv: float,
    elastic_var: float,
    sigma_ref: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-answer clip range: (N, G) advantages, (N,) raw reward std of each group -> two (N, G) tensors.

        s_ij = tanh(|A_ij|)                               strength of this answer's signal, in [0, 1)
        ρ_i  = min(1, σ_i / σ_ref)                        reliability of the group, in [0, 1]
        f_ij = (1 + elastic_adv · s_ij) · (1 - elastic_var + elastic_var · ρ_i)
        ε_low_ij = min(clip_low · f_ij, 0.95),   ε_high_ij = clip_high · f_ij

    The ratio of answer j of group i is then clipped to [1 - ε_low_ij, 1 + ε_high_ij].

    Why this direction: group-normalised advantages all have unit scale, so a group whose rewards
    differ by a hair (σ_i ≈ 0: noise decides the ranking) pushes as hard as one that separates good
    from bad answers clearly (σ_i large). The trust region undoes that: it narrows as the group's raw
    reward spread vanishes (at most by the factor 1 - elastic_var) and widens, up to 1 + elastic_adv,
    for answers far from their group's mean. σ_ref = 0.5 is the largest std a reward in [0, 1]
    can have. elastic_adv = elastic_var = 0 gives the static clip of GRPO (clip_low = clip_high)
    or of DAPO's clip-higher (clip_high > clip_low). The lower bound stays below 1 so the clipped
    ratio stays positive.
    """
    strength = torch.tanh(advantages.abs())  # (N, G)
    reliability = (group_std / sigma_ref).clamp(max=1.0).unsqueeze(1)  # (N, 1)
    factor = (1.0 + elastic_adv * strength) * (1.0 - elastic_var + elastic_var * reliability)  # (N, G)
    return (clip_low * factor).clamp(max=0.95), clip_high * factor


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: torch.Tensor,
    eps_high: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level clipped policy-gradient loss and the fraction of tokens whose ratio was clipped.

    logp, old_logp: (R, T) log-probabilities of the sampled tokens under the current / sampling
        policy; advantages, eps_low, eps_high: (R, T) (an answer's values repeated on its tokens);
        mask: (R, T) bool, the tokens this term covers.

        ρ_t = exp(logp_t - old_logp_t)
        L   = - Σ_t∈mask min(ρ_t A_t, clip(ρ_t, 1 - ε_low_t, 1 + ε_high_t) A_t) / |mask|

    A token counts as clipped when the clipped branch is the smaller (it then gets no gradient).
    Every token of the batch weighs the same (token-level mean, as DAPO), not every answer.
    Returns (0 with a gradient path, 0) when the mask is empty.
    """
    count = mask.sum()
    if count == 0:
        return (logp * 0.0).sum(), torch.zeros((), dtype=logp.dtype)
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.maximum(torch.minimum(ratio, 1.0 + eps_high), 1.0 - eps_low) * advantages
    surrogate = torch.minimum(unclipped, clipped)
    loss = -(surrogate * mask).sum() / count
    clip_fraction = ((clipped < unclipped) & mask).sum().float() / count
    return loss, clip_fraction.detach()


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked tokens of the k3 estimate of KL(π ‖ π_ref) on tokens sampled from π:
    exp(ref - logp) - (ref - logp) - 1 (Schulman, 2020, "Approximating KL divergence"); ≥ 0."""
    count = mask.sum()
    if count == 0:
        return (logp * 0.0).sum()
    delta = ref_logp - logp
    return ((torch.exp(delta) - delta - 1.0) * mask).sum() / count


@dataclass
class RolloutBatch:
    """R = N·G sampled answers as one right-padded batch in train.py's collate layout.

    input_ids: (R, L) prompt + grade + explanation. grade_pos: (R,) the last prompt position.
    window_pos: (R, A) positions grade_pos+1 .. (the grade token onwards; window a predicts
        explanation token a), clamped into the row. answer_ids: (R, A) the explanation ids.
    grade_index: (R,) sampled grade (index into the K grades).
    Per-token tensors are (R, 1 + A): column 0 is the grade token, columns 1.. the explanation.
    grade_mask, explanation_mask: (R, 1 + A) bool. grade_adv, explanation_adv: (R,) advantages;
    grade_eps, explanation_eps: ((R,), (R,)) clip ranges (low, high) of each step.
    old_logp, ref_logp: (R, 1 + A) log-probs at sampling time and under the frozen reference.
    """

    input_ids: torch.Tensor
    grade_pos: torch.Tensor
    window_pos: torch.Tensor
    answer_ids: torch.Tensor
    grade_index: torch.Tensor
    grade_mask: torch.Tensor
    explanation_mask: torch.Tensor
    grade_adv: torch.Tensor
    explanation_adv: torch.Tensor
    grade_eps: tuple[torch.Tensor, torch.Tensor]
    explanation_eps: tuple[torch.Tensor, torch.Tensor]
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None


def answer_logprobs(head: Any, batch: RolloutBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the sampled answer tokens under `head` (a train.StudentHead).

    Returns logp (R, 1 + A): column 0 the grade, log-softmax over the K grade logits (the grade is
    sampled from that restricted distribution); columns 1.. the explanation tokens, log-softmax over
    the full vocabulary; both at `temperature`. And grade_logits (R, K) (for the entropy metric).
    """
    grade_logits, logits = distill.student_forward(
        head, {"input_ids": batch.input_ids, "grade_pos": batch.grade_pos, "window_pos": batch.window_pos}
    )  # (R, K), (R, A, V)
    rows = torch.arange(len(grade_logits), device=grade_logits.device)
    grade_logp = torch.log_softmax(grade_logits.float() / temperature, dim=-1)[rows, batch.grade_index]  # (R,)
    token_logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    token_logp = token_logp.gather(-1, batch.answer_ids.unsqueeze(-1)).squeeze(-1)  # (R, A)
    return torch.cat([grade_logp.unsqueeze(1), token_logp], dim=1), grade_logits


def rl_loss(
    logp: torch.Tensor, batch: RolloutBatch, config: RLConfig, sft: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss of one gradient pass:

        L = w1 · L_clip(grade token, A¹, ε¹) + w2 · L_clip(explanation tokens, A², ε²)
          + kl_coef · KL_k3(π ‖ π_ref) + λ · L_sft

    (w1, w2 = grade_weight, explanation_weight; λ = sft_coef; L_sft = `sft_loss`, or None to leave
    it out: the loop back-propagates it in its own pass, which sums to the same gradient). Each
    step's clipped term is a token-level mean within that step, so a long explanation does not drown
    the single grade token. Returns the total and its parts (plus clip_fraction, kl_ref) as floats.
    """
    parts: dict[str, torch.Tensor] = {}
    clipped_tokens, covered_tokens = 0.0, 0.0
    steps = (
        ("grade", batch.grade_mask, batch.grade_adv, batch.grade_eps, config.grade_weight),
        ("explanation", batch.explanation_mask, batch.explanation_adv, batch.explanation_eps, config.explanation_weight),
    )
    for name, mask, adv, (eps_low, eps_high), weight in steps:
        if weight == 0:
            continue
        per_token = [v.unsqueeze(1).expand_as(logp) for v in (adv, eps_low, eps_high)]  # (R,) -> (R, 1 + A)
        loss, clip = clipped_surrogate(logp, batch.old_logp, *per_token, mask)
        parts[f"pg_{name}"] = weight * loss
        clipped_tokens += float(clip) * float(mask.sum())
        covered_tokens += float(mask.sum())
    answer_mask = batch.grade_mask | batch.explanation_mask
    kl = k3_kl(logp, batch.ref_logp, answer_mask) if batch.ref_logp is not None else None
    if config.kl_coef > 0 and kl is not None:
        parts["kl"] = config.kl_coef * kl
    if sft is not None and config.sft_coef > 0:
        parts["sft"] = config.sft_coef * sft
    total = torch.stack(list(parts.values())).sum()
    report = {name: float(v.detach()) for name, v in parts.items()}
    report["clip_fraction"] = clipped_tokens / covered_tokens if covered_tokens else 0.0
    report["kl_ref"] = float(kl.detach()) if kl is not None else float("nan")
    return total, report


# --------------------------------------------------------------------------------------------
# Data: train.py's rows and examples, plus what RL needs (the document text, the gold grade)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RLPair:
    """One training pair: the texts the step-2 rules read, its prompt ids, and the gold grade
    (the label where the row has one, else the teacher's most likely grade)."""

    query: str
    doc: str
    prompt_ids: tuple[int, ...]
    gold: int


def target_grade(example: Any) -> int:
    """Gold grade index of a train.DistillExample: its label, else the teacher's argmax."""
    if example.gold != IGNORE_INDEX:
        return int(example.gold)
    return int(np.argmax(example.teacher_probs))


def rl_pairs(rows: Sequence[dict[str, Any]], examples: Sequence[Any], prompts: PromptTokenizer) -> list[RLPair]:
    return [
        RLPair(row["query"], row["doc"], tuple(prompts.prompt(row["query"], row["doc"]).input_ids), target_grade(e))
        for row, e in zip(rows, examples, strict=True)
    ]


def sft_loss(head: Any, batch: dict[str, Any], config: RLConfig) -> torch.Tensor:
    """The mode-balancing SFT term on a train.collate batch of teacher answers:

        L_sft = sft_trace_weight · CE(teacher trace tokens) + sft_grade_weight · CE(gold grade)

    (objectives.trace_ce / gold_grade_ce; the gold grade is the label, else the teacher's argmax,
    passed as batch["target_grade"])."""
    grade_logits, logits = distill.student_forward(head, batch)  # (B, K), (B, A, V)
    return config.sft_trace_weight * trace_ce(logits, batch["labels"]) + config.sft_grade_weight * gold_grade_ce(
        grade_logits, batch["target_grade"]
    )


# --------------------------------------------------------------------------------------------
# Group sampling
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def sample_group(
    model: Any,
    prompt_ids: Sequence[int],
    prompts: PromptTokenizer,
    group_size: int,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator,
) -> list[Completion]:
    """G answers to one prompt: a grade sampled over the K grade tokens, then an explanation sampled
    over the whole vocabulary with the KV cache until an end-of-turn id or max_new_tokens.

    The prompt runs once; its KV is expanded (a view, not a copy) to the G rows."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    grade_logits = out.logits[0, -1, list(prompts.grade_ids)].float().cpu() / temperature  # (K,)
    grades = torch.multinomial(torch.softmax(grade_logits, -1), group_size, replacement=True, generator=generator)
    cache = DynamicCache(config=model.config)
    for layer_idx, layer in enumerate(out.cache.layers):
        # (1, kv_heads, P, head_dim) -> (G, kv_heads, P, head_dim)
        cache.update(layer.keys.expand(group_size, -1, -1, -1), layer.values.expand(group_size, -1, -1, -1), layer_idx)
    step_ids = torch.tensor([[prompts.grade_ids[g]] for g in grades.tolist()], dtype=torch.long, device=device)  # (G, 1)
    stop = torch.tensor(sorted(prompts.stop_ids), dtype=torch.long)
    generated = []
    finished = torch.zeros(group_size, dtype=torch.bool)
    for position in range(len(prompt_ids), len(prompt_ids) + max_new_tokens):
        positions = torch.full((group_size, 1), position, dtype=torch.long, device=device)
        out = model(input_ids=step_ids, cache=cache, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = out.cache
        probs = torch.softmax(out.logits[:, -1].float().cpu() / temperature, dim=-1)  # (G, V)
        next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (G,)
        generated.append(next_ids)
        finished |= torch.isin(next_ids, stop)
        if finished.all():
            break
        step_ids = next_ids.unsqueeze(1).to(device)
    generated_ids = torch.stack(generated, dim=1).tolist()  # (G, steps)
    completions = []
    for grade, row_ids in zip(grades.tolist(), generated_ids, strict=True):
        stop_at = next((i for i, t in enumerate(row_ids) if t in prompts.stop_ids), None)
        kept = row_ids if stop_at is None else row_ids[: stop_at + 1]
        completions.append(Completion(int(grade), tuple(kept), stop_at is not None))
    return completions


def build_rollout(
    pairs: Sequence[RLPair],
    groups: Sequence[Sequence[Completion]],
    grade_rewards: torch.Tensor,
    explanation_rewards: torch.Tensor,
    prompts: PromptTokenizer,
    pad_id: int,
    config: RLConfig,
) -> RolloutBatch:
    """N prompts × G completions + (N, G) rewards of each step -> one RolloutBatch (on the CPU)."""
    grade_adv = group_advantages(grade_rewards, config.normalize_std)
    explanation_adv = group_advantages(explanation_rewards, config.normalize_std)

    def bounds(adv: torch.Tensor, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = elastic_clip_bounds(
            adv, rewards.std(dim=1, correction=0), config.clip_low, config.clip_high,
            config.elastic_adv, config.elastic_var, config.sigma_ref,
        )  # fmt: skip
        return low.reshape(-1), high.reshape(-1)

    answers = [(pair, c) for pair, group in zip(pairs, groups, strict=True) for c in group]
    length = max(len(p.prompt_ids) + 1 + len(c.explanation_ids) for p, c in answers)
    window = max(len(c.explanation_ids) for _, c in answers)
    input_ids = torch.full((len(answers), length), pad_id, dtype=torch.long)
    window_pos = torch.zeros((len(answers), window), dtype=torch.long)
    answer_ids = torch.zeros((len(answers), window), dtype=torch.long)
    explanation_mask = torch.zeros((len(answers), 1 + window), dtype=torch.bool)
    for row, (pair, c) in enumerate(answers):
        seq = [*pair.prompt_ids, prompts.grade_ids[c.grade], *c.explanation_ids]
        input_ids[row, : len(seq)] = torch.tensor(seq)
        n, grade_pos = len(c.explanation_ids), len(pair.prompt_ids) - 1
        window_pos[row] = torch.arange(grade_pos + 1, grade_pos + 1 + window).clamp(max=len(seq) - 1)
        answer_ids[row, :n] = torch.tensor(c.explanation_ids)
        explanation_mask[row, 1 : 1 + n] = True
    grade_mask = torch.zeros_like(explanation_mask)
    grade_mask[:, 0] = True
    return RolloutBatch(
        input_ids=input_ids,
        grade_pos=torch.tensor([len(p.prompt_ids) - 1 for p, _ in answers]),
        window_pos=window_pos,
        answer_ids=answer_ids,
        grade_index=torch.tensor([c.grade for _, c in answers]),
        grade_mask=grade_mask,
        explanation_mask=explanation_mask,
        grade_adv=grade_adv.reshape(-1),
        explanation_adv=explanation_adv.reshape(-1),
        grade_eps=bounds(grade_adv, grade_rewards),
        explanation_eps=bounds(explanation_adv, explanation_rewards),
    )


def rollout_to(batch: RolloutBatch, device: torch.device) -> RolloutBatch:
    moved = {
        f.name: (v.to(device) if isinstance(v, torch.Tensor) else tuple(t.to(device) for t in v) if isinstance(v, tuple) else v)
        for f in dataclasses.fields(batch)
        for v in [getattr(batch, f.name)]
    }
    return RolloutBatch(**moved)


# --------------------------------------------------------------------------------------------
# Evaluation: train.py's held-out metrics plus the RL ones
# --------------------------------------------------------------------------------------------


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, K) logits -> (B,) entropy in nats of softmax(logits)."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def heldout_metrics(
    logits: np.ndarray, ref_logits: np.ndarray, examples: Sequence[Any], values: Sequence[float]
) -> dict[str, float]:
    """Held-out metrics of the grade distribution p from (N, K) logits (no sampling, so they move
    smoothly), each prefixed "heldout_":

    reward: mean of E_p[grade_reward] = Σ_k p_k · grade_reward(k, gold) (gold: label, else teacher argmax);
    entropy: mean entropy of p in nats; kl_ref: mean exact KL(p ‖ p_ref) over the K grades to the
    starting student; plus train.metrics_from_logits (accuracy_gold, ndcg10_gold, and the teacher
    agreement / KL where rows carry teacher_probs)."""
    z, z_ref = torch.from_numpy(np.asarray(logits)).double(), torch.from_numpy(np.asarray(ref_logits)).double()
    probs = torch.softmax(z, -1)
    gold = torch.tensor([target_grade(e) for e in examples])
    v = torch.tensor(values, dtype=torch.float64)
    reward_table = 1.0 - (v.unsqueeze(0) - v[gold].unsqueeze(1)).abs() / float(v.max() - v.min())  # (N, K)
    kl_ref = (probs * (torch.log_softmax(z, -1) - torch.log_softmax(z_ref, -1))).sum(-1)
    metrics = {
        "reward": float((probs * reward_table).sum(-1).mean()),
        "entropy": float(entropy(z).mean()),
        "kl_ref": float(kl_ref.mean()),
        **{k: v for k, v in distill.metrics_from_logits(np.asarray(logits), examples, values).items() if k != "pairs"},
    }
    return {f"heldout_{k}": float(v) for k, v in metrics.items()}


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def _step_rngs(config: RLConfig, step: int, rank: int) -> tuple[torch.Generator, random.Random]:
    """Sampling randomness as a pure function of (seed, step, rank): resuming needs only the step."""
    seed = (config.seed * 1_000_003 + step) * 1_009 + rank
    return torch.Generator().manual_seed(seed), random.Random(seed)


@dataclass
class _RLRun:
    """What one RL run holds, prepared by `_prepare` (policy and optimizer wrapped by accelerate)."""

    accelerator: Any
    head: Any
    optimizer: Any
    reference: Any
    tokenizer: Any
    prompts: PromptTokenizer
    student_manifest: Any
    heldout_rows: list[dict[str, Any]]
    train_examples: list[Any]
    eval_examples: list[Any]
    train_pairs: list[RLPair]
    ref_logits: np.ndarray  # (N, K) held-out grade logits of the frozen starting student

    @property
    def values(self) -> tuple[float, ...]:
        return self.prompts.format.values


def train(
    config: RLConfig,
    resume: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    allow_config_change: bool = False,
) -> Path:
    """Refine `config.student` on `config.data` and write the refined student to `config.out`.

    Run it as is or under `accelerate launch`: every process samples its own prompts (seeded by its
    rank) and DDP averages the gradients. `progress` gets each metrics row (the CLI prints them).
    `resume` continues the run in `config.out` exactly, if its identity matches (runs.py);
    `allow_config_change` continues anyway and records the change."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out = Path(config.out)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    accelerator = Accelerator(cpu=config.device == "cpu")
    set_seed(config.seed)
    run_dir = RunDir(out, accelerator, CONFIG_NAME)
    settings = dataclasses.asdict(config)
    identity = run_identity(settings, RLConfig.RESUME_IGNORES, config.data, config.student, accelerator.num_processes)
    opened = run_dir.open(resume, identity, "RL", allow_config_change)

    run = _prepare(config, accelerator)
    started = run_dir.start(opened, settings)
    logger.info(
        "RL on %s: %d training pairs, %d held out, %d steps, %d process(es)\n%s",
        config.student, len(run.train_pairs), len(run.eval_examples), config.steps, accelerator.num_processes,
        json.dumps(settings, indent=2),
    )  # fmt: skip

    def record(row: dict[str, Any]) -> None:
        run_dir.record(row)
        if progress is not None and run_dir.main:
            progress(row)

    truncation = {"train": truncation_report(run.train_examples), "heldout": truncation_report(run.eval_examples)}
    for split, report in truncation.items():
        log_truncation(split, report, run.prompts.format.max_doc_tokens, config.max_trace_tokens)
    # The truncation counts go with the first row this (re)start writes when they are news.
    pending = {f"{split}_{k}": v for split, report in truncation.items() for k, v in report.items()}
    if started.step and not started.data_changed:
        pending = {}

    step = started.step
    if step == 0:
        record({"step": 0, **_evaluate(run, config), **pending})
        pending = {}
    checkpoint_state = {"identity": identity, "resumes": started.resumes}
    while step < config.steps:
        step += 1
        row = _rl_step(run, config, step)
        if step % config.eval_every == 0 or step == config.steps:
            row.update(_evaluate(run, config))
        record({**row, **pending})
        pending = {}
        if step % config.save_every == 0 and step != config.steps:
            run_dir.save_checkpoint(step, checkpoint_state, keep=2)

    accelerator.wait_for_everyone()
    if run_dir.main:
        _write_refined_student(run, config, step, {"truncation": truncation, "resumes": started.resumes,
                                                   "rl_data_sha256": identity["data_sha256"]})
    accelerator.wait_for_everyone()
    return out


def _prepare(config: RLConfig, accelerator: Any) -> _RLRun:
    """The policy (the student, trained), its frozen copy (the reference), both splits, the
    optimizer, and the reference's held-out grade logits (computed once: it never changes)."""
    model, tokenizer, prompts, student_manifest = distill.load_student(config.student)
    if config.max_doc_tokens is not None:
        prompts = PromptTokenizer(tokenizer, prompts.format.with_overrides(max_doc_tokens=config.max_doc_tokens))
    model.config.use_cache = True  # sampling uses the KV cache; the loss forward passes use_cache=False

    rows = distill.load_rows(config.data)
    train_rows, heldout_rows = distill.split_rows(rows, config.eval_fraction, config.seed)
    train_examples = distill.build_examples(prompts, train_rows, config.max_trace_tokens)
    eval_examples = distill.build_examples(prompts, heldout_rows, config.max_trace_tokens)
    train_pairs = rl_pairs(train_rows, train_examples, prompts)
    if config.group_size == 1:
        logger.warning("group_size=1: every group-normalised advantage is 0, so only the SFT and KL terms train")

    reference = distill.StudentHead(copy.deepcopy(model), prompts.grade_ids).eval().requires_grad_(False)
    head = distill.StudentHead(model, prompts.grade_ids)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    head, optimizer = accelerator.prepare(head, optimizer)
    reference.to(accelerator.device)
    ref_logits = distill.predict_grade_logits(
        reference, eval_examples, prompts.pad_id, config.eval_batch_size, accelerator.device
    )
    return _RLRun(accelerator, head, optimizer, reference, tokenizer, prompts, student_manifest, heldout_rows,
                  train_examples, eval_examples, train_pairs, ref_logits)


def _evaluate(run: _RLRun, config: RLConfig) -> dict[str, float]:
    logits = distill.predict_grade_logits(
        run.head, run.eval_examples, run.prompts.pad_id, config.eval_batch_size, run.accelerator.device
    )
    return heldout_metrics(logits, run.ref_logits, run.eval_examples, run.values)


def _rl_step(run: _RLRun, config: RLConfig, step: int) -> dict[str, Any]:
    """One optimisation step: sample groups, reward both steps, then `policy_epochs` gradient passes
    over the rollout (plus the SFT term). Returns the step's metrics row."""
    accelerator, head, prompts, values = run.accelerator, run.head, run.prompts, run.values
    began = time.perf_counter()
    generator, picker = _step_rngs(config, step, accelerator.process_index)
    policy = accelerator.unwrap_model(head).model
    policy.eval()  # sampling and old log-probs without dropout: the ratio starts at exactly 1
    chosen = [run.train_pairs[picker.randrange(len(run.train_pairs))] for _ in range(config.prompts_per_step)]
    groups = [
        sample_group(policy, p.prompt_ids, prompts, config.group_size, config.max_new_tokens, config.temperature, generator)
        for p in chosen
    ]
    grade_rewards = torch.tensor([[grade_reward(c.grade, p.gold, values) for c in g] for p, g in zip(chosen, groups, strict=True)])
    checks = [
        [
            explanation_checks(c, p.query, p.doc, prompts, config.min_explanation_tokens, config.max_explanation_tokens)
            for c in g
        ]
        for p, g in zip(chosen, groups, strict=True)
    ]
    explanation_rewards = torch.tensor([[explanation_reward(c) for c in g] for g in checks])
    batch = rollout_to(
        build_rollout(chosen, groups, grade_rewards, explanation_rewards, prompts, prompts.pad_id, config),
        accelerator.device,
    )
    head.eval()
    with torch.no_grad():
        batch.old_logp, _ = answer_logprobs(head, batch, config.temperature)
        batch.ref_logp, _ = answer_logprobs(run.reference, batch, config.temperature)

    head.train()
    terms: dict[str, float] = {}
    for _ in range(config.policy_epochs):
        run.optimizer.zero_grad(set_to_none=True)
        # One forward per backward (DDP marks each parameter ready once per backward): the
        # policy-gradient part first, without gradient sync when the SFT part follows.
        logp, grade_logits = answer_logprobs(head, batch, config.temperature)
        loss, parts = rl_loss(logp, batch, config, None)
        with accelerator.no_sync(head) if config.sft_coef > 0 else contextlib.nullcontext():
            accelerator.backward(loss)
        if config.sft_coef > 0:
            chosen_sft = [run.train_examples[picker.randrange(len(run.train_examples))] for _ in range(config.sft_batch_size)]
            sft_batch = distill.batches_to_device(distill.collate(chosen_sft, prompts.pad_id), accelerator.device)
            sft_batch["target_grade"] = torch.tensor([target_grade(e) for e in chosen_sft], device=accelerator.device)
            sft = config.sft_coef * sft_loss(head, sft_batch, config)
            accelerator.backward(sft)
            parts["sft"] = float(sft.detach())
            loss = loss.detach() + sft.detach()
        accelerator.clip_grad_norm_(head.parameters(), config.max_grad_norm)
        run.optimizer.step()
        for name, value in {**parts, "loss": float(loss.detach())}.items():
            terms[name] = terms.get(name, 0.0) + value / config.policy_epochs

    return {
        "step": step,
        "reward_grade": float(grade_rewards.mean()),
        "reward_explanation": float(explanation_rewards.mean()),
        "grade_entropy": float(entropy(grade_logits.detach()).mean()),
        **{f"rule_{k}": float(np.mean([c[k] for g in checks for c in g])) for k in checks[0][0]},
        **terms,
        "seconds": round(time.perf_counter() - began, 3),
    }


def _write_refined_student(run: _RLRun, config: RLConfig, step: int, info: dict[str, Any]) -> None:
    """The refined student checkpoint (main process), then the run's resumable checkpoints go: it is complete."""
    out = Path(config.out)
    final = next(r for r in reversed(read_metrics(out)) if "heldout_reward" in r)
    distill.write_student(
        run.accelerator.unwrap_model(run.head).model,
        run.tokenizer,
        run.prompts,
        out,
        source={"model": str(config.student), "student_sha256": checkpoint_hash(config.student)},
        info={
            **(run.student_manifest.info if run.student_manifest else {}),
            "rl_config": dataclasses.asdict(config),
            "rl_data": str(config.data),
            "rl_steps": step,
            "rl_metrics": final,
            **info,
            "probe_pairs": [[r["query"], r["doc"]] for r in run.heldout_rows[:128]],
        },
    )
    shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl."""
    return read_records(Path(out) / METRICS_NAME)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

_PATHS = ("student", "data", "out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student", required=True, help="distilled student checkpoint directory")
    parser.add_argument("--data", required=True, help="teacher.jsonl (teacher_probs and/or label per row, trace)")
    parser.add_argument("--out", required=True, help="output directory: refined student + metrics.jsonl")
    add_run_flags(parser)
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=DEFAULT_PRESET,
        help=f"clip / SFT settings to start from (default {DEFAULT_PRESET}); the flags below override them",
    )  # fmt: skip
    add_config_flags(parser, RLConfig, skip=_PATHS)


def config_from_args(args: argparse.Namespace) -> RLConfig:
    values: dict[str, Any] = dict(PRESETS[args.preset])
    values.update(config_flag_values(args, RLConfig, skip=_PATHS))
    return RLConfig(student=args.student, data=args.data, out=args.out, **values)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    print(f"answerfirst rl ({args.preset}) — config:\n" + "\n".join(f"  {k:24s} {v}" for k, v in dataclasses.asdict(config).items()), flush=True)

    def show(row: dict[str, Any]) -> None:
        if row["step"] == 0:
            print(f"step 0/{config.steps}  heldout reward {row['heldout_reward']:.3f}", flush=True)
            return
        held = f"  heldout reward {row['heldout_reward']:.3f} ndcg {row.get('heldout_ndcg10_gold', float('nan')):.3f}" if "heldout_reward" in row else ""
        print(
            f"step {row['step']}/{config.steps}  reward grade {row['reward_grade']:.3f} expl {row['reward_explanation']:.3f}"
            f"  entropy {row['grade_entropy']:.3f}  clip {row['clip_fraction']:.3f}  kl {row['kl_ref']:.4f}{held}"
            f"  ({row['seconds']:.1f}s)",
            flush=True,
        )

    out = train(config, resume=args.resume, progress=show, allow_config_change=args.allow_config_change)
    print(f"refined student written to {out} (metrics: {out / METRICS_NAME})", flush=True)
    return 0
