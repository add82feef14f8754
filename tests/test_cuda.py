"""The GPU path: load(device="cuda") against CPU fp32, bitsandbytes on CUDA, the token budget a GPU
load picks. Skipped where torch sees no CUDA GPU (CI); bench/gpu_check.sh runs them on one."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from pairs import DOCS, QUERY, as_array

import answerfirst
from answerfirst.runtime.api import Scorer, ScorerConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# bf16 against fp32 on the tiny random models: max |dp| (bf16 on a CPU: 0.003 over MANY_DOCS; the sample
# student measured 0.002 on an H200)
BF16_MAX_ABS_DP = 2e-2
QUANTIZED_MAX_ABS_DP = {"8bit": 0.05, "4bit": 0.25}  # as on the CPU (test_quantization.py)
MANY_DOCS = [f"{doc} (#{i})" for i in range(40) for doc in DOCS]  # 200 documents of varied length


@pytest.fixture(scope="module")
def cuda_scorer(tiny_checkpoint):
    return answerfirst.load(tiny_checkpoint, device="cuda")


def test_cuda_bf16_matches_cpu_fp32(cuda_scorer, tiny_scorer):
    assert next(cuda_scorer.backend.model.parameters()).dtype == torch.bfloat16 and cuda_scorer.backend.decoder_pass
    gpu, cpu = as_array(cuda_scorer.score(QUERY, MANY_DOCS)), as_array(tiny_scorer.score(QUERY, MANY_DOCS))
    assert np.abs(gpu - cpu).max() <= BF16_MAX_ABS_DP
    assert (gpu.argmax(1) == cpu.argmax(1)).mean() >= 0.95


def test_cuda_decoder_pass_matches_transformers_forward_and_prefix_reuse_changes_nothing(cuda_scorer):
    from answerfirst.runtime._torch import TorchBackend

    ours = cuda_scorer.backend
    theirs = TorchBackend(ours.model, cuda_scorer.prompts.grade_ids, cuda_scorer.prompts.pad_id, ours.device, decoder_pass=False)
    expected = as_array(Scorer(theirs, cuda_scorer.prompts, cuda_scorer.config, None).score(QUERY, MANY_DOCS))
    np.testing.assert_allclose(as_array(cuda_scorer.score(QUERY, MANY_DOCS)), expected, atol=BF16_MAX_ABS_DP)
    no_reuse = Scorer(ours, cuda_scorer.prompts, ScorerConfig(reuse_prefix=False, batch_tokens=cuda_scorer.config.batch_tokens), None)
    np.testing.assert_allclose(as_array(no_reuse.score(QUERY, MANY_DOCS)), expected, atol=BF16_MAX_ABS_DP)


def test_cuda_load_picks_a_budget_from_free_memory_that_a_full_pass_keeps(tiny_checkpoint, caplog):
    from answerfirst.runtime._torch import CUDA_MAX_BATCH_TOKENS

    with caplog.at_level(logging.INFO, logger="answerfirst.runtime"):
        scorer = answerfirst.load(tiny_checkpoint, device="cuda")
    budget, backend = scorer.config.batch_tokens, scorer.backend
    assert 1 <= budget <= CUDA_MAX_BATCH_TOKENS and f"batch_tokens={budget}" in repr(scorer) and "device='cuda" in repr(scorer)
    assert "KiB per prompt token (probe pass)" in caplog.text and f"at most {budget} prompt tokens" in caplog.text
    # a query that fills whole passes: each within the budget, and the GPU memory they take is what the probe predicted
    long_docs = [" ".join([doc] * 8) for doc in MANY_DOCS] * 4
    plan = scorer.plan(QUERY, long_docs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    logits = [scorer.run_pass(p) for p in plan.passes]
    torch.cuda.synchronize()
    widest = max(len(p.rows) * max(len(plan.prompts[r].input_ids) for r in p.rows) for p in plan.passes)
    assert widest <= budget
    assert torch.cuda.max_memory_allocated() - before <= 1.5 * backend.probe_bytes_per_token * widest + 64 * 2**20
    small = Scorer(backend, scorer.prompts, ScorerConfig(batch_tokens=512), None)
    np.testing.assert_allclose(as_array(plan.scores(logits)), as_array(small.score(QUERY, long_docs)), atol=BF16_MAX_ABS_DP)


def test_cuda_explain_is_transformers_greedy_generation(cuda_scorer):
    doc = DOCS[0]
    grade = cuda_scorer.score(QUERY, [doc])[0].grade
    text = "".join(cuda_scorer.explain(QUERY, doc, max_new_tokens=8, grade=grade))
    ids = [*cuda_scorer.prompts.prompt(QUERY, doc).input_ids, cuda_scorer.prompts.grade_ids[grade]]
    stop = sorted(cuda_scorer.prompts.stop_ids)
    out = cuda_scorer.backend.model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=8, do_sample=False, eos_token_id=stop)
    generated = [t for t in out[0, len(ids):].tolist() if t not in stop]
    assert text == cuda_scorer.prompts.decode(generated).lstrip("\n")


@pytest.fixture(scope="module", params=["default-student", "odd-hidden-33", "aligned-128"])
def shaped_checkpoint(request, tiny_checkpoint, tmp_path_factory):
    from shapes import shaped_checkpoint as make_checkpoint

    return make_checkpoint(tiny_checkpoint, tmp_path_factory.mktemp(request.param) / "model", request.param)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_cuda_bitsandbytes_scores_every_shape_close_to_fp32(shaped_checkpoint, quantization):
    pytest.importorskip("bitsandbytes")
    reference = as_array(answerfirst.load(shaped_checkpoint).score(QUERY, MANY_DOCS))
    scorer = answerfirst.load(shaped_checkpoint, device="cuda", quantization=quantization)
    assert scorer.backend.device.type == "cuda" and next(scorer.backend.model.parameters()).device.type == "cuda"
    got = as_array(scorer.score(QUERY, MANY_DOCS))
    assert np.isfinite(got).all() and 0 < np.abs(got - reference).max() < QUANTIZED_MAX_ABS_DP[quantization]
