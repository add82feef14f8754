"""Tokenizers and random Qwen3 models built on this machine, never downloaded.

No machine that builds or tests answerfirst reaches a model hub, so tests, the default `make
distill` run and the benchmark build what they need here: a byte-level BPE tokenizer trained
in-process with Qwen's pre-tokenization and a ChatML template (with Qwen3's no-thinking preamble),
and Qwen3ForCausalLM models with random weights, tiny or at the exact Qwen3-0.6B shape.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Qwen2/Qwen3 pre-tokenizer split: contractions, letter runs with one leading non-letter, single
# digits, punctuation runs with trailing newlines, newline runs, whitespace.
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")

# ChatML, written for answerfirst; like Qwen3's template it opens the assistant turn with an empty
# think block when called with enable_thinking=False.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

# Qwen3-0.6B's architecture (its published config.json), for real-size latency with random weights.
QWEN3_0_6B: dict[str, Any] = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
    hidden_act="silu",
    attention_bias=False,
)

# A model small enough for unit tests: every code path of the 0.6B, in milliseconds.
TINY: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
    hidden_act="silu",
    attention_bias=False,
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048) -> Any:
    """Train a byte-level BPE tokenizer on `texts`; returns a transformers fast tokenizer with the
    ChatML template. Every byte is in the alphabet, so any text encodes; each digit is its own
    pre-token, so the grade strings "0".."4" are single tokens."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def random_qwen3(tokenizer: Any, shape: dict[str, Any] | None = None, seed: int = 0, **overrides: Any) -> Any:
    """A Qwen3ForCausalLM with random weights sized for `tokenizer` (fp32, eval mode).

    shape: TINY (default) or QWEN3_0_6B; the vocabulary is the larger of the tokenizer's length and
    shape's vocab_size, so the model covers every id the tokenizer can produce."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    shape = dict(TINY if shape is None else shape)
    shape["vocab_size"] = max(len(tokenizer), shape.get("vocab_size", 0))
    shape.update(overrides)
    config = Qwen3Config(
        **shape,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    # The default init (std 0.02) gives near-uniform grade distributions; a wider one makes the
    # probabilities of a random model spread out, so parity tests compare informative numbers.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.08 if shape["hidden_size"] <= 256 else 0.02)
    return model.eval()


def save_random_checkpoint(
    out_dir: str | Path, texts: Iterable[str], vocab_size: int = 2048, shape: dict[str, Any] | None = None, seed: int = 0
) -> Path:
    """Train a tokenizer on `texts`, build a random Qwen3 for it, save both as an HF checkpoint dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    model = random_qwen3(tokenizer, shape=shape, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    logger.info("saved a random Qwen3 checkpoint (%d parameters) to %s", model.num_parameters(), out)
    return out
