"""What the attention mask's form does to OpenVINO static int8: parity with the traced mask and with the Select.

    .venv/bin/python bench/openvino_mask.py artifacts/student artifacts/openvino

Builds the static int8 graph of an OpenVINO export's checkpoint twice, as `answerfirst export
openvino` does (export/openvino.py: static_int8, on the inputs its int8 IR records while scoring the
calibration pairs the export's manifest names), once with the attention mask as traced
(Convert(bool) * lowest float) and once rewritten as a Select (attention_mask_as_select), and prints
each one's parity against the torch checkpoint on the export's probe pairs, with the thresholds
the export holds its int8 variants to. Run `answerfirst export openvino` first.
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="the torch checkpoint the export was made from")
    parser.add_argument("export", type=Path, help="its OpenVINO export (answerfirst export openvino)")
    args = parser.parse_args(argv)

    import openvino as ov

    import answerfirst
    from answerfirst.artifact import Manifest
    from answerfirst.export.onnx import INT8_THRESHOLDS, OPSET, export_graph, graph_metadata
    from answerfirst.export.openvino import (
        INT8_FILE,
        calibration_feeds,
        calibration_pairs,
        ir_scorer,
        scoring_graph,
        static_int8,
    )
    from answerfirst.export.parity import measure, summary
    from answerfirst.runtime._openvino import open_graph

    manifest = Manifest.read(args.export)
    pairs = [tuple(pair) for pair in manifest.info["probe_pairs"]]
    reference = answerfirst.load(args.checkpoint, backend="torch")
    prompts, reference_scores = reference.prompts, reference.score_pairs(pairs)
    source = manifest.info["calibration"]["source"]
    if source == "the given pairs":
        parser.error(f"{args.export} was calibrated on pairs passed in code, which its manifest does not keep")
    calibration, _ = calibration_pairs(pairs if source == "the probe pairs" else source, None, pairs)
    feeds = calibration_feeds(args.export / INT8_FILE, prompts, calibration, None)
    with tempfile.TemporaryDirectory() as work:
        traced = Path(work) / "graph.onnx"
        model = reference.backend.model
        export_graph(model, prompts.grade_ids, traced, OPSET, graph_metadata(model, prompts.grade_ids, manifest.source["sha256"]))
        for label, rewrite in (("mask as traced (Convert * Multiply)", False), ("mask as a Select", True)):
            graph = scoring_graph(traced, mask_as_select=rewrite)
            ir = Path(work) / f"static-{rewrite}.xml"
            ov.save_model(static_int8(graph, feeds), str(ir), compress_to_fp16=False)
            report = measure(reference_scores, partial(ir_scorer(open_graph(ir, None), prompts, ir).score_pairs, pairs), INT8_THRESHOLDS)
            print(f"static int8, {label}: {summary(report)} over {len(pairs)} probe pairs (calibration: {source})"
                  f" -> {'passed' if report['passed'] else 'FAILED'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
