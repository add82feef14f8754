"""What `answerfirst train` (train.py) and `answerfirst rl` (rl.py) share: a training run on disk.

    OUT/
      training_config.json | rl_config.json   the config in effect
      metrics.jsonl                           one JSON record per logged step
      checkpoints/step-00000012/              accelerate state (model, optimizer, scheduler, RNG)
                                              + trainer_state.json (step, identity, resumes)

- Identity. A run is its config (every field except those that only say where to write and how often
  to log, evaluate and save), the sha256 of its data, its starting model (weights sha256, or the hub
  id) and its process count. `--resume` continues a run only with the same identity: a difference is
  refused in one line naming each changed field, unless `--allow-config-change`, which is then
  recorded (checkpoint state, log, and the output manifest's info["resumes"]). The saved config file
  is rewritten only after that check.
- Checkpoints are written whole or not at all: into step-N.partial/, renamed to step-N/ once its state
  file is written. A run killed mid-write (SIGKILL included) leaves a .partial directory, which the
  next start deletes; resume restores the newest complete checkpoint, so it continues exactly.
- metrics.jsonl is appended by the main process; a resume drops the records written after the step
  it resumes from (they belong to the lost part of the run).
- Truncation: how many examples lost document or explanation tokens (logged, in metrics and manifest).
- The command-line flags of a config dataclass: one flag per field, `--no-x` for booleans.

What differs between SFT and RL (the loop, the losses, what a step logs) stays in their own files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from answerfirst.artifact import checkpoint_hash, file_sha256

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STATE_NAME = "trainer_state.json"
METRICS_NAME = "metrics.jsonl"
PARTIAL = ".partial"


# ------------------------------------------------------------------------------------------------
# Identity: what must match for --resume to continue the same run
# ------------------------------------------------------------------------------------------------


def run_identity(
    config: dict[str, Any], ignore: Iterable[str], data: str | Path, student: str | Path, world_size: int
) -> dict[str, Any]:
    """The config without the `ignore`d fields, the data's sha256, the starting model's weights sha256
    (a hub id stands for itself) and the number of processes."""
    if not Path(data).is_file():
        raise FileNotFoundError(f"training data {data} does not exist (label pairs first: `answerfirst label`)")
    ignored = set(ignore)
    student_id = checkpoint_hash(student) if Path(student).is_dir() else str(student)
    return {
        "config": {k: v for k, v in config.items() if k not in ignored},
        "data_sha256": file_sha256(data),
        "student_sha256": student_id,
        "world_size": world_size,
    }


def identity_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, list[Any]]:
    """{name: [checkpointed value, this run's value]} of every difference; config fields go by their name."""
    flat = lambda ident: {**ident.get("config", {}), **{k: v for k, v in ident.items() if k != "config"}}  # noqa: E731
    before, now = flat(saved), flat(current)
    return {k: [before.get(k), now.get(k)] for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)}


def describe_changes(changes: dict[str, list[Any]]) -> str:
    def show(value: Any) -> str:
        text = json.dumps(value)
        return text[:13] + "…" if len(text) > 16 and isinstance(value, str) else text  # a sha256 reads as 12 chars

    return ", ".join(f"{name} {show(old)} -> {show(new)}" for name, (old, new) in changes.items())


# ------------------------------------------------------------------------------------------------
# The run directory
# ------------------------------------------------------------------------------------------------


@dataclass
class RunStart:
    """Where a (re)started run stands: the step it continues after (0 for a new run), the checkpoint
    it resumes from, the metrics records kept, every resume so far ({"step", "config_changes"}), and
    whether the data changed on this resume."""

    step: int = 0
    checkpoint: Path | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    resumes: list[dict[str, Any]] = field(default_factory=list)
    data_changed: bool = False


class RunDir:
    """One run's output directory, as every process of an `accelerate launch` group sees it (only the
    main process writes its files; every process writes its own RNG state into a checkpoint)."""

    def __init__(self, out: str | Path, accelerator: Any, config_name: str):
        self.out = Path(out)
        self.accelerator = accelerator
        self.config_path = self.out / config_name
        self.metrics_path = self.out / METRICS_NAME
        self.main = accelerator.is_main_process

    # -- checkpoints --------------------------------------------------------------------------------

    def complete_checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.out)

    def open(self, resume: bool, identity: dict[str, Any], what: str, allow_config_change: bool = False) -> RunStart:
        """Check, before anything loads, that this start fits the directory: --resume needs a complete
        checkpoint of a run with this identity (unless allow_config_change), and a run without
        --resume must not overwrite checkpoints. Changes nothing on disk."""
        if allow_config_change and not resume:
            raise ValueError("--allow-config-change applies to --resume only; add --resume, or drop it")
        checkpoints = self.complete_checkpoints()
        if resume and not checkpoints:
            raise FileNotFoundError(f"--resume: {self.out / CHECKPOINTS_DIR} holds no complete checkpoint to resume from")
        if not resume and checkpoints:
            raise ValueError(f"{self.out} already holds {what} checkpoints; pass --resume to continue or pick a new --out")
        if not resume:
            return RunStart()
        state = json.loads((checkpoints[-1] / STATE_NAME).read_text(encoding="utf-8"))
        if "identity" in state:
            changes = identity_changes(state["identity"], identity)
        else:  # written by an answerfirst before run identities: what it ran with is unknown
            changes = {"settings": ["not recorded by the answerfirst that wrote this checkpoint", "this run's"]}
        if changes and not allow_config_change:
            raise ValueError(
                f"--resume: {checkpoints[-1]} was written by a run with other settings ({describe_changes(changes)}); "
                "resume with the same config and data, start a new --out, or pass --allow-config-change to "
                "continue anyway (recorded in the output manifest)"
            )
        if changes:
            logger.warning("resuming with changed settings (--allow-config-change): %s", describe_changes(changes))
        step = int(state["step"])
        resumes = [*state.get("resumes", []), {"step": step, "config_changes": changes}]
        return RunStart(step, checkpoints[-1], resumes=resumes, data_changed="data_sha256" in changes)

    def save_checkpoint(self, step: int, state: dict[str, Any], keep: int) -> Path:
        """Everything needed to resume after optimizer step `step`, written whole or not at all; the
        newest `keep` checkpoints stay."""
        final = self.out / CHECKPOINTS_DIR / f"step-{step:08d}"
        partial = final.with_name(final.name + PARTIAL)
        self.accelerator.save_state(str(partial))  # every process: the main one the model, each its RNG
        self.accelerator.wait_for_everyone()
        if self.main:
            _write_json(partial / STATE_NAME, {"step": step, **state})
            if final.exists():  # a complete checkpoint of this step from before a resume: replaced
                shutil.rmtree(final)
            os.replace(partial, final)
            for old in self.complete_checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return final

    def start(self, opened: RunStart, config: dict[str, Any]) -> RunStart:
        """After accelerator.prepare: delete checkpoints whose writing was interrupted, restore the one
        `open` chose into the prepared objects (a resume) or start metrics.jsonl over (a new run), and
        only then write the config file."""
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            for partial in (self.out / CHECKPOINTS_DIR).glob(f"step-*{PARTIAL}"):
                logger.info("removing %s: a checkpoint whose writing was interrupted", partial)
                shutil.rmtree(partial, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        if opened.checkpoint is None:
            if self.main:
                self.metrics_path.unlink(missing_ok=True)
                _write_json(self.config_path, config)
            return opened
        self.accelerator.load_state(str(opened.checkpoint))
        opened.history = self.truncate_metrics(opened.step)
        if self.main:
            _write_json(self.config_path, config)
        logger.info("resumed from step %d (%s)", opened.step, opened.checkpoint)
        return opened

    # -- metrics ------------------------------------------------------------------------------------

    def record(self, entry: dict[str, Any]) -> None:
        if self.main:
            with self.metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")

    def truncate_metrics(self, upto_step: int) -> list[dict[str, Any]]:
        """Keep the records up to the resumed step; later ones belong to the lost part of the run."""
        kept = [entry for entry in read_records(self.metrics_path) if entry.get("step", 0) <= upto_step]
        self.accelerator.wait_for_everyone()  # every process has read before the main one rewrites
        if self.main:
            self.metrics_path.write_text("".join(json.dumps(e) + "\n" for e in kept), encoding="utf-8")
        return kept


def complete_checkpoints(out: str | Path) -> list[Path]:
    root = Path(out) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if not p.name.endswith(PARTIAL) and (p / STATE_NAME).is_file())


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (a line cut by a kill is skipped)."""
    return list(iter_records(path))


def iter_records(path: str | Path) -> Iterator[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            yield entry


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a kill leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# Truncation
# ------------------------------------------------------------------------------------------------


def truncation_report(examples: Sequence[Any]) -> dict[str, int]:
    """How many of a split's examples (distill.train.DistillExample) were cut: the document to
    max_doc_tokens, the explanation to max_trace_tokens, either."""
    cut = [e.example for e in examples]
    return {
        "examples": len(cut),
        "truncated": sum(e.truncated for e in cut),
        "truncated_doc": sum(e.doc_truncated for e in cut),
        "truncated_trace": sum(e.trace_truncated for e in cut),
    }


def log_truncation(split: str, report: dict[str, int], max_doc_tokens: int, max_trace_tokens: int) -> None:
    if not report["truncated"]:
        logger.info("%s: none of %d examples truncated", split, report["examples"])
        return
    logger.warning(
        "%s: %d of %d examples truncated (%d documents cut to max_doc_tokens=%d, %d explanations cut to "
        "max_trace_tokens=%d)", split, report["truncated"], report["examples"], report["truncated_doc"],
        max_doc_tokens, report["truncated_trace"], max_trace_tokens,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Config -> command line
# ------------------------------------------------------------------------------------------------

_FLAG_TYPES = {"int": int, "float": float, "str": str}


def add_config_flags(parser: argparse.ArgumentParser, config_class: type, skip: Iterable[str] = ()) -> None:
    """One flag per field of a config dataclass (`--max-doc-tokens`; booleans also `--no-...`), all
    defaulting to None so `config_flag_values` returns only what was given."""
    skipped = set(skip)
    for f in dataclasses.fields(config_class):
        if f.name in skipped:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type).replace(" | None", "").replace("Optional[", "").rstrip("]")
        default = f.default if f.default is not dataclasses.MISSING else None
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                help=f"(default {default})")
        else:
            parser.add_argument(flag, dest=f.name, type=_FLAG_TYPES.get(kind, int), default=None,
                                help=f"(default {default})")


def config_flag_values(args: argparse.Namespace, config_class: type, skip: Iterable[str] = ()) -> dict[str, Any]:
    skipped = set(skip)
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(config_class)
        if f.name not in skipped and getattr(args, f.name, None) is not None
    }


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    parser.add_argument(
        "--allow-config-change", action="store_true",
        help="with --resume: continue even though the config, data or starting model differ (recorded in the manifest)",
    )  # fmt: skip
