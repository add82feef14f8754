"""The embedding API: `load(path) -> Scorer`, `Scorer.score(query, docs)`, `score(query, doc_or_docs)`.

A Scorer owns the AFRL prompt tokenizer (answerfirst.afrl) and one backend adapter, picked once at
load. Every adapter answers the same calls (runtime/_common.Backend):

    grade_logits(prefix_ids, continuations) -> (B, K) float array
    generate(input_ids, max_new_tokens) -> Iterator[int]

so tokenization, length bucketing, the score formula and explanation streaming live here once.
The adapters are imported inside load(), only the one the artifact needs, and never import this
module (what they share with it is in _common.py).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from answerfirst import artifact
from answerfirst.afrl import FormatError, PromptTokenizer, Score, check_docs, check_text, scores_from_logits
from answerfirst.artifact import Manifest, artifact_kind
from answerfirst.runtime._common import Backend, PrefixCache, ScorerConfig

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "onnx", "gguf")
BACKEND_OF_KIND = {"checkpoint": "torch", "onnx": "onnx", "gguf": "gguf"}  # artifact.artifact_kind -> backend
DEFAULT_MODEL_ENV = "ANSWERFIRST_MODEL"
DEFAULT_MODEL_PATH = "artifacts/student"

__all__ = ["Backend", "PrefixCache", "Scorer", "ScorerConfig", "load", "score"]


class Scorer:
    """Scores (query, doc) pairs with one artifact on one backend; safe to share across threads."""

    def __init__(self, backend: Backend, prompts: PromptTokenizer, config: ScorerConfig, manifest: Manifest | None):
        self.backend = backend
        self.prompts = prompts
        self.config = config
        self.manifest = manifest

    @property
    def grades(self) -> tuple[str, ...]:
        return self.prompts.format.grades

    def score(self, query: str, docs: Sequence[str]) -> list[Score]:
        """One query, many documents: the prefix is tokenized and run once, then every document."""
        prompts = self.prompts.prompts(query, docs)
        if not prompts:
            return []
        prefix = prompts[0].prefix_ids
        if self.config.reuse_prefix:
            sequences = [p.continuation_ids for p in prompts]
        else:
            sequences = [p.input_ids for p in prompts]
        logits = np.empty((len(prompts), len(self.grades)), dtype=np.float64)
        # Sort by length so each batch pads to a near-equal length; scatter the results back.
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        for start in range(0, len(order), self.config.batch_size):
            batch = order[start : start + self.config.batch_size]
            batch_logits = self.backend.grade_logits(
                prefix if self.config.reuse_prefix else None, [sequences[i] for i in batch]
            )
            logits[batch] = batch_logits  # (b, K)
        return scores_from_logits(logits, self.prompts.format.values, [p.truncated for p in prompts])

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

    def explain(self, query: str, doc: str, max_new_tokens: int = 128) -> Iterator[str]:
        """Stream the explanation after the grade the model gives this pair (its argmax grade).

        The grade token is fixed to the scored argmax and appended to the prompt; the text that
        follows is generated greedily until end-of-turn or `max_new_tokens`."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise FormatError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        grade = self.score(query, [doc])[0].grade
        prompt = self.prompts.prompt(query, doc)
        ids = [*prompt.input_ids, self.prompts.grade_ids[grade]]
        return self.prompts.stream_explanation(self.backend.generate(ids, max_new_tokens))

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def __repr__(self) -> str:
        return f"Scorer(backend={self.backend.name!r}, grades={list(self.grades)})"


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
    variant: str | None = None,
    config: ScorerConfig | None = None,
) -> Scorer:
    """Open an artifact (student checkpoint, ONNX export, GGUF export, plain HF checkpoint dir or
    hub id) and return a Scorer on the backend its manifest calls for (or the one named).

    quantization: "8bit" | "4bit" loads a torch checkpoint through bitsandbytes.
    variant: which file of an ONNX/GGUF export; default: the fastest one whose parity passed.
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
    if chosen != BACKEND_OF_KIND[kind]:
        raise ValueError(f"{location} is a {kind} artifact; backend={backend!r} cannot load it (use backend='auto')")
    if quantization is not None and chosen != "torch":
        raise ValueError(f"quantization={quantization!r} applies to torch checkpoints; {kind} exports are quantized at export")
    if variant is not None and chosen == "torch":
        raise ValueError("variant= selects a file of an ONNX or GGUF export; a checkpoint has one")

    if chosen == "torch":
        from answerfirst.runtime._torch import open_torch

        adapter, prompts = open_torch(str(path), manifest, device, threads, quantization, config)
    elif chosen == "onnx":
        from answerfirst.runtime._onnx import open_onnx

        if device != "cpu":
            logger.warning("the onnx backend runs on the CPU execution provider; device=%r ignored", device)
        adapter, prompts = open_onnx(location, manifest, threads, variant, config)
    else:
        from answerfirst.runtime._llamacpp import open_gguf

        adapter, prompts = open_gguf(location, manifest, threads, variant, config)
    return Scorer(adapter, prompts, config, manifest)


def bind_format(tokenizer: Any, manifest: Manifest | None, config: ScorerConfig, where: str) -> PromptTokenizer:
    """Former home of artifact.bind_format, kept for callers of this path (distill/pipeline.py);
    new code calls answerfirst.artifact.bind_format(tokenizer, manifest, where, max_doc_tokens)."""
    return artifact.bind_format(tokenizer, manifest, where, config.max_doc_tokens)


# ------------------------------------------------------------------------------------------------
# score: the one-line embedding call
# ------------------------------------------------------------------------------------------------

_scorers: dict[str, Scorer] = {}
_scorers_lock = threading.Lock()


def score(query: str, doc_or_docs: str | Sequence[str], model: str | os.PathLike[str] | Scorer | None = None):
    """Score one document (returns a Score) or a list of documents (returns a list of Score).

    model: a Scorer, or a path / hub id opened once and cached; default $ANSWERFIRST_MODEL, else
    artifacts/student (what `make distill` writes)."""
    if isinstance(model, Scorer):
        scorer = model
    else:
        key = str(model or os.environ.get(DEFAULT_MODEL_ENV) or DEFAULT_MODEL_PATH)
        with _scorers_lock:
            if key not in _scorers:
                if model is None and not Path(key).exists():
                    raise FileNotFoundError(
                        f"no model given and {key} does not exist: run `make distill`, set "
                        f"${DEFAULT_MODEL_ENV}, or pass model=PATH"
                    )
                _scorers[key] = load(key)
            scorer = _scorers[key]
    if isinstance(doc_or_docs, str):
        return scorer.score(query, [doc_or_docs])[0]
    return scorer.score(query, check_docs(doc_or_docs))
