"""Torch runtime: scores equal the full model's logits, prefix reuse and batching change nothing."""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading

import numpy as np
import pytest
import torch
from pairs import DOCS, QUERY, as_array
from transformers import AutoModelForCausalLM

import answerfirst
from answerfirst.afrl import FormatError
from answerfirst.artifact import ManifestError
from answerfirst.runtime.api import ScorerConfig


def reference_probs(checkpoint, scorer, query, docs):
    """Ordinary forward over the whole prompt, full vocabulary at every position; no answerfirst runtime."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = []
    for doc in docs:
        ids = torch.tensor([scorer.prompts.prompt(query, doc).input_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]  # (V,)
        out.append(torch.softmax(logits[list(scorer.prompts.grade_ids)].double(), dim=-1).numpy())
    return np.array(out)


def test_probs_equal_full_model_softmax_at_the_last_prompt_position(tiny_checkpoint, tiny_scorer):
    scores = tiny_scorer.score(QUERY, DOCS)
    expected = reference_probs(tiny_checkpoint, tiny_scorer, QUERY, DOCS)
    np.testing.assert_allclose(as_array(scores), expected, atol=1e-5)
    for s, p in zip(scores, expected, strict=True):
        assert s.grade == int(p.argmax())
        assert s.expected == pytest.approx(float(p @ np.arange(5)), abs=1e-5)
    assert expected.max() - expected.min() > 0.05  # the distributions are informative, not uniform


def test_prefix_reuse_equals_no_reuse(tiny_checkpoint, tiny_scorer):
    no_reuse = answerfirst.load(tiny_checkpoint, config=ScorerConfig(reuse_prefix=False))
    np.testing.assert_allclose(as_array(tiny_scorer.score(QUERY, DOCS)), as_array(no_reuse.score(QUERY, DOCS)), atol=1e-6)


def test_prefix_runs_once_per_query_across_batches(tiny_checkpoint):
    scorer = answerfirst.load(tiny_checkpoint, config=ScorerConfig(batch_size=2))
    scorer.score(QUERY, DOCS)  # 5 docs -> 3 batches
    assert scorer.backend.prefix_cache.misses == 1
    scorer.score("another query", DOCS[:2])
    scorer.score(QUERY, DOCS[:1])  # still cached (capacity 2)
    assert scorer.backend.prefix_cache.misses == 2
    before = as_array(scorer.score(QUERY, DOCS))
    scorer.backend.forget_prefixes()  # what the benchmark does before each timed query
    np.testing.assert_allclose(as_array(scorer.score(QUERY, DOCS)), before, atol=1e-6)
    assert scorer.backend.prefix_cache.misses == 3


def test_batch_equals_one_at_a_time(tiny_checkpoint, tiny_scorer):
    single = answerfirst.load(tiny_checkpoint, config=ScorerConfig(batch_size=1))
    batched = as_array(tiny_scorer.score(QUERY, DOCS))
    one_by_one = np.array([single.score(QUERY, [d])[0].probs for d in DOCS])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-6)


def test_score_pairs_keeps_order_across_queries(tiny_scorer):
    pairs = [(QUERY, DOCS[0]), ("wireless headphones", DOCS[1]), (QUERY, DOCS[2])]
    by_pairs = tiny_scorer.score_pairs(pairs)
    expected = [
        tiny_scorer.score(QUERY, [DOCS[0]])[0],
        tiny_scorer.score("wireless headphones", [DOCS[1]])[0],
        tiny_scorer.score(QUERY, [DOCS[2]])[0],
    ]
    np.testing.assert_allclose(as_array(by_pairs), as_array(expected), atol=1e-6)
    assert [s.grade for s in by_pairs] == [s.grade for s in expected]


def test_concurrent_calls_from_four_threads_are_identical(tiny_scorer):
    expected = as_array(tiny_scorer.score(QUERY, DOCS))
    results, errors = [], []

    def worker():
        try:
            for _ in range(5):
                results.append(as_array(tiny_scorer.score(QUERY, DOCS)))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 20
    for r in results:
        np.testing.assert_allclose(r, expected, atol=1e-6)


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_plan_is_the_passes_score_runs(tiny_checkpoint, reuse_prefix):
    """plan() + run_pass() + scores() is score(), to the bit: the HTTP server schedules these passes itself."""
    scorer = answerfirst.load(tiny_checkpoint, config=ScorerConfig(batch_size=2, reuse_prefix=reuse_prefix))
    docs = [*DOCS, "red running shoes " * 12]
    plan = scorer.plan(QUERY, docs)
    prompts = scorer.prompts.prompts(QUERY, docs)
    assert sorted(row for p in plan.passes for row in p.rows) == list(range(len(docs)))
    assert all(len(p.rows) <= 2 for p in plan.passes) and len(plan.passes) == 3
    lengths = [len(c) for p in plan.passes for c in p.continuations]
    assert lengths == sorted(lengths)  # sorted by length: each pass pads little
    for forward_pass in plan.passes:
        assert forward_pass.prefix_ids == (prompts[0].prefix_ids if reuse_prefix else None)
        for row, continuation in zip(forward_pass.rows, forward_pass.continuations, strict=True):
            whole = prompts[row].continuation_ids if reuse_prefix else prompts[row].input_ids
            assert list(continuation) == whole
    expected = scorer.score(QUERY, docs)
    assert plan.scores([scorer.run_pass(p) for p in plan.passes]) == expected  # exact, not approximately
    # the passes may run in any order, interleaved with other calls: each pass's logits are its own
    scorer.score("another query", DOCS[:3])
    logits = {p: scorer.run_pass(p) for p in reversed(plan.passes)}
    assert plan.scores([logits[p] for p in plan.passes]) == expected
    assert plan.total_tokens == sum(len(p.input_ids) for p in prompts)


def test_plan_cuts_documents_to_a_per_call_limit(tiny_scorer):
    long_doc = "red running shoes with a breathable mesh upper " * 20
    full = tiny_scorer.plan(QUERY, [long_doc, "Red shoes."])
    cut = tiny_scorer.plan(QUERY, [long_doc, "Red shoes."], max_doc_tokens=8)
    assert cut.prompts[0].doc_ids == full.prompts[0].doc_ids[:8] and cut.prompts[0].truncated
    assert cut.prompts[1] == full.prompts[1]  # a short document is untouched
    assert tiny_scorer.plan(QUERY, [long_doc], max_doc_tokens=10**6).prompts == full.prompts[:1]  # capped
    with pytest.raises(FormatError, match="max_doc_tokens must be a positive int"):
        tiny_scorer.plan(QUERY, ["x"], max_doc_tokens=0)
    empty = tiny_scorer.plan(QUERY, [])
    assert empty.passes == () and empty.scores([]) == [] and empty.total_tokens == 0


def test_truncated_doc_is_reported(tiny_checkpoint):
    scorer = answerfirst.load(tiny_checkpoint, config=ScorerConfig(max_doc_tokens=4))
    scores = scorer.score(QUERY, [DOCS[2], "Red"])
    assert [s.truncated for s in scores] == [True, False]


def test_module_level_score_returns_one_or_a_list(tiny_checkpoint, tiny_scorer):
    one = answerfirst.score(QUERY, DOCS[0], model=tiny_checkpoint)
    many = answerfirst.score(QUERY, DOCS[:2], model=tiny_checkpoint)
    assert isinstance(one, answerfirst.Score)
    assert isinstance(many, list) and len(many) == 2
    assert one == tiny_scorer.score(QUERY, DOCS[:1])[0]
    np.testing.assert_allclose(many[0].probs, one.probs, atol=1e-6)
    assert answerfirst.score(QUERY, [], model=tiny_scorer) == []


@pytest.mark.parametrize("max_new_tokens", [3, 12])
def test_explain_continues_right_after_the_grade(tiny_checkpoint, tiny_scorer, max_new_tokens):
    """The explanation equals HF greedy generation from prompt + argmax grade token, cut at the
    same max_new_tokens (end-of-turn handling is tested on real ids in test_afrl)."""
    doc = DOCS[0]
    grade = tiny_scorer.score(QUERY, [doc])[0].grade
    text = "".join(tiny_scorer.explain(QUERY, doc, max_new_tokens=max_new_tokens))
    ids = tiny_scorer.prompts.prompt(QUERY, doc).input_ids + [tiny_scorer.prompts.grade_ids[grade]]
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    stop = sorted(tiny_scorer.prompts.stop_ids)
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop)
    generated = [t for t in out[0, len(ids) :].tolist() if t not in stop]
    assert 0 < len(generated) <= max_new_tokens
    assert text == tiny_scorer.prompts.decode(generated).lstrip("\n")


def test_explain_of_a_given_grade_is_the_scored_explanation_without_scoring_again(tiny_checkpoint):
    scorer = answerfirst.load(tiny_checkpoint)
    doc = DOCS[0]
    grade = scorer.score(QUERY, [doc])[0].grade
    scoring_calls = []
    grade_logits = scorer.backend.grade_logits
    scorer.backend.grade_logits = lambda *args: scoring_calls.append(args) or grade_logits(*args)
    given = list(scorer.explain(QUERY, doc, 6, grade=grade))
    assert scoring_calls == []  # the given grade is not scored again
    assert given == list(scorer.explain(QUERY, doc, 6)) and len(scoring_calls) == 1
    other = (grade + 1) % len(scorer.grades)
    assert "".join(scorer.explain(QUERY, doc, 6, grade=other)) != "".join(given)
    with pytest.raises(FormatError, match="grade must be a grade index 0..4"):
        scorer.explain(QUERY, doc, 6, grade=5)


def test_explain_stops_when_asked_even_inside_held_back_text(tiny_checkpoint):
    scorer = answerfirst.load(tiny_checkpoint)
    generated = []
    generate = scorer.backend.generate
    scorer.backend.generate = lambda ids, n: (generated.append(t) or t for t in generate(ids, n))
    full = "".join(scorer.explain(QUERY, DOCS[0], 40))
    assert len(generated) == 40
    generated.clear()
    stopped = "".join(scorer.explain(QUERY, DOCS[0], 40, should_stop=lambda: len(generated) >= 5))
    assert len(generated) == 5 and full.startswith(stopped)


def test_explain_rejects_a_bad_length(tiny_scorer):
    with pytest.raises(FormatError, match="max_new_tokens"):
        list(tiny_scorer.explain(QUERY, DOCS[1], max_new_tokens=0))


def test_bad_inputs_are_clear_errors(tiny_scorer):
    with pytest.raises(FormatError, match="query is empty"):
        tiny_scorer.score("  ", DOCS)
    with pytest.raises(FormatError, match=r"docs\[1\] is empty"):
        tiny_scorer.score(QUERY, ["fine", ""])
    with pytest.raises(FormatError, match="docs must be a list of str, got str"):
        tiny_scorer.score(QUERY, "a single string")
    with pytest.raises(FormatError, match=r"docs\[0\] must be a str, got int"):
        tiny_scorer.score(QUERY, [5])
    with pytest.raises(FormatError, match=r"pairs\[0\] must be a \(query, doc\) tuple"):
        tiny_scorer.score_pairs([("only one",)])
    with pytest.raises(ValueError, match="backend must be one of"):
        answerfirst.load("x", backend="tensorflow")


def test_manifest_problems_are_clear_errors(tiny_model_dir):
    from answerfirst.artifact import MANIFEST_NAME, Manifest, checkpoint_hash
    scorer = answerfirst.load(tiny_model_dir)
    manifest = Manifest(
        kind="checkpoint",
        format=scorer.prompts.format,
        grade_token_ids=scorer.prompts.grade_ids,
        source={"model": "tiny", "sha256": checkpoint_hash(tiny_model_dir)},
    )
    manifest.write(tiny_model_dir)
    assert answerfirst.load(tiny_model_dir).manifest.source["sha256"] == checkpoint_hash(tiny_model_dir)

    path = tiny_model_dir / MANIFEST_NAME
    data = json.loads(path.read_text())

    path.write_text(json.dumps({k: v for k, v in data.items() if k != "grade_token_ids"}))
    with pytest.raises(ManifestError, match="missing field.*grade_token_ids"):
        answerfirst.load(tiny_model_dir)

    path.write_text(json.dumps({**data, "grade_token_ids": [1, 2, 3, 4, 5]}))
    with pytest.raises(ManifestError, match="grade token ids .* do not match"):
        answerfirst.load(tiny_model_dir)

    path.write_text(json.dumps({**data, "variants": [{"name": "x", "file": "gone.bin", "quantization": "fp32"}]}))
    with pytest.raises(ManifestError, match="gone.bin, which is missing"):
        answerfirst.load(tiny_model_dir)

    path.write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        answerfirst.load(tiny_model_dir)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="could not load a tokenizer"):
        answerfirst.load(tmp_path / "nowhere")


def test_decoder_pass_equals_transformers_forward(tiny_scorer):
    """The adapter's own shared-prefix pass gives transformers' numbers (bit for bit on the CPUs measured)."""
    from answerfirst.runtime._torch import TorchBackend

    ours = tiny_scorer.backend
    assert ours.decoder_pass
    theirs = TorchBackend(ours.model, tiny_scorer.prompts.grade_ids, tiny_scorer.prompts.pad_id, ours.device, decoder_pass=False)
    docs = [*DOCS, "red running shoes with a breathable mesh upper " * 6]
    plan = answerfirst.Scorer(ours, tiny_scorer.prompts, ScorerConfig(batch_tokens=300), None).plan(QUERY, docs)
    assert len(plan.passes) > 1
    for forward_pass in plan.passes:
        for prefix, rows in ((forward_pass.prefix_ids, forward_pass.continuations),
                             (None, [plan.prompts[r].input_ids for r in forward_pass.rows])):
            np.testing.assert_allclose(ours.grade_logits(prefix, rows), theirs.grade_logits(prefix, rows), rtol=0, atol=1e-6)
    prefix_kv = ours.prefix_cache.get(plan.passes[0].prefix_ids, ours._run_prefix)
    config = ours.model.config
    assert [tuple(k.shape) for k, _ in prefix_kv] == [(1, config.num_key_value_heads, len(plan.passes[0].prefix_ids),
                                                        config.head_dim)] * config.num_hidden_layers  # one prefix, not one per row


def test_grouped_kv_heads_in_the_kernel_equal_repeated_heads(tiny_scorer):
    """Where SDPA reads grouped kv heads itself (checked at load), the adapter skips repeating them; the
    logits are those of repeated heads."""
    from answerfirst.runtime._torch import TorchBackend

    grouped = tiny_scorer.backend
    assert grouped.grouped_attention  # torch >= 2.5 takes enable_gqa on a CPU
    repeated = TorchBackend(grouped.model, tiny_scorer.prompts.grade_ids, tiny_scorer.prompts.pad_id, grouped.device)
    repeated.grouped_attention = False
    plan = tiny_scorer.plan(QUERY, DOCS)
    for forward_pass in plan.passes:
        np.testing.assert_allclose(grouped.grade_logits(forward_pass.prefix_ids, forward_pass.continuations),
                                   repeated.grade_logits(forward_pass.prefix_ids, forward_pass.continuations), rtol=0, atol=1e-6)


def test_other_architectures_score_through_transformers_forward(tiny_checkpoint, tmp_path):
    """A Llama checkpoint: the adapter's own pass refuses it, transformers' forward scores it exactly."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from answerfirst.runtime._torch import TorchBackend

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    ))
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.dim() >= 2):
            param.normal_(0.0, 0.08)
    model.save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    scorer = answerfirst.load(tmp_path / "llama")
    assert not scorer.backend.decoder_pass
    np.testing.assert_allclose(as_array(scorer.score(QUERY, DOCS)), reference_probs(tmp_path / "llama", scorer, QUERY, DOCS), atol=1e-5)
    with pytest.raises(ValueError, match="shared-prefix pass cannot run it: model_type 'llama'"):
        TorchBackend(scorer.backend.model, scorer.prompts.grade_ids, scorer.prompts.pad_id, scorer.backend.device, decoder_pass=True)


def test_bitsandbytes_8bit_scores_close_to_fp32(tiny_checkpoint, tiny_scorer):
    pytest.importorskip("bitsandbytes")
    q8 = answerfirst.load(tiny_checkpoint, quantization="8bit")
    ref, got = as_array(tiny_scorer.score(QUERY, DOCS)), as_array(q8.score(QUERY, DOCS))
    assert np.abs(ref - got).max() < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(tiny_checkpoint, tiny_scorer):
    gpu = answerfirst.load(tiny_checkpoint, device="cuda")
    np.testing.assert_allclose(as_array(gpu.score(QUERY, DOCS)), as_array(tiny_scorer.score(QUERY, DOCS)), atol=2e-2)


# -- trust: inputs that cannot poison a score, threads, concurrency -------------------------------------


def test_non_finite_logits_are_an_error_naming_the_checkpoint(tiny_model_dir):
    from safetensors.torch import load_file, save_file

    from answerfirst.runtime.api import NonFiniteScoreError

    weights = load_file(tiny_model_dir / "model.safetensors")
    weights["model.norm.weight"][3] = float("nan")  # as a bad quantization or an overflow would leave it
    save_file(weights, tiny_model_dir / "model.safetensors", metadata={"format": "pt"})
    scorer = answerfirst.load(tiny_model_dir)
    with pytest.raises(NonFiniteScoreError, match=f"{tiny_model_dir}.*non-finite grade logits"):
        scorer.score(QUERY, DOCS)
    with pytest.raises(NonFiniteScoreError):
        answerfirst.score(QUERY, DOCS[0], model=scorer)


def test_huge_query_is_refused_before_any_forward_pass(tiny_checkpoint):
    from pairs import HUGE_QUERY

    from answerfirst.runtime.api import DEFAULT_MAX_QUERY_TOKENS, ContextLengthError

    scorer = answerfirst.load(tiny_checkpoint)
    with pytest.raises(FormatError, match=f"query is \\d+ tokens, over the limit of {DEFAULT_MAX_QUERY_TOKENS}"):
        scorer.score(HUGE_QUERY, DOCS)
    assert scorer.backend.prefix_cache.misses == 0  # nothing ran
    # with the query limit lifted, the model's own context (max_position_embeddings 4096) refuses it
    unlimited = answerfirst.load(tiny_checkpoint, config=ScorerConfig(max_query_tokens=10**7))
    with pytest.raises(ContextLengthError, match="does not fit the context of 4096 .*max_position_embeddings"):
        unlimited.score(HUGE_QUERY, DOCS)
    assert unlimited.backend.prefix_cache.misses == 0
    # a query at the limit still scores
    at_limit = answerfirst.load(tiny_checkpoint, config=ScorerConfig(max_query_tokens=len(scorer.prompts.encode_text(QUERY))))
    np.testing.assert_allclose(as_array(at_limit.score(QUERY, DOCS)), as_array(scorer.score(QUERY, DOCS)), atol=1e-6)
    with pytest.raises(ValueError, match="max_query_tokens: must be >= 1"):
        ScorerConfig(max_query_tokens=0)


def test_explain_stops_at_the_context(tiny_checkpoint, tiny_scorer, caplog):
    scorer = answerfirst.load(tiny_checkpoint)
    room = 5
    scorer.backend.max_positions = len(scorer.prompts.prompt(QUERY, DOCS[0]).input_ids) + 1 + room
    with caplog.at_level("WARNING"):
        text = "".join(scorer.explain(QUERY, DOCS[0], max_new_tokens=40))
    assert text == "".join(tiny_scorer.explain(QUERY, DOCS[0], max_new_tokens=room))
    assert "explanation is cut at 5 tokens" in caplog.text


def test_a_second_torch_thread_setting_warns_that_it_overrides_the_first(tiny_checkpoint, tiny_model_dir, caplog):
    before = torch.get_num_threads()
    try:
        first = answerfirst.load(tiny_checkpoint, threads=1)
        with caplog.at_level("WARNING", logger="answerfirst.runtime._torch"):
            answerfirst.load(tiny_checkpoint, threads=1)  # the same setting: nothing changes
            assert "process-wide" not in caplog.text
            second = answerfirst.load(tiny_model_dir, threads=2)
        assert torch.get_num_threads() == 2
        assert "process-wide: threads=2" in caplog.text and f"{tiny_checkpoint}" in caplog.text
        assert "threads=1" in caplog.text
        np.testing.assert_allclose(as_array(first.score(QUERY, DOCS)), as_array(second.score(QUERY, DOCS)), atol=1e-6)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: with the fused kernels where they compile
def test_threads_with_distinct_queries_equal_sequential(tiny_checkpoint, precision):
    from pairs import assert_threads_equal_sequential

    scorer = answerfirst.load(tiny_checkpoint, precision=precision)
    assert_threads_equal_sequential(scorer)
    assert scorer.backend.prefix_cache.misses > scorer.backend.prefix_cache.capacity  # the cache really cycled


def test_concurrent_first_calls_of_score_load_one_scorer(tiny_checkpoint, monkeypatch):
    """Eight threads ask answerfirst.score() for the same new model at once: it is loaded once, every
    call gets the same scores, and a model already loaded is never held up by another's load."""
    from answerfirst.runtime import api

    real_load = api.load
    loads: list[str] = []
    release_other = threading.Event()

    def counting_load(path, *args, **kwargs):  # the real load, counted; "other" waits until released
        loads.append(str(path))
        if str(path).endswith("other"):
            assert release_other.wait(60), "the other model's load was never released"
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(api, "_scorers", {})
    monkeypatch.setattr(api, "_loading", {})
    monkeypatch.setattr(api, "load", counting_load)
    barrier = threading.Barrier(8)
    results, errors = [], []

    def first_call():
        try:
            barrier.wait()
            results.append(answerfirst.score(QUERY, DOCS[0], model=tiny_checkpoint))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=first_call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert loads == [str(tiny_checkpoint)]
    assert len(results) == 8 and all(r == results[0] for r in results)

    # a slow load of another model does not block scoring with the one already loaded
    other = tiny_checkpoint.parent / "other"
    other.symlink_to(tiny_checkpoint, target_is_directory=True)
    slow = threading.Thread(target=lambda: answerfirst.score(QUERY, DOCS[0], model=other))
    meanwhile: list = []
    quick = threading.Thread(target=lambda: meanwhile.append(answerfirst.score(QUERY, DOCS[0], model=tiny_checkpoint)))
    slow.start()
    try:
        while str(other) not in loads and slow.is_alive():
            slow.join(0.01)
        quick.start()
        quick.join(60)  # the old single lock held every caller until "other" finished loading
        assert meanwhile == [results[0]], "scoring a loaded model waited for another model's load"
    finally:
        release_other.set()
        slow.join()
        quick.join()
        other.unlink()
    assert loads == [str(tiny_checkpoint), str(other)]


def test_precision_bf16_scores_like_fp32_and_auto_follows_the_cpu(tiny_checkpoint, tiny_scorer):
    from answerfirst.runtime._cpu import features

    bf16 = answerfirst.load(tiny_checkpoint, precision="bf16")
    assert bf16.backend.dtype == "bfloat16" and "dtype='bfloat16'" in repr(bf16)
    assert tiny_scorer.backend.dtype == "float32"  # the default on a CPU: the reference exports are held to
    ours, reference = as_array(bf16.score(QUERY, DOCS)), as_array(tiny_scorer.score(QUERY, DOCS))
    assert 0 < np.abs(ours - reference).max() < 0.05  # bf16 rounding: visible, and bounded
    # the prefix is reused in bf16 as in fp32: same scores either way
    no_reuse = answerfirst.load(tiny_checkpoint, precision="bf16", config=ScorerConfig(reuse_prefix=False))
    assert np.abs(as_array(no_reuse.score(QUERY, DOCS)) - ours).max() < 0.02
    auto = answerfirst.load(tiny_checkpoint, precision="auto")
    assert auto.backend.dtype == ("bfloat16" if features().fast_bf16 else "float32")
    assert answerfirst.load(tiny_checkpoint, precision="fp32").backend.dtype == "float32"


def test_precision_errors_name_the_problem(tiny_checkpoint, tiny_onnx_export):
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, auto or None; got 'fp16'"):
        answerfirst.load(tiny_checkpoint, precision="fp16")
    with pytest.raises(ValueError, match="onnx exports carry their precision in their variant"):
        answerfirst.load(tiny_onnx_export, precision="bf16")
    with pytest.raises(ValueError, match="bitsandbytes picks its own compute dtype"):
        answerfirst.load(tiny_checkpoint, precision="bf16", quantization="8bit")


def test_fused_kernels_score_like_the_eager_modules(tiny_checkpoint):
    """The fused RMSNorm / rotary / SiLU-gate kernels (torch.compile) give the eager pass's scores: to
    float rounding in fp32, to bf16 rounding in bf16, with and without prefix reuse and across pass
    shapes; the default turns them on for bf16 on a CPU only."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("inductor needs a C++ compiler")
    docs = [*DOCS, "red running shoes with a breathable mesh upper " * 6]
    for precision, tolerance in (("fp32", 1e-5), ("bf16", 2e-2)):
        eager = answerfirst.load(tiny_checkpoint, precision=precision, config=ScorerConfig(fused_kernels=False))
        assert eager.backend.fused is None
        expected = as_array(eager.score(QUERY, docs))
        for reuse_prefix in (True, False):
            config = ScorerConfig(fused_kernels=True, reuse_prefix=reuse_prefix, batch_tokens=300)
            fused = answerfirst.load(tiny_checkpoint, precision=precision, config=config)
            assert fused.backend.fused is not None and len(fused.plan(QUERY, docs).passes) > 1
            got = as_array(fused.score(QUERY, docs))
            np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance)
    assert answerfirst.load(tiny_checkpoint, precision="bf16").backend.fused is not None  # default: on in bf16
    assert answerfirst.load(tiny_checkpoint).backend.fused is None  # ... off in fp32, where they gain nothing


def test_fused_kernels_that_cannot_compile_fall_back_or_fail_clearly(tiny_checkpoint, monkeypatch, caplog):
    """Where inductor cannot build (no compiler, a failed build), the default scores with the eager
    modules and says why; fused_kernels=True stops at load with one line; they never run on a model
    the adapter's own pass does not run."""
    from answerfirst.runtime import _torch

    def no_compiler(fn, **_):
        def broken(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore lines")
        return broken

    monkeypatch.setattr(_torch.torch, "compile", no_compiler)
    with caplog.at_level(logging.WARNING, logger="answerfirst.runtime._torch"):
        scorer = answerfirst.load(tiny_checkpoint, precision="bf16")
    assert scorer.backend.fused is None
    assert "fused kernels unavailable (RuntimeError: InvalidCxxCompiler: no working C++ compiler found); scoring with eager" in caplog.text
    assert len(scorer.score(QUERY, DOCS)) == len(DOCS)
    with pytest.raises(RuntimeError, match=r"fused_kernels=True: torch.compile could not build them here \(RuntimeError: InvalidCxxCompiler"):
        answerfirst.load(tiny_checkpoint, config=ScorerConfig(fused_kernels=True))
    monkeypatch.undo()
    from answerfirst.runtime._torch import TorchBackend

    with pytest.raises(ValueError, match="fused_kernels=True: they fuse the adapter's own Qwen3 pass"):
        TorchBackend(scorer.backend.model, scorer.prompts.grade_ids, scorer.prompts.pad_id, scorer.backend.device,
                     decoder_pass=False, fused_kernels=True)
