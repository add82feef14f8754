"""The benchmark's pairs: one short product query and documents cut to exact token lengths.

Documents are realistic product text from the sample generator (answerfirst.distill.sample), cut
to a target number of document tokens in the model's own tokenizer, so "a 128-token document" means
128 tokens to every contender.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from answerfirst.afrl import PromptTokenizer

logger = logging.getLogger(__name__)

QUERY = "waterproof hiking boots for women size 39"

@dataclass(frozen=True)
class Workload:
    """One query and its documents, with the token counts every contender sees."""

    name: str
    query: str
    docs: tuple[str, ...]
    prefix_tokens: int
    doc_tokens: tuple[int, ...]
    suffix_tokens: int

    @property
    def continuation_lens(self) -> list[int]:
        return [n + self.suffix_tokens for n in self.doc_tokens]

    def head(self, n: int) -> Workload:
        return Workload(f"{self.name}[:{n}]", self.query, self.docs[:n], self.prefix_tokens, self.doc_tokens[:n], self.suffix_tokens)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "query": self.query,
            "documents": len(self.docs),
            "prefix_tokens": self.prefix_tokens,
            "suffix_tokens": self.suffix_tokens,
            "doc_tokens": list(self.doc_tokens),
            "doc_tokens_mean": sum(self.doc_tokens) / max(len(self.doc_tokens), 1),
            "doc_tokens_min": min(self.doc_tokens, default=0),
            "doc_tokens_max": max(self.doc_tokens, default=0),
            "tokens_per_query_with_prefix_reuse": sum(self.continuation_lens) + self.prefix_tokens,
            "tokens_per_query_without": sum(self.continuation_lens) + len(self.docs) * self.prefix_tokens,
        }


def product_text(rng: random.Random, target_words: int) -> str:
    """Realistic product text of about `target_words` words: the sample generator's."""
    from answerfirst.distill.sample import product_text as sample_product_text

    return sample_product_text(rng, target_words)


def fit_document(prompts: PromptTokenizer, rng: random.Random, tokens: int) -> tuple[str, int]:
    """A document of about `tokens` document tokens: generate enough text, cut its ids, decode.
    Returns (text, its actual token count), since re-encoding the cut text can differ by a token."""
    words = max(4, tokens)
    while True:
        ids = prompts.encode_text(product_text(rng, words))
        if len(ids) >= tokens:
            break
        words *= 2
    text = prompts.decode(ids[:tokens]).strip()
    return text, len(prompts.doc_ids(text)[0])  # the document segment as prompts have it (lead space included)


def build_workload(
    prompts: PromptTokenizer, name: str, lengths: Sequence[int], seed: int = 0, query: str = QUERY
) -> Workload:
    """One query and len(lengths) documents of those document-token lengths."""
    if any(n < 1 or n > prompts.format.max_doc_tokens for n in lengths):
        raise ValueError(f"document lengths must be within 1..{prompts.format.max_doc_tokens} (max_doc_tokens), got {list(lengths)}")
    rng = random.Random(seed)
    docs, counts = zip(*(fit_document(prompts, rng, n) for n in lengths), strict=True) if lengths else ((), ())
    return Workload(name, query, tuple(docs), len(prompts.prefix_ids(query)), tuple(counts), len(prompts.suffix_ids))


def workload_w(prompts: PromptTokenizer, docs: int = 32, doc_tokens: tuple[int, int] = (64, 192), seed: int = 0) -> Workload:
    """Workload W: 1 query × `docs` documents of uniformly drawn lengths in doc_tokens (inclusive)."""
    rng = random.Random(seed)
    lengths = [rng.randint(*doc_tokens) for _ in range(docs)]
    return build_workload(prompts, "W", lengths, seed=seed)
