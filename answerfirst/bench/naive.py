"""The references a user writes today from the Qwen3-Reranker model-card pattern.

naive: a left-padded batch of whole prompts, a full forward through `AutoModelForCausalLM` (logits
for the whole vocabulary at every position), `logits[:, -1]`, then the grade columns. No prefix
reuse, no length sorting, no head restriction: the baseline every speed-up is measured against.

naive-keep1 (`keep_last=True`): the same, plus the one argument a careful user adds,
`logits_to_keep=1`, so the vocabulary head runs at the last position only (most of naive's time in
the head and most of its peak memory go with it).

The prompts still come from PromptTokenizer, so both score exactly the token sequences our backends
score, in the same batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from answerfirst.afrl import Score, scores_from_logits
from answerfirst.artifact import Manifest, bind_format, has_manifest
from answerfirst.extras import requires

with requires("bench", "the naive reference"):
    import torch


class NaiveReranker:

    def __init__(self, path: str | Path, threads: int | None = None, batch_size: int = 16, keep_last: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if threads is not None:
            torch.set_num_threads(threads)
        manifest = Manifest.read(path) if has_manifest(path) else None
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.prompts = bind_format(self.tokenizer, manifest, str(path))
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.batch_size = batch_size
        self.pad_id = self.prompts.pad_id
        # logits_to_keep=0 is transformers' "every position"; 1 keeps the last (left padding puts
        # every row's last real token there)
        self.logits_to_keep = 1 if keep_last else 0

    @torch.inference_mode()
    def score(self, query: str, docs: Sequence[str]) -> list[Score]:
        prompts = self.prompts.prompts(query, docs)
        grade_logits = []
        for start in range(0, len(prompts), self.batch_size):
            batch = [p.input_ids for p in prompts[start : start + self.batch_size]]
            width = max(len(ids) for ids in batch)
            # (B, T) left-padded, as `tokenizer(..., padding_side="left")` would give
            input_ids = torch.tensor([[self.pad_id] * (width - len(ids)) + ids for ids in batch])
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
            logits = self.model(
                input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=self.logits_to_keep
            ).logits[:, -1, :]  # (B, V)
            grade_logits.append(logits[:, list(self.prompts.grade_ids)].float().numpy())  # (B, K)
        values = self.prompts.format.values
        return scores_from_logits(np.concatenate(grade_logits), values, [p.truncated for p in prompts])
