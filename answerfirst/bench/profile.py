"""Where an export's scoring time goes: `answerfirst profile --model DIR [--variant int8]`.

One scoring call over the benchmark's workload (its query, documents of 64-192 tokens) runs with the
engine's per-node profiler on, after a warm-up call that is left out of the result: onnxruntime's
profiler for an ONNX export, the CPU plugin's performance counters for an OpenVINO export (whose op
types name the kernel that ran them, e.g. "MatMul [brgemm_avx512_amx_bf16]"). Kernel time is summed
per operator type, so a missed latency target can be traced to the matmuls, to the quantize / cast
work around them, or to the attention and norm ops in between; wall time minus kernel time is what
runs between the nodes (the engine's scheduling, shape inference, Python).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

KERNEL_SUFFIX = "_kernel_time"  # onnxruntime names each node's kernel event "<node>_kernel_time"


def time_by_op(timings: Iterable[tuple[str, float]]) -> list[dict[str, Any]]:
    """(op, seconds) per executed node summed per op. Rows sorted by time, each {"op", "ms", "share",
    "calls"}; shares sum to 1."""
    seconds: dict[str, float] = defaultdict(float)
    calls: Counter[str] = Counter()
    for op, duration in timings:
        seconds[op] += duration
        calls[op] += 1
    total = sum(seconds.values())
    rows = [{"op": op, "ms": s * 1e3, "share": s / total if total else 0.0, "calls": calls[op]} for op, s in seconds.items()]
    return sorted(rows, key=lambda row: -row["ms"])


def kernel_time_by_op(events: Iterable[dict[str, Any]], since_us: float = 0.0) -> list[dict[str, Any]]:
    """time_by_op of an onnxruntime profile (its JSON list of trace events), counting the kernel events
    that start at or after `since_us` (microseconds from the profile's start)."""
    return time_by_op(
        (event.get("args", {}).get("op_name", "?"), float(event.get("dur", 0)) / 1e6)
        for event in events
        if event.get("cat") == "Node" and str(event.get("name", "")).endswith(KERNEL_SUFFIX)
        and float(event.get("ts", 0)) >= since_us
    )


def profile_export(
    path: str | Path, variant: str | None = None, docs: int = 16, threads: int | None = None, seed: int = 0,
    warmup_docs: int | None = None,
) -> dict[str, Any]:
    """Profile one `score(query, docs)` call of an ONNX or OpenVINO export (prefix run included, as in a
    real query), after a warm-up call on the first `warmup_docs` documents (None: all of them, so the
    profiled passes have shapes the engine has seen, as in `make bench`'s repeated queries: OpenVINO
    prepares its kernels for each new input shape: `--warmup-docs 2` shows what that costs)."""
    import answerfirst
    from answerfirst.artifact import ManifestError
    from answerfirst.bench.workload import workload_w

    path = Path(path)
    loaded = answerfirst.load(path, threads=threads, variant=variant)
    engine = loaded.backend.name
    if engine not in ("onnx", "openvino"):
        raise ManifestError(f"{path} is a {engine} artifact; profile reads ONNX and OpenVINO exports")
    chosen = loaded.manifest.variant(variant)
    prompts, config, manifest = loaded.prompts, loaded.config, loaded.manifest
    del loaded  # its session: the profiled one below replaces it
    workload = workload_w(prompts, docs, seed=seed)
    graph = path / chosen.file

    with tempfile.TemporaryDirectory() as tmp:
        if engine == "onnx":
            from answerfirst.runtime._onnx import OnnxBackend, open_session, prepacks

            session = open_session(graph, threads, prepacks(chosen), profile_prefix=str(Path(tmp) / "ort"))
            backend = OnnxBackend(session, prompts.pad_id, where=str(graph))
        else:
            from answerfirst.runtime._openvino import OpenVinoBackend, open_graph

            session = open_graph(graph, threads, profile=True)
            backend = OpenVinoBackend(session, prompts.pad_id, str(graph))
        scorer = answerfirst.Scorer(backend, prompts, config, manifest)
        scorer.score(workload.query, workload.docs[:warmup_docs])  # [:None]: all
        backend.forget_prefixes()  # the profiled call runs its prefix, as a new query would
        if engine == "openvino":
            session.kernel_times.clear()
            session.runs = 0
        # onnxruntime stamps events from its start time on the system clock (std::chrono's
        # high_resolution_clock is system_clock in libstdc++), whatever its docstring says.
        started_ns = time.time_ns()
        started = time.perf_counter()
        scorer.score(workload.query, workload.docs)
        wall = time.perf_counter() - started
        if engine == "onnx":
            events = json.loads(Path(session.end_profiling()).read_text())
            since_us = (started_ns - session.get_profiling_start_time_ns()) / 1e3
            ops = kernel_time_by_op(events, since_us)
            runs = sum(1 for e in events if e.get("name") == "model_run" and float(e.get("ts", 0)) >= since_us)
        else:
            ops, runs = time_by_op(session.kernel_times), session.runs
    return {
        "model": str(path),
        "engine": engine,
        "variant": chosen.name,
        "quantization": chosen.quantization,
        "threads": threads,
        "workload": {k: v for k, v in workload.describe().items() if k != "doc_tokens"},
        "session_runs": runs,  # the prefix, then one per batch of documents
        "wall_seconds": wall,
        "kernel_seconds": sum(row["ms"] for row in ops) / 1e3,
        "ops": ops,
    }


def markdown(profile: dict[str, Any], top: int = 12) -> str:
    w = profile["workload"]
    lines = [
        f"Profile of {profile['model']} ({profile['engine']}, {profile['variant']}, {profile['quantization'] or 'fp32'}): one query x "
        f"{w['documents']} documents ({w['tokens_per_query_with_prefix_reuse']} tokens with prefix reuse), "
        f"{profile['session_runs']} session runs, wall {profile['wall_seconds']:.2f} s, kernels {profile['kernel_seconds']:.2f} s",
        "",
        "| op type | ms | share | calls |",
        "|---|---:|---:|---:|",
    ]
    ops = profile["ops"]
    for row in ops[:top]:
        lines.append(f"| {row['op']} | {row['ms']:.0f} | {100 * row['share']:.1f}% | {row['calls']} |")
    if len(ops) > top:
        rest = ops[top:]
        lines.append(f"| {len(rest)} other op types | {sum(r['ms'] for r in rest):.0f} | "
                     f"{100 * sum(r['share'] for r in rest):.1f}% | {sum(r['calls'] for r in rest)} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="an ONNX or OpenVINO export dir (e.g. artifacts/bench/exports/*/onnx)")
    parser.add_argument("--variant", default=None, help="export variant (default: what load() picks)")
    parser.add_argument("--docs", type=int, default=16, help="documents in the profiled call (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    parser.add_argument("--warmup-docs", type=int, default=None,
                        help="documents of the warm-up call (default: all, so the profiled shapes are warm)")
    parser.add_argument("--json", default=None, help="also write the profile as JSON here")


def run(args: argparse.Namespace) -> int:
    if args.docs < 1:
        raise ValueError(f"--docs: must be >= 1, got {args.docs}")
    if args.warmup_docs is not None and args.warmup_docs < 1:
        raise ValueError(f"--warmup-docs: must be >= 1, got {args.warmup_docs}")
    profile = profile_export(args.model, args.variant, docs=args.docs, threads=args.threads, warmup_docs=args.warmup_docs)
    if args.json:
        Path(args.json).write_text(json.dumps(profile, indent=1))
    print(markdown(profile))
    return 0
