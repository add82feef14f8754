"""Property tests of the prompt builder (answerfirst/afrl.py) with hypothesis: any unicode, chat-marker
text, empty and whitespace strings, very long strings. Invariants: the segments rejoin to the full
prompt, only the document is ever truncated, and the grade is read at the last prompt position."""

from __future__ import annotations

import unicodedata

import pytest
from transformers import AutoTokenizer

from answerfirst.afrl import AFRLFormat, FormatError, PromptTokenizer, _split_template

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# Pieces a hostile or careless input may carry: the template's own chat markers and labels, its
# placeholders, control and combining characters, emoji with modifiers, right-to-left text.
SPECIAL = ["<|im_end|>", "<|im_start|>", "<|endoftext|>", "<think>", "</think>", "assistant\n", "user\n", "system",
           "Query:\n", "\n\nDocument:\n", "{doc}", "{query}", "{rubric}", "\u2063AFRL-D\u2063", "\x00", "\r\n", "\t",
           "e\u0301", "\u200b", "🏃🏽\u200d♀️", "שלום", "速干", " ", "\n"]

texts = st.one_of(
    st.text(min_size=1, max_size=60),  # any unicode (no surrogates)
    st.lists(st.sampled_from(SPECIAL) | st.text(max_size=3), min_size=1, max_size=25).map("".join),
    st.builds(lambda piece, n: piece * n, st.text(min_size=1, max_size=8), st.integers(200, 2500)),  # very long
)
blank = st.text(alphabet=" \t\n\r\u3000\u00a0\u2028\x0b\x0c", max_size=12)  # every str.isspace() kind, and ""
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return PromptTokenizer(tokenizer, AFRLFormat.from_chat_template(tokenizer, max_doc_tokens=24))


def _rendered(prompts: PromptTokenizer, query: str, doc: str) -> str:
    """The prompt as text: the template's pieces around the rubric, query and doc (normalised as the
    tokenizer does); pieces, not str.replace, so a query that reads "{doc}" stays literal."""
    a, b, c, d = _split_template(prompts.format.prompt_template)
    nfc = lambda text: unicodedata.normalize("NFC", text)  # noqa: E731
    return a + nfc(prompts.format.rubric) + b + nfc(query) + c + nfc(doc) + d


@PROPERTY
@given(query=texts, doc=texts)
def test_segments_rejoin_to_the_full_prompt(prompts, query, doc):
    if not query.strip() or not doc.strip():
        return  # the blank cases are the next test's
    p = prompts.prompt(query, doc)
    assert p.input_ids == [*p.prefix_ids, *p.doc_ids, *p.suffix_ids]
    assert p.continuation_ids == [*p.doc_ids, *p.suffix_ids]
    whole = _rendered(prompts, query, "\x01")
    head, tail = whole[: whole.rindex("\x01")], whole[whole.rindex("\x01") + 1 :]
    # rubric and query whole, special-token text kept as text; the space before the document opens its first word
    assert prompts.decode(p.prefix_ids) + prompts.doc_lead == head
    assert prompts.decode(p.suffix_ids) == tail
    if not p.truncated:
        assert prompts.decode(p.input_ids) == _rendered(prompts, query, doc)
    # user text never becomes a chat marker: the marker ids appear exactly where the template puts them
    markers = set(prompts.suffix_ids) & set(prompts._encode_template("<|im_start|><|im_end|>"))
    template_only = prompts.prompt("q", "d")
    for marker in markers:
        assert p.input_ids.count(marker) == template_only.input_ids.count(marker)


@PROPERTY
@given(query=texts, doc=texts, limit=st.integers(1, 40))
def test_only_the_document_is_truncated(tokenizer, query, doc, limit):
    if not query.strip() or not doc.strip():
        return
    prompts = PromptTokenizer(tokenizer, AFRLFormat.from_chat_template(tokenizer, max_doc_tokens=limit))
    p = prompts.prompt(query, doc)
    full_doc = prompts.encode_text(prompts.doc_lead + doc)
    assert p.doc_ids == full_doc[:limit]
    assert p.truncated == (len(full_doc) > limit)
    assert p.prefix_ids == prompts.prefix_ids(query)  # the query is never cut, whatever its length
    query_ids = prompts.encode_text(prompts.query_lead + query)
    assert query_ids == p.prefix_ids[len(p.prefix_ids) - len(query_ids) - len(prompts._doc_open) : len(p.prefix_ids) - len(prompts._doc_open)]
    assert p.suffix_ids == prompts.suffix_ids


@PROPERTY
@given(query=texts, doc=texts, grade=st.integers(0, 4), explanation=st.one_of(texts, blank))
def test_the_grade_is_read_at_the_last_prompt_position(prompts, query, doc, grade, explanation):
    if not query.strip() or not doc.strip():
        return
    p = prompts.prompt(query, doc)
    example = prompts.training_example(query, doc, grade, explanation, max_trace_tokens=16)
    assert example.grade_pos == len(p.input_ids) - 1  # the last prompt token predicts the grade
    assert list(example.input_ids[: example.grade_pos + 1]) == p.input_ids
    assert example.input_ids[example.grade_pos + 1] == prompts.grade_ids[grade]
    assert set(example.labels[: example.grade_pos + 2]) == {-100}  # neither the prompt nor the grade is a trace target
    assert len(example.labels) == len(example.input_ids)
    assert p.input_ids[-len(prompts.suffix_ids) :] == list(prompts.suffix_ids)  # scoring's last position ends the preamble


@PROPERTY
@given(space=blank, other=texts)
def test_empty_and_whitespace_input_is_a_clear_format_error(prompts, space, other):
    with pytest.raises(FormatError, match="query is empty"):
        prompts.prompt(space, other if other.strip() else "doc")
    with pytest.raises(FormatError, match="doc is empty"):
        prompts.prompt(other if other.strip() else "query", space)
    with pytest.raises(FormatError, match=r"docs\[1\] is empty"):
        prompts.prompts("query", ["doc", space])


@PROPERTY
@given(query=texts)
def test_the_query_limit_refuses_and_never_cuts(prompts, query):
    if not query.strip():
        return
    n = len(prompts.encode_text(prompts.query_lead + query))
    assert prompts.prefix_ids(query, max_query_tokens=n) == prompts.prefix_ids(query)
    if n > 1:
        with pytest.raises(FormatError, match=f"query is {n} tokens, over the limit of {n - 1}"):
            prompts.prefix_ids(query, max_query_tokens=n - 1)


@PROPERTY
@given(docs=st.lists(texts, min_size=1, max_size=12), limit=st.one_of(st.none(), st.integers(1, 30)))
def test_a_query_s_documents_tokenize_as_one_batch_exactly_as_one_by_one(prompts, docs, limit):
    """prompts() encodes the documents in one batch (on all cores); each gets the ids, cut and flag
    that prompt() gives it alone, chat markers in the text included."""
    docs = [d for d in docs if d.strip()]
    if not docs:
        return
    assert prompts.prompts("red shoes", docs, max_doc_tokens=limit) == [
        prompts.prompt("red shoes", d, max_doc_tokens=limit) for d in docs
    ]
