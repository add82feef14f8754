"""`answerfirst export openvino --model DIR --out DIR [--calibration PAIRS.jsonl]`: the scoring graph as OpenVINO IR, int8.

    student checkpoint --trace (export/onnx.py: the same graph, inputs and outputs)--> fp32 ONNX (temporary)
        --OpenVINO reads it, the vocabulary head is put in FullyConnected form (vocabulary_head_on_weights),
          the attention mask in a form the int8 transformations keep (attention_mask_as_select)-->
        int8: nncf compresses every linear weight to int8 (asymmetric, per output channel)
              --> score_int8.xml + .bin
        int8-static: the linear layers' activations int8 too, their ranges measured by running the
              int8 IR on calibration pairs (nncf.quantize), the embedding looked up on its int8 rows
              (embedding_lookup_on_int8_rows) --> score_int8_static.xml + .bin
        --parity of each vs torch fp32--> answerfirst.json (kind "openvino"; int8-static listed first,
          so load() runs it where its parity passed, int8 elsewhere)

The runtime (runtime/_openvino.py) compiles the IR for the CPU it runs on: bf16 compute where the
CPU has AMX bf16 tiles, f32 with dynamic int8 activations elsewhere. Parity is measured on the
exporting machine, with the precision it picked (recorded in the report as `inference_precision`);
a CPU of the other kind computes in the other precision.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from answerfirst.artifact import Manifest, Variant, checkpoint_hash
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
from answerfirst.runtime._openvino import (
    CompiledGraph,
    OpenVinoBackend,
    graph_files,
    import_openvino,
    open_graph,
)

logger = logging.getLogger(__name__)

INT8_FILE = "score_int8.xml"
STATIC_FILE = "score_int8_static.xml"
# Calibration pairs for the static variant's activation ranges: 64 pairs are ~20 graph runs of the
# scoring schedule (prefix and document passes), measured enough on Qwen3-0.6B (export: 2-3 min).
CALIBRATION_PAIRS = 64
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
    calibration: str | os.PathLike[str] | Sequence[tuple[str, str]] | None = None,
    threads: int | None = None,
) -> Any:
    """Export a student checkpoint to `out_dir` (two IRs, tokenizer, answerfirst.json); returns the manifest.
    probe_pairs: the pairs parity is measured on (default: the student's held-out probe pairs).
    calibration: the pairs the static variant's activation ranges are measured on: (query, doc)
    pairs or a JSONL file of query/doc records (default: calibration_pairs says)."""
    ov = import_openvino()
    try:
        import nncf
    except ImportError as e:
        raise missing_extra("exporting to OpenVINO", "train", e) from None
    from answerfirst.runtime import load

    model_dir, out = Path(model_dir), Path(out_dir)
    student_manifest, pairs = check_inputs(model_dir, out, probe_pairs)
    calibration_set, calibration_source = calibration_pairs(calibration, student_manifest, pairs)
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

    int8_path, static_path = out / INT8_FILE, out / STATIC_FILE
    with tempfile.TemporaryDirectory(dir=out, prefix=".trace-") as work:
        logger.info("export openvino: tracing the graph")
        traced = Path(work) / "graph.onnx"
        export_graph(model, prompts.grade_ids, traced, OPSET, metadata)
        del reference, model
        release_memory()
        logger.info("export openvino: compressing the weights to int8 (nncf) and writing %s", int8_path.name)
        graph = nncf.compress_weights(scoring_graph(traced), mode=nncf.CompressWeightsMode.INT8_ASYM)
        ov.save_model(graph, str(int8_path), compress_to_fp16=False)
        del graph
        release_memory()
        logger.info("export openvino: recording the inputs of %d calibration pairs (%s)", len(calibration_set), calibration_source)
        feeds = calibration_feeds(int8_path, prompts, calibration_set, threads)
        logger.info("export openvino: static int8 (nncf.quantize on %d graph runs), writing %s", len(feeds), static_path.name)
        graph = static_int8(scoring_graph(traced), feeds)
        ov.save_model(graph, str(static_path), compress_to_fp16=False)
        del graph, feeds
        release_memory()

    variants = []
    for name, path, quantization in (("int8-static", static_path, "int8-static"), ("int8", int8_path, "int8-weights")):
        logger.info("export openvino: scoring the probe pairs with %s", path.name)
        compiled = open_graph(path, threads)
        report = measure(ref_scores, partial(ir_scorer(compiled, prompts, path).score_pairs, pairs), INT8_THRESHOLDS)
        report["inference_precision"] = compiled.precision
        log_report(f"openvino {name}", report)
        variants.append(Variant(name, path.name, quantization, report))
    info: dict[str, Any] = {
        "exporter": "torch.onnx (TorchScript) -> OpenVINO IR", "openvino": ov.__version__, "nncf": nncf.__version__,
        "weights": "int8, asymmetric, per output channel (nncf INT8_ASYM); embedding and grade head included",
        "static": "int8-static: the linear layers on int8 weights (per output channel) and int8 activations "
                  "(per tensor, ranges from the calibration pairs; nncf.quantize, SmoothQuant); attention, "
                  "the heads and the embedding as in int8",
        "calibration": {"source": calibration_source, "pairs": len(calibration_set)},
        "export_seconds": round(time.perf_counter() - started, 1),
    }
    return write_manifest(out, model_dir, sha, prompts, variants, info, pairs, student_manifest, kind="openvino",
                          files=lambda file: graph_files(out / file))


def scoring_graph(traced: Path, mask_as_select: bool = True) -> Any:
    """The traced fp32 graph, read by OpenVINO, in the forms its CPU plugin runs right and light
    (mask_as_select=False keeps the mask as traced: bench/openvino_mask.py measures why not to)."""
    graph = import_openvino().Core().read_model(str(traced))
    vocabulary_head_on_weights(graph)
    if mask_as_select:
        attention_mask_as_select(graph)
    return graph


def calibration_pairs(
    given: str | os.PathLike[str] | Sequence[tuple[str, str]] | None, student: Manifest | None, probe: list[tuple[str, str]]
) -> tuple[list[tuple[str, str]], str]:
    """At most CALIBRATION_PAIRS (query, doc) pairs, and where they came from: `given` (pairs, or a
    JSONL file of query/doc records, the train split where records name one); else the training data
    the student's manifest names, if that file is here; else the probe pairs, which parity is then
    measured on too (a warning says so)."""
    if given is not None and not isinstance(given, (str, os.PathLike)):
        return [(str(q), str(d)) for q, d in given][:CALIBRATION_PAIRS], "the given pairs"
    path = Path(given) if given is not None else None
    if path is None and student is not None and student.info.get("training_data"):
        training = Path(student.info["training_data"])
        path = training if training.is_file() else None
    if path is None:
        logger.warning("export openvino: no calibration data (pass --calibration PAIRS.jsonl); the static variant's "
                       "activation ranges come from the probe pairs, the pairs its parity is measured on")
        return list(probe)[:CALIBRATION_PAIRS], "the probe pairs"
    pairs = []
    try:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("query"), str) or not isinstance(record.get("doc"), str):
                raise ValueError(f"line {number} is not a record with string 'query' and 'doc'")
            if record.get("split", "train") == "train":
                pairs.append((record["query"], record["doc"]))
            if len(pairs) == CALIBRATION_PAIRS:
                break
    except (OSError, UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"calibration data {path}: {e}") from None
    if not pairs:
        raise ValueError(f"calibration data {path}: no train-split query/doc records")
    return pairs, str(path)


class _RecordingGraph:
    """A compiled graph that keeps a copy of every input it is run on."""

    def __init__(self, graph: CompiledGraph):
        self.graph, self.feeds = graph, []

    def run(self, names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.feeds.append({name: value.copy() for name, value in feeds.items()})
        return self.graph.run(names, feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.graph, name)


def ir_scorer(graph: Any, prompts: Any, ir: Path, config: ScorerConfig | None = None) -> Scorer:
    """A Scorer over one compiled IR (`open_graph(ir, threads)`), outside an export's manifest: the
    export's parity and calibration runs, the bench scripts that compare IRs."""
    return Scorer(OpenVinoBackend(graph, prompts.pad_id, str(ir)), prompts, config or ScorerConfig(), None)


def calibration_feeds(ir: Path, prompts: Any, pairs: Sequence[tuple[str, str]], threads: int | None) -> list[dict[str, np.ndarray]]:
    """The inputs of every graph run when `ir` scores `pairs`, one score() call per query as in use
    (prefix passes and document passes both)."""
    recording = _RecordingGraph(open_graph(ir, threads))
    ir_scorer(recording, prompts, ir).score_pairs(pairs)
    return recording.feeds


def static_int8(graph: Any, feeds: list[dict[str, np.ndarray]]) -> Any:
    """nncf.quantize of the linear layers only: int8 weights and per-tensor int8 activations whose
    ranges nncf measures on `feeds`. Attention's matmuls, the grade and vocabulary heads and every
    other operation keep their precision; the weights nncf leaves (the heads', the embedding) are
    then compressed as in the int8 variant."""
    import nncf

    widths = {graph.output(name).get_partial_shape()[1].get_length() for name in ("grade_logits", "next_token_logits")}
    kept, types = [], set()
    for op in graph.get_ordered_ops():
        types.add(op.get_type_name())
        if op.get_type_name() != "MatMul":
            continue
        on_weights = op.input_value(1).get_node().get_type_name() == "Constant"
        width = op.get_output_partial_shape(0)[-1]
        if not on_weights or (width.is_static and width.get_length() in widths):
            kept.append(op.get_friendly_name())
    graph = nncf.quantize(graph, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                          preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(feeds),
                          ignored_scope=nncf.IgnoredScope(names=kept, types=sorted(types - {"MatMul"}), validate=False))
    graph = nncf.compress_weights(graph, mode=nncf.CompressWeightsMode.INT8_ASYM)
    embedding_lookup_on_int8_rows(graph)
    graph.set_rt_info("int8-static", ["framework", "answerfirst.quantization"])
    return graph


def embedding_lookup_on_int8_rows(graph: Any) -> None:
    """Gather the embedding's int8 rows and each row's scale and zero point, then dequantize the
    gathered rows: the same values as gathering from the dequantized table. Written as nncf leaves
    it, a Gather from the table's decompression chain, the CPU plugin's low-precision pipeline (on
    in a graph with int8 activations) folds the chain and holds the table in f32: 622 MB at Qwen3-0.6B
    instead of 156 MB of u8. Gathered scales are data, not constants, so the pipeline leaves them be."""
    ops = import_openvino().opset13
    for gather in [op for op in graph.get_ordered_ops() if op.get_type_name() == "Gather"]:
        chain, table = [], gather.input_value(0).get_node()
        while table.get_type_name() in ("Convert", "Subtract", "Multiply"):
            chain.append(table)
            table = table.input_value(0).get_node()
        if not chain or table.get_type_name() != "Constant" or table.get_element_type().get_type_name() not in ("u8", "i8"):
            continue
        ids, axis = gather.input_value(1), gather.input_value(2)
        rows_count = table.get_output_shape(0)[0]
        per_row = [step.get_input_partial_shape(1) for step in chain if step.get_type_name() != "Convert"]
        if axis.get_node().get_type_name() != "Constant" or int(axis.get_node().get_data()) != 0 or not all(
            shape.is_static and shape.rank.get_length() == 2 and shape[0].get_length() == rows_count and shape[1].get_length() == 1
            for shape in per_row
        ):
            continue  # only rows (axis 0) with a per-row scale and zero point can be gathered so
        f32 = gather.get_output_element_type(0)
        rows = ops.convert(ops.gather(table, ids, axis), f32)  # (B, T, H)
        for step in reversed(chain):  # from the table outwards: Convert, Subtract zero point, Multiply scale, Convert
            if step.get_type_name() == "Subtract":
                rows = ops.subtract(rows, ops.convert(ops.gather(step.input_value(1), ids, axis), f32))  # (B, T, 1)
            elif step.get_type_name() == "Multiply":
                rows = ops.multiply(rows, ops.convert(ops.gather(step.input_value(1), ids, axis), f32))  # (B, T, 1)
        gather.output(0).replace(rows.output(0))
    graph.validate_nodes_and_infer_types()


def attention_mask_as_select(graph: Any) -> None:
    """Write the traced additive attention mask, Convert(bool) * lowest-float, as Select(bool,
    lowest-float, 0): the same values. In a graph with FakeQuantize nodes the CPU plugin's
    low-precision transformations read Convert-then-Multiply as the dequantization of a quantized
    tensor and move the Multiply past the Add of the attention scores, where the lowest float wipes
    the scores out: on the default run's student, static int8 scored the probe pairs at grade
    agreement 0.328 (max |dp| 0.998) against torch with the mask as traced, 1.000 (0.159) with the
    Select (bench/openvino_mask.py, on graph revision 3, whose mask was added to the score blocks
    directly). Since revision 4 the mask is concatenated and tiled before the Add, which the
    transformations leave alone as traced too (tests/test_openvino.py); the Select stays so that no
    form of the mask reads as a dequantization. Returns nothing; an IR without such a mask is left as it is."""
    ov = import_openvino()
    for op in graph.get_ordered_ops():
        if op.get_type_name() != "Multiply":
            continue
        for side in (0, 1):
            convert, constant = op.input_value(side).get_node(), op.input_value(1 - side).get_node()
            if (convert.get_type_name() == "Convert" and convert.get_input_element_type(0) == ov.Type.boolean
                    and constant.get_type_name() == "Constant"):
                zero = ov.opset13.constant(np.zeros((), dtype=constant.get_element_type().to_dtype()))
                op.output(0).replace(ov.opset13.select(convert.input_value(0), constant.output(0), zero).output(0))
                break


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
    parser.add_argument("--calibration", default=None,
                        help="JSONL of query/doc records for the static variant's activation ranges "
                             "(default: the student's training data, else the probe pairs)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for parity scoring")


def run(args: argparse.Namespace) -> int:
    manifest = export_openvino(args.model, args.out, calibration=args.calibration, threads=args.threads)
    print(f"wrote {args.out}")
    for v in manifest.variants:
        p = v.parity or {}
        status = "passed" if v.parity_passed else "FAILED: " + "; ".join(p.get("failures", []))
        print(f"  {v.name:11s} {v.file:24s} {summary(p)} ({p.get('inference_precision')})  parity {status}")
    return 0 if any(v.parity_passed for v in manifest.variants) else 1


__all__ = [
    "INT8_THRESHOLDS", "attention_mask_as_select", "calibration_feeds", "calibration_pairs", "export_openvino",
    "ir_scorer", "scoring_graph", "static_int8",
]
