"""Torch backend: a transformers causal LM, scored with one forward pass per batch of documents.

Scoring never computes full-vocabulary logits: the decoder body (`model.model`) gives hidden states,
the last real position of each row is gathered, and only the K grade rows of the output head are
applied. Continuations are right-padded: with a causal mask a real token never sees the pads that
come after it, so no attention mask is needed and padded rows stay exact.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from answerfirst.artifact import Manifest, ManifestError, bind_format
from answerfirst.extras import missing_extra, requires
from answerfirst.runtime._common import PrefixCache, ScorerConfig

with requires("torch", "the torch backend"):
    import torch

logger = logging.getLogger(__name__)


class TorchBackend:
    """The Backend protocol over a transformers causal LM.

    Public beyond the protocol, for the kit's own torch tools (distill/label.py generates teacher
    traces with it, export/onnx.py traces its modules): `model`, the transformers model in eval
    mode, and `device`, the torch device it runs on.
    """

    name = "torch"

    def __init__(self, model: Any, grade_ids: Sequence[int], pad_id: int, device: torch.device, artifact: str = "model"):
        self.model = model
        self.device = device
        self.pad_id = pad_id
        self.artifact = artifact
        self.max_positions = int(getattr(model.config, "max_position_embeddings", None) or 2**31 - 1)
        self.context_note = "max_position_embeddings of its config.json"
        head = model.get_output_embeddings().weight  # (V, H)
        self.grade_head = head[list(grade_ids)].detach().float().clone()  # (K, H)
        self.prefix_cache = PrefixCache()

    @torch.inference_mode()
    def grade_logits(self, prefix_ids: Sequence[int] | None, continuations: Sequence[Sequence[int]]) -> np.ndarray:
        lengths = torch.tensor([len(c) for c in continuations], device=self.device)
        input_ids = torch.full((len(continuations), int(lengths.max())), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(continuations):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        input_ids = input_ids.to(self.device)  # (B, T) right-padded

        past, offset = None, 0
        if prefix_ids is not None:
            past, offset = self._prefix_cache(prefix_ids, batch_size=len(continuations)), len(prefix_ids)
        positions = torch.arange(offset, offset + input_ids.shape[1], device=self.device).expand_as(input_ids)
        hidden = self.model.model(
            input_ids=input_ids, cache=past, position_ids=positions, use_cache=past is not None
        ).last_hidden_state  # (B, T, H)
        last = hidden[torch.arange(len(continuations), device=self.device), lengths - 1]  # (B, H)
        return (last.float() @ self.grade_head.T).cpu().numpy()  # (B, K) grade logits

    def _prefix_cache(self, prefix_ids: Sequence[int], batch_size: int) -> Any:
        """The prefix's KV (run once per prefix, see PrefixCache), viewed by `batch_size` rows."""
        from transformers import DynamicCache

        prefix_kv = self.prefix_cache.get(prefix_ids, self._run_prefix)
        cache = DynamicCache(config=self.model.config)
        for layer_idx, (keys, values) in enumerate(prefix_kv):
            # (1, kv_heads, P, head_dim) -> (B, kv_heads, P, head_dim): an expand, not a copy; the
            # continuation's KV is concatenated into new tensors, so the cached prefix stays intact.
            cache.update(keys.expand(batch_size, -1, -1, -1), values.expand(batch_size, -1, -1, -1), layer_idx)
        return cache

    def forget_prefixes(self) -> None:
        self.prefix_cache.clear()

    def _run_prefix(self, prefix_ids: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        ids = torch.tensor([prefix_ids], dtype=torch.long, device=self.device)
        past = self.model.model(input_ids=ids, use_cache=True).cache
        return [(layer.keys, layer.values) for layer in past.layers]

    @torch.inference_mode()
    def generate(self, input_ids: Sequence[int], max_new_tokens: int) -> Iterator[int]:
        """Greedy decoding with the KV cache; only the last position's logits each step."""
        ids = torch.tensor([list(input_ids)], dtype=torch.long, device=self.device)
        past = None
        for _ in range(max_new_tokens):
            out = self.model(input_ids=ids, cache=past, use_cache=True, logits_to_keep=1)
            past = out.cache
            next_id = int(out.logits[0, -1].argmax())
            yield next_id
            ids = torch.tensor([[next_id]], dtype=torch.long, device=self.device)


def open_torch(
    path: str,
    manifest: Manifest | None,
    device: str,
    threads: int | None,
    quantization: str | None,
    config: ScorerConfig,
) -> tuple[TorchBackend, Any]:
    with requires("torch", "the torch backend"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

    if device.startswith("cuda") and not torch.cuda.is_available():
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
        # fp32 on CPU (bf16 is several times slower on CPUs without bf16 units); bf16 on GPUs.
        kwargs["dtype"] = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ManifestError(f"could not load model weights from {path!r}: {e}") from None
    if quantization is None:
        model = model.to(device)
    model.eval()
    if model.config.vocab_size <= max(prompts.grade_ids):
        raise ManifestError(f"{path}: grade token ids {list(prompts.grade_ids)} exceed the model's vocabulary")
    backend = TorchBackend(model, prompts.grade_ids, prompts.pad_id, torch.device(device), artifact=path)
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
