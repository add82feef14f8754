"""`answerfirst distill-default` (what `make distill` runs): data -> teacher -> labels -> student -> evaluation.

Offline by default, and still the real flow end to end:

  1. pairs     the deterministic e-commerce sample (distill/sample.py), or --data PAIRS.jsonl. The
               sample also writes its held-out queries a second time in another shop's words
               (the "prose" writer), to measure what the models learned beyond one template.
  2. teacher   a small Qwen3 the kit trains by SFT on the gold grade + reason, and on the sample's
               title token tags (objectives.py with alpha=0, delta=1), on a tokenizer trained here
               on the sample; cached under --work and reused while its inputs are unchanged. Or
               --teacher T (dir or hub id).
  3. label     teacher_probs + generated traces (distill/label.py, resumable) for the held-out pairs
               and the pairs of `label_queries` training queries: what the student learns from.
  4. student   (--student S, or) the sample teacher cut to the layers `student_layers` (a smaller
               model that starts from the teacher's embeddings and attention), distilled with
               first-token KL + trace CE (distill/train.py, resumable), copied to --out.
  5. evaluate  teacher and student scored through the runtime on the held-out queries, in both
               writers' words, beside BM25 and the majority grade (distill/evaluate.py).

Every stage writes a stamp with a hash of its inputs; a rerun skips the stages whose stamp
matches and resumes the one that was interrupted. WORK/summary.json holds the stage times and
every metric.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from answerfirst.artifact import (
    MANIFEST_NAME,
    Manifest,
    checkpoint_hash,
    file_sha256,
    has_manifest,
)
from answerfirst.distill import sample
from answerfirst.distill.runs import complete_checkpoints
from answerfirst.distill.train import (
    CHECKPOINTS_DIR,
    TrainConfig,
    load_rows,
    split_rows,
    train,
    write_student,
)

logger = logging.getLogger(__name__)

__all__ = [
    "SAMPLE_RUBRIC", "TEACHER_SHAPE", "DefaultRunConfig", "Pairs", "evaluation_sets", "key_of", "run_default",
    "sample_files", "train_stage", "write_jsonl",
]

STAMP_NAME = "stage.json"

# The sample models' rubric: the default rubric's grade scale in a few tokens. Prompt length is
# most of the compute of a tiny model, and the manifest carries the rubric to every backend, so the
# student and its exports score with exactly this text.
SAMPLE_RUBRIC = "Relevance grades: 4 exact match, 3 small differences, 2 partial, 1 marginal, 0 irrelevant. Grade first, then explain."

# Sizes chosen so the whole default run fits in ~10 minutes on 2 CPU cores (README "Distillation"
# lists what else was tried). rope_theta 1e6, as Qwen3's own.
TEACHER_SHAPE: dict[str, Any] = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=True,
    hidden_act="silu", attention_bias=False,
)
# A student for a teacher of your own (--teacher without --student): random, on the teacher's tokenizer.
STUDENT_SHAPE: dict[str, Any] = dict(
    TEACHER_SHAPE, hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=3,
    num_key_value_heads=1,
)


@dataclass(frozen=True)
class DefaultRunConfig:
    """seed: data, init and training seed. n_queries, heldout_queries, docs_per_query, doc_words,
    cross_sell_rate: the sample (distill/sample.py). vocab_size: the sample tokenizer. teacher:
    the sample teacher's SFT. label_queries: training queries the teacher labels for the student
    (every held-out query is labelled too). student_layers: the teacher layers the student starts
    from. student: its distillation. label_batch_size, max_new_tokens: labelling."""

    seed: int = 0
    n_queries: int = sample.N_QUERIES
    heldout_queries: int = sample.HELDOUT_QUERIES
    docs_per_query: int = 8
    doc_words: tuple[int, int] = sample.DOC_WORDS
    cross_sell_rate: float = 0.5
    vocab_size: int = 2048
    teacher: TrainConfig = field(default_factory=lambda: TrainConfig(
        alpha=0.0, beta=1.0, gamma=1.0, delta=1.0, tag_layer=1, lr=3e-3, max_steps=5500, batch_size=8, warmup_ratio=0.05,
        eval_every=0, save_every=500, log_every=250, max_trace_tokens=48,
    ))
    label_queries: int = 400
    student_layers: tuple[int, ...] = (0, 2)
    student: TrainConfig = field(default_factory=lambda: TrainConfig(
        alpha=1.0, beta=0.5, gamma=0.0, lr=1e-3, max_steps=1000, batch_size=8, warmup_ratio=0.05,
        eval_every=250, save_every=250, log_every=50, max_trace_tokens=48,
    ))
    label_batch_size: int = 32
    max_new_tokens: int = 40

    def __post_init__(self) -> None:
        if not 1 <= self.heldout_queries < self.n_queries:
            raise ValueError(f"heldout_queries: need 1 <= heldout_queries < n_queries ({self.n_queries}), got {self.heldout_queries}")
        if self.docs_per_query < 2:
            raise ValueError(f"docs_per_query: need at least 2, got {self.docs_per_query}")
        if self.vocab_size < 300:
            raise ValueError(f"vocab_size: must be >= 300 (256 bytes + specials + merges), got {self.vocab_size}")
        if self.label_queries < 1:
            raise ValueError(f"label_queries: need at least 1, got {self.label_queries}")
        n_layers = TEACHER_SHAPE["num_hidden_layers"]
        layers = self.student_layers
        if not layers or len(layers) >= n_layers or sorted(set(layers)) != list(layers) or not 0 <= layers[0] <= layers[-1] < n_layers:
            raise ValueError(f"student_layers: increasing teacher layer indices, fewer than the teacher's {n_layers}, got {layers}")


@dataclass(frozen=True)
class Pairs:
    """The run's data files: every pair, the ones the teacher labels, and the second writer's held-out set (sample only)."""

    all: Path
    to_label: Path
    prose: Path | None


def run_default(
    out: str | Path,
    work: str | Path,
    teacher: str | None = None,
    student: str | None = None,
    data: str | None = None,
    config: DefaultRunConfig | None = None,
    say: Callable[[str], Any] = lambda line: print(line, flush=True),
) -> dict[str, Any]:
    """Run the five stages; returns the summary (also written to WORK/summary.json). Progress goes
    to `say` line by line (flushed, so a log file or a pipe shows it as it happens)."""
    config = config or DefaultRunConfig()
    out, work = Path(out), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    with _timed(timings, "pairs"):
        pairs = _pairs(work, data, config, say)
    with _timed(timings, "teacher"):
        teacher_dir = teacher if teacher is not None else str(_sample_teacher(work, pairs.all, config, say))
        if teacher is not None:
            say(f"[2/5] teacher: {teacher}")
    with _timed(timings, "label"):
        labels = _label(work, pairs.to_label, teacher_dir, config, say)
    with _timed(timings, "student"):
        train_dir = _student(work, labels, teacher_dir, student, teacher is None, config, say)
    with _timed(timings, "evaluate"):
        evaluation = _evaluate(train_dir, teacher_dir if teacher is None else None, pairs, config, say)

    manifest = Manifest.read(train_dir)
    manifest.source = {**manifest.source, "teacher": str(teacher_dir)}
    manifest.info["evaluation"] = evaluation
    manifest.write(train_dir)
    _publish(train_dir, out)
    timings["total_s"] = time.perf_counter() - started

    summary = {"out": str(out), "teacher": str(teacher_dir), "labels": str(labels), "student_train": str(train_dir),
               "timings": timings, "student_metrics": manifest.info["metrics"], "evaluation": evaluation}
    (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for set_name, results in evaluation.items():
        say(f"held-out ({set_name}): " + "; ".join(f"{name} {_fmt(m)}" for name, m in results.items()))
    say("timings: " + " ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    say(f"student written to {out} (answerfirst.load({str(out)!r}) opens it)")
    return summary


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    yield
    timings[f"{stage}_s"] = time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# 1. pairs
# ------------------------------------------------------------------------------------------------


def _pairs(work: Path, data: str | None, config: DefaultRunConfig, say: Callable[[str], Any]) -> Pairs:
    if data is not None:
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(f"--data {path} does not exist")
        say(f"[1/5] pairs: {path} (every pair is labelled)")
        return Pairs(all=path, to_label=path, prose=None)
    options = dict(seed=config.seed, n_queries=config.n_queries, docs_per_query=config.docs_per_query,
                   heldout_fraction=config.heldout_queries / config.n_queries, doc_words=config.doc_words,
                   cross_sell_rate=config.cross_sell_rate)
    rows = sample.sample_pairs(**options)
    prose = [r for r in sample.sample_pairs(**options, writer="prose") if r["split"] == "heldout"]
    train_queries = list(dict.fromkeys(r["query"] for r in rows if r["split"] == "train"))
    labelled = set(train_queries[: config.label_queries])
    to_label = [r for r in rows if r["split"] == "heldout" or r["query"] in labelled]
    paths = sample_files(work)
    for path, subset in ((paths.all, rows), (paths.to_label, to_label), (paths.prose, prose)):
        write_jsonl(path, subset)
    heldout = sum(r["split"] == "heldout" for r in rows)
    say(f"[1/5] pairs: {len(rows)} sample pairs ({heldout} held out by query, also in the prose writer's words) "
        f"-> {paths.all}; the teacher labels {len(to_label)} of them")
    return paths


def sample_files(work: Path) -> Pairs:
    """Where the default run keeps the sample's files in `work`."""
    return Pairs(all=work / "pairs.jsonl", to_label=work / "label-pairs.jsonl", prose=work / "heldout-prose.jsonl")


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write `rows` as JSONL unless the file already holds exactly them (its hash keys the later stages)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------------------
# 2. teacher, 4. student: two training stages run the same way
# ------------------------------------------------------------------------------------------------


def _sample_teacher(work: Path, pairs: Path, config: DefaultRunConfig, say: Callable[[str], Any]) -> Path:
    """Train (or reuse) the sample teacher: a tokenizer on the sample, a random Qwen3, SFT on gold
    grades, reasons and title token tags."""
    from answerfirst.afrl import DEFAULT_RUBRIC, AFRLFormat
    from answerfirst.offline import random_qwen3, train_tokenizer

    key = key_of(file_sha256(pairs), config.seed, config.vocab_size, TEACHER_SHAPE, SAMPLE_RUBRIC, config.teacher.to_dict())
    init = work / "teacher-init"
    if not _stamp_ok(init, key):
        shutil.rmtree(init, ignore_errors=True)
        rows = load_rows(pairs)
        # The rubric appears in every prompt: weighting it makes the tokenizer learn its words whole.
        # Queries and documents follow a space in the prompt (afrl.py), so they are learned that way.
        texts = [SAMPLE_RUBRIC, DEFAULT_RUBRIC] * 500
        texts += [t for r in rows for t in (" " + r["query"], " " + r["doc"], r.get("reason", ""))]
        tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size)
        model = random_qwen3(tokenizer, shape=TEACHER_SHAPE, seed=config.seed)
        _reinit_small(model, config.seed)
        fmt = AFRLFormat.from_chat_template(tokenizer, rubric=SAMPLE_RUBRIC)
        _save_init(init, model, tokenizer, fmt, "random init (sample teacher)")
        _write_stamp(init, key)
    what = f"SFT of a {TEACHER_SHAPE['num_hidden_layers']}-layer Qwen3 on gold grades + reasons + title token tags"
    return train_stage("[2/5] teacher", what, init, pairs, work / "teacher", config.teacher, key, say,
                        info={"role": "sample teacher"})


def _student(
    work: Path, labels: Path, teacher_dir: str, student: str | None, sample_teacher: bool, config: DefaultRunConfig,
    say: Callable[[str], Any],
) -> Path:
    if student is not None:
        init = student
    elif sample_teacher:
        init = str(_student_from_teacher(work, teacher_dir, config.student_layers))
    else:
        init = str(_random_student(work, teacher_dir, config))
    key = key_of(file_sha256(labels), init, checkpoint_hash(init) if Path(init).is_dir() else "", config.student.to_dict())
    teacher_id = checkpoint_hash(teacher_dir) if Path(teacher_dir).is_dir() else teacher_dir
    return train_stage("[4/5] student", f"distilling {init} on {labels}", init, labels, work / "student-train",
                        config.student, key, say, source={"teacher": str(teacher_dir), "teacher_sha256": teacher_id},
                        info={"labels": str(labels)})


def train_stage(
    stage: str, what: str, init: str | Path, data: Path, out: Path, config: TrainConfig, key: str,
    say: Callable[[str], Any], **train_kwargs: Any,
) -> Path:
    """train(init, data -> out) unless `out` is stamped with `key`; an interrupted run with the same
    key resumes from its newest complete checkpoint, any other content of `out` is replaced."""
    if _stamp_ok(out, key) and has_manifest(out):
        say(f"{stage}: cached {out}")
        return out
    resume = bool(complete_checkpoints(out)) and _stamp_ok(out, key + "-running")
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    _write_stamp(out, key + "-running")
    say(f"{stage}: {what}" + (" (resuming)" if resume else ""))
    train(init, data, out, config, resume=resume, progress=_printer(say, stage.split()[-1]), **train_kwargs)
    shutil.rmtree(out / CHECKPOINTS_DIR, ignore_errors=True)
    _write_stamp(out, key)
    return out


def _student_from_teacher(work: Path, teacher_dir: str, layers: tuple[int, ...]) -> Path:
    """The teacher with only `layers` kept (embeddings, norms and head shared): a smaller model
    that already reads the prompt the teacher's way; distillation then teaches it the grades."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    init = work / "student-init"
    key = key_of(checkpoint_hash(teacher_dir), layers)
    if _stamp_ok(init, key):
        return init
    shutil.rmtree(init, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    model.model.layers = torch.nn.ModuleList(model.model.layers[i] for i in layers)
    for index, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = index
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    what = f"layers {list(layers)} of the sample teacher {teacher_dir}"
    _save_init(init, model, AutoTokenizer.from_pretrained(teacher_dir), Manifest.read(teacher_dir).format, what)
    _write_stamp(init, key)
    return init


def _random_student(work: Path, teacher_dir: str, config: DefaultRunConfig) -> Path:
    """A random Qwen3 of STUDENT_SHAPE on the teacher's tokenizer (same grade token ids)."""
    from transformers import AutoTokenizer

    from answerfirst.afrl import AFRLFormat
    from answerfirst.offline import random_qwen3

    init = work / "student-init"
    key = key_of(checkpoint_hash(teacher_dir) if Path(teacher_dir).is_dir() else teacher_dir, STUDENT_SHAPE, config.seed)
    if _stamp_ok(init, key):
        return init
    shutil.rmtree(init, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = random_qwen3(tokenizer, shape=STUDENT_SHAPE, seed=config.seed + 1)
    _reinit_small(model, config.seed + 1)
    # The student speaks the teacher's format (rubric, grades): same prompts, same grade tokens.
    teacher_manifest = Manifest.read(teacher_dir) if Path(teacher_dir).is_dir() and has_manifest(teacher_dir) else None
    fmt = teacher_manifest.format if teacher_manifest else AFRLFormat.from_chat_template(tokenizer)
    _save_init(init, model, tokenizer, fmt, "random init (sample student)")
    _write_stamp(init, key)
    return init


def _save_init(directory: Path, model: Any, tokenizer: Any, fmt: Any, what: str) -> None:
    """A starting checkpoint: weights, tokenizer and a manifest with the format it will be trained on."""
    from answerfirst.afrl import PromptTokenizer

    write_student(model, tokenizer, PromptTokenizer(tokenizer, fmt), directory, source={"model": what}, info={})


def _reinit_small(model: Any, seed: int) -> None:
    """offline.random_qwen3 widens the init for parity tests; a model meant to be trained starts
    from the usual std 0.02 (GPT-2 / Qwen initializer_range) instead."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02)


# ------------------------------------------------------------------------------------------------
# 3. label, 5. evaluate
# ------------------------------------------------------------------------------------------------


def _label(work: Path, pairs: Path, teacher_dir: str, config: DefaultRunConfig, say: Callable[[str], Any]) -> Path:
    from answerfirst.distill.label import LabelConfig, label

    teacher_id = checkpoint_hash(teacher_dir) if Path(teacher_dir).is_dir() else teacher_dir
    labels = work / f"teacher-{key_of(teacher_id, file_sha256(pairs), config.max_new_tokens)}.jsonl"
    if labels.is_file() and not (labels.parent / (labels.name + ".parts")).exists():
        say(f"[3/5] label: cached {labels}")
        return labels
    say(f"[3/5] label: {pairs} with {teacher_dir} -> {labels}")
    label_config = LabelConfig(batch_size=config.label_batch_size, max_new_tokens=config.max_new_tokens)
    result = label(teacher_dir, pairs, labels, label_config, show_progress=True)
    say(f"       {result.rows} rows, {result.labelled_now} labelled in {result.seconds:.1f}s")
    return labels


def _evaluate(
    student_dir: Path, teacher_dir: str | None, pairs: Pairs, config: DefaultRunConfig, say: Callable[[str], Any]
) -> dict[str, dict[str, dict[str, Any]]]:
    """evaluate.compare on the held-out queries (and, for the sample, their prose version): the
    student, the sample teacher (not a teacher of your own: scoring it on CPU may be slow; the
    student's agreement with it is in the student's training metrics), BM25, the majority grade."""
    from answerfirst.distill.evaluate import compare

    say("[5/5] evaluate: held-out queries" + (" in both writers' words" if pairs.prose else ""))
    sets, train_labels = evaluation_sets(pairs, config)
    if not all(r.get("label") is not None for rows in sets.values() for r in rows):
        say("       skipped: the held-out pairs carry no gold labels")
        return {}
    models = {"teacher": teacher_dir} if teacher_dir is not None else {}
    models["student"] = str(student_dir)
    return compare(models, sets, train_labels)


def evaluation_sets(pairs: Pairs, config: DefaultRunConfig) -> tuple[dict[str, list[dict[str, Any]]], list[int]]:
    """The run's held-out sets ("heldout": the split the student was evaluated on; for the sample
    also "heldout_prose") and the gold grades of the training rows (the majority baseline's)."""
    from answerfirst.distill.label import read_pairs

    train, heldout = split_rows(read_pairs(pairs.all)[0], config.student.eval_fraction, config.student.seed)
    sets = {"heldout": heldout}
    if pairs.prose is not None:
        sets["heldout_prose"] = read_pairs(pairs.prose)[0]
    return sets, [int(r["label"]) for r in train if r.get("label") is not None]


# ------------------------------------------------------------------------------------------------
# stamps and output
# ------------------------------------------------------------------------------------------------


def key_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stamp_ok(directory: Path, key: str) -> bool:
    path = directory / STAMP_NAME
    return path.is_file() and json.loads(path.read_text(encoding="utf-8")).get("key") == key


def _write_stamp(directory: Path, key: str) -> None:
    (directory / STAMP_NAME).write_text(json.dumps({"key": key}, indent=2) + "\n", encoding="utf-8")


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


def _printer(say: Callable[[str], Any], stage: str) -> Callable[[dict[str, Any]], None]:
    def show(entry: dict[str, Any]) -> None:
        say(f"       {stage}: {_fmt(entry)}")

    return show


def _fmt(metrics: dict[str, Any]) -> str:
    shown = {k: v for k, v in metrics.items() if not isinstance(v, list | dict)}  # confusion matrices go to the JSON
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="student output directory (artifacts/student)")
    parser.add_argument("--work", required=True, help="work directory: pairs, teacher cache, labels, training state")
    parser.add_argument("--teacher", default=None, help="your teacher (dir or hub id) instead of the sample teacher")
    parser.add_argument("--student", default=None, help="your student init (dir or hub id) instead of the teacher's layers")
    parser.add_argument("--data", default=None, help='your pairs JSONL {"id","query","doc","label"?} instead of the sample')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-queries", type=int, default=DefaultRunConfig.n_queries, help="sample size (queries)")
    parser.add_argument("--teacher-steps", type=int, default=None, help=f"default {DefaultRunConfig().teacher.max_steps}")
    parser.add_argument("--student-steps", type=int, default=None, help=f"default {DefaultRunConfig().student.max_steps}")
    parser.add_argument("--teacher-delta", type=float, default=None,
                        help=f"weight of the sample teacher's title token-tag term (default {DefaultRunConfig().teacher.delta}; "
                             "0 trains it on grades and reasons alone)")


def run(args: argparse.Namespace) -> int:
    config = DefaultRunConfig(seed=args.seed, n_queries=args.n_queries)
    if args.teacher_steps is not None:
        config = replace(config, teacher=replace(config.teacher, max_steps=args.teacher_steps))
    if args.student_steps is not None:
        config = replace(config, student=replace(config.student, max_steps=args.student_steps))
    if args.teacher_delta is not None:
        config = replace(config, teacher=replace(config.teacher, delta=args.teacher_delta))
    print("answerfirst distill-default — teacher config:\n" + config.teacher.describe(), flush=True)
    print("student config:\n" + config.student.describe(), flush=True)
    started = time.perf_counter()
    run_default(args.out, args.work, args.teacher, args.student, args.data, config)
    print(f"distill-default finished in {time.perf_counter() - started:.1f}s", flush=True)
    return 0
