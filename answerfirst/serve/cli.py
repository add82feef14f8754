"""`answerfirst serve --model PATH`: run the rerank service until SIGTERM / Ctrl-C, then drain and exit 0."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import Any

from answerfirst.runtime.api import DEFAULT_MODEL_ENV, DEFAULT_MODEL_PATH, PRECISIONS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None, help=f"checkpoint, ONNX/GGUF export dir or .gguf file (default: ${DEFAULT_MODEL_ENV}, else {DEFAULT_MODEL_PATH})")
    model.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx", "gguf"])
    model.add_argument("--variant", default=None, help="file of an ONNX/GGUF export (default: the fastest whose parity passed)")
    model.add_argument("--device", default="cpu")
    model.add_argument("--precision", default=None, choices=PRECISIONS,
                       help="what a checkpoint computes in (auto: bf16 where the CPU has AMX bf16 / AVX512_BF16 or on a GPU)")
    model.add_argument("--threads", type=int, default=None, help="threads of the backend (default: all cores)")
    model.add_argument("--model-name", default=None, help="the name replies carry in `model` (default: the model directory's name)")
    http = parser.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 = every interface)")
    http.add_argument("--port", type=int, default=8080, help="port (0 = any free one; the one chosen is printed)")
    http.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: $ANSWERFIRST_API_KEY if set)")
    http.add_argument("--access-log", action="store_true", help="log one line per request")
    batching = parser.add_argument_group("batching and limits")
    batching.add_argument("--max-batch", type=int, default=16, help="documents per forward pass (default 16)")
    batching.add_argument("--batch-window-ms", type=float, default=2.0, help="how long an idle server collects requests before a round (default 2)")
    batching.add_argument("--concurrent-passes", type=int, default=None,
                          help="passes of different queries run side by side, each on a share of the threads "
                               "(default: 2 on the onnx backend with 2+ threads, else 1; above 1 a second copy of the weights)")
    batching.add_argument("--max-queue", type=int, default=256, help="requests admitted at once; more get 503 + Retry-After (default 256)")
    batching.add_argument("--max-documents", type=int, default=1000, help="documents per request (default 1000)")
    batching.add_argument("--max-request-bytes", type=int, default=4 * 2**20, help="request body size (default 4 MiB)")
    batching.add_argument("--timeout", type=float, default=30.0, help="seconds from arrival to scores; past it, 504 (default 30)")
    batching.add_argument("--max-new-tokens", type=int, default=512, help="largest explanation /v1/explain generates (default 512)")
    batching.add_argument("--drain-timeout", type=float, default=60.0, help="seconds SIGTERM waits for accepted requests (default 60)")



def run(args: argparse.Namespace) -> int:
    from answerfirst.serve.app import API_KEY_ENV, ServeConfig, Service, create_app

    model = args.model or os.environ.get(DEFAULT_MODEL_ENV) or DEFAULT_MODEL_PATH
    if args.model is None and not Path(model).exists():
        raise FileNotFoundError(f"no --model given and {model} does not exist: run `make distill`, set ${DEFAULT_MODEL_ENV}, or pass --model PATH")
    config = ServeConfig(
        model=model, host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        backend=args.backend, variant=args.variant, precision=args.precision, device=args.device, threads=args.threads,
        model_name=args.model_name,
        max_batch=args.max_batch, batch_window_ms=args.batch_window_ms, concurrent_passes=args.concurrent_passes, max_queue=args.max_queue,
        max_documents=args.max_documents, max_request_bytes=args.max_request_bytes, timeout_s=args.timeout,
        max_new_tokens=args.max_new_tokens, drain_timeout_s=args.drain_timeout, access_log=args.access_log,
    )
    service = Service(config, lambda: _load(config))
    server = _serve(service, create_app(service))
    if service.load_error is not None:
        error = service.load_error
        raise error if isinstance(error, (ValueError, FileNotFoundError, ImportError, RuntimeError)) else RuntimeError(str(error))
    batcher = service.batcher
    counts = f"{batcher.admitted} requests accepted, {batcher.answered} answered" if batcher else "no model loaded"
    print(f"answerfirst serve: stopped ({counts})", flush=True)
    return 0 if server.started else 1


def _load(config: Any):
    from answerfirst.runtime.api import ScorerConfig, load

    return load(
        config.model, backend=config.backend, device=config.device, threads=config.threads, variant=config.variant,
        precision=config.precision, config=ScorerConfig(batch_size=config.max_batch),
    )


def _serve(service: Any, app: Any) -> Any:
    import uvicorn

    config = service.config

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not service.draining:
                print("answerfirst serve: draining (answering accepted requests, refusing new ones)", flush=True)
            service.begin_drain()
            super().handle_exit(sig, frame)

    uv_config = uvicorn.Config(
        app, host=config.host, port=config.port, access_log=config.access_log, lifespan="on",
        timeout_graceful_shutdown=int(config.drain_timeout_s) or 1, log_level="warning",
    )
    server = DrainingServer(uv_config)
    sock = uv_config.bind_socket()
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"answerfirst serve: http://{shown}:{port}  model {config.model} (loading; GET /health says when ready)", flush=True)

    def loaded(service: Any) -> None:
        scorer = service.scorer
        variant = f" {service.variant}" if service.variant else ""
        lanes = f", {service.concurrent_passes} concurrent passes" if service.concurrent_passes > 1 else ""
        print(f"answerfirst serve: ready: {config.served_name} ({scorer.backend.name}{variant}{lanes}), loaded in {service.load_seconds:.1f} s", flush=True)

    service.on_loaded = loaded
    service.on_load_failed = lambda error: setattr(server, "should_exit", True)
    # uvicorn restores the handlers it found and re-raises the signal it drained on; with these,
    # the re-raised SIGTERM/SIGINT is a no-op and the process exits 0 after the drain.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return server
