"""OpenVINO backend: our scoring graph (the one `answerfirst export onnx` traces) on OpenVINO's CPU plugin.

It runs the same graph as the ONNX backend, with the same inputs and outputs (runtime/_onnx.py), so
the scoring and decoding logic is OnnxBackend's; what differs is the engine under it:

    an OpenVINO export (`answerfirst export openvino`): the graph as OpenVINO IR (.xml + .bin) with
        int8 weights (nncf weight compression) — the default path, chosen by its manifest;
    an ONNX export opened with load(..., backend="openvino"): its fp32 graph read by OpenVINO
        (the int8 ONNX graph uses onnxruntime's own operators, which OpenVINO does not read).

Kernels are picked from this CPU's flags (runtime/_cpu.py): with AMX bf16 tiles the plugin computes
in bf16 (measured on a 2-core Sapphire Rapids-class Xeon: OpenVINO bf16 + int8 weights 678 ms/doc
on W, onnxruntime int8 986 ms/doc, interleaved); elsewhere in f32 with int8 weights and dynamic
int8 activation quantization (an AVX2-only CPU must never get bf16: 7x slower than fp32 there).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from answerfirst.artifact import Manifest, ManifestError, bind_format, check_file_sizes
from answerfirst.extras import missing_extra
from answerfirst.runtime._common import ScorerConfig
from answerfirst.runtime._cpu import CpuFeatures, features
from answerfirst.runtime._memory import pin_mmap_threshold, release_mapped_pages
from answerfirst.runtime._onnx import OnnxBackend, check_graph_matches_manifest
from answerfirst.runtime._tokenizer import ArtifactTokenizer

logger = logging.getLogger(__name__)

# Dynamic quantization of activations in groups of this many values, for int8-weight matmuls.
DYNAMIC_QUANTIZATION_GROUP = 32


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as e:
        raise missing_extra("the openvino backend", "openvino", e) from None
    return openvino


def inference_precision(cpu: CpuFeatures) -> str:
    """bf16 where the CPU has AMX bf16 tiles, f32 elsewhere (runtime/_cpu.py says why)."""
    return "bf16" if cpu.amx_bf16 else "f32"


def compile_config(threads: int | None, cpu: CpuFeatures) -> dict[str, str]:
    """The CPU plugin's settings: one stream (a scoring call is one request), latency mode, the
    precision for this CPU, dynamic int8 activations for int8-weight matmuls."""
    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        "INFERENCE_PRECISION_HINT": inference_precision(cpu),
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": str(DYNAMIC_QUANTIZATION_GROUP),
    }
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return config


@dataclass(frozen=True)
class _Port:
    name: str
    shape: list[Any]


@dataclass(frozen=True)
class _Meta:
    custom_metadata_map: dict[str, str]


@dataclass(frozen=True)
class _Options:
    intra_op_num_threads: int


class CompiledGraph:
    """An OpenVINO compiled model seen through the onnxruntime-session calls OnnxBackend makes
    (run, get_inputs, get_outputs, get_modelmeta, get_session_options): one backend, two engines.
    Not thread-safe by itself, like the onnxruntime session: the Scorer's callers share it the same way.

    mapped: the files the plugin maps its weights from. Its first inference repacks the weights into
    buffers of its own; after it the files' pages are handed back (runtime/_memory.py: 0.43 GB at 0.6B)."""

    def __init__(self, model: Any, compiled: Any, threads: int | None, profile: bool = False, mapped: Sequence[Path] = ()):
        self.compiled = compiled
        self.mapped = list(mapped)
        self.request = compiled.create_infer_request()
        precision = compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type: "bf16" / "f32"
        self.precision = precision.get_type_name() if hasattr(precision, "get_type_name") else str(precision)
        self._outputs = {o.get_any_name(): o for o in compiled.outputs}
        self._threads = int(threads or compiled.get_property("INFERENCE_NUM_THREADS"))
        framework = model.get_rt_info()["framework"] if "framework" in model.get_rt_info() else {}
        self._metadata = {str(k): str(v.astype(str)) for k, v in dict(framework).items()}
        self._inputs = [_Port(p.get_any_name(), self._dims(p)) for p in model.inputs]
        self._ports = [_Port(p.get_any_name(), self._dims(p)) for p in model.outputs]
        # profile (compiled with PERF_COUNT): each run's executed nodes as ("type [kernel]", seconds)
        self.kernel_times: list[tuple[str, float]] | None = [] if profile else None
        self.runs = 0

    @staticmethod
    def _dims(port: Any) -> list[Any]:
        return [d.get_length() if d.is_static else None for d in port.get_partial_shape()]

    def run(self, names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.request.infer(feeds)
        self.runs += 1
        if self.runs == 1 and self.mapped:
            released = release_mapped_pages(self.mapped)
            logger.debug("openvino: weights repacked; %d bytes of mapped weight files released", released)
        if self.kernel_times is not None:
            self.kernel_times.extend((f"{node.node_type} [{node.exec_type}]", node.real_time.total_seconds())
                                     for node in self.request.profiling_info if node.status.name == "EXECUTED")
        # copies: the request reuses its output buffers on the next call, and a prefix KV is kept
        return [np.array(results[self._outputs[name]], copy=True) for name in names]

    def get_inputs(self) -> list[_Port]:
        return self._inputs

    def get_outputs(self) -> list[_Port]:
        return self._ports

    def get_modelmeta(self) -> _Meta:
        return _Meta(self._metadata)

    def get_session_options(self) -> _Options:
        return _Options(self._threads)


class OpenVinoBackend(OnnxBackend):
    """OnnxBackend's scoring and decoding over a CompiledGraph (see the module docstring). On bf16
    compute its passes span an even number of tokens (_common.py: right_padded): W 14% faster."""

    name = "openvino"

    def __init__(self, session: CompiledGraph, pad_id: int, where: str = "graph"):
        super().__init__(session, pad_id, where)
        self.even_spans = session.precision == "bf16"


def open_graph(path: Path, threads: int | None, cpu: CpuFeatures | None = None, profile: bool = False) -> CompiledGraph:
    """Read an IR (.xml) or ONNX graph and compile it for this CPU; an unreadable file is a ManifestError.
    profile: the plugin times every node of every run (CompiledGraph.kernel_times; answerfirst profile).
    Pins glibc's mmap threshold first (runtime/_memory.py): the plugin's per-shape buffers are then
    returned to the system when freed instead of piling up in the heap."""
    ov = import_openvino()
    pin_mmap_threshold()
    core = ov.Core()
    config = compile_config(threads, cpu or features())
    if profile:
        config["PERF_COUNT"] = "YES"
    try:
        model = core.read_model(str(path))
        compiled = core.compile_model(model, "CPU", config)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise ManifestError(
            f"{path} could not be loaded by OpenVINO ({first}); the file is corrupted, truncated or not an "
            "answerfirst graph: re-run `answerfirst export openvino`"
        ) from None
    return CompiledGraph(model, compiled, threads, profile, mapped=[path.parent / name for name in graph_files(path)])


@dataclass(frozen=True)
class Layer:
    """One node of a compiled model as the CPU plugin runs it: its layer type ("FullyConnected",
    "RoPE", "Const", ...), output precision and static output shape (None where dynamic)."""

    name: str
    kind: str
    precision: str
    shape: tuple[int, ...] | None


def compiled_layers(compiled: Any) -> list[Layer]:
    """The nodes of a compiled model (core.compile_model(...)) after the plugin's transformations."""
    layers = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info, dims = op.get_rt_info(), op.get_output_partial_shape(0)
        shape = tuple(d.get_length() for d in dims) if dims.is_static else None
        layers.append(Layer(op.get_friendly_name(), str(info["layerType"].astype(str)), str(info["outputPrecisions"].astype(str)), shape))
    return layers


def graph_files(path: Path) -> list[str]:
    """The files a graph reads: an IR's .xml and .bin, an ONNX graph and its .data."""
    if path.suffix == ".xml":
        return [path.name, path.with_suffix(".bin").name]
    return [path.name, path.name + ".data"]


def open_openvino(
    location: Path, manifest: Manifest | None, threads: int | None, variant: str | None, config: ScorerConfig
) -> tuple[OpenVinoBackend, Any]:
    import_openvino()
    location = Path(location)
    if manifest is None or manifest.kind not in ("openvino", "onnx"):
        raise ManifestError(
            f"{location} is not an OpenVINO or ONNX export (no such answerfirst.json); run `answerfirst export openvino`"
        )
    if manifest.kind == "onnx":
        # onnxruntime's int8 graph uses its own operators: OpenVINO runs the fp32 graph
        if variant not in (None, "fp32"):
            raise ManifestError(f"backend='openvino' runs an ONNX export's fp32 graph; variant={variant!r} is onnxruntime's")
        chosen = manifest.variant("fp32")
    else:
        chosen = manifest.variant(variant)
    if variant is None:
        logger.info("openvino: using variant %r (%s)", chosen.name, chosen.file)
    path = location / chosen.file
    check_file_sizes(location, manifest, graph_files(path), f"re-run `answerfirst export {manifest.kind}`")
    try:
        tokenizer = ArtifactTokenizer.from_dir(location)
    except ValueError as e:
        raise ManifestError(f"{location}: the export's tokenizer files are missing or unreadable ({e}); re-export") from None
    prompts = bind_format(tokenizer, manifest, str(location), config.max_doc_tokens)
    backend = OpenVinoBackend(open_graph(path, threads), pad_id=prompts.pad_id, where=str(path))
    check_graph_matches_manifest(backend, manifest, str(path))
    return backend, prompts


__all__ = [
    "CompiledGraph", "Layer", "OpenVinoBackend", "compile_config", "compiled_layers", "graph_files", "import_openvino",
    "inference_precision",
    "open_graph", "open_openvino",
]
