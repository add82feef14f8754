"""The FastAPI application: routes, API key, limits, errors and Prometheus metrics around one Batcher.

    POST /v1/rerank, /v2/rerank, /rerank   Cohere/Jina shape (TEI shape on /rerank when the body has `texts`)
    POST /v1/explain                       server-sent events: the grade, then the explanation text
    GET  /health                           200 once the model is loaded; 503 while loading or draining
    GET  /v1/models                        the served model, its backend, grades and limits
    GET  /metrics                          Prometheus text format

Every error is JSON `{"error": "...", "error_type": "..."}` naming the field and the fix. The model
loads in a background thread after the port opens, so /health can say "loading" meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from answerfirst.extras import requires

with requires("serve", "answerfirst serve"):
    import prometheus_client  # noqa: F401  (used by ServeMetrics)
    import uvicorn  # noqa: F401  (used by answerfirst.serve.cli)
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

from answerfirst.afrl import FormatError
from answerfirst.runtime.api import Scorer
from answerfirst.serve import protocol
from answerfirst.serve.batcher import Batcher, DeadlineExceeded, QueueFull, ShuttingDown
from answerfirst.serve.protocol import RequestError

logger = logging.getLogger(__name__)

API_KEY_ENV = "ANSWERFIRST_API_KEY"
RERANK_PATHS = ("/v1/rerank", "/v2/rerank", "/rerank")


@dataclass(frozen=True)
class ServeConfig:
    """Settings of `answerfirst serve`.

    max_batch: documents per forward pass (the Scorer's batch_size; applied when the server loads
    the model). batch_window_ms: how long the idle worker waits for more requests before a round.
    concurrent_passes: passes of different queries run side by side, each on an equal share of the
    threads (serve/batcher.py); None (default): 2 where the backend can (ONNX) and has 2+ threads,
    else 1. Above 1 the backend holds a second copy of the weights.
    max_queue: requests admitted at once (waiting or running); one more gets 503 + Retry-After.
    max_documents / max_request_bytes: per request; over them is 413. timeout_s: a request's
    deadline from arrival to its scores (or its explanation's grade); past it, 504.
    drain_timeout_s: how long SIGTERM waits for accepted requests before cutting them.
    """

    model: str
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = field(default=None, repr=False)
    backend: str = "auto"
    variant: str | None = None
    precision: str | None = None  # of a torch checkpoint: load(precision=...)
    device: str = "cpu"
    threads: int | None = None
    model_name: str | None = None
    max_batch: int = 16
    batch_window_ms: float = 2.0
    concurrent_passes: int | None = None
    max_queue: int = 256
    max_documents: int = 1000
    max_request_bytes: int = 4 * 2**20
    timeout_s: float = 30.0
    max_new_tokens: int = 512
    drain_timeout_s: float = 60.0
    access_log: bool = False

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_documents", "max_request_bytes", "max_new_tokens", "concurrent_passes"):
            value = getattr(self, name)
            if value is None and name == "concurrent_passes":
                continue  # the default, picked when the model is loaded
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        for name in ("timeout_s", "drain_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be a positive number of seconds, got {getattr(self, name)!r}")
        if not 0 <= self.batch_window_ms <= 1000:
            raise ValueError(f"batch_window_ms: must be within 0..1000 ms, got {self.batch_window_ms!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: must be within 0..65535 (0 = any free port), got {self.port!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key: is empty; pass a key, or none to serve without one")

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.model).name or self.model


class ServeMetrics:
    """The Prometheus series of one server, in its own registry (several apps can live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "answerfirst_http_requests", "HTTP requests by route and status code", ["route", "status"], registry=registry
        )
        self.latency = Histogram(
            "answerfirst_http_request_duration_seconds", "time from request to the last byte of the response",
            ["route"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=registry,
        )
        self.documents = Counter("answerfirst_documents_scored", "documents run through a forward pass", registry=registry)
        self.queue_depth = Gauge("answerfirst_queue_depth", "requests admitted and not yet answered", registry=registry)
        self.batch_size = Histogram(
            "answerfirst_batch_size", "documents per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry
        )
        self.concurrent_rounds = Counter(
            "answerfirst_concurrent_rounds", "rounds whose passes ran side by side (--concurrent-passes)", registry=registry
        )
        self.shared_passes = Counter(
            "answerfirst_shared_passes", "passes answered from an identical pass of another request", registry=registry
        )
        self.ready = Gauge("answerfirst_ready", "1 while the model is loaded and the server takes requests", registry=registry)


class Service:
    """What the routes share: the config, the Scorer (once loaded), the Batcher, the metrics.

    load_scorer: called once in a background thread; on_loaded / on_load_failed are told the outcome.
    owns_scorer: close the Scorer when the server stops (False: the caller lent it and keeps it)."""

    def __init__(self, config: ServeConfig, load_scorer: Callable[[], Scorer], owns_scorer: bool = True):
        self.config = config
        self.owns_scorer = owns_scorer
        self.metrics = ServeMetrics()
        self.scorer: Scorer | None = None
        self.batcher: Batcher | None = None
        self.lane_scorer: Scorer | None = None  # runs the concurrent passes (Scorer.concurrent), if any
        self.concurrent_passes = 1
        self.load_error: BaseException | None = None
        self.load_seconds: float | None = None
        self.draining = False
        self.on_loaded: Callable[[Service], None] | None = None
        self.on_load_failed: Callable[[BaseException], None] | None = None
        self._load_scorer = load_scorer
        self._loader: threading.Thread | None = None

    def start_loading(self) -> None:
        if self._loader is None:
            self._loader = threading.Thread(target=self._load, name="answerfirst-load", daemon=True)
            self._loader.start()

    def wait_loaded(self, timeout_s: float) -> bool:
        if self._loader is not None:
            self._loader.join(timeout_s)
        return self.batcher is not None

    def _load(self) -> None:
        start = time.perf_counter()
        scorer = None
        try:
            scorer = self._load_scorer()
            lanes = self._lanes(scorer)
        except BaseException as e:  # /health reports it; the CLI prints it and stops the server
            if scorer is not None and self.owns_scorer:
                scorer.close()
            self.load_error = e
            if self.on_load_failed is not None:
                self.on_load_failed(e)
            else:
                logger.error("could not load %s: %s", self.config.model, e)
            return
        self.load_seconds = time.perf_counter() - start
        self.scorer = scorer
        self.lane_scorer, self.concurrent_passes = lanes if lanes is not None else (None, 1)
        self.batcher = Batcher(scorer, self.config.batch_window_ms / 1000, self.config.max_queue, self.metrics, lanes)
        self.metrics.ready.set(0 if self.draining else 1)
        if self.on_loaded is not None:
            self.on_loaded(self)

    def _lanes(self, scorer: Scorer) -> tuple[Scorer, int] | None:
        """The Scorer and count of concurrent passes (ServeConfig.concurrent_passes), or None for one at a time."""
        asked = self.config.concurrent_passes
        count = asked if asked is not None else min(2, scorer.threads)
        if count < 2:
            return None
        lane_scorer = scorer.concurrent(count)
        if lane_scorer is None:
            if asked is not None:
                raise ValueError(
                    f"concurrent_passes={asked}: the {scorer.backend.name} backend runs one pass at a time; "
                    "leave it unset or use 1 (concurrent passes need the onnx backend)"
                )
            return None
        return lane_scorer, count

    def begin_drain(self) -> None:
        """SIGTERM: /health turns 503 and new requests are refused; accepted ones are still answered."""
        self.draining = True
        self.metrics.ready.set(0)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close(self.config.drain_timeout_s)
        if self.lane_scorer is not None:  # made here, from the scorer: always this server's
            self.lane_scorer.close()
        if self.scorer is not None and self.owns_scorer:
            self.scorer.close()

    @property
    def variant(self) -> str | None:
        """The export file served: the one named, else the one load() picked (the fastest whose parity passed)."""
        manifest = self.scorer.manifest if self.scorer is not None else None
        if manifest is None or not manifest.variants:
            return self.config.variant
        return manifest.variant(self.config.variant).name

    def describe(self) -> dict[str, Any]:
        scorer = self.scorer
        info: dict[str, Any] = {"id": self.config.served_name, "object": "model", "owned_by": "answerfirst"}
        if scorer is not None:
            fmt = scorer.prompts.format
            info.update(
                backend=scorer.backend.name,
                source=self.config.model,
                variant=self.variant,
                grades=list(fmt.grades),
                values=list(fmt.values),
                max_doc_tokens=fmt.max_doc_tokens,
                max_batch=scorer.config.batch_size,
                concurrent_passes=self.concurrent_passes,
                max_documents=self.config.max_documents,
            )
        return info


# ------------------------------------------------------------------------------------------------
# the application
# ------------------------------------------------------------------------------------------------


def create_app(service: Service) -> FastAPI:
    config = service.config

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start_loading()
        yield
        await run_in_threadpool(service.close)

    app = FastAPI(title="answerfirst rerank", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_MetricsMiddleware, metrics=service.metrics)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, error: RequestError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = (
                f"no route {request.url.path}; the API is POST {', '.join(RERANK_PATHS)}, /v1/explain and "
                "GET /health, /v1/models, /metrics"
            )
        elif error.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(error.detail)
        return JSONResponse({"error": message, "error_type": "http"}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": f"internal error: {type(error).__name__}: {error}", "error_type": "internal"}, status_code=500)

    # -- operational ---------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        if service.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if service.load_error is not None:
            return JSONResponse({"status": "failed", "error": str(service.load_error)}, status_code=503)
        if service.batcher is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok", "model": config.served_name, "in_flight": service.batcher.in_flight()})

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        _authorize(request, config.api_key)
        return JSONResponse({"object": "list", "data": [service.describe()]})

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- rerank --------------------------------------------------------------------------------

    async def rerank(request: Request) -> JSONResponse:
        arrived = time.monotonic()
        scorer, batcher = _admitting(request, service)
        call = protocol.parse_rerank(await _read_json(request, config.max_request_bytes), config.max_documents)
        plan = await _plan(scorer, call.query, call.documents, call.max_doc_tokens)
        protocol.check_untruncated(call, plan, scorer.prompts.format.max_doc_tokens)
        if plan.passes:
            remaining = config.timeout_s - (time.monotonic() - arrived)
            job = _submit(batcher, plan, remaining)
            kind, value = await _wait(request, job, remaining, config.timeout_s)
            if kind == "error":
                raise _error_of(value, config.timeout_s)
        else:
            value = []  # no documents: nothing to run
        if call.shape == "tei":
            return JSONResponse(protocol.tei_response(call, value, plan))
        return JSONResponse(protocol.cohere_response(call, value, plan, scorer.grades, config.served_name))

    for path in RERANK_PATHS:
        app.add_api_route(path, rerank, methods=["POST"], name=f"rerank {path}")

    # -- explain -------------------------------------------------------------------------------

    @app.post("/v1/explain")
    async def explain(request: Request) -> StreamingResponse:
        arrived = time.monotonic()
        scorer, batcher = _admitting(request, service)
        call = protocol.parse_explain(await _read_json(request, config.max_request_bytes), config.max_new_tokens)
        plan = await _plan(scorer, call.query, [call.document], None)
        remaining = config.timeout_s - (time.monotonic() - arrived)
        job = _submit(batcher, plan, remaining, explain=(call.query, call.document, call.max_new_tokens))
        kind, value = await _wait(request, job, remaining, config.timeout_s)
        if kind == "error":
            raise _error_of(value, config.timeout_s)
        grade = protocol.grade_event(value, scorer.grades, plan.values)

        async def events() -> AsyncIterator[str]:
            try:
                yield _sse("grade", grade)
                while True:
                    kind, value = await job.next_event()
                    if kind == "text":
                        yield _sse("text", {"text": value})
                    elif kind == "done":
                        yield _sse("done", {})
                        return
                    else:
                        logger.error("explanation failed: %s", value)
                        yield _sse("error", {"error": f"the explanation failed: {value}"})
                        return
            finally:
                job.cancel()  # the client left (or the stream ended): the worker stops generating

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    return app


# ------------------------------------------------------------------------------------------------
# request helpers
# ------------------------------------------------------------------------------------------------


def _authorize(request: Request, api_key: str | None) -> None:
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    token = given[7:].strip() if given[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not hmac.compare_digest(token.encode(), api_key.encode()):
        what = "wrong" if token else "missing"
        raise RequestError(
            401, f"{what} API key: send the server's key as `Authorization: Bearer KEY`", "unauthorized",
            {"WWW-Authenticate": "Bearer"},
        )


def _admitting(request: Request, service: Service) -> tuple[Scorer, Batcher]:
    """The key first, then whether the server takes work at all."""
    _authorize(request, service.config.api_key)
    if service.draining:
        raise RequestError(
            503, "the server is shutting down; retry (another replica will answer)", "unavailable",
            {"Retry-After": "1", "Connection": "close"},
        )
    if service.batcher is None or service.scorer is None:
        raise RequestError(503, "the model is still loading; retry when GET /health is 200", "unavailable", {"Retry-After": "5"})
    return service.scorer, service.batcher


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON, never more than `limit` bytes read."""
    too_big = RequestError(
        413, f"request body: larger than this server takes ({limit} bytes, answerfirst serve --max-request-bytes); "
        "send fewer or shorter documents per request", "payload_too_large",
    )
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    if not body:
        raise RequestError(400, "request body: empty; send a JSON object", "invalid_json")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"request body: not valid JSON ({e}); send a JSON object", "invalid_json") from None


async def _plan(scorer: Scorer, query: str, documents: list[str], max_doc_tokens: int | None):
    """Tokenize off the event loop (a thousand documents take tens of milliseconds)."""
    try:
        return await run_in_threadpool(scorer.plan, query, documents, max_doc_tokens)
    except FormatError as e:
        raise RequestError(422, str(e)) from None


def _submit(batcher: Batcher, plan, remaining: float, explain: tuple[str, str, int] | None = None):
    try:
        return batcher.submit(plan, remaining, explain)
    except QueueFull as e:
        raise RequestError(503, f"server busy: {e}", "overloaded", {"Retry-After": str(e.retry_after)}) from None
    except ShuttingDown:
        raise RequestError(503, "the server is shutting down; retry", "unavailable", {"Retry-After": "1"}) from None


async def _wait(request: Request, job, remaining: float, timeout_s: float) -> tuple[str, Any]:
    """The job's first event, or 504 at the deadline; a client that leaves cancels the job."""
    gone = asyncio.ensure_future(_disconnected(request))
    event = asyncio.ensure_future(job.next_event())
    try:
        done, _ = await asyncio.wait({gone, event}, timeout=max(0.0, remaining), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if event in done:
        return event.result()
    event.cancel()
    job.cancel()  # nobody will read it: the worker drops it before its next pass
    if gone in done:
        raise RequestError(499, "client closed the request", "cancelled")
    raise _error_of(DeadlineExceeded(), timeout_s)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error_of(error: BaseException, timeout_s: float) -> RequestError:
    if isinstance(error, DeadlineExceeded):
        return RequestError(
            504, f"not scored within the server's deadline ({timeout_s:g} s, answerfirst serve --timeout); "
            "retry, or send fewer documents", "timeout",
        )
    if isinstance(error, ValueError):  # the runtime's own clear errors about this input
        return RequestError(422, str(error))
    logger.error("scoring failed: %s: %s", type(error).__name__, error)
    return RequestError(500, f"scoring failed: {type(error).__name__}: {error}", "internal")


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class _MetricsMiddleware:
    """Counts every HTTP request by route template and status, and times it to its last byte."""

    def __init__(self, app: Any, metrics: ServeMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - start)
