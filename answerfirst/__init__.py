"""answerfirst: Answer-First, Reason-Later relevance scoring on commodity CPUs.

    import answerfirst
    scorer = answerfirst.load("artifacts/student")          # or an ONNX / GGUF export
    scores = scorer.score("red running shoes", [doc1, doc2])
    answerfirst.score("red running shoes", doc1)             # cached one-liner
"""

from answerfirst.afrl import Score
from answerfirst.runtime import Scorer, ScorerConfig, load, score

__version__ = "0.1.0"
__all__ = ["Score", "Scorer", "ScorerConfig", "load", "score", "__version__"]
