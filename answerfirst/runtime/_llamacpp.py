"""llama.cpp backend: scores a GGUF export through llama-cpp-python's C API (its ctypes layer).

One llama.cpp context holds a unified KV cache shared by up to `batch_size + 1` sequences:

    seq 0        the rubric+query prefix (computed once per query, kept across calls; always
                 computed whole, from position 0: a prefix evaluated in other chunks, e.g. after
                 the rubric cells of another query, gives KV that differs in the last bits, and
                 scores would then depend on what was scored before)
    seq 1..B     one document each: llama_memory_seq_cp(0 -> i) makes the prefix's KV cells part
                 of sequence i (no copy, no recomputation), then every document's doc+suffix tokens
                 go through llama_decode in one batch, each at positions P, P+1, ... of its own seq.

Only the last token of each document asks for logits; they are read with llama_get_logits_ith
(Llama.scores is not filled without logits_all) and only the K grade ids are kept. explain() runs
llama.cpp's greedy sampler on seq 0 with the KV cache, so its prompt reuses the scored prefix too.
The context is not thread-safe: every call that touches it holds `self._lock`.

The rank path (a manifest variant named "<quant>-rank", `rank=True`): the same schedule, but the
documents run with embeddings on, so llama.cpp's RANK pooling applies the file's rank head
(`cls.output`, the K grade rows; export/gguf.py) to each sequence's last token and a softmax over
the K outputs, read with llama_get_embeddings_seq. It is what `llama-server --reranking` computes,
and it is slower: llama.cpp outputs every token of a pooled batch, so the vocabulary head runs on all
of them (Qwen3-0.6B Q8_0, 16 documents, 2 threads: 4.1 s/doc against 2.4-3.2 s/doc on a loaded
machine). The logits path stays the default; the rank variant's parity is in the manifest.

Where the tokenizer comes from (the Scorer tokenizes with an HF tokenizer, as every backend does):
- an export directory (answerfirst.json): the tokenizer files the exporter saved beside the GGUFs;
- a directory of .gguf files or one .gguf file without manifest: tokenizer.json beside the file if
  there is one, else a tokenizer rebuilt from the GGUF's own metadata (tokens, merges, token types,
  chat template), and the AFRL format from its `answerfirst.format` key (else the default format
  derived from the chat template).
"""

from __future__ import annotations

import collections
import ctypes
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from answerfirst.afrl import AFRLFormat, PromptTokenizer
from answerfirst.artifact import Manifest, bind_format, check_file_sizes
from answerfirst.extras import missing_extra
from answerfirst.runtime._common import CPU_BATCH_TOKENS, ScorerConfig
from answerfirst.runtime._cpu import usable_cores
from answerfirst.runtime._tokenizer import TOKENIZER_FILE, ArtifactTokenizer

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("qwen3",)
# Our keys in a GGUF's metadata (export/gguf.py writes them, llama.cpp ignores them): the AFRL format
# as JSON of AFRLFormat.to_dict(), and the grade token ids, so a lone .gguf file scores correctly.
FORMAT_KEY = "answerfirst.format"
GRADE_IDS_KEY = "answerfirst.grade_token_ids"
_KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8}  # ggml_type ids
RANK_SUFFIX = "-rank"  # a GGUF export's variant "<quant>-rank" scores its file through the rank head
# Sequences per context. llama.cpp keeps an output row of n_vocab floats per sequence: 148 MiB at 256
# sequences for Qwen3's 151,936-token vocabulary, 37 MiB at 64. The n_ctx cells of a decode (1024 by
# default) hold the prefix and every document, so 63 documents in one decode already average under
# 16 tokens each; more sequences buy nothing but that buffer (Qwen3-0.6B Q4_K_M in `make bench`:
# peak RSS 857 -> 742 MiB).
MAX_SEQUENCES = 64


class GGUFError(ValueError):
    """A GGUF file is truncated, corrupt, of another architecture, or does not fit the context."""


# --------------------------------------------------------------------------------------------
# llama-cpp-python: lazy import, logs routed to logging
# --------------------------------------------------------------------------------------------


def import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as e:
        error = missing_extra("the GGUF backend", "gguf", e)
        raise ImportError(
            f'{error} (it builds llama.cpp from source; CMAKE_ARGS="-DGGML_NATIVE=OFF" gives a portable build)'
        ) from None
    return llama_cpp


_recent_llama_messages: collections.deque[str] = collections.deque(maxlen=20)
_llama_logger = logging.getLogger(__name__ + ".llama")
_log_callback: Any = None


def route_llama_logs(llama_cpp: Any) -> None:
    """Send llama.cpp's log lines to logging (DEBUG; warnings and errors as such) instead of stderr,
    and keep the last warnings/errors to quote in our own error messages."""
    global _log_callback
    if _log_callback is not None:
        return
    levels = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level: 1 debug, 2 info, 3 warn, 4 error, 5 cont

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: Any) -> None:
        message = text.decode("utf-8", errors="replace").rstrip()
        if not message:
            return
        if level in levels:
            _recent_llama_messages.append(message)
        _llama_logger.log(levels.get(level, logging.DEBUG), "%s", message)

    _log_callback = callback  # keep a reference: ctypes must not free the callback
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()


def _llama_said() -> str:
    return (" llama.cpp said: " + " | ".join(_recent_llama_messages)) if _recent_llama_messages else ""


# --------------------------------------------------------------------------------------------
# GGUF metadata: validation, tokenizer and format of a file without manifest
# --------------------------------------------------------------------------------------------


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """Validate a GGUF file (complete, a Qwen3 model, byte-level BPE vocabulary) and return its
    metadata as {key: python value}. Raises GGUFError naming the problem and the fix."""
    try:
        import gguf
    except ImportError as e:
        raise missing_extra("reading a .gguf file without answerfirst.json", "gguf", e) from None
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(path)
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except Exception as e:  # the reader raises ValueError/IndexError/... on a cut or corrupt file
        raise GGUFError(f"{path} is not a complete GGUF file (truncated or corrupt: {e}); re-export it") from None
    if end > size:
        raise GGUFError(
            f"{path} is truncated: its tensors need {end} bytes but the file has {size}; re-export or re-copy it"
        )
    metadata = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    architecture = metadata.get("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path} is a {architecture!r} model; the answerfirst GGUF backend runs "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} students (write one with `answerfirst export gguf`)"
        )
    if metadata.get("tokenizer.ggml.model") != "gpt2":
        raise GGUFError(f"{path}: tokenizer model {metadata.get('tokenizer.ggml.model')!r}; expected byte-level BPE (gpt2)")
    return metadata


def tokenizer_from_metadata(metadata: dict[str, Any]) -> ArtifactTokenizer:
    """A tokenizer equal to the one the GGUF was written from: BPE over the GGUF's tokens
    and merges, Qwen's NFC + split regex + byte-level pre-tokenization, added tokens from the token
    types (CONTROL = special, USER_DEFINED = plain added token), and the GGUF's chat template."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    from answerfirst.qwen3 import QWEN_SPLIT_PATTERN

    pre = metadata.get("tokenizer.ggml.pre")
    if pre != "qwen2":
        raise GGUFError(f"GGUF pre-tokenizer {pre!r}: only Qwen's ('qwen2') can be rebuilt; put tokenizer.json beside the file")
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    types: list[int] = [int(t) for t in metadata["tokenizer.ggml.token_type"]]
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    control, user_defined = 3, 4  # gguf.TokenType
    backend.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == control]
    )
    backend.add_tokens(
        [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == user_defined]
    )

    def token(key: str) -> str | None:
        i = metadata.get(key)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    return ArtifactTokenizer(
        backend,
        eos_token=token("tokenizer.ggml.eos_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        chat_template=metadata.get("tokenizer.chat_template"),
    )


def _tokenizer_from_dir(directory: Path) -> ArtifactTokenizer:
    try:
        return ArtifactTokenizer.from_dir(directory)
    except ValueError as e:
        raise GGUFError(f"{directory}: the export's tokenizer is missing or unreadable ({e}); re-export") from None


def _manifest_from_metadata(metadata: dict[str, Any]) -> Manifest | None:
    """The AFRL format the exporter stored in the GGUF, as an in-memory manifest (None if absent)."""
    stored = metadata.get(FORMAT_KEY)
    if not stored:
        return None
    try:
        fmt = AFRLFormat.from_dict(json.loads(stored))
        return Manifest(kind="gguf", format=fmt, grade_token_ids=list(metadata.get(GRADE_IDS_KEY, [])))
    except (ValueError, TypeError) as e:
        raise GGUFError(f"the GGUF's {FORMAT_KEY} metadata is invalid: {e}") from None


def _resolve_file(location: Path, manifest: Manifest | None, variant: str | None) -> tuple[Path, bool]:
    """The file to load, and whether its rank head scores it (a "-rank" variant of an export)."""
    if manifest is not None:
        chosen = manifest.variant(variant)
        return location / chosen.file, chosen.name.endswith(RANK_SUFFIX)
    if location.is_file():
        if variant is not None:
            raise ValueError(f"variant={variant!r} selects a file of an export directory; {location} is one file")
        return location, False
    files = sorted(location.glob("*.gguf"))
    if variant is not None:
        chosen = [f for f in files if variant in (f.name, f.stem) or f.stem.endswith("-" + variant)]
        if len(chosen) != 1:
            raise ValueError(f"variant={variant!r} matches {len(chosen)} of {[f.name for f in files]} in {location}")
        return chosen[0], False
    if len(files) != 1:
        raise ValueError(
            f"{location} holds {len(files)} .gguf files ({', '.join(f.name for f in files)}) and no answerfirst.json; "
            "pass variant=NAME or the path of one file"
        )
    return files[0], False


def open_gguf(
    location: Path, manifest: Manifest | None, threads: int | None, variant: str | None, config: ScorerConfig
) -> tuple[LlamaCppBackend, PromptTokenizer]:
    """The adapter and prompt tokenizer for an export dir, a dir of .gguf files, or one .gguf file."""
    llama_cpp = import_llama_cpp()  # first: a missing extra fails before any slow import
    location = Path(location)
    path, rank = _resolve_file(location, manifest, variant)
    if not path.is_file():
        raise GGUFError(f"{path} does not exist")
    where = str(path)
    if manifest is not None:
        # An export dir: its manifest holds the format and each file's size, so the file's own
        # metadata is not read here (GGUFReader materialises the 151k-entry vocabulary and merges
        # as numpy views, a ~0.5 GB transient at Qwen3 size); llama.cpp validates it as it loads.
        check_file_sizes(location, manifest, [path.name], "re-run `answerfirst export gguf`")
        tokenizer = _tokenizer_from_dir(location)
        format_manifest = manifest
    else:
        metadata = read_gguf_metadata(path)
        beside = (path.parent / TOKENIZER_FILE).is_file()
        tokenizer = _tokenizer_from_dir(path.parent) if beside else tokenizer_from_metadata(metadata)
        format_manifest = _manifest_from_metadata(metadata)
    prompts = bind_format(tokenizer, format_manifest, where, config.max_doc_tokens)
    rank_grades = prompts.format.grades if rank else None
    backend = LlamaCppBackend(llama_cpp, path, prompts.grade_ids, threads, config, rank_grades)
    if max(prompts.grade_ids) >= backend.n_vocab:
        backend.close()
        raise GGUFError(f"{where}: grade token ids {list(prompts.grade_ids)} exceed the GGUF's {backend.n_vocab} tokens")
    return backend, prompts


# --------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------


class LlamaCppBackend:
    name = "gguf"
    default_batch_tokens = CPU_BATCH_TOKENS  # the CPU build of llama.cpp

    def __init__(
        self, llama_cpp: Any, path: Path, grade_ids: Sequence[int], threads: int | None, config: ScorerConfig,
        rank_grades: Sequence[str] | None = None,
    ):
        """rank_grades: score through the file's rank head (module docstring); the grade strings, in
        grade order, that its output labels must name."""
        if config.kv_cache_type == "q8_0" and not config.flash_attn:
            raise ValueError("kv_cache_type='q8_0' needs flash_attn=True (llama.cpp quantizes the V cache only then)")
        route_llama_logs(llama_cpp)
        self._llama = llama_cpp
        self.path = path
        self.artifact = str(path)
        self.grade_ids = np.asarray(grade_ids, dtype=np.int64)
        self._lock = threading.Lock()
        self._seq0: list[int] = []  # the token ids whose KV seq 0 holds, from position 0
        self._scored_prefix: tuple[int, ...] | None = None  # a prefix whose scoring run made seq0's first cells
        self.evaluated_tokens = 0  # tokens run through llama_decode (shows that prefixes are reused)
        self._model = self._ctx = self._batch = self._sampler = None

        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        # Weights stay in plain CPU buffers, never llama.cpp's "extra" repacked ones. Measured at
        # Qwen3-0.6B Q4_K_M on a 2-core AMD EPYC (16 documents, flash attention, n_ctx 1024): the
        # CPU_REPACK copy of the Q4_K tensors cost +200 MiB RSS and ran slower (9.4 s vs 7.0 s).
        # An AMX build puts Q8_0/Q4_K weights in its AMX buffer type instead, and llama_decode
        # then segfaults on our multi-sequence batches (llama-cpp-python 0.3.36 on a Sapphire
        # Rapids-class Xeon; cf. ggml-org/llama.cpp#20824).
        model_params.use_extra_bufts = False
        _recent_llama_messages.clear()
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self._model:
            raise GGUFError(f"llama.cpp could not load {path}.{_llama_said()}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))

        if threads is None:
            threads = usable_cores()
        # seq 0 (the prefix) + one per document of a decode; _groups splits a pass into decodes of at
        # most n_seq - 1 documents (and n_ctx cells), so a pass may hold more documents than that.
        # llama.cpp reserves an output row per sequence and aborts (GGML_ASSERT n_outputs_max) when
        # n_seq_max exceeds the n_batch rows a decode can output.
        most = min(llama_cpp.llama_max_parallel_sequences(), config.n_batch, MAX_SEQUENCES)
        self.n_seq = int(most if config.batch_size is None else min(config.batch_size + 1, most))
        self.n_batch = config.n_batch
        # More cells than the model was trained for buys nothing (positions past it are out of distribution).
        n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(self._model))
        n_ctx = min(config.n_ctx, n_ctx_train) if n_ctx_train > 0 else config.n_ctx
        if n_ctx < config.n_ctx:
            logger.info("n_ctx %d capped to the model's training context %d", config.n_ctx, n_ctx)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = config.n_batch
        params.n_ubatch = config.n_batch
        params.n_seq_max = self.n_seq
        params.n_threads = params.n_threads_batch = int(threads)
        params.flash_attn_type = 1 if config.flash_attn else 0
        params.type_k = params.type_v = _KV_TYPES[config.kv_cache_type]
        params.kv_unified = True  # one cell pool: seq_cp shares the prefix's cells instead of copying them
        params.embeddings = False
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            self.close()
            raise GGUFError(f"llama.cpp could not create a context for {path} (n_ctx={n_ctx}).{_llama_said()}")
        self.n_ctx = int(llama_cpp.llama_n_ctx(self._ctx))
        self.threads = int(llama_cpp.llama_n_threads(self._ctx))  # this context's own: Scorers never share it
        # One prompt's cells must fit the pool (_groups splits documents that do not fit together).
        self.max_positions = self.n_ctx
        self.context_note = (
            f"n_ctx={self.n_ctx}, the model's training context" if n_ctx < config.n_ctx
            else f"n_ctx={self.n_ctx}; raise it with ScorerConfig(n_ctx=...)"
        )
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._sampler = llama_cpp.llama_sampler_init_greedy()
        self.rank_columns = None if rank_grades is None else self._rank_head_columns(list(rank_grades))

    def _rank_head_columns(self, grades: list[str]) -> np.ndarray:
        """(K,) the rank head's output index of each grade, checked against the file's output labels."""
        llama_cpp = self._llama
        if llama_cpp.llama_pooling_type(self._ctx) != llama_cpp.LLAMA_POOLING_TYPE_RANK:
            self.close()
            raise GGUFError(f"{self.path} has no RANK pooling: re-export it with `answerfirst export gguf` for a rank variant")
        n_out = int(llama_cpp.llama_model_n_cls_out(self._model))
        labels = [(llama_cpp.llama_model_cls_label(self._model, i) or b"").decode("utf-8") for i in range(n_out)]
        if sorted(labels) != sorted(grades):
            self.close()
            raise GGUFError(f"{self.path}: its rank head's output labels {labels} are not the grades {grades}; re-export it")
        return np.array([labels.index(g) for g in grades], dtype=np.int64)

    # -- decoding ----------------------------------------------------------------------------------

    def _decode(self, entries: Sequence[tuple[int, int, int, int]], on_logits: Any = None, pooled: bool = False) -> None:
        """Run (token, position, seq_id, key) entries through llama_decode in chunks of n_batch;
        key >= 0 asks for that token's logits, handed to on_logits(key, (n_vocab,) float32 view).
        pooled (embeddings on): key >= 0 marks a sequence's last token, and on_logits gets that
        sequence's pooled output, read after the chunk that holds it (llama.cpp keeps a decode
        call's pooled outputs only until the next call)."""
        llama_cpp, batch = self._llama, self._batch
        for start in range(0, len(entries), self.n_batch):
            chunk = entries[start : start + self.n_batch]
            batch.n_tokens = len(chunk)
            for i, (token, pos, seq, key) in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = pooled or key >= 0  # pooling needs every token as an output
            status = llama_cpp.llama_decode(self._ctx, batch)
            if status != 0:
                raise GGUFError(
                    f"llama_decode failed (status {status}"
                    + (": no KV slot; raise ScorerConfig(n_ctx=...) or lower batch_size" if status == 1 else "")
                    + f").{_llama_said()}"
                )
            self.evaluated_tokens += len(chunk)
            for i, (_, _, seq, key) in enumerate(chunk):
                if key < 0 or on_logits is None:
                    continue
                if pooled:
                    pointer = llama_cpp.llama_get_embeddings_seq(self._ctx, seq)
                    if not pointer:
                        raise GGUFError(f"llama.cpp gave no pooled output for sequence {seq}.{_llama_said()}")
                    on_logits(key, np.ctypeslib.as_array(pointer, shape=(len(self.rank_columns),)))
                else:
                    pointer = llama_cpp.llama_get_logits_ith(self._ctx, i)
                    on_logits(key, np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)))

    def _sync_seq0(self, ids: list[int], need_logits: bool) -> None:
        """Make seq 0 hold exactly `ids`: keep the longest common prefix of what it holds, drop the
        rest, evaluate the remainder (at least the last token when its logits are needed)."""
        common = 0
        for held, wanted in zip(self._seq0, ids, strict=False):
            if held != wanted:
                break
            common += 1
        if need_logits:
            common = min(common, len(ids) - 1)
        if self._scored_prefix is not None and common < len(self._scored_prefix):
            self._scored_prefix = None  # its cells are about to be replaced
        if common < len(self._seq0):
            self._llama.llama_memory_seq_rm(self._memory, 0, common, -1)
            self._seq0 = self._seq0[:common]
        last = len(ids) - 1
        entries = [(ids[t], t, 0, 0 if need_logits and t == last else -1) for t in range(common, len(ids))]
        try:
            self._decode(entries)
        except BaseException:
            self._reset()
            raise
        self._seq0 = list(ids)

    def concurrent_copy(self, threads: int) -> None:
        """A llama.cpp context runs one decode at a time (self._lock)."""
        return None

    def forget_prefixes(self) -> None:
        with self._lock:
            self._reset()

    def _reset(self) -> None:
        self._llama.llama_memory_clear(self._memory, True)
        self._seq0 = []
        self._scored_prefix = None

    # -- the adapter contract ------------------------------------------------------------------------

    def grade_logits(self, prefix_ids: Sequence[int] | None, continuations: Sequence[Sequence[int]]) -> np.ndarray:
        """(B, K) grade logits at the last token of prefix + continuation[i] (or continuation[i] alone)."""
        out = np.empty((len(continuations), len(self.grade_ids)), dtype=np.float32)
        pooled = self.rank_columns is not None

        def keep_grades(row: int, logits: np.ndarray) -> None:
            if pooled:  # (K,) softmax of the rank head; its logs are the grade logits up to a constant
                out[row] = np.log(np.maximum(logits[self.rank_columns], np.finfo(np.float32).tiny))
            else:
                out[row] = logits[self.grade_ids]  # (K,) of the (n_vocab,) last-position logits

        with self._lock:
            if prefix_ids is None:
                self._reset()  # whole prompts: free every cell for them
                start = 0
            else:
                prefix = tuple(prefix_ids)
                if self._scored_prefix != prefix:
                    self._reset()  # the prefix runs whole, so its KV never depends on earlier calls
                self._sync_seq0(list(prefix), need_logits=False)  # drops any explanation after it
                self._scored_prefix = prefix
                start = len(prefix)
            for group in self._groups(continuations, start):
                seqs = range(1, len(group) + 1)
                try:
                    if prefix_ids is not None:
                        for seq in seqs:
                            self._llama.llama_memory_seq_cp(self._memory, 0, seq, -1, -1)
                    entries = [
                        (token, start + t, seq, row if t == len(continuations[row]) - 1 else -1)
                        for row, seq in zip(group, seqs, strict=True)
                        for t, token in enumerate(continuations[row])
                    ]
                    self._llama.llama_set_embeddings(self._ctx, pooled)
                    self._decode(entries, keep_grades, pooled)
                except BaseException:
                    self._reset()
                    raise
                finally:
                    self._llama.llama_set_embeddings(self._ctx, False)
                    for seq in seqs:
                        self._llama.llama_memory_seq_rm(self._memory, seq, -1, -1)
        return out

    def _groups(self, continuations: Sequence[Sequence[int]], start: int) -> Iterator[list[int]]:
        """Rows that fit together: at most n_seq - 1 sequences, and the cells of seq 0 plus every row's
        tokens within n_ctx."""
        base = len(self._seq0)  # cells seq 0 holds (the prefix, shared by every row)
        group: list[int] = []
        used = base
        for row, ids in enumerate(continuations):
            if not ids:
                raise ValueError(f"continuation {row} is empty")
            if base + len(ids) > self.n_ctx:
                raise GGUFError(
                    f"a prompt of {start + len(ids)} tokens does not fit the context (n_ctx={self.n_ctx}); "
                    "raise ScorerConfig(n_ctx=...) or lower max_doc_tokens"
                )
            if group and (len(group) == self.n_seq - 1 or used + len(ids) > self.n_ctx):
                yield group
                group, used = [], base
            group.append(row)
            used += len(ids)
        if group:
            yield group

    def generate(self, input_ids: Sequence[int], max_new_tokens: int) -> Iterator[int]:
        """Greedy tokens after input_ids by llama.cpp's greedy sampler, with the KV cache in seq 0.

        The lock is held per step, not across yields, so scoring can run between two tokens; the next
        step then re-evaluates only what scoring displaced from seq 0."""
        ids = list(input_ids)
        for _ in range(max_new_tokens):
            if len(ids) >= self.n_ctx:
                logger.warning("explanation stopped at the context size (n_ctx=%d)", self.n_ctx)
                return
            with self._lock:
                self._sync_seq0(ids, need_logits=True)
                next_id = int(self._llama.llama_sampler_sample(self._sampler, self._ctx, -1))
            yield next_id
            if self._llama.llama_vocab_is_eog(self._vocab, next_id):
                return
            ids.append(next_id)

    # -- tokenizer of the GGUF (tests and diagnostics: the runtime tokenizes with the HF tokenizer) --

    def tokenize(self, text: str, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        tokens = (self._llama.llama_token * capacity)()
        n = self._llama.llama_tokenize(self._vocab, data, len(data), tokens, capacity, False, parse_special)
        if n < 0:
            raise GGUFError(f"llama_tokenize needs {-n} tokens for {text[:40]!r}")
        return list(tokens[:n])

    def close(self) -> None:
        llama_cpp = getattr(self, "_llama", None)
        if llama_cpp is None:
            return
        if self._sampler:
            llama_cpp.llama_sampler_free(self._sampler)
            self._sampler = None
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the ctypes functions may already be gone
            pass


__all__ = [
    "FORMAT_KEY", "GRADE_IDS_KEY", "GGUFError", "RANK_SUFFIX", "LlamaCppBackend", "import_llama_cpp", "open_gguf", "read_gguf_metadata",
    "route_llama_logs", "tokenizer_from_metadata",
]
