"""`answerfirst serve` over real HTTP on 127.0.0.1: clients nobody here wrote (the cohere SDK,
Haystack's TEI ranker) get the library's order and scores to the bit; concurrent requests never
change a number on any backend; bad input, overload, deadlines and draining give clear JSON errors
and leave no work behind. The 32-client load and SIGTERM tests are in test_serve_load.py."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from pairs import DOCS, QUERY
from serving import (
    AUTH,
    KEY,
    MORE_DOCS,
    WAIT_S,
    assert_same_as_library,
    best_first,
    mixed_requests,
    post_all,
    relevance,
    serve_in_thread,
    wait_ready,
)

import answerfirst
from answerfirst.runtime.api import ForwardPass, ScorerConfig

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")


def metric(service, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{service.url}/metrics", timeout=WAIT_S).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def load_backend(backend: str, request, batch_size: int):
    config = ScorerConfig(batch_size=batch_size)
    if backend == "torch":
        return answerfirst.load(request.getfixturevalue("tiny_checkpoint"), config=config)
    if backend == "onnx-int8":
        return answerfirst.load(request.getfixturevalue("tiny_onnx_export"), variant="int8", threads=1, config=config)
    return answerfirst.load(request.getfixturevalue("tiny_gguf_export"), variant="q8_0", threads=1, config=config)


class Gate:
    """Holds each forward pass of a real scorer until the test opens it, and counts the passes run
    and the most held at once."""

    def __init__(self, scorer):
        self.open = threading.Event()
        self.entered = threading.Event()
        self.passes: list[int] = []
        self.waiting = self.most_waiting = 0
        self._count = threading.Lock()
        self._grade_logits = scorer.backend.grade_logits
        scorer.backend.grade_logits = self._gated

    def _gated(self, prefix_ids, continuations):
        with self._count:
            self.passes.append(len(continuations))
            self.waiting += 1
            self.most_waiting = max(self.most_waiting, self.waiting)
        self.entered.set()
        try:
            assert self.open.wait(WAIT_S), "the test never opened the gate"
        finally:
            with self._count:
                self.waiting -= 1
        return self._grade_logits(prefix_ids, continuations)


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.01)


# -- clients nobody here wrote ------------------------------------------------------------------------


def test_cohere_sdk_gets_the_library_order_and_scores(tiny_scorer):
    cohere = pytest.importorskip("cohere")
    expected = tiny_scorer.score(QUERY, DOCS)
    with serve_in_thread(tiny_scorer, api_key=KEY) as service:
        client = cohere.ClientV2(base_url=service.url, api_key=KEY, timeout=WAIT_S)
        response = client.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=3)
        order = best_first(expected)
        assert [r.index for r in response.results] == order[:3]
        assert [r.relevance_score for r in response.results] == [relevance(expected[i]) for i in order[:3]]
        top = response.results[0]
        assert top.model_extra["probs"] == list(expected[top.index].probs)  # answerfirst's own fields ride along
        assert top.model_extra["grade"] == tiny_scorer.grades[expected[top.index].grade]

        v1 = cohere.Client(base_url=service.url, api_key=KEY, timeout=WAIT_S)
        response = v1.rerank(model="rerank-english-v3.0", query=QUERY, documents=DOCS, return_documents=True)
        assert [r.index for r in response.results] == order
        assert [r.document.text for r in response.results] == [DOCS[i] for i in order]

        with pytest.raises(cohere.errors.UnauthorizedError):
            cohere.ClientV2(base_url=service.url, api_key="wrong", timeout=WAIT_S).rerank(model="m", query=QUERY, documents=DOCS)


def test_haystack_tei_ranker_gets_the_library_order_and_scores(tiny_scorer, monkeypatch):
    monkeypatch.setenv("HAYSTACK_TELEMETRY_ENABLED", "False")  # read when haystack is first imported
    rankers = pytest.importorskip("haystack_integrations.components.rankers.huggingface_api")
    from haystack import Document
    from haystack.utils import Secret

    expected = tiny_scorer.score(QUERY, DOCS)
    order = best_first(expected)
    with serve_in_thread(tiny_scorer, api_key=KEY) as service:
        ranker = rankers.HuggingFaceTEIRanker(url=service.url, top_k=4, token=Secret.from_token(KEY), timeout=WAIT_S)
        ranked = ranker.run(query=QUERY, documents=[Document(content=d) for d in DOCS])["documents"]
        assert [d.content for d in ranked] == [DOCS[i] for i in order[:4]]
        assert [d.score for d in ranked] == [relevance(expected[i]) for i in order[:4]]

        raw = rankers.HuggingFaceTEIRanker(url=service.url, raw_scores=True, token=Secret.from_token(KEY), timeout=WAIT_S)
        ranked = raw.run(query=QUERY, documents=[Document(content=d) for d in DOCS])["documents"]
        assert [d.score for d in ranked] == [expected[i].expected for i in order]  # raw_scores: the expected grade


# -- batching --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "onnx-int8", "onnx-int8-concurrent", "gguf-q8_0"])
def test_concurrent_requests_get_exactly_the_single_request_scores(backend, request):
    """8 clients x 6 mixed requests, passes of 3 documents: every reply equals Scorer.score() on its
    own input, computed one at a time beforehand, to the last bit, on every backend; on ONNX also
    with passes of different queries run side by side (on 1-thread sessions, where the scorer that
    computed the expected scores runs on 2 threads)."""
    concurrent = backend.endswith("-concurrent")
    if concurrent:
        scorer = answerfirst.load(request.getfixturevalue("tiny_onnx_export"), variant="int8", threads=2,
                                  config=ScorerConfig(batch_size=3))
    else:
        scorer = load_backend(backend, request, batch_size=3)
    requests = mixed_requests(48, seed=1)
    expected = [scorer.score(query, docs) for query, docs in requests]
    with serve_in_thread(scorer, batch_window_ms=20, concurrent_passes=2 if concurrent else 1) as service:
        responses = asyncio.run(post_all(service.url, requests, concurrency=8))
        shared = metric(service, "answerfirst_shared_passes_total")
        passes = metric(service, "answerfirst_batch_size_count")
        side_by_side = metric(service, "answerfirst_concurrent_rounds_total")
        lane_threads = service.lane_scorer.threads if concurrent else None
    for response, scores in zip(responses, expected, strict=True):
        assert response.status_code == 200, response.text
        assert_same_as_library(response.json(), scores)
    assert passes + shared == sum(len(scorer.plan(q, d).passes) for q, d in requests)  # each ran once, or was shared
    assert (side_by_side > 0) == concurrent  # the lanes ran rounds, or there are none
    assert lane_threads == (1 if concurrent else None)


def test_passes_of_different_queries_run_side_by_side(tiny_onnx_export):
    """With two concurrent passes, a round holding three queries keeps two passes in flight at once on
    the 1-thread copy; a round of one query runs on the full scorer, one pass at a time."""
    scorer = answerfirst.load(tiny_onnx_export, variant="int8", threads=2)
    queries = ("wireless headphones", "red running shoes", "stainless steel water bottle 1l")
    expected = [scorer.score(q, DOCS) for q in queries]
    full = Gate(scorer)
    with serve_in_thread(scorer, batch_window_ms=0, concurrent_passes=2) as service:
        assert service.wait_loaded(WAIT_S)
        lanes = Gate(service.lane_scorer)

        async def scenario():
            async with httpx.AsyncClient(base_url=service.url, timeout=WAIT_S) as client:
                post = lambda q: asyncio.ensure_future(client.post("/v1/rerank", json={"query": q, "documents": DOCS}))  # noqa: E731
                first = post(queries[0])
                await asyncio.to_thread(full.entered.wait, WAIT_S)  # a round of one query: on the full scorer
                rest = [post(q) for q in queries]
                await asyncio.to_thread(wait_until, lambda: service.batcher.in_flight() == 4, "all four are admitted")
                full.open.set()
                await asyncio.to_thread(wait_until, lambda: lanes.waiting == 2, "two passes are in flight on the lanes")
                lanes.open.set()
                return [await first, *(await asyncio.gather(*rest))]

        responses = asyncio.run(scenario())
    for response, scores in zip(responses, [expected[0], *expected], strict=True):
        assert_same_as_library(response.json(), scores)
    assert full.passes == [len(DOCS)] and len(lanes.passes) == 3 and lanes.most_waiting == 2


def test_concurrent_passes_on_a_backend_without_them_is_a_load_error(tiny_checkpoint):
    """Asked for on torch (one thread count per process), concurrent passes stop the load with a line
    that says why; left unset, torch serves one pass at a time."""
    from answerfirst.serve.app import ServeConfig, Service

    scorer = answerfirst.load(tiny_checkpoint)
    assert scorer.concurrent(2) is None
    service = Service(ServeConfig(model="tiny", concurrent_passes=2), lambda: scorer, owns_scorer=False)
    service.start_loading()
    assert not service.wait_loaded(WAIT_S)
    assert "concurrent_passes=2: the torch backend runs one pass at a time" in str(service.load_error)
    default = Service(ServeConfig(model="tiny"), lambda: scorer, owns_scorer=False)
    default.start_loading()
    assert default.wait_loaded(WAIT_S) and default.concurrent_passes == 1
    default.close()


def test_requests_in_flight_together_share_prefixes_and_identical_passes(tiny_checkpoint):
    scorer = answerfirst.load(tiny_checkpoint, config=ScorerConfig(batch_size=2))
    requests = [
        (QUERY, DOCS),  # 3 passes
        (QUERY, DOCS),  # the same request again: its 3 passes are shared
        # the same documents in another order (DOCS[0] and DOCS[1] tie in length and keep theirs):
        # sorted by length they make the same 3 backend calls, shared too
        (QUERY, [DOCS[i] for i in (2, 4, 0, 1, 3)]),
        (QUERY, list(MORE_DOCS[:3])),  # the same query: its passes continue the same prefix KV
    ]
    expected = [scorer.score(query, docs) for query, docs in requests]
    scorer.backend.forget_prefixes()
    computed = scorer.backend.prefix_cache.misses
    gate = Gate(scorer)
    with serve_in_thread(scorer, batch_window_ms=0) as service:

        async def scenario():
            async with httpx.AsyncClient(base_url=service.url, timeout=WAIT_S) as client:
                blocker = asyncio.ensure_future(client.post("/v1/rerank", json={"query": "wireless headphones", "documents": DOCS[:1]}))
                await asyncio.to_thread(gate.entered.wait, WAIT_S)  # the worker holds the blocker's pass
                pending = [asyncio.ensure_future(client.post("/v1/rerank", json={"query": q, "documents": d})) for q, d in requests]
                await asyncio.to_thread(wait_until, lambda: service.batcher.in_flight() == 5, "all five are admitted")
                gate.open.set()
                return await blocker, await asyncio.gather(*pending)

        blocker, responses = asyncio.run(scenario())
        shared = metric(service, "answerfirst_shared_passes_total")
    assert blocker.status_code == 200
    for response, scores in zip(responses, expected, strict=True):
        assert_same_as_library(response.json(), scores)
    assert shared == 6
    assert len(gate.passes) == 1 + 3 + 2  # the blocker's, then the two distinct plans of QUERY
    assert scorer.backend.prefix_cache.misses - computed == 2  # one prefix per query, for all five requests


@pytest.mark.parametrize("backend", ["torch", "onnx-int8", "gguf-q8_0"])
def test_why_requests_never_share_a_pass(backend, request):
    """A document's logits change with the other documents of its pass (padding, batch shape; ONNX
    int8 also quantizes activations with one scale per batch). So the batcher runs each request's
    own passes and never mixes requests in one."""
    scorer = load_backend(backend, request, batch_size=16)
    (whole,) = scorer.plan(QUERY, DOCS).passes
    alone = np.vstack([scorer.run_pass(ForwardPass(whole.prefix_ids, (c,), (0,))) for c in whole.continuations])
    together = scorer.run_pass(whole)
    assert not np.array_equal(alone, together)
    np.testing.assert_array_equal(together, scorer.run_pass(whole))  # the same pass, the same bits


# -- bad input -------------------------------------------------------------------------------------


def test_bad_requests_get_one_json_error_naming_the_field(tiny_scorer):
    with serve_in_thread(tiny_scorer, api_key=KEY, max_documents=4, max_request_bytes=4096) as service:
        url = service.url

        def post(path, body=None, content=None, headers=AUTH):
            return httpx.post(url + path, json=body, content=content, headers=headers, timeout=WAIT_S)

        cases = [
            (post("/v1/rerank", content=b'{"query": "x",'), 400, "request body: not valid JSON"),
            (post("/v1/rerank", [1, 2]), 422, "request body: expected a JSON object, got an array"),
            (post("/v1/rerank", {"documents": ["a"]}), 422, "query: required field is missing"),
            (post("/v1/rerank", {"query": 3, "documents": ["a"]}), 422, "query: expected a string, got a number"),
            (post("/v2/rerank", {"query": "  ", "documents": ["a"]}), 422, "query: is empty"),
            (post("/rerank", {"query": "q", "documents": "a"}), 422, "documents: expected an array, got a string"),
            (post("/v1/rerank", {"query": "q", "documents": ["a", {"title": "b"}]}), 422, 'documents[1]: an object document needs a "text" field'),
            (post("/v1/rerank", {"query": "q", "documents": ["a", 7]}), 422, "documents[1]: expected a string or an object"),
            (post("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}), 422, "top_n: must be at least 1, got 0"),
            (post("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": True}), 422, "top_n: expected an integer, got a boolean"),
            (post("/v1/rerank", {"query": "q", "documents": ["a"], "return_documents": "yes"}), 422, "return_documents: expected true or false"),
            (post("/v1/rerank", {"query": "q", "documents": ["a"] * 5}), 413, "documents: 5 documents, more than this server takes"),
            (post("/v1/rerank", {"query": "q", "documents": ["a" * 5000]}), 413, "request body: larger than this server takes (4096 bytes"),
            (post("/rerank", {"query": "q", "texts": ["a", ""]}), 422, "texts[1]: is empty"),
            (post("/rerank", {"query": "q", "texts": ["a"], "truncation_direction": "Left"}), 422, 'truncation_direction: only "Right"'),
            (post("/v1/explain", {"query": "q"}), 422, "document: required field is missing"),
            (post("/v1/explain", {"query": "q", "document": "d", "max_new_tokens": 10**6}), 422, "max_new_tokens: at most 512"),
            (post("/v1/rerank", {"query": "q", "documents": ["a"]}, headers={}), 401, "missing API key"),
            (post("/v1/rerank", {"query": "q", "documents": ["a"]}, headers={"Authorization": "Bearer nope"}), 401, "wrong API key"),
            (httpx.get(url + "/v1/models", timeout=WAIT_S), 401, "missing API key"),
            (httpx.get(url + "/v1/rerank", headers=AUTH, timeout=WAIT_S), 405, "GET is not allowed on /v1/rerank"),
            (httpx.post(url + "/v9/rerank", headers=AUTH, timeout=WAIT_S), 404, "no route /v9/rerank; the API is"),
        ]
        for response, status, message in cases:
            assert response.status_code == status, (message, response.text)
            assert message in response.json()["error"], response.text
        assert cases[-5][0].headers["WWW-Authenticate"] == "Bearer"
        # probes and scrapers need no key; a good request still works after all that
        assert httpx.get(url + "/health", timeout=WAIT_S).status_code == 200
        assert httpx.get(url + "/metrics", timeout=WAIT_S).status_code == 200
        assert post("/v1/rerank", {"query": "q", "documents": ["a", {"text": "b"}]}).status_code == 200
        assert post("/v1/rerank", {"query": "q", "documents": ["a"]}, headers={"X-API-Key": KEY}).status_code == 200
        assert post("/v1/rerank", {"query": "q", "documents": []}).json()["results"] == []
        assert metric(service, "answerfirst_http_requests_total", route="/v1/rerank", status="422") == 8


def test_document_limits_cut_like_the_library(tiny_scorer):
    long_doc = "red running shoes with a breathable mesh upper " * 10
    docs = [long_doc, DOCS[3]]
    plan = tiny_scorer.plan(QUERY, docs, max_doc_tokens=8)
    expected = plan.scores([tiny_scorer.run_pass(p) for p in plan.passes])
    with serve_in_thread(tiny_scorer) as service:
        body = httpx.post(
            service.url + "/v1/rerank", json={"query": QUERY, "documents": docs, "max_tokens_per_doc": 8}, timeout=WAIT_S
        ).json()
        assert_same_as_library(body, expected)
        assert [r["truncated"] for r in sorted(body["results"], key=lambda r: r["index"])] == [True, False]
        assert body["usage"]["total_tokens"] == plan.total_tokens

        too_long = {"query": QUERY, "texts": ["word " * 600, "short"], "truncate": False}
        response = httpx.post(service.url + "/rerank", json=too_long, timeout=WAIT_S)
        assert response.status_code == 413
        assert "texts[0]: longer than the model's 512 document tokens and truncate is false" in response.json()["error"]
        response = httpx.post(service.url + "/rerank", json={**too_long, "truncate": True}, timeout=WAIT_S)
        assert response.status_code == 200 and sorted(r["index"] for r in response.json()) == [0, 1]


# -- overload, deadlines, clients that leave ---------------------------------------------------------


def test_full_queue_is_503_with_retry_after_and_the_admitted_are_answered(tiny_checkpoint):
    scorer = answerfirst.load(tiny_checkpoint, config=ScorerConfig(batch_size=1))
    body = {"query": QUERY, "documents": DOCS[:2]}
    expected = scorer.score(QUERY, DOCS[:2])
    gate = Gate(scorer)
    with serve_in_thread(scorer, max_queue=2, batch_window_ms=0) as service:

        async def scenario():
            async with httpx.AsyncClient(base_url=service.url, timeout=WAIT_S) as client:
                first = asyncio.ensure_future(client.post("/v1/rerank", json=body))
                await asyncio.to_thread(gate.entered.wait, WAIT_S)  # the worker holds the first pass
                second = asyncio.ensure_future(client.post("/v1/rerank", json=body))
                await asyncio.to_thread(wait_until, lambda: service.batcher.in_flight() == 2, "two are admitted")
                refused = await client.post("/v1/rerank", json=body)
                gate.open.set()
                return await first, await second, refused

        first, second, refused = asyncio.run(scenario())
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
    assert "server busy: 2 requests are waiting" in refused.json()["error"]
    for response in (first, second):
        assert response.status_code == 200
        assert_same_as_library(response.json(), expected)


def test_deadline_is_504_and_no_later_pass_of_it_runs(tiny_checkpoint):
    scorer = answerfirst.load(tiny_checkpoint, config=ScorerConfig(batch_size=1))
    gate = Gate(scorer)
    with serve_in_thread(scorer, timeout_s=0.5, batch_window_ms=0) as service:

        async def two_requests():
            async with httpx.AsyncClient(base_url=service.url, timeout=WAIT_S) as client:
                running = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS[:3]})  # 3 passes
                queued = client.post("/v1/rerank", json={"query": "wireless headphones", "documents": DOCS[:2]})
                return await asyncio.gather(running, queued)

        responses = asyncio.run(two_requests())  # the first pass waits at the gate past both deadlines
        assert [r.status_code for r in responses] == [504, 504]
        assert "not scored within the server's deadline (0.5 s" in responses[0].json()["error"]
        gate.open.set()
        wait_until(lambda: service.batcher.in_flight() == 0, "the worker has dropped both")
        assert gate.passes == [1]  # only the pass already running finished; 4 others never ran
        assert service.batcher.answered == 0  # nobody was left to read an answer


def test_a_client_that_leaves_cancels_its_remaining_passes(tiny_checkpoint):
    scorer = answerfirst.load(tiny_checkpoint, config=ScorerConfig(batch_size=1))
    gate = Gate(scorer)
    with serve_in_thread(scorer, batch_window_ms=0) as service:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(service.url + "/v1/rerank", json={"query": QUERY, "documents": DOCS[:3]}, timeout=0.5)
        wait_until(lambda: metric(service, "answerfirst_http_requests_total", status="499") == 1, "the server saw it leave")
        gate.open.set()
        wait_until(lambda: service.batcher.in_flight() == 0, "the worker has dropped it")
        assert gate.passes == [1]


# -- operations --------------------------------------------------------------------------------------


def test_health_is_ready_only_once_loaded_and_not_while_draining(tiny_scorer):
    release = threading.Event()

    def slow_load():
        assert release.wait(WAIT_S)
        return tiny_scorer

    with serve_in_thread(slow_load) as service:
        health = httpx.get(service.url + "/health", timeout=WAIT_S)
        assert health.status_code == 503 and health.json()["status"] == "loading"
        early = httpx.post(service.url + "/v1/rerank", json={"query": QUERY, "documents": DOCS}, timeout=WAIT_S)
        assert early.status_code == 503 and "still loading" in early.json()["error"] and early.headers["Retry-After"]
        release.set()
        wait_ready(service.url)
        assert metric(service, "answerfirst_ready") == 1

        service.begin_drain()  # what SIGTERM does first
        health = httpx.get(service.url + "/health", timeout=WAIT_S)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        late = httpx.post(service.url + "/v1/rerank", json={"query": QUERY, "documents": DOCS}, timeout=WAIT_S)
        assert late.status_code == 503 and "shutting down" in late.json()["error"]
        assert late.headers["Connection"] == "close" and metric(service, "answerfirst_ready") == 0


def test_metrics_count_requests_documents_passes_and_queue(tiny_checkpoint):
    scorer = answerfirst.load(tiny_checkpoint, config=ScorerConfig(batch_size=2))
    with serve_in_thread(scorer) as service:
        for docs in (DOCS, DOCS[:1]):
            httpx.post(service.url + "/v1/rerank", json={"query": QUERY, "documents": docs}, timeout=WAIT_S)
        httpx.post(service.url + "/rerank", json={"query": QUERY, "texts": DOCS}, timeout=WAIT_S)
        httpx.post(service.url + "/rerank", json={"query": ""}, timeout=WAIT_S)
        assert metric(service, "answerfirst_http_requests_total", route="/v1/rerank", status="200") == 2
        assert metric(service, "answerfirst_http_requests_total", route="/rerank", status="200") == 1
        assert metric(service, "answerfirst_http_requests_total", route="/rerank", status="422") == 1
        assert metric(service, "answerfirst_http_request_duration_seconds_count", route="/v1/rerank") == 2
        assert metric(service, "answerfirst_documents_scored_total") == 2 * len(DOCS) + 1
        assert metric(service, "answerfirst_batch_size_count") == 3 + 1 + 3  # passes of <= 2 documents
        assert metric(service, "answerfirst_batch_size_sum") == 2 * len(DOCS) + 1
        assert metric(service, "answerfirst_queue_depth") == 0


def test_models_describes_the_served_model(tiny_scorer):
    with serve_in_thread(tiny_scorer, model_name="student-v1") as service:
        (model,) = httpx.get(service.url + "/v1/models", timeout=WAIT_S).json()["data"]
    assert model["id"] == "student-v1" and model["backend"] == "torch"
    assert model["grades"] == list(tiny_scorer.grades) and model["values"] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert model["max_batch"] == tiny_scorer.config.batch_size and model["max_doc_tokens"] == 512


def read_events(response: httpx.Response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
    return events


def test_explain_streams_the_grade_first_then_the_library_text(tiny_scorer):
    with serve_in_thread(tiny_scorer) as service:
        body = {"query": QUERY, "document": {"text": DOCS[0]}, "max_new_tokens": 12}
        with httpx.stream("POST", service.url + "/v1/explain", json=body, timeout=WAIT_S) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = read_events(response)
    score = tiny_scorer.score(QUERY, [DOCS[0]])[0]
    (first, grade), *texts, (last, _) = events
    assert first == "grade" and last == "done" and {name for name, _ in texts} <= {"text"}
    assert grade["grade"] == tiny_scorer.grades[score.grade] and grade["probs"] == list(score.probs)
    assert grade["relevance_score"] == relevance(score)
    assert "".join(t["text"] for _, t in texts) == "".join(tiny_scorer.explain(QUERY, DOCS[0], 12))


def test_a_client_that_leaves_an_explanation_stops_its_generation(tiny_checkpoint):
    scorer = answerfirst.load(tiny_checkpoint)
    generated, resume = [], threading.Event()
    generate = scorer.backend.generate

    def held_generate(input_ids, max_new_tokens):
        for token in generate(input_ids, max_new_tokens):
            generated.append(token)
            if len(generated) == 3:
                assert resume.wait(WAIT_S)  # hold the worker until the client has gone
            yield token

    scorer.backend.generate = held_generate
    with serve_in_thread(scorer) as service:
        body = {"query": QUERY, "document": DOCS[0], "max_new_tokens": 400}
        with httpx.stream("POST", service.url + "/v1/explain", json=body, timeout=WAIT_S) as response:
            first = next(response.iter_lines())  # the grade event has arrived; then the client closes
        assert first == "event: grade"
        wait_until(lambda: metric(service, "answerfirst_http_requests_total", route="/v1/explain") == 1, "the stream ended")
        resume.set()
        wait_until(lambda: service.batcher.in_flight() == 0, "the worker dropped the explanation")
    assert len(generated) <= 4  # the step running when the client left, and nothing after it


def test_serve_config_errors_name_the_field():
    from answerfirst.serve.app import ServeConfig

    for kwargs, message in [
        ({"max_batch": 0}, "max_batch: must be a positive integer"),
        ({"timeout_s": 0}, "timeout_s: must be a positive number of seconds"),
        ({"batch_window_ms": -1}, "batch_window_ms: must be within 0..1000 ms"),
        ({"port": 70000}, "port: must be within 0..65535"),
        ({"api_key": " "}, "api_key: is empty"),
        ({"concurrent_passes": 0}, "concurrent_passes: must be a positive integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            ServeConfig(model="m", **kwargs)
    assert "api_key" not in repr(ServeConfig(model="m", api_key="secret"))  # never printed


def test_serve_bench_measures_every_level_and_writes_json_and_markdown(tiny_scorer, tmp_path):
    from answerfirst.bench.serving import ServeBenchConfig, markdown, run_serve_bench, write_results

    with serve_in_thread(tiny_scorer, api_key=KEY) as service:
        config = ServeBenchConfig(url=service.url, concurrency=(1, 3), requests=6, docs=3, doc_words=(8, 20), warmup=1,
                                  rounds=2, api_key=KEY)
        results = run_serve_bench(config, progress=lambda line: None)
        scored = metric(service, "answerfirst_documents_scored_total")
    paths = write_results(results, tmp_path)
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(results))
    assert [level["concurrency"] for level in results["levels"]] == [1, 3]
    for level in results["levels"]:
        assert level["ok"] == level["requests"] == 12 and level["runs"] == 2 and level["errors"] == {}
        assert level["documents_per_s"] == pytest.approx(12 * 3 / level["seconds"])
        assert len(level["run_requests_per_s"]) == 2 and min(level["run_requests_per_s"]) > 0
        assert 0 < level["latency_s"]["p50"] <= level["latency_s"]["p99"] <= level["latency_s"]["max"]
    assert scored == (1 + 4 * 6) * 3  # no pass was shared: within a level's run every request is distinct
    # and every level sends the same requests, so the levels differ in concurrency alone
    assert results["levels"][0]["prompt_tokens"] == results["levels"][1]["prompt_tokens"] > 0
    assert results["server"]["backend"] == "torch" and results["throughput_16_over_1"] is None
    assert "| 3 | " in markdown(results) and paths["markdown"].read_text() == markdown(results)
    with pytest.raises(RuntimeError, match="no answerfirst server at http://127.0.0.1:9"):
        run_serve_bench(ServeBenchConfig(url="http://127.0.0.1:9"))


@pytest.mark.slow
def test_cli_a_model_that_cannot_load_is_one_clear_error_and_exit_2(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "answerfirst.cli", "serve", "--model", str(tmp_path / "missing"), "--port", "0"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "answerfirst serve: error: could not load a tokenizer" in out.stderr
    assert "Traceback" not in out.stdout + out.stderr


def test_cli_without_the_serve_extra_names_the_install():
    script = (
        "import sys; sys.modules['fastapi'] = None\n"
        "from answerfirst.cli import main\n"
        "sys.exit(main(['serve', '--model', '.']))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert 'answerfirst serve needs the [serve] extra (fastapi is not installed): pip install "answerfirst[serve]"' in out.stderr
    assert "Traceback" not in out.stderr


def test_serve_loads_a_checkpoint_in_the_precision_asked(tiny_checkpoint):
    from answerfirst.serve.app import ServeConfig
    from answerfirst.serve.cli import _load

    assert _load(ServeConfig(model=str(tiny_checkpoint), precision="bf16")).backend.dtype == "bfloat16"
    assert _load(ServeConfig(model=str(tiny_checkpoint))).backend.dtype == "float32"
