"""`answerfirst ablation` (what `make ablation` runs): what first-token distillation buys.

On the default run's own teacher, labelled pairs and student initialisation (it reads
WORK/summary.json, so `make distill` runs first), the same student is trained for the same steps on
four targets:

  (a) gold      the gold grades only (SFT on the grade token)
  (b) hard      the teacher's argmax grades (hard labels: what a teacher without logits gives)
  (c) kl        the teacher's first-token distribution (KL) only
  (d) kl+trace  KL + SFT on the teacher's trace: the default student

Each arm is then scored through the runtime on the held-out queries (both writers), next to the
teacher, BM25 and the majority grade (distill/evaluate.py). The table goes to OUT/ablation.json and
OUT/ablation.md; arms already trained with the same inputs are reused.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from answerfirst.artifact import checkpoint_hash, file_sha256
from answerfirst.distill.pipeline import (
    DefaultRunConfig,
    evaluation_sets,
    key_of,
    sample_files,
    train_stage,
    write_jsonl,
)
from answerfirst.distill.train import TrainConfig, load_rows

ARMS: dict[str, str] = {
    "gold": "(a) gold grades only",
    "hard": "(b) teacher argmax (hard labels)",
    "kl": "(c) first-token KL only",
    "kl+trace": "(d) KL + trace SFT (default)",
}


def arm_configs(student: TrainConfig) -> dict[str, TrainConfig]:
    """The arms' training configs: the default student's, with only the loss weights changed."""
    labels_only = replace(student, alpha=0.0, beta=0.0, gamma=1.0)
    return {"gold": labels_only, "hard": labels_only, "kl": replace(student, alpha=1.0, beta=0.0, gamma=0.0),
            "kl+trace": student}


def arm_rows(rows: list[dict[str, Any]], arm: str) -> list[dict[str, Any]]:
    """The arm's training rows from the teacher's labels: gold or argmax grades as the label (no
    teacher distribution, no trace) for (a) and (b); the labels as they are for (c) and (d)."""
    if arm in ("kl", "kl+trace"):
        return rows
    kept = ("id", "query", "doc", "split")
    if arm == "gold":
        return [{**{k: r[k] for k in kept if k in r}, "label": r["label"]} for r in rows]
    return [{**{k: r[k] for k in kept if k in r}, "label": int(np.argmax(r["teacher_probs"]))} for r in rows]


def run_ablation(
    work: str | Path, out: str | Path, config: DefaultRunConfig | None = None,
    say: Callable[[str], Any] = lambda line: print(line, flush=True),
) -> dict[str, Any]:
    """Train the four arms from the default run in `work` and write the table to `out` (see the module docstring)."""
    from answerfirst.distill.evaluate import compare

    config = config or DefaultRunConfig()
    work, out = Path(work), Path(out)
    summary_path = work / "summary.json"
    if not summary_path.is_file():
        raise FileNotFoundError(f"{summary_path} does not exist: run the default run first (`make distill`)")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    labels, teacher, init = Path(summary["labels"]), summary["teacher"], work / "student-init"
    pairs = sample_files(work)
    if not pairs.prose.is_file():
        raise FileNotFoundError(f"{work} holds no sample data: the ablation runs on the default run's sample (`make distill` without DATA=)")
    if not init.is_dir():
        raise FileNotFoundError(f"{init} does not exist: the ablation starts from the default run's student init")
    out.mkdir(parents=True, exist_ok=True)
    rows = load_rows(labels)
    started, trained = time.perf_counter(), {}
    for arm, arm_config in arm_configs(config.student).items():
        data = out / f"{arm}.jsonl"
        write_jsonl(data, arm_rows(rows, arm))
        key = key_of(file_sha256(data), checkpoint_hash(init), arm_config.to_dict())
        trained[arm] = train_stage(f"[ablation] {arm}", ARMS[arm], init, data, out / arm, arm_config, key, say)
    train_seconds = time.perf_counter() - started

    sets, train_labels = evaluation_sets(pairs, config)
    results = compare({"teacher": teacher, **{arm: str(path) for arm, path in trained.items()}}, sets, train_labels)
    table = {"arms": ARMS, "steps": config.student.max_steps, "train_seconds": train_seconds,
             "student_init": str(init), "teacher": teacher, "results": results}
    (out / "ablation.json").write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    (out / "ablation.md").write_text(markdown(table), encoding="utf-8")
    say(markdown(table))
    return table


def markdown(table: dict[str, Any]) -> str:
    """The README table: one row per arm (and the teacher, BM25, the majority grade), held-out metrics."""
    results = table["results"]
    heldout, prose = results["heldout"], results.get("heldout_prose", {})
    lines = [
        f"| held-out queries ({heldout['teacher']['queries']}, {heldout['teacher']['pairs']} pairs) | accuracy | NDCG@10 "
        "| agreement vs teacher | Spearman vs teacher | KL(teacher ‖ model) | NDCG@10, prose writer |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def cell(metrics: dict[str, Any], key: str) -> str:
        return f"{metrics[key]:.3f}" if key in metrics else "–"

    rows = [("teacher (sample, 3 layers)", "teacher"), *((ARMS[arm], arm) for arm in ARMS),
            ("BM25 (bm25s)", "bm25"), ("majority grade", "majority")]
    for label, name in rows:
        m, p = heldout[name], prose.get(name, {})
        lines.append(f"| {label} | {cell(m, 'accuracy_gold')} | {cell(m, 'ndcg10_gold')} | {cell(m, 'agreement_teacher')} "
                     f"| {cell(m, 'spearman_teacher')} | {cell(m, 'kl_to_teacher')} | {cell(p, 'ndcg10_gold')} |")
    lines.append("")
    lines.append(f"Each arm: the same initialisation, {table['steps']} steps; {table['train_seconds']:.0f} s of training "
                 "in this call (arms trained by an earlier call with the same inputs are reused).")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", default="artifacts/work", help="the default run's work directory (make distill)")
    parser.add_argument("--out", default="artifacts/ablation", help="where the arms and the table go")


def run(args: argparse.Namespace) -> int:
    run_ablation(args.work, args.out)
    return 0
