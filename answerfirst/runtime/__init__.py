"""answerfirst.runtime: open any artifact, score (query, document) pairs.

    from answerfirst import runtime
    scorer = runtime.load("artifacts/onnx")                 # picks the backend from answerfirst.json
    scorer.score("red running shoes", [doc1, doc2])          # -> [Score, Score]
    runtime.score("red running shoes", doc1)                 # cached one-liner -> Score

The backend adapters (_torch.py, _onnx.py, _llamacpp.py) are private; load() imports only the one
an artifact needs, so scoring an ONNX or GGUF export never imports torch or transformers.
"""

from answerfirst.afrl import Score
from answerfirst.runtime.api import Scorer, ScorerConfig, load, score

__all__ = ["Score", "Scorer", "ScorerConfig", "load", "score"]
