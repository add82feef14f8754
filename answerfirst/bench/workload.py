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

# Used only while answerfirst.distill.sample is unavailable (it is another part of the kit):
# enough variety that the BPE sees ordinary product vocabulary, numbers and punctuation.
_FALLBACK_WORDS = (
    "waterproof breathable leather suede mesh hiking trail running boots shoes women men size "
    "lightweight cushioned rubber outsole grip ankle support lace-up zip black brown grey red blue "
    "Gore-Tex membrane insole arch comfort durable stitching toe cap heel 39 40 41 42 EU UK US "
    "warranty free shipping returns within 30 days stainless steel bottle 750 ml insulated cold hot "
    "24 hours wireless headphones battery noise cancelling Bluetooth 5.3 charging case USB-C 65 W "
    "cotton polyester blend machine washable recycled materials vegan certified ISO tested "
    "dimensions weight 420 g per pair colour options available in stock ships from warehouse"
).split()


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
    """Realistic product text: the sample generator's when it is available."""
    try:
        from answerfirst.distill.sample import product_text as sample_product_text
    except ImportError:
        sample_product_text = None
    if sample_product_text is not None:
        return sample_product_text(rng, target_words)
    logger.debug("answerfirst.distill.sample is not available; using the benchmark's word list")
    sentences = []
    words = 0
    while words < target_words:
        sentence = rng.sample(_FALLBACK_WORDS, rng.randint(6, 14))
        sentences.append(" ".join(sentence).capitalize() + ".")
        words += len(sentence)
    return " ".join(sentences)


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
    return text, len(prompts.encode_text(text))


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
