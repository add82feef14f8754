"""`answerfirst serve` as a real process under load, on 127.0.0.1: 32 clients x 10 mixed requests
get 0 errors and exactly the single-request replies; SIGTERM sent mid-load answers every request
the server accepted, refuses the rest cleanly, and exits 0."""

from __future__ import annotations

import asyncio
import os
import re
import signal
from dataclasses import dataclass

import httpx
import pytest
from serving import WAIT_S, assert_same_as_library, mixed_requests, serve_in_subprocess

import answerfirst
from answerfirst.runtime.api import ScorerConfig

pytest.importorskip("fastapi")
pytest.importorskip("onnxruntime")

CLIENTS, PER_CLIENT = 32, 10
BATCH = 4  # documents per pass: most requests take several
# ONNX int8 is the backend whose scores depend most on what shares a pass (see test_serve.py); two
# concurrent passes, so the lanes run under the load and the drain too
SERVER_ARGS = ("--variant", "int8", "--threads", "1", "--concurrent-passes", "2", "--max-batch", str(BATCH), "--max-queue", "64")


@dataclass
class Outcome:
    request: int
    status: int | None  # None: no HTTP response (connection refused or closed)
    body: object = None
    error: str = ""


async def run_clients(url: str, requests, on_reply=None) -> list[Outcome]:
    """CLIENTS concurrent clients, each sending its PER_CLIENT requests one after another."""

    async def client(first: int) -> list[Outcome]:
        outcomes = []
        async with httpx.AsyncClient(base_url=url, timeout=WAIT_S) as http:
            for i in range(first, first + PER_CLIENT):
                query, docs = requests[i]
                try:
                    response = await http.post("/v1/rerank", json={"query": query, "documents": docs})
                    outcomes.append(Outcome(i, response.status_code, response.json()))
                except httpx.TimeoutException:
                    raise
                except httpx.TransportError as e:
                    outcomes.append(Outcome(i, None, error=f"{type(e).__name__}: {e}"))
                if on_reply is not None:
                    on_reply(outcomes[-1])
        return outcomes

    per_client = await asyncio.gather(*(client(c * PER_CLIENT) for c in range(CLIENTS)))
    return [outcome for outcomes in per_client for outcome in outcomes]


@pytest.fixture(scope="module")
def workload(tiny_onnx_export):
    """320 mixed requests and the library's scores for each, one request at a time."""
    requests = mixed_requests(CLIENTS * PER_CLIENT, seed=7)
    scorer = answerfirst.load(tiny_onnx_export, variant="int8", threads=1, config=ScorerConfig(batch_size=BATCH))
    return requests, [scorer.score(query, docs) for query, docs in requests]


@pytest.mark.slow
def test_32_clients_x_10_requests_get_exactly_the_single_request_replies(tiny_onnx_export, workload):
    requests, expected = workload
    with serve_in_subprocess("--model", str(tiny_onnx_export), *SERVER_ARGS) as server:
        distinct = {}
        with httpx.Client(base_url=server.url, timeout=WAIT_S) as http:  # each distinct request alone first
            for query, docs in requests:
                key = (query, tuple(docs))
                if key not in distinct:
                    distinct[key] = http.post("/v1/rerank", json={"query": query, "documents": docs}).json()["results"]
        outcomes = asyncio.run(run_clients(server.url, requests))
    assert [o for o in outcomes if o.status != 200] == []  # 0 errors
    assert len(outcomes) == CLIENTS * PER_CLIENT
    for outcome in outcomes:
        query, docs = requests[outcome.request]
        assert outcome.body["results"] == distinct[(query, tuple(docs))]  # equal to the single-request reply
        assert_same_as_library(outcome.body, expected[outcome.request])  # which is the library's


@pytest.mark.slow
def test_sigterm_mid_load_answers_every_accepted_request_and_exits_0(tiny_onnx_export, workload):
    requests, expected = workload
    with serve_in_subprocess("--model", str(tiny_onnx_export), *SERVER_ARGS) as server:
        answered = 0

        def count(outcome: Outcome) -> None:
            nonlocal answered
            answered += outcome.status == 200
            if answered == 64:  # a fifth of the load is done: stop the server under the rest
                os.kill(server.process.pid, signal.SIGTERM)

        outcomes = asyncio.run(run_clients(server.url, requests, on_reply=count))
        assert server.process.wait(WAIT_S) == 0
        stopped = server.wait_for_line(r"stopped \((\d+) requests accepted, (\d+) answered\)")
    ok = [o for o in outcomes if o.status == 200]
    for outcome in ok:
        assert_same_as_library(outcome.body, expected[outcome.request])
    refused = [o for o in outcomes if o.status != 200]
    for outcome in refused:  # refused cleanly: no connection, or a 503 that says why
        assert outcome.status is None or (outcome.status == 503 and "shutting down" in outcome.body["error"]), outcome
    accepted, finished = int(stopped.group(1)), int(stopped.group(2))
    assert accepted == finished == len(ok)  # every request the server took was answered: none lost
    assert 64 <= len(ok) < CLIENTS * PER_CLIENT and len(ok) + len(refused) == CLIENTS * PER_CLIENT
    assert any("draining" in line for line in server.lines)
    assert not any(re.search(r"Traceback|ERROR", line) for line in server.lines), "".join(server.lines)
