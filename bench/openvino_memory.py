"""Peak memory of an OpenVINO export while it scores, under the CPU plugin's settings.

    .venv/bin/python bench/openvino_memory.py artifacts/bench/exports/*/openvino
    .venv/bin/python bench/openvino_memory.py artifacts/bench/exports/*/openvino --batch-tokens 4096
    .venv/bin/python bench/openvino_memory.py artifacts/bench/exports/*/openvino --variant int8-static --constants
    .venv/bin/python bench/openvino_memory.py artifacts/bench/exports/*/openvino --set '{"INFERENCE_PRECISION_HINT": "f32"}'
    .venv/bin/python bench/openvino_memory.py artifacts/bench/exports/*/openvino --variant int8-static --bench-sequence
    .venv/bin/python bench/openvino_memory.py artifacts/bench/exports/*/openvino --variant int8-static --bench-sequence --without pin

Loads the export's int8 variant, or --variant's (its compile settings from runtime/_openvino.py: compile_config, with
--set's entries on top), then scores one document and two queries of 32 product-word documents
(bench/fused_kernels.py's `documents`), and prints this process's VmHWM (peak RSS) and VmRSS, with
its anonymous and file-backed parts, after the load and after each call. The documents are 50-149
words each (W-like in size, not W). Run one setting per process: the peak never comes down.
--constants also lists the compiled model's constants of over 50 MB and the constants' total size
per precision, as the CPU plugin holds them after the compile. --bench-sequence scores what one
`make bench` worker scores instead, in its order: the warm-up (W's first 4 documents with prefix
reuse, then without), then W with reuse and W without, each call timed. --without leaves out one of
the backend's two memory steps (runtime/_memory.py), to measure what it saves: `pin` (glibc's mmap
threshold is left free to rise) or `release` (the weight file's pages stay mapped after the first
inference).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path


def memory() -> str:
    """Peak and current RSS, the current split into anonymous memory and mapped file pages."""
    lines = Path("/proc/self/status").read_text().splitlines()
    fields = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
    return "  ".join(" ".join(line.split()) for line in lines if line.startswith(fields))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="an OpenVINO export directory (make bench caches one)")
    parser.add_argument("--set", default="{}", help="CPU plugin settings as JSON, on top of the backend's")
    parser.add_argument("--variant", default="int8", help="the export's variant (int8, int8-static)")
    parser.add_argument("--constants", action="store_true", help="list the compiled model's large constants")
    parser.add_argument("--batch-tokens", type=int, default=None, help="ScorerConfig.batch_tokens (default: the backend's, 1024 on a CPU)")
    parser.add_argument("--bench-sequence", action="store_true", help="score make bench's sequence of calls on W instead")
    parser.add_argument("--without", action="append", choices=("pin", "release"), default=[],
                        help="leave out a memory step of the backend (repeatable)")
    args = parser.parse_args(argv)

    import answerfirst
    from answerfirst.runtime import _openvino
    from answerfirst.runtime.api import ScorerConfig

    extra = json.loads(args.set)
    backend_config = _openvino.compile_config
    _openvino.compile_config = lambda threads, cpu: {**backend_config(threads, cpu), **extra}
    if "pin" in args.without:
        _openvino.pin_mmap_threshold = lambda: False
    scorer = answerfirst.load(args.export, variant=args.variant, config=ScorerConfig(batch_tokens=args.batch_tokens))
    if "release" in args.without:
        scorer.backend.session.mapped = []
    if args.constants:
        print_constants(scorer.backend.session.compiled)
    label = f"variant {args.variant}, settings {extra}, without {args.without or 'nothing'}"
    if args.bench_sequence:
        score_bench_sequence(scorer, label)
    else:
        score_two_queries(scorer, label)
    return 0


BYTES = {"f32": 4, "i32": 4, "i64": 8, "bf16": 2, "f16": 2, "i8": 1, "u8": 1, "boolean": 1}


def print_constants(compiled) -> None:
    """The compiled model's constants (its runtime graph's Const nodes) of over 50 MB, and the total
    per precision."""
    from answerfirst.runtime._openvino import compiled_layers

    totals: dict[str, float] = {}
    for layer in compiled_layers(compiled):
        if layer.kind != "Const" or layer.shape is None:
            continue
        megabytes = math.prod(layer.shape) * BYTES.get(layer.precision, 4) / 1e6
        totals[layer.precision] = totals.get(layer.precision, 0.0) + megabytes
        if megabytes > 50:
            print(f"constant {layer.name} {list(layer.shape)} {layer.precision}: {megabytes:.0f} MB")
    print("constants per precision: " + ", ".join(f"{p} {mb:.0f} MB" for p, mb in sorted(totals.items()) if mb >= 1))


def score_two_queries(scorer, label: str) -> None:
    """Print the memory after the load and after a one-document query (what the first inference
    allocates whatever the pass), then score two queries of 32 W-like documents and print each one's
    time and the memory after it."""
    from fused_kernels import documents

    print(f"{label}, batch_tokens {scorer.config.batch_tokens}; loaded: {memory()}")
    start = time.perf_counter()
    scorer.score("one document", ["a grey power bank"])
    print(f"one document: {time.perf_counter() - start:.1f} s  {memory()}")
    docs = documents(words=(50, 150))
    for q in range(2):
        start = time.perf_counter()
        scorer.score(f"query {q} grey power bank", docs)
        print(f"query {q}: {time.perf_counter() - start:.1f} s  {memory()}")


def score_bench_sequence(scorer, label: str) -> None:
    """The calls one `make bench` worker makes on W (answerfirst/bench/runner.py: its warm-up, then
    the timed queries), each a new query (its prefix computed), with the memory after each."""
    import answerfirst
    from answerfirst.bench.runner import BenchConfig
    from answerfirst.bench.workload import workload_w

    workload = workload_w(scorer.prompts)
    warm = workload.head(BenchConfig().warmup_docs)
    no_reuse = answerfirst.Scorer(scorer.backend, scorer.prompts, replace(scorer.config, reuse_prefix=False), scorer.manifest)
    print(f"{label}, batch_tokens {scorer.config.batch_tokens}; loaded: {memory()}")
    for name, load, mode in (("warm-up", warm, scorer), ("warm-up", warm, no_reuse), ("W", workload, scorer), ("W", workload, no_reuse)):
        scorer.backend.forget_prefixes()
        start = time.perf_counter()
        mode.score(load.query, load.docs)
        reuse = "reuse" if mode is scorer else "no reuse"
        print(f"{name} ({len(load.docs)} documents, {reuse}): {time.perf_counter() - start:.1f} s  {memory()}")


if __name__ == "__main__":
    raise SystemExit(main())
