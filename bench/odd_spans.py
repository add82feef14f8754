"""Why OpenVinoBackend pads its attention spans to an even number of tokens (runtime/_common.py: right_padded).

    .venv/bin/python bench/odd_spans.py artifacts/bench/exports/*/openvino
    .venv/bin/python bench/odd_spans.py artifacts/bench/exports/*/openvino --variant int8 --repeats 5
    .venv/bin/python bench/odd_spans.py artifacts/bench/exports/*/onnx --variant int8   # onnxruntime, for comparison

First the kernel: attention's probabilities @ V as the scoring graph computes it against the prefix,
(3, 8, 2, 156, P) @ (1, 8, 1, P, 128), compiled alone by the CPU plugin under the backend's settings
(runtime/_openvino.py: compile_config), for prefix lengths P around W's; the plugin's own time for the
MatMul is printed. Then the export on workload W (one query x 32 documents, as `make bench` builds
it), timed with even_spans off and on, interleaved, and the largest difference of their expected
grades. On a CPU where the plugin computes in f32 the backend leaves even_spans off; an ONNX export
(onnxruntime, even_spans off by default) is timed the same way, to show what the split does there.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np


def matmul_ms(prefix: int, repeats: int = 20) -> float:
    """The CPU plugin's time (ms, median) for (3, 8, 2, 156, prefix) @ (1, 8, 1, prefix, 128)."""
    import openvino as ov
    from openvino import opset13 as ops

    from answerfirst.runtime._cpu import features
    from answerfirst.runtime._openvino import compile_config

    probs = ops.parameter([3, 8, 2, 156, prefix], ov.Type.f32, name="probs")
    values = ops.parameter([1, 8, prefix, 128], ov.Type.f32, name="values")
    out = ops.matmul(probs, ops.unsqueeze(values, ops.constant(np.array([2], np.int64))), False, False)
    compiled = ov.Core().compile_model(ov.Model([out], [probs, values]), "CPU", {**compile_config(None, features()), "PERF_COUNT": "YES"})
    request = compiled.create_infer_request()
    rng = np.random.default_rng(0)
    feed = [rng.random((3, 8, 2, 156, prefix), np.float32), rng.standard_normal((1, 8, prefix, 128), np.float32)]
    times = []
    for _ in range(repeats):
        request.infer(feed)
        times.append(sum(p.real_time.total_seconds() for p in request.profiling_info if p.node_type == "MatMul"))
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", help="an OpenVINO (or ONNX) export directory (make bench caches them)")
    parser.add_argument("--variant", default="int8-static")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed W queries per setting")
    args = parser.parse_args(argv)

    from export_ab import timed_query, times

    import answerfirst
    from answerfirst.bench.workload import workload_w

    scorer = answerfirst.load(args.export, variant=args.variant, threads=args.threads)
    compute = getattr(scorer.backend.session, "precision", "onnxruntime's")
    print(f"{args.export} {args.variant}: compute {compute}, even_spans {scorer.backend.even_spans}")
    for prefix in (124, 125, 126, 127, 128, 150, 155):
        print(f"probabilities @ V, prefix {prefix}: {matmul_ms(prefix):.2f} ms")

    workload = workload_w(scorer.prompts)
    print(f"W: prefix {workload.prefix_tokens} tokens, {len(workload.docs)} documents")
    seconds: dict[bool, list[float]] = {False: [], True: []}
    expected: dict[bool, np.ndarray] = {}
    for even in (False, True):  # warm-up: each setting's shapes, as make bench's repeated queries
        scorer.backend.even_spans = even
        scorer.score(workload.query, workload.docs)
    for _ in range(args.repeats):
        for even in (False, True):
            scorer.backend.even_spans = even
            elapsed, expected[even] = timed_query(scorer, workload)
            seconds[even].append(elapsed)
    for even in (False, True):
        print(f"even_spans {str(even):5}: {times(seconds[even])}")
    print(f"largest difference of expected grades: {np.abs(expected[True] - expected[False]).max():.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
