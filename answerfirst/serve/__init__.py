"""`answerfirst serve`: a rerank HTTP service (FastAPI + uvicorn) over one Scorer.

Cohere/Jina and TEI request shapes, streamed explanations, health, models and Prometheus metrics;
requests in flight are batched by answerfirst.serve.batcher without changing any score. Talks to
the runtime only (answerfirst.load, Scorer.plan / run_pass / explain).
"""

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as e:
    raise ImportError(f'answerfirst serve needs {e.name}, which is not installed: pip install "answerfirst[serve]"') from None
