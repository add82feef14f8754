"""Two exports of the same model on workload W, interleaved: what a change to the exported graph buys.

    .venv/bin/python bench/export_ab.py OLD_EXPORT NEW_EXPORT --variant int8-static

Both are loaded in this process (their compile settings from the backend), then each scores W
(one query x 32 documents, as `make bench` builds it; two seeds alternating) in turn, `--rounds`
times, each query computing its prefix. Prints the median and every time per export, and the
largest difference of their expected grades on the last query.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def timed_query(scorer, workload) -> tuple[float, np.ndarray]:
    """Score W as a new query (its prefix computed, as in make bench): seconds, expected grades."""
    scorer.backend.forget_prefixes()
    started = time.perf_counter()
    scores = scorer.score(workload.query, workload.docs)
    return time.perf_counter() - started, np.array([s.expected for s in scores])


def times(seconds: list[float]) -> str:
    return f"W in {statistics.median(seconds):.2f} s (median; {', '.join(f'{s:.2f}' for s in seconds)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old", help="an export directory (ONNX or OpenVINO)")
    parser.add_argument("new", help="an export of the same model, from the changed exporter")
    parser.add_argument("--variant", default=None, help="the variant both run (default: what load() picks)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args(argv)

    import answerfirst
    from answerfirst.bench.workload import workload_w

    scorers = {name: answerfirst.load(path, variant=args.variant, threads=args.threads)
               for name, path in (("old", args.old), ("new", args.new))}
    loads = [workload_w(scorers["old"].prompts, seed=seed) for seed in (0, 1)]
    for scorer in scorers.values():  # warm-up: both seeds' shapes, as make bench's repeated queries
        for workload in loads:
            scorer.score(workload.query, workload.docs)
    seconds: dict[str, list[float]] = {name: [] for name in scorers}
    expected: dict[str, np.ndarray] = {}
    for round_ in range(args.rounds):
        workload = loads[round_ % 2]
        for name, scorer in scorers.items():
            elapsed, expected[name] = timed_query(scorer, workload)
            seconds[name].append(elapsed)
    for name, path in (("old", args.old), ("new", args.new)):
        print(f"{name} {path}: {times(seconds[name])}")
    print(f"largest difference of expected grades: {np.abs(expected['new'] - expected['old']).max():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
