"""Token-budget batching: passes bounded by prompt tokens, a default per device, the same scores on
every backend whatever the budget."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pairs import DOCS, QUERY, as_array

import answerfirst
from answerfirst.runtime._common import CPU_BATCH_TOKENS, GRAPH_CPU_BATCH_TOKENS
from answerfirst.runtime.api import ScorerConfig, token_budget_passes

# Documents of very different lengths, so budgets cut them into passes of different sizes.
VARIED_DOCS = [*DOCS, "red running shoes with a breathable mesh upper " * 6, "Red.", "shoes " * 30]


def pass_tokens(forward_pass, plan) -> int:
    """Documents x the longest whole prompt of a pass: what batch_tokens bounds."""
    prompts = [plan.prompts[r] for r in forward_pass.rows]
    return len(prompts) * max(len(p.prefix_ids) + len(p.doc_ids) + len(p.suffix_ids) for p in prompts)


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), max_size=40),
    batch_tokens=st.integers(1, 2000),
    batch_size=st.one_of(st.none(), st.integers(1, 8)),
)
def test_passes_hold_every_document_once_within_the_budget_and_as_full_as_it_allows(lengths, batch_tokens, batch_size):
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    passes = token_budget_passes(order, lengths, batch_tokens, batch_size)
    assert [i for rows in passes for i in rows] == order  # every document once, in order
    for rows in passes:
        cost = len(rows) * max(lengths[i] for i in rows)
        assert cost <= batch_tokens or len(rows) == 1  # only a prompt over the budget runs alone past it
        assert batch_size is None or len(rows) <= batch_size
    for rows, following in zip(passes, passes[1:], strict=False):
        # greedy: the next pass's first document did not fit this one
        grown = [*rows, following[0]]
        assert len(grown) * max(lengths[i] for i in grown) > batch_tokens or len(rows) == batch_size


def test_a_cpu_load_picks_the_cpu_budget_and_says_so(tiny_checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="answerfirst.runtime.api"):
        scorer = answerfirst.load(tiny_checkpoint)
    assert scorer.config.batch_tokens == CPU_BATCH_TOKENS and scorer.config.batch_size is None
    assert f"batch_tokens={CPU_BATCH_TOKENS}" in repr(scorer) and "device='cpu'" in repr(scorer)
    assert f"at most {CPU_BATCH_TOKENS} prompt tokens" in caplog.text and "the device's default" in caplog.text
    chosen = answerfirst.load(tiny_checkpoint, config=ScorerConfig(batch_tokens=512, batch_size=3))
    assert chosen.config.batch_tokens == 512 and "batch_tokens=512, batch_size=3" in repr(chosen)


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_plan_keeps_each_pass_within_the_budget_with_or_without_prefix_reuse(tiny_checkpoint, reuse_prefix):
    scorer = answerfirst.load(tiny_checkpoint, config=ScorerConfig(batch_tokens=400, reuse_prefix=reuse_prefix))
    plan = scorer.plan(QUERY, VARIED_DOCS)
    longest = max(len(p.input_ids) for p in plan.prompts)
    assert longest <= 400 and len(plan.passes) > 2  # the budget, not a document count, splits them
    for forward_pass in plan.passes:
        assert pass_tokens(forward_pass, plan) <= 400
    # the budget counts whole prompts either way, so prefix reuse changes what a pass runs, not which documents share it
    other = answerfirst.load(tiny_checkpoint, config=ScorerConfig(batch_tokens=400, reuse_prefix=not reuse_prefix))
    assert [p.rows for p in other.plan(QUERY, VARIED_DOCS).passes] == [p.rows for p in plan.passes]


def test_a_prompt_longer_than_the_budget_runs_alone(tiny_scorer):
    scorer = answerfirst.Scorer(tiny_scorer.backend, tiny_scorer.prompts, ScorerConfig(batch_tokens=8), None)
    plan = scorer.plan(QUERY, DOCS)
    assert [len(p.rows) for p in plan.passes] == [1] * len(DOCS)
    np.testing.assert_allclose(as_array(scorer.score(QUERY, DOCS)), as_array(tiny_scorer.score(QUERY, DOCS)), atol=1e-6)


@pytest.mark.parametrize("value", [0, -5, 2.5, "4096", True])
def test_bad_budgets_are_clear_errors(value):
    for field in ("batch_tokens", "batch_size"):
        with pytest.raises(ValueError, match=f"^{field}: must be an int >= 1"):
            ScorerConfig(**{field: value})


BUDGETS = [ScorerConfig(batch_tokens=10**6), ScorerConfig(batch_tokens=300), ScorerConfig(batch_size=1)]


def test_torch_scores_do_not_depend_on_the_budget(tiny_checkpoint, tiny_scorer):
    expected = as_array(tiny_scorer.score(QUERY, VARIED_DOCS))
    for config in BUDGETS:
        scorer = answerfirst.Scorer(tiny_scorer.backend, tiny_scorer.prompts, config, None)
        np.testing.assert_allclose(as_array(scorer.score(QUERY, VARIED_DOCS)), expected, atol=1e-6)


@pytest.mark.slow
def test_onnx_scores_do_not_depend_on_the_budget(tiny_onnx_export):
    base = answerfirst.load(tiny_onnx_export, variant="fp32", threads=1)
    assert base.config.batch_tokens == GRAPH_CPU_BATCH_TOKENS  # the exported graph's CPU default, not torch's
    assert f"batch_tokens={GRAPH_CPU_BATCH_TOKENS}" in repr(base)
    expected = as_array(base.score(QUERY, VARIED_DOCS))
    for config in BUDGETS:
        scorer = answerfirst.load(tiny_onnx_export, variant="fp32", threads=1, config=config)
        np.testing.assert_allclose(as_array(scorer.score(QUERY, VARIED_DOCS)), expected, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_gguf_f32(tiny_checkpoint, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from pairs import PAIRS

    from answerfirst.export.gguf import export_gguf

    out = tmp_path_factory.mktemp("tiny-gguf-f32") / "export"
    export_gguf(tiny_checkpoint, out, ("f32",), probe_pairs=PAIRS, threads=1)
    return out


@pytest.mark.slow
def test_gguf_scores_do_not_depend_on_the_budget(tiny_gguf_export, tiny_gguf_f32):
    exact = ScorerConfig(kv_cache_type="f32", flash_attn=False, n_ctx=2048)
    base = answerfirst.load(tiny_gguf_export, threads=1, config=exact)
    assert base.config.batch_tokens == CPU_BATCH_TOKENS
    expected = as_array(base.score(QUERY, VARIED_DOCS))
    many = [f"{doc} #{i}" for i in range(30) for doc in DOCS]  # 150 documents: three decodes of 63 sequences at most
    # F32 weights: one pass of 150 documents equals 150 passes of one, to float rounding. Q8_0 quantizes
    # every matmul's activations to int8 blocks, so the last-bit difference of another KV cell layout
    # can flip one rounding and move a probability by ~1e-3 (1.4e-3 for one of the 150 documents on
    # this tiny model, whose wide init makes it sensitive; the F32 file of the same weights agrees
    # to 1e-7), and a tighter bound would test the layout of llama.cpp's cache, not our batching.
    for export, atol in ((tiny_gguf_f32, 1e-5), (tiny_gguf_export, 1e-2)):
        wide = answerfirst.load(export, threads=1, config=replace(exact, batch_tokens=10**6))
        assert len(wide.plan(QUERY, many).passes) == 1
        one_by_one = answerfirst.load(export, threads=1, config=replace(exact, batch_size=1))
        np.testing.assert_allclose(as_array(wide.score(QUERY, many)), as_array(one_by_one.score(QUERY, many)), atol=atol)
    for config in BUDGETS:
        scorer = answerfirst.load(tiny_gguf_export, threads=1, config=replace(exact, batch_tokens=config.batch_tokens,
                                                                               batch_size=config.batch_size))
        np.testing.assert_allclose(as_array(scorer.score(QUERY, VARIED_DOCS)), expected, atol=1e-5)
        scorer.close()


@pytest.mark.slow
def test_gguf_with_a_small_n_batch_scores_instead_of_aborting(tiny_gguf_export):
    """llama.cpp reserves one output row per sequence and aborts the process (GGML_ASSERT) when the
    sequences outnumber n_batch: the adapter keeps its sequences within n_batch."""
    exact = ScorerConfig(kv_cache_type="f32", flash_attn=False, n_ctx=2048)
    expected = as_array(answerfirst.load(tiny_gguf_export, threads=1, config=exact).score(QUERY, VARIED_DOCS))
    for config in (replace(exact, n_batch=8), replace(exact, n_batch=8, batch_size=16)):
        scorer = answerfirst.load(tiny_gguf_export, threads=1, config=config)
        assert scorer.backend.n_seq <= 8
        np.testing.assert_allclose(as_array(scorer.score(QUERY, VARIED_DOCS)), expected, atol=1e-5)
    with pytest.raises(ValueError, match="^n_batch: must be an int >= 2"):
        ScorerConfig(n_batch=1)
