"""`answerfirst export onnx --model DIR --out DIR`: the student's scoring graph in fp32 and int8.

The graph is our own module over the checkpoint's weights (not transformers' forward, whose
vmap-built masks the TorchScript exporter cannot trace), exported with torch.onnx:

    inputs   input_ids (B, T), lengths (B,), kv_rows (N,), vocab_rows (M,),
             past_key.i / past_value.i (1, kv_heads, P, head_dim)   one shared prefix KV
    outputs  grade_logits (B, K)            the K grade rows of the LM head at each row's last real token
             next_token_logits (M, V)       full vocabulary, last real token, only for vocab_rows (decoding)
             present_key.i / present_value.i (N, kv_heads, P+T, head_dim), only for kv_rows

B, T, P, N and M are dynamic. The prefix KV comes in once, with batch 1; each layer expands it to
the B documents beside their own keys and values for its attention only (one MatMul-Softmax-MatMul,
which OpenVINO fuses; _decoder_layer), so no copy of it outlives the layer. kv_rows and vocab_rows
are empty while scoring, so neither the KV nor the vocabulary head costs anything then.

int8 is dynamic quantization of every decoder linear layer (onnxruntime's DynamicQuantizeMatMul:
int8 weights, activations quantized per call); the grade head, the embedding and the vocabulary head
(explanations only; it shares the embedding's tensor) stay fp32. Each variant is scored against the
torch fp32 model on the probe pairs and its parity report is written into answerfirst.json; variants
are listed fastest first (int8, fp32).

Memory: the graph is traced without its weights, which are then written one tensor at a time, and
the int8 graph is made the same way from the fp32 graph's .data file; the torch model is freed
before the onnxruntime sessions open. At Qwen3-0.6B the export peaked at 12.5 GB RSS before (the
exporter's and onnxruntime's quantizer's copies of the model) and now peaks at the size of the
model plus one session (README "Export").
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from answerfirst.artifact import (
    FILES_KEY,
    Manifest,
    Variant,
    checkpoint_hash,
    finalize_files,
    has_manifest,
)
from answerfirst.export.parity import ParityThresholds, log_report, measure, summary
from answerfirst.export.parity import probe_pairs as default_probe_pairs
from answerfirst.extras import missing_extra
from answerfirst.qwen3 import Qwen3Shape
from answerfirst.runtime import Scorer, ScorerConfig
from answerfirst.runtime._onnx import (
    GRAPH_VERSION,
    META_GRADE_IDS,
    META_GRAPH_VERSION,
    META_HEAD_DIM,
    META_KV_HEADS,
    META_LAYERS,
    META_MAX_POSITIONS,
    META_SOURCE_SHA,
    META_VOCAB,
    OnnxBackend,
    import_onnxruntime,
    open_session,
)

logger = logging.getLogger(__name__)

OPSET = 17
FP32_FILE = "score_fp32.onnx"
INT8_FILE = "score_int8.onnx"
GRADE_HEAD = "grade_head"  # the (H, K) grade rows of the output head: kept fp32 in every variant
# Graphs with more weight bytes than this keep them in ONE "<file>.data" beside the .onnx: protobuf
# cannot hold a message over 2 GiB, and onnxruntime maps a .data file instead of parsing a second
# in-memory copy (Qwen3-0.6B int8: 0.46 GB RSS after load vs 2.0 GB from one 1 GB .onnx file).
EXTERNAL_DATA_THRESHOLD = 32 * 2**20
# Which graph this exporter writes for given weights. GRAPH_VERSION is the contract the runtime reads
# (inputs, outputs, metadata); the revision changes when the graph inside it does, so that a cached
# graph (_reusable) or a cached export (`make bench`: bench/runner.py: export_dir) made by an earlier
# exporter is made again. Recorded in each graph's metadata and its manifest's info.
# 2: cos/sin of rank 4, which OpenVINO's rotary fusion matches. 3: OpenVINO's static int8 gathers the
# embedding's int8 rows (export/openvino.py: embedding_lookup_on_int8_rows). 4: attention is one
# MatMul-Softmax-MatMul over the prefix's and the new tokens' keys, query heads folded into rows.
GRAPH_REVISION = "4"
META_GRAPH_REVISION = "answerfirst.graph_revision"
# Parity thresholds (README "Export" lists every variant's, with what they rest on). fp32 differs from
# torch by float summation order only. int8's max |dp| bound: a healthy int8 export of a learned
# student (3 layers, hidden 128, held-out accuracy 0.48; 128 probe pairs) measured 0.128 per-channel
# and 0.139 per-tensor, random-weight Qwen3-0.6B exports 0.011-0.014, while broken exports of the
# same student (a zeroed MLP, shuffled rows, doubled scales, lost scales) all measured >= 0.92
# (bench/parity_thresholds.py). Near a grade boundary a learned model's sharp logits turn a small
# logit error into a large |dp|, so the bound sits at ~2x the healthy worst case.
FP32_THRESHOLDS = ParityThresholds(max_abs_dp=1e-4, min_spearman=0.99)
INT8_THRESHOLDS = ParityThresholds(max_abs_dp=0.25, min_agreement=0.98, min_spearman=0.99)
INT8_SCHEMES = ("auto", "per-channel", "per-tensor")
# rope types whose inverse frequencies do not depend on the sequence length (so they can be constants)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class OnnxExportConfig:
    """int8: also write the dynamically quantized int8 variant.
    int8_scheme: "per-channel" | "per-tensor" weight scales, or "auto": quantize both, score both
        against torch and keep the better (agreement, then Spearman, then max |dp|).
    opset: ONNX opset of the graph.
    force: re-export even when the output already holds graphs of the same weights (resume skips them).
    """

    int8: bool = True
    int8_scheme: str = "auto"
    opset: int = OPSET
    force: bool = False

    def __post_init__(self) -> None:
        if self.int8_scheme not in INT8_SCHEMES:
            raise ValueError(f"int8_scheme: one of {', '.join(INT8_SCHEMES)}; got {self.int8_scheme!r}")
        if not isinstance(self.opset, int) or not 14 <= self.opset <= 21:
            raise ValueError(f"opset: an int in 14..21, got {self.opset!r}")


# ------------------------------------------------------------------------------------------------
# The graph
# ------------------------------------------------------------------------------------------------


def _scoring_graph_class() -> type:
    import torch

    class ScoringGraph(torch.nn.Module):
        """A Qwen3-style decoder over an HF causal LM's own modules, with explicit shared-prefix attention."""

        def __init__(self, model: Any, grade_ids: Sequence[int]):
            super().__init__()
            shape = Qwen3Shape.from_config(model.config)
            body = model.model
            self.embed = body.embed_tokens
            self.layers = body.layers
            self.norm = body.norm
            self.lm_head = model.get_output_embeddings()
            self.num_heads = shape.num_attention_heads
            self.kv_heads = shape.num_key_value_heads
            self.head_dim = shape.head_dim
            self.scaling = self.head_dim**-0.5
            self.rope_scaling = float(body.rotary_emb.attention_scaling)
            self.register_buffer("inv_freq", body.rotary_emb.inv_freq.detach().float().clone(), persistent=False)
            # (H, K): only the grade rows of the output head; scoring never touches the vocabulary
            self.register_buffer(GRADE_HEAD, self.lm_head.weight[list(grade_ids)].detach().float().t().contiguous())

        def forward(self, input_ids, lengths, kv_rows, vocab_rows, *past):
            batch, seq = input_ids.shape
            past_len = past[0].shape[2]

            positions = torch.arange(seq, dtype=torch.int64) + past_len  # (T,)
            freqs = positions[:, None].float() * self.inv_freq[None, :]  # (T, d/2)
            angles = torch.cat((freqs, freqs), dim=-1)  # (T, d)
            # (1, 1, T, d): rank 4 like q and k, so OpenVINO's CPU plugin fuses each rotary chain into one
            # RoPE node (with (T, d) it ran as ten ops a layer; bench/export_ab.py measures the change)
            cos, sin = angles.cos()[None, None] * self.rope_scaling, angles.sin()[None, None] * self.rope_scaling
            # Additive mask over the prefix's and the new tokens' keys: every past token is visible to all,
            # the new ones causally. Finite (not -inf) so pad rows stay finite; a row always sees itself,
            # so no row is all-masked. (g·T, P + T): one (T, P + T) block per query head of a kv head,
            # the rows _decoder_layer folds them into.
            steps = torch.arange(seq, dtype=torch.int64)
            causal = (steps[None, :] > steps[:, None]).float() * torch.finfo(torch.float32).min  # (T, T)
            mask = torch.cat((causal.new_zeros(seq, past_len), causal), dim=1).repeat(self.num_heads // self.kv_heads, 1)

            hidden = self.embed(input_ids)  # (B, T, H)
            presents = []
            for i, layer in enumerate(self.layers):
                past_k, past_v = past[2 * i], past[2 * i + 1]  # (1, kv, P, d)
                hidden, k, v = _decoder_layer(self, layer, hidden, past_k, past_v, cos, sin, mask, (batch, seq))
                # (N, kv, P+T, d) for the requested rows only; N = 0 while scoring
                keep = kv_rows.shape[0]
                presents.append(torch.cat((past_k.expand(keep, -1, -1, -1), k.index_select(0, kv_rows)), dim=2))
                presents.append(torch.cat((past_v.expand(keep, -1, -1, -1), v.index_select(0, kv_rows)), dim=2))

            last = hidden[torch.arange(batch), lengths - 1]  # (B, H) each row's last real token
            last = self.norm(last)
            grade_logits = torch.matmul(last, self.grade_head)  # (B, K)
            # (V, H) @ (H, M), transposed: the head reads the (tied) embedding tensor itself, where
            # F.linear would trace a Transpose of it that onnxruntime folds into a second copy at load
            next_token_logits = torch.matmul(self.lm_head.weight, last.index_select(0, vocab_rows).t()).t()  # (M, V)
            return (grade_logits, next_token_logits, *presents)

    return ScoringGraph


def _decoder_layer(graph, layer, hidden, past_k, past_v, cos, sin, mask, sizes):
    """One decoder layer over the new tokens, attending to the shared prefix KV and causally to
    themselves (mask: ScoringGraph.forward's, (g·T, P + T)). Returns the new hidden states and this
    layer's K, V of the new tokens. `graph`: the ScoringGraph (head counts, head_dim, scaling)."""
    import torch

    batch, seq = sizes
    groups = graph.num_heads // graph.kv_heads
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    q = _linear(attn.q_proj, x).view(batch, seq, graph.num_heads, graph.head_dim)
    k = _linear(attn.k_proj, x).view(batch, seq, graph.kv_heads, graph.head_dim)
    v = _linear(attn.v_proj, x).view(batch, seq, graph.kv_heads, graph.head_dim)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin

    # GQA without repeat_kv: query head h reads kv head h // groups, so the g query heads of a kv head
    # are folded into its rows, and attention is one rank-4 MatMul-Softmax-MatMul over the prefix's and
    # the new tokens' keys: the pattern OpenVINO's CPU plugin runs as one fused kernel (README "Where
    # OpenVINO static int8's time goes"). The prefix KV is expanded to the batch for this layer only.
    rows = q.reshape(batch, graph.kv_heads, groups * seq, graph.head_dim)  # (B, kv, g·T, d)
    keys = torch.cat((past_k.expand(batch, -1, -1, -1), k), dim=2)  # (B, kv, P + T, d)
    values = torch.cat((past_v.expand(batch, -1, -1, -1), v), dim=2)
    scores = torch.matmul(rows, keys.transpose(-1, -2)) * graph.scaling + mask  # (B, kv, g·T, P + T)
    out = torch.matmul(torch.softmax(scores, dim=-1), values)  # (B, kv, g·T, d)
    out = out.reshape(batch, graph.num_heads, seq, graph.head_dim).transpose(1, 2)
    hidden = hidden + _linear(attn.o_proj, out.reshape(batch, seq, graph.num_heads * graph.head_dim))
    mlp, x = layer.mlp, layer.post_attention_layernorm(hidden)
    hidden = hidden + _linear(mlp.down_proj, mlp.act_fn(_linear(mlp.gate_proj, x)) * _linear(mlp.up_proj, x))
    return hidden, k, v


def _linear(module, x):
    """x @ Wᵀ of a bias-free nn.Linear, over the (in, out) weight `_transpose_linears` left in place of
    its (out, in) one, so the traced MatMul reads the parameter itself (see export_graph)."""
    import torch

    return torch.matmul(x, module.weight_t) if hasattr(module, "weight_t") else module(x)


def _transpose_linears(graph) -> None:
    """Store every decoder linear's weight as its (in, out) transpose, one tensor at a time (the
    original is freed as its copy is made). Traced as it is, F.linear gives MatMul(x, Transpose(W)),
    which the exporter's constant folding turns into a second, transposed copy of every weight (1.8 GB
    at Qwen3-0.6B) beside the model: the trace then peaked at 7 GB."""
    import torch

    for module in graph.layers.modules():
        if isinstance(module, torch.nn.Linear):
            if module.bias is not None:
                raise ValueError(f"{type(module).__name__} with a bias: the scoring graph exports bias-free Qwen3 linears")
            module.weight_t = torch.nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
            del module.weight


def release_memory() -> None:
    """Collect what Python freed and hand the allocator's free pages back to the OS (glibc keeps freed
    blocks below its mmap threshold, such as a layer's weights, in its heap: without this the RSS of
    the export stays at its high-water mark into the next step)."""
    import ctypes
    import ctypes.util

    gc.collect()
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:
        trim(0)


def _rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def check_architecture(model: Any) -> None:
    config = model.config
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(
            f"{config.model_type}: sliding-window layers ({sorted(set(layer_types))}) are not supported by the ONNX "
            "scoring graph; export a model with full attention in every layer"
        )
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in STATIC_ROPE_TYPES:
        raise ValueError(f"rope_type {rope!r} depends on the sequence length; the ONNX graph supports {STATIC_ROPE_TYPES}")
    layer = model.model.layers[0]
    needed = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
    if not all(hasattr(layer, n) for n in needed) or not all(
        hasattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")
    ):
        raise ValueError(f"{type(model).__name__} is not a Qwen3/Llama-style decoder; the ONNX exporter cannot build its graph")


def export_graph(model: Any, grade_ids: Sequence[int], path: Path, opset: int, metadata: dict[str, str]) -> None:
    """Trace the scoring graph to `path` (+ `path`.data when large), with metadata for the runtime."""
    import onnx
    import torch

    graph = _scoring_graph_class()(model, grade_ids).eval()
    _transpose_linears(graph)  # the model is changed in place: export_onnx traces it last
    release_memory()
    layers, kv, d = len(graph.layers), graph.kv_heads, graph.head_dim
    past_names = [n for i in range(layers) for n in (f"past_key.{i}", f"past_value.{i}")]
    present_names = [n.replace("past_", "present_") for n in past_names]
    # Example sizes all > 1 and distinct, so the tracer keeps no size as a constant.
    batch, seq, past_len = 3, 5, 4
    example = (
        torch.randint(0, model.config.vocab_size, (batch, seq)),
        torch.tensor([5, 3, 2]),
        torch.tensor([0, 2]),
        torch.tensor([1, 0]),
        *[torch.randn(1, kv, past_len, d) for _ in past_names],
    )
    dynamic_axes = {
        "input_ids": {0: "batch", 1: "seq"},
        "lengths": {0: "batch"},
        "kv_rows": {0: "kv_rows"},
        "vocab_rows": {0: "vocab_rows"},
        "grade_logits": {0: "batch"},
        "next_token_logits": {0: "vocab_rows"},
        **{n: {2: "past"} for n in past_names},
        **{n: {0: "kv_rows", 2: "total"} for n in present_names},
    }
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".trace-") as trace_dir:
        traced = Path(trace_dir) / "graph.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            # Traced without its weights (they become graph inputs named as in the module's state dict)
            # and without constant folding, which would make new constants whose values are lost with
            # them; the weights are attached from the module below, one at a time. Exported with them,
            # the exporter held a second copy of the model in its protobuf (trace peak 6.2 GB at
            # Qwen3-0.6B, 7 GB with folded transposes).
            torch.onnx.export(
                graph,
                example,
                str(traced),
                input_names=["input_ids", "lengths", "kv_rows", "vocab_rows", *past_names],
                output_names=["grade_logits", "next_token_logits", *present_names],
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                export_params=False,
                do_constant_folding=False,
                dynamo=False,
            )
        proto = onnx.load(str(traced))
    weights = {**dict(graph.named_parameters()), **dict(graph.named_buffers())}
    inputs = [i for i in proto.graph.input if i.name in weights]
    for weight_input in inputs:
        proto.graph.input.remove(weight_input)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    produce = {i.name: (lambda name=i.name: weights[name].detach().float().numpy()) for i in inputs}
    external = sum(weights[i.name].numel() * 4 for i in inputs) > EXTERNAL_DATA_THRESHOLD
    _write_streamed(proto, produce, path, external)


def _quantize_int8(fp32_path: Path, out_path: Path, per_channel: bool, metadata: dict[str, str]) -> None:
    """Dynamic int8 of every constant-weight MatMul but the vocabulary head: each becomes onnxruntime's
    DynamicQuantizeMatMul (int8 weights, symmetric, one scale per output column or one per tensor;
    activations quantized per call to uint8), the node onnxruntime's own `quantize_dynamic` output is
    fused into at load.

    Streamed: the graph is read without its weights, and each weight is read from the fp32 graph's
    .data file, quantized and written in turn, so the peak is one tensor, not the model
    (`quantize_dynamic` held the fp32 model twice: 10.4 GB at Qwen3-0.6B)."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(fp32_path), load_external_data=False)
    source = _TensorSource(proto, fp32_path)
    graph = proto.graph
    produce: dict[str, Callable[[], np.ndarray]] = {}  # new initializer -> how to compute it when written

    @functools.lru_cache(maxsize=1)
    def quantize(weight: str) -> tuple[np.ndarray, np.ndarray]:
        return _int8_weights(source.read(weight), per_channel)

    for index, node in enumerate(list(graph.node)):
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight not in source or weight == GRADE_HEAD:
            continue
        q_name, scale_name = weight + "_int8", weight + "_scale"
        if q_name not in produce:  # written one after the other: the second reuses the first's work
            produce[q_name] = lambda w=weight: quantize(w)[0]
            produce[scale_name] = lambda w=weight: quantize(w)[1]
        quantized = helper.make_node(
            "DynamicQuantizeMatMul", [node.input[0], q_name, scale_name], list(node.output),
            name=node.name + "_int8", domain="com.microsoft",
        )
        graph.node.remove(node)
        graph.node.insert(index, quantized)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    kept = {name: (lambda name=name: source.read(name)) for name in source.tensors}
    external = any(t.data_location == onnx_external() for t in source.tensors.values())
    _write_streamed(proto, {**kept, **produce}, out_path, external)


def _int8_weights(weights: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) fp32 -> (K, N) int8 in [-127, 127] and its scale: (N,) per output column, or () per tensor."""
    peak = np.abs(weights).max(axis=0) if per_channel else np.abs(weights).max()
    scale = (np.maximum(peak, np.finfo(np.float32).tiny) / 127.0).astype(np.float32)
    return np.clip(np.rint(weights / scale), -127, 127).astype(np.int8), scale


class _TensorSource:
    """The initializers of a graph loaded without its weights: each read on demand, from the graph
    itself or memory-mapped from its external .data file."""

    def __init__(self, proto: Any, path: Path):
        self.path = path
        self.tensors = {t.name: t for t in proto.graph.initializer}

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def read(self, name: str) -> np.ndarray:
        from onnx import helper, numpy_helper

        tensor = self.tensors[name]
        if tensor.data_location != onnx_external():
            return numpy_helper.to_array(tensor)
        info = {entry.key: entry.value for entry in tensor.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        return np.memmap(self.path.parent / info["location"], dtype=dtype, mode="r",
                         offset=int(info.get("offset", 0)), shape=tuple(tensor.dims))


def onnx_external() -> int:
    from onnx import TensorProto

    return TensorProto.EXTERNAL


def _write_streamed(proto: Any, tensors: dict[str, Callable[[], np.ndarray]], path: Path, external: bool) -> None:
    """Save `proto` with the initializers of `tensors` that a node reads, each computed and written in
    turn, so one is in memory at a time. external: into ONE `<file>.data` beside the graph (a graph
    over 2 GiB cannot be one protobuf; onnxruntime maps the file instead of parsing a second copy),
    each tensor at a page-aligned offset."""
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    used = {name for node in graph.node for name in node.input}
    del graph.initializer[:]
    data_path = path.with_name(path.name + ".data")
    data_path.unlink(missing_ok=True)
    with open(data_path, "wb") if external else contextlib.nullcontext() as data:
        for name in [n for n in tensors if n in used]:
            tensor = numpy_helper.from_array(np.ascontiguousarray(tensors[name]()), name)
            if external and len(tensor.raw_data) >= 1024:
                offset, length = data.tell(), len(tensor.raw_data)
                data.write(tensor.raw_data)
                data.write(b"\0" * (-data.tell() % 4096))
                tensor.ClearField("raw_data")
                tensor.data_location = onnx_external()
                for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
                    tensor.external_data.add(key=key, value=value)
            graph.initializer.append(tensor)
    onnx.save_model(proto, str(path))


# ------------------------------------------------------------------------------------------------
# export_onnx: the public entry point
# ------------------------------------------------------------------------------------------------


def export_onnx(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    int8: bool = True,
    int8_scheme: str = "auto",
    probe_pairs: Sequence[tuple[str, str]] | None = None,
    opset: int = OPSET,
    force: bool = False,
    threads: int | None = None,
) -> Manifest:
    """Export a student checkpoint to `out_dir` (graphs, tokenizer, answerfirst.json) and return the manifest.

    probe_pairs: the (query, doc) pairs parity is measured on; default: the student's held-out probe
    pairs (its manifest's info["probe_pairs"]), else the built-in ones. A variant that misses its
    thresholds is logged as a WARNING and recorded with passed=false, never silently.
    Re-running on the same out_dir reuses graphs already exported from the same weights (unless force).
    """
    config = OnnxExportConfig(int8=int8, int8_scheme=int8_scheme, opset=opset, force=force)
    import_onnxruntime()
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise missing_extra("exporting to ONNX", "train", e) from None
    from answerfirst.runtime import load

    model_dir, out = Path(model_dir), Path(out_dir)
    student_manifest, pairs = check_inputs(model_dir, out, probe_pairs)
    started = time.perf_counter()
    logger.info("export onnx: %s -> %s (%s)", model_dir, out, asdict(config))

    reference = load(model_dir, backend="torch", threads=threads)  # the torch fp32 model: the parity reference
    model, prompts = reference.backend.model, reference.prompts
    check_architecture(model)
    sha = checkpoint_hash(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "answerfirst.json").unlink(missing_ok=True)  # no manifest until every file it names is complete
    metadata = graph_metadata(model, prompts.grade_ids, sha)

    fp32_path = out / FP32_FILE
    step = _Steps(3 + (1 if config.int8 else 0))
    step("scoring %d probe pairs with torch (the reference)", len(pairs))
    ref_scores = reference.score_pairs(pairs)
    if _reusable(fp32_path, {**metadata, "answerfirst.quantization": "fp32"}, config.force):
        step("fp32 graph already exported from these weights; reusing %s", fp32_path.name)
    else:
        step("exporting the fp32 graph to %s", fp32_path.name)
        export_graph(model, prompts.grade_ids, fp32_path, config.opset, {**metadata, "answerfirst.quantization": "fp32"})
    # The torch model is done with (reference scores, trace): free its 2.4 GB (Qwen3-0.6B) before the
    # onnxruntime sessions open, so the export's peak is the trace's, not the sum of every step's.
    del reference, model
    release_memory()

    def parity(path: Path, thresholds: ParityThresholds, prepack: bool) -> dict[str, Any]:
        return _parity(path, prompts.pad_id, prompts, ref_scores, pairs, thresholds, threads, prepack)

    step("scoring the probe pairs with the fp32 graph")
    fp32_report = parity(fp32_path, FP32_THRESHOLDS, prepack=True)
    log_report("onnx fp32", fp32_report)
    variants = [Variant("fp32", FP32_FILE, "fp32", fp32_report)]
    info: dict[str, Any] = {"exporter": "torch.onnx (TorchScript)", "opset": config.opset, "export_config": asdict(config)}
    if config.int8:
        schemes = ["per-channel", "per-tensor"] if config.int8_scheme == "auto" else [config.int8_scheme]
        step("quantizing to int8 (%s) and scoring the probe pairs", " vs ".join(schemes))
        int8_variant, info["int8"] = _export_int8(out, fp32_path, metadata, schemes, config.force, parity)
        variants.insert(0, int8_variant)  # fastest first
    else:
        _remove_graph(out / INT8_FILE)  # an int8 graph of an earlier run would not match this manifest

    step("writing tokenizer and answerfirst.json")
    info["export_seconds"] = round(time.perf_counter() - started, 1)
    return write_manifest(out, model_dir, sha, prompts, variants, info, pairs, student_manifest)


def write_manifest(
    out: Path, model_dir: Path, sha: str, prompts: Any, variants: list[Variant], info: dict[str, Any],
    pairs: list[tuple[str, str]], student_manifest: Manifest | None, kind: str = "onnx",
    files: Callable[[str], list[str]] = lambda file: [file, file + ".data"],
) -> Manifest:
    """The tokenizer and answerfirst.json of a graph export (ONNX, or OpenVINO: export/openvino.py),
    written last: a manifest names only complete files (with their sizes and sha256, the tokenizer's
    included). files: the files of one variant's graph."""
    tokenizer_files = [Path(f).name for f in prompts.tokenizer.save_pretrained(out)]
    info["graph_revision"] = GRAPH_REVISION
    info["probe_pairs"] = [list(p) for p in pairs]
    info["student_info"] = {k: v for k, v in (student_manifest.info if student_manifest else {}).items() if k != "probe_pairs"}
    manifest = Manifest(kind=kind, format=prompts.format, grade_token_ids=prompts.grade_ids,
                        source={"model": str(model_dir), "sha256": sha}, variants=variants, info=info)
    finalize_files(manifest, out, [name for v in variants for name in files(v.file)] + tokenizer_files)
    manifest.write(out)
    failed = [v.name for v in variants if not v.parity_passed]
    if failed:
        logger.warning(
            "export %s: variant(s) %s did NOT pass parity; recorded as passed=false in %s (load() skips them "
            "unless named with variant=...)", kind, ", ".join(failed), out / "answerfirst.json",
        )
    logger.info("export %s: done in %.1f s", kind, info["export_seconds"])
    return manifest


def check_inputs(
    model_dir: Path, out: Path, probe_pairs: Sequence[tuple[str, str]] | None
) -> tuple[Manifest | None, list[tuple[str, str]]]:
    """The student's manifest (None for a plain HF checkpoint) and the parity probe pairs."""
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {model_dir} is not a directory; give a student checkpoint (e.g. artifacts/student)")
    if out.resolve() == model_dir.resolve():
        raise ValueError("--out must differ from --model: the export directory gets its own answerfirst.json")
    student_manifest = Manifest.read(model_dir) if has_manifest(model_dir) else None
    if student_manifest is not None and student_manifest.kind != "checkpoint":
        raise ValueError(f"{model_dir} is a {student_manifest.kind} export, not a checkpoint; export from the student checkpoint")
    pairs = [(str(q), str(d)) for q, d in probe_pairs] if probe_pairs is not None else default_probe_pairs(student_manifest)
    if not pairs:
        raise ValueError("probe_pairs is empty; parity needs at least one (query, doc) pair")
    return student_manifest, pairs


def graph_metadata(model: Any, grade_ids: Sequence[int], sha: str) -> dict[str, str]:
    """What every graph records about itself; the runtime checks it against the manifest."""
    shape = Qwen3Shape.from_config(model.config)
    return {
        META_GRAPH_VERSION: GRAPH_VERSION,
        META_GRAPH_REVISION: GRAPH_REVISION,
        META_GRADE_IDS: json.dumps(list(grade_ids)),
        META_LAYERS: str(shape.num_hidden_layers),
        META_KV_HEADS: str(shape.num_key_value_heads),
        META_HEAD_DIM: str(shape.head_dim),
        META_VOCAB: str(shape.vocab_size),
        META_SOURCE_SHA: sha,
        META_MAX_POSITIONS: str(model.config.max_position_embeddings),
    }


def _export_int8(
    out: Path,
    fp32_path: Path,
    metadata: dict[str, str],
    schemes: list[str],
    force: bool,
    parity: Callable[[Path, ParityThresholds, bool], dict[str, Any]],
) -> tuple[Variant, dict[str, Any]]:
    """Quantize with each scheme, score each against torch, keep the best (passed, then agreement,
    then Spearman, then max |dp|: RANK_KEYS) as score_int8.onnx. Returns its variant and the manifest's int8 notes."""
    int8_path = out / INT8_FILE
    candidates: dict[str, dict[str, Any]] = {}
    best: tuple[Any, str, Path] | None = None
    for scheme in schemes:
        path = out / f".{scheme}.{INT8_FILE}" if len(schemes) > 1 else int8_path
        meta = {**metadata, "answerfirst.quantization": f"int8-dynamic-{scheme}"}
        if not _reusable(path, meta, force):
            _quantize_int8(fp32_path, path, per_channel=scheme == "per-channel", metadata=meta)
        report = parity(path, INT8_THRESHOLDS, False)
        candidates[scheme] = report
        rank = (report["passed"], *(_or_worst(report[k], sign) for k, sign in RANK_KEYS))
        logger.info("int8 %s: %s", scheme, summary(report))
        if best is None or rank > best[0]:
            best = (rank, scheme, path)
    assert best is not None
    _, scheme, path = best
    if path != int8_path:
        _move_graph(path, int8_path)
    for other in schemes:
        _remove_graph(out / f".{other}.{INT8_FILE}")
    log_report(f"onnx int8 ({scheme})", candidates[scheme])
    notes = {
        "scheme": scheme,
        "chosen_by": "measured" if len(schemes) > 1 else "given",
        "candidates": {s: {k: r[k] for k in ("grade_agreement", "spearman_expected", "max_abs_dp", "passed")}
                       for s, r in candidates.items()},
        "quantized_ops": ["MatMul -> DynamicQuantizeMatMul"],
        "note": "dynamic quantization: int8 weights, uint8 activations quantized per call; the grade head, "
                "the embedding and the vocabulary head (explanations only) stay fp32",
    }  # fmt: skip
    return Variant("int8", INT8_FILE, f"int8-dynamic-{scheme}", candidates[scheme]), notes


class _Steps:
    """Numbered progress lines: "[2/4] quantizing ...", each with the time the previous step took."""

    def __init__(self, total: int):
        self.total, self.done, self.started = total + 1, 0, time.perf_counter()

    def __call__(self, message: str, *args: Any) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        logger.info("[%d/%d] " + message + " (%.1f s so far)", self.done, self.total, *args, elapsed)


def _reusable(path: Path, metadata: dict[str, str], force: bool) -> bool:
    """A graph from an interrupted or earlier run is reused only when its metadata (weights hash,
    quantization, graph version and revision) match and onnxruntime can load it."""
    if force or not path.is_file():
        return False
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        stored = {p.key: p.value for p in proto.metadata_props}
        if any(stored.get(k) != v for k, v in metadata.items()):
            return False
        open_session(path, threads=1, prepack=False)
        return True
    except Exception as e:  # a half-written file: export it again
        logger.info("not reusing %s (%s)", path.name, e)
        return False


def _parity(path, pad_id, prompts, ref_scores, pairs, thresholds, threads, prepack) -> dict[str, Any]:
    """Scored with the session options the runtime will use for this variant (runtime._onnx.prepacks)."""
    scorer = Scorer(OnnxBackend(open_session(path, threads, prepack), pad_id, str(path)), prompts, ScorerConfig(), None)
    return measure(ref_scores, lambda: scorer.score_pairs(pairs), thresholds)


# How int8 schemes are ranked after "passed": agreement, then Spearman, then max |dp| (lower is better).
RANK_KEYS = (("grade_agreement", 1.0), ("spearman_expected", 1.0), ("max_abs_dp", -1.0))


def _or_worst(value: float | None, sign: float) -> float:
    """sign * value, with an unmeasurable value (None) ranked below every measured one."""
    return -np.inf if value is None else sign * value


def _move_graph(src: Path, dst: Path) -> None:
    """Rename a graph (and its .data file, whose name the graph records) to its final name."""
    import onnx

    src_data = src.with_name(src.name + ".data")
    if src_data.exists():  # the weights move with the file; the graph names the new file
        proto = onnx.load(str(src), load_external_data=False)
        dst_data = dst.with_name(dst.name + ".data")
        _remove_graph(dst)
        os.replace(src_data, dst_data)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = dst_data.name
        onnx.save_model(proto, str(dst))
        src.unlink()
    else:
        _remove_graph(dst)
        os.replace(src, dst)


def _remove_graph(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="student checkpoint directory (e.g. artifacts/student)")
    parser.add_argument("--out", required=True, help="export directory (e.g. artifacts/onnx)")
    parser.add_argument("--no-int8", action="store_true", help="write only the fp32 graph")
    parser.add_argument("--int8-scheme", default="auto", choices=INT8_SCHEMES,
                        help="int8 weight scales; auto measures both against torch and keeps the better")
    parser.add_argument("--opset", type=int, default=OPSET)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for parity scoring")
    parser.add_argument("--force", action="store_true", help="re-export graphs even if the output has them")


def run(args: argparse.Namespace) -> int:
    manifest = export_onnx(
        args.model, args.out, int8=not args.no_int8, int8_scheme=args.int8_scheme, opset=args.opset,
        force=args.force, threads=args.threads,
    )
    print(f"wrote {args.out}")
    for v in manifest.variants:
        p = v.parity or {}
        status = "passed" if v.parity_passed else "FAILED: " + "; ".join(p.get("failures", []))
        size = sum(s for name, s in manifest.info[FILES_KEY].items() if name.startswith(v.file)) / 2**20
        print(
            f"  {v.name:5s} {v.file:18s} {size:9.1f} MiB  {summary(p)}  parity {status}"
        )
    return 0 if all(v.parity_passed for v in manifest.variants if v.name == "fp32") else 1
