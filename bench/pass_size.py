"""How the token budget of a pass (ScorerConfig.batch_tokens) changes one backend's time and memory on W.

    .venv/bin/python bench/pass_size.py artifacts/bench/exports/*/onnx --variant int8 --budgets 1024,4096,1024
    .venv/bin/python bench/pass_size.py artifacts/bench/exports/*/openvino --variant int8 --budgets 4096,1024
    .venv/bin/python bench/pass_size.py artifacts/bench/qwen3-0.6b-random --precision bf16 --budgets 4096,1024,2048

The model and workload are `make bench`'s: its cached exports of the random-weight Qwen3-0.6B and
workload W (32 documents of 64-192 tokens). For each budget, in the order given (repeat one to see
the drift of the machine), the script loads a Scorer, scores the first 4 documents as a warm-up,
then W twice with prefix reuse and once without (forget_prefixes() before each, as the benchmark
does), and prints the times, the prefix-reuse gain (no-reuse time over the faster reuse time) and
the process's VmRSS and VmHWM. Budgets run one after another in one process, so VmHWM only grows: read
VmRSS, or give one budget per run for a clean peak.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from openvino_memory import memory  # bench/, the script's own directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an export directory or a torch checkpoint (make bench caches both)")
    parser.add_argument("--variant", default=None, help="the export's variant (int8, fp32, ...)")
    parser.add_argument("--precision", default=None, help="a torch checkpoint's precision (fp32, bf16)")
    parser.add_argument("--budgets", default="4096,1024", help="comma-separated batch_tokens values, timed in this order")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import answerfirst
    from answerfirst.bench.workload import workload_w

    for budget in (int(b) for b in args.budgets.split(",")):
        scorer = answerfirst.load(args.model, variant=args.variant, precision=args.precision, threads=args.threads,
                                  config=answerfirst.ScorerConfig(batch_tokens=budget))
        w = workload_w(scorer.prompts)
        scorer.score(w.query, list(w.docs[:4]))
        no_reuse = answerfirst.Scorer(scorer.backend, scorer.prompts, replace(scorer.config, reuse_prefix=False), scorer.manifest)
        seconds = []
        for timed in (scorer, scorer, no_reuse):
            scorer.backend.forget_prefixes()
            start = time.perf_counter()
            timed.score(w.query, list(w.docs))
            seconds.append(time.perf_counter() - start)
        passes = len(scorer.plan(w.query, list(w.docs)).passes)
        print(f"batch_tokens {budget} ({passes} passes): reuse {seconds[0]:.2f}, {seconds[1]:.2f} s; no reuse {seconds[2]:.2f} s "
              f"(gain {seconds[2] / min(seconds[:2]):.2f}x)  {memory()}", flush=True)
        del scorer, no_reuse
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
