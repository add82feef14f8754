"""`answerfirst export openvino --model DIR --out DIR`: the scoring graph as OpenVINO IR, int8 weights.

    student checkpoint --trace (export/onnx.py: the same graph, inputs and outputs)--> fp32 ONNX (temporary)
        --OpenVINO reads it, the vocabulary head is put in FullyConnected form (vocabulary_head_on_weights),
          nncf compresses every linear weight to int8 (asymmetric, per output channel)-->
        score_int8.xml + score_int8.bin --parity vs torch fp32--> answerfirst.json (kind "openvino")

The runtime (runtime/_openvino.py) compiles the IR for the CPU it runs on: bf16 compute where the
CPU has AMX bf16 tiles, f32 with dynamic int8 activations elsewhere. Parity is measured on the
exporting machine, with the precision it picked (recorded in the report as `inference_precision`);
a CPU of the other kind computes in the other precision.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from answerfirst.artifact import Variant, checkpoint_hash
from answerfirst.export.onnx import (
    INT8_THRESHOLDS,
    OPSET,
    check_architecture,
    check_inputs,
    export_graph,
    graph_metadata,
    release_memory,
    write_manifest,
)
from answerfirst.export.parity import log_report, measure, summary
from answerfirst.extras import missing_extra
from answerfirst.runtime import Scorer, ScorerConfig
from answerfirst.runtime._openvino import OpenVinoBackend, graph_files, import_openvino, open_graph

logger = logging.getLogger(__name__)

INT8_FILE = "score_int8.xml"
# int8 weights plus the CPU's compute precision (bf16 on AMX). Measured: a random-weight Qwen3-0.6B
# (20 probe pairs; Sapphire Rapids-class Xeon, bf16) max |dp| 1.5e-2, Spearman 0.96, agreement 1.0,
# where onnxruntime's int8 measured 1.2e-2 / 0.95 / 1.0 on the same pairs; the tiny test model 2e-3.
# The bounds are onnxruntime int8's, imported from export/onnx.py (a learned student's healthy int8
# error is ten times a random model's, broken exports measure >= 0.92): both engines share that budget.


def export_openvino(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    probe_pairs: Sequence[tuple[str, str]] | None = None,
    threads: int | None = None,
) -> Any:
    """Export a student checkpoint to `out_dir` (IR, tokenizer, answerfirst.json); returns the manifest.
    probe_pairs: the pairs parity is measured on (default: the student's held-out probe pairs)."""
    ov = import_openvino()
    try:
        import nncf
    except ImportError as e:
        raise missing_extra("exporting to OpenVINO", "train", e) from None
    from answerfirst.runtime import load

    model_dir, out = Path(model_dir), Path(out_dir)
    student_manifest, pairs = check_inputs(model_dir, out, probe_pairs)
    started = time.perf_counter()
    reference = load(model_dir, backend="torch", threads=threads)
    model, prompts = reference.backend.model, reference.prompts
    check_architecture(model)
    sha = checkpoint_hash(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "answerfirst.json").unlink(missing_ok=True)  # no manifest until every file it names is complete
    metadata = {**graph_metadata(model, prompts.grade_ids, sha), "answerfirst.quantization": "int8-weights"}
    logger.info("export openvino: scoring %d probe pairs with torch (the reference)", len(pairs))
    ref_scores = reference.score_pairs(pairs)

    int8_path = out / INT8_FILE
    with tempfile.TemporaryDirectory(dir=out, prefix=".trace-") as work:
        logger.info("export openvino: tracing the graph")
        export_graph(model, prompts.grade_ids, Path(work) / "graph.onnx", OPSET, metadata)
        del reference, model
        release_memory()
        logger.info("export openvino: compressing the weights to int8 (nncf) and writing %s", int8_path.name)
        graph = ov.Core().read_model(str(Path(work) / "graph.onnx"))
        vocabulary_head_on_weights(graph)
        graph = nncf.compress_weights(graph, mode=nncf.CompressWeightsMode.INT8_ASYM)
        ov.save_model(graph, str(int8_path), compress_to_fp16=False)
        del graph
        release_memory()

    logger.info("export openvino: scoring the probe pairs with the IR")
    compiled = open_graph(int8_path, threads)
    scorer = Scorer(OpenVinoBackend(compiled, prompts.pad_id, str(int8_path)), prompts, ScorerConfig(), None)
    report = measure(ref_scores, lambda: scorer.score_pairs(pairs), INT8_THRESHOLDS)
    report["inference_precision"] = compiled.precision
    log_report("openvino int8", report)
    info: dict[str, Any] = {
        "exporter": "torch.onnx (TorchScript) -> OpenVINO IR", "openvino": ov.__version__, "nncf": nncf.__version__,
        "weights": "int8, asymmetric, per output channel (nncf INT8_ASYM); embedding and grade head included",
        "export_seconds": round(time.perf_counter() - started, 1),
    }
    variants = [Variant("int8", INT8_FILE, "int8-weights", report)]
    return write_manifest(out, model_dir, sha, prompts, variants, info, pairs, student_manifest, kind="openvino",
                          files=lambda file: graph_files(out / file))


def vocabulary_head_on_weights(graph: Any) -> None:
    """Turn the next-token head, traced as (V, H) embedding @ (H, M) rows, then transposed (the form
    that keeps onnxruntime to one copy of the tied embedding, export/onnx.py), into (M, H) rows @
    (V, H)ᵀ: a MatMul on constant transposed weights, which OpenVINO's CPU plugin runs as a
    FullyConnected on the int8 weights. In the traced form the plugin decompresses the whole int8
    embedding for that MatMul and keeps the result beside the int8 table: on the random Qwen3-0.6B,
    RSS after load 1.07 GB against 0.31 GB rewritten, and after a query of 32 W-like documents 3.54
    GB against 2.76 GB (bench/openvino_head.py). The graph must hold exactly one such head."""
    heads = []
    for op in graph.get_ordered_ops():
        if op.get_type_name() != "MatMul" or any(op.get_attributes().values()):
            continue
        weights, rows = (op.input_value(i).get_node() for i in (0, 1))
        consumers = [target.get_node() for target in op.output(0).get_target_inputs()]
        if (weights.get_type_name() == "Constant" and rows.get_type_name() == "Transpose" and consumers
                and all(c.get_type_name() == "Transpose" for c in consumers)
                and all(n.get_output_partial_shape(0).rank.get_length() == 2 for n in (weights, rows, *consumers))):
            heads.append((op, rows, consumers))
    if len(heads) != 1:
        raise RuntimeError(f"expected one vocabulary head (embedding @ transposed rows) in the traced graph, found {len(heads)}")
    ov = import_openvino()
    op, rows, consumers = heads[0]
    head = ov.opset13.matmul(rows.input_value(0), op.input_value(0), False, True)  # (M, H) @ (V, H)ᵀ = (M, V)
    for transposed in consumers:  # each gave (V, M)ᵀ = (M, V): the same values
        transposed.output(0).replace(head.output(0))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="student checkpoint directory (e.g. artifacts/student)")
    parser.add_argument("--out", required=True, help="export directory (e.g. artifacts/openvino)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for parity scoring")


def run(args: argparse.Namespace) -> int:
    manifest = export_openvino(args.model, args.out, threads=args.threads)
    print(f"wrote {args.out}")
    for v in manifest.variants:
        p = v.parity or {}
        status = "passed" if v.parity_passed else "FAILED: " + "; ".join(p.get("failures", []))
        print(f"  {v.name:5s} {v.file:18s} {summary(p)} ({p.get('inference_precision')})  parity {status}")
    return 0 if any(v.parity_passed for v in manifest.variants) else 1


__all__ = ["INT8_THRESHOLDS", "export_openvino"]
