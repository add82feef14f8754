"""`answerfirst distill-default` (what `make distill` runs): data -> teacher -> labels -> student.

Offline by default, and still the real flow end to end:

  1. pairs     the deterministic e-commerce sample (distill/sample.py), or --data PAIRS.jsonl
  2. teacher   a small Qwen3 the kit trains by SFT on the gold grade + reason (objectives.py with
               alpha=0), sharing a tokenizer trained here on the sample; cached under --work and
               reused while its inputs are unchanged. Or --teacher T (dir or hub id).
  3. label     teacher_probs + generated traces for every pair (distill/label.py, resumable)
  4. student   a smaller Qwen3 on the teacher's tokenizer (or --student S), distilled with
               first-token KL + trace CE + gold CE (distill/train.py, resumable), copied to --out.

Every stage writes a stamp with a hash of its inputs; a rerun skips the stages whose stamp
matches and resumes the one that was interrupted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from answerfirst.artifact import MANIFEST_NAME, Manifest, bind_format, checkpoint_hash, has_manifest
from answerfirst.distill.train import CHECKPOINTS_DIR, TrainConfig, train

logger = logging.getLogger(__name__)

STAMP_NAME = "stage.json"

# The sample models' rubric: the default rubric's grade scale in a third of the tokens. Prompt
# length is most of the compute of a tiny model, and the manifest carries the rubric to every
# backend, so the student and its exports score with exactly this text.
SAMPLE_RUBRIC = (
    "Grade how relevant the document is to the search query: 4 exact match, 3 relevant with small "
    "differences, 2 partial, 1 marginal, 0 irrelevant. Write the grade digit first, then explain."
)

# Sizes chosen so the whole default run fits in ~10 minutes on 2 CPU cores.
TEACHER_SHAPE: dict[str, Any] = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10_000.0, tie_word_embeddings=True,
    hidden_act="silu", attention_bias=False,
)
STUDENT_SHAPE: dict[str, Any] = dict(
    TEACHER_SHAPE, hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=3,
    num_key_value_heads=1,
)


@dataclass(frozen=True)
class DefaultRunConfig:
    """seed: data, init and training seed. n_queries, docs_per_query: sample size. vocab_size: the
    sample tokenizer. teacher / student: TrainConfig of each stage. label_batch_size,
    max_new_tokens: labelling."""

    seed: int = 0
    n_queries: int = 240
    docs_per_query: int = 8
    vocab_size: int = 1024
    teacher: TrainConfig = field(default_factory=lambda: TrainConfig(
        alpha=0.0, beta=1.0, gamma=1.0, lr=3e-3, epochs=4, batch_size=16, warmup_ratio=0.05,
        eval_every=0, save_every=50, log_every=20, max_trace_tokens=48,
    ))
    student: TrainConfig = field(default_factory=lambda: TrainConfig(
        alpha=1.0, beta=0.5, gamma=0.5, temperature=1.0, lr=3e-3, epochs=3, batch_size=16, warmup_ratio=0.05,
        eval_every=100, save_every=50, log_every=20, max_trace_tokens=48,
    ))
    label_batch_size: int = 32
    max_new_tokens: int = 40

    def __post_init__(self) -> None:
        if self.n_queries < 10:
            raise ValueError(f"n_queries: need at least 10 queries for a held-out split, got {self.n_queries}")
        if self.docs_per_query < 2:
            raise ValueError(f"docs_per_query: need at least 2, got {self.docs_per_query}")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size: must be >= 300 (256 bytes + specials + merges), got {self.vocab_size}")


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stamp_ok(directory: Path, key: str) -> bool:
    path = directory / STAMP_NAME
    return path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("key") == key


def _write_stamp(directory: Path, key: str, **extra: Any) -> None:
    (directory / STAMP_NAME).write_text(json.dumps({"key": key, **extra}, indent=2) + "\n", encoding="utf-8")


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def run_default(
    out: str | Path,
    work: str | Path,
    teacher: str | None = None,
    student: str | None = None,
    data: str | None = None,
    config: DefaultRunConfig | None = None,
    say: Any = print,
) -> dict[str, Any]:
    """Run the four stages; returns the summary (also written to WORK/summary.json)."""
    from answerfirst.distill.label import LabelConfig, label

    config = config or DefaultRunConfig()
    out, work = Path(out), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    # 1. pairs ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    if data is not None:
        pairs = Path(data)
        if not pairs.is_file():
            raise FileNotFoundError(f"--data {pairs} does not exist")
        say(f"[1/4] pairs: {pairs}")
    else:
        from answerfirst.distill.sample import sample_pairs

        pairs = work / "pairs.jsonl"
        rows = sample_pairs(config.seed, config.n_queries, config.docs_per_query)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if not pairs.is_file() or pairs.read_text(encoding="utf-8") != text:
            pairs.write_text(text, encoding="utf-8")
        heldout = sum(r["split"] == "heldout" for r in rows)
        say(f"[1/4] pairs: {len(rows)} sample pairs ({heldout} held out by query) -> {pairs}")
    pairs_hash = _file_hash(pairs)
    timings["pairs_s"] = time.perf_counter() - t0

    # 2. teacher ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    if teacher is not None:
        teacher_dir = teacher
        say(f"[2/4] teacher: {teacher}")
    else:
        teacher_dir = str(_sample_teacher(work, pairs, pairs_hash, config, say))
    timings["teacher_s"] = time.perf_counter() - t0
    teacher_id = checkpoint_hash(teacher_dir) if Path(teacher_dir).is_dir() else teacher_dir

    # 3. label ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    labels = work / f"teacher-{_key(teacher_id, pairs_hash, config.max_new_tokens)}.jsonl"
    if labels.is_file() and not (labels.parent / (labels.name + ".parts")).exists():
        say(f"[3/4] label: cached {labels}")
    else:
        say(f"[3/4] label: {pairs} with {teacher_dir} -> {labels}")
        label_config = LabelConfig(batch_size=config.label_batch_size, max_new_tokens=config.max_new_tokens)
        result = label(teacher_dir, pairs, labels, label_config, show_progress=True)
        say(f"       {result.rows} rows, {result.labelled_now} labelled in {result.seconds:.1f}s")
    timings["label_s"] = time.perf_counter() - t0

    # 4. student ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    if student is not None:
        student_init = student
    else:
        student_init = str(_random_student(work, teacher_dir, config))
    train_dir = work / "student-train"
    key = _key(_file_hash(labels), student_init, checkpoint_hash(student_init) if Path(student_init).is_dir() else "",
               config.student.to_dict())
    if _stamp_ok(train_dir, key):
        say(f"[4/4] student: cached {train_dir}")
    else:
        resume = (train_dir / CHECKPOINTS_DIR).is_dir() and _stamp_ok(train_dir, key + "-running")
        if not resume and train_dir.exists():
            shutil.rmtree(train_dir)
        train_dir.mkdir(parents=True, exist_ok=True)
        _write_stamp(train_dir, key + "-running")
        say(f"[4/4] student: distilling {student_init} on {labels}" + (" (resuming)" if resume else ""))
        train(student_init, labels, train_dir, config.student, resume=resume,
              source={"teacher": str(teacher_dir), "teacher_sha256": teacher_id},
              info={"pairs": str(pairs)}, progress=_printer(say, "student"))
        shutil.rmtree(train_dir / CHECKPOINTS_DIR, ignore_errors=True)
        _write_stamp(train_dir, key)
    timings["student_s"] = time.perf_counter() - t0

    # Teacher's own held-out metrics, from its labels: the bar the student is measured against.
    teacher_metrics = _teacher_metrics(labels, teacher_dir, config)
    manifest = Manifest.read(train_dir)
    student_metrics = manifest.info["metrics"]
    manifest.source = {**manifest.source, "teacher": str(teacher_dir)}
    manifest.info["teacher_metrics"] = teacher_metrics
    manifest.write(train_dir)
    _publish(train_dir, out)
    timings["total_s"] = time.perf_counter() - started

    summary = {"out": str(out), "teacher": str(teacher_dir), "labels": str(labels), "timings": timings,
               "teacher_metrics": teacher_metrics, "student_metrics": student_metrics}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    say("held-out metrics")
    say("  teacher: " + _fmt(teacher_metrics))
    say("  student: " + _fmt(student_metrics))
    say("timings: " + " ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    say(f"student written to {out} (answerfirst.load({str(out)!r}) opens it)")
    return summary


def _sample_teacher(work: Path, pairs: Path, pairs_hash: str, config: DefaultRunConfig, say: Any) -> Path:
    """Train (or reuse) the sample teacher: a tokenizer on the sample, a random Qwen3, SFT on gold."""
    from answerfirst.afrl import DEFAULT_RUBRIC, AFRLFormat
    from answerfirst.offline import random_qwen3, train_tokenizer

    teacher_dir = work / "teacher"
    key = _key(pairs_hash, config.seed, config.vocab_size, TEACHER_SHAPE, config.teacher.to_dict())
    if _stamp_ok(teacher_dir, key) and has_manifest(teacher_dir):
        say(f"[2/4] teacher: cached {teacher_dir}")
        return teacher_dir
    init = work / "teacher-init"
    if not _stamp_ok(init, key):
        shutil.rmtree(init, ignore_errors=True)
        rows = [json.loads(line) for line in pairs.read_text(encoding="utf-8").splitlines() if line.strip()]
        # The rubric appears in every prompt: weighting it makes the tokenizer learn its words whole.
        texts = [SAMPLE_RUBRIC, DEFAULT_RUBRIC] * 500
        texts += [t for r in rows for t in (r["query"], r["doc"], r.get("reason", ""))]
        tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size)
        model = random_qwen3(tokenizer, shape=TEACHER_SHAPE, seed=config.seed)
        _reinit_small(model, config.seed)
        init.mkdir(parents=True)
        model.save_pretrained(init)
        tokenizer.save_pretrained(init)
        fmt = AFRLFormat.from_chat_template(tokenizer, rubric=SAMPLE_RUBRIC)
        _write_init_manifest(init, tokenizer, fmt, "random init (sample teacher)")
        _write_stamp(init, key)
    resume = (teacher_dir / CHECKPOINTS_DIR).is_dir() and _stamp_ok(teacher_dir, key + "-running")
    if not resume:
        shutil.rmtree(teacher_dir, ignore_errors=True)
    teacher_dir.mkdir(parents=True, exist_ok=True)
    _write_stamp(teacher_dir, key + "-running")
    say(f"[2/4] teacher: SFT of a {TEACHER_SHAPE['num_hidden_layers']}-layer Qwen3 on gold grades + reasons"
        + (" (resuming)" if resume else ""))
    train(init, pairs, teacher_dir, config.teacher, resume=resume, info={"role": "sample teacher"},
          progress=_printer(say, "teacher"))
    shutil.rmtree(teacher_dir / CHECKPOINTS_DIR, ignore_errors=True)
    _write_stamp(teacher_dir, key)
    return teacher_dir


def _random_student(work: Path, teacher_dir: str, config: DefaultRunConfig) -> Path:
    """A random Qwen3 of STUDENT_SHAPE on the teacher's tokenizer (same grade token ids)."""
    from transformers import AutoTokenizer

    from answerfirst.afrl import AFRLFormat
    from answerfirst.offline import random_qwen3

    init = work / "student-init"
    key = _key(checkpoint_hash(teacher_dir) if Path(teacher_dir).is_dir() else teacher_dir, STUDENT_SHAPE, config.seed)
    if _stamp_ok(init, key):
        return init
    shutil.rmtree(init, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = random_qwen3(tokenizer, shape=STUDENT_SHAPE, seed=config.seed + 1)
    _reinit_small(model, config.seed + 1)
    init.mkdir(parents=True)
    model.save_pretrained(init)
    tokenizer.save_pretrained(init)
    # The student speaks the teacher's format (rubric, grades): same prompts, same grade tokens.
    teacher_manifest = Manifest.read(teacher_dir) if Path(teacher_dir).is_dir() and has_manifest(teacher_dir) else None
    fmt = teacher_manifest.format if teacher_manifest else AFRLFormat.from_chat_template(tokenizer)
    _write_init_manifest(init, tokenizer, fmt, "random init (sample student)")
    _write_stamp(init, key)
    return init


def _write_init_manifest(directory: Path, tokenizer: Any, fmt: Any, what: str) -> None:
    from answerfirst.afrl import PromptTokenizer

    prompts = PromptTokenizer(tokenizer, fmt)
    Manifest(kind="checkpoint", format=fmt, grade_token_ids=prompts.grade_ids, source={"model": what}).write(directory)


def _reinit_small(model: Any, seed: int) -> None:
    """offline.random_qwen3 widens the init for parity tests; a model meant to be trained starts
    from the usual std 0.02 (GPT-2 / Qwen initializer_range) instead."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02)


def _teacher_metrics(labels: Path, teacher_dir: str, config: DefaultRunConfig) -> dict[str, float]:
    from transformers import AutoTokenizer

    from answerfirst.distill.train import build_examples, load_rows, split_rows, teacher_metrics

    rows = load_rows(labels)
    _, heldout = split_rows(rows, config.student.eval_fraction, config.student.seed)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    manifest = Manifest.read(teacher_dir) if Path(teacher_dir).is_dir() and has_manifest(teacher_dir) else None
    prompts = bind_format(tokenizer, manifest, str(teacher_dir))
    examples = build_examples(prompts, heldout, config.student.max_trace_tokens)
    return teacher_metrics(examples, prompts.format.values)


def _publish(train_dir: Path, out: Path) -> None:
    """Copy the trained checkpoint (not its resume checkpoints) to `out`, replacing an earlier run's."""
    if out.exists():
        if not has_manifest(out):
            raise ValueError(f"--out {out} exists and is not an answerfirst checkpoint; pick an empty or new directory")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for path in train_dir.iterdir():
        if path.is_file() and path.name != STAMP_NAME:
            shutil.copy2(path, out / path.name)
    manifest = Manifest.read(out)
    manifest.source = {**manifest.source, "sha256": checkpoint_hash(out)}
    manifest.write(out)
    assert (out / MANIFEST_NAME).is_file()


def _printer(say: Any, stage: str) -> Any:
    def show(entry: dict[str, Any]) -> None:
        text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items())
        say(f"       {stage}: {text}")

    return show


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="student output directory (artifacts/student)")
    parser.add_argument("--work", required=True, help="work directory: pairs, teacher cache, labels, training state")
    parser.add_argument("--teacher", default=None, help="your teacher (dir or hub id) instead of the sample teacher")
    parser.add_argument("--student", default=None, help="your student init (dir or hub id) instead of a random small Qwen3")
    parser.add_argument("--data", default=None, help='your pairs JSONL {"id","query","doc","label"?} instead of the sample')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-queries", type=int, default=DefaultRunConfig.n_queries, help="sample size (queries)")
    parser.add_argument("--teacher-epochs", type=float, default=None)
    parser.add_argument("--student-epochs", type=float, default=None)


def run(args: argparse.Namespace) -> int:
    config = DefaultRunConfig(seed=args.seed, n_queries=args.n_queries)
    if args.teacher_epochs is not None:
        config = replace(config, teacher=replace(config.teacher, epochs=args.teacher_epochs))
    if args.student_epochs is not None:
        config = replace(config, student=replace(config.student, epochs=args.student_epochs))
    print("answerfirst distill-default — teacher config:\n" + config.teacher.describe(), flush=True)
    print("student config:\n" + config.student.describe(), flush=True)
    started = time.perf_counter()
    run_default(args.out, args.work, args.teacher, args.student, args.data, config)
    print(f"distill-default finished in {time.perf_counter() - started:.1f}s", flush=True)
    return 0
