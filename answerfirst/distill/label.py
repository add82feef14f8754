"""`answerfirst label`: a teacher's first-token grade distribution and reasoning trace for every pair.

For each (query, doc) pair:
  teacher_probs  the K-grade softmax at the first answer position, from ONE forward pass over the
                 prompt that afrl.PromptTokenizer builds (the runtime's torch adapter computes it,
                 so labelling and scoring cannot drift);
  trace          the explanation generated after the teacher's own argmax grade token (greedy by
                 default, or sampled with temperature / top-p).

Sharding: under `accelerate launch` every rank labels a disjoint slice of the pending rows and
appends to its own part file (OUT.parts/part-RRR.jsonl); rank 0 merges the parts into OUT.

Resuming: rows reach disk one JSON line at a time, flushed after each batch. A rerun of the same
command first cuts a partially written last line off each part file, skips every id already in
OUT or a part file, labels the rest, and writes OUT atomically in input order, so the final file
holds every input id exactly once whatever moment the previous run was killed at.

Only rows of the same labelling are ever merged: OUT.parts/stamp.json (and OUT.stamp.json beside a
finished OUT) records the teacher (sha256 of its weights and of the files that define its prompt)
and every setting that changes a row. A rerun with another teacher or other settings is refused
with one line naming what differs, and so is a row whose query or document has changed since.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from answerfirst.afrl import grade_probs

logger = logging.getLogger(__name__)

PARTS_SUFFIX = ".parts"
STAMP_NAME = "stamp.json"  # in OUT.parts/ while labelling; OUT.stamp.json once OUT is merged
# Files of a teacher directory that decide its prompts (the weights are hashed by checkpoint_hash).
PROMPT_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class LabelConfig:
    """batch_size: pairs per forward pass / generate call. max_new_tokens: trace length limit.
    do_sample, temperature, top_p: trace decoding (greedy unless do_sample). seed: sampling seed.
    quantization: None | "8bit" | "4bit" (bitsandbytes, for a big teacher). skip_bad: skip invalid
    input rows (each reported with its line number) instead of stopping. max_doc_tokens: override
    the teacher format's document truncation."""

    batch_size: int = 16
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    quantization: str | None = None
    skip_bad: bool = False
    max_doc_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"LabelConfig.batch_size: must be >= 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ValueError(f"LabelConfig.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"LabelConfig.temperature: must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"LabelConfig.top_p: must be in (0, 1], got {self.top_p}")
        if self.quantization not in (None, "8bit", "4bit"):
            raise ValueError(f"LabelConfig.quantization: must be 8bit, 4bit or None, got {self.quantization!r}")
        if self.max_doc_tokens is not None and self.max_doc_tokens < 1:
            raise ValueError(f"LabelConfig.max_doc_tokens: must be >= 1, got {self.max_doc_tokens}")


# ------------------------------------------------------------------------------------------------
# Input: pairs.jsonl, every bad row reported with its line number
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadRow:
    line: int
    problem: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.problem}"


def read_pairs(path: str | Path, skip_bad: bool = False) -> tuple[list[dict[str, Any]], list[BadRow]]:
    """(rows, bad rows) of a pairs JSONL {"id", "query", "doc", "label"?, ...}. Bad rows (not UTF-8,
    not JSON, missing or empty fields, duplicate ids) stop the run unless `skip_bad`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist")
    rows: list[dict[str, Any]] = []
    bad: list[BadRow] = []
    seen: set[str] = set()
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            problem, row = _check_row(raw, seen)
            if problem:
                bad.append(BadRow(line_no, problem))
                continue
            seen.add(row["id"])
            rows.append(row)
    if bad and not skip_bad:
        shown = "\n  ".join(str(b) for b in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise ValueError(f"{path}: {len(bad)} bad row(s):\n  {shown}{more}\nfix them, or pass --skip-bad to skip them")
    for b in bad:
        logger.warning("%s: skipped %s", path, b)
    if not rows:
        raise ValueError(f"{path} holds no valid pairs")
    return rows, bad


def _check_row(raw: bytes, seen: set[str]) -> tuple[str | None, dict[str, Any]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"not valid UTF-8 ({e.reason} at byte {e.start})", {}
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return f"not valid JSON ({e.msg})", {}
    if not isinstance(row, dict):
        return "not a JSON object", {}
    for key in ("id", "query", "doc"):
        if key not in row:
            return f"missing field {key!r}", {}
    if isinstance(row["id"], bool) or not isinstance(row["id"], (str, int)) or str(row["id"]).strip() == "":
        return f"id must be a non-empty string or integer, got {row['id']!r}", {}
    for key in ("query", "doc"):
        if not isinstance(row[key], str) or not row[key].strip():
            return f"{key} is empty or not a string", {}
    label = row.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
        return f"label must be a non-negative integer grade index, got {label!r}", {}
    row = {**row, "id": str(row["id"])}
    if row["id"] in seen:
        return f"duplicate id {row['id']!r}", {}
    return None, row


# ------------------------------------------------------------------------------------------------
# The teacher
# ------------------------------------------------------------------------------------------------


class Teacher:
    """A causal LM opened by the runtime's torch backend: grade logits from one forward pass per pair
    (Backend.grade_logits, as the runtime scores), traces from transformers' `generate` after the
    argmax grade token (on the backend's public `model`)."""

    def __init__(self, path: str, device: str = "cpu", quantization: str | None = None, max_doc_tokens: int | None = None):
        from answerfirst.artifact import Manifest, has_manifest
        from answerfirst.runtime import ScorerConfig, load

        manifest = Manifest.read(path) if Path(path).is_dir() and has_manifest(path) else None
        if manifest is not None and manifest.kind != "checkpoint":
            raise ValueError(f"{path} is a {manifest.kind} export; label with a torch checkpoint (dir or hub id)")
        scorer = load(path, backend="torch", device=device, quantization=quantization,
                      config=ScorerConfig(max_doc_tokens=max_doc_tokens))
        self.backend, self.prompts = scorer.backend, scorer.prompts
        self.model = self.backend.model
        self.path = str(path)

    def label(self, rows: Sequence[dict[str, Any]], config: LabelConfig) -> list[dict[str, Any]]:
        """Label one batch: the input rows plus teacher_probs, trace and truncated."""
        import torch

        from answerfirst.runtime.api import check_context, check_finite

        prompts = [self.prompts.prompt(r["query"], r["doc"]) for r in rows]
        check_context(prompts, self.backend)
        logits = self.backend.grade_logits(None, [p.input_ids for p in prompts])  # (B, K) one forward pass
        check_finite(logits, self.backend.artifact)  # a NaN teacher must not write NaN training targets
        probs = grade_probs(logits)  # (B, K) float64
        grades = probs.argmax(axis=1)
        answers = [[*p.input_ids, self.prompts.grade_ids[g]] for p, g in zip(prompts, grades, strict=True)]
        if config.do_sample:
            torch.manual_seed(config.seed + _stable_hash(rows[0]["id"]))
        generated = self._generate(answers, config)
        out = []
        for row, prompt, p, ids in zip(rows, prompts, probs, generated, strict=True):
            trace = "".join(self.prompts.stream_explanation(ids)).strip()
            out.append({**row, "teacher_probs": [float(x) for x in p], "trace": trace, "truncated": prompt.truncated})
        return out

    def _generate(self, sequences: list[list[int]], config: LabelConfig) -> list[list[int]]:
        """Batched decoding, left-padded so every row's new tokens start at the same column."""
        import torch

        pad_id = self.prompts.pad_id
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        kwargs: dict[str, Any] = dict(
            max_new_tokens=config.max_new_tokens,
            do_sample=config.do_sample,
            eos_token_id=sorted(self.prompts.stop_ids),
            pad_token_id=pad_id,
        )
        if config.do_sample:
            kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=0)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(self.backend.device), attention_mask=attention.to(self.backend.device), **kwargs
            )
        return [row[width:].tolist() for row in output.cpu()]


def _stable_hash(text: str) -> int:
    import zlib

    return zlib.crc32(text.encode("utf-8"))


# ------------------------------------------------------------------------------------------------
# Resumable, sharded output
# ------------------------------------------------------------------------------------------------


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + PARTS_SUFFIX)


# ------------------------------------------------------------------------------------------------
# The stamp: which teacher and settings produced the rows of OUT and OUT.parts
# ------------------------------------------------------------------------------------------------


def merged_stamp_path(out: Path) -> Path:
    return out.with_name(out.name + ".stamp.json")


def labelling_stamp(teacher: str | Path, config: LabelConfig) -> dict[str, Any]:
    """What decides a labelled row: the teacher's weights (sha256; a hub id stands for itself), the
    files that define its prompt (format in answerfirst.json, tokenizer, chat template), and the
    settings that change teacher_probs or the trace (the sampling ones only when sampling)."""
    import hashlib

    from answerfirst.artifact import MANIFEST_NAME, checkpoint_hash

    path = Path(teacher)
    stamp: dict[str, Any] = {"teacher": str(teacher), "teacher_sha256": None, "teacher_prompt_sha256": None}
    if path.is_dir():
        stamp["teacher_sha256"] = checkpoint_hash(path)
        digest = hashlib.sha256()
        manifest = path / MANIFEST_NAME
        if manifest.is_file():
            data = json.loads(manifest.read_text(encoding="utf-8"))
            digest.update(json.dumps([data.get("format"), data.get("grade_token_ids")], sort_keys=True).encode())
        for name in PROMPT_FILES:
            if (path / name).is_file():
                digest.update(name.encode() + b"\0" + (path / name).read_bytes())
        stamp["teacher_prompt_sha256"] = digest.hexdigest()
    settings = ["max_new_tokens", "do_sample", "quantization", "max_doc_tokens"]
    if config.do_sample:
        settings += ["temperature", "top_p", "seed"]
    stamp["settings"] = {name: getattr(config, name) for name in settings}
    return stamp


def stamp_differences(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'what (then vs now)' for each thing that differs between two stamps; the teacher's path alone
    does not count (a moved teacher is the same teacher), its id does when it has no hash."""
    keys = ["teacher_sha256", "teacher_prompt_sha256"]
    if current["teacher_sha256"] is None or stored.get("teacher_sha256") is None:
        keys.insert(0, "teacher")
    differences = [
        f"{key} ({_short(stored.get(key))} vs {_short(current[key])})" for key in keys if stored.get(key) != current[key]
    ]
    then, now = stored.get("settings", {}), current["settings"]
    for name in sorted(then.keys() | now.keys()):
        if then.get(name) != now.get(name):
            differences.append(f"{name} ({then.get(name)!r} vs {now.get(name)!r})")
    return differences


def _short(value: Any) -> str:
    return f"{value[:12]}…" if isinstance(value, str) and len(value) == 64 else repr(value)


def check_stamps(out: Path, stamp: dict[str, Any]) -> None:
    """Refuse to continue from rows that another teacher or other settings wrote (one line: what
    differs and what to do), and from rows whose origin is not recorded at all."""
    parts = parts_dir(out)
    has_parts = parts.is_dir() and any(parts.glob("part-*.jsonl"))
    for where, stamp_file, holds_rows in (
        (parts, parts / STAMP_NAME, has_parts),
        (out, merged_stamp_path(out), out.is_file()),
    ):
        if not stamp_file.is_file():
            if holds_rows:
                raise ValueError(
                    f"{where} holds labelled rows but no {stamp_file.name} saying which teacher and settings wrote "
                    f"them (an older answerfirst, or another tool); delete {where} to label from scratch"
                )
            continue
        try:
            stored = json.loads(stamp_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{stamp_file} is unreadable; delete {where} and {stamp_file} to label from scratch") from None
        differences = stamp_differences(stored, stamp)
        if differences:
            raise ValueError(
                f"{where} was labelled with another {', '.join(differences)} (then vs now); rerun with the same "
                f"teacher and settings, or delete {where} (and {merged_stamp_path(out).name}) to label from scratch"
            )


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_rows_match_pairs(done: dict[str, dict[str, Any]], rows: Sequence[dict[str, Any]], where: Path) -> None:
    """A labelled id whose query or document is not the pair's any more was labelled for other text."""
    for row in rows:
        labelled = done.get(row["id"])
        if labelled is not None and (labelled.get("query"), labelled.get("doc")) != (row["query"], row["doc"]):
            raise ValueError(
                f"id {row['id']!r} was labelled (in {where} or its parts) for another query/document than the pairs "
                f"file now gives it; delete {where} and its parts to label from scratch, or restore the pairs"
            )


def repair_jsonl(path: Path) -> int:
    """Cut a partially written last line (a kill mid-write) off `path`; returns the bytes removed."""
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as f:
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return 0
        # Walk back to the last newline; everything after it is an incomplete row.
        block, end = 1 << 16, size
        keep = 0
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            end = start
        f.truncate(keep)
    return size - keep


def read_done(path: Path) -> dict[str, dict[str, Any]]:
    """id -> labelled row of a JSONL output (complete lines only)."""
    done: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return done
    with path.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # being written by another rank right now, or cut by a kill
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                logger.warning("%s: ignoring an unreadable line", path)
                continue
            if isinstance(row, dict) and "id" in row and "teacher_probs" in row:
                done[str(row["id"])] = row
    return done


@dataclass
class LabelResult:
    out: Path
    rows: int
    labelled_now: int
    resumed: int
    bad: list[BadRow]
    seconds: float


def label(
    teacher: str | Path,
    pairs: str | Path,
    out: str | Path,
    config: LabelConfig = LabelConfig(),
    show_progress: bool = False,
) -> LabelResult:
    """Label every pair of `pairs` with `teacher` into `out` (see the module docstring). Runs as one
    process, or as one rank of `accelerate launch`."""
    started = time.perf_counter()
    state = _state()
    rank, world = state.process_index, state.num_processes
    out = Path(out)
    rows, bad = read_pairs(pairs, config.skip_bad)
    parts = parts_dir(out)
    stamp = labelling_stamp(teacher, config)
    check_stamps(out, stamp)  # every rank: a foreign stamp stops them all before anything is written

    # 1. rank 0 stamps and repairs the part files; 2. everyone reads the same done set; 3. only then writes.
    if state.is_main_process:
        parts.mkdir(parents=True, exist_ok=True)
        if not (parts / STAMP_NAME).is_file():
            _write_json_atomically(parts / STAMP_NAME, stamp)
        for part in sorted(parts.glob("part-*.jsonl")):
            cut = repair_jsonl(part)
            if cut:
                logger.info("%s: removed a partially written last line (%d bytes)", part, cut)
    state.wait_for_everyone()
    done = read_done(out)
    for part in sorted(parts.glob("part-*.jsonl")):
        done.update(read_done(part))
    state.wait_for_everyone()

    check_rows_match_pairs(done, rows, out)
    wanted = {r["id"] for r in rows}
    resumed = len(wanted & done.keys())
    pending = [r for r in rows if r["id"] not in done]
    shard = pending[rank::world]
    if resumed:
        logger.info("resuming: %d of %d rows already labelled, %d to go", resumed, len(rows), len(pending))

    if shard:
        model = Teacher(str(teacher), _device(state), config.quantization, config.max_doc_tokens)
        part_path = parts / f"part-{rank:03d}.jsonl"
        bar = _progress(len(pending), resumed_from=0) if show_progress and state.is_main_process else None
        with part_path.open("ab") as f:
            for start in range(0, len(shard), config.batch_size):
                batch = model.label(shard[start : start + config.batch_size], config)
                # One write per row, each a whole line: a kill leaves at most one partial last line.
                for row in batch:
                    f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
                if bar is not None:
                    bar.update(len(batch) * world)  # the other ranks advance at about the same rate
        if bar is not None:
            bar.close()
    state.wait_for_everyone()

    if state.is_main_process:
        merged = read_done(out)
        for part in sorted(parts.glob("part-*.jsonl")):
            merged.update(read_done(part))
        missing = [r["id"] for r in rows if r["id"] not in merged]
        if missing:
            raise RuntimeError(f"{len(missing)} rows were not labelled (e.g. {missing[:5]}); rerun the same command")
        extra = len(merged.keys() - wanted)
        if extra:
            logger.warning("%d labelled rows in %s are not in %s; they are dropped from the merged output", extra, out, pairs)
        check_rows_match_pairs(merged, rows, out)
        tmp = out.with_name(out.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(merged[r["id"]], ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        # The stamp goes first: a kill between the two leaves OUT (old or new) beside a matching stamp.
        _write_json_atomically(merged_stamp_path(out), stamp)
        os.replace(tmp, out)  # the merged file appears whole or not at all
        for part in parts.glob("part-*.jsonl"):
            part.unlink()
        (parts / STAMP_NAME).unlink(missing_ok=True)
        parts.rmdir()
    state.wait_for_everyone()
    return LabelResult(out, len(rows), len(pending), resumed, bad, time.perf_counter() - started)


def _state() -> Any:
    """The process's place in an `accelerate launch` group (or a group of one). On a machine without
    a GPU the group must be told so, or every rank would believe it is alone."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _device(state: Any) -> str:
    device = state.device
    return str(device) if device.type != "mps" else "cpu"


def _progress(total: int, resumed_from: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=resumed_from, unit="row", desc="labelling", dynamic_ncols=True)


def iter_labelled(path: str | Path) -> Iterator[dict[str, Any]]:
    """The rows of a teacher.jsonl."""
    with Path(path).open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def teacher_agreement_with_gold(rows: Sequence[dict[str, Any]]) -> float | None:
    """Share of labelled rows whose teacher argmax equals the gold label (None without labels)."""
    pairs = [(int(np.argmax(r["teacher_probs"])), r["label"]) for r in rows if r.get("label") is not None]
    return float(np.mean([a == b for a, b in pairs])) if pairs else None


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True, help="teacher checkpoint dir or hub id")
    parser.add_argument("--pairs", required=True, help='JSONL of {"id", "query", "doc", "label"?}')
    parser.add_argument("--out", required=True, help="teacher.jsonl to write (resumable: rerun the same command)")
    parser.add_argument("--batch-size", type=int, default=LabelConfig.batch_size)
    parser.add_argument("--quantization", choices=["4bit", "8bit"], default=None, help="load the teacher via bitsandbytes")
    parser.add_argument("--max-new-tokens", type=int, default=LabelConfig.max_new_tokens, help="trace length limit")
    parser.add_argument("--max-doc-tokens", type=int, default=None, help="override the document truncation length")
    parser.add_argument("--do-sample", action="store_true", help="sample traces instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=LabelConfig.temperature)
    parser.add_argument("--top-p", type=float, default=LabelConfig.top_p)
    parser.add_argument("--seed", type=int, default=LabelConfig.seed)
    parser.add_argument("--skip-bad", action="store_true", help="skip invalid rows (each is reported) instead of stopping")


def run(args: argparse.Namespace) -> int:
    config = LabelConfig(
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        quantization=args.quantization,
        skip_bad=args.skip_bad,
        max_doc_tokens=args.max_doc_tokens,
    )
    main = _state().is_main_process
    if main:
        print("answerfirst label — config: " + json.dumps(asdict(config)), flush=True)
    result = label(args.teacher, args.pairs, args.out, config, show_progress=main)
    if main:
        rate = result.labelled_now / result.seconds if result.seconds > 0 else 0.0
        skipped = f", {len(result.bad)} bad rows skipped" if result.bad else ""
        print(
            f"wrote {result.out}: {result.rows} rows ({result.labelled_now} labelled now at {rate:.1f} rows/s, "
            f"{result.resumed} from a previous run{skipped})",
            flush=True,
        )
    return 0
