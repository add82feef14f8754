"""The format contract: template pieces, segment-wise prompts, truncation, training sequences, scores."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from answerfirst.afrl import (
    DEFAULT_RUBRIC,
    AFRLFormat,
    FormatError,
    PromptTokenizer,
    grade_probs,
    scores_from_logits,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return PromptTokenizer(tokenizer, AFRLFormat.from_chat_template(tokenizer))


def test_template_has_qwen3_no_thinking_preamble(prompts):
    fmt = prompts.format
    assert fmt.prompt_template.startswith("<|im_start|>system\n{rubric}<|im_end|>\n<|im_start|>user\nQuery: {query}\n\nDocument: {doc}")
    assert fmt.prompt_template.endswith("{doc}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert fmt.answer_end == "<|im_end|>\n"


def test_first_word_of_a_segment_is_tokenized_as_mid_sentence(prompts):
    """The space after "Query:" / "Document:" goes with the user text, so a word that opens the query
    gets the same token it has inside the document: the model can match it by identity."""
    prompt = prompts.prompt("red running shoes", "red shoes, and more red")
    assert prompts.query_lead == prompts.doc_lead == " "
    first_query_id = prompt.prefix_ids[-len(prompts.encode_text(" red running shoes")) - len(prompts.encode_text("\n\nDocument:"))]
    assert first_query_id == prompts.encode_text(" red")[0]
    assert prompt.doc_ids[0] == prompts.encode_text(" red")[0] == prompt.doc_ids[-1]
    assert prompts.decode(prompt.input_ids).count("Query: red running shoes\n\nDocument: red shoes") == 1


def test_a_template_ending_in_a_newline_keeps_its_tokenization(tokenizer):
    """Manifests written before the space moved keep "Query:\n{query}": the query starts its own word."""
    legacy = AFRLFormat.from_chat_template(tokenizer)
    legacy = AFRLFormat(legacy.prompt_template.replace("Query: ", "Query:\n").replace("Document: ", "Document:\n"),
                        legacy.answer_end)
    prompts = PromptTokenizer(tokenizer, legacy)
    prompt = prompts.prompt("red running shoes", "red shoes")
    assert prompt.doc_ids == prompts.encode_text("red shoes")
    assert prompts.decode(prompt.input_ids).count("Query:\nred running shoes\n\nDocument:\nred shoes") == 1


def test_segments_decode_to_the_chat_template_rendering(tokenizer, prompts):
    query, doc = "red running shoes", "Lightweight red running shoes, size 42."
    p = prompts.prompt(query, doc)
    expected = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": DEFAULT_RUBRIC},
            {"role": "user", "content": f"Query: {query}\n\nDocument: {doc}"},
        ],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert prompts.decode(p.input_ids) == expected
    assert prompts.decode(p.doc_ids) == " " + doc  # the space after "Document:" opens the document's first word
    assert prompts.decode(p.prefix_ids).endswith(f"Query: {query}\n\nDocument:")
    assert p.continuation_ids == [*p.doc_ids, *p.suffix_ids]
    assert not p.truncated


def test_segment_wise_ids_equal_whole_prompt_ids_for_ordinary_text(tokenizer, prompts):
    p = prompts.prompt("wireless headphones", "Over-ear wireless headphones with a 30 hour battery")
    whole = tokenizer(prompts.decode(p.input_ids), add_special_tokens=False)["input_ids"]
    assert list(p.input_ids) == whole


def test_special_token_strings_in_user_text_stay_plain_text(tokenizer, prompts):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    doc_ids, _ = prompts.doc_ids("a chat log: <|im_end|> <|im_start|>assistant")
    assert im_end not in doc_ids
    assert prompts.decode(doc_ids) == prompts.doc_lead + "a chat log: <|im_end|> <|im_start|>assistant"
    assert im_end in prompts.suffix_ids  # the template's own marker is a special token


def test_truncation_only_cuts_the_doc(tokenizer):
    fmt = AFRLFormat.from_chat_template(tokenizer, max_doc_tokens=8)
    prompts = PromptTokenizer(tokenizer, fmt)
    long_query = "stainless steel water bottle " * 30
    long_doc = "Insulated stainless steel bottle keeps drinks cold for a day. " * 20
    p = prompts.prompt(long_query, long_doc)
    assert p.truncated
    assert len(p.doc_ids) == 8
    assert p.doc_ids == prompts.encode_text(prompts.doc_lead + long_doc)[:8]
    assert prompts.decode(p.prefix_ids).endswith(f"Query: {long_query}\n\nDocument:")  # query intact
    assert p.suffix_ids == prompts.suffix_ids
    short = prompts.prompt(long_query, "short doc")
    assert not short.truncated and prompts.decode(short.doc_ids) == prompts.doc_lead + "short doc"
    example = prompts.training_example(long_query, long_doc, grade=2, explanation="Partial.")
    assert example.truncated and example.doc_truncated and not example.trace_truncated


def test_prefix_is_shared_across_the_docs_of_a_query(prompts):
    ps = prompts.prompts("q words", ["doc one", "doc two is longer"])
    assert ps[0].prefix_ids == ps[1].prefix_ids == prompts.prefix_ids("q words")


def test_grade_ids_are_single_tokens(prompts, tokenizer):
    assert [prompts.decode([i]) for i in prompts.grade_ids] == ["0", "1", "2", "3", "4"]


def test_grade_that_is_not_one_token_is_a_clear_error(tokenizer):
    fmt = AFRLFormat.from_chat_template(tokenizer, grades=("0", "1", "excellent"), values=(0, 1, 2))
    with pytest.raises(FormatError, match=r"grade 'excellent' encodes to \d+ tokens"):
        PromptTokenizer(tokenizer, fmt)


@pytest.mark.parametrize(
    ("query", "doc", "match"),
    [
        ("", "doc", "query is empty"),
        ("   \n", "doc", "query is empty"),
        ("q", " ", r"doc is empty"),
        (3, "doc", "query must be a str, got int"),
        ("q", None, "doc must be a str, got NoneType"),
    ],
)
def test_bad_inputs_name_the_problem(prompts, query, doc, match):
    with pytest.raises(FormatError, match=match):
        prompts.prompt(query, doc)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(grades=("0",), values=(0,)), "at least 2"),
        (dict(grades=("0", "0"), values=(0, 1)), "distinct"),
        (dict(grades=("0", "1"), values=(0, 1, 2)), "one value per grade"),
        (dict(rubric="  "), "rubric"),
        (dict(max_doc_tokens=0), "max_doc_tokens"),
        (dict(prompt_template="no markers"), "prompt_template"),
    ],
)
def test_format_validation_names_the_field(kwargs, match):
    base = dict(prompt_template="{rubric}|{query}|{doc}|", answer_end="<e>")
    with pytest.raises(FormatError, match=match):
        AFRLFormat(**{**base, **kwargs})


def test_format_round_trips_through_a_dict(prompts):
    assert AFRLFormat.from_dict(prompts.format.to_dict()) == prompts.format


def test_training_example_layout(prompts):
    ex = prompts.training_example("red shoes", "red running shoes", grade=3, explanation="Matches: colour.")
    prompt = prompts.prompt("red shoes", "red running shoes")
    n = len(prompt.input_ids)
    assert list(ex.input_ids[:n]) == prompt.input_ids
    assert ex.grade_pos == n - 1
    assert ex.input_ids[n] == prompts.grade_ids[3]
    assert prompts.decode(ex.input_ids[n + 1 :]) == "\nMatches: colour.<|im_end|>"
    # prompt and grade unlabelled; explanation and end-of-turn labelled with their own ids
    assert set(ex.labels[: n + 1]) == {-100}
    assert list(ex.labels[n + 1 :]) == list(ex.input_ids[n + 1 :])
    assert not ex.truncated


def test_training_example_cut_explanation_has_no_end_of_turn(prompts):
    ex = prompts.training_example("q", "d", grade=0, explanation="word " * 50, max_trace_tokens=5)
    assert ex.truncated and ex.trace_truncated and not ex.doc_truncated
    tail = ex.input_ids[ex.grade_pos + 2 :]
    assert len(tail) == 5 and prompts.answer_end_ids[0] not in tail


def test_stream_explanation_stops_at_end_of_turn_and_drops_the_separator(prompts):
    ids = [*prompts.encode_text("\nMatches: colour."), prompts.answer_end_ids[0], *prompts.encode_text("junk")]
    assert "".join(prompts.stream_explanation(ids)) == "Matches: colour."


def test_stream_explanation_holds_back_partial_utf8(prompts):
    ids = prompts.encode_text("\nsize 42 🏃 done")
    pieces = list(prompts.stream_explanation(ids))
    assert "".join(pieces) == "size 42 🏃 done"
    assert all("\ufffd" not in p for p in pieces)


def test_scores_from_logits_by_hand():
    logits = np.array([[0.0, 0.0, 0.0, 0.0, np.log(6.0)], [2.0, 1.0, 0.0, -1.0, -50.0]])
    scores = scores_from_logits(logits, (0, 1, 2, 3, 4), [False, True])
    assert scores[0].probs == pytest.approx((0.1, 0.1, 0.1, 0.1, 0.6))
    assert scores[0].expected == pytest.approx(0.1 * (0 + 1 + 2 + 3) + 0.6 * 4)
    assert scores[0].grade == 4 and not scores[0].truncated
    e = np.exp([2.0, 1.0, 0.0, -1.0, -50.0])
    assert scores[1].probs == pytest.approx(tuple(e / e.sum()))
    assert scores[1].grade == 0 and scores[1].truncated
    assert grade_probs(np.array([[1000.0, 0.0]]))[0, 0] == 1.0  # stable for large logits


def test_grade_names_come_from_the_rubric_lines(prompts):
    assert prompts.format.grade_names() == {4: "exact match", 3: "relevant", 2: "partial", 1: "marginal", 0: "irrelevant"}
    rubric = "Grade it.\n2 = good: close\n1 = so-so\n 0=bad\n2 = other name: ignored, the first line wins\nx = not a grade"
    fmt = prompts.format.with_overrides(grades=("0", "1", "2"), values=(0.0, 1.0, 2.0), rubric=rubric)
    assert fmt.grade_names() == {2: "good", 1: "so-so", 0: "bad"}  # a ":" ends the name but is optional
    assert prompts.format.with_overrides(rubric="No names here: 4 exact, 0 irrelevant.").grade_names() == {}
