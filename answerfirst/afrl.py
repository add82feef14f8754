"""The AFRL format contract: rubric, grade set, segment-wise prompts, training sequences, scores.

An Answer-First, Reason-Later model writes the relevance grade as the first token of its answer and
an explanation after it. Everything that turns a (query, document) pair into token ids, and logits
back into a score, lives in this module; training, teacher labelling, every runtime backend, the
exporters and the demo call it, so none of them can drift from another.

A prompt is three independently tokenized segments:

    prefix(rubric, query)  +  doc  +  suffix
    \\_ same for every doc _/   \\_ truncated to max_doc_tokens _/   \\_ end of user turn + assistant preamble

so the prefix's KV cache is computed once per query and reused for every document. Template text
(chat markers) is tokenized with special-token parsing; user text (rubric, query, document,
explanation) never is, so a document that happens to contain "<|im_end|>" stays plain text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

DEFAULT_GRADES: tuple[str, ...] = ("0", "1", "2", "3", "4")
DEFAULT_VALUES: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0, 4.0)
DEFAULT_MAX_DOC_TOKENS = 512
DEFAULT_MAX_TRACE_TOKENS = 128

DEFAULT_RUBRIC = """You grade how relevant a document is to a search query.
Grades:
4 = exact match: the document is exactly what the query asks for.
3 = relevant: it satisfies the query, with small differences.
2 = partial: related, but it misses an important part of the query.
1 = marginal: same general area, but it would not satisfy the searcher.
0 = irrelevant: it has nothing to do with the query.
Write the grade digit first, then explain it in a few short lines."""

# The user turn is "Query: {query}\n\nDocument: {doc}". Qwen's pre-tokenizer attaches a space to the
# word after it, so a template piece that ends in a space hands that space to the user text that
# follows (PromptTokenizer does this for any template). Segment-wise ids then equal what tokenizing
# the whole prompt gives for ordinary text, and the first word of a query or document gets the same
# token it has mid-sentence (" red", not "red"): the form it has in the other segment, so a model
# can match a query word in the document by identity. (Templates whose pieces end in a newline,
# like earlier releases' "Query:\n", keep working unchanged.)
QUERY_LABEL = "Query: "
DOC_LABEL = "\n\nDocument: "

# Markers of the prompt template stored in manifests; each appears exactly once, in this order.
RUBRIC_MARK, QUERY_MARK, DOC_MARK = "{rubric}", "{query}", "{doc}"
_SENTINEL = "\u2063AFRL-{}\u2063"  # invisible separator: never produced by a chat template itself


_GRADE_NAME_LINE = re.compile(r"\s*(\S+?)\s*=\s*([^:\n]*)")  # rubric line "GRADE = NAME: ..."


class FormatError(ValueError):
    """The format, a tokenizer or an input does not satisfy the AFRL contract."""


# --------------------------------------------------------------------------------------------
# The format: pure data, saved in every manifest
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AFRLFormat:
    """Everything that defines the prompt and the score, independent of any tokenizer object.

    prompt_template: the rendered chat prompt with "{rubric}", "{query}" and "{doc}" markers, ending
        with the assistant preamble (Qwen3: "<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n").
    answer_end: what the template writes after the assistant's content (ChatML: "<|im_end|>\\n");
        its first token is the end-of-turn token that stops an explanation.
    """

    prompt_template: str
    answer_end: str
    grades: tuple[str, ...] = DEFAULT_GRADES
    values: tuple[float, ...] = DEFAULT_VALUES
    rubric: str = DEFAULT_RUBRIC
    max_doc_tokens: int = DEFAULT_MAX_DOC_TOKENS

    def __post_init__(self) -> None:
        object.__setattr__(self, "grades", tuple(self.grades))
        object.__setattr__(self, "values", tuple(float(v) for v in self.values))
        if len(self.grades) < 2:
            raise FormatError(f"grades: need at least 2 grade strings, got {list(self.grades)}")
        if len(set(self.grades)) != len(self.grades):
            raise FormatError(f"grades: grade strings must be distinct, got {list(self.grades)}")
        if any(not isinstance(g, str) or not g for g in self.grades):
            raise FormatError(f"grades: every grade must be a non-empty string, got {list(self.grades)}")
        if len(self.values) != len(self.grades):
            raise FormatError(
                f"values: {len(self.values)} values for {len(self.grades)} grades; give one value per grade"
            )
        if not all(math.isfinite(v) for v in self.values):
            raise FormatError(f"values: must be finite numbers, got {list(self.values)}")
        if not isinstance(self.rubric, str) or not self.rubric.strip():
            raise FormatError("rubric: must be a non-empty string")
        if not isinstance(self.max_doc_tokens, int) or self.max_doc_tokens < 1:
            raise FormatError(f"max_doc_tokens: must be a positive integer, got {self.max_doc_tokens!r}")
        _split_template(self.prompt_template)  # raises if the markers are missing or out of order
        if not isinstance(self.answer_end, str):
            raise FormatError("answer_end: must be a string")

    @classmethod
    def from_chat_template(cls, tokenizer: Any, **overrides: Any) -> AFRLFormat:
        """Derive the template pieces from a tokenizer's chat template (with `enable_thinking=False`,
        which adds Qwen3's empty think block and is ignored by templates without one)."""
        if not getattr(tokenizer, "chat_template", None):
            raise FormatError(
                "the tokenizer has no chat template; pass a tokenizer with one (e.g. a Qwen3 checkpoint) "
                "or a manifest with 'prompt_template'"
            )
        rubric_s, query_s, doc_s, answer_s = (_SENTINEL.format(n) for n in ("R", "Q", "D", "A"))
        render = lambda messages, **kw: tokenizer.apply_chat_template(  # noqa: E731
            messages, tokenize=False, enable_thinking=False, **kw
        )
        prompt = render(
            [
                {"role": "system", "content": rubric_s},
                {"role": "user", "content": QUERY_LABEL + query_s + DOC_LABEL + doc_s},
            ],
            add_generation_prompt=True,
        )
        for sentinel in (rubric_s, query_s, doc_s):
            if prompt.count(sentinel) != 1:
                raise FormatError("the chat template rewrites message content; cannot derive AFRL prompt pieces")
        template = prompt.replace(rubric_s, RUBRIC_MARK).replace(query_s, QUERY_MARK).replace(doc_s, DOC_MARK)
        # What the template writes after an assistant message: the end-of-turn text.
        with_answer = render(
            [
                {"role": "system", "content": rubric_s},
                {"role": "user", "content": query_s},
                {"role": "assistant", "content": answer_s},
            ]
        )
        if with_answer.count(answer_s) != 1:
            raise FormatError("the chat template rewrites assistant content; cannot derive the end of turn")
        answer_end = with_answer.split(answer_s, 1)[1]
        return cls(prompt_template=template, answer_end=answer_end, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {
            "grades": list(self.grades),
            "values": list(self.values),
            "rubric": self.rubric,
            "max_doc_tokens": self.max_doc_tokens,
            "prompt_template": self.prompt_template,
            "answer_end": self.answer_end,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AFRLFormat:
        known = {"grades", "values", "rubric", "max_doc_tokens", "prompt_template", "answer_end"}
        missing = {"grades", "values", "prompt_template", "answer_end"} - data.keys()
        if missing:
            raise FormatError(f"format is missing field(s): {', '.join(sorted(missing))}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def render(self, query: str, doc: str) -> str:
        """The whole prompt as one text, rubric filled in (for tools that tokenize a prompt in one
        piece, such as llama-server's rerank template, which passes "{query}" and "{document}")."""
        head, after_rubric, doc_open, suffix = _split_template(self.prompt_template)
        return head + self.rubric + after_rubric + query + doc_open + doc + suffix

    def with_overrides(self, **changes: Any) -> AFRLFormat:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def grade_names(self) -> dict[int, str]:
        """The name the rubric gives each grade: a line "4 = exact match: the document is ..." names
        grade index 4 "exact match" (the text after "=", up to a ":" or the end of the line). Grades
        the rubric names no such way are absent; the first line naming a grade wins."""
        names: dict[int, str] = {}
        for line in self.rubric.splitlines():
            match = _GRADE_NAME_LINE.match(line)
            if match and match.group(1) in self.grades and match.group(2).strip():
                names.setdefault(self.grades.index(match.group(1)), match.group(2).strip())
        return names


def _lead_spaces(piece: str) -> tuple[str, str]:
    """'...Query: ' -> ('...Query:', ' '): the trailing spaces belong to the user text that follows."""
    stripped = piece.rstrip(" ")
    return stripped, piece[len(stripped):]


def _split_template(template: str) -> tuple[str, str, str, str]:
    """'{a}{rubric}{b}{query}{c}{doc}{d}' -> (a, b, c, d)."""
    if not isinstance(template, str):
        raise FormatError("prompt_template: must be a string")
    pieces = []
    rest = template
    for mark in (RUBRIC_MARK, QUERY_MARK, DOC_MARK):
        if rest.count(mark) != 1:
            raise FormatError(
                f"prompt_template: must contain {RUBRIC_MARK}, {QUERY_MARK} and {DOC_MARK} once each, in that order"
            )
        before, rest = rest.split(mark)
        pieces.append(before)
    pieces.append(rest)
    return tuple(pieces)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Prompts and training sequences: the format bound to a tokenizer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """One (query, doc) prompt as its three segments of token ids."""

    prefix_ids: tuple[int, ...]
    doc_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    truncated: bool

    @property
    def input_ids(self) -> list[int]:
        return [*self.prefix_ids, *self.doc_ids, *self.suffix_ids]

    @property
    def continuation_ids(self) -> list[int]:
        """What follows a cached prefix: doc + suffix."""
        return [*self.doc_ids, *self.suffix_ids]


@dataclass(frozen=True)
class TrainingExample:
    """prompt + grade + "\\n" + explanation + end-of-turn, with what each loss term reads.

    input_ids:  (T,) the whole sequence.
    grade_pos:  index of the position whose logits predict the grade (the last prompt token);
                the KL and gold-grade terms read the K grade logits there.
    labels:     (T,) HF convention (labels[t] is the token at t, -100 = ignored; the loss shifts):
                the explanation and end-of-turn tokens are labelled, the prompt and the grade
                token are not (the grade has its own terms).
    truncated:  the document was cut to max_doc_tokens (doc_truncated) or the explanation to
                max_trace_tokens (trace_truncated).
    tags:       (T,) a token tag per position (-100 = none) from the document's tagged character
                spans, or None when the row has none (train.py's tag term reads them).
    """

    input_ids: tuple[int, ...]
    grade_pos: int
    labels: tuple[int, ...]
    truncated: bool
    doc_truncated: bool = False
    trace_truncated: bool = False
    tags: tuple[int, ...] | None = None


class PromptTokenizer:
    """An AFRLFormat bound to a fast HF tokenizer: builds every prompt and training sequence."""

    def __init__(self, tokenizer: Any, fmt: AFRLFormat):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise FormatError(f"{type(tokenizer).__name__} is not a fast tokenizer; AFRL needs a `tokenizers` backend")
        from tokenizers import Tokenizer

        self.tokenizer = tokenizer
        self.format = fmt
        self._special = backend  # parses "<|im_start|>"-style special tokens: template text
        self._plain = Tokenizer.from_str(backend.to_str())  # never does: user text
        self._plain.encode_special_tokens = True

        pieces = _split_template(fmt.prompt_template)
        # (template piece before a user segment without its trailing spaces, those spaces)
        (a, self.rubric_lead), (b, self.query_lead), (c, self.doc_lead) = (_lead_spaces(p) for p in pieces[:3])
        d = pieces[3]
        self._head, self._after_rubric, self._doc_open = (self._encode_template(p) for p in (a, b, c))
        self.suffix_ids = self._encode_template(d)
        self.grade_ids = self._grade_ids()
        answer_end_ids = self._encode_template(fmt.answer_end)
        self.answer_end_ids = answer_end_ids
        stop = {answer_end_ids[0]} if answer_end_ids else set()
        if tokenizer.eos_token_id is not None:
            stop.add(int(tokenizer.eos_token_id))
        self.stop_ids: frozenset[int] = frozenset(stop)
        self._newline_ids = self.encode_text("\n")

    # -- encoding --------------------------------------------------------------------------------

    def _encode_template(self, text: str) -> tuple[int, ...]:
        return tuple(self._special.encode(text, add_special_tokens=False).ids) if text else ()

    def encode_text(self, text: str) -> tuple[int, ...]:
        """User text: special-token strings inside it stay plain text."""
        return tuple(self._plain.encode(text, add_special_tokens=False).ids) if text else ()

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    @property
    def pad_id(self) -> int:
        """The id right-padded batches are filled with: the tokenizer's pad token, else the last
        suffix id. Any id works: pads sit after every real token of their row, and causal attention
        never lets a real token read what comes after it."""
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else self.suffix_ids[-1]

    def _grade_ids(self) -> tuple[int, ...]:
        ids = []
        for grade in self.format.grades:
            encoded = self.encode_text(grade)
            if len(encoded) != 1:
                raise FormatError(
                    f"grade {grade!r} encodes to {len(encoded)} tokens {list(encoded)} in this tokenizer; "
                    "every grade string must be exactly one token (choose other grade strings)"
                )
            ids.append(encoded[0])
        if len(set(ids)) != len(ids):
            raise FormatError(f"grades {list(self.format.grades)} share token ids {ids}")
        return tuple(ids)

    # -- prompts ---------------------------------------------------------------------------------

    def prefix_ids(self, query: str, max_query_tokens: int | None = None) -> tuple[int, ...]:
        """prefix(rubric, query): identical for every document of a query. The query is never cut:
        one longer than `max_query_tokens` is a FormatError."""
        query_ids = self.encode_text(self.query_lead + check_text(query, "query"))
        if max_query_tokens is not None and len(query_ids) > max_query_tokens:
            raise FormatError(
                f"query is {len(query_ids)} tokens, over the limit of {max_query_tokens}; shorten it "
                "(queries are never truncated) or raise ScorerConfig(max_query_tokens=...)"
            )
        rubric_ids = self.encode_text(self.rubric_lead + self.format.rubric)
        return self._head + rubric_ids + self._after_rubric + query_ids + self._doc_open

    def doc_ids(self, doc: str, max_doc_tokens: int | None = None) -> tuple[tuple[int, ...], bool]:
        """(ids, truncated): the only segment that is ever cut, to `max_doc_tokens`.

        max_doc_tokens: a tighter limit for this call (a larger one than the format's is capped to it)."""
        return self._cut(self.encode_text(self.doc_lead + check_text(doc, "doc")), self._doc_limit(max_doc_tokens))

    def _doc_limit(self, max_doc_tokens: int | None) -> int:
        if max_doc_tokens is None:
            return self.format.max_doc_tokens
        if not isinstance(max_doc_tokens, int) or isinstance(max_doc_tokens, bool) or max_doc_tokens < 1:
            raise FormatError(f"max_doc_tokens must be a positive int, got {max_doc_tokens!r}")
        return min(self.format.max_doc_tokens, max_doc_tokens)

    @staticmethod
    def _cut(ids: tuple[int, ...], limit: int) -> tuple[tuple[int, ...], bool]:
        return (ids[:limit], True) if len(ids) > limit else (ids, False)

    def prompt(
        self, query: str, doc: str, prefix_ids: tuple[int, ...] | None = None, max_doc_tokens: int | None = None
    ) -> Prompt:
        doc_ids, truncated = self.doc_ids(doc, max_doc_tokens)
        prefix = self.prefix_ids(query) if prefix_ids is None else prefix_ids
        return Prompt(prefix, doc_ids, self.suffix_ids, truncated)

    def prompts(
        self, query: str, docs: Sequence[str], max_query_tokens: int | None = None, max_doc_tokens: int | None = None
    ) -> list[Prompt]:
        """All prompts of one query; the prefix is tokenized once and shared. The documents are encoded
        as one batch, which the tokenizers library spreads over the cores (each gets the ids that
        encode_text gives it alone): a GPU scores 512 documents in less time than one core takes to
        tokenize them one by one."""
        docs = check_docs(docs)
        prefix = self.prefix_ids(query, max_query_tokens)
        limit = self._doc_limit(max_doc_tokens)
        prompts = []
        encodings = self._plain.encode_batch([self.doc_lead + doc for doc in docs], add_special_tokens=False) if docs else []
        for encoding in encodings:
            doc_ids, truncated = self._cut(tuple(encoding.ids), limit)
            prompts.append(Prompt(prefix, doc_ids, self.suffix_ids, truncated))
        return prompts

    # -- training sequences ----------------------------------------------------------------------

    def training_example(
        self, query: str, doc: str, grade: int, explanation: str, max_trace_tokens: int = DEFAULT_MAX_TRACE_TOKENS,
        doc_tags: Sequence[Sequence[int]] | None = None,
    ) -> TrainingExample:
        """grade: index into `format.grades` (the grade the answer starts with). doc_tags: [[start,
        end, tag], ...] character spans of `doc`; every document token that overlaps a span gets its tag."""
        if not 0 <= grade < len(self.grade_ids):
            raise FormatError(f"grade index {grade} is outside 0..{len(self.grade_ids) - 1}")
        prompt = self.prompt(query, doc)
        trace = self.encode_text("\n" + explanation.strip()) if explanation.strip() else self._newline_ids
        trace_truncated = len(trace) > max_trace_tokens
        # A cut explanation gets no end-of-turn: the model must not learn to stop mid-sentence.
        answer_tail = trace[:max_trace_tokens] if trace_truncated else trace + self.answer_end_ids[:1]
        prompt_ids = prompt.input_ids
        input_ids = (*prompt_ids, self.grade_ids[grade], *answer_tail)
        labels = (-100,) * (len(prompt_ids) + 1) + tuple(answer_tail)
        tags = None
        if doc_tags is not None:
            doc_start = len(prompt.prefix_ids)
            tagged = [-100] * len(input_ids)
            tagged[doc_start : doc_start + len(prompt.doc_ids)] = self._doc_token_tags(doc, doc_tags)[: len(prompt.doc_ids)]
            tags = tuple(tagged)
        return TrainingExample(
            input_ids, len(prompt_ids) - 1, labels, prompt.truncated or trace_truncated, prompt.truncated, trace_truncated,
            tags,
        )

    def _doc_token_tags(self, doc: str, doc_tags: Sequence[Sequence[int]]) -> tuple[int, ...]:
        """One tag per token of the (uncut) document segment: the tag of the span it overlaps, else -100."""
        if not isinstance(doc_tags, (list, tuple)):
            raise FormatError(f"document tags must be a list of [start, end, tag], got {type(doc_tags).__name__}")
        for span in doc_tags:
            if not isinstance(span, (list, tuple)) or len(span) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in span):
                raise FormatError(f"a document tag must be [start, end, tag] integers, got {span!r}")
            start, end, tag = span
            if not 0 <= start < end <= len(doc) or tag < 0:
                raise FormatError(f"document tag {list(span)} is outside the document ({len(doc)} characters) or negative")
        lead = len(self.doc_lead)  # offsets count the lead spaces the segment starts with
        offsets = self._plain.encode(self.doc_lead + doc, add_special_tokens=False).offsets
        tags = [-100] * len(offsets)
        for i, (a, b) in enumerate(offsets):
            for start, end, tag in doc_tags:
                if a < end + lead and b > start + lead:
                    tags[i] = tag
        return tuple(tags)

    # -- explanations ----------------------------------------------------------------------------

    def stream_explanation(self, token_ids: Iterable[int]) -> Iterator[str]:
        """Turn generated ids (after the grade token) into text pieces as they arrive.

        Stops at an end-of-turn id; drops the newline that separates the grade from the explanation;
        holds back an incomplete UTF-8 sequence until its last byte arrives."""
        ids: list[int] = []
        emitted = ""
        for token_id in token_ids:
            if token_id in self.stop_ids:
                break
            ids.append(int(token_id))
            text = self.decode(ids).lstrip("\n")
            if text.endswith("\ufffd"):
                continue
            if len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text
        text = self.decode(ids).lstrip("\n")
        if len(text) > len(emitted):
            yield text[len(emitted):]


def check_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise FormatError(f"{name} must be a str, got {type(value).__name__}")
    if not value.strip():
        raise FormatError(f"{name} is empty (or only whitespace)")
    return value


def check_docs(docs: Any) -> list[str]:
    if isinstance(docs, str) or not isinstance(docs, Sequence):
        raise FormatError(f"docs must be a list of str, got {type(docs).__name__}")
    for i, doc in enumerate(docs):
        check_text(doc, f"docs[{i}]")
    return list(docs)


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """The relevance judgement of one (query, doc) pair.

    grade: index of the most likely grade (0..K-1; with the default grades, the grade itself).
    expected: sum_k value_k * probs_k, what ranking uses.
    probs: the K-grade distribution at the first answer position.
    truncated: the document was cut to max_doc_tokens.
    """

    grade: int
    expected: float
    probs: tuple[float, ...] = field(repr=False)
    truncated: bool = False


def grade_probs(grade_logits: Any) -> np.ndarray:
    """(B, K) grade logits -> (B, K) float64 softmax."""
    z = np.asarray(grade_logits, dtype=np.float64)
    if z.ndim != 2:
        raise FormatError(f"grade logits must be (batch, K), got shape {z.shape}")
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def scores_from_logits(grade_logits: Any, values: Sequence[float], truncated: Sequence[bool]) -> list[Score]:
    """(B, K) logits of the grade tokens at the first answer position -> B Scores."""
    probs = grade_probs(grade_logits)
    if probs.shape[1] != len(values):
        raise FormatError(f"{probs.shape[1]} grade logits for {len(values)} grade values")
    expected = probs @ np.asarray(values, dtype=np.float64)
    return [
        Score(int(p.argmax()), float(e), tuple(float(x) for x in p), bool(t))
        for p, e, t in zip(probs, expected, truncated, strict=True)
    ]
