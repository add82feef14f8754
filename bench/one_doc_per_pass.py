"""What one document per forward pass costs the ONNX int8 graph on workload W.

    answerfirst export onnx --model artifacts/bench/qwen3-0.6b-random --out artifacts/bench/serve-onnx   # once
    .venv/bin/python bench/one_doc_per_pass.py artifacts/bench/serve-onnx

onnxruntime's GroupQueryAttention kernel on a CPU continues a past (the shared prefix KV) for one
sequence per run only, so a graph built on it would score W one document per pass. This times
today's graph both ways on W (bench/workload.py: workload_w): passes of 4096 prompt tokens, up to
16 documents (the CPU default when README's figure was measured; the graph's default is now 1024,
README "Pass size on a CPU") and passes of one (ScorerConfig.batch_size=1), interleaved twice, each
the best of two queries after a warm-up. The difference is what the faster attention kernel would have to win
back (README, "Levers").
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="an ONNX export of the Qwen3-0.6B shape (e.g. artifacts/bench/serve-onnx)")
    args = parser.parse_args(argv)

    import answerfirst
    from answerfirst.bench.workload import workload_w
    from answerfirst.runtime.api import ScorerConfig

    w = workload_w(answerfirst.load(args.export, variant="int8").prompts)
    docs = list(w.docs)
    for batch_size in (None, 1, None, 1):
        scorer = answerfirst.load(args.export, variant="int8", config=ScorerConfig(batch_tokens=4096, batch_size=batch_size))
        scorer.score("warm up", docs[:2])
        best = float("inf")
        for _ in range(2):
            scorer.backend.forget_prefixes()
            start = time.perf_counter()
            scorer.score(w.query, docs)
            best = min(best, time.perf_counter() - start)
        print(f"documents per pass {'up to 16' if batch_size is None else batch_size}: {best:.2f} s per W query", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
