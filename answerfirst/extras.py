"""The optional dependencies: which pip extra brings what, and the one message for a missing one.

The base install (numpy + tokenizers) scores nothing by itself; each backend and each tool comes
with an extra (pyproject.toml):

    onnx    onnxruntime                                   score an ONNX export
    openvino openvino                                     score an OpenVINO export (or an ONNX one on OpenVINO)
    gguf    llama-cpp-python, gguf                        score a GGUF export
    torch   torch, transformers, accelerate, bitsandbytes score a checkpoint (8/4-bit too)
    train   [torch] + [onnx] + [openvino], onnx, onnxscript, gguf, nncf   label, train, rl, distill-default, export
    demo    gradio                                        the demo page
    serve   fastapi, uvicorn, prometheus-client           the rerank HTTP service (answerfirst serve)
    bench   [train] + [gguf], matplotlib, psutil, httpx   the latency benchmark, serve-bench
    all     every extra above                             what `make venv` installs
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def install_hint(extra: str) -> str:
    return f'pip install "answerfirst[{extra}]"'


def missing_extra(what: str, extra: str, error: ImportError | None = None) -> ImportError:
    """The ImportError to raise when `what` cannot import its optional dependencies."""
    name = getattr(error, "name", None)
    missing = f" ({name} is not installed)" if name else ""
    return ImportError(f"{what} needs the [{extra}] extra{missing}: {install_hint(extra)}")


def is_missing_dependency(error: ImportError) -> bool:
    """A third-party module is absent (not a bug inside answerfirst itself)."""
    name = getattr(error, "name", None) or ""
    return isinstance(error, ModuleNotFoundError) and bool(name) and name.split(".")[0] != "answerfirst"


@contextmanager
def requires(extra: str, what: str) -> Iterator[None]:
    """Turn a missing third-party module, imported inside the block, into `missing_extra`'s error:

        with requires("train", "answerfirst.distill.train"):
            import torch
    """
    try:
        yield
    except ImportError as e:
        if is_missing_dependency(e):
            raise missing_extra(what, extra, e) from None
        raise
