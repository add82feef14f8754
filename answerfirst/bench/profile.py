"""Where an ONNX scoring call spends its time: `answerfirst profile --model DIR [--variant int8]`.

One scoring call over the benchmark's workload (its query, documents of 64-192 tokens) runs with
onnxruntime's per-kernel profiler on, after a warm-up call that is left out of the result. Kernel
time is summed per operator type, so a missed latency target can be traced to the matmuls, to the
quantize / cast work around them, or to the attention and norm ops in between.
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


def kernel_time_by_op(events: Iterable[dict[str, Any]], since_us: float = 0.0) -> list[dict[str, Any]]:
    """Kernel time per operator type from an onnxruntime profile (its JSON list of trace events),
    counting events that start at or after `since_us` (microseconds from the profile's start).
    Rows sorted by time, each {"op", "ms", "share", "calls"}; shares sum to 1."""
    micros: dict[str, float] = defaultdict(float)
    calls: Counter[str] = Counter()
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith(KERNEL_SUFFIX):
            continue
        if float(event.get("ts", 0)) < since_us:
            continue
        op = event.get("args", {}).get("op_name", "?")
        micros[op] += float(event.get("dur", 0))
        calls[op] += 1
    total = sum(micros.values())
    rows = [{"op": op, "ms": us / 1e3, "share": us / total if total else 0.0, "calls": calls[op]} for op, us in micros.items()]
    return sorted(rows, key=lambda row: -row["ms"])


def profile_onnx(
    path: str | Path, variant: str | None = None, docs: int = 16, threads: int | None = None, seed: int = 0,
    warmup_docs: int = 2,
) -> dict[str, Any]:
    """Profile one `score(query, docs)` call of an ONNX export (prefix run included, as in a real query)."""
    import answerfirst
    from answerfirst.artifact import ManifestError
    from answerfirst.bench.workload import workload_w
    from answerfirst.runtime._onnx import OnnxBackend, open_session, prepacks

    path = Path(path)
    loaded = answerfirst.load(path, threads=threads, variant=variant)
    if loaded.backend.name != "onnx":
        raise ManifestError(f"{path} is a {loaded.backend.name} artifact; profile reads ONNX exports")
    chosen = loaded.manifest.variant(variant)
    prompts, config, manifest = loaded.prompts, loaded.config, loaded.manifest
    del loaded  # its session: the profiled one below replaces it
    workload = workload_w(prompts, docs, seed=seed)

    with tempfile.TemporaryDirectory() as tmp:
        graph = path / chosen.file
        session = open_session(graph, threads, prepacks(chosen), profile_prefix=str(Path(tmp) / "ort"))
        scorer = answerfirst.Scorer(OnnxBackend(session, prompts.pad_id, where=str(graph)), prompts, config, manifest)
        scorer.score(workload.query, workload.docs[:warmup_docs])
        scorer.backend.forget_prefixes()  # the profiled call runs its prefix, as a new query would
        # onnxruntime stamps events from its start time on the system clock (std::chrono's
        # high_resolution_clock is system_clock in libstdc++), whatever its docstring says.
        started_ns = time.time_ns()
        started = time.perf_counter()
        scorer.score(workload.query, workload.docs)
        wall = time.perf_counter() - started
        events = json.loads(Path(session.end_profiling()).read_text())
    since_us = (started_ns - session.get_profiling_start_time_ns()) / 1e3
    ops = kernel_time_by_op(events, since_us)
    runs = sum(1 for e in events if e.get("name") == "model_run" and float(e.get("ts", 0)) >= since_us)
    return {
        "model": str(path),
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
        f"Profile of {profile['model']} ({profile['variant']}, {profile['quantization'] or 'fp32'}): one query x "
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
    parser.add_argument("--model", required=True, help="an ONNX export dir (e.g. artifacts/bench/exports/*/onnx)")
    parser.add_argument("--variant", default=None, help="export variant (default: what load() picks)")
    parser.add_argument("--docs", type=int, default=16, help="documents in the profiled call (default 16)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    parser.add_argument("--json", default=None, help="also write the profile as JSON here")


def run(args: argparse.Namespace) -> int:
    if args.docs < 1:
        raise ValueError(f"--docs: must be >= 1, got {args.docs}")
    profile = profile_onnx(args.model, args.variant, docs=args.docs, threads=args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps(profile, indent=1))
    print(markdown(profile))
    return 0
