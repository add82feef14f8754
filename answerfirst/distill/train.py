"""`answerfirst train`: distil a student from teacher labels on accelerate.

Reads top to bottom: config, data (teacher.jsonl -> examples -> padded batches), the model forward
(grade logits at the first answer position + full-vocabulary logits only on the answer window),
evaluation, the output checkpoint, the loop, the CLI.

    L = α·τ²·KL(p_teacher^τ ‖ p_student^τ) + β·CE(trace) + γ·CE(gold grade)   (distill/objectives.py)

The same code runs on CPU, one GPU (bf16 autocast) and many processes via `accelerate launch`:
every rank takes a disjoint slice of each step's micro-batches, DDP averages the gradients. The run
directory (identity, checkpoints, exact resume, metrics.jsonl, truncation report, config flags) is
distill/runs.py's, shared with distill/rl.py, which also builds on `load_rows`, `split_rows`,
`build_examples`, `collate`, `StudentHead` / `student_forward`, `predict_grade_logits`,
`metrics_from_logits`, `load_student` and `write_student` (see __all__).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from answerfirst.afrl import (
    DEFAULT_MAX_TRACE_TOKENS,
    FormatError,
    PromptTokenizer,
    TrainingExample,
    grade_probs,
)
from answerfirst.artifact import Manifest, bind_format, checkpoint_hash, give_default_mode, has_manifest
from answerfirst.distill.objectives import IGNORE_INDEX, LossWeights, distill_loss
from answerfirst.distill.runs import (
    CHECKPOINTS_DIR,
    RunDir,
    add_config_flags,
    add_run_flags,
    config_flag_values,
    log_truncation,
    run_identity,
    truncation_report,
)
from answerfirst.extras import requires

with requires("train", "answerfirst.distill"):
    import torch

logger = logging.getLogger(__name__)

CONFIG_NAME = "training_config.json"
__all__ = [  # what distill/pipeline.py and rl.py build on: keep these signatures stable
    "CHECKPOINTS_DIR", "DistillExample", "StudentHead", "TrainConfig", "TrainResult", "batch_loss", "build_examples",
    "collate", "evaluate", "load_rows", "load_student", "metrics_from_logits", "predict_grade_logits", "split_rows",
    "student_forward", "train", "write_student",
]


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Every knob of a training run; printed at start, saved as training_config.json and in the manifest.

    alpha, beta, gamma, temperature, delta: loss weights (see objectives.py); gamma needs gold labels,
    delta rows with "tags" ([[start, end, tag], ...] character spans of the document).
    tag_layer: the hidden state (after this many decoder layers) the tag term's probe reads.
    lr, weight_decay, warmup_ratio, schedule ("cosine" | "linear" | "constant"), max_grad_norm.
    epochs, max_steps (0 = epochs decide), batch_size (per process), grad_accum (micro-batches per step).
    max_doc_tokens (None = the format's), max_trace_tokens: sequence limits.
    eval_fraction: share of queries held out when the rows carry no "split" field.
    eval_every, save_every, log_every: in optimizer steps (0 = only at the end).
    keep_checkpoints: how many step checkpoints to keep on disk.
    gradient_checkpointing: recompute activations in backward (for the 0.6B student on a GPU).
    mixed_precision: "auto" (bf16 on GPU, none on CPU) | "no" | "bf16" | "fp16".

    `--resume` continues a run only when every field is the checkpointed run's, except the
    RESUME_IGNORES ones, which change how often it logs, evaluates and saves but not what it learns.
    """

    RESUME_IGNORES: ClassVar[tuple[str, ...]] = ("log_every", "eval_every", "save_every", "keep_checkpoints")

    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 0.0
    temperature: float = 1.0
    delta: float = 0.0
    tag_layer: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    schedule: str = "cosine"
    max_grad_norm: float = 1.0
    epochs: float = 1.0
    max_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    max_doc_tokens: int | None = None
    max_trace_tokens: int = DEFAULT_MAX_TRACE_TOKENS
    eval_fraction: float = 0.1
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 10
    keep_checkpoints: int = 2
    seed: int = 0
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"

    def __post_init__(self) -> None:
        def fail(name: str, what: str) -> None:
            raise ValueError(f"TrainConfig.{name}: {what}, got {getattr(self, name)!r}")

        self.loss_weights  # validates alpha, beta, gamma, temperature, delta  # noqa: B018
        if not self.lr > 0:
            fail("lr", "must be > 0 (e.g. 5e-4 for a tiny model, 2e-5 for 0.6B)")
        if self.weight_decay < 0:
            fail("weight_decay", "must be >= 0")
        if not 0 <= self.warmup_ratio < 1:
            fail("warmup_ratio", "must be in [0, 1)")
        if self.schedule not in ("cosine", "linear", "constant"):
            fail("schedule", "must be cosine, linear or constant")
        if not self.max_grad_norm > 0:
            fail("max_grad_norm", "must be > 0")
        if not self.epochs > 0:
            fail("epochs", "must be > 0")
        for name in ("max_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                fail(name, "must be >= 0 (0 = off / decided by epochs)")
        for name in ("batch_size", "grad_accum", "max_trace_tokens", "log_every", "keep_checkpoints", "tag_layer"):
            if getattr(self, name) < 1:
                fail(name, "must be >= 1")
        if self.max_doc_tokens is not None and self.max_doc_tokens < 1:
            fail("max_doc_tokens", "must be >= 1 or None")
        if not 0 < self.eval_fraction < 1:
            fail("eval_fraction", "must be in (0, 1)")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            fail("mixed_precision", "must be auto, no, bf16 or fp16")

    @property
    def loss_weights(self) -> LossWeights:
        try:
            return LossWeights(self.alpha, self.beta, self.gamma, self.temperature, self.delta)
        except ValueError as e:
            raise ValueError(f"TrainConfig.{e}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"TrainConfig: unknown field(s) {', '.join(sorted(unknown))}")
        return cls(**data)

    def describe(self) -> str:
        return "\n".join(f"  {k:24s} {v}" for k, v in self.to_dict().items())


# ------------------------------------------------------------------------------------------------
# Data: teacher.jsonl rows -> examples -> padded batches
# ------------------------------------------------------------------------------------------------


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL of training rows; every problem names its line.

    A row: {"id", "query", "doc"} plus either "teacher_probs" (K floats) and "trace" (distillation)
    or "label" (gold grade index) and "reason"/"trace" (plain SFT, e.g. the sample teacher);
    "label" and "split" ("train" | "heldout") are optional in distillation rows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training data {path} does not exist (label pairs first: `answerfirst label`)")
    rows, ids = [], set()
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}:{line_no}: not a UTF-8 JSON object ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{line_no}: expected a JSON object")
            for key in ("id", "query", "doc"):
                if key not in row:
                    raise ValueError(f"{path}:{line_no}: missing field {key!r}")
            if "teacher_probs" not in row and "label" not in row:
                raise ValueError(f"{path}:{line_no}: a row needs 'teacher_probs' (teacher labels) or 'label' (gold)")
            row_id = str(row["id"])
            if row_id in ids:
                raise ValueError(f"{path}:{line_no}: duplicate id {row_id!r}")
            ids.add(row_id)
            rows.append(row)
    if not rows:
        raise ValueError(f"{path} holds no rows")
    has_teacher = {"teacher_probs" in r for r in rows}
    if len(has_teacher) > 1:
        raise ValueError(f"{path}: some rows have teacher_probs and some do not; label every row with one teacher")
    return rows


def split_rows(rows: Sequence[dict[str, Any]], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, heldout) by query: rows' own "split" field when present, else a seeded hash of the
    query text, so no held-out query is ever seen in training."""
    if any("split" in r for r in rows):
        train = [r for r in rows if r.get("split", "train") != "heldout"]
        heldout = [r for r in rows if r.get("split", "train") == "heldout"]
    else:
        threshold = int(eval_fraction * 10_000)
        bucket = lambda q: zlib.crc32(f"{seed}:{q}".encode()) % 10_000  # noqa: E731
        train = [r for r in rows if bucket(r["query"]) >= threshold]
        heldout = [r for r in rows if bucket(r["query"]) < threshold]
    if not train:
        raise ValueError("no training rows left after the held-out split; lower eval_fraction or add queries")
    if not heldout:
        logger.warning("the held-out split is empty (too few queries for eval_fraction); evaluating on train rows")
        heldout = list(train)
    return train, heldout


@dataclass(frozen=True)
class DistillExample:
    """One training sequence plus what the loss and the metrics need.

    example: input ids, grade position and trace labels (afrl.TrainingExample).
    teacher_probs: (K,) teacher first-token distribution, or None (gold-only SFT).
    gold: gold grade index or -100; query: groups rows for NDCG; id: the row id.
    """

    example: TrainingExample
    teacher_probs: tuple[float, ...] | None
    gold: int
    query: str
    id: str


def build_examples(
    prompts: PromptTokenizer, rows: Sequence[dict[str, Any]], max_trace_tokens: int = DEFAULT_MAX_TRACE_TOKENS,
    tags: bool = False,
) -> list[DistillExample]:
    """Rows -> examples, every sequence built by afrl.PromptTokenizer. The answer starts with the
    teacher's argmax grade (distillation) or the gold grade (SFT) and continues with its trace.
    tags: also place each row's document "tags" on its tokens (for the tag term)."""
    k = len(prompts.grade_ids)
    examples = []
    for row in rows:
        where = f"row id={row.get('id')!r}"
        gold = _gold_index(row.get("label"), k, where)
        teacher = row.get("teacher_probs")
        if teacher is not None:
            probs = np.asarray(teacher, dtype=np.float64)
            if probs.shape != (k,) or not np.isfinite(probs).all() or (probs < 0).any() or abs(probs.sum() - 1) > 1e-3:
                raise ValueError(f"{where}: teacher_probs must be {k} non-negative numbers summing to 1, got {teacher!r}")
            grade = int(probs.argmax())
            teacher_probs: tuple[float, ...] | None = tuple(float(p) for p in probs / probs.sum())
        else:
            if gold == IGNORE_INDEX:
                raise ValueError(f"{where}: no teacher_probs and no label; nothing to learn from")
            grade, teacher_probs = gold, None
        trace = row.get("trace", row.get("reason", "")) or ""
        try:
            doc_tags = row.get("tags") if tags else None
            example = prompts.training_example(row["query"], row["doc"], grade, str(trace), max_trace_tokens, doc_tags)
        except FormatError as e:
            raise ValueError(f"{where}: {e}") from None
        examples.append(DistillExample(example, teacher_probs, gold, row["query"], str(row["id"])))
    return examples


def _gold_index(label: Any, k: int, where: str) -> int:
    if label is None:
        return IGNORE_INDEX
    if isinstance(label, bool) or not isinstance(label, (int, float)) or label != int(label) or not 0 <= label < k:
        raise ValueError(f"{where}: label must be a grade index 0..{k - 1}, got {label!r}")
    return int(label)


def collate(examples: Sequence[DistillExample], pad_id: int) -> dict[str, torch.Tensor | None]:
    """Right-pad a batch. With a causal mask a real token never attends to the pads after it, so no
    attention mask is needed and padded rows give exactly the unpadded logits.

    input_ids (B, T); grade_pos (B,) the last prompt position; window_pos (B, A) positions
    grade_pos+1 .. grade_pos+A (the grade token onwards: position t predicts token t+1), clamped
    into the row; labels (B, A) the tokens at window_pos, -100 where unlabelled or past the row's end;
    teacher_probs (B, K) or None; gold (B,); tags (B, T) token tags (-100 = none), or None when no
    example of the batch carries any.
    """
    if not examples:
        raise ValueError("collate: empty batch")
    seqs = [e.example.input_ids for e in examples]
    max_len = max(len(s) for s in seqs)
    answer_len = max(len(e.example.input_ids) - e.example.grade_pos - 1 for e in examples)
    input_ids = torch.full((len(seqs), max_len), pad_id, dtype=torch.long)
    window_pos = torch.zeros((len(seqs), answer_len), dtype=torch.long)
    labels = torch.full((len(seqs), answer_len), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        ids, start = e.example.input_ids, e.example.grade_pos + 1
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        n = len(ids) - start
        window_pos[row, :n] = torch.arange(start, len(ids))
        window_pos[row, n:] = len(ids) - 1  # clamped; their labels stay -100
        labels[row, :n] = torch.tensor(e.example.labels[start:], dtype=torch.long)
    has_teacher = [e.teacher_probs is not None for e in examples]
    if any(has_teacher) and not all(has_teacher):
        raise ValueError("collate: a batch mixes rows with and without teacher_probs")
    teacher = torch.tensor([e.teacher_probs for e in examples], dtype=torch.float32) if all(has_teacher) else None
    tags = None
    if any(e.example.tags is not None for e in examples):
        tags = torch.full((len(seqs), max_len), IGNORE_INDEX, dtype=torch.long)
        for row, e in enumerate(examples):
            if e.example.tags is not None:
                tags[row, : len(e.example.tags)] = torch.tensor(e.example.tags, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "grade_pos": torch.tensor([e.example.grade_pos for e in examples], dtype=torch.long),
        "window_pos": window_pos,
        "labels": labels,
        "teacher_probs": teacher,
        "gold": torch.tensor([e.gold for e in examples], dtype=torch.long),
        "tags": tags,
    }


def batches_to_device(batch: dict[str, torch.Tensor | None], device: torch.device) -> dict[str, torch.Tensor | None]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------
# The model forward
# ------------------------------------------------------------------------------------------------


class StudentHead(torch.nn.Module):
    """A causal LM seen through the AFRL losses: one decoder pass, then the output head only where a
    loss reads it. At 0.6B with a 151k vocabulary, full logits at every prompt position would be
    the largest tensor of the step; here they exist only on the answer window.

    Wrapping the LM in a module (rather than calling its parts from the loop) keeps DDP's gradient
    hooks on the path when accelerate wraps this module.

    tag_classes > 0 adds the tag term's probe: a linear layer on the hidden state after `tag_layer`
    decoder layers, giving (B, T, tag_classes) logits. It is training-only: the saved model is `model`."""

    def __init__(self, model: Any, grade_ids: Sequence[int], tag_classes: int = 0, tag_layer: int = 1):
        super().__init__()
        self.model = model
        self.register_buffer("grade_ids", torch.tensor(list(grade_ids), dtype=torch.long), persistent=False)
        self.tag_layer = tag_layer
        self.tag_probe = torch.nn.Linear(model.config.hidden_size, tag_classes) if tag_classes else None

    def forward(
        self, input_ids: torch.Tensor, grade_pos: torch.Tensor, window_pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(grade_logits (B, K), logits (B, A, V) on the answer window, tag_logits (B, T, C) or None)."""
        probe = self.tag_probe is not None
        outputs = self.model.model(input_ids=input_ids, use_cache=False, output_hidden_states=probe)
        hidden = outputs.last_hidden_state  # (B, T, H)
        tag_logits = self.tag_probe(outputs.hidden_states[self.tag_layer]) if probe else None  # (B, T, C)
        head = self.model.get_output_embeddings()
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        grade_hidden = hidden[rows, grade_pos]  # (B, H) the last prompt position
        grade_logits = grade_hidden @ head.weight[self.grade_ids].T  # (B, K)
        if head.bias is not None:
            grade_logits = grade_logits + head.bias[self.grade_ids]
        window_hidden = hidden.gather(1, window_pos.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))  # (B, A, H)
        logits = head(window_hidden)  # (B, A, V) only on the answer window
        return grade_logits, logits, tag_logits


def student_forward(head: torch.nn.Module, batch: dict[str, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """(grade_logits (B, K), logits (B, A, V)) for a collated batch; `objectives.trace_ce(logits,
    batch["labels"])` is the trace CE (window position a predicts labels[:, a + 1])."""
    grade_logits, logits, _ = head(batch["input_ids"], batch["grade_pos"], batch["window_pos"])
    return grade_logits, logits


def batch_loss(
    head: torch.nn.Module, batch: dict[str, torch.Tensor | None], weights: LossWeights
) -> tuple[torch.Tensor, dict[str, float]]:
    grade_logits, logits, tag_logits = head(batch["input_ids"], batch["grade_pos"], batch["window_pos"])
    teacher, tags = batch["teacher_probs"], batch["tags"]
    if tags is None and tag_logits is not None:  # a batch of untagged rows: the tag term is 0 for it
        tags = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    return distill_loss(grade_logits, logits, batch["labels"], teacher, batch["gold"], weights, tag_logits, tags)


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_grade_logits(
    head: torch.nn.Module, examples: Sequence[DistillExample], pad_id: int, batch_size: int, device: torch.device
) -> np.ndarray:
    """(N, K) student grade logits for `examples`, in order (batched by length to pad little)."""
    was_training = head.training
    head.eval()
    out = np.zeros((len(examples), len(_grade_ids(head))), dtype=np.float64)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].example.input_ids))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = batches_to_device(collate([examples[i] for i in idx], pad_id), device)
        # Only the grade rows are needed: an empty window skips the full-vocabulary head.
        grade_logits = head(batch["input_ids"], batch["grade_pos"], batch["window_pos"][:, :0])[0]
        out[idx] = grade_logits.float().cpu().numpy()
    head.train(was_training)
    return out


def _grade_ids(head: torch.nn.Module) -> torch.Tensor:
    return getattr(head, "module", head).grade_ids


def metrics_from_logits(
    student_logits: np.ndarray, examples: Sequence[DistillExample], values: Sequence[float]
) -> dict[str, float]:
    """Held-out metrics (evaluate.report) from (N, K) student grade logits: accuracy_gold and
    ndcg10_gold where examples carry gold grades; kl_to_teacher, agreement_teacher and
    spearman_teacher where every example carries the teacher's distribution."""
    from answerfirst.distill.evaluate import report

    rows = [{"query": e.query, "label": None if e.gold == IGNORE_INDEX else e.gold} for e in examples]
    teacher = None
    if examples and all(e.teacher_probs is not None for e in examples):
        teacher = np.asarray([e.teacher_probs for e in examples], dtype=np.float64)
    metrics = report(rows, grade_probs(student_logits), values, teacher)
    metrics["pairs"] = float(metrics["pairs"])
    del metrics["queries"]
    return metrics


def evaluate(
    head: torch.nn.Module,
    examples: Sequence[DistillExample],
    values: Sequence[float],
    pad_id: int,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """The metrics dict (see metrics_from_logits) of the student behind `head` on `examples`."""
    logits = predict_grade_logits(head, examples, pad_id, batch_size, torch.device(device))
    return metrics_from_logits(logits, examples, values)


# ------------------------------------------------------------------------------------------------
# Output: an HF checkpoint that answerfirst.load() opens directly
# ------------------------------------------------------------------------------------------------


def write_student(
    model: Any,
    tokenizer: Any,
    prompts: PromptTokenizer,
    out: str | Path,
    source: dict[str, Any],
    info: dict[str, Any],
) -> Manifest:
    """Save weights + tokenizer + answerfirst.json (kind "checkpoint"; source gets the weights' sha256)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    give_default_mode(out, ["model.safetensors"])
    manifest = Manifest(
        kind="checkpoint",
        format=prompts.format,
        grade_token_ids=prompts.grade_ids,
        source={**source, "sha256": checkpoint_hash(out)},
        info=info,
    )
    manifest.write(out)
    return manifest


def load_student(path: str | Path, device: str | torch.device = "cpu") -> tuple[Any, Any, PromptTokenizer, Manifest | None]:
    """(model in train mode, tokenizer, prompt tokenizer, manifest or None) from a dir or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(path)
    manifest = Manifest.read(path) if Path(path).is_dir() and has_manifest(path) else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load a student model + tokenizer from {path!r}: {e}") from None
    prompts = bind_format(tokenizer, manifest, path)
    return model.to(device).train(), tokenizer, prompts, manifest


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    out: Path
    steps: int
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)


def lr_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    warmup = int(config.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if config.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def micro_batch_order(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Micro-batches of example indices for `epoch`: a permutation seeded by (seed, epoch), so the
    order is a pure function of the position and resuming needs only the step number."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n_examples, generator=generator).tolist()
    return [perm[i : i + batch_size] for i in range(0, n_examples, batch_size)]


@dataclass
class _Run:
    """Everything one training run holds, prepared by `_prepare` (the model and optimizer already
    wrapped by accelerate)."""

    accelerator: Any
    head: Any
    optimizer: Any
    scheduler: Any
    tokenizer: Any
    prompts: PromptTokenizer
    student_manifest: Manifest | None
    heldout_rows: list[dict[str, Any]]
    train_examples: list[DistillExample]
    eval_examples: list[DistillExample]
    steps_per_epoch: int
    total_steps: int

    @property
    def values(self) -> tuple[float, ...]:
        return self.prompts.format.values


def train(
    student: str | Path,
    data: str | Path,
    out: str | Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    source: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    allow_config_change: bool = False,
) -> TrainResult:
    """Train `student` on `data` (teacher.jsonl, or gold rows for SFT) and write the checkpoint to `out`.

    Run it as is (one process) or under `accelerate launch` (one process per device); the same
    code does both. `progress` gets each logged record (the CLI prints them). `resume` continues the
    run in `out` from its newest complete checkpoint, exactly, if the config, data and starting model
    are those of that run (runs.py); `allow_config_change` continues anyway and records the change."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out = Path(out)
    mixed = config.mixed_precision
    if mixed == "auto":
        mixed = "bf16" if torch.cuda.is_available() else "no"
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available())
    set_seed(config.seed)
    run_dir = RunDir(out, accelerator, CONFIG_NAME)
    identity = run_identity(config.to_dict(), TrainConfig.RESUME_IGNORES, data, student, accelerator.num_processes)
    opened = run_dir.open(resume, identity, "training", allow_config_change)

    run = _prepare(student, data, config, accelerator)
    started = run_dir.start(opened, config.to_dict())
    logger.info(
        "training %s on %d rows (%d held out), %d steps (%d per epoch), %d process(es)\n%s",
        student, len(run.train_examples), len(run.eval_examples), run.total_steps, run.steps_per_epoch,
        accelerator.num_processes, config.describe(),
    )  # fmt: skip
    history = started.history

    def record(entry: dict[str, Any]) -> None:
        history.append(entry)
        run_dir.record(entry)
        if progress is not None and run_dir.main:
            progress(entry)

    truncation = {"train": truncation_report(run.train_examples), "heldout": truncation_report(run.eval_examples)}
    for split, report in truncation.items():
        log_truncation(split, report, run.prompts.format.max_doc_tokens, config.max_trace_tokens)
    if not started.step or started.data_changed:
        record({"split": "data", "step": started.step,
                **{f"{split}_{k}": v for split, report in truncation.items() for k, v in report.items()}})

    checkpoint_state = {"identity": identity, "resumes": started.resumes}
    step = _run_steps(run, config, run_dir, started.step, checkpoint_state, record)
    final = _evaluate_heldout(run, config)
    record({"split": "eval", "step": step, **final})
    accelerator.wait_for_everyone()
    if run_dir.main:
        _write_output(run, config, out, {"model": str(student), **(source or {})}, {
            **(info or {}),
            "training_config": config.to_dict(),
            "training_data": str(data),
            "training_data_sha256": identity["data_sha256"],
            "steps": step,
            "metrics": final,
            "truncation": truncation,
            "resumes": started.resumes,
        })  # fmt: skip
    accelerator.wait_for_everyone()
    return TrainResult(out, step, final, history)


def _write_output(run: _Run, config: TrainConfig, out: Path, source: dict[str, Any], info: dict[str, Any]) -> None:
    """The trained student as a checkpoint answerfirst.load() opens (main process), with held-out probe pairs."""
    unwrapped = run.accelerator.unwrap_model(run.head).model
    unwrapped.config.use_cache = True
    if config.gradient_checkpointing:
        unwrapped.activation_checkpointing_disable()
    write_student(unwrapped, run.tokenizer, run.prompts, out, source=source, info={
        **info,
        "probe_pairs": [[r["query"], r["doc"]] for r in run.heldout_rows[:128]],
        "student_manifest_source": (run.student_manifest.source if run.student_manifest else None),
    })  # fmt: skip


def _prepare(student: str | Path, data: str | Path, config: TrainConfig, accelerator: Any) -> _Run:
    """The student, its prompt tokenizer, the examples of both splits, the step budget, and the
    optimizer and schedule, wrapped by accelerate."""
    model, tokenizer, prompts, student_manifest = load_student(student)
    if config.max_doc_tokens is not None:
        prompts = PromptTokenizer(tokenizer, prompts.format.with_overrides(max_doc_tokens=config.max_doc_tokens))
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable()
    model.config.use_cache = False

    rows = load_rows(data)
    train_rows, heldout_rows = split_rows(rows, config.eval_fraction, config.seed)
    tagged = config.delta > 0
    train_examples = build_examples(prompts, train_rows, config.max_trace_tokens, tags=tagged)
    eval_examples = build_examples(prompts, heldout_rows, config.max_trace_tokens)
    if config.gamma > 0 and all(e.gold == IGNORE_INDEX for e in train_examples):
        raise ValueError("TrainConfig.gamma > 0 needs gold labels, but no training row has a 'label'; set gamma=0")
    tag_classes = 0
    if tagged:
        tag_values = [t for e in train_examples for t in e.example.tags or () if t != IGNORE_INDEX]
        if not tag_values:
            raise ValueError("TrainConfig.delta > 0 needs rows with document 'tags' ([[start, end, tag], ...]), "
                             "but no training token is tagged; set delta=0")
        tag_classes = max(tag_values) + 1
        if config.tag_layer > model.config.num_hidden_layers:
            raise ValueError(f"TrainConfig.tag_layer: the model has {model.config.num_hidden_layers} decoder layers, "
                             f"got {config.tag_layer}")

    world = accelerator.num_processes
    micro_per_epoch = math.ceil(len(train_examples) / config.batch_size)
    steps_per_epoch = micro_per_epoch // (world * config.grad_accum)
    if steps_per_epoch < 1:
        raise ValueError(
            f"{len(train_examples)} training rows make {micro_per_epoch} micro-batches, fewer than one step needs "
            f"({world} processes x grad_accum {config.grad_accum}); lower batch_size/grad_accum or add data"
        )
    total_steps = config.max_steps or max(1, int(config.epochs * steps_per_epoch))

    head = StudentHead(model, prompts.grade_ids, tag_classes, config.tag_layer)
    decay = [p for n, p in head.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in head.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, total_steps))
    head, optimizer, scheduler = accelerator.prepare(head, optimizer, scheduler)
    return _Run(accelerator, head, optimizer, scheduler, tokenizer, prompts, student_manifest, heldout_rows,
                train_examples, eval_examples, steps_per_epoch, total_steps)


def _run_steps(
    run: _Run,
    config: TrainConfig,
    run_dir: RunDir,
    step: int,
    checkpoint_state: dict[str, Any],
    record: Callable[[dict[str, Any]], None],
) -> int:
    """Optimizer steps from `step` to the budget: every rank takes a disjoint slice of each step's
    micro-batches, DDP averages the gradients. Logs, evaluates and checkpoints on their cadences."""
    accelerator, head = run.accelerator, run.head
    world, rank = accelerator.num_processes, accelerator.process_index
    weights = config.loss_weights
    head.train()
    started, window_losses, window_terms = time.perf_counter(), [], {}
    while step < run.total_steps:
        epoch, step_in_epoch = divmod(step, run.steps_per_epoch)
        order = micro_batch_order(len(run.train_examples), config.batch_size, config.seed, epoch)
        first = step_in_epoch * world * config.grad_accum
        micro = [order[first + a * world + rank] for a in range(config.grad_accum)]
        step_loss = 0.0
        for a, indices in enumerate(micro):
            batch = batches_to_device(collate([run.train_examples[i] for i in indices], run.prompts.pad_id), accelerator.device)
            sync = a == len(micro) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(head):
                with accelerator.autocast():
                    loss, terms = batch_loss(head, batch, weights)
                accelerator.backward(loss / config.grad_accum)
            step_loss += float(loss.detach()) / config.grad_accum
            for name, value in terms.items():
                window_terms[name] = window_terms.get(name, 0.0) + value / config.grad_accum
        accelerator.clip_grad_norm_(head.parameters(), config.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        step += 1
        window_losses.append(step_loss)

        if step % config.log_every == 0 or step == run.total_steps:
            mean = torch.tensor([float(np.mean(window_losses))], device=accelerator.device)
            mean = float(accelerator.reduce(mean, reduction="mean"))
            terms_mean = {k: v / len(window_losses) for k, v in window_terms.items()}
            record({
                "split": "train", "step": step, "epoch": round(step / run.steps_per_epoch, 4), "loss": mean,
                **terms_mean, "lr": run.scheduler.get_last_lr()[0], "elapsed_s": round(time.perf_counter() - started, 2),
            })
            window_losses, window_terms = [], {}
        if config.eval_every and step % config.eval_every == 0 and step != run.total_steps:
            record({"split": "eval", "step": step, **_evaluate_heldout(run, config)})
        if config.save_every and step % config.save_every == 0 and step != run.total_steps:
            run_dir.save_checkpoint(step, checkpoint_state, config.keep_checkpoints)
    return step


def _evaluate_heldout(run: _Run, config: TrainConfig) -> dict[str, float]:
    """Every rank scores a disjoint slice of the held-out rows; the metrics are computed on all of them."""
    from accelerate.utils import gather_object

    world, rank = run.accelerator.num_processes, run.accelerator.process_index
    shard = list(range(rank, len(run.eval_examples), world))
    logits = predict_grade_logits(
        run.head, [run.eval_examples[i] for i in shard], run.prompts.pad_id, config.batch_size * 2, run.accelerator.device
    )
    gathered = gather_object(list(zip(shard, logits.tolist(), strict=True)))
    ordered = np.zeros((len(run.eval_examples), len(run.values)))
    for index, row in gathered:
        ordered[index] = row
    return metrics_from_logits(ordered, run.eval_examples, run.values)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--student", required=True, help="student checkpoint dir or hub id (its tokenizer is used)")
    parser.add_argument("--data", required=True, help="teacher.jsonl from `answerfirst label` (or gold rows for SFT)")
    parser.add_argument("--out", required=True, help="output directory (checkpoint + answerfirst.json + metrics.jsonl)")
    add_run_flags(parser)
    parser.add_argument("--config", default=None, help="JSON file of TrainConfig fields (flags below override it)")
    add_config_flags(parser, TrainConfig)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    data: dict[str, Any] = {}
    if args.config:
        data = json.loads(Path(args.config).read_text(encoding="utf-8"))
    data.update(config_flag_values(args, TrainConfig))
    return TrainConfig.from_dict(data)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    print("answerfirst train — config:\n" + config.describe(), flush=True)

    def show(entry: dict[str, Any]) -> None:
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items())
        print(text, flush=True)

    result = train(args.student, args.data, args.out, config, resume=args.resume, progress=show,
                   allow_config_change=args.allow_config_change)
    print(f"wrote {result.out} after {result.steps} steps; held-out: {json.dumps(result.metrics)}", flush=True)
    return 0
