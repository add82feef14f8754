"""Student shapes the quantization tests run (CPU: test_quantization.py, GPU: test_cuda.py), and a
random Qwen3 checkpoint of each with the tiny checkpoint's tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

from answerfirst.distill.pipeline import STUDENT_SHAPE, TEACHER_SHAPE, DefaultRunConfig
from answerfirst.offline import TINY

_DIMENSIONS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")

# name -> Qwen3 dimensions: the default student's (whatever `make distill` trains now: layers of the
# sample teacher), hidden 96 (the random student made for a teacher of your own; the default
# student's shape when 4-bit crashed on it), shapes no 4-bit kernel block divides, and an aligned one.
SHAPES = {
    "default-student": {k: TEACHER_SHAPE[k] for k in _DIMENSIONS} | {"num_hidden_layers": len(DefaultRunConfig().student_layers)},
    "hidden-96": {k: STUDENT_SHAPE[k] for k in _DIMENSIONS},  # hidden 96, intermediate 256, 3 heads, 1 kv head
    "hidden-80": dict(hidden_size=80, intermediate_size=200, num_attention_heads=5, num_key_value_heads=1, head_dim=16),
    "odd-hidden-33": dict(hidden_size=33, intermediate_size=47, num_attention_heads=2, num_key_value_heads=1, head_dim=10),
    "aligned-128": dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
}


def shaped_checkpoint(tokenizer_dir: Path, out: Path, name: str) -> Path:
    """A random Qwen3 of SHAPES[name] saved to `out`, with the tokenizer files of `tokenizer_dir`."""
    from transformers import AutoTokenizer

    from answerfirst.offline import random_qwen3

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    random_qwen3(tokenizer, shape=dict(TINY, **SHAPES[name]), seed=1).save_pretrained(out)
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / file).exists():
            shutil.copy(tokenizer_dir / file, out / file)
    return out
