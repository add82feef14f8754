"""Peer `llamacpp-rank`: llama.cpp's own reranking, as a llama.cpp user runs our rank GGUF.

The file is one our exporter writes (export/gguf.py): `cls.output` holds the K grade rows of the
output head, `classifier.output_labels` the grades, and its pooling type is RANK, so llama.cpp
itself applies the head to each sequence's last token and a softmax over the K outputs, the way it
runs an upstream Qwen3-Reranker conversion. The user's side is llama-cpp-python's API with
embeddings on, as `Llama(embedding=True)` sets it up: whole prompts (no prefix reuse: the KV cache
is cleared before each batch, as `Llama.embed` does), `batch_size` prompts as separate sequences of
one `llama_decode`, and all K outputs of each sequence read with `llama_get_embeddings_seq`
(`Llama.embed` would read n_embd floats where RANK pooling writes K).

The model and context are opened through the library's C API rather than `Llama()`, for one
setting `Llama()` does not expose: llama.cpp's extra weight buffers stay off (on an AMX CPU they
crash `llama_decode` of these batches; the GGUF backend turns them off for the same reason). The
context is what `Llama(embedding=True, flash_attn=True)` creates: a unified KV pool, RANK pooling,
n_ubatch 512.

The prompts come from PromptTokenizer, so this peer scores exactly the token sequences our backends
score, in the same batches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from answerfirst.afrl import Score, scores_from_logits
from answerfirst.artifact import Manifest, ManifestError, bind_format
from answerfirst.runtime._llamacpp import import_llama_cpp, route_llama_logs
from answerfirst.runtime._tokenizer import ArtifactTokenizer


class LlamaCppRankReranker:
    def __init__(
        self, export_dir: str | Path, variant: str, threads: int | None = None, batch_size: int = 16,
        max_prompt_tokens: int = 1024,
    ):
        """max_prompt_tokens: the longest prompt it will score; the context holds a batch of them."""
        llama_cpp = import_llama_cpp()
        route_llama_logs(llama_cpp)
        export_dir = Path(export_dir)
        manifest = Manifest.read(export_dir)
        self.prompts = bind_format(ArtifactTokenizer.from_dir(export_dir), manifest, str(export_dir))
        path = export_dir / manifest.variant(variant).file
        self.batch_size = batch_size
        n_ctx = batch_size * max_prompt_tokens  # KV cells for a whole batch of the longest prompts
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        model_params.use_extra_bufts = False
        self.model = model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not model:
            raise ManifestError(f"llama.cpp could not load {path}")
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = params.n_batch = n_ctx
        params.n_ubatch = 512
        params.n_seq_max = batch_size
        params.n_threads = params.n_threads_batch = threads or os.cpu_count() or 1
        params.embeddings = True
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_RANK
        params.kv_unified = True
        params.flash_attn_type = 1
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise ManifestError(f"llama.cpp could not create a context for {path} (n_ctx={n_ctx})")
        self._llama = llama_cpp
        n_out = int(llama_cpp.llama_model_n_cls_out(model))
        labels = [(llama_cpp.llama_model_cls_label(model, i) or b"").decode() for i in range(n_out)]
        grades = list(self.prompts.format.grades)
        if sorted(labels) != sorted(grades):
            raise ManifestError(f"{path}: its rank head's labels {labels} are not the grades {grades}; re-export it")
        self.columns = [labels.index(g) for g in grades]  # (K,) output index of each grade, in grade order
        self.n_ctx = n_ctx
        self.batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def score(self, query: str, docs: Sequence[str]) -> list[Score]:
        prompts = self.prompts.prompts(query, docs)
        probs = np.empty((len(prompts), len(self.columns)), dtype=np.float64)
        llama_cpp, batch = self._llama, self.batch
        memory = llama_cpp.llama_get_memory(self.ctx)
        for start in range(0, len(prompts), self.batch_size):
            rows = prompts[start : start + self.batch_size]
            if sum(len(p.input_ids) for p in rows) > self.n_ctx:
                raise ValueError(f"a batch of {len(rows)} prompts needs more than the {self.n_ctx} KV cells sized for it")
            llama_cpp.llama_memory_clear(memory, True)
            batch.n_tokens = 0
            for seq, prompt in enumerate(rows):
                for pos, token in enumerate(prompt.input_ids):
                    i = batch.n_tokens
                    batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
                    batch.seq_id[i][0], batch.logits[i] = seq, True  # pooled embeddings need every token as output
                    batch.n_tokens += 1
            if llama_cpp.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed on a batch of whole prompts")
            for seq in range(len(rows)):
                out = llama_cpp.llama_get_embeddings_seq(self.ctx, seq)  # (K,) softmax over the rank head
                probs[start + seq] = np.ctypeslib.as_array(out, shape=(len(self.columns),))[self.columns]
        # llama.cpp returns probabilities; their logs are logits up to a constant per row
        logits = np.log(np.maximum(probs, np.finfo(np.float32).tiny))
        return scores_from_logits(logits, self.prompts.format.values, [p.truncated for p in prompts])
