"""What the torch backend's fused kernels (runtime/_torch.py: FusedKernels) buy, on this machine.

    .venv/bin/python bench/fused_kernels.py                      # bf16: fused vs eager, with and without prefix reuse
    .venv/bin/python bench/fused_kernels.py --precision fp32     # the same in fp32
    .venv/bin/python bench/fused_kernels.py --profile            # torch.profiler: where eager bf16 spends a query
    .venv/bin/python bench/fused_kernels.py --kernel             # one RMSNorm over q, eager vs compiled

The model is `make bench`'s random-weight Qwen3-0.6B (artifacts/bench/qwen3-0.6b-random; latency does
not depend on weight values). The documents are 32 product-word strings of 40-129 words (seed 0),
W-like in size: they are not W itself, whose timings `make bench` reports. Each setting loads its own
Scorer, scores two warm-up queries, then three timed queries (forget_prefixes() before each, as the
benchmark does), and prints the three times and the best. The settings run one after another in one
process, so compare them within one run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

WORDS = (
    "grey nylon power bank leather boots waterproof coffee grinder steel blue red small large wireless charger usb "
    "cable fast"
).split()


def documents(count: int = 32, seed: int = 0, words: tuple[int, int] = (40, 130)) -> list[str]:
    """`count` strings of product words, each of words[0] to words[1] - 1 words."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(*words)))) for _ in range(count)]


def timed(model: str, precision: str, fused: bool, reuse: bool, docs: list[str]) -> list[float]:
    import answerfirst
    from answerfirst.runtime.api import ScorerConfig

    scorer = answerfirst.load(model, precision=precision, config=ScorerConfig(fused_kernels=fused, reuse_prefix=reuse))
    scorer.score("warm up", docs)
    scorer.score("warm up again", docs)
    seconds = []
    for i in range(3):
        scorer.backend.forget_prefixes()
        start = time.perf_counter()
        scorer.score(f"q{i} grey power bank", docs)
        seconds.append(time.perf_counter() - start)
    return seconds


def profile(model: str, docs: list[str]) -> None:
    import torch
    from torch.profiler import ProfilerActivity

    import answerfirst
    from answerfirst.runtime.api import ScorerConfig

    scorer = answerfirst.load(model, precision="bf16", config=ScorerConfig(fused_kernels=False))
    scorer.score("warm up", docs)
    scorer.backend.forget_prefixes()
    with torch.profiler.profile(activities=[ProfilerActivity.CPU]) as trace:
        scorer.score("q9 grey power bank", docs)
    print(trace.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def kernel() -> None:
    """One RMSNorm over q of a 16-document pass (16 x 260 tokens x 16 heads = 66,560 rows of 128), bf16."""
    import torch

    from answerfirst.runtime._torch import _rms_norm

    torch.manual_seed(0)
    x, weight = torch.randn(66560, 128, dtype=torch.bfloat16), torch.randn(128, dtype=torch.bfloat16)
    compiled = torch.compile(_rms_norm, dynamic=True)
    for name, fn in (("eager", _rms_norm), ("compiled", compiled)):
        fn(x, weight, 1e-6)
        start = time.perf_counter()
        for _ in range(20):
            fn(x, weight, 1e-6)
        print(f"RMSNorm over q, {name}: {(time.perf_counter() - start) / 20 * 1e3:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="artifacts/bench/qwen3-0.6b-random", help="a torch checkpoint (make bench builds this one)")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's table for one eager bf16 query")
    parser.add_argument("--kernel", action="store_true", help="time one RMSNorm over q, eager and compiled")
    args = parser.parse_args(argv)
    docs = documents()
    if args.profile:
        profile(args.model, docs)
        return 0
    if args.kernel:
        kernel()
        return 0
    for reuse in (True, False):
        for fused in (True, False):
            seconds = timed(args.model, args.precision, fused, reuse, docs)
            print(f"{args.precision}, fused={fused}, prefix reuse={reuse}: "
                  f"{', '.join(f'{s:.2f}' for s in seconds)} s (best {min(seconds):.2f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
