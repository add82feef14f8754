"""Facts about Qwen3 models that the runtime, the exporters and the offline builders share.

Every student is a Qwen3 decoder with Qwen's byte-level BPE tokenizer; what those two things look
like is written here once.
"""

from __future__ import annotations

# Qwen2/Qwen3 pre-tokenizer split: contractions, letter runs with one leading non-letter, single
# digits, punctuation runs with trailing newlines, newline runs, whitespace. llama.cpp calls this
# pre-tokenizer "qwen2".
QWEN_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
