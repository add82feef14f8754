"""The tokenizer of an ONNX or GGUF artifact, read without transformers.

PromptTokenizer (afrl.py) needs a `tokenizers` backend, the end-of-sequence and padding ids, and
decoding; every export keeps its AFRL format in its manifest (a GGUF in its metadata), so a chat
template is rendered only for a bare GGUF without one. Reading tokenizer.json and
tokenizer_config.json with the `tokenizers` library keeps transformers out of an ONNX or GGUF scoring
process: importing it imports torch (+215 MiB RSS) and its tokenizer object keeps Python copies of the
vocabulary (+145 MiB for Qwen's 151k tokens), together more than the int8 model's own working set.
The torch backend loads transformers anyway and keeps AutoTokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.43 saves the template


class ArtifactTokenizer:
    """The slice of a fast HF tokenizer the runtime uses, over a `tokenizers.Tokenizer`."""

    def __init__(self, backend: Any, eos_token: str | None = None, pad_token: str | None = None,
                 chat_template: str | None = None):
        self.backend_tokenizer = backend
        self.eos_token, self.pad_token = eos_token, pad_token
        self.eos_token_id = backend.token_to_id(eos_token) if eos_token else None
        self.pad_token_id = backend.token_to_id(pad_token) if pad_token else None
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, directory: str | Path) -> ArtifactTokenizer:
        """tokenizer.json + tokenizer_config.json (+ chat_template.jinja) as save_pretrained wrote them.
        A missing or unreadable file raises ValueError naming it."""
        from tokenizers import Tokenizer

        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"{path} does not exist")
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{path} is not a readable tokenizers file ({e})") from None
        config_path = directory / CONFIG_FILE
        try:
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{config_path} is not readable JSON ({e})") from None
        template_path = directory / CHAT_TEMPLATE_FILE
        template = template_path.read_text() if template_path.is_file() else config.get("chat_template")
        return cls(
            backend,
            eos_token=_token_text(config.get("eos_token")),
            pad_token=_token_text(config.get("pad_token")),
            chat_template=template if isinstance(template, str) else None,
        )

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        # Byte-level BPE (every export is a Qwen3 student): transformers 5 ignores a tokenizer's
        # clean_up_tokenization_spaces for BPE, so the plain decode is its decode too.
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> Any:
        """Rendered by transformers, imported only here: an artifact without a stored AFRL format."""
        from answerfirst.extras import requires

        with requires("torch", "rendering the chat template of a GGUF file without answerfirst metadata"):
            from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast(tokenizer_object=self.backend_tokenizer, eos_token=self.eos_token,
                                            pad_token=self.pad_token, clean_up_tokenization_spaces=False)
        tokenizer.chat_template = self.chat_template
        return tokenizer.apply_chat_template(messages, **kwargs)


def _token_text(value: Any) -> str | None:
    """tokenizer_config writes a special token as its text or as a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


__all__ = ["TOKENIZER_FILE", "ArtifactTokenizer"]
