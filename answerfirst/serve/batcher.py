"""Batching across requests: one worker thread runs the forward passes of every request in flight.

Exactness comes first. A document's grade logits depend on the other rows of its forward pass:
padding length and batch size change how the float kernels block their sums, and ONNX int8
quantizes the activations with one scale per tensor, i.e. over the whole batch (tests/test_serve.py,
test_why_requests_never_share_a_pass, shows it on torch, ONNX int8 and GGUF). So the batcher never
puts documents of two requests in one pass: a request runs exactly the passes `Scorer.plan()` gives
it (at most `batch_size` documents each), and its scores equal `Scorer.score()` on the same input
whatever else is in flight.

What concurrent requests share, without changing a number:
- rounds: each round takes one unit from every request waiting (a scoring pass, or a few steps of
  an explanation), so a one-document request never waits behind a thousand-document one;
- the prefix KV: in a round, the passes of requests with the same query run back to back, so the
  backend computes that query's prefix once and every pass continues from its KV; the order of the
  query groups reverses every round, so the group that ran last runs first again while its prefix
  is still in the backend's small prefix cache (two entries; llama.cpp keeps one);
- identical passes (the same query and the same documents: retries, or one candidate list reranked
  for several users) run once, and every request that holds one gets its logits;
- the collection window: after the worker was idle it waits `window_s` before its first round, so
  requests that arrive together share that round.

A request whose deadline passed, or whose client left, is dropped before its next unit: at most the
unit already running finishes, so no work runs that nobody will read.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from answerfirst.afrl import Score
from answerfirst.runtime.api import ForwardPass, Scorer, ScoringPlan

logger = logging.getLogger(__name__)

EXPLAIN_STEPS_PER_ROUND = 8  # explanation pieces per round: a pass costs far more than one token


class QueueFull(Exception):
    """More requests are waiting than the server admits; retry after `retry_after` seconds."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} requests are waiting, the most this server queues; retry in {retry_after} s")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The server is draining: it answers what it accepted and takes nothing new."""


class DeadlineExceeded(Exception):
    """The request was not done within its deadline; its remaining work was dropped."""


@dataclass(eq=False)
class Job:
    """One request in flight: a scoring plan, or an explanation (its grade pass, then its text)."""

    seq: int
    plan: ScoringPlan
    deadline: float  # time.monotonic() by which the scores (or the grade) must be ready
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # what the worker delivers: ("scores", list[Score]) | ("grade", Score) |
    #                        ("text", str) | ("done", None) | ("error", Exception)
    explain: tuple[str, str, int] | None = None  # (query, document, max_new_tokens)
    logits: list[np.ndarray] = field(default_factory=list)  # (b, K) per pass done, in plan order
    pieces: Iterator[str] | None = None  # the explanation's text once the grade is known
    cancelled: bool = False  # set from the event loop when nobody waits for the answer any more
    finished: bool = False

    @property
    def next_pass(self) -> ForwardPass | None:
        done = len(self.logits)
        return self.plan.passes[done] if done < len(self.plan.passes) else None

    def cancel(self) -> None:
        """Called by the handler (event loop thread) when it stops waiting: the worker drops the rest."""
        self.cancelled = True

    async def next_event(self, timeout: float | None = None) -> tuple[str, Any]:
        return await asyncio.wait_for(self.events.get(), timeout)


class Batcher:
    """Schedules the passes of concurrent requests on one worker thread (see the module docstring).

    scorer: the one Scorer of the server; window_s: the collection window; max_queue: requests
    admitted at once (waiting or running); metrics: a ServeMetrics or None."""

    def __init__(self, scorer: Scorer, window_s: float, max_queue: int, metrics: Any = None):
        self.scorer = scorer
        self.window_s = window_s
        self.max_queue = max_queue
        self.metrics = metrics
        self.admitted = 0  # requests ever accepted (the drain report and tests read these)
        self.answered = 0  # ... whose result or error the worker delivered (not dropped: cancelled)
        self._requests: list[Job] = []
        self._seq = itertools.count()
        self._pass_seconds = 0.0  # moving average, for Retry-After
        self._reverse_groups = False  # flips every round (see the module docstring)
        self._cond = threading.Condition()
        self._closing = False
        self._worker = threading.Thread(target=self._work, name="answerfirst-batcher", daemon=True)
        self._worker.start()

    # -- the event loop's side ---------------------------------------------------------------------

    def submit(self, plan: ScoringPlan, timeout_s: float, explain: tuple[str, str, int] | None = None) -> Job:
        """Admit a request (call from the event loop); raises QueueFull or ShuttingDown."""
        if not plan.passes:
            raise ValueError("a plan without documents has nothing to run")
        loop = asyncio.get_running_loop()
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._requests) >= self.max_queue:
                raise QueueFull(len(self._requests), self._retry_after())
            request = Job(next(self._seq), plan, time.monotonic() + timeout_s, loop, asyncio.Queue(), explain)
            self._requests.append(request)
            self.admitted += 1
            self._observe_queue()
            self._cond.notify()
        return request

    def in_flight(self) -> int:
        with self._cond:
            return len(self._requests)

    def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, let the worker finish the admitted ones, stop it."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._worker.join(timeout_s)
        if self._worker.is_alive():
            logger.warning("the batcher worker did not stop within %.0f s", timeout_s)

    def _retry_after(self) -> int:
        """Seconds until the queue has drained, from the passes waiting and the mean pass time."""
        waiting = sum(len(r.plan.passes) - len(r.logits) + (r.explain is not None) for r in self._requests)
        return int(min(60, max(1, math.ceil(waiting * self._pass_seconds))))

    def _observe_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._requests))

    # -- the worker --------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                idle = not self._requests
                while not self._requests and not self._closing:
                    self._cond.wait()
                if not self._requests:
                    return  # closing, nothing left
            if idle and self.window_s > 0:
                time.sleep(self.window_s)  # collect the requests arriving with this one
            try:
                self._round()
            except Exception:  # a bug here must not kill the worker and hang every request
                logger.exception("batcher round failed")

    def _live(self) -> list[Job]:
        """The requests to serve this round; drops the cancelled and fails the expired."""
        now = time.monotonic()
        with self._cond:
            requests = list(self._requests)
        for request in requests:
            if request.cancelled:
                self._finish(request, answered=False)
            elif now > request.deadline:
                self._fail(request, DeadlineExceeded("deadline passed"))
        return [r for r in requests if not r.finished]

    def _round(self) -> None:
        requests = self._live()
        scoring = [r for r in requests if r.next_pass is not None]
        # Same query, same prefix: run those passes back to back (first come, first grouped).
        group_of: dict[tuple[int, ...] | None, int] = {}
        for request in scoring:
            group_of.setdefault(request.next_pass.prefix_ids, len(group_of))
        direction = -1 if self._reverse_groups else 1
        self._reverse_groups = not self._reverse_groups
        scoring.sort(key=lambda r: (direction * group_of[r.next_pass.prefix_ids], r.seq))
        done: dict[tuple, np.ndarray] = {}  # backend call -> its logits, for identical passes
        for request in scoring:
            if self._dropped(request):
                continue
            forward_pass = request.next_pass
            call = _call_of(forward_pass)
            logits = done.get(call)
            if logits is None:
                try:
                    logits = done[call] = self._run(forward_pass)
                except Exception as e:  # the backend's own clear errors (e.g. a prompt over the context)
                    self._fail_call(scoring, call, e)
                    continue
            elif self.metrics is not None:
                self.metrics.shared_passes.inc()
            request.logits.append(logits)
            if request.next_pass is None:
                self._scored(request)
        for request in requests:
            if request.pieces is not None and not self._dropped(request):
                self._explain_steps(request)

    def _run(self, forward_pass: ForwardPass) -> np.ndarray:
        start = time.perf_counter()
        logits = self.scorer.run_pass(forward_pass)
        seconds = time.perf_counter() - start
        self._pass_seconds = seconds if self._pass_seconds == 0 else 0.8 * self._pass_seconds + 0.2 * seconds
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(forward_pass.rows))
            self.metrics.documents.inc(len(forward_pass.rows))
        return logits

    def _scored(self, request: Job) -> None:
        scores = request.plan.scores(request.logits)
        if request.explain is None:
            self._deliver(request, ("scores", scores))
            self._finish(request, answered=True)
            return
        query, document, max_new_tokens = request.explain
        score: Score = scores[0]
        try:
            request.pieces = self.scorer.explain(
                query, document, max_new_tokens, grade=score.grade, should_stop=lambda: request.cancelled
            )
        except Exception as e:
            self._fail(request, e)
            return
        request.deadline = math.inf  # the deadline is for the grade; the text streams as it comes
        self._deliver(request, ("grade", score))

    def _explain_steps(self, request: Job) -> None:
        try:
            for _ in range(EXPLAIN_STEPS_PER_ROUND):
                if request.cancelled:  # the client left mid-stream: generate nothing more
                    self._finish(request, answered=False)
                    return
                piece = next(request.pieces, None)
                if piece is None:
                    self._deliver(request, ("done", None))
                    self._finish(request, answered=not request.cancelled)
                    return
                self._deliver(request, ("text", piece))
        except Exception as e:
            self._fail(request, e)

    def _dropped(self, request: Job) -> bool:
        """Checked before each unit: the handler may have given up since the round began."""
        if request.finished:
            return True
        if request.cancelled:
            self._finish(request, answered=False)
            return True
        if time.monotonic() > request.deadline:
            self._fail(request, DeadlineExceeded("deadline passed"))
            return True
        return False

    def _fail_call(self, requests: list[Job], call: tuple, error: Exception) -> None:
        for request in requests:
            if not request.finished and request.next_pass is not None and _call_of(request.next_pass) == call:
                self._fail(request, error)

    def _fail(self, request: Job, error: Exception) -> None:
        self._deliver(request, ("error", error))
        self._finish(request, answered=True)

    def _deliver(self, request: Job, event: tuple[str, Any]) -> None:
        try:
            request.loop.call_soon_threadsafe(request.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is left to read it
            request.cancelled = True

    def _finish(self, request: Job, answered: bool) -> None:
        """answered: its last event was delivered (scores, the end of its text, or an error)."""
        if request.finished:
            return
        request.finished = True
        request.pieces = None
        with self._cond:
            self._requests.remove(request)
            self.answered += answered
            self._observe_queue()


def _call_of(forward_pass: ForwardPass) -> tuple:
    """What the backend computes for a pass: the same prefix and continuations give the same logits
    (`rows` only say where they go in the request, so two requests can share a call)."""
    return (forward_pass.prefix_ids, forward_pass.continuations)
