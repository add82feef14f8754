"""Torch backend: a transformers causal LM, scored with one forward pass per batch of documents.

Scoring never computes full-vocabulary logits: the decoder body gives hidden states, the last real
position of each row is gathered, and only the K grade rows of the output head are applied.
Continuations are right-padded: with a causal mask a real token never sees the pads that come after
it, so padded rows stay exact.

Qwen3 models are scored by the adapter's own pass over the model's modules (`_decoder_pass`): each
layer's attention reads the rubric+query prefix's keys and values, one (1, kv_heads, P, head_dim)
tensor per layer computed once per query, next to the batch's own, and nothing of the batch is kept
once its layer is done. transformers' forward with a DynamicCache (the path of other architectures)
keeps every layer's keys and values of the whole batch, the prefix copied into each row, until the
pass ends: for 256 documents of ~260-token prompts at Qwen3-0.6B in bf16 that is 28 layers x 256 x
260 x 8 kv heads x 128 x 2 (k, v) x 2 bytes = 7.1 GiB. On a CPU (fp32, 32 documents of W in passes
of 16) scoring grew RSS by 1684 MiB that way and by 348 MiB with this pass (bench/cpu_passes.py). Attention is
torch's scaled_dot_product_attention; on a GPU the prefix-aware causal mask is a lower-right causal
bias, which runs flash or memory-efficient kernels instead of materializing a mask.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from answerfirst.artifact import Manifest, ManifestError, bind_format
from answerfirst.extras import missing_extra, requires
from answerfirst.runtime._common import CPU_BATCH_TOKENS, PrefixCache, ScorerConfig, right_padded

with requires("torch", "the torch backend"):
    import torch
    import torch.nn.functional as F

logger = logging.getLogger(__name__)

# The default token budget of a pass on a CUDA GPU (ScorerConfig.batch_tokens=None): what
# CUDA_MEMORY_SHARE of the memory left after loading holds, at the bytes per prompt token that a
# probe pass of PROBE_ROWS x PROBE_TOKENS whole prompts (no prefix reuse: the most a budget token
# can cost) measures at load, and at most CUDA_MAX_BATCH_TOKENS.
CUDA_MAX_BATCH_TOKENS = 65536
CUDA_MEMORY_SHARE = 0.5
PROBE_ROWS, PROBE_TOKENS = 16, 256
# Architectures the adapter's own pass (_decoder_pass) reproduces exactly: full attention in every
# layer, embeddings unscaled, pre-norm layers whose attention takes q_norm/k_norm. Others run
# transformers' forward with a DynamicCache.
DECODER_PASS_MODEL_TYPES = ("qwen3",)


class TorchBackend:
    """The Backend protocol over a transformers causal LM.

    Public beyond the protocol, for the kit's own torch tools (distill/label.py generates teacher
    traces with it, export/onnx.py traces its modules): `model`, the transformers model in eval
    mode, and `device`, the torch device it runs on. `decoder_pass` says which forward scores:
    True = the adapter's own shared-prefix pass, False = transformers' forward (other architectures,
    or decoder_pass=False to compare the two).
    """

    name = "torch"

    def __init__(
        self, model: Any, grade_ids: Sequence[int], pad_id: int, device: torch.device, artifact: str = "model",
        decoder_pass: bool | None = None, fused_kernels: bool | None = False,
    ):
        """fused_kernels: ScorerConfig.fused_kernels (None: where it pays, see there); False here by
        default, for the kit's own tools that build a backend around a model they hold."""
        self.model = model
        self.device = torch.device(device)
        self.pad_id = pad_id
        self.artifact = artifact
        self.max_positions = int(getattr(model.config, "max_position_embeddings", None) or 2**31 - 1)
        self.context_note = "max_position_embeddings of its config.json"
        head = model.get_output_embeddings().weight  # (V, H)
        self.grade_head = head[list(grade_ids)].detach().float().clone()  # (K, H)
        self.prefix_cache = PrefixCache()
        unsupported = decoder_pass_unsupported(model)
        if decoder_pass and unsupported:
            raise ValueError(f"{artifact}: the shared-prefix pass cannot run it: {unsupported}")
        self.decoder_pass = not unsupported if decoder_pass is None else decoder_pass
        self.head_dim = int(getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads)
        self._cache_argument = cache_argument(model)
        dtype = model.get_input_embeddings().weight.dtype  # what the hidden states, so q, k and v, are in
        self.dtype = str(dtype).removeprefix("torch.")  # load()'s log and repr(scorer) show it
        self.grouped_attention = self.decoder_pass and grouped_attention_works(self.device, dtype, self.head_dim)
        self.fused = fused_kernels_for(self, dtype, fused_kernels)  # FusedKernels or None: eager modules
        self.probe_bytes_per_token: float | None = None  # GPU memory a prompt token took in the probe pass (CUDA)
        self.default_batch_tokens = self._cuda_batch_tokens() if self.device.type == "cuda" else CPU_BATCH_TOKENS

    @torch.inference_mode()
    def grade_logits(self, prefix_ids: Sequence[int] | None, continuations: Sequence[Sequence[int]]) -> np.ndarray:
        input_ids = torch.from_numpy(right_padded(continuations, self.pad_id)).to(self.device)  # (B, T)
        rows = torch.arange(len(continuations), device=self.device)
        last = torch.tensor([len(c) - 1 for c in continuations], device=self.device)  # (B,) each row's last real token

        past = None if prefix_ids is None else self.prefix_cache.get(prefix_ids, self._run_prefix)
        if self.decoder_pass:
            hidden, _ = _decoder_pass(self.model.model, input_ids, past, self.head_dim, self.grouped_attention, self.fused)  # (B, T, H), pre-norm
            final = self.model.model.norm(hidden[rows, last])  # (B, H): RMSNorm is per position
        else:
            final = self._transformers_pass(input_ids, past, 0 if prefix_ids is None else len(prefix_ids))[rows, last]
        return (final.float() @ self.grade_head.T).cpu().numpy()  # (B, K) grade logits

    def _transformers_pass(self, input_ids: torch.Tensor, past: Any, offset: int) -> torch.Tensor:
        """(B, T, H) final hidden states by transformers' forward, the prefix KV expanded over the batch."""
        cache = None
        if past is not None:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
            for layer_idx, (keys, values) in enumerate(past):
                # (1, kv_heads, P, head_dim) -> (B, kv_heads, P, head_dim): an expand, not a copy; the
                # continuation's KV is concatenated into new tensors, so the cached prefix stays intact.
                batch = input_ids.shape[0]
                cache.update(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), layer_idx)
        positions = torch.arange(offset, offset + input_ids.shape[1], device=self.device).expand_as(input_ids)
        return self.model.model(
            input_ids=input_ids, position_ids=positions, use_cache=cache is not None, **{self._cache_argument: cache}
        ).last_hidden_state

    @property
    def threads(self) -> int:
        """torch's intra-op thread count (process-wide: see set_threads)."""
        return torch.get_num_threads()

    def concurrent_copy(self, threads: int) -> None:
        """torch's intra-op thread count is one per process, so passes cannot each take a share."""
        return None

    def forget_prefixes(self) -> None:
        self.prefix_cache.clear()

    @torch.inference_mode()
    def _run_prefix(self, prefix_ids: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's (keys, values) of the prefix, (1, kv_heads, P, head_dim) each."""
        ids = torch.tensor([prefix_ids], dtype=torch.long, device=self.device)
        if self.decoder_pass:
            return _decoder_pass(self.model.model, ids, None, self.head_dim, self.grouped_attention, self.fused, keep_kv=True)[1]
        out = self.model.model(input_ids=ids, use_cache=True)
        return [(layer.keys, layer.values) for layer in _returned_cache(out).layers]

    @torch.inference_mode()
    def generate(self, input_ids: Sequence[int], max_new_tokens: int) -> Iterator[int]:
        """Greedy decoding with the KV cache; only the last position's logits each step."""
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=self.device)
        past = None
        for _ in range(max_new_tokens):
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_argument: past})
            past = _returned_cache(out)
            next_id = int(out.logits[0, -1].argmax())
            yield next_id
            ids = torch.tensor([[next_id]], dtype=torch.long, device=self.device)

    def _cuda_batch_tokens(self) -> int:
        """The default token budget on this GPU, from a probe pass (see CUDA_MAX_BATCH_TOKENS)."""
        tokens = min(PROBE_TOKENS, self.max_positions)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self.grade_logits(None, [[self.pad_id] * tokens] * PROBE_ROWS)
        per_token = max(1.0, (torch.cuda.max_memory_allocated(self.device) - before) / (PROBE_ROWS * tokens))
        self.probe_bytes_per_token = per_token
        free, _ = torch.cuda.mem_get_info(self.device)
        # what the caching allocator holds but no tensor uses (the probe's) is ours to reuse
        available = free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        budget = cuda_batch_tokens(available, per_token)
        logger.info(
            "%s on %s: %.1f GiB available, %.0f KiB per prompt token (probe pass) -> passes of at most %d tokens; %s",
            self.artifact, self.device, available / 2**30, per_token / 2**10, budget,
            "transformers' forward" if not self.decoder_pass else
            f"shared-prefix pass, kv heads {'grouped in the SDPA kernel' if self.grouped_attention else 'repeated per query head'}",
        )
        return budget


def cuda_batch_tokens(available_bytes: float, bytes_per_token: float) -> int:
    """The token budget CUDA_MEMORY_SHARE of `available_bytes` holds, at most CUDA_MAX_BATCH_TOKENS."""
    return int(max(1, min(CUDA_MAX_BATCH_TOKENS, CUDA_MEMORY_SHARE * available_bytes // bytes_per_token)))


def decoder_pass_unsupported(model: Any) -> str | None:
    """Why the adapter's own pass cannot score `model` (None: it can)."""
    config = model.config
    if config.model_type not in DECODER_PASS_MODEL_TYPES:
        return f"model_type {config.model_type!r} (it supports {', '.join(DECODER_PASS_MODEL_TYPES)})"
    layer_types = getattr(config, "layer_types", None) or []
    if any(kind != "full_attention" for kind in layer_types):
        return f"layer types {sorted(set(layer_types))} (it supports full attention only)"
    return None


def _decoder_pass(
    body: Any, input_ids: torch.Tensor, prefix_kv: Sequence[tuple[torch.Tensor, torch.Tensor]] | None, head_dim: int,
    grouped: bool, fused: FusedKernels | None = None, keep_kv: bool = False,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A Qwen3 decoder body (`model.model`) over (B, T) token ids that continue a shared prefix.

    prefix_kv: each layer's (keys, values) of the prefix, (1, kv_heads, P, head_dim), read by every
    row (None: the ids start at position 0). Returns the (B, T, H) hidden states before the final
    norm and, with keep_kv, each layer's (keys, values) of these tokens, (B, kv_heads, T, head_dim).
    grouped: see _attention. fused: the layer's elementwise chains as fused kernels (FusedKernels);
    None: each step is the one transformers' Qwen3 layer takes, on the same modules."""
    batch, seq = input_ids.shape
    past = 0 if prefix_kv is None else prefix_kv[0][0].shape[2]
    hidden = body.embed_tokens(input_ids)  # (B, T, H)
    positions = torch.arange(past, past + seq, device=input_ids.device)[None]  # (1, T)
    cos, sin = (t[:, None] for t in body.rotary_emb(hidden, positions))  # (1, 1, T, d): every row and head
    mask = prefix_causal_mask(seq, past, input_ids.device)
    kept = []
    for i, layer in enumerate(body.layers):
        prefix = None if prefix_kv is None else prefix_kv[i]
        hidden, k, v = _decoder_layer(layer, hidden, prefix, cos, sin, mask, head_dim, grouped, fused)
        if keep_kv:
            kept.append((k, v))
    return hidden, kept


def _decoder_layer(
    layer: Any, hidden: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor] | None, cos: torch.Tensor,
    sin: torch.Tensor, mask: Any, head_dim: int, grouped: bool, fused: FusedKernels | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer of _decoder_pass over (B, T, H) hidden states; prefix: its (keys, values), or None.
    Returns the new hidden states and this layer's keys and values of the new tokens."""
    batch, seq = hidden.shape[:2]
    norm, rotary, gate = (_eager_norm, _rotary, _eager_gate) if fused is None else (fused.norm, fused.rotary, fused.gate)
    attn = layer.self_attn
    x = norm(layer.input_layernorm, hidden)
    q = norm(attn.q_norm, attn.q_proj(x).view(batch, seq, -1, head_dim)).transpose(1, 2)  # (B, heads, T, d)
    k = norm(attn.k_norm, attn.k_proj(x).view(batch, seq, -1, head_dim)).transpose(1, 2)  # (B, kv_heads, T, d)
    v = attn.v_proj(x).view(batch, seq, -1, head_dim).transpose(1, 2)  # (B, kv_heads, T, d)
    q, k = rotary(q, k, cos, sin)
    keys, values = k, v
    if prefix is not None:
        # (B, kv_heads, P + T, d) for this layer only: freed before the next layer runs
        keys = torch.cat((prefix[0].expand(batch, -1, -1, -1), k), dim=2)
        values = torch.cat((prefix[1].expand(batch, -1, -1, -1), v), dim=2)
    out = _attention(q, keys, values, mask, attn.scaling, grouped)  # (B, heads, T, d)
    hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))
    x = norm(layer.post_attention_layernorm, hidden)
    mlp = layer.mlp
    hidden = hidden + mlp.down_proj(gate(mlp, mlp.gate_proj(x), mlp.up_proj(x)))
    return hidden, k, v


def _eager_norm(module: Any, x: torch.Tensor) -> torch.Tensor:
    return module(x)


def _eager_gate(mlp: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The middle of transformers' Qwen3MLP.forward, with the MLP's own activation."""
    return mlp.act_fn(gate) * up


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen3RMSNorm, step for step: in fp32, then back to the input's dtype, times the weight."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _silu_gate(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class FusedKernels:
    """A Qwen3 layer's elementwise chains (each RMSNorm, the rotary embedding of q and k, the MLP's
    SiLU gate), each compiled by torch.compile (inductor: C++ on a CPU) into one kernel over its
    tensors, with symbolic shapes so that new batch and sequence sizes reuse the code.

    Eager, each step of a chain reads and writes the whole tensor (an RMSNorm over q alone is six
    passes over 16 heads x 128 values per token, partly in fp32), and on a CPU these passes are
    bound by memory bandwidth: in torch bf16 on 32 W-like documents they took ~1.7 of 4.5 s, the
    matmuls 2.1 s (torch.profiler, 2-core AMX Xeon). Fused, the same documents took 3.65 s against
    5.04 s eager (README, "Fused kernels (torch bf16)"). Inductor needs a C++ compiler at run time;
    its compiled code is cached on disk (first load ~20 s, later ones ~5-9 s)."""

    def __init__(self) -> None:
        self.rms_norm = torch.compile(_rms_norm, dynamic=True)
        self.rotary = torch.compile(_rotary, dynamic=True)
        self.silu_gate = torch.compile(_silu_gate, dynamic=True)

    def norm(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        return self.rms_norm(x, module.weight, module.variance_epsilon)

    def gate(self, mlp: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.silu_gate(gate, up)  # fused_kernels_for checked that the MLP's activation is silu

    def check(self, dtype: torch.dtype, head_dim: int) -> None:
        """Compile now, on small tensors of the model's dtype, and compare with the eager steps:
        a compiler that fails, or code that computes something else, fails here and not in a score."""
        generator = torch.Generator().manual_seed(0)
        q, k = (torch.randn(2, heads, 5, head_dim, generator=generator).to(dtype) for heads in (4, 2))
        cos, sin = (torch.randn(1, 1, 5, head_dim, generator=generator).to(dtype) for _ in range(2))
        weight = torch.randn(head_dim, generator=generator).to(dtype)
        gate, up = (torch.randn(3, 7, generator=generator).to(dtype) for _ in range(2))
        pairs = [
            (self.rms_norm(q, weight, 1e-6), _rms_norm(q, weight, 1e-6)),
            *zip(self.rotary(q, k, cos, sin), _rotary(q, k, cos, sin), strict=True),
            (self.silu_gate(gate, up), _silu_gate(gate, up)),
        ]
        tolerance = probe_tolerance(dtype)
        for fused, eager in pairs:
            if not torch.allclose(fused.float(), eager.float(), atol=tolerance, rtol=tolerance):
                raise RuntimeError(f"a fused kernel differs from its eager steps by {(fused.float() - eager.float()).abs().max():.3g}")


def fused_kernels_for(backend: TorchBackend, dtype: torch.dtype, wanted: bool | None) -> FusedKernels | None:
    """The FusedKernels a backend runs, or None. wanted: ScorerConfig.fused_kernels; None (auto) turns
    them on for bf16 on a CPU, where the measured gain is, and falls back to eager with a warning when
    inductor cannot compile here; True asks for them (a failure is then an error), False never."""
    if wanted is False:
        return None
    why_not = None
    if backend.device.type != "cpu":
        why_not = f"they run on a CPU; this model is on {backend.device}"
    elif not backend.decoder_pass:
        why_not = "they fuse the adapter's own Qwen3 pass, which this model does not run"
    elif getattr(backend.model.config, "hidden_act", "silu") != "silu":
        why_not = f"the MLP's activation is {backend.model.config.hidden_act!r}, not silu"
    if why_not is not None:
        if wanted:
            raise ValueError(f"fused_kernels=True: {why_not}")
        return None
    if wanted is None and dtype != torch.bfloat16:
        return None
    try:
        fused = FusedKernels()
        fused.check(dtype, backend.head_dim)
    except Exception as e:  # inductor's own errors: no compiler, a failed build, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        if wanted:
            raise RuntimeError(f"fused_kernels=True: torch.compile could not build them here ({type(e).__name__}: {first})") from None
        logger.warning("%s: fused kernels unavailable (%s: %s); scoring with eager modules", backend.artifact, type(e).__name__, first)
        return None
    return fused


def prefix_causal_mask(seq: int, past: int, device: torch.device) -> Any:
    """What each of `seq` new tokens attends to among past + seq keys: every past (prefix) key, and
    the new ones up to itself. None: plain causal (no past). On a GPU a lower-right causal bias (flash
    and memory-efficient kernels take it without a mask tensor); elsewhere a (T, P + T) bool mask."""
    if past == 0:
        return None
    if device.type == "cuda":
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(seq, past + seq)
    return torch.ones(seq, past + seq, dtype=torch.bool, device=device).tril(past)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, scaling: float, grouped: bool) -> torch.Tensor:
    """(B, heads, T, d) queries over (B, kv_heads, S, d) keys and values; query head h reads kv head
    h // (heads / kv_heads). grouped: the SDPA kernel reads the shared kv heads itself (enable_gqa);
    else they are repeated to one per query head first (a copy of every layer's keys and values)."""
    groups = q.shape[1] // k.shape[1]
    extra = {}
    if groups > 1 and grouped:
        extra["enable_gqa"] = True
    elif groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, **extra)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, **extra)


def grouped_attention_works(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether SDPA on this device takes grouped kv heads itself (enable_gqa, torch >= 2.5) with the
    prefix mask, giving what repeated heads give: checked once at load on a small input, since the
    kernel SDPA picks depends on the device, dtype and head size (the flash kernel reads grouped heads;
    where the lower-right causal bias falls to another kernel, that one may not)."""
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(2, 4, 8, head_dim, device=device, dtype=dtype, generator=generator)
    k, v = (torch.randn(2, 2, 24, head_dim, device=device, dtype=dtype, generator=generator) for _ in range(2))
    mask = prefix_causal_mask(8, 16, device)
    try:
        grouped = _attention(q, k, v, mask, head_dim**-0.5, grouped=True)
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:
        logger.debug("grouped-query SDPA unavailable on %s (%s: %s): kv heads are repeated", device, type(e).__name__, e)
        return False
    repeated = _attention(q, k, v, mask, head_dim**-0.5, grouped=False)
    tolerance = probe_tolerance(dtype)
    return bool(torch.allclose(grouped.float(), repeated.float(), atol=tolerance, rtol=tolerance))


def probe_tolerance(dtype: torch.dtype) -> float:
    """How far a kernel may stray from the reference steps on a load-time probe: float rounding in
    fp32, a few bf16 ulps otherwise."""
    return 1e-5 if dtype == torch.float32 else 2e-2


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def cache_argument(model: Any) -> str:
    """The keyword transformers' forward takes the KV cache under: `cache` from 5.25 on (where
    past_key_values is a deprecated alias, removed in 5.40), `past_key_values` before (the 5.17 of
    the GPU images this kit was measured on). An unknown keyword would be swallowed silently."""
    parameters = inspect.signature(model.model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _returned_cache(out: Any) -> Any:
    """The KV cache of a forward's output (`cache`, or `past_key_values` before transformers 5.25)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def compute_dtype(device: str, precision: str | None) -> Any:
    """The dtype a torch checkpoint computes in. None: bf16 on a GPU, fp32 on a CPU (the reference
    every export's parity is measured against). "auto": bf16 where the device computes it fast (a CUDA
    GPU; a CPU with AMX bf16 tiles or AVX512_BF16, runtime/_cpu.py), fp32 elsewhere: on the 2-core
    AMX Xeon of bench/results, bf16 (with FusedKernels) scored W in 6.1 s where fp32 took 23.2 s and
    ONNX int8 10.7 s, while an AVX2-only CPU emulates bf16 7x slower than fp32. "fp32" / "bf16": as named."""
    import torch

    from answerfirst.runtime._cpu import features

    gpu = torch.device(device).type == "cuda"
    if precision is None:
        return torch.bfloat16 if gpu else torch.float32
    if precision == "auto":
        return torch.bfloat16 if gpu or features().fast_bf16 else torch.float32
    if precision == "bf16" and not gpu and not features().fast_bf16:
        logger.warning("precision='bf16' on a CPU without AMX bf16 or AVX512_BF16: bf16 is emulated here, "
                       "several times slower than fp32 (precision='auto' picks fp32 on this CPU)")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def open_torch(
    path: str,
    manifest: Manifest | None,
    device: str,
    threads: int | None,
    quantization: str | None,
    config: ScorerConfig,
    precision: str | None = None,
) -> tuple[TorchBackend, Any]:
    with requires("torch", "the torch backend"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but torch sees no CUDA GPU; use device='cpu'")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ManifestError(
            f"could not load a tokenizer from {path!r} (not a checkpoint directory, and no hub is reachable "
            f"to resolve it as a model id): {e}"
        ) from None
    prompts = bind_format(tokenizer, manifest, path, config.max_doc_tokens)

    kwargs: dict[str, Any] = {}
    if quantization is not None:
        kwargs["quantization_config"] = _bitsandbytes_config(quantization)
        kwargs["device_map"] = device
    else:
        kwargs["dtype"] = compute_dtype(device, precision)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ManifestError(f"could not load model weights from {path!r}: {e}") from None
    if quantization is None:
        model = model.to(device)
    model.eval()
    if model.config.vocab_size <= max(prompts.grade_ids):
        raise ManifestError(f"{path}: grade token ids {list(prompts.grade_ids)} exceed the model's vocabulary")
    if quantization is None:
        backend = TorchBackend(
            model, prompts.grade_ids, prompts.pad_id, torch.device(device), artifact=path, fused_kernels=config.fused_kernels
        )
    else:
        backend = _open_quantized(model, prompts, torch.device(device), path, quantization)
    if threads is not None:
        set_threads(backend, threads)
    return backend, prompts


# torch backends that asked for a thread count, and the count each asked for
_thread_requests: weakref.WeakKeyDictionary[TorchBackend, int] = weakref.WeakKeyDictionary()


def set_threads(backend: TorchBackend, threads: int) -> None:
    """torch.set_num_threads is process-wide: a torch Scorer cannot have threads of its own. When a
    new setting overrides one that a torch Scorer still alive asked for, say so."""
    overridden = sorted({(b.artifact, n) for b, n in list(_thread_requests.items()) if n != threads and b is not backend})
    if overridden:
        logger.warning(
            "torch's thread count is process-wide: threads=%d for %s now also applies to %s, loaded earlier with %s",
            threads, backend.artifact, ", ".join(a for a, _ in overridden),
            ", ".join(f"threads={n}" for _, n in overridden),
        )
    torch.set_num_threads(threads)
    _thread_requests[backend] = threads


def _open_quantized(model: Any, prompts: Any, device: torch.device, path: str, quantization: str) -> TorchBackend:
    """The backend of a bitsandbytes model, run once here: a layer bitsandbytes cannot run on this
    device fails now, with one line naming the model, the device and the fix, and not inside
    bitsandbytes at the first score() (the CUDA probe pass is that run on a GPU). On a CPU the first
    pass also repacks the 4-bit weights in place, which must not happen under concurrent score() calls."""
    _fit_cpu_4bit(model)
    try:
        backend = TorchBackend(model, prompts.grade_ids, prompts.pad_id, device, artifact=path)
        if device.type != "cuda":
            backend.grade_logits(None, [list(prompts.suffix_ids) or [prompts.pad_id]])
    except Exception as e:  # bitsandbytes raises RuntimeError, AssertionError, ValueError, ...
        cause = (str(e).strip().splitlines() or [""])[0][:300]
        other = "8bit" if quantization == "4bit" else "4bit"
        raise RuntimeError(
            f"bitsandbytes quantization={quantization!r} cannot run {path} on {device} ({type(e).__name__}: {cause}); "
            f"load it with quantization={other!r}, or without quantization"
        ) from None
    return backend


# bitsandbytes' CPU 4-bit matmul for AVX512-BF16 CPUs repacks a weight into column blocks of 32
# outputs, with one scale per `blocksize` inputs of a row (functional._convert_weight_packed_for_cpu,
# bitsandbytes 0.50): other shapes fail inside it at the first forward, e.g. hidden size 96 with
# blocksize 64 as "shape '[96, 1]' is invalid for input of size 144".
CPU_4BIT_PACK_OUTPUTS = 32


def cpu_4bit_packable(out_features: int, in_features: int, blocksize: int) -> bool:
    """Whether bitsandbytes' AVX512-BF16 4-bit kernel takes a Linear of this shape."""
    return out_features % CPU_4BIT_PACK_OUTPUTS == 0 and in_features % blocksize == 0


def _fit_cpu_4bit(model: Any) -> None:
    """Point the 4-bit layers that bitsandbytes' AVX512-BF16 CPU kernel cannot take (cpu_4bit_packable)
    to its generic path: the same NF4 weights, dequantized and multiplied in float32. Layers of other
    shapes, and every layer on a GPU or a CPU without that kernel, are left as they are."""
    import bitsandbytes

    unfit = []
    for name, module in model.named_modules():
        if not isinstance(module, bitsandbytes.nn.Linear4bit) or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        if not cpu_4bit_packable(module.out_features, module.in_features, module.weight.blocksize):
            module.support_avx512bf16_for_cpu = False  # read by Linear4bit.forward before it repacks
            unfit.append(f"{name} ({module.out_features}x{module.in_features})")
    if unfit:
        logger.info(
            "%d 4-bit layers run bitsandbytes' generic CPU path (its AVX512-BF16 kernel needs out_features %% %d == 0 "
            "and in_features %% blocksize == 0): %s", len(unfit), CPU_4BIT_PACK_OUTPUTS, ", ".join(unfit[:4]) + (" ..." if len(unfit) > 4 else ""),
        )


def _bitsandbytes_config(quantization: str) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise missing_extra(f"quantization={quantization!r}", "torch", e) from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


__all__ = ["TorchBackend", "open_torch"]
