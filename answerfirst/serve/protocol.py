"""The wire formats: parse and check request bodies, build response bodies. No HTTP here.

Two rerank shapes that existing clients speak:

    Cohere / Jina   POST /v1/rerank, /v2/rerank, /rerank
        {model?, query, documents: [str | {"text": str}], top_n?, return_documents?, max_tokens_per_doc?}
        -> {id, model, results: [{index, relevance_score, document?: {text}, grade, expected, probs,
            truncated}], usage: {total_tokens}, meta: {tokens: {input_tokens, output_tokens}}}
    TEI             POST /rerank with `texts` instead of `documents`
        {query, texts: [str], raw_scores?, return_text?, truncate?, truncation_direction?}
        -> [{index, score, text?}]

Results are sorted best first (ties: lower index first). relevance_score is the expected grade
scaled to [0, 1]: (expected - min(values)) / (max(values) - min(values)), i.e. expected / 4 with the
default grades 0..4; TEI's `score` is the same number, or the expected grade itself with
raw_scores. Fields the server does not know (Cohere's `priority`, `relevant_spans`, Jina's
`return_embeddings`, ...) are ignored, so clients that send them work unchanged.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from answerfirst.afrl import Score
from answerfirst.runtime.api import ScoringPlan

_REQUIRED = object()


class RequestError(Exception):
    """A request the server refuses: the HTTP status and a one-line message naming the field and the fix."""

    def __init__(self, status: int, message: str, error_type: str = "validation", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.headers = headers or {}

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}


@dataclass(frozen=True)
class RerankCall:
    """A parsed rerank request, either shape."""

    shape: str  # "cohere" | "tei"
    query: str
    documents: list[str]
    top_n: int | None = None
    return_documents: bool = False
    max_doc_tokens: int | None = None
    raw_scores: bool = False  # TEI: score = the expected grade instead of relevance_score
    truncate: bool | None = None  # TEI: False = a document over the model's limit is an error


@dataclass(frozen=True)
class ExplainCall:
    query: str
    document: str
    max_new_tokens: int


# -- parsing -----------------------------------------------------------------------------------------


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _field(body: dict[str, Any], name: str, kind: type, default: Any = _REQUIRED) -> Any:
    """body[name] checked to be a JSON value of `kind` (bool is not an int here); null = absent."""
    value = body.get(name)
    if value is None:
        if default is _REQUIRED:
            raise RequestError(422, f"{name}: required field is missing")
        return default
    wanted = {str: "a string", bool: "true or false", int: "an integer", list: "an array"}[kind]
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
        raise RequestError(422, f"{name}: expected {wanted}, got {_json_type(value)}")
    return value


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise RequestError(422, f"{name}: expected a string, got {_json_type(value)}")
    if not value.strip():
        raise RequestError(422, f"{name}: is empty (or only whitespace); send text to score")
    return value


def _document_text(value: Any, name: str) -> str:
    """A document is a string or an object with a string `text` (Cohere v1 / Jina)."""
    if isinstance(value, dict):
        if "text" not in value:
            raise RequestError(422, f'{name}: an object document needs a "text" field')
        return _text(value["text"], f"{name}.text")
    if not isinstance(value, str):
        raise RequestError(422, f'{name}: expected a string or an object with a "text" string, got {_json_type(value)}')
    return _text(value, name)


def _positive_int(body: dict[str, Any], name: str, upper: int | None = None, hint: str = "") -> int | None:
    value = _field(body, name, int, None)
    if value is not None and value < 1:
        raise RequestError(422, f"{name}: must be at least 1, got {value}")
    if value is not None and upper is not None and value > upper:
        raise RequestError(422, f"{name}: at most {upper} on this server{hint}, got {value}")
    return value


def _check_count(name: str, count: int, max_documents: int) -> None:
    if count > max_documents:
        raise RequestError(
            413,
            f"{name}: {count} documents, more than this server takes in one request ({max_documents}, "
            "answerfirst serve --max-documents); split them over several requests",
            "payload_too_large",
        )


def parse_rerank(body: Any, max_documents: int) -> RerankCall:
    """Either shape: a body with `texts` is TEI's, anything else Cohere/Jina's."""
    if not isinstance(body, dict):
        raise RequestError(422, f"request body: expected a JSON object, got {_json_type(body)}")
    if "texts" in body and "documents" not in body:
        return _parse_tei(body, max_documents)
    query = _text(_field(body, "query", str), "query")
    _field(body, "model", str, None)  # any name is accepted (clients send their own); the reply names ours
    documents = _field(body, "documents", list)
    _check_count("documents", len(documents), max_documents)
    texts = [_document_text(d, f"documents[{i}]") for i, d in enumerate(documents)]
    return RerankCall(
        shape="cohere",
        query=query,
        documents=texts,
        top_n=_positive_int(body, "top_n"),
        return_documents=_field(body, "return_documents", bool, False),
        max_doc_tokens=_positive_int(body, "max_tokens_per_doc"),
    )


def _parse_tei(body: dict[str, Any], max_documents: int) -> RerankCall:
    query = _text(_field(body, "query", str), "query")
    texts = _field(body, "texts", list)
    _check_count("texts", len(texts), max_documents)
    direction = _field(body, "truncation_direction", str, "Right")
    if direction.lower() != "right":
        raise RequestError(422, f'truncation_direction: only "Right" is supported (the end of a document is cut), got {direction!r}')
    return RerankCall(
        shape="tei",
        query=query,
        documents=[_text(t, f"texts[{i}]") for i, t in enumerate(texts)],
        return_documents=_field(body, "return_text", bool, False),
        raw_scores=_field(body, "raw_scores", bool, False),
        truncate=_field(body, "truncate", bool, None),
    )


def parse_explain(body: Any, max_new_tokens_limit: int, default_new_tokens: int = 128) -> ExplainCall:
    if not isinstance(body, dict):
        raise RequestError(422, f"request body: expected a JSON object, got {_json_type(body)}")
    if "document" not in body:
        raise RequestError(422, "document: required field is missing")
    max_new_tokens = _positive_int(body, "max_new_tokens", max_new_tokens_limit, " (answerfirst serve --max-new-tokens)")
    return ExplainCall(
        query=_text(_field(body, "query", str), "query"),
        document=_document_text(body["document"], "document"),
        max_new_tokens=max_new_tokens or min(default_new_tokens, max_new_tokens_limit),
    )


def check_untruncated(call: RerankCall, plan: ScoringPlan, max_doc_tokens: int) -> None:
    """TEI's truncate=false: a document over the model's limit is refused rather than cut."""
    if call.truncate is False:
        for i, prompt in enumerate(plan.prompts):
            if prompt.truncated:
                raise RequestError(
                    413,
                    f"texts[{i}]: longer than the model's {max_doc_tokens} document tokens and truncate is false; "
                    "send truncate: true (its end is cut) or a shorter text",
                    "payload_too_large",
                )


# -- responses -----------------------------------------------------------------------------------


def relevance_score(score: Score, values: Sequence[float]) -> float:
    """The expected grade scaled to [0, 1] by the format's lowest and highest grade values."""
    low, high = min(values), max(values)
    if high == low:
        return 0.0
    return min(1.0, max(0.0, (score.expected - low) / (high - low)))


def ranking(scores: Sequence[Score], top_n: int | None) -> list[int]:
    """Document indices best first (ties: lower index first), cut to top_n."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i].expected, i))
    return order if top_n is None else order[:top_n]


def cohere_response(
    call: RerankCall, scores: Sequence[Score], plan: ScoringPlan, grades: Sequence[str], model_name: str
) -> dict[str, Any]:
    results = []
    for i in ranking(scores, call.top_n):
        s = scores[i]
        result: dict[str, Any] = {"index": i, "relevance_score": relevance_score(s, plan.values)}
        if call.return_documents:
            result["document"] = {"text": call.documents[i]}
        result.update(grade=grades[s.grade], expected=s.expected, probs=list(s.probs), truncated=s.truncated)
        results.append(result)
    tokens = plan.total_tokens
    return {
        "id": str(uuid.uuid4()),
        "model": model_name,
        "results": results,
        "usage": {"total_tokens": tokens},
        "meta": {"tokens": {"input_tokens": tokens, "output_tokens": 0}},
    }


def tei_response(call: RerankCall, scores: Sequence[Score], plan: ScoringPlan) -> list[dict[str, Any]]:
    results = []
    for i in ranking(scores, None):
        value = scores[i].expected if call.raw_scores else relevance_score(scores[i], plan.values)
        result: dict[str, Any] = {"index": i, "score": value}
        if call.return_documents:
            result["text"] = call.documents[i]
        results.append(result)
    return results


def grade_event(score: Score, grades: Sequence[str], values: Sequence[float]) -> dict[str, Any]:
    """The first event of an explanation stream: the grade it explains, with the pair's scores."""
    return {
        "grade": grades[score.grade],
        "relevance_score": relevance_score(score, values),
        "expected": score.expected,
        "probs": list(score.probs),
        "truncated": score.truncated,
    }
