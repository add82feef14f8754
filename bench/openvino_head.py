"""What the OpenVINO export's form of the next-token head does to memory: build an int8 IR, then measure it.

    .venv/bin/python bench/openvino_head.py build artifacts/bench/exports/*/onnx /tmp/head-traced.xml --head traced
    .venv/bin/python bench/openvino_head.py build artifacts/bench/exports/*/onnx /tmp/head-rows.xml --head rows
    .venv/bin/python bench/openvino_head.py measure /tmp/head-traced.xml artifacts/bench/exports/*/openvino
    .venv/bin/python bench/openvino_head.py measure /tmp/head-rows.xml artifacts/bench/exports/*/openvino

`build` reads an ONNX export's fp32 graph (the graph `answerfirst export openvino` traces), leaves
the vocabulary head as traced (`--head traced`: the embedding @ rowsᵀ) or rewrites it as
`answerfirst export openvino` does (`--head rows`: export/openvino.py, vocabulary_head_on_weights),
optionally stores every other 2-D weight pre-transposed (`--transposed-weights`), compresses the
weights as the export does (nncf INT8_ASYM) and writes the IR. `measure` opens an IR with the
runtime's compile settings and the tokenizer and format of an export of the same model, scores two
queries of 32 W-like documents (bench/fused_kernels.py's `documents`, 50-149 words) and prints
VmRSS and VmHWM after the load and after each query. Measure one IR per process.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def build(onnx_dir: Path, out: Path, head: str, transposed_weights: bool) -> None:
    import nncf
    import numpy as np
    import openvino as ov

    from answerfirst.export.openvino import vocabulary_head_on_weights

    graph = ov.Core().read_model(str(onnx_dir / "score_fp32.onnx"))
    if head == "rows":
        vocabulary_head_on_weights(graph)
    if transposed_weights:
        for op in graph.get_ordered_ops():
            if op.get_type_name() != "MatMul":
                continue
            weights, attributes = op.input_value(1).get_node(), op.get_attributes()
            if weights.get_type_name() == "Constant" and len(weights.get_output_shape(0)) == 2 and not attributes["transpose_b"]:
                transposed = ov.opset13.constant(np.ascontiguousarray(weights.get_data().T))
                op.output(0).replace(ov.opset13.matmul(op.input_value(0), transposed, attributes["transpose_a"], True).output(0))
    graph = nncf.compress_weights(graph, mode=nncf.CompressWeightsMode.INT8_ASYM)
    ov.save_model(graph, str(out), compress_to_fp16=False)
    print(f"wrote {out} (head {head}{', weights pre-transposed' if transposed_weights else ''})")


def measure(ir: Path, export_dir: Path, batch_tokens: int | None) -> None:
    from openvino_memory import score_two_queries

    from answerfirst.artifact import Manifest, bind_format
    from answerfirst.export.openvino import ir_scorer
    from answerfirst.runtime import ScorerConfig
    from answerfirst.runtime._openvino import open_graph
    from answerfirst.runtime._tokenizer import ArtifactTokenizer

    prompts = bind_format(ArtifactTokenizer.from_dir(export_dir), Manifest.read(export_dir), str(export_dir), None)
    score_two_queries(ir_scorer(open_graph(ir, None), prompts, ir, ScorerConfig(batch_tokens=batch_tokens)), str(ir))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("build", help="write an int8 IR from an ONNX export's fp32 graph")
    make.add_argument("onnx_export", type=Path)
    make.add_argument("out", type=Path, help="the .xml to write (its .bin beside it)")
    make.add_argument("--head", choices=["traced", "rows"], required=True)
    make.add_argument("--transposed-weights", action="store_true")
    run = commands.add_parser("measure", help="the memory of scoring with an IR")
    run.add_argument("ir", type=Path)
    run.add_argument("export", type=Path, help="an OpenVINO or ONNX export of the same model (tokenizer and format)")
    run.add_argument("--batch-tokens", type=int, default=4096)
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.onnx_export, args.out, args.head, args.transposed_weights)
    else:
        measure(args.ir, args.export, args.batch_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
