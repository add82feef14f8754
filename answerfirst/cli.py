"""`answerfirst VERB ...`: thin dispatch to the module that owns each verb.

Each verb's module defines `add_arguments(parser)` and `run(args) -> int`; only the module of the
verb being run is imported, so `answerfirst --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence

_RUNTIME_VERBS = "answerfirst.cli"  # score and explain live below, in this module

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "label": ("answerfirst.distill.label", "label query/doc pairs with a teacher (grade distribution + trace)"),
    "train": ("answerfirst.distill.train", "distil a student from teacher labels (first-token KL + trace SFT)"),
    "rl": ("answerfirst.distill.rl", "refine a student with mode-balanced Stepwise-GRPO and elastic trust regions"),
    "distill-default": ("answerfirst.distill.pipeline", "the offline `make distill` run: sample data, teacher, student"),
    "export": ("answerfirst.export.cli", "export a student to ONNX (fp32 + int8) or GGUF (F16, Q8_0, K-quants)"),
    "score": (_RUNTIME_VERBS, "score documents for a query with any artifact"),
    "explain": (_RUNTIME_VERBS, "stream the explanation of one (query, document) pair"),
    "verify": (_RUNTIME_VERBS, "check an artifact's files: sizes, structure and the sha256 its manifest recorded"),
    "bench": ("answerfirst.bench.runner", "latency benchmark of every backend against a naive baseline"),
    "profile": ("answerfirst.bench.profile", "where an ONNX export's scoring time goes, per operator type"),
    "demo": ("answerfirst.demo.app", "open the Gradio demo page"),
    "serve": ("answerfirst.serve.cli", "rerank HTTP service: Cohere/Jina and TEI APIs, streamed explanations, metrics"),
    "serve-bench": ("answerfirst.bench.serving", "throughput and p50/p99 latency of a running server vs concurrency"),
}


def build_parser(verb: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="answerfirst", description="Answer-First, Reason-Later relevance: distil, export, score."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, (module, help_text) in VERBS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == verb:
            if module == _RUNTIME_VERBS:
                add_arguments(sub, name)
            else:
                importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if a in VERBS), None)
    args = build_parser(verb).parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    module = VERBS[args.verb][0]
    runner = run if module == _RUNTIME_VERBS else importlib.import_module(module).run
    try:
        return runner(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        # Our errors name the problem and the fix; a traceback would only bury that.
        if args.verbose:
            raise
        print(f"answerfirst {args.verb}: error: {e}", file=sys.stderr)
        return 2


def _quiet_libraries() -> None:
    """Our own progress bars say what runs; transformers' per-load weight bars only add noise."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


# -- score / explain / verify: the runtime's own verbs ----------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    if verb == "verify":
        parser.add_argument("path", help="student checkpoint, ONNX or GGUF export directory, or a .gguf file")
        return
    parser.add_argument("--model", required=True, help="student checkpoint, ONNX/GGUF export dir, .gguf file or hub id")
    parser.add_argument("--query", required=True)
    parser.add_argument("--doc", required=True, action="append", help="a document (repeat for several)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx", "gguf"])
    parser.add_argument("--variant", default=None, help="file of an ONNX/GGUF export (default: fastest passing parity)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    if verb == "score":
        parser.add_argument("--json", action="store_true", help="print one JSON object per document")
    else:
        parser.add_argument("--max-new-tokens", type=int, default=128)


def run(args: argparse.Namespace) -> int:
    if args.verb == "verify":
        return verify(args.path)
    from answerfirst.runtime.api import load

    scorer = load(args.model, backend=args.backend, device=args.device, threads=args.threads, variant=args.variant)
    if args.verb == "explain":
        if len(args.doc) != 1:
            raise ValueError("explain takes exactly one --doc")
        grade = scorer.score(args.query, args.doc)[0].grade
        print(f"grade: {scorer.grades[grade]}", flush=True)
        for piece in scorer.explain(args.query, args.doc[0], max_new_tokens=args.max_new_tokens):
            print(piece, end="", flush=True)
        print()
        return 0
    scores = scorer.score(args.query, args.doc)
    for doc, s in zip(args.doc, scores, strict=True):
        if args.json:
            row = {"doc": doc, "grade": scorer.grades[s.grade], "expected": s.expected, "probs": list(s.probs)}
            print(json.dumps({**row, "truncated": s.truncated}, ensure_ascii=False))
        else:
            probs = " ".join(f"{g}:{p:.3f}" for g, p in zip(scorer.grades, s.probs, strict=True))
            cut = "  (truncated)" if s.truncated else ""
            print(f"{s.expected:6.3f}  grade {scorer.grades[s.grade]}  [{probs}]  {doc[:60]!r}{cut}")
    return 0


def verify(path: str) -> int:
    """Print one line per file (ok, or what is wrong and what to do); 0 when every file is intact."""
    from pathlib import Path

    from answerfirst.artifact import (
        Manifest,
        ManifestError,
        check_checkpoint_files,
        check_checksums,
        has_manifest,
    )

    location = Path(path)
    if location.is_file() and location.suffix == ".gguf":
        from answerfirst.runtime._llamacpp import read_gguf_metadata

        read_gguf_metadata(location)  # raises GGUFError (a ValueError: one line, exit 2) when cut or corrupt
        print(f"ok      {location} (complete GGUF; a lone file has no recorded sha256 to compare)")
        return 0
    if not location.is_dir():
        raise FileNotFoundError(f"{location} is neither an artifact directory nor a .gguf file")
    if not has_manifest(location):
        raise ManifestError(f"{location} has no answerfirst.json: nothing records what its files should be")
    manifest = Manifest.read(location)
    if manifest.kind == "checkpoint":
        try:
            check_checkpoint_files(location)
        except ManifestError as e:
            print(f"FAILED  {e}")
            return 1
    results = check_checksums(location, manifest)
    for name, problem in results.items():
        print(f"ok      {name}" if problem is None else f"FAILED  {problem}")
    failed = sum(problem is not None for problem in results.values())
    print(f"{location}: {len(results) - failed} of {len(results)} file(s) match the recorded sha256"
          + (f"; {failed} FAILED" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
