"""`answerfirst serve`: a rerank HTTP service (FastAPI + uvicorn) over one Scorer.

Cohere/Jina and TEI request shapes, streamed explanations, health, models and Prometheus metrics
(app.py); requests in flight are batched without changing any score (batcher.py); the wire formats
(protocol.py). Talks to the runtime only (answerfirst.load, Scorer.plan / run_pass / explain).
Needs the `serve` extra: pip install "answerfirst[serve]".
"""
