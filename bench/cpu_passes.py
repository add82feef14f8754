"""What the token budget and the shared-prefix pass do on a CPU: time and memory of scoring W.

    .venv/bin/python bench/cpu_passes.py --model artifacts/bench/qwen3-0.6b-random [--docs 32] [--rounds 3]

Each configuration of the torch adapter scores workload W (1 query x --docs documents of 64-192
tokens) in its own process, so each peak RSS is its own:

    transformers-16docs   transformers' forward with a DynamicCache, passes of 16 documents (the former default)
    shared-prefix-16docs  the adapter's own pass, the same passes
    shared-prefix-N       the adapter's own pass, ScorerConfig(batch_tokens=N) for N in --budgets

Per configuration: the passes W is cut into, the RSS a call adds (VmHWM over the RSS before it), and
the wall and CPU seconds of a call (the median over --rounds calls after a warm-up; the processes run
one after another, round-robin, so a busy spell of a shared machine spreads over all of them). CPU
seconds are the process's own: on a busy machine they move less than wall seconds. Prints one
Markdown row per configuration. Nothing here is used at run time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def measure(model: str, name: str, docs: int, threads: int | None) -> dict:
    """One configuration, one call (in this process, after a warm-up): the worker side."""
    import torch

    import answerfirst
    from answerfirst.bench.worker import peak_rss_bytes, reset_peak_rss, rss_bytes
    from answerfirst.bench.workload import workload_w
    from answerfirst.runtime._torch import TorchBackend

    if threads:
        torch.set_num_threads(threads)
    loaded = answerfirst.load(model)
    prompts = loaded.prompts
    backend = loaded.backend
    if name.startswith("transformers"):
        backend = TorchBackend(backend.model, prompts.grade_ids, prompts.pad_id, backend.device, decoder_pass=False)
    budget = int(name.rsplit("-", 1)[1]) if not name.endswith("16docs") else None
    config = answerfirst.ScorerConfig(batch_tokens=budget or 10**9, batch_size=None if budget else 16)
    scorer = answerfirst.Scorer(backend, prompts, config, None)
    workload = workload_w(prompts, docs=docs)
    scorer.score(workload.query, workload.docs[:2])  # warm-up
    backend.forget_prefixes()
    before = rss_bytes()
    reset_peak_rss()
    wall, cpu = time.perf_counter(), time.process_time()
    scorer.score(workload.query, workload.docs)
    return {"name": name, "passes": [len(p.rows) for p in scorer.plan(workload.query, workload.docs).passes],
            "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
            "rss_growth_mib": (peak_rss_bytes() - before) / 2**20, "load": os.getloadavg()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--docs", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budgets", default="2048,4096,8192")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the worker side: one configuration
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.model, args.one, args.docs, args.threads)))
        return 0
    names = ["transformers-16docs", "shared-prefix-16docs", *(f"shared-prefix-{b}" for b in args.budgets.split(","))]
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        for name in names[round_index % len(names):] + names[: round_index % len(names)]:
            command = [sys.executable, __file__, "--model", args.model, "--docs", str(args.docs), "--one", name]
            if args.threads:
                command += ["--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_index + 1} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    print("| configuration | passes (documents) | wall s | CPU s | RSS a call adds, MiB | load average |")
    print("|---|---|---:|---:|---:|---:|")
    for name, results in runs.items():
        wall, cpu, rss = (float(np.median([r[key] for r in results])) for key in ("wall_s", "cpu_s", "rss_growth_mib"))
        loads = [r["load"] for r in results]
        print(f"| {name} | {results[0]['passes']} | {wall:.2f} | {cpu:.2f} | {rss:.0f} | {min(loads):.1f}-{max(loads):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
