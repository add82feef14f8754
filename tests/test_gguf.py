"""GGUF export + llama.cpp backend: tokenizer fidelity, parity with torch, prefix reuse, explanations,
K-quants, a lone .gguf file, resume and clear errors. Tiny models built here; llama.cpp runs with one
thread (the CI machine has two cores shared with torch)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from pairs import DOCS, PAIRS, QUERY, as_array  # noqa: E402

import answerfirst  # noqa: E402
from answerfirst.artifact import Manifest, ManifestError, checkpoint_hash  # noqa: E402
from answerfirst.export.gguf import QUANTS, TENSOR_TABLE, GGUFExportError, export_gguf, tensor_names  # noqa: E402
from answerfirst.runtime._llamacpp import (  # noqa: E402
    GGUFError,
    LlamaCppBackend,
    read_gguf_metadata,
    tokenizer_from_metadata,
)
from answerfirst.runtime.api import ContextLengthError, ScorerConfig  # noqa: E402

# The exact path: F32 KV cache, no flash attention (whose CPU kernel rounds through F16: ~2e-4).
F32_KV = ScorerConfig(kv_cache_type="f32", flash_attn=False, n_ctx=2048)
RANDOM_Q4_K_M_BOUND = 0.35  # max |dp| of Q4_K_M on the 256-aligned random model (measured 0.29)
# Text the tokenizers must agree on: unicode (accents, CJK, emoji), digits, whitespace runs,
# contractions, chat markers inside user text, newlines in every position.
VARIED = [
    "red running shoes",
    "Prix: 49,90 € — Größe 42 — couleur rouge — 速干 跑步鞋 🏃🏽‍♀️ fast!",
    "12345678901234567890 3.14159 -42 1e-6 ١٢٣",
    "tabs\tand   spaces    \n\n\n  trailing   ",
    "   leading spaces and\r\nwindows line ends\r\n",
    "it's they're we've I'm you'll he'd DON'T",
    "a doc with <|im_end|> and <|im_start|>user inside, and <think> too",
    "naïve café résumé Ωmega ß ǅ ﬁ",
    "\n\nDocument:\n",
    "x" * 300,
]


@pytest.fixture(scope="module")
def gguf_export(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "export"
    export_gguf(tiny_checkpoint, out, ("f32", "f16", "q8_0"), probe_pairs=PAIRS, threads=1)
    return out


@pytest.fixture(scope="module")
def f32_scorer(gguf_export):
    return answerfirst.load(gguf_export, variant="f32", threads=1, config=F32_KV)


@pytest.fixture(scope="module")
def k_quant_checkpoint(tmp_path_factory) -> Path:
    """A small Qwen3 whose every matrix row is a multiple of 256, so K-quants apply without fallback."""
    from conftest import CORPUS

    from answerfirst.offline import TINY, random_qwen3, train_tokenizer

    out = tmp_path_factory.mktemp("k256") / "model"
    tokenizer = train_tokenizer(CORPUS, vocab_size=600)
    shape = dict(TINY, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    random_qwen3(tokenizer, shape=shape, seed=1).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# -- the writer ------------------------------------------------------------------------------------


def test_tensor_table_agrees_with_gguf_tensor_name_map():
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, 3)
    for hf_name, gguf_name in tensor_names(3, tied=False):
        kind_and_name = name_map.get_type_and_name(hf_name, try_suffixes=(".weight",))
        assert kind_and_name is not None, hf_name
        assert kind_and_name[1] == gguf_name
    assert len({row.kind for row in TENSOR_TABLE}) == len(TENSOR_TABLE)  # one row per tensor kind


def test_manifest_lists_variants_fastest_first_with_parity(gguf_export, tiny_checkpoint):
    manifest = Manifest.read(gguf_export)
    assert manifest.kind == "gguf"
    # the logits path of each file, fastest first, then the same files through their rank head
    assert [v.name for v in manifest.variants] == ["q8_0", "f16", "f32", "q8_0-rank", "f16-rank", "f32-rank"]
    assert all(v.parity_passed for v in manifest.variants), [v.parity for v in manifest.variants]
    assert {v.file for v in manifest.variants} == {"student-q8_0.gguf", "student-f16.gguf", "student-f32.gguf"}
    assert manifest.source == {"model": str(tiny_checkpoint), "sha256": checkpoint_hash(tiny_checkpoint)}
    assert (gguf_export / "tokenizer.json").is_file()
    assert manifest.info["export"]["complete"] is True
    assert manifest.info["export"]["tensor_types"]["q8_0"] == {"F32": 9, "Q8_0": 16}  # 15 + the rank head
    assert manifest.variant(None).name == "q8_0"
    assert answerfirst.load(gguf_export, threads=1).backend.path.name == "student-q8_0.gguf"


def test_transformers_reads_the_gguf_back_to_the_source_weights(gguf_export, tiny_checkpoint):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).state_dict()
    # transformers' GGUF config map for qwen3 ignores attention.key_length (head_dim falls back to 128),
    # so the source config is passed; the weights themselves come from the GGUF file.
    config = AutoConfig.from_pretrained(tiny_checkpoint)
    for variant, atol in (("f32", 0.0), ("f16", 1e-3), ("q8_0", 0.02)):
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf_export, gguf_file=f"student-{variant}.gguf", config=config, dtype=torch.float32
        ).state_dict()
        assert set(loaded) == set(source)
        for name, weights in source.items():
            torch.testing.assert_close(loaded[name], weights, atol=atol, rtol=0, msg=f"{variant} {name}")


# -- tokenizer fidelity ----------------------------------------------------------------------------


def test_llama_cpp_tokenizes_prompt_segments_like_hf(f32_scorer):
    prompts, backend = f32_scorer.prompts, f32_scorer.backend
    for text in VARIED:
        assert backend.tokenize(text, parse_special=False) == list(prompts.encode_text(text)), text
    # template pieces are tokenized with the chat markers parsed as special tokens
    template_pieces = [prompts.format.prompt_template.split(m)[0] for m in ("{rubric}", "{query}", "{doc}")]
    for piece in [*template_pieces, prompts.format.answer_end, prompts.format.prompt_template.split("{doc}")[1]]:
        assert backend.tokenize(piece, parse_special=True) == list(prompts._encode_template(piece)), piece
    prompt = prompts.prompt(QUERY, DOCS[1])
    assert backend.tokenize(prompts.format.prompt_template.split("{doc}")[1], True) == list(prompt.suffix_ids)


def test_tokenizer_rebuilt_from_gguf_metadata_equals_the_original(gguf_export, tiny_checkpoint):
    from transformers import AutoTokenizer

    rebuilt = tokenizer_from_metadata(read_gguf_metadata(gguf_export / "student-f32.gguf"))
    original = AutoTokenizer.from_pretrained(tiny_checkpoint)
    for text in VARIED:
        ids = rebuilt.backend_tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == original.encode(text, add_special_tokens=False), text
        assert rebuilt.decode(ids) == original.decode(ids), text
    assert rebuilt.chat_template == original.chat_template
    assert (rebuilt.eos_token_id, rebuilt.pad_token_id) == (original.eos_token_id, original.pad_token_id)


# -- scores ----------------------------------------------------------------------------------------


def test_f32_gguf_with_f32_kv_equals_torch(f32_scorer, tiny_scorer):
    expected = as_array(tiny_scorer.score(QUERY, DOCS))
    got = as_array(f32_scorer.score(QUERY, DOCS))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert expected.max() - expected.min() > 0.05  # informative distributions


def test_f16_and_q8_0_within_their_stated_tolerances(gguf_export, tiny_scorer):
    expected = as_array(tiny_scorer.score_pairs(PAIRS))
    for variant in ("f16", "q8_0"):
        scorer = answerfirst.load(gguf_export, variant=variant, threads=1, config=F32_KV)
        got = as_array(scorer.score_pairs(PAIRS))
        assert np.abs(got - expected).max() <= QUANTS[variant].thresholds.max_abs_dp, variant
        assert (got.argmax(1) == expected.argmax(1)).mean() >= QUANTS[variant].thresholds.min_agreement
        scorer.close()
    # the served defaults (F16 KV cache, flash attention) move scores only slightly
    default = answerfirst.load(gguf_export, variant="f32", threads=1)
    assert np.abs(as_array(default.score_pairs(PAIRS)) - expected).max() < 5e-3


@pytest.mark.slow
def test_q4_k_m_on_a_256_aligned_model(k_quant_checkpoint, tmp_path):
    out = tmp_path / "k"
    manifest = export_gguf(k_quant_checkpoint, out, ("q8_0", "q4_k_m"), probe_pairs=PAIRS, threads=1)
    assert [v.name for v in manifest.variants] == ["q4_k_m", "q8_0", "q4_k_m-rank", "q8_0-rank"]
    types = manifest.info["export"]["tensor_types"]["q4_k_m"]
    assert set(types) <= {"F32", "Q4_K", "Q6_K"} and types.get("Q4_K", 0) > 0, types  # no fallback types
    assert not list(out.glob("*f32*")), "the temporary F32 source must be removed"

    reference = as_array(answerfirst.load(k_quant_checkpoint).score_pairs(PAIRS))
    deviation = {}
    for variant in ("q8_0", "q4_k_m"):
        got = as_array(answerfirst.load(out, variant=variant, threads=1, config=F32_KV).score_pairs(PAIRS))
        deviation[variant] = np.abs(got - reference).max()
        recorded = manifest.variants[[v.name for v in manifest.variants].index(variant)].parity
        assert recorded["max_abs_dp"] == pytest.approx(deviation[variant], abs=1e-6)  # the manifest tells the truth
    # Random Gaussian weights (std 0.08) are the worst case for 4-bit blocks (7% weight error here):
    # Q4_K_M stays within RANDOM_Q4_K_M_BOUND, an order above Q8_0, and really is quantized.
    assert deviation["q8_0"] <= QUANTS["q8_0"].thresholds.max_abs_dp
    assert deviation["q8_0"] < deviation["q4_k_m"] <= RANDOM_Q4_K_M_BOUND
    # load() takes the fastest variant whose parity passed
    passing = [v.name for v in manifest.variants if v.parity_passed]
    if passing:
        assert answerfirst.load(out, threads=1).backend.path.name == f"student-{passing[0]}.gguf"
    else:
        with pytest.raises(ManifestError, match="no variant of this export passed"):
            answerfirst.load(out, threads=1)


@pytest.mark.slow
def test_iq4_nl_is_quantized_by_llama_cpp_and_its_parity_recorded(k_quant_checkpoint, tmp_path):
    out = tmp_path / "iq4"
    manifest = export_gguf(k_quant_checkpoint, out, ("iq4_nl",), probe_pairs=PAIRS, threads=1)
    assert [v.name for v in manifest.variants] == ["iq4_nl", "iq4_nl-rank"]
    types = manifest.info["export"]["tensor_types"]["iq4_nl"]
    assert types.get("IQ4_NL", 0) > 0, types  # really 4-bit non-linear blocks, not a fallback
    reference = as_array(answerfirst.load(k_quant_checkpoint).score_pairs(PAIRS))
    got = as_array(answerfirst.load(out, variant="iq4_nl", threads=1, config=F32_KV).score_pairs(PAIRS))
    deviation = np.abs(got - reference).max()
    assert manifest.variants[0].parity["max_abs_dp"] == pytest.approx(deviation, abs=1e-6)
    assert 1e-3 < deviation <= RANDOM_Q4_K_M_BOUND  # quantized, and as close as Q4_K_M on these weights


def test_every_file_carries_a_rank_head_that_llama_cpp_reranking_reads(gguf_export, tiny_checkpoint):
    """cls.output = the grade rows of the output head (highest grade first, as llama-server returns
    its first output as the score), RANK pooling, the grade labels and the AFRL rerank template."""
    from safetensors.numpy import load_file

    from answerfirst.export.gguf import rank_order

    manifest = Manifest.read(gguf_export)
    order = rank_order(manifest.format)
    assert [manifest.format.grades[k] for k in order] == ["4", "3", "2", "1", "0"]
    reader = gguf.GGUFReader(gguf_export / "student-f32.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["qwen3.pooling_type"] == int(gguf.PoolingType.RANK)
    assert fields["qwen3.classifier.output_labels"] == ["4", "3", "2", "1", "0"]
    head = next(t for t in reader.tensors if t.name == "cls.output.weight")
    embeddings = load_file(tiny_checkpoint / "model.safetensors")["model.embed_tokens.weight"]  # tied head
    rows = [manifest.grade_token_ids[k] for k in order]
    np.testing.assert_array_equal(np.asarray(head.data).reshape(len(rows), -1), embeddings[rows])
    # llama-server's rerank template is our prompt: tokenized whole, ordinary text gives our ids
    template = fields["tokenizer.chat_template.rerank"]
    assert template.count("{query}") == 1 and template.count("{document}") == 1
    scorer = answerfirst.load(gguf_export, variant="f32", threads=1)
    prompt = scorer.prompts.prompt(QUERY, DOCS[0])
    text = template.replace("{query}", QUERY).replace("{document}", DOCS[0])
    assert scorer.backend.tokenize(text, parse_special=True) == prompt.input_ids


def test_rank_variant_scores_through_the_rank_head_like_the_logits_path(gguf_export):
    """"f32-rank" runs the same file with embeddings on (llama.cpp's RANK pooling and softmax over
    all K outputs); its probabilities equal the logits path's, and the manifest's parity says so."""
    logits = answerfirst.load(gguf_export, variant="f32", threads=1, config=F32_KV)
    rank = answerfirst.load(gguf_export, variant="f32-rank", threads=1, config=F32_KV)
    assert rank.backend.rank_columns is not None and logits.backend.rank_columns is None
    assert list(rank.backend.rank_columns) == [4, 3, 2, 1, 0]  # output i of the head is grade 4 - i
    np.testing.assert_allclose(as_array(rank.score(QUERY, DOCS)), as_array(logits.score(QUERY, DOCS)), atol=1e-5)
    # a second query continues from its own prefix; documents that overflow one llama_decode chunk
    # (n_batch) are read after the chunk that holds their last token
    small = answerfirst.load(gguf_export, variant="f32-rank", threads=1, config=replace(F32_KV, n_batch=20, batch_size=4))
    # an n_batch below the pass's documents + prefix splits the pass (llama.cpp would abort otherwise)
    narrow = answerfirst.load(gguf_export, variant="f32", threads=1, config=replace(F32_KV, n_batch=8, batch_size=16))
    assert narrow.backend.n_seq == 8
    np.testing.assert_allclose(as_array(narrow.score(QUERY, DOCS)), as_array(logits.score(QUERY, DOCS)), atol=1e-5)
    np.testing.assert_allclose(as_array(small.score("wireless headphones", DOCS)),
                               as_array(logits.score("wireless headphones", DOCS)), atol=1e-5)
    parity = Manifest.read(gguf_export).variant("f32-rank").parity
    assert parity["passed"] and parity["max_abs_dp"] < 1e-3
    # explanations still run on the logits (embeddings are on only while documents are scored)
    assert list(rank.explain(QUERY, DOCS[0], max_new_tokens=4)) == list(logits.explain(QUERY, DOCS[0], max_new_tokens=4))


def test_sequences_are_capped_and_a_pass_of_more_documents_is_split_exactly(gguf_export):
    """MAX_SEQUENCES bounds llama.cpp's per-sequence output buffer (n_vocab floats each); a pass of
    more documents than that is split into several decodes, each document scored as if alone."""
    from answerfirst.runtime._llamacpp import MAX_SEQUENCES

    scorer = answerfirst.load(gguf_export, variant="f32", threads=1, config=F32_KV)
    assert scorer.backend.n_seq == MAX_SEQUENCES == 64
    docs = [f"{DOCS[i % len(DOCS)]} Item {i}." for i in range(MAX_SEQUENCES + 6)]
    together = as_array(scorer.score(QUERY, docs))
    alone = np.concatenate([as_array(scorer.score(QUERY, [doc])) for doc in docs[:: 9] + docs[-2:]])
    np.testing.assert_allclose(together[list(range(0, len(docs), 9)) + [len(docs) - 2, len(docs) - 1]], alone, atol=1e-5)


def test_prefix_reuse_equals_no_reuse_and_runs_the_prefix_once(gguf_export):
    reuse = answerfirst.load(gguf_export, variant="f32", threads=1, config=replace(F32_KV, batch_size=2))
    no_reuse = answerfirst.load(
        gguf_export, variant="f32", threads=1, config=replace(F32_KV, reuse_prefix=False)
    )
    np.testing.assert_allclose(as_array(reuse.score(QUERY, DOCS)), as_array(no_reuse.score(QUERY, DOCS)), atol=1e-5)

    prompts = reuse.prompts.prompts(QUERY, DOCS)
    before = reuse.backend.evaluated_tokens
    reuse.score(QUERY, DOCS)  # prefix already cached from the call above: only doc + suffix run
    assert reuse.backend.evaluated_tokens - before == sum(len(p.continuation_ids) for p in prompts)
    before = reuse.backend.evaluated_tokens
    reuse.score("wireless headphones", DOCS)  # a new query: its whole prefix runs once for 3 batches of 2
    new_prompts = reuse.prompts.prompts("wireless headphones", DOCS)
    expected = len(new_prompts[0].prefix_ids) + sum(len(p.continuation_ids) for p in new_prompts)
    assert reuse.backend.evaluated_tokens - before == expected
    reuse.backend.forget_prefixes()  # the benchmark's "new query": the whole prefix runs again
    before = reuse.backend.evaluated_tokens
    reuse.score("wireless headphones", DOCS)
    assert reuse.backend.evaluated_tokens - before == len(new_prompts[0].prefix_ids) + sum(
        len(p.continuation_ids) for p in new_prompts
    )


def test_scores_do_not_depend_on_what_was_scored_before(gguf_export):
    """A prefix that shared its rubric cells with an earlier query's, or sat under an explanation, is
    computed whole again: the scores of a call are a function of its input alone (the HTTP server
    relies on this). Q8_0 with the default flash attention is where chunking showed (~3e-3 in p)."""
    scorer = answerfirst.load(gguf_export, variant="q8_0", threads=1)
    first = as_array(scorer.score(QUERY, DOCS))
    scorer.score("wireless headphones", DOCS)  # same rubric cells, another query
    after_other_query = as_array(scorer.score(QUERY, DOCS))
    "".join(scorer.explain("wireless headphones", DOCS[1], max_new_tokens=4))
    after_explanation = as_array(scorer.score(QUERY, DOCS))
    np.testing.assert_array_equal(after_other_query, first)
    np.testing.assert_array_equal(after_explanation, first)


def test_small_context_splits_batches_without_changing_scores(gguf_export, f32_scorer):
    expected = as_array(f32_scorer.score(QUERY, DOCS))
    tight = answerfirst.load(gguf_export, variant="f32", threads=1, config=replace(F32_KV, n_ctx=256, n_batch=32))
    np.testing.assert_allclose(as_array(tight.score(QUERY, DOCS)), expected, atol=1e-5)
    before = tight.backend.evaluated_tokens
    with pytest.raises(ContextLengthError, match=r"does not fit the context of 256 \(n_ctx=256; raise it with ScorerConfig"):
        tight.score(QUERY, ["word " * 400])
    assert tight.backend.evaluated_tokens == before  # refused before llama_decode


def test_explain_gives_torch_greedy_tokens(f32_scorer, tiny_scorer):
    prompt = f32_scorer.prompts.prompt(QUERY, DOCS[0])
    ids = [*prompt.input_ids, f32_scorer.prompts.grade_ids[2]]
    torch_tokens = list(tiny_scorer.backend.generate(ids, 24))
    assert list(f32_scorer.backend.generate(ids, 24))[: len(torch_tokens)] == torch_tokens
    assert "".join(f32_scorer.explain(QUERY, DOCS[0], 24)) == "".join(tiny_scorer.explain(QUERY, DOCS[0], 24))


def test_concurrent_scoring_and_explaining_from_threads(f32_scorer):
    expected = as_array(f32_scorer.score(QUERY, DOCS))
    expected_text = "".join(f32_scorer.explain(QUERY, DOCS[3], 16))
    results, errors = [], []

    def work(i: int) -> None:
        try:
            if i % 2:
                results.append(("score", as_array(f32_scorer.score(QUERY, DOCS))))
            else:
                results.append(("explain", "".join(f32_scorer.explain(QUERY, DOCS[3], 16))))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for kind, value in results:
        if kind == "score":
            np.testing.assert_allclose(value, expected, atol=1e-6)
        else:
            assert value == expected_text


# -- loading without a manifest --------------------------------------------------------------------


def test_a_lone_gguf_file_scores_like_the_export(gguf_export, f32_scorer, tmp_path):
    lone = tmp_path / "alone.gguf"
    shutil.copy(gguf_export / "student-f32.gguf", lone)
    scorer = answerfirst.load(lone, threads=1, config=F32_KV)  # tokenizer + format from GGUF metadata
    np.testing.assert_allclose(as_array(scorer.score(QUERY, DOCS)), as_array(f32_scorer.score(QUERY, DOCS)), atol=1e-6)
    assert scorer.prompts.format == f32_scorer.prompts.format

    shutil.copy(gguf_export / "student-q8_0.gguf", tmp_path / "other.gguf")
    with pytest.raises(ValueError, match="holds 2 .gguf files"):
        answerfirst.load(tmp_path)
    assert answerfirst.load(tmp_path, variant="alone", threads=1).backend.path == lone


# -- errors and resume ----------------------------------------------------------------------------


def test_truncated_gguf_is_a_clear_error(gguf_export, tmp_path):
    data = (gguf_export / "student-f16.gguf").read_bytes()
    for cut in (len(data) - 1000, 2000, 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match="truncated|not a complete GGUF"):
            answerfirst.load(bad)


def test_truncated_file_of_an_export_dir_is_caught_by_its_recorded_size(gguf_export, tmp_path):
    from answerfirst.artifact import ManifestError

    export = tmp_path / "export"
    shutil.copytree(gguf_export, export)
    path = export / "student-f16.gguf"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ManifestError, match="student-f16.gguf is .* bytes but was .* truncated"):
        answerfirst.load(export, variant="f16")


def test_gguf_of_another_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="is a 'llama' model.*answerfirst export gguf"):
        answerfirst.load(path)


@pytest.mark.slow
def test_missing_llama_cpp_python_is_a_clear_import_error(gguf_export):
    code = (
        "import sys; sys.modules['llama_cpp'] = None\n"
        "import answerfirst\n"
        "try:\n"
        f"    answerfirst.load({str(gguf_export)!r})\n"
        "except ImportError as e:\n"
        "    print('IMPORT-ERROR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert 'IMPORT-ERROR' in out.stdout and 'pip install "answerfirst[gguf]"' in out.stdout, out.stdout + out.stderr


def test_rerun_resumes_and_an_export_of_other_weights_is_replaced(gguf_export, tiny_checkpoint, k_quant_checkpoint, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in gguf_export.glob("*.gguf")}
    parity_before = {v.name: v.parity for v in Manifest.read(gguf_export).variants}
    manifest = export_gguf(tiny_checkpoint, gguf_export, ("f32", "f16", "q8_0"), probe_pairs=PAIRS, threads=1)
    assert {p.name: p.stat().st_mtime_ns for p in gguf_export.glob("*.gguf")} == before  # nothing rewritten
    assert {v.name: v.parity for v in manifest.variants} == parity_before
    # The student changed (`make distill export` again): its export replaces the old one, no stale file left.
    other = tmp_path / "other"
    shutil.copytree(gguf_export, other)
    replaced = export_gguf(k_quant_checkpoint, other, ("f32",), probe_pairs=PAIRS, threads=1)
    assert replaced.source["model"] == str(k_quant_checkpoint)
    assert sorted(p.name for p in other.glob("*.gguf")) == sorted({v.file for v in replaced.variants})
    # Another kind of artifact is never overwritten without --force.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "answerfirst.json").write_text('{"kind": "onnx"}')
    with pytest.raises(GGUFExportError, match="another kind of artifact.*--force"):
        export_gguf(k_quant_checkpoint, foreign, ("f32",))
    assert (foreign / "answerfirst.json").read_text() == '{"kind": "onnx"}'


def test_bad_arguments_are_clear_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(GGUFExportError, match="unknown or empty.*choose from"):
        export_gguf(tiny_checkpoint, tmp_path / "x", "q3_zz")
    with pytest.raises(GGUFExportError, match="not a checkpoint directory"):
        export_gguf(tmp_path, tmp_path / "y", "f16")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(GGUFExportError, match="not empty"):
        export_gguf(tiny_checkpoint, tmp_path / "busy", "f16")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="q8_0.*flash_attn"):
        LlamaCppBackend(None, tmp_path, [0], 1, ScorerConfig(kv_cache_type="q8_0", flash_attn=False))


@pytest.mark.slow
def test_cli_export_gguf(tiny_checkpoint, tmp_path, capsys):
    from answerfirst.cli import main

    out = tmp_path / "cli"
    assert main(["export", "gguf", "--model", str(tiny_checkpoint), "--out", str(out), "--quant", "f32", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "f32" in printed and "PASSED" in printed
    assert os.path.isfile(out / "student-f32.gguf")


# -- trust: files, numbers, inputs, threads ---------------------------------------------------------


def _poison(path: Path, tensor_name: str, value: float) -> None:
    """Overwrite one F32 tensor of a GGUF file with `value`, in place (the file keeps its size)."""
    reader = gguf.GGUFReader(path)
    tensor = next(t for t in reader.tensors if t.name == tensor_name)
    offset, count = int(tensor.data_offset), int(tensor.n_elements)
    del reader
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(np.full(count, value, dtype=np.float32).tobytes())


def test_exported_files_are_readable_like_every_other_artifact(gguf_export):
    mode = (gguf_export / "answerfirst.json").stat().st_mode & 0o777
    for f in gguf_export.iterdir():
        assert f.stat().st_mode & 0o777 == mode, f.name
    recorded = Manifest.read(gguf_export).info
    assert {"student-f32.gguf", "student-f16.gguf", "student-q8_0.gguf", "tokenizer.json"} <= set(recorded["files_sha256"])


def test_corrupt_gguf_fails_verify_and_never_scores_nan(gguf_export, tmp_path):
    from answerfirst.artifact import ManifestError
    from answerfirst.runtime.api import NonFiniteScoreError

    export = tmp_path / "export"
    shutil.copytree(gguf_export, export)
    assert answerfirst.load(export, variant="f32", threads=1, verify=True).backend.name == "gguf"
    _poison(export / "student-f32.gguf", "output_norm.weight", np.nan)  # same size: only sha256 sees it
    with pytest.raises(ManifestError, match=r"student-f32\.gguf: sha256 .* recorded at export: the file is corrupted"):
        answerfirst.load(export, variant="f32", threads=1, verify=True)
    answerfirst.load(export, variant="f16", threads=1, verify=True)  # verify reads only the chosen variant
    scorer = answerfirst.load(export, variant="f32", threads=1, config=F32_KV)
    with pytest.raises(NonFiniteScoreError, match=r"student-f32\.gguf gave non-finite grade logits"):
        scorer.score(QUERY, DOCS)

    out = subprocess.run([sys.executable, "-m", "answerfirst.cli", "verify", str(export)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "FAILED" in out.stdout and "student-f32.gguf" in out.stdout and "ok      student-q8_0.gguf" in out.stdout


def test_cli_verify_of_an_export_and_of_a_lone_file(gguf_export, tmp_path):
    out = subprocess.run([sys.executable, "-m", "answerfirst.cli", "verify", str(gguf_export)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok      student-f16.gguf" in out.stdout and "FAILED" not in out.stdout
    lone = tmp_path / "alone.gguf"
    lone.write_bytes((gguf_export / "student-f16.gguf").read_bytes()[:-500])
    out = subprocess.run([sys.executable, "-m", "answerfirst.cli", "verify", str(lone)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "alone.gguf is not a complete GGUF file (truncated" in out.stderr or "alone.gguf is truncated" in out.stderr


def test_huge_query_and_prompt_beyond_the_context_are_refused_before_any_forward_pass(f32_scorer, gguf_export):
    from pairs import HUGE_QUERY

    from answerfirst.afrl import FormatError

    before = f32_scorer.backend.evaluated_tokens
    with pytest.raises(FormatError, match="query is \\d+ tokens, over the limit of 256"):
        f32_scorer.score(HUGE_QUERY, DOCS)
    assert f32_scorer.backend.evaluated_tokens == before
    unlimited = answerfirst.load(gguf_export, variant="f32", threads=1, config=replace(F32_KV, max_query_tokens=10**7))
    with pytest.raises(ContextLengthError, match="does not fit the context of 2048 \\(n_ctx=2048"):
        unlimited.score(HUGE_QUERY, DOCS)
    assert unlimited.backend.evaluated_tokens == 0


def test_each_scorer_keeps_its_own_threads(gguf_export, f32_scorer):
    one = answerfirst.load(gguf_export, variant="f32", threads=1, config=F32_KV)
    two = answerfirst.load(gguf_export, variant="f32", threads=2, config=F32_KV)
    assert (one.backend.threads, two.backend.threads) == (1, 2)
    np.testing.assert_allclose(as_array(one.score(QUERY, DOCS)), as_array(two.score(QUERY, DOCS)), atol=1e-6)
    assert one.backend.threads == 1  # the other context's setting never leaks
    one.close()
    two.close()


def test_threads_with_distinct_queries_equal_sequential(gguf_export):
    from pairs import assert_threads_equal_sequential

    scorer = answerfirst.load(gguf_export, variant="q8_0", threads=1, config=replace(F32_KV, batch_size=2))
    assert_threads_equal_sequential(scorer, atol=1e-5)
    scorer.close()
