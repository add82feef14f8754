"""For the HTTP tests: `answerfirst serve` in a thread of the test process or as a real subprocess,
always on 127.0.0.1 and a free port, every wait bounded; a mixed request workload, and what the
library says about it."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from pairs import DOCS

WAIT_S = 60  # the longest any helper waits for a server to start or stop
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUERIES = ("red running shoes", "wireless headphones", "stainless steel water bottle 1l")
MORE_DOCS = (
    "Trail running shoes in red and black, size 42, with a grippy sole for mud and rocks.",
    "Noise cancelling wireless headphones with a 30 hour battery and a carrying case.",
    "A 1 litre stainless steel bottle.",
    "Garden hose, 20 m, green.",
    "Prix: 49,90 € — Größe 42 — couleur rouge",
)
POOL = (*DOCS, *MORE_DOCS)


# -- what the library says, computed independently of the server ---------------------------------


def relevance(score) -> float:
    return score.expected / 4  # default grades 0..4: the expected grade scaled to [0, 1]


def best_first(scores) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i].expected, i))


def assert_same_as_library(body: dict, expected: list, top_n: int | None = None) -> None:
    """A Cohere-shape reply equals the library's scores exactly: order, scores, distributions."""
    order = best_first(expected)[:top_n]
    assert [r["index"] for r in body["results"]] == order
    for result in body["results"]:
        score = expected[result["index"]]
        assert result["relevance_score"] == relevance(score)
        assert result["expected"] == score.expected
        assert result["probs"] == list(score.probs)
        assert result["truncated"] == score.truncated


def mixed_requests(count: int, seed: int) -> list[tuple[str, list[str]]]:
    """Requests of 1-9 documents over three queries; every fifth repeats an earlier one exactly."""
    rng = np.random.default_rng(seed)
    requests: list[tuple[str, list[str]]] = []
    for i in range(count):
        if i % 5 == 4:
            requests.append(requests[int(rng.integers(len(requests)))])
            continue
        docs = [POOL[j] for j in rng.choice(len(POOL), size=int(rng.integers(1, 10)), replace=False)]
        requests.append((QUERIES[int(rng.integers(len(QUERIES)))], docs))
    return requests


async def post_all(url: str, requests: list[tuple[str, list[str]]], concurrency: int) -> list[httpx.Response]:
    """Send every request, `concurrency` at a time, each client in its own connection pool."""
    responses: list[httpx.Response | None] = [None] * len(requests)
    queue = list(enumerate(requests))

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client:
            while queue:
                i, (query, docs) = queue.pop()
                responses[i] = await client.post("/v1/rerank", json={"query": query, "documents": docs})

    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return responses  # type: ignore[return-value]




@contextlib.contextmanager
def serve_in_thread(scorer_or_loader: Any, **settings: Any) -> Iterator[Any]:
    """Yield the Service of a server running `scorer` (or calling a loader) on 127.0.0.1:PORT;
    its base URL is `service.url`. The caller keeps ownership of a Scorer it passes."""
    import uvicorn

    from answerfirst.serve.app import ServeConfig, Service, create_app

    load = scorer_or_loader if callable(scorer_or_loader) and not hasattr(scorer_or_loader, "score") else (lambda: scorer_or_loader)
    config = ServeConfig(model=settings.pop("model", "tiny"), **settings)
    service = Service(config, load, owns_scorer=False)
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", lifespan="on"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    service.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield service
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        sock.close()


def wait_ready(url: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not become ready within {timeout_s} s")


@dataclass
class ServerProcess:
    """`python -m answerfirst.cli serve ...` with its printed lines collected by a reader thread."""

    process: subprocess.Popen
    lines: list[str] = field(default_factory=list)
    url: str = ""

    def wait_for_line(self, pattern: str, timeout_s: float = WAIT_S) -> re.Match:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r}; the server printed:\n" + "".join(self.lines))

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)


@contextlib.contextmanager
def serve_in_subprocess(*args: str) -> Iterator[ServerProcess]:
    process = subprocess.Popen(
        [sys.executable, "-m", "answerfirst.cli", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    server = ServerProcess(process)
    server._reader = threading.Thread(target=server._read, daemon=True)
    server._reader.start()
    try:
        server.url = "http://" + server.wait_for_line(r"http://(127\.0\.0\.1:\d+)").group(1)
        server.wait_for_line(r"ready: ")
        yield server
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(WAIT_S)
        server._reader.join(WAIT_S)
