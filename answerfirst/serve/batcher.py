"""Batching across requests: one worker thread schedules the forward passes of every request in flight.

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
  requests that arrive together share that round;
- the cores, in concurrent passes: when a round holds passes of two or more queries and the
  backend has a concurrent copy (`Scorer.concurrent`), the query groups run side by side on
  n lane threads, each pass on 1/n of the cores, instead of one after another on all of
  them. A pass of a few dozen milliseconds keeps two cores busy less well than two passes keep one
  each; a round of one query runs on the full scorer as before. Both give the same logits.

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
from concurrent.futures import ThreadPoolExecutor, wait
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
    """Schedules the passes of concurrent requests from one worker thread, which runs them itself or
    hands a round's query groups to the lane threads (see the module docstring).

    scorer: the one Scorer of the server; window_s: the collection window; max_queue: requests
    admitted at once (waiting or running); metrics: a ServeMetrics or None; lanes: a Scorer from
    `scorer.concurrent(n)` and that n, to run the query groups of a round side by side; None: one
    pass at a time."""

    def __init__(
        self, scorer: Scorer, window_s: float, max_queue: int, metrics: Any = None, lanes: tuple[Scorer, int] | None = None
    ):
        self.scorer = scorer
        self.window_s = window_s
        self.max_queue = max_queue
        self.metrics = metrics
        self._lanes: tuple[Scorer, int, ThreadPoolExecutor] | None = None
        if lanes is not None:
            lane_scorer, count = lanes
            self._lanes = (lane_scorer, count, ThreadPoolExecutor(count, thread_name_prefix="answerfirst-lane"))
        self.admitted = 0  # requests ever accepted (the drain report and tests read these)
        self.answered = 0  # ... whose result or error the worker delivered (not dropped: cancelled)
        self._jobs: list[Job] = []
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
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(len(self._jobs), self._retry_after())
            job = Job(next(self._seq), plan, time.monotonic() + timeout_s, loop, asyncio.Queue(), explain)
            self._jobs.append(job)
            self.admitted += 1
            self._observe_queue()
            self._cond.notify()
        return job

    def in_flight(self) -> int:
        with self._cond:
            return len(self._jobs)

    def close(self, timeout_s: float = 30.0) -> None:
        """Refuse new requests, let the worker finish the admitted ones, stop it."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._worker.join(timeout_s)
        if self._worker.is_alive():
            logger.warning("the batcher worker did not stop within %.0f s", timeout_s)
        if self._lanes is not None:
            self._lanes[2].shutdown(wait=False)

    def _retry_after(self) -> int:
        """Seconds until the queue has drained, from the passes waiting and the mean pass time."""
        waiting = sum(len(j.plan.passes) - len(j.logits) + (j.explain is not None) for j in self._jobs)
        return int(min(60, max(1, math.ceil(waiting * self._pass_seconds))))

    def _observe_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._jobs))

    # -- the worker --------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                idle = not self._jobs
                while not self._jobs and not self._closing:
                    self._cond.wait()
                if not self._jobs:
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
            jobs = list(self._jobs)
        for job in jobs:
            if job.cancelled:
                self._finish(job, answered=False)
            elif now > job.deadline:
                self._fail(job, DeadlineExceeded("deadline passed"))
        return [j for j in jobs if not j.finished]

    def _round(self) -> None:
        jobs = self._live()
        # Same query, same prefix: run those passes back to back (first come, first grouped).
        groups: dict[tuple[int, ...] | None, list[Job]] = {}
        for job in jobs:
            if job.next_pass is not None:
                groups.setdefault(job.next_pass.prefix_ids, []).append(job)
        ordered = list(groups.values())[:: -1 if self._reverse_groups else 1]
        self._reverse_groups = not self._reverse_groups
        if self._lanes is not None and len(ordered) > 1:
            scorer, count, pool = self._lanes
            lanes = [pool.submit(self._run_group, group, scorer, count) for group in ordered]  # taken in order
            wait(lanes)  # every group is done before the next round, even when one of them failed
            for lane in lanes:
                lane.result()
            if self.metrics is not None:
                self.metrics.concurrent_rounds.inc()
        else:
            for group in ordered:
                self._run_group(group, self.scorer, 1)
        for job in jobs:
            if job.pieces is not None and not self._dropped(job):
                self._explain_steps(job)

    def _run_group(self, group: list[Job], scorer: Scorer, side_by_side: int) -> None:
        """The next pass of each request of one query, in arrival order; an identical pass runs once.
        side_by_side: how many passes run at once (for the pass time Retry-After is computed from)."""
        done: dict[tuple, np.ndarray] = {}  # backend call -> its logits (the same call has the same prefix)
        for job in group:
            if self._dropped(job):
                continue
            forward_pass = job.next_pass
            call = _call_of(forward_pass)
            logits = done.get(call)
            if logits is None:
                try:
                    logits = done[call] = self._run(forward_pass, scorer, side_by_side)
                except Exception as e:  # the backend's own clear errors (e.g. a prompt over the context)
                    self._fail_call(group, call, e)
                    continue
            elif self.metrics is not None:
                self.metrics.shared_passes.inc()
            job.logits.append(logits)
            if job.next_pass is None:
                self._scored(job)

    def _run(self, forward_pass: ForwardPass, scorer: Scorer, side_by_side: int) -> np.ndarray:
        start = time.perf_counter()
        logits = scorer.run_pass(forward_pass)
        seconds = (time.perf_counter() - start) / side_by_side
        with self._cond:  # lanes finish passes concurrently
            self._pass_seconds = seconds if self._pass_seconds == 0 else 0.8 * self._pass_seconds + 0.2 * seconds
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(forward_pass.rows))
            self.metrics.documents.inc(len(forward_pass.rows))
        return logits

    def _scored(self, job: Job) -> None:
        scores = job.plan.scores(job.logits)
        if job.explain is None:
            self._deliver(job, ("scores", scores))
            self._finish(job, answered=True)
            return
        query, document, max_new_tokens = job.explain
        score: Score = scores[0]
        try:
            job.pieces = self.scorer.explain(
                query, document, max_new_tokens, grade=score.grade, should_stop=lambda: job.cancelled
            )
        except Exception as e:
            self._fail(job, e)
            return
        job.deadline = math.inf  # the deadline is for the grade; the text streams as it comes
        self._deliver(job, ("grade", score))

    def _explain_steps(self, job: Job) -> None:
        try:
            for _ in range(EXPLAIN_STEPS_PER_ROUND):
                if job.cancelled:  # the client left mid-stream: generate nothing more
                    self._finish(job, answered=False)
                    return
                piece = next(job.pieces, None)
                if piece is None:
                    self._deliver(job, ("done", None))
                    self._finish(job, answered=not job.cancelled)
                    return
                self._deliver(job, ("text", piece))
        except Exception as e:
            self._fail(job, e)

    def _dropped(self, job: Job) -> bool:
        """Checked before each unit: the handler may have given up since the round began."""
        if job.finished:
            return True
        if job.cancelled:
            self._finish(job, answered=False)
            return True
        if time.monotonic() > job.deadline:
            self._fail(job, DeadlineExceeded("deadline passed"))
            return True
        return False

    def _fail_call(self, jobs: list[Job], call: tuple, error: Exception) -> None:
        for job in jobs:
            if not job.finished and job.next_pass is not None and _call_of(job.next_pass) == call:
                self._fail(job, error)

    def _fail(self, job: Job, error: Exception) -> None:
        self._deliver(job, ("error", error))
        self._finish(job, answered=True)

    def _deliver(self, job: Job, event: tuple[str, Any]) -> None:
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is left to read it
            job.cancelled = True

    def _finish(self, job: Job, answered: bool) -> None:
        """answered: its last event was delivered (scores, the end of its text, or an error)."""
        if job.finished:
            return
        job.finished = True
        job.pieces = None
        with self._cond:
            self._jobs.remove(job)
            self.answered += answered
            self._observe_queue()


def _call_of(forward_pass: ForwardPass) -> tuple:
    """What the backend computes for a pass: the same prefix and continuations give the same logits
    (`rows` only say where they go in the request, so two requests can share a call)."""
    return (forward_pass.prefix_ids, forward_pass.continuations)
