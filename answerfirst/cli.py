"""`answerfirst VERB ...`: thin dispatch to the module that owns each verb.

Each verb's module defines `add_arguments(parser)` and `run(args) -> int`; only the module of the
verb being run is imported, so `answerfirst --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from answerfirst.extras import is_missing_dependency, missing_extra

_RUNTIME_VERBS = "answerfirst.cli"  # score, explain and verify live below, in this module


@dataclass(frozen=True)
class Verb:
    """module: where add_arguments/run live. extra: the pip extra its dependencies come with (None:
    the artifact decides, and the backend names its own extra). one_shot: a short call whose
    output is the answer, so library progress bars and notices stay off (long jobs keep theirs)."""

    module: str
    extra: str | None
    help: str
    one_shot: bool = False


VERBS: dict[str, Verb] = {
    "label": Verb("answerfirst.distill.label", "train", "label query/doc pairs with a teacher (grade distribution + trace)"),
    "train": Verb("answerfirst.distill.train", "train", "distil a student from teacher labels (first-token KL + trace SFT)"),
    "rl": Verb("answerfirst.distill.rl", "train", "refine a student with mode-balanced Stepwise-GRPO and elastic trust regions"),
    "distill-default": Verb("answerfirst.distill.pipeline", "train", "the offline `make distill` run: sample data, teacher, student, evaluation"),
    "ablation": Verb("answerfirst.distill.ablation", "train", "the default student trained on gold, hard teacher, KL, KL + trace labels: what distillation buys"),
    "export": Verb("answerfirst.export.cli", "train", "export a student to ONNX (fp32 + int8) or GGUF (F16, Q8_0, K-quants)"),
    "score": Verb(_RUNTIME_VERBS, None, "score documents for a query with any artifact", one_shot=True),
    "explain": Verb(_RUNTIME_VERBS, None, "stream the explanation of one (query, document) pair", one_shot=True),
    "verify": Verb(_RUNTIME_VERBS, None, "check an artifact's files: sizes, structure and the sha256 its manifest recorded", one_shot=True),
    "bench": Verb("answerfirst.bench.runner", "bench", "latency benchmark of every backend against a naive baseline"),
    "profile": Verb("answerfirst.bench.profile", None, "where an ONNX or OpenVINO export's scoring time goes, per operator type", one_shot=True),
    "demo": Verb("answerfirst.demo.app", "demo", "open the Gradio demo page"),
    "serve": Verb("answerfirst.serve.cli", "serve", "rerank HTTP service: Cohere/Jina and TEI APIs, streamed explanations, metrics"),
    "serve-bench": Verb("answerfirst.bench.serving", "bench", "throughput and p50/p99 latency of a running server vs concurrency"),
}


def build_parser(verb: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="answerfirst", description="Answer-First, Reason-Later relevance: distil, export, score."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, spec in VERBS.items():
        sub = subparsers.add_parser(name, help=spec.help, description=spec.help)
        if name == verb:
            if spec.module == _RUNTIME_VERBS:
                add_arguments(sub, name)
            else:
                importlib.import_module(spec.module).add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if a in VERBS), None)
    try:
        parser = build_parser(verb)  # imports the verb's module: its dependencies may be missing
    except ImportError as e:
        return _fail(verb or "", e)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = VERBS[args.verb]
    if spec.one_shot:
        _quiet_libraries()
        if not args.verbose:  # what load() picked (the batch budget) is a notice: -v shows it
            logging.getLogger("answerfirst.runtime").setLevel(logging.WARNING)
    runner = run if spec.module == _RUNTIME_VERBS else importlib.import_module(spec.module).run
    try:
        return runner(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        # Our errors name the problem and the fix; a traceback would only bury that.
        if args.verbose:
            raise
        return _fail(args.verb, e)


def _fail(verb: str, error: Exception) -> int:
    """One line on stderr; a missing third-party module says which extra brings it."""
    spec = VERBS.get(verb)
    if isinstance(error, ImportError) and is_missing_dependency(error) and spec is not None and spec.extra:
        error = missing_extra(f"answerfirst {verb}", spec.extra, error)
    print(f"answerfirst {verb}: error: {error}", file=sys.stderr)
    return 2


def _quiet_libraries() -> None:
    """A one-shot call prints its answer only: no transformers weight-loading bars or notices."""
    if importlib.util.find_spec("transformers") is None:
        return  # an ONNX / GGUF install: nothing to quiet
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


# -- score / explain / verify: the runtime's own verbs ----------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    from answerfirst.runtime.api import PRECISIONS

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
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="what a checkpoint computes in (auto: bf16 where the CPU has AMX bf16 / AVX512_BF16 or on a GPU)")
    if verb == "score":
        parser.add_argument("--json", action="store_true", help="print one JSON object per document")
    else:
        parser.add_argument("--max-new-tokens", type=int, default=128)


def run(args: argparse.Namespace) -> int:
    if args.verb == "verify":
        return verify(args.path)
    from answerfirst.runtime import load

    scorer = load(args.model, backend=args.backend, device=args.device, threads=args.threads, variant=args.variant,
                  precision=args.precision)
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
