"""The embedding API: `load(path) -> Scorer`, `Scorer.score(query, docs)`, `score(query, doc_or_docs)`.

A Scorer owns the AFRL prompt tokenizer (answerfirst.afrl) and one backend adapter, picked once at
load. Every adapter answers the same calls (runtime/_common.Backend):

    grade_logits(prefix_ids, continuations) -> (B, K) float array
    generate(input_ids, max_new_tokens) -> Iterator[int]

and states what it runs and how long a prompt may be (`artifact`, `max_positions`, `context_note`),
so tokenization, length bucketing, the input limits, the score formula (with its refusal of
non-finite logits) and explanation streaming live here once, for every backend. The adapters are
imported inside load(), only the one the artifact needs, and never import this module (what they
share with it is in _common.py).

score() is plan() + run_pass() per forward pass + ScoringPlan.scores(): a caller that schedules the
passes itself (the HTTP server interleaves the passes of concurrent requests) calls the same three
steps and so gets exactly what score() returns.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from answerfirst.afrl import (
    FormatError,
    Prompt,
    PromptTokenizer,
    Score,
    check_docs,
    check_text,
    scores_from_logits,
)
from answerfirst.artifact import (
    Manifest,
    artifact_kind,
    check_checkpoint_files,
    variant_files,
    verify_checksums,
)
from answerfirst.runtime._common import (
    DEFAULT_MAX_QUERY_TOKENS,
    PRECISIONS,
    Backend,
    PrefixCache,
    ScorerConfig,
)
from answerfirst.runtime._cpu import usable_cores

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "gguf", "openvino")
BACKEND_OF_KIND = {"checkpoint": "torch", "onnx": "onnx", "gguf": "gguf", "openvino": "openvino"}  # artifact_kind -> backend
# Backends that can also run another kind of artifact: OpenVINO reads an ONNX export's fp32 graph.
ALSO_RUNS = {"openvino": ("onnx",)}
DEFAULT_MODEL_ENV = "ANSWERFIRST_MODEL"
DEFAULT_MODEL_PATH = "artifacts/student"


class ContextLengthError(FormatError):
    """A prompt (rubric + query + document + suffix) is longer than the model's context."""


class NonFiniteScoreError(RuntimeError):
    """The model gave NaN or infinite grade logits: its weights are corrupt or a kernel overflowed."""


__all__ = [
    "BACKEND_OF_KIND", "DEFAULT_MAX_QUERY_TOKENS", "DEFAULT_MODEL_ENV", "DEFAULT_MODEL_PATH", "PRECISIONS",
    "Backend", "ContextLengthError", "ForwardPass", "NonFiniteScoreError", "PrefixCache", "Scorer",
    "ScorerConfig", "ScoringPlan", "check_context", "check_finite", "load", "score",
]


@dataclass(frozen=True)
class ForwardPass:
    """One backend call of a ScoringPlan: the documents `rows` (indices into the plan's prompts)
    as `continuations` of the shared `prefix_ids` (None: the continuations are whole prompts)."""

    prefix_ids: tuple[int, ...] | None
    continuations: tuple[tuple[int, ...], ...]
    rows: tuple[int, ...]


@dataclass(frozen=True)
class ScoringPlan:
    """What Scorer.score(query, docs) runs: the prompts sorted by length and split into forward
    passes of at most `batch_tokens` prompt tokens (documents x the longest prompt of the pass) and
    `batch_size` documents (ScorerConfig), so each pass pads to a near-equal length."""

    prompts: tuple[Prompt, ...]
    passes: tuple[ForwardPass, ...]
    values: tuple[float, ...]  # the format's grade values, for the expected grade

    @property
    def total_tokens(self) -> int:
        """Prompt tokens of every document (rubric + query + document + template), as if each ran alone."""
        return sum(len(p.prefix_ids) + len(p.doc_ids) + len(p.suffix_ids) for p in self.prompts)

    def scores(self, pass_logits: Sequence[np.ndarray]) -> list[Score]:
        """The Scores of the plan's documents, in their order, from each pass's (b, K) grade logits."""
        if not self.prompts:
            return []
        logits = np.empty((len(self.prompts), len(self.values)), dtype=np.float64)
        for forward_pass, batch_logits in zip(self.passes, pass_logits, strict=True):
            logits[list(forward_pass.rows)] = batch_logits  # (b, K) scattered back to document order
        return scores_from_logits(logits, self.values, [p.truncated for p in self.prompts])


class Scorer:
    """Scores (query, doc) pairs with one artifact on one backend; safe to share across threads.

    config: a batch_tokens of None becomes the backend's default for its device here, so
    `scorer.config.batch_tokens` (and repr(scorer)) says what every pass is bounded by."""

    def __init__(self, backend: Backend, prompts: PromptTokenizer, config: ScorerConfig, manifest: Manifest | None):
        self.backend = backend
        self.prompts = prompts
        self.config = config if config.batch_tokens is not None else replace(config, batch_tokens=backend.default_batch_tokens)
        self.manifest = manifest

    @property
    def grades(self) -> tuple[str, ...]:
        return self.prompts.format.grades

    @property
    def threads(self) -> int:
        """The CPU threads a pass runs on: the backend's setting, else every usable core."""
        return getattr(self.backend, "threads", 0) or usable_cores()

    def score(self, query: str, docs: Sequence[str]) -> list[Score]:
        """One query, many documents: the prefix is tokenized and run once, then every document.

        Refused before any forward pass: a query over `config.max_query_tokens`, a prompt longer than
        the backend's context. Refused after it: non-finite logits (never returned as a Score)."""
        plan = self.plan(query, docs)
        return plan.scores([self.run_pass(forward_pass) for forward_pass in plan.passes])

    def plan(self, query: str, docs: Sequence[str], max_doc_tokens: int | None = None) -> ScoringPlan:
        """Tokenize one query's documents, check them against the limits, and split them into the
        forward passes score() runs.

        max_doc_tokens: cut documents to fewer tokens than the artifact's limit, for this call only.
        A document's logits can depend on which documents share its pass (padding length, batch
        size, int8 activation scales), so running exactly these passes is what makes
        `plan.scores([run_pass(p) for p in plan.passes])` equal to score(query, docs)."""
        prompts = tuple(self.prompts.prompts(query, docs, self.config.max_query_tokens, max_doc_tokens))
        if not prompts:
            return ScoringPlan((), (), tuple(self.prompts.format.values))
        check_context(prompts, self.backend)
        prefix = prompts[0].prefix_ids if self.config.reuse_prefix else None
        sequences = [tuple(p.continuation_ids) if prefix is not None else tuple(p.input_ids) for p in prompts]
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        prompt_lengths = [len(p.prefix_ids) + len(p.doc_ids) + len(p.suffix_ids) for p in prompts]
        passes = tuple(
            ForwardPass(prefix, tuple(sequences[i] for i in rows), tuple(rows))
            for rows in token_budget_passes(order, prompt_lengths, self.config.batch_tokens, self.config.batch_size)
        )
        return ScoringPlan(prompts, passes, tuple(self.prompts.format.values))

    def run_pass(self, forward_pass: ForwardPass) -> np.ndarray:
        """(b, K) grade logits of one pass of a plan; the same pass always gives the same logits.
        Non-finite logits raise NonFiniteScoreError naming the artifact."""
        logits = self.backend.grade_logits(forward_pass.prefix_ids, forward_pass.continuations)
        check_finite(logits, self.backend.artifact)
        return logits

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Score]:
        """Any (query, doc) pairs: grouped by query so each prefix is computed once, order kept."""
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
            raise FormatError(f"pairs must be a list of (query, doc) tuples, got {type(pairs).__name__}")
        by_query: dict[str, list[int]] = {}
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise FormatError(f"pairs[{i}] must be a (query, doc) tuple")
            by_query.setdefault(check_text(pair[0], f"pairs[{i}] query"), []).append(i)
        results: list[Score | None] = [None] * len(pairs)
        for query, indices in by_query.items():
            for i, s in zip(indices, self.score(query, [pairs[i][1] for i in indices]), strict=True):
                results[i] = s
        return results  # type: ignore[return-value]

    def explain(
        self,
        query: str,
        doc: str,
        max_new_tokens: int = 128,
        grade: int | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[str]:
        """Stream the explanation after the grade the model gives this pair (its argmax grade).

        The grade token is fixed to the scored argmax and appended to the prompt; the text that
        follows is generated greedily until end-of-turn or `max_new_tokens`.
        grade: the grade index to explain when the caller has scored the pair already (then it is
        not scored again), or any other grade to ask the model why it would give that one.
        should_stop: asked after every generated token; True ends the explanation there (a server
        stops generating for a client that left, even inside a piece of text still being held back)."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise FormatError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if grade is None:
            grade = self.score(query, [doc])[0].grade
        elif not isinstance(grade, int) or isinstance(grade, bool) or not 0 <= grade < len(self.grades):
            raise FormatError(f"grade must be a grade index 0..{len(self.grades) - 1}, got {grade!r}")
        prompt = self.prompts.prompt(query, doc)
        ids = [*prompt.input_ids, self.prompts.grade_ids[grade]]
        room = self.backend.max_positions - len(ids)
        if room < max_new_tokens:
            logger.warning(
                "%s: the explanation is cut at %d tokens, where the prompt fills the context (%s)",
                self.backend.artifact, max(room, 0), self.backend.context_note,
            )
            max_new_tokens = max(room, 0)
        tokens = self.backend.generate(ids, max_new_tokens)
        if should_stop is not None:
            tokens = itertools.takewhile(lambda _: not should_stop(), tokens)
        return self.prompts.stream_explanation(tokens)

    def concurrent(self, lanes: int) -> Scorer | None:
        """A Scorer for running `lanes` passes at once, each on an equal share of this one's threads:
        the same prompts and config over the backend's concurrent copy (Backend.concurrent_copy,
        a second copy of the weights), whose logits equal this one's; None where the backend runs
        one pass at a time. `answerfirst serve --concurrent-passes` runs its passes on it."""
        if not isinstance(lanes, int) or lanes < 2:
            raise ValueError(f"lanes: must be an int >= 2, got {lanes!r}")
        backend = self.backend.concurrent_copy(max(1, self.threads // lanes))
        return None if backend is None else Scorer(backend, self.prompts, self.config, self.manifest)

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def __repr__(self) -> str:
        device = getattr(self.backend, "device", "cpu")
        limit = f", batch_size={self.config.batch_size}" if self.config.batch_size is not None else ""
        dtype = f", dtype={self.backend.dtype!r}" if hasattr(self.backend, "dtype") else ""
        return (f"Scorer(backend={self.backend.name!r}, device={str(device)!r}{dtype}, "
                f"batch_tokens={self.config.batch_tokens}{limit}, grades={list(self.grades)})")


def token_budget_passes(
    order: Sequence[int], prompt_lengths: Sequence[int], batch_tokens: int, batch_size: int | None
) -> list[list[int]]:
    """Cut documents, taken in `order` (shortest prompt first), into passes: a pass takes the next
    document while its documents x its longest prompt stay within `batch_tokens` and its documents
    within `batch_size` (None: any number). A prompt longer than the budget is a pass of its own."""
    passes: list[list[int]] = []
    rows: list[int] = []
    longest = 0  # the longest prompt in `rows`
    for i in order:
        width = max(longest, prompt_lengths[i])
        if rows and ((len(rows) + 1) * width > batch_tokens or len(rows) == batch_size):
            passes.append(rows)
            rows, width = [], prompt_lengths[i]
        rows.append(i)
        longest = width
    if rows:
        passes.append(rows)
    return passes


def check_context(prompts: Sequence[Prompt], backend: Backend) -> None:
    """Refuse, before any forward pass, a prompt longer than the backend's context."""
    longest = max(prompts, key=lambda p: len(p.prefix_ids) + len(p.doc_ids) + len(p.suffix_ids))
    length = len(longest.prefix_ids) + len(longest.doc_ids) + len(longest.suffix_ids)
    if length > backend.max_positions:
        raise ContextLengthError(
            f"{backend.artifact}: a prompt of {length} tokens (rubric + query {len(longest.prefix_ids)}, document "
            f"{len(longest.doc_ids)}, suffix {len(longest.suffix_ids)}) does not fit the context of "
            f"{backend.max_positions} ({backend.context_note}); shorten the query or lower ScorerConfig(max_doc_tokens=...)"
        )


def check_finite(grade_logits: np.ndarray, artifact: str) -> None:
    """(B, K) grade logits must be finite: a NaN or inf is an error naming the artifact, never a Score."""
    bad = np.flatnonzero(~np.isfinite(grade_logits).all(axis=1))
    if bad.size:
        raise NonFiniteScoreError(
            f"{artifact} gave non-finite grade logits (NaN or inf) for {bad.size} of {len(grade_logits)} "
            f"document(s) (first: #{int(bad[0])}); its weights are corrupt or a quantized kernel overflowed: "
            f"check the files with `answerfirst verify`, re-export, or load another variant"
        )


# ------------------------------------------------------------------------------------------------
# load
# ------------------------------------------------------------------------------------------------


def load(
    path: str | os.PathLike[str],
    backend: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
    *,
    quantization: str | None = None,
    precision: str | None = None,
    variant: str | None = None,
    config: ScorerConfig | None = None,
    verify: bool = False,
) -> Scorer:
    """Open an artifact (student checkpoint, ONNX export, GGUF export, plain HF checkpoint dir or
    hub id) and return a Scorer on the backend its manifest calls for (or the one named).

    quantization: "8bit" | "4bit" loads a torch checkpoint through bitsandbytes.
    precision: what a torch checkpoint computes in: "fp32", "bf16", or "auto" (bf16 where the device
        computes it fast: a GPU, or a CPU with AMX bf16 / AVX512_BF16; fp32 elsewhere). None (default):
        fp32 on a CPU, bf16 on a GPU. Exports carry their precision in their variant.
    variant: which file of an ONNX/GGUF export; default: the fastest one whose parity passed.
    verify: check the sha256 of every file this load reads against the manifest's record (reads
        them all once more; without it, load checks only sizes and file structure, which is cheap).
    """
    config = config or ScorerConfig()
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend must be one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    if quantization not in (None, "8bit", "4bit"):
        raise ValueError(f"quantization must be '8bit', '4bit' or None; got {quantization!r}")

    location = Path(path)
    kind, manifest = artifact_kind(location)
    chosen = BACKEND_OF_KIND[kind] if backend == "auto" else backend
    if chosen != BACKEND_OF_KIND[kind] and kind not in ALSO_RUNS.get(chosen, ()):
        raise ValueError(f"{location} is a {kind} artifact; backend={backend!r} cannot load it (use backend='auto')")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} or None; got {precision!r}")
    if precision is not None and (chosen != "torch" or quantization is not None):
        raise ValueError(f"precision={precision!r} applies to torch checkpoints without quantization=; "
                         f"{'bitsandbytes picks its own compute dtype' if quantization else f'{kind} exports carry their precision in their variant'}")
    if quantization is not None and chosen != "torch":
        raise ValueError(f"quantization={quantization!r} applies to torch checkpoints; {kind} exports are quantized at export")
    if variant is not None and chosen == "torch":
        raise ValueError("variant= selects a file of an ONNX or GGUF export; a checkpoint has one")
    if chosen == "openvino" and kind == "onnx":
        variant = variant or "fp32"  # the graph OpenVINO reads (runtime/_openvino.py)
    if chosen == "torch" and location.is_dir():
        check_checkpoint_files(location)
    if verify:
        names = None if manifest is None or kind == "checkpoint" else variant_files(manifest, manifest.variant(variant))
        verify_checksums(location, manifest, names)

    if chosen == "torch":
        from answerfirst.runtime._torch import open_torch

        adapter, prompts = open_torch(str(path), manifest, device, threads, quantization, config, precision)
    elif chosen == "onnx":
        from answerfirst.runtime._onnx import open_onnx

        if device != "cpu":
            logger.warning("the onnx backend runs on the CPU execution provider; device=%r ignored", device)
        adapter, prompts = open_onnx(location, manifest, threads, variant, config)
    elif chosen == "openvino":
        from answerfirst.runtime._openvino import open_openvino

        if device != "cpu":
            logger.warning("the openvino backend runs on OpenVINO's CPU plugin; device=%r ignored", device)
        adapter, prompts = open_openvino(location, manifest, threads, variant, config)
    else:
        from answerfirst.runtime._llamacpp import open_gguf

        adapter, prompts = open_gguf(location, manifest, threads, variant, config)
    scorer = Scorer(adapter, prompts, config, manifest)
    logger.info(
        "%s: %s backend on %s%s, forward passes of at most %d prompt tokens%s (%s)", location, adapter.name,
        getattr(adapter, "device", "cpu"), f" in {adapter.dtype}" if hasattr(adapter, "dtype") else "", scorer.config.batch_tokens,
        "" if config.batch_size is None else f" and {config.batch_size} documents",
        "ScorerConfig.batch_tokens" if config.batch_tokens is not None else "the device's default",
    )
    return scorer


# ------------------------------------------------------------------------------------------------
# score: the one-line embedding call
# ------------------------------------------------------------------------------------------------

_scorers: dict[str, Scorer] = {}
_loading: dict[str, threading.Lock] = {}  # one lock per model key: a load never blocks another model
_scorers_lock = threading.Lock()  # guards the two dicts, held only for lookups


def score(query: str, doc_or_docs: str | Sequence[str], model: str | os.PathLike[str] | Scorer | None = None):
    """Score one document (returns a Score) or a list of documents (returns a list of Score).

    model: a Scorer, or a path / hub id opened once and cached; default $ANSWERFIRST_MODEL, else
    artifacts/student (what `make distill` writes). Concurrent first calls for one model load it
    once (the others wait for it); calls for a model already loaded never wait for another's load."""
    scorer = model if isinstance(model, Scorer) else _cached_scorer(model)
    if isinstance(doc_or_docs, str):
        return scorer.score(query, [doc_or_docs])[0]
    return scorer.score(query, check_docs(doc_or_docs))


def _cached_scorer(model: str | os.PathLike[str] | None) -> Scorer:
    key = str(model or os.environ.get(DEFAULT_MODEL_ENV) or DEFAULT_MODEL_PATH)
    with _scorers_lock:
        if key in _scorers:
            return _scorers[key]
        key_lock = _loading.setdefault(key, threading.Lock())
    with key_lock:
        with _scorers_lock:
            if key in _scorers:  # loaded by the thread this one waited for
                return _scorers[key]
        if model is None and not Path(key).exists():
            raise FileNotFoundError(
                f"no model given and {key} does not exist: run `make distill`, set "
                f"${DEFAULT_MODEL_ENV}, or pass model=PATH"
            )
        scorer = load(key)
        with _scorers_lock:
            _scorers[key] = scorer
            _loading.pop(key, None)
        return scorer
