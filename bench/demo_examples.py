"""The demo's examples, scored: does the exact match rank first?

    .venv/bin/python bench/demo_examples.py --model artifacts/onnx [--pairs artifacts/work/pairs.jsonl]

The demo page shows the default run's first held-out queries with a few of their documents each
(`demo/app.py: load_examples`). This scores every example with `--model` through `answerfirst.load`
and prints, per query, the documents best first with their expected grade, the model's grade and
the gold grade (looked up in `--pairs`, the sample that made them), then how many examples put an
exact match (gold grade 4) first.
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="any artifact answerfirst.load opens (e.g. artifacts/onnx)")
    parser.add_argument("--pairs", default="artifacts/work/pairs.jsonl", help="the sample pairs with gold grades")
    args = parser.parse_args(argv)

    import answerfirst
    from answerfirst.demo.app import load_examples
    from answerfirst.distill.label import read_pairs

    gold = {(r["query"], r["doc"].strip()): r["label"] for r in read_pairs(args.pairs)[0]}
    scorer = answerfirst.load(args.model)
    first, with_match = 0, 0
    for query, docs_text in load_examples():
        docs = docs_text.split("\n")
        grades = [gold.get((query, doc)) for doc in docs]
        if None in grades:
            parser.error(f"{args.pairs} is not the sample the demo's examples come from (no gold grade for {query!r})")
        scored = sorted(zip(scorer.score(query, docs), docs, grades, strict=True), key=lambda t: -t[0].expected)
        print(f"\n{query}")
        for score, doc, grade in scored:
            print(f"  {score.expected:4.2f}  grade {score.grade}  gold {grade}  {doc[:70]}")
        if 4 in grades:
            with_match += 1
            first += scored[0][2] == 4
    print(f"\n{args.model}: an exact match ranks first in {first} of the {with_match} examples that have one")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
