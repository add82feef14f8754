"""ONNX Runtime backend: the scoring graph that `answerfirst export onnx` writes, run on the CPU.

The graph (see answerfirst/export/onnx.py for how it is built) takes

    input_ids   (B, T) int64     right-padded continuations (or whole prompts when there is no past)
    lengths     (B,)   int64     real tokens per row; the grade is read at position lengths-1
    kv_rows     (N,)   int64     rows whose present KV to return (empty while scoring: no copies)
    vocab_rows  (M,)   int64     rows whose full-vocabulary next-token logits to return (decoding)
    past_key.i / past_value.i (1, kv_heads, P, head_dim)  ONE prefix KV, broadcast to all B rows

and returns grade_logits (B, K), next_token_logits (M, V) and present_key.i / present_value.i
(N, kv_heads, P+T, head_dim). Scoring a query runs the prefix once (kv_rows=[0]) and then every batch
of documents against that one KV; explain() decodes token by token with the KV cache.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from answerfirst.artifact import Manifest, ManifestError, Variant, bind_format, check_file_sizes
from answerfirst.extras import missing_extra
from answerfirst.runtime._common import (
    GRAPH_CPU_BATCH_TOKENS,
    PrefixCache,
    ScorerConfig,
    even_spans,
    right_padded,
)
from answerfirst.runtime._tokenizer import ArtifactTokenizer

logger = logging.getLogger(__name__)

# Metadata keys the exporter writes into every graph; the runtime checks them against the manifest.
META_GRAPH_VERSION = "answerfirst.graph_version"
META_GRADE_IDS = "answerfirst.grade_token_ids"
META_LAYERS = "answerfirst.num_layers"
META_KV_HEADS = "answerfirst.num_key_value_heads"
META_HEAD_DIM = "answerfirst.head_dim"
META_VOCAB = "answerfirst.vocab_size"
META_SOURCE_SHA = "answerfirst.source_sha256"
META_MAX_POSITIONS = "answerfirst.max_position_embeddings"
GRAPH_VERSION = "1"
# The prompt limit of a graph exported before META_MAX_POSITIONS was recorded (Qwen3's own is 40960).
UNRECORDED_MAX_POSITIONS = 32768


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise missing_extra("the onnx backend", "onnx", e) from None
    return onnxruntime


def open_session(path: Path, threads: int | None, prepack: bool = True, profile_prefix: str | None = None) -> Any:
    """An InferenceSession on the CPU provider; an unreadable graph is a ManifestError naming the file.

    prepack: let ORT re-lay constant weights for its GEMM kernels at load. For fp32 graphs that buys
    ~10% speed for a full second copy of the weights; for int8 graphs it buys nothing measurable (at
    Qwen3-0.6B: 6.5 s either way for 16 documents, RSS 2.0 GB with vs 0.46 GB after load without),
    so quantized variants open without it (see `prepacks`).
    profile_prefix: turn on onnxruntime's per-kernel profiler, writing PREFIX_<date>.json at
    end_profiling() (answerfirst.bench.profile reads it).
    """
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # one chain of ops: inter-op threads idle
    options.inter_op_num_threads = 1
    # Graph order, not ORT's default (a reverse DFS from the outputs, which runs every layer's
    # present-KV slice last and so keeps all 28 layers' K/V of the batch alive: +0.6 GB at 16 docs).
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    # Memory patterns are planned per input shape, and every batch has a new one: the arena kept
    # growing query after query (+0.8 GB per query at 16 docs) for no speed gain.
    options.enable_mem_pattern = False
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if threads is not None:
        options.intra_op_num_threads = threads
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    options.log_severity_level = 3  # ORT's own warnings (e.g. unused initializers) are not the user's concern
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own pybind exception types (InvalidProtobuf, Fail, ...)
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ManifestError(
            f"{path} could not be loaded by onnxruntime ({type(e).__name__}: {first_line[:300]}); the file "
            "(or its .data file) is corrupted, truncated or not an answerfirst graph: re-run `answerfirst export onnx`"
        ) from None


class OnnxBackend:
    """The Backend protocol over one ONNX Runtime session of an answerfirst scoring graph.

    The exporter (parity of a graph not yet in a manifest) and bench/profile.py (a profiling
    session) build one from `open_session(...)` and the prompt tokenizer's pad id; `session` is
    public for what they read from it (the profiler's output).
    reopen: opens another session of the same graph on a given number of threads (load() passes
    it); without it there is no concurrent_copy.
    """

    name = "onnx"
    default_batch_tokens = GRAPH_CPU_BATCH_TOKENS  # the CPU execution provider (OpenVinoBackend: its CPU plugin)
    even_spans = False  # an even prefix and pass length (_common.py: right_padded); OpenVinoBackend's on bf16

    def __init__(self, session: Any, pad_id: int, where: str = "graph", reopen: Callable[[int], Any] | None = None):
        self.session = session
        self._reopen = reopen
        self.pad_id = int(pad_id)
        self.where = self.artifact = where
        options = session.get_session_options()
        self.threads = int(options.intra_op_num_threads)  # per session: 0 = onnxruntime's default (all cores)
        meta = session.get_modelmeta().custom_metadata_map
        if META_MAX_POSITIONS in meta:
            self.max_positions = int(meta[META_MAX_POSITIONS])
            self.context_note = "max_position_embeddings of the exported model"
        else:
            self.max_positions = UNRECORDED_MAX_POSITIONS
            self.context_note = "assumed: this graph records no limit; re-export it to record the model's own"
        try:
            self.num_layers = int(meta[META_LAYERS])
            self.kv_heads = int(meta[META_KV_HEADS])
            self.head_dim = int(meta[META_HEAD_DIM])
            self.vocab_size = int(meta[META_VOCAB])
            self.grade_ids = tuple(json.loads(meta[META_GRADE_IDS]))
        except (KeyError, ValueError) as e:
            raise ManifestError(
                f"{where} lacks answerfirst metadata ({e}); it was not written by `answerfirst export onnx`"
            ) from None
        if meta.get(META_GRAPH_VERSION) != GRAPH_VERSION:
            raise ManifestError(
                f"{where} is graph version {meta.get(META_GRAPH_VERSION)!r}; this answerfirst reads version "
                f"{GRAPH_VERSION}: re-export with `answerfirst export onnx`"
            )
        self.past_names = [n for i in range(self.num_layers) for n in (f"past_key.{i}", f"past_value.{i}")]
        self.present_names = [n.replace("past_", "present_") for n in self.past_names]
        inputs = {i.name for i in session.get_inputs()}
        outputs = {o.name: o for o in session.get_outputs()}
        expected_inputs = {"input_ids", "lengths", "kv_rows", "vocab_rows", *self.past_names}
        if inputs != expected_inputs or not {"grade_logits", "next_token_logits", *self.present_names} <= set(outputs):
            raise ManifestError(f"{where}: its inputs/outputs are not those of an answerfirst scoring graph; re-export it")
        graph_k = outputs["grade_logits"].shape[1]
        if graph_k != len(self.grade_ids):
            raise ManifestError(f"{where}: grade_logits has {graph_k} columns but the metadata names {len(self.grade_ids)} grade ids")
        self._empty_rows = np.zeros((0,), dtype=np.int64)
        self._row0 = np.zeros((1,), dtype=np.int64)
        self._empty_past = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        self.prefix_cache = PrefixCache()

    # -- scoring ---------------------------------------------------------------------------------

    def grade_logits(self, prefix_ids: Sequence[int] | None, continuations: Sequence[Sequence[int]]) -> np.ndarray:
        if self.even_spans:
            prefix_ids, continuations = even_spans(prefix_ids, continuations)
        lengths = np.array([len(c) for c in continuations], dtype=np.int64)
        if lengths.min() < 1:
            raise ValueError("every continuation needs at least one token")
        input_ids = right_padded(continuations, self.pad_id, self.even_spans)
        past = self._empty_feed() if prefix_ids is None else self.prefix_cache.get(prefix_ids, self._run_prefix)
        (grade_logits,) = self.session.run(
            ["grade_logits"],
            {"input_ids": input_ids, "lengths": lengths, "kv_rows": self._empty_rows, "vocab_rows": self._empty_rows, **past},
        )
        return grade_logits  # (B, K)

    def forget_prefixes(self) -> None:
        self.prefix_cache.clear()

    def concurrent_copy(self, threads: int) -> OnnxBackend | None:
        """A second session of the graph on `threads` threads. A session of one thread has no pool:
        each Run call computes on its caller's thread, so N callers run N passes side by side. The
        logits equal this session's bit for bit, whatever the thread counts: each output of a
        kernel is summed by one thread in the same order (tests/test_serve.py checks it)."""
        if self._reopen is None:
            return None
        return type(self)(self._reopen(threads), self.pad_id, self.where, self._reopen)

    def _run_prefix(self, prefix_ids: tuple[int, ...]) -> dict[str, np.ndarray]:
        """The prefix KV (1, kv_heads, P, head_dim) per layer (PrefixCache keeps the last few)."""
        ids = np.array([prefix_ids], dtype=np.int64)  # (1, P)
        present = self.session.run(
            self.present_names,
            {
                "input_ids": ids,
                "lengths": np.array([len(prefix_ids)], dtype=np.int64),
                "kv_rows": self._row0,
                "vocab_rows": self._empty_rows,
                **self._empty_feed(),
            },
        )
        return dict(zip(self.past_names, present, strict=True))

    def _empty_feed(self) -> dict[str, np.ndarray]:
        return dict.fromkeys(self.past_names, self._empty_past)

    # -- decoding --------------------------------------------------------------------------------

    def generate(self, input_ids: Sequence[int], max_new_tokens: int) -> Iterator[int]:
        """Greedy decoding with the KV cache: the prompt runs once, then one token per step."""
        ids = np.array([list(input_ids)], dtype=np.int64)  # (1, T)
        past = self._empty_feed()
        names = ["next_token_logits", *self.present_names]
        for _ in range(max_new_tokens):
            logits, *present = self.session.run(
                names,
                {
                    "input_ids": ids,
                    "lengths": np.array([ids.shape[1]], dtype=np.int64),
                    "kv_rows": self._row0,
                    "vocab_rows": self._row0,
                    **past,
                },
            )
            next_id = int(logits[0].argmax())  # (1, V) logits at the last position only
            yield next_id
            past = dict(zip(self.past_names, present, strict=True))
            ids = np.array([[next_id]], dtype=np.int64)


# ------------------------------------------------------------------------------------------------
# open_onnx: called by answerfirst.runtime.api.load
# ------------------------------------------------------------------------------------------------


def check_graph_matches_manifest(backend: OnnxBackend, manifest: Manifest, where: str) -> None:
    if backend.grade_ids != tuple(manifest.grade_token_ids):
        raise ManifestError(
            f"{where}: the graph scores grade token ids {list(backend.grade_ids)} (K={len(backend.grade_ids)}) but "
            f"the manifest names {list(manifest.grade_token_ids)} (K={len(manifest.grade_token_ids)}); the graph "
            "and answerfirst.json come from different exports: re-run `answerfirst export onnx`"
        )
    sha = backend.session.get_modelmeta().custom_metadata_map.get(META_SOURCE_SHA)
    expected_sha = manifest.source.get("sha256")
    if sha and expected_sha and sha != expected_sha:
        raise ManifestError(
            f"{where}: the graph was exported from weights {sha[:12]}… but the manifest's source is "
            f"{expected_sha[:12]}…; re-run `answerfirst export onnx`"
        )


def prepacks(variant: Variant) -> bool:
    """Whether a variant's session should prepack its weights (fp32 yes, quantized no: see open_session)."""
    return not (variant.quantization or "").startswith("int8")


def open_onnx(
    location: Path, manifest: Manifest | None, threads: int | None, variant: str | None, config: ScorerConfig
) -> tuple[OnnxBackend, Any]:
    import_onnxruntime()
    location = Path(location)
    if manifest is None or manifest.kind != "onnx":
        raise ManifestError(f"{location} is not an ONNX export (no onnx answerfirst.json); run `answerfirst export onnx`")
    chosen = manifest.variant(variant)
    if variant is None:
        logger.info("onnx: using variant %r (%s), the fastest whose parity passed", chosen.name, chosen.file)
    check_file_sizes(location, manifest, [chosen.file, chosen.file + ".data"], "re-run `answerfirst export onnx`")

    try:
        tokenizer = ArtifactTokenizer.from_dir(location)
    except ValueError as e:
        raise ManifestError(f"{location}: the export's tokenizer files are missing or unreadable ({e}); re-export") from None
    prompts = bind_format(tokenizer, manifest, str(location), config.max_doc_tokens)
    path = location / chosen.file
    prepack = prepacks(chosen)
    backend = OnnxBackend(
        open_session(path, threads, prepack), pad_id=prompts.pad_id, where=str(path), reopen=lambda n: open_session(path, n, prepack)
    )
    check_graph_matches_manifest(backend, manifest, str(path))
    return backend, prompts


__all__ = [
    "GRAPH_VERSION", "META_GRADE_IDS", "META_GRAPH_VERSION", "META_HEAD_DIM", "META_KV_HEADS", "META_LAYERS",
    "META_MAX_POSITIONS", "META_SOURCE_SHA", "META_VOCAB", "OnnxBackend", "import_onnxruntime", "open_onnx", "open_session", "prepacks",
]
