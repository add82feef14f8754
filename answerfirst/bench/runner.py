"""`answerfirst bench [--quick]`: every backend against the naive reference, on the same pairs.

    config -> artifacts (random Qwen3-0.6B with the Qwen vocabulary, ONNX and GGUF exports; cached)
           -> workload W -> one worker process per contender -> warm-up -> interleaved repeats
           -> compute floor -> curves (length, documents, threads) on the fastest backend
           -> bench/results/{bench.json, bench.md, *.png}

Contenders: the peers a user has without answerfirst, (a) naive (Qwen3-Reranker model-card style:
left-padded full forward, logits[:, -1]), (a') naive-keep1 (the same plus logits_to_keep=1) and
(a'') llamacpp-rank (llama.cpp's own RANK pooling on our rank GGUF, whole prompts); and ours, (b)
torch fp32 (and bf16 where the CPU computes it fast), (c) ONNX fp32, (d) ONNX int8, (d') OpenVINO int8
weights and OpenVINO static int8, (e) GGUF F16, Q8_0, Q4_K_M. Each of ours is timed with
prefix reuse on and off ("reuse" / "noreuse") in the same process, so the prefix-reuse gain is
measured; a peer has no prefix reuse ("noreuse" only).

Sizing (2 cores, real size): one W query (32 docs × 64–192 tokens) is ~4k continuation tokens with
prefix reuse and ~10k without; at ~100 GFLOP/s fp32 that is tens of seconds for fp32 contenders and
a couple of minutes for the naive reference. So the full run times each "reuse" mode `repeats`
times, our "noreuse" modes `noreuse_repeats` times and the peers `baseline_repeats` times, warms up on the first batch of
documents only, runs the curves on the fastest backend only, with few documents per point, and
stops adding repeats or curve points when the time budget would be exceeded (what was skipped is
recorded in the results, never silently dropped).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from answerfirst.bench.flops import ModelShape, floor_seconds, int8_kernels, matmul_throughput, useful_flops
from answerfirst.bench.workload import Workload, build_workload, workload_w

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class Contender:
    """One row of the benchmark.

    artifact: what it loads (checkpoint | onnx | openvino | gguf); variant: the export variant it runs;
    precision: of its weights (and, for a checkpoint, what load(precision=...) computes in); floor: the
        compute floor it is held to (fp32 | bf16 | int8);
    worker: how its process scores: "scorer" (answerfirst.load, timed with prefix reuse on and off)
        or a peer, the code a user writes without answerfirst (naive, naive-keep1, llamacpp-rank),
        which has no prefix reuse.
    """

    artifact: str
    variant: str | None
    precision: str
    floor: str
    worker: str = "scorer"

    @property
    def peer(self) -> bool:
        return self.worker != "scorer"

    @property
    def modes(self) -> tuple[str, ...]:
        """Timed modes, the main one (the row's numbers) first."""
        return ("noreuse",) if self.peer else ("reuse", "noreuse")


CONTENDERS: dict[str, Contender] = {
    "naive": Contender("checkpoint", None, "fp32", "fp32", worker="naive"),
    "naive-keep1": Contender("checkpoint", None, "fp32", "fp32", worker="naive-keep1"),
    "llamacpp-rank": Contender("gguf", "q8_0-rank", "q8_0", "int8", worker="llamacpp-rank"),
    "torch-fp32": Contender("checkpoint", None, "fp32", "fp32"),
    "torch-bf16": Contender("checkpoint", None, "bf16", "bf16"),  # only where the CPU computes bf16 fast
    "onnx-fp32": Contender("onnx", "fp32", "fp32", "fp32"),
    "onnx-int8": Contender("onnx", "int8", "int8", "int8"),
    "openvino-int8": Contender("openvino", "int8", "int8", "int8"),
    "openvino-int8-static": Contender("openvino", "int8-static", "int8", "int8"),
    "gguf-f16": Contender("gguf", "f16", "f16", "fp32"),
    "gguf-q8_0": Contender("gguf", "q8_0", "q8_0", "int8"),
    "gguf-q4_k_m": Contender("gguf", "q4_k_m", "q4_k_m", "int8"),
}
REFERENCE = "torch-fp32"  # quality is measured against it
BASELINES = ("naive", "naive-keep1")  # speed-ups are given against both
GGUF_QUANTS = ("f16", "q8_0", "q4_k_m")


@dataclass
class BenchConfig:
    """What `answerfirst bench` runs; the defaults are the full run, `quick()` the reduced one.

    model: a torch checkpoint to benchmark; None = a random Qwen3-0.6B with the real Qwen vocabulary
        (built once, cached under cache_dir). onnx / openvino / gguf: existing exports of that model;
        None = export the model once and cache the exports under cache_dir.
    num_layers: override the random model's depth (the quick run uses a shallower Qwen3-0.6B).
    threads: threads of every contender; None = all cores.
    budget_s: wall-clock budget of the measurements (building and exporting the model, done once and
        cached, comes on top; the first full run also exports, ~10 min); CURVES_SHARE of it is kept
        for the curves. Each contender is timed at least once whatever the budget; its further
        repeats, and curve points, are skipped (and reported) once they would exceed it.
    """

    quick: bool = False
    model: str | None = None
    onnx: str | None = None
    openvino: str | None = None
    gguf: str | None = None
    out_dir: str = "bench/results"
    cache_dir: str = "artifacts/bench"
    contenders: tuple[str, ...] = tuple(CONTENDERS)
    num_layers: int | None = None
    docs: int = 32
    doc_tokens: tuple[int, int] = (64, 192)
    repeats: int = 3
    baseline_repeats: int = 1
    # ours without prefix reuse: the denominator of the prefix-reuse gain, which one timing left to the
    # machine's drift (torch bf16 read 1.48x in one full run and 1.74x in the next, README)
    noreuse_repeats: int = 2
    warmup_docs: int = 4
    batch_size: int = 16
    threads: int | None = None
    curves: bool = True
    curve_lengths: tuple[int, ...] = (32, 64, 128, 256, 512)
    curve_length_docs: int = 4
    curve_docs: tuple[int, ...] = (1, 4, 16, 64)
    curve_docs_length: int = 128
    curve_threads: tuple[int, ...] = (1, 2, 0)  # 0 = all cores
    curve_threads_docs: int = 16
    budget_s: float = 30 * 60  # issue 16 added two peers (naive-keep1, llamacpp-rank) and OpenVINO
    seed: int = 0

    def __post_init__(self) -> None:
        self.contenders = tuple(self.contenders)
        unknown = [c for c in self.contenders if c not in CONTENDERS]
        if unknown:
            raise ValueError(f"contenders: unknown {unknown}; choose from {', '.join(CONTENDERS)}")
        if "naive" not in self.contenders:
            raise ValueError("contenders: must include 'naive' (every speed-up is measured against it)")
        self.contenders = tuple(sorted(self.contenders, key=list(CONTENDERS).index))  # table order
        for name in ("docs", "repeats", "baseline_repeats", "noreuse_repeats", "warmup_docs", "batch_size", "curve_length_docs", "curve_docs_length", "curve_threads_docs"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        low, high = self.doc_tokens
        if not 1 <= low <= high:
            raise ValueError(f"doc_tokens: need 1 <= low <= high, got {self.doc_tokens}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: must be >= 1 or None (all cores), got {self.threads}")
        if any(t < 0 for t in self.curve_threads):
            raise ValueError(f"curve_threads: thread counts must be >= 1, or 0 for all cores; got {self.curve_threads}")
        if any(n < 1 for n in (*self.curve_lengths, *self.curve_docs)):
            raise ValueError("curve_lengths / curve_docs: every point must be >= 1")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"num_layers: must be >= 1, got {self.num_layers}")
        if self.budget_s <= 0:
            raise ValueError(f"budget_s: must be positive, got {self.budget_s}")

    @classmethod
    def quick_preset(cls, **overrides: Any) -> BenchConfig:
        """A few minutes: a 4-layer Qwen3-0.6B (real width and vocabulary), 8 documents, short curves."""
        preset = dict(
            quick=True, num_layers=4, docs=8, repeats=2, baseline_repeats=1, noreuse_repeats=1, warmup_docs=4, batch_size=8,
            curve_lengths=(32, 128, 512), curve_length_docs=2, curve_docs=(1, 8), curve_threads=(1, 0),
            curve_threads_docs=4, budget_s=4 * 60, out_dir="artifacts/bench/results-quick",
        )
        preset.update(overrides)
        return cls(**preset)

    @property
    def all_threads(self) -> int:
        return self.threads or os.cpu_count() or 1


# ------------------------------------------------------------------------------------------------
# Artifacts: the checkpoint and its exports, built once and cached
# ------------------------------------------------------------------------------------------------


def random_checkpoint(cache_dir: Path, num_layers: int | None, progress: Callable[[str], None]) -> Path:
    """A random Qwen3-0.6B (optionally shallower) with the real Qwen tokenizer, saved once."""
    from answerfirst.afrl import AFRLFormat, PromptTokenizer
    from answerfirst.artifact import Manifest, checkpoint_hash, has_manifest
    from answerfirst.offline import QWEN3_0_6B, qwen_tokenizer, random_qwen3

    name = "qwen3-0.6b-random" + (f"-{num_layers}layers" if num_layers else "")
    out = cache_dir / name
    if has_manifest(out):
        return out
    progress(f"building {name} (random weights, Qwen vocabulary) in {out}")
    tokenizer = qwen_tokenizer()
    overrides = {"num_hidden_layers": num_layers} if num_layers else {}
    model = random_qwen3(tokenizer, shape=QWEN3_0_6B, seed=0, **overrides)
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    fmt = AFRLFormat.from_chat_template(tokenizer)
    manifest = Manifest(
        kind="checkpoint",
        format=fmt,
        grade_token_ids=PromptTokenizer(tokenizer, fmt).grade_ids,
        source={"model": f"random {name} (answerfirst.offline.QWEN3_0_6B)", "sha256": checkpoint_hash(partial)},
        info={"note": "random weights: latency does not depend on weight values"},
    )
    manifest.write(partial)  # the manifest is written last: its presence marks a complete checkpoint
    if out.exists():
        import shutil

        shutil.rmtree(out)
    partial.rename(out)
    return out


def export_dir(kind: str, checkpoint: Path, config: BenchConfig, progress: Callable[[str], None]) -> Path:
    """The cached ONNX or GGUF export of `checkpoint` (exported now if missing or stale)."""
    from answerfirst.artifact import Manifest, ManifestError, checkpoint_hash, has_manifest

    given = {"onnx": config.onnx, "gguf": config.gguf, "openvino": config.openvino}[kind]
    if given is not None:
        return Path(given)
    digest = checkpoint_hash(checkpoint)
    out = Path(config.cache_dir) / "exports" / digest[:16] / kind
    wanted = {"onnx": ("fp32", "int8"), "openvino": ("int8", "int8-static"),
              "gguf": (*GGUF_QUANTS, *(q + "-rank" for q in GGUF_QUANTS))}[kind]
    if has_manifest(out):
        try:
            stale = stale_export(Manifest.read(out), kind, digest, wanted)
            if stale is None:
                return out
            progress(f"re-exporting {out}: {stale}")
        except ManifestError as e:
            logger.warning("re-exporting %s: %s", out, e)
    progress(f"exporting {checkpoint} to {kind} in {out} (once; later runs reuse it)")
    started = time.perf_counter()
    # In a child process: a real-size export peaks near 6 GB, and memory a Python process has
    # touched is not handed back, so exporting here would leave the runner that large while the
    # contender workers load beside it.
    command = [sys.executable, "-m", "answerfirst.cli", "export", kind, "--model", str(checkpoint), "--out", str(out)]
    if kind == "gguf":
        command += ["--quant", ",".join(GGUF_QUANTS)]
    returncode = subprocess.run(command).returncode
    # Exit status 1 with a manifest written: the export is complete and only its parity failed (every
    # variant of it: an OpenVINO export has one). On the random-weight model that is expected (flat
    # distributions, README "Latency benchmark"): the contenders name their variant and are timed.
    written = returncode == 1 and has_manifest(out) and set(wanted) <= {v.name.lower() for v in Manifest.read(out).variants}
    if returncode != 0 and not written:
        raise RuntimeError(f"exporting {checkpoint} to {kind} failed (command: {' '.join(command)})")
    progress(f"exported {kind} in {time.perf_counter() - started:.0f} s" + (" (no variant passed parity)" if written else ""))
    return out


def stale_export(manifest: Any, kind: str, digest: str, wanted: tuple[str, ...]) -> str | None:
    """Why a cached export cannot stand for this checkpoint and this exporter, or None if it can."""
    from answerfirst.export.onnx import GRAPH_REVISION

    if manifest.source.get("sha256") != digest:
        return "it was exported from other weights"
    missing = set(wanted) - {v.name.lower() for v in manifest.variants}
    if missing:
        return f"it lacks variant(s) {', '.join(sorted(missing))}"
    if kind in ("onnx", "openvino") and manifest.info.get("graph_revision") != GRAPH_REVISION:
        return f"its graph is revision {manifest.info.get('graph_revision', '1')}, this exporter writes {GRAPH_REVISION}"
    return None


def find_variant(directory: Path, key: str) -> str:
    """The export variant named `key`, else the first whose quantization is `key` (case-insensitive)."""
    from answerfirst.artifact import Manifest, ManifestError

    manifest = Manifest.read(directory)
    for variant in sorted(manifest.variants, key=lambda v: v.name.lower() != key):
        if key in (variant.name.lower(), variant.quantization.lower()):
            return variant.name
    raise ManifestError(f"{directory} has no {key} variant (it has {', '.join(v.name for v in manifest.variants)})")


# ------------------------------------------------------------------------------------------------
# Workers: one process per contender
# ------------------------------------------------------------------------------------------------


class Worker:
    """A contender loaded in its own process (answerfirst.bench.worker), driven over JSON lines."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.name = spec["name"]
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), TOKENIZERS_PARALLELISM="false")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "answerfirst.bench.worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.ready: dict[str, Any] | None = None

    def wait_ready(self) -> dict[str, Any]:
        if self.ready is None:
            self.ready = self._read()
            if not self.ready.get("ready"):
                self.close()
        return self.ready

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        return self._read()

    def score(self, mode: str, workload: Workload) -> dict[str, Any]:
        reply = self.request({"op": "score", "mode": mode, "query": workload.query, "docs": list(workload.docs)})
        if "error" in reply:
            raise RuntimeError(f"{self.name} ({mode}) failed on {workload.name}: {reply['error']}")
        return reply

    def _read(self) -> dict[str, Any]:
        line = self.process.stdout.readline()
        if not line:
            stderr = self.process.stderr.read() if self.process.poll() is not None else ""
            tail = "\n".join(stderr.strip().splitlines()[-5:])
            return {"ready": False, "error": f"worker exited (code {self.process.poll()}): {tail}"}
        return json.loads(line)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


CURVES_SHARE = 0.15  # of budget_s, kept for the curves


@dataclass
class ContenderResult:
    name: str
    artifact: str
    precision: str
    floor: str
    status: str = "pending"  # ok | skipped | failed
    reason: str = ""
    path: str = ""
    variant: str | None = None
    load_seconds: float | None = None
    rss_after_load_bytes: int | None = None
    peak_rss_bytes: int | None = None  # loading and the main mode (naive: noreuse; ours: reuse)
    peak_rss_by_mode: dict[str, int] = field(default_factory=dict)  # mode -> peak over its timed calls
    latencies_s: dict[str, list[float]] = field(default_factory=dict)  # mode -> per-query seconds
    scores: dict[str, Any] = field(default_factory=dict)  # mode -> {"probs", "expected"} of the first run


def machine_description() -> dict[str, Any]:
    """The machine: cores, CPU model and the ISA flags the adapters pick kernels by (runtime/_cpu.py),
    memory, library versions."""
    from answerfirst.runtime._cpu import features

    try:
        import psutil

        memory_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        memory_gib = None
    versions = {}
    for package in ("torch", "transformers", "onnxruntime", "openvino", "llama_cpp", "numpy"):
        try:
            versions[package] = __import__(package).__version__
        except (ImportError, AttributeError):
            versions[package] = None
    return {
        "nproc": os.cpu_count(),
        **features().describe(),
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def run_benchmark(config: BenchConfig, progress: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Run every contender on workload W (and the curves); returns the results dict (see report.py)."""
    from answerfirst.artifact import Manifest, bind_format, has_manifest

    started = time.perf_counter()
    load_before = os.getloadavg()
    progress(f"bench config: {json.dumps(asdict(config))}")
    if load_before[0] > 1.5:
        progress(f"WARNING: load average {load_before[0]:.1f} on {os.cpu_count()} cores: other work is running, "
                 "so these timings will not be representative (recorded in the results)")
    cache_dir = Path(config.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)

    # -- artifacts ------------------------------------------------------------------------------
    checkpoint = Path(config.model) if config.model else random_checkpoint(cache_dir, config.num_layers, progress)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"--model {checkpoint}: not a torch checkpoint directory (no config.json); "
                                "benchmark a checkpoint and pass its exports with --onnx / --openvino / --gguf")
    results = {name: ContenderResult(name, CONTENDERS[name].artifact, CONTENDERS[name].precision, CONTENDERS[name].floor)
               for name in config.contenders}
    exports: dict[str, Path | Exception] = {}
    for kind in ("onnx", "openvino", "gguf"):
        if any(CONTENDERS[name].artifact == kind for name in config.contenders):
            try:
                exports[kind] = export_dir(kind, checkpoint, config, progress)
            except Exception as e:  # the contenders of this kind are recorded as skipped, with why
                logger.warning("%s export unavailable: %s", kind, e)
                exports[kind] = e

    from transformers import AutoTokenizer

    manifest = Manifest.read(checkpoint) if has_manifest(checkpoint) else None
    prompts = bind_format(AutoTokenizer.from_pretrained(checkpoint), manifest, str(checkpoint))
    shape_config = json.loads((checkpoint / "config.json").read_text())
    shape = ModelShape.from_config(shape_config)
    workload = workload_w(prompts, config.docs, config.doc_tokens, config.seed)
    progress(f"workload W: {json.dumps({k: v for k, v in workload.describe().items() if k != 'doc_tokens'})}")

    # The budget covers the measurements; building and exporting the model (once) comes on top.
    deadline = time.perf_counter() + config.budget_s
    artifacts_seconds = time.perf_counter() - started

    # The machine's matmul rates, measured now (no worker running yet) and again after the main phase.
    measurements = [_measure_rates(config, shape, workload, "before the workers start")]

    # -- workers ----------------------------------------------------------------------------------
    from answerfirst.runtime._cpu import features

    threads = config.all_threads
    workers: dict[str, Worker] = {}
    max_prompt_tokens = workload.prefix_tokens + max(workload.doc_tokens) + workload.suffix_tokens
    for name, result in results.items():
        artifact, key = CONTENDERS[name].artifact, CONTENDERS[name].variant
        if CONTENDERS[name].precision == "bf16" and not features().fast_bf16:
            result.status, result.reason = "skipped", "bf16 is emulated on this CPU (no AMX bf16 or AVX512_BF16)"
            continue
        if artifact == "checkpoint":
            result.path = str(checkpoint)
        else:
            export = exports[artifact]
            if isinstance(export, Exception):
                result.status, result.reason = "skipped", f"{artifact} export unavailable: {export}"
                continue
            try:
                result.variant = find_variant(export, key)
            except Exception as e:
                result.status, result.reason = "skipped", str(e)
                continue
            result.path = str(export)
        spec = {"name": name, "kind": CONTENDERS[name].worker, "path": result.path, "variant": result.variant,
                "precision": CONTENDERS[name].precision if artifact == "checkpoint" else None,
                "threads": threads, "batch_size": config.batch_size, "max_prompt_tokens": max_prompt_tokens}
        workers[name] = Worker(spec)
    try:
        _run_main_phase(config, workload, results, workers, deadline, progress)
        measurements.append(_measure_rates(config, shape, workload, "after the main phase"))
        floor = _compute_floor(config, shape, workload, prompts, measurements, progress)
        curves = _run_curves(config, prompts, workload, results, workers, deadline, progress)
    finally:
        for worker in workers.values():
            worker.close()

    summary = _summarise(config, results, workload, shape, floor, curves, started, load_before)
    summary["artifacts_seconds"] = artifacts_seconds  # building + exporting (0-ish when cached)
    return summary


def _run_main_phase(config, workload, results, workers, deadline, progress) -> None:
    for name, worker in workers.items():
        ready = worker.wait_ready()
        result = results[name]
        if not ready.get("ready"):
            result.status, result.reason = "failed", f"could not load: {ready.get('error')}"
            progress(f"{name}: FAILED to load: {ready.get('error')}")
            continue
        result.status = "ok"
        result.load_seconds = ready["load_seconds"]
        result.rss_after_load_bytes = ready["rss_bytes"]
        result.peak_rss_bytes = ready["peak_rss_bytes"]
        progress(f"{name}: loaded in {ready['load_seconds']:.1f} s, RSS {ready['rss_bytes'] / 2**20:.0f} MiB")
    running = [name for name in workers if results[name].status == "ok"]
    # Every (contender, mode) timed, with its number of repeats: baselines (naive, no reuse) fewer.
    plan = [(name, mode) for name in running for mode in CONTENDERS[name].modes]
    target = {(n, m): config.baseline_repeats if CONTENDERS[n].peer else config.noreuse_repeats if m == "noreuse" else config.repeats
              for n, m in plan}

    warm = workload.head(min(config.warmup_docs, len(workload.docs)))
    for name, mode in plan:
        try:
            workers[name].score(mode, warm)
        except RuntimeError as e:
            results[name].status, results[name].reason = "failed", str(e)
    plan = [(n, m) for n, m in plan if results[n].status == "ok"]
    progress(f"warm-up done ({len(warm.docs)} docs per contender and mode); timing {len(plan)} contender modes")

    rounds = max(target.values(), default=0)
    # Repeats past the first stop at this point, so the curves (on the fastest backend) keep a share.
    main_deadline = deadline - (CURVES_SHARE * config.budget_s if config.curves else 0.0)
    for round_index in range(rounds):
        todo = [(n, m) for n, m in plan
                if results[n].status == "ok" and len(results[n].latencies_s.get(m, [])) < target[(n, m)]]
        if round_index > 0:
            # An entry repeats only if its last time still fits: fast backends get their repeats
            # even where a slow one (naive, GGUF F16) has to stop at fewer.
            fits = [(n, m) for n, m in todo if time.perf_counter() + results[n].latencies_s[m][-1] <= main_deadline]
            for n, m in todo:
                if (n, m) not in fits:
                    progress(f"time budget: {n} {m} stops at {len(results[n].latencies_s[m])} timed quer(ies)")
            plan = [(n, m) for n, m in plan if (n, m) not in todo or (n, m) in fits]
            todo = fits
        # Interleaved: each round visits every entry once, in an order rotated per round, so a
        # slow spell of the (shared) machine spreads over contenders instead of hitting one.
        shift = round_index % max(len(todo), 1)
        for name, mode in todo[shift:] + todo[:shift]:
            try:
                reply = workers[name].score(mode, workload)
            except RuntimeError as e:
                results[name].status, results[name].reason = "failed", str(e)
                progress(f"{name} {mode}: FAILED: {e}")
                continue
            results[name].latencies_s.setdefault(mode, []).append(reply["seconds"])
            peaks = results[name].peak_rss_by_mode
            # A call's peak includes what the process kept from earlier calls (ORT's arena and
            # malloc keep their high-water mark), so the product mode's peak counts only calls made
            # before the no-reuse mode, with its longer batches, ran at full size in that process:
            # round 1, where each contender's reuse entry comes first.
            if mode == "noreuse" or "noreuse" not in results[name].latencies_s:
                peaks[mode] = max(peaks.get(mode, 0), reply["peak_rss_bytes"])
            results[name].scores.setdefault(mode, {"probs": reply["probs"], "expected": reply["expected"]})
            progress(f"round {round_index + 1}/{rounds}  {name:<12} {mode:<8} {reply['seconds']:8.2f} s "
                     f"({len(workload.docs) / reply['seconds']:6.2f} pairs/s)")
    for name in running:
        result = results[name]
        main_mode = CONTENDERS[name].modes[0]
        if result.status == "ok" and main_mode in result.peak_rss_by_mode:
            result.peak_rss_bytes = max(result.peak_rss_bytes or 0, result.peak_rss_by_mode[main_mode])


def _measure_rates(config, shape, workload, when: str) -> dict[str, Any]:
    """This machine's matmul throughput at the model's shapes, rows = one batch of continuations
    (`when` labels the measurement in the results): fp32, bf16 (the torch-bf16 contender's floor), and
    int8 as the fastest of the int8 GEMMs this environment ships (flops.py: int8_kernels): a floor set by a
    slower kernel than the machine has would be one our own kernels could pass."""
    from answerfirst.runtime._cpu import features

    rows = min(config.batch_size, len(workload.docs)) * int(np.mean(workload.continuation_lens))
    rates = {dtype: matmul_throughput(shape, rows, dtype, config.all_threads) for dtype in ("fp32", "bf16")}
    int8 = {name: measure(shape, rows, config.all_threads) for name, measure in int8_kernels(features().fast_bf16).items()}
    return {"when": when, "rows": rows, **rates, "int8": max(int8.values()), "loadavg": os.getloadavg()[0],
            "int8_kernels": {name: rate / 1e9 for name, rate in int8.items()}}


def _compute_floor(config, shape, workload, prompts, measurements, progress) -> dict[str, Any]:
    """The floor time of W at the best of the rate measurements. A shared or busy machine only ever
    makes a measurement slower (one run here gave 447 int8 GOP/s where a quiet minute gave 870), so
    the fastest is the machine's capability and a slow one would flatter every ratio."""
    rates = {dtype: max(m[dtype] for m in measurements) for dtype in ("fp32", "bf16", "int8")}
    flops = useful_flops(shape, workload.prefix_tokens, workload.continuation_lens, len(prompts.grade_ids))
    floor = {
        "rows": measurements[0]["rows"],
        "threads": config.all_threads,
        "fp32_gflops": rates["fp32"] / 1e9,
        "int8_gops": rates["int8"] / 1e9,
        "bf16_gflops": max(m["bf16"] for m in measurements) / 1e9,
        "measurements": [{"when": m["when"], "fp32_gflops": m["fp32"] / 1e9, "bf16_gflops": m["bf16"] / 1e9,
                          "int8_gops": m["int8"] / 1e9, "int8_kernels_gops": m["int8_kernels"], "loadavg": m["loadavg"]}
                         for m in measurements],
        "useful_gflop": flops.total / 1e9,
        "useful_linear_gflop": flops.linear / 1e9,
        "useful_attention_gflop": flops.attention / 1e9,
        "useful_tokens": flops.tokens,
        "seconds": {
            "fp32": floor_seconds(flops, rates["fp32"], rates["fp32"]),
            "int8": floor_seconds(flops, rates["int8"], rates["fp32"]),
            "bf16": floor_seconds(flops, rates["bf16"], rates["bf16"]),  # torch bf16 runs attention in bf16 too
        },
    }
    progress(f"compute floor of W: {flops.total / 1e9:.3g} useful GFLOP; fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s -> "
             f"{floor['seconds']['fp32']:.2f} s, int8 {rates['int8'] / 1e9:.0f} GOP/s -> {floor['seconds']['int8']:.2f} s")
    return floor


def _run_curves(config, prompts, workload, results, workers, deadline, progress) -> dict[str, Any]:
    """ms per document vs document length, vs documents per query, vs threads, on the fastest backend."""
    ours = [r for r in results.values() if not CONTENDERS[r.name].peer and r.status == "ok" and r.latencies_s.get("reuse")]
    if not config.curves or not ours:
        return {"skipped": "curves switched off" if not config.curves else "no backend of ours ran"}
    best = min(ours, key=lambda r: float(np.median(r.latencies_s["reuse"])))
    curves: dict[str, Any] = {"backend": best.name, "skipped": []}
    worker = workers[best.name]

    def point(label: str, load: Workload, run: Callable[[Workload], float]) -> dict[str, Any] | None:
        if time.perf_counter() > deadline:
            curves["skipped"].append(label)
            return None
        seconds = run(load)
        progress(f"curve {best.name} {label}: {1000 * seconds / len(load.docs):.1f} ms/doc")
        return {"docs": len(load.docs), "doc_tokens_mean": float(np.mean(load.doc_tokens)),
                "seconds": seconds, "ms_per_doc": 1000 * seconds / len(load.docs)}

    timed = lambda load: worker.score("reuse", load)["seconds"]  # noqa: E731
    curves["length"] = []
    for length in config.curve_lengths:
        if length > prompts.format.max_doc_tokens:
            curves["skipped"].append(f"length={length} (above max_doc_tokens {prompts.format.max_doc_tokens})")
            continue
        load = build_workload(prompts, f"length={length}", [length] * config.curve_length_docs, seed=config.seed + length)
        if (entry := point(f"length={length}", load, timed)) is not None:
            curves["length"].append({"length": length, **entry})
    curves["docs"] = []
    for count in config.curve_docs:
        load = build_workload(prompts, f"docs={count}", [config.curve_docs_length] * count, seed=config.seed + 7)
        if (entry := point(f"docs={count}", load, timed)) is not None:
            curves["docs"].append({"documents": count, **entry})
    curves["threads"] = []
    # The contender's own thread count first: its worker is already warm, so that point costs one
    # call, and a budget that runs out spends it on the points needing a new process.
    counts = sorted({t or (os.cpu_count() or 1) for t in config.curve_threads}, key=lambda t: (t != config.all_threads, t))
    threads_load = workload.head(min(config.curve_threads_docs, len(workload.docs)))
    for count in counts:
        def timed_threads(load: Workload, count: int = count) -> float:
            if count == config.all_threads:
                return timed(load)
            other = Worker({**worker.spec, "threads": count})
            try:
                ready = other.wait_ready()
                if not ready.get("ready"):
                    raise RuntimeError(ready.get("error"))
                other.score("reuse", load.head(min(config.warmup_docs, len(load.docs))))  # warm-up
                return other.score("reuse", load)["seconds"]
            finally:
                other.close()

        try:
            entry = point(f"threads={count}", threads_load, timed_threads)
        except RuntimeError as e:
            curves["skipped"].append(f"threads={count}: {e}")
            continue
        if entry is not None:
            curves["threads"].append({"threads": count, **entry})
    curves["threads"].sort(key=lambda entry: entry["threads"])
    return curves


def _summarise(config, results, workload, shape, floor, curves, started, load_before) -> dict[str, Any]:
    from answerfirst.metrics import agreement, spearman

    def stats(latencies: Sequence[float]) -> dict[str, Any]:
        seconds = np.asarray(latencies)
        mean = float(seconds.mean())
        return {"latencies_s": [float(s) for s in seconds], "repeats": len(seconds), "mean_s": mean,
                "p50_s": float(np.percentile(seconds, 50)), "p95_s": float(np.percentile(seconds, 95)),
                "pairs_per_s": len(workload.docs) / mean, "ms_per_doc": 1000 * mean / len(workload.docs)}

    baseline_rates = {name: stats(results[name].latencies_s["noreuse"])["pairs_per_s"]
                      for name in BASELINES if name in results and results[name].latencies_s.get("noreuse")}
    reference = results.get(REFERENCE)
    reference_scores = reference.scores.get("reuse") if reference else None
    entries = []
    for result in results.values():
        contender = CONTENDERS[result.name]
        entry: dict[str, Any] = {
            "name": result.name, "peer": contender.peer, "artifact": result.artifact, "precision": result.precision,
            "status": result.status,
            "reason": result.reason, "path": result.path, "variant": result.variant,
            "load_seconds": result.load_seconds, "rss_after_load_bytes": result.rss_after_load_bytes,
            "peak_rss_bytes": result.peak_rss_bytes, "peak_rss_by_mode_bytes": result.peak_rss_by_mode,
            "modes": {mode: stats(lat) for mode, lat in result.latencies_s.items()},
        }
        main_mode = contender.modes[0]
        main = entry["modes"].get(main_mode)
        entry["pairs_per_s"] = main["pairs_per_s"] if main else None
        entry["p50_s"] = main["p50_s"] if main else None
        entry["p95_s"] = main["p95_s"] if main else None
        entry["ms_per_doc"] = main["ms_per_doc"] if main else None
        for baseline, key in zip(BASELINES, ("speedup_vs_naive", "speedup_vs_keep1"), strict=True):
            rate = baseline_rates.get(baseline)
            entry[key] = main["pairs_per_s"] / rate if main and rate else None
        no_reuse = entry["modes"].get("noreuse")
        entry["prefix_reuse_speedup"] = (
            main["pairs_per_s"] / no_reuse["pairs_per_s"] if main and no_reuse and not contender.peer else None
        )
        floor_s = floor["seconds"][result.floor]
        entry["floor"] = {"kind": result.floor, "seconds": floor_s,
                          "ratio": main["p50_s"] / floor_s if main else None}  # measured / floor (1.0 = at the floor)
        quality: dict[str, Any] = {}
        mine = result.scores.get(main_mode)
        if mine and reference_scores and result.name != REFERENCE:
            ref_probs, my_probs = np.asarray(reference_scores["probs"]), np.asarray(mine["probs"])
            quality = {"vs": REFERENCE, "agreement": agreement(ref_probs.argmax(1), my_probs.argmax(1)),
                       "spearman": spearman(reference_scores["expected"], mine["expected"]),
                       "max_abs_dp": float(np.abs(ref_probs - my_probs).max())}
        if result.scores.get("reuse") and result.scores.get("noreuse"):
            quality["reuse_vs_noreuse_max_abs_dp"] = float(
                np.abs(np.asarray(result.scores["reuse"]["probs"]) - np.asarray(result.scores["noreuse"]["probs"])).max()
            )
        entry["quality"] = quality
        entries.append(entry)
    return {
        "schema": 1,
        "command": "answerfirst bench" + (" --quick" if config.quick else ""),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_seconds": time.perf_counter() - started,
        "machine": {**machine_description(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "config": asdict(config),
        "model": {"path": str(results["naive"].path), **asdict(shape),
                  "linear_gflop_per_token": shape.linear_flops_per_token() / 1e9},
        "workload": workload.describe(),
        "floor": floor,
        "contenders": entries,
        "curves": curves,
    }


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="reduced run (4-layer model, 8 docs, short curves): a few minutes")
    parser.add_argument("--model", default=None, help="torch checkpoint to benchmark (default: random Qwen3-0.6B, Qwen vocab)")
    parser.add_argument("--onnx", default=None, help="existing ONNX export of --model (default: export once, cached)")
    parser.add_argument("--openvino", default=None, help="existing OpenVINO export of --model (default: export once, cached)")
    parser.add_argument("--gguf", default=None, help="existing GGUF export of --model (default: export once, cached)")
    parser.add_argument("--out", default=None, help="results directory (default bench/results; quick: artifacts/bench/results-quick)")
    parser.add_argument("--cache", default=None, help="artifact cache (default artifacts/bench)")
    parser.add_argument("--contenders", default=None, help=f"comma-separated subset of {','.join(CONTENDERS)}")
    parser.add_argument("--docs", type=int, default=None, help="documents in workload W")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats of each prefix-reuse mode")
    parser.add_argument("--baseline-repeats", type=int, default=None, help="timed repeats of the peers (naive, naive-keep1, llamacpp-rank)")
    parser.add_argument("--noreuse-repeats", type=int, default=None, help="timed repeats of our contenders with prefix reuse off")
    parser.add_argument("--threads", type=int, default=None, help="threads per contender (default: all cores)")
    parser.add_argument("--layers", type=int, default=None, help="depth of the random model (default: 28, quick: 4)")
    parser.add_argument("--no-curves", action="store_true", help="skip the length / documents / threads curves")
    parser.add_argument("--budget-minutes", type=float, default=None, help="budget of the measurements, export excluded (default 30, quick 4)")
    parser.add_argument("--device", default=None, help="benchmark the torch scorer on this device (cuda, cuda:N, cpu) in one "
                        "process, against a careful transformers user: docs/s and MFU (bench/gpu.py; default: every CPU backend)")
    parser.add_argument("--render", default=None, metavar="BENCH_JSON",
                        help="measure nothing: rewrite the Markdown table and plots beside an existing bench.json")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    overrides: dict[str, Any] = {}
    for arg, name in (("model", "model"), ("onnx", "onnx"), ("openvino", "openvino"), ("gguf", "gguf"), ("out", "out_dir"), ("cache", "cache_dir"),
                      ("docs", "docs"), ("repeats", "repeats"), ("baseline_repeats", "baseline_repeats"), ("noreuse_repeats", "noreuse_repeats"),
                      ("threads", "threads"), ("layers", "num_layers")):
        if getattr(args, arg) is not None:
            overrides[name] = getattr(args, arg)
    if args.contenders:
        overrides["contenders"] = tuple(c.strip() for c in args.contenders.split(",") if c.strip())
    if args.no_curves:
        overrides["curves"] = False
    if args.budget_minutes is not None:
        overrides["budget_s"] = 60 * args.budget_minutes
    if args.quick:
        return BenchConfig.quick_preset(**overrides)
    return BenchConfig(**overrides)


def run(args: argparse.Namespace) -> int:
    from answerfirst.bench.report import write_report

    if args.device is not None:
        from answerfirst.bench import gpu

        return gpu.run(args)
    if args.render:
        source = Path(args.render)
        try:
            results = json.loads(source.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"--render {source}: not a readable bench.json ({e})") from None
        paths = write_report(results, source.parent)
    else:
        config = config_from_args(args)
        results = run_benchmark(config, progress=lambda message: print(message, flush=True))
        paths = write_report(results, config.out_dir)
    print(Path(paths["markdown"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
