"""`answerfirst export onnx --model DIR --out DIR`: the student's scoring graph in fp32 and int8.

The graph is our own module over the checkpoint's weights (not transformers' forward, whose
vmap-built masks the TorchScript exporter cannot trace), exported with torch.onnx:

    inputs   input_ids (B, T), lengths (B,), kv_rows (N,), vocab_rows (M,),
             past_key.i / past_value.i (1, kv_heads, P, head_dim)   one shared prefix KV
    outputs  grade_logits (B, K)            the K grade rows of the LM head at each row's last real token
             next_token_logits (M, V)       full vocabulary, last real token, only for vocab_rows (decoding)
             present_key.i / present_value.i (N, kv_heads, P+T, head_dim), only for kv_rows

B, T, P, N and M are dynamic. The prefix KV has batch 1 and is broadcast inside attention (a batched
MatMul against (1, kv, 1, P, d)), so B documents continue one prefix without B copies of it; kv_rows
and vocab_rows are empty while scoring, so neither the KV nor the vocabulary head costs anything then.

int8 is onnxruntime's dynamic quantization of every MatMul with constant weights (the layers and
the grade head); the embedding and the vocabulary head (explanations only) share one fp32 tensor
and stay fp32. Each variant is scored against the torch fp32 model on the probe pairs and its parity
report is written into answerfirst.json; variants are listed fastest first (int8, fp32).
"""

from __future__ import annotations

import argparse
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
VOCAB_HEAD = "vocab_head"  # node name of the full-vocabulary head (decoding only; kept fp32)
# Graphs with more weight bytes than this keep them in ONE "<file>.data" beside the .onnx: protobuf
# cannot hold a message over 2 GiB, and onnxruntime maps a .data file instead of parsing a second
# in-memory copy (Qwen3-0.6B int8: 0.46 GB RSS after load vs 2.0 GB from one 1 GB .onnx file).
EXTERNAL_DATA_THRESHOLD = 32 * 2**20
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
    import torch.nn.functional as F

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
            # (K, H): only the grade rows of the output head; scoring never touches the vocabulary
            self.register_buffer("grade_head", self.lm_head.weight[list(grade_ids)].detach().float().clone())

        def forward(self, input_ids, lengths, kv_rows, vocab_rows, *past):
            batch, seq = input_ids.shape
            past_len = past[0].shape[2]

            positions = torch.arange(seq, dtype=torch.int64) + past_len  # (T,)
            freqs = positions[:, None].float() * self.inv_freq[None, :]  # (T, d/2)
            angles = torch.cat((freqs, freqs), dim=-1)  # (T, d)
            cos, sin = angles.cos() * self.rope_scaling, angles.sin() * self.rope_scaling
            # (T, T) additive causal mask among the new tokens; every past token is visible to all.
            # Finite (not -inf) so pad rows stay finite; a row always sees itself, so no row is all-masked.
            steps = torch.arange(seq, dtype=torch.int64)
            causal = (steps[None, :] > steps[:, None]).float() * torch.finfo(torch.float32).min

            hidden = self.embed(input_ids)  # (B, T, H)
            presents = []
            for i, layer in enumerate(self.layers):
                past_k, past_v = past[2 * i], past[2 * i + 1]  # (1, kv, P, d)
                hidden, k, v = _decoder_layer(self, layer, hidden, past_k, past_v, cos, sin, causal, (batch, seq, past_len))
                # (N, kv, P+T, d) for the requested rows only; N = 0 while scoring
                keep = kv_rows.shape[0]
                presents.append(torch.cat((past_k.expand(keep, -1, -1, -1), k.index_select(0, kv_rows)), dim=2))
                presents.append(torch.cat((past_v.expand(keep, -1, -1, -1), v.index_select(0, kv_rows)), dim=2))

            last = hidden[torch.arange(batch), lengths - 1]  # (B, H) each row's last real token
            last = self.norm(last)
            grade_logits = torch.matmul(last, self.grade_head.t())  # (B, K)
            # exported as Gemm(transB=1) over the (tied) embedding tensor itself: see _share_vocab_head
            next_token_logits = F.linear(last.index_select(0, vocab_rows), self.lm_head.weight)  # (M, V)
            return (grade_logits, next_token_logits, *presents)

    return ScoringGraph


def _decoder_layer(graph, layer, hidden, past_k, past_v, cos, sin, causal, sizes):
    """One decoder layer over the new tokens, attending to the shared prefix KV and causally to
    themselves. Returns the new hidden states and this layer's K, V of the new tokens. `graph`: the
    ScoringGraph (head counts, head_dim, scaling)."""
    import torch

    batch, seq, past_len = sizes
    groups = graph.num_heads // graph.kv_heads
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(batch, seq, graph.num_heads, graph.head_dim)
    k = attn.k_proj(x).view(batch, seq, graph.kv_heads, graph.head_dim)
    v = attn.v_proj(x).view(batch, seq, graph.kv_heads, graph.head_dim)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin

    # GQA without repeat_kv: query head h reads kv head h // groups.
    q5 = q.reshape(batch, graph.kv_heads, groups, seq, graph.head_dim)  # (B, kv, g, T, d)
    scores_past = torch.matmul(q5, past_k.unsqueeze(2).transpose(-1, -2)) * graph.scaling  # (B, kv, g, T, P)
    scores_new = torch.matmul(q5, k.unsqueeze(2).transpose(-1, -2)) * graph.scaling + causal  # (B, kv, g, T, T)
    weights = torch.softmax(torch.cat((scores_past, scores_new), dim=-1), dim=-1)
    out = torch.matmul(weights[..., :past_len], past_v.unsqueeze(2)) + torch.matmul(
        weights[..., past_len:], v.unsqueeze(2)
    )  # (B, kv, g, T, d)
    out = out.reshape(batch, graph.num_heads, seq, graph.head_dim).transpose(1, 2)
    hidden = hidden + attn.o_proj(out.reshape(batch, seq, graph.num_heads * graph.head_dim))
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, k, v


def _rotate_half(x):
    import torch

    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _check_architecture(model: Any) -> None:
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


def _export_graph(model: Any, grade_ids: Sequence[int], path: Path, opset: int, metadata: dict[str, str]) -> None:
    """Trace the scoring graph to `path` (+ `path`.data when large), with metadata for the runtime."""
    import onnx
    import torch

    graph = _scoring_graph_class()(model, grade_ids).eval()
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
            torch.onnx.export(
                graph,
                example,
                str(traced),
                input_names=["input_ids", "lengths", "kv_rows", "vocab_rows", *past_names],
                output_names=["grade_logits", "next_token_logits", *present_names],
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        proto = onnx.load(str(traced))  # pulls in any external tensors the exporter wrote beside it
    _share_vocab_head(proto)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    _save_graph(proto, path)


def _share_vocab_head(proto: Any) -> None:
    """The tracer folds F.linear's weight transpose into a second (H, V) constant; put the vocabulary
    head back as Gemm(transB=1) over the (V, H) tensor itself, shared with the embedding when tied
    (Qwen3-0.6B: saves 622 MB on disk and in memory)."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    head = next(n for n in graph.node if "next_token_logits" in n.output)
    if head.op_type != "MatMul" or head.input[1] not in initializers:
        return
    transposed = numpy_helper.to_array(initializers[head.input[1]])  # (H, V)
    embed_gather = next(n for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    embed = initializers[embed_gather.input[0]]
    if list(embed.dims) == list(transposed.shape[::-1]) and np.array_equal(numpy_helper.to_array(embed).T, transposed):
        weight_name = embed.name  # tied: one tensor for the embedding and the head
    else:
        weight_name = "lm_head.weight"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(transposed.T), weight_name))
    gemm = helper.make_node("Gemm", [head.input[0], weight_name], list(head.output), name=VOCAB_HEAD, transB=1)
    index = list(graph.node).index(head)
    graph.node.remove(head)
    graph.node.insert(index, gemm)
    if not any(head.input[1] in n.input for n in graph.node):
        graph.initializer.remove(initializers[head.input[1]])


def _unshare_vocab_head(proto: Any) -> None:
    """The inverse of _share_vocab_head: MatMul(x, W^T) over its own (H, V) constant."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    head = next(n for n in graph.node if "next_token_logits" in n.output)
    if head.op_type != "Gemm":
        return
    weight = next(t for t in graph.initializer if t.name == head.input[1])
    transposed_name = VOCAB_HEAD + ".weight_t"
    graph.initializer.append(
        numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weight).T), transposed_name)
    )
    matmul = helper.make_node("MatMul", [head.input[0], transposed_name], list(head.output), name=VOCAB_HEAD)
    index = list(graph.node).index(head)
    graph.node.remove(head)
    graph.node.insert(index, matmul)


def _save_graph(proto: Any, path: Path) -> None:
    """One .onnx file, or one .onnx plus ONE .onnx.data file when the weights pass EXTERNAL_DATA_THRESHOLD."""
    import onnx

    data_path = path.with_name(path.name + ".data")
    data_path.unlink(missing_ok=True)
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    if weight_bytes > EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_path.name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def _quantize_int8(fp32_path: Path, out_path: Path, per_channel: bool, metadata: dict[str, str]) -> None:
    """Dynamic int8 (weights int8, activations uint8 quantized on the fly) of every constant-weight MatMul."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quant-") as work:
        # quantize_dynamic rewrites every Gemm(transB=1) as a MatMul by transposing its weight IN PLACE,
        # which would corrupt the embedding the vocabulary head shares; hand it an unshared MatMul head,
        # keep that node fp32, and share the tensor again afterwards.
        proto = onnx.load(str(fp32_path))
        _unshare_vocab_head(proto)
        source = Path(work) / "fp32.onnx"
        _save_graph(proto, source)
        large = source.with_name(source.name + ".data").exists()
        del proto
        quantized = Path(work) / "graph.onnx"
        root = logging.getLogger()
        was_disabled, root.disabled = root.disabled, True  # quantize_dynamic warns through the root logger
        try:
            quantize_dynamic(
                str(source),
                str(quantized),
                op_types_to_quantize=["MatMul"],
                nodes_to_exclude=[VOCAB_HEAD],
                per_channel=per_channel,
                weight_type=QuantType.QInt8,
                use_external_data_format=large,
            )
        finally:
            root.disabled = was_disabled
        proto = onnx.load(str(quantized))
    _share_vocab_head(proto)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    _save_graph(proto, out_path)


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
    student_manifest, pairs = _check_inputs(model_dir, out, probe_pairs)
    started = time.perf_counter()
    logger.info("export onnx: %s -> %s (%s)", model_dir, out, asdict(config))

    reference = load(model_dir, backend="torch", threads=threads)  # the torch fp32 model: the parity reference
    model, prompts = reference.backend.model, reference.prompts
    _check_architecture(model)
    sha = checkpoint_hash(model_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "answerfirst.json").unlink(missing_ok=True)  # no manifest until every file it names is complete
    metadata = _graph_metadata(model, prompts.grade_ids, sha)

    fp32_path = out / FP32_FILE
    step = _Steps(2 + (1 if config.int8 else 0))
    if _reusable(fp32_path, {**metadata, "answerfirst.quantization": "fp32"}, config.force):
        step("fp32 graph already exported from these weights; reusing %s", fp32_path.name)
    else:
        step("exporting the fp32 graph to %s", fp32_path.name)
        _export_graph(model, prompts.grade_ids, fp32_path, config.opset, {**metadata, "answerfirst.quantization": "fp32"})

    step("scoring %d probe pairs with torch (reference) and fp32 onnx", len(pairs))
    ref_scores = reference.score_pairs(pairs)

    def parity(path: Path, thresholds: ParityThresholds, prepack: bool) -> dict[str, Any]:
        return _parity(path, prompts.pad_id, prompts, ref_scores, pairs, thresholds, threads, prepack)

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
    return _write_manifest(out, model_dir, sha, prompts, variants, info, pairs, student_manifest)


def _write_manifest(
    out: Path, model_dir: Path, sha: str, prompts: Any, variants: list[Variant], info: dict[str, Any],
    pairs: list[tuple[str, str]], student_manifest: Manifest | None,
) -> Manifest:
    """The tokenizer and answerfirst.json, written last: a manifest names only complete files (with
    their sizes and sha256, the tokenizer's included)."""
    tokenizer_files = [Path(f).name for f in prompts.tokenizer.save_pretrained(out)]
    info["probe_pairs"] = [list(p) for p in pairs]
    info["student_info"] = {k: v for k, v in (student_manifest.info if student_manifest else {}).items() if k != "probe_pairs"}
    manifest = Manifest(kind="onnx", format=prompts.format, grade_token_ids=prompts.grade_ids,
                        source={"model": str(model_dir), "sha256": sha}, variants=variants, info=info)
    finalize_files(manifest, out, [name for v in variants for name in (v.file, v.file + ".data")] + tokenizer_files)
    manifest.write(out)
    failed = [v.name for v in variants if not v.parity_passed]
    if failed:
        logger.warning(
            "export onnx: variant(s) %s did NOT pass parity; recorded as passed=false in %s (load() skips them "
            "unless named with variant=...)", ", ".join(failed), out / "answerfirst.json",
        )
    logger.info("export onnx: done in %.1f s", info["export_seconds"])
    return manifest


def _check_inputs(
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


def _graph_metadata(model: Any, grade_ids: Sequence[int], sha: str) -> dict[str, str]:
    """What every graph records about itself; the runtime checks it against the manifest."""
    shape = Qwen3Shape.from_config(model.config)
    return {
        META_GRAPH_VERSION: GRAPH_VERSION,
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
        "quantized_ops": ["MatMul"],
        "note": "dynamic quantization: int8 weights, uint8 activations quantized per call; the embedding "
                "and the vocabulary head (explanations only) stay fp32",
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
    quantization, graph version) match and onnxruntime can load it."""
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
    if src_data.exists():
        proto = onnx.load(str(src))
        _save_graph(proto, dst)
        _remove_graph(src)
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
