"""What `load(checkpoint, precision="bf16")` costs in accuracy: bf16 against fp32 on held-out pairs.

    .venv/bin/python bench/precision_parity.py --model artifacts/student --pairs artifacts/work/pairs.jsonl [--n 400]

Scores the first `n` held-out pairs (split "heldout") of the default run's sample with the checkpoint
in fp32 (the reference every export is held to) and in bf16, and prints the parity report (max |Δp|,
grade agreement, Spearman of expected grades) against ONNX int8's bounds. Run it on a learned
student: on random weights the distributions are flat and agreement says nothing.
"""

from __future__ import annotations

import argparse
import json

from answerfirst.export.onnx import INT8_THRESHOLDS
from answerfirst.export.parity import measure, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a torch checkpoint (e.g. artifacts/student)")
    parser.add_argument("--pairs", required=True, help="JSONL pairs with a split field (e.g. artifacts/work/pairs.jsonl)")
    parser.add_argument("--n", type=int, default=400, help="held-out pairs to score (default 400)")
    args = parser.parse_args(argv)

    import answerfirst
    from answerfirst.distill.label import read_pairs

    rows = [r for r in read_pairs(args.pairs)[0] if r.get("split") == "heldout"][: args.n]
    if not rows:
        parser.error(f"{args.pairs} has no held-out pairs (rows with split 'heldout')")
    pairs = [(r["query"], r["doc"]) for r in rows]
    reference = answerfirst.load(args.model).score_pairs(pairs)
    bf16 = answerfirst.load(args.model, precision="bf16")
    report = measure(reference, lambda: bf16.score_pairs(pairs), INT8_THRESHOLDS)
    print(f"{args.model}, {len(pairs)} held-out pairs, bf16 vs fp32: {summary(report)} "
          f"({'within' if report['passed'] else 'OUTSIDE'} ONNX int8's parity bounds)")
    print(json.dumps({k: report[k] for k in ("pairs", "max_abs_dp", "grade_agreement", "spearman_expected", "passed")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
