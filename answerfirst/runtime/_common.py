"""What the Scorer (api.py) and every backend adapter share: the config, the adapter protocol, the prefix cache.

It sits below api.py and the adapters, so the adapters never import api.py (which imports them
lazily in load()): imports run one way, afrl -> artifact -> _common -> adapters -> api.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

DEFAULT_MAX_QUERY_TOKENS = 256
# The token budget of a forward pass on a CPU (ScorerConfig.batch_tokens=None there): about what the
# former default of 16 documents per pass held on workload W (16 x ~260-token prompts), see README.
CPU_BATCH_TOKENS = 4096
# The same for the exported graph on onnxruntime's or OpenVINO's CPU kernels, which score W faster in
# smaller passes (README, "Pass size on a CPU"; bench/pass_size.py): real-size ONNX int8 7.7-7.8 s at
# 1024 tokens against 9.1 s at 4096, with a lower peak (0.75 GB against 0.92 in make bench). Torch
# bf16 goes the other way (4.9 s at 4096, 5.2-5.5 s at 1024), so it keeps CPU_BATCH_TOKENS.
GRAPH_CPU_BATCH_TOKENS = 1024


PRECISIONS = ("fp32", "bf16", "auto")  # load(precision=...) of a torch checkpoint (runtime/_torch.py: compute_dtype)


@dataclass(frozen=True)
class ScorerConfig:
    """Knobs beyond load()'s arguments. Each backend reads the ones that concern it.

    batch_tokens: the most prompt tokens one forward pass holds, counted as its documents x the longest
        prompt among them (rubric + query + document + template, padding included). The count is the
        same whether or not the prefix is reused, so one budget gives the same passes either way.
        Documents are sorted by length first, so a pass pads little; a prompt longer than the
        budget runs alone. None (default): the device's budget, picked at load (repr(scorer) shows
        it, and load() logs it): on a CPU, CPU_BATCH_TOKENS for torch and llama.cpp and
        GRAPH_CPU_BATCH_TOKENS for the exported graph (ONNX, OpenVINO); on a CUDA GPU what half of its free
        memory holds at the cost per token measured by a probe pass at load, at most
        CUDA_MAX_BATCH_TOKENS (runtime/_torch.py). Larger passes cost fewer launches and less
        Python per document, which is what a GPU is short of; on a CPU they gain little and cost memory.
    batch_size: the most documents in one pass, on top of batch_tokens; None (default): no count
        limit. (`answerfirst serve --max-batch` sets it; llama.cpp runs at most 255 per decode.)
    reuse_prefix: compute the rubric+query prefix once per query (off only to measure its gain).
    max_doc_tokens: override the artifact's document truncation length.
    max_query_tokens: a longer query is refused (FormatError) before anything runs. The query is
        never truncated (it is part of the shared prefix), and without a bound one request can take
        a process down: a 200,000-character query (~32k tokens) grew an ONNX scorer past 24 GB.
        256 tokens hold any search query; raise it for long questions (the prompt must still fit
        the model's context, which every backend checks too).
    fused_kernels: the torch backend's RMSNorm, rotary and SiLU-gate chains as kernels compiled by
        torch.compile (runtime/_torch.py: FusedKernels; needs a C++ compiler, compiled code cached on
        disk). None (default): on for bf16 on a CPU, where W scored ~25% faster, and off where
        inductor cannot compile (a warning says why); True: on (fp32 too; an error where they cannot
        run); False: transformers' eager modules, step for step.
    n_ctx, n_batch, flash_attn, kv_cache_type: llama.cpp context settings ("f32" KV for parity).
        n_ctx is the KV cell pool of ALL documents in flight, so it bounds memory, not the batch:
        documents that do not fit together run in more llama_decode groups, and attention spans
        the cells in use, so a smaller pool is also faster. 1024 cells hold a 512-token document's
        prompt plus a 128-token explanation. Flash attention is on: at Qwen3-0.6B on 2 cores it
        scored 16 documents in 7.0 s instead of 8.3 s (Q4_K_M) and 11.7 s instead of 13.7 s (Q8_0).
        Against the former n_ctx 2048 / n_batch 512 / no flash attention (16.6 s, 1177 MiB peak
        RSS at Q4_K_M there) these defaults, with plain weight buffers, are 2.4x faster and lighter.
    """

    batch_tokens: int | None = None
    batch_size: int | None = None
    reuse_prefix: bool = True
    max_doc_tokens: int | None = None
    max_query_tokens: int = DEFAULT_MAX_QUERY_TOKENS
    fused_kernels: bool | None = None
    n_ctx: int = 1024
    n_batch: int = 256
    flash_attn: bool = True
    kv_cache_type: str = "f16"

    def __post_init__(self) -> None:
        for name, none_means in (("batch_tokens", "the device's default"), ("batch_size", "no limit on documents per pass")):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}: must be an int >= 1, or None for {none_means}; got {value!r}")
        if self.max_doc_tokens is not None and self.max_doc_tokens < 1:
            raise ValueError(f"max_doc_tokens: must be >= 1, got {self.max_doc_tokens}")
        if self.max_query_tokens < 1:
            raise ValueError(f"max_query_tokens: must be >= 1, got {self.max_query_tokens}")
        if not isinstance(self.n_batch, int) or self.n_batch < 2:
            raise ValueError(f"n_batch: must be an int >= 2 (the prefix's sequence and a document's), got {self.n_batch!r}")
        if self.kv_cache_type not in ("f16", "f32", "q8_0"):
            raise ValueError(f"kv_cache_type: one of f16, f32, q8_0; got {self.kv_cache_type!r}")


class Backend(Protocol):
    """What every adapter answers; the Scorer calls nothing else.

    grade_logits(prefix_ids, continuations) -> (B, K) float array
        prefix_ids: the shared rubric+query prefix whose KV the adapter computes once and reuses
        for every continuation (doc + suffix); None when continuations are whole prompts.
    generate(input_ids, max_new_tokens) -> Iterator[int]
        greedy next-token ids after `input_ids`, using the adapter's KV cache.

    and states what it runs and how long a prompt may be, so the Scorer checks every input against
    the context before any forward pass and names the artifact in its errors.
    """

    name: str
    artifact: str  # the file (or checkpoint directory) whose weights it runs: named in errors
    max_positions: int  # the longest prompt, in tokens, it can score
    context_note: str  # where max_positions comes from and how to change it, for the error message
    default_batch_tokens: int  # ScorerConfig.batch_tokens when the config leaves it None: its device's budget

    def grade_logits(self, prefix_ids: Sequence[int] | None, continuations: Sequence[Sequence[int]]) -> np.ndarray: ...

    def generate(self, input_ids: Sequence[int], max_new_tokens: int) -> Iterator[int]: ...

    def forget_prefixes(self) -> None:
        """Drop every stored prefix state: the next query computes its prefix as a new one would
        (the benchmark times each query so, since an application rarely repeats one)."""

    def concurrent_copy(self, threads: int) -> Backend | None:
        """A second adapter over the same artifact, on `threads` threads, whose grade_logits calls
        may run at the same time as each other's (from several threads) and give this adapter's
        logits bit for bit; None where the backend runs one pass at a time. It holds its own copy
        of the weights. (`answerfirst serve` runs concurrent passes on it: serve/batcher.py.)"""


def even_spans(
    prefix_ids: Sequence[int] | None, continuations: Sequence[Sequence[int]]
) -> tuple[Sequence[int] | None, Sequence[Sequence[int]]]:
    """The same prompts with a prefix of an even number of tokens: an odd prefix's last token opens
    every continuation instead (a one-token prefix stays). For backends whose kernels want even
    attention spans (see right_padded)."""
    if prefix_ids is None or len(prefix_ids) % 2 == 0 or len(prefix_ids) < 2:
        return prefix_ids, continuations
    return prefix_ids[:-1], [(prefix_ids[-1], *ids) for ids in continuations]


def right_padded(continuations: Sequence[Sequence[int]], pad_id: int, even: bool = False) -> np.ndarray:
    """(B, T) int64 token ids, each row right-padded with pad_id to the longest, so causal attention
    never sees a row's pads; even=True: T rounded up to an even number. The prefix length and T are
    the reduction dimension of attention's probabilities @ V, and with an odd one OpenVINO's AMX bf16
    matmul ran about 4x slower (bench/odd_spans.py; bf16 values are paired along it in AMX tiles)."""
    width = max(len(ids) for ids in continuations)
    padded = np.full((len(continuations), width + (width % 2 if even else 0)), pad_id, dtype=np.int64)
    for row, ids in enumerate(continuations):
        padded[row, : len(ids)] = ids  # a numpy row copy: 4x faster than torch.tensor(lists) at 250 x 260
    return padded


class PrefixCache:
    """The KV state of the last few rubric+query prefixes, keyed by their token ids; thread-safe.

    Scorer.score() hands the same prefix to every batch of a query, and explain() usually follows a
    score() of the same query: with this cache an adapter runs each prefix once. States must be
    read-only once stored (adapters continue from views or copies of them).
    """

    def __init__(self, capacity: int = 2):
        self.capacity = capacity
        self.misses = 0  # prefixes computed (tests and the benchmark read it)
        self._states: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, prefix_ids: Sequence[int], compute: Callable[[tuple[int, ...]], Any]) -> Any:
        key = tuple(prefix_ids)
        with self._lock:
            if key in self._states:
                self._states.move_to_end(key)
                return self._states[key]
        state = compute(key)  # outside the lock: other threads keep scoring meanwhile
        with self._lock:
            self.misses += 1
            self._states[key] = state
            self._states.move_to_end(key)
            while len(self._states) > self.capacity:
                self._states.popitem(last=False)
        return state

    def clear(self) -> None:
        with self._lock:
            self._states.clear()
