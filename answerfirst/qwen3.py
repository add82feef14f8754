"""Facts about Qwen3 models that the runtime, the exporters and the offline builders share.

Every student is a Qwen3 decoder with Qwen's byte-level BPE tokenizer; what those two things look
like is written here once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeVar

# Qwen2/Qwen3 pre-tokenizer split: contractions, letter runs with one leading non-letter, single
# digits, punctuation runs with trailing newlines, newline runs, whitespace. llama.cpp calls this
# pre-tokenizer "qwen2".
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


_Shape = TypeVar("_Shape", bound="Qwen3Shape")


@dataclass(frozen=True)
class Qwen3Shape:
    """The dimensions of a Qwen3-style decoder: what its graph, its KV cache and its cost follow."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int

    def __post_init__(self) -> None:
        for f in fields(Qwen3Shape):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{f.name}: must be a positive integer, got {value!r}")

    @classmethod
    def from_config(cls: type[_Shape], config: Any, **extra: Any) -> _Shape:
        """From a transformers config object or a config.json dict (`extra`: a subclass's own fields).

        The one place that fills in what a config may leave out, as transformers' Qwen3Config does:
        num_key_value_heads defaults to num_attention_heads (no grouped-query attention) and head_dim
        to hidden_size // num_attention_heads (Qwen3-0.6B sets it: 128, not 1024 // 16)."""
        def get(name: str) -> Any:
            return config.get(name) if isinstance(config, dict) else getattr(config, name, None)

        missing = [n for n in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if get(n) is None]
        if missing:
            raise ValueError(f"the model config has no {', '.join(missing)}; is it a Qwen3 decoder config?")
        heads = int(get("num_attention_heads"))
        return cls(
            hidden_size=int(get("hidden_size")),
            intermediate_size=int(get("intermediate_size")),
            num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or int(get("hidden_size")) // heads),
            vocab_size=int(get("vocab_size")),
            **extra,
        )
