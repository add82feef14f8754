"""The speed levers of issue 16, each measured on this machine at workload W's shapes.

    .venv/bin/python bench/levers.py --out bench/results/levers.json [--threads 2] [--tokens 2048]

The ONNX int8 graph spends its time in three places (`answerfirst profile`, README "Latency
benchmark"): the decoder's linear layers, attention's matmuls, and the transposes and concats that
feed them. Each lever replaces the kernel of one of these, so each is timed here on that kernel alone,
at Qwen3-0.6B's dimensions and W's sizes, against what the shipped graph runs today. A lever that
loses at the kernel cannot win in the whole graph; one that wins is worth building into the export.

Linear layers: one decoder layer's seven matmuls (q, k, v, o, gate, up, down) over `tokens` rows of
fp32 activations, fp32 out, as in the graph:
    ort-fp32                 MatMul
    ort-int8                 DynamicQuantizeMatMul, int8 weights with one scale per tensor (today's int8 variant)
    ort-int8-per-channel     the same with one scale per output column
    ort-int8 +block-base-4   today's, with session.dynamic_block_base = 4
    ort-int8 -spinning       today's, with the thread pool's spinning off
    ort-nbits8-acc4          MatMulNBits, 8-bit weights in blocks of 32, accuracy_level 4 (int8 compute)
    ort-nbits4-acc4          MatMulNBits, 4-bit weights, the same (for reference: Q4's kernel)
    openvino-f32             OpenVINO's CPU plugin on the fp32 graph
    openvino-int8w           nncf int8 weights (per channel) + dynamic activation quantization (group 32)
    openvino-int8w-bf16      the same with bf16 compute (AMX), where the CPU has it
    torch-fp32 / torch-bf16  torch.mm; bf16 only where the CPU has AMX bf16 or AVX512_BF16
    torch-int8-dynamic       per-row activation quantization, torch._int_mm, dequantization
Each reports seconds per layer, GOP/s and its largest error relative to the fp32 result.

Attention: one layer over B documents of T tokens continuing one P-token prefix (16 query heads,
8 KV heads, head size 128), rotary already applied:
    explicit-batched         today's graph: transposes, MatMul against the broadcast prefix K and the
                             documents' own K, causal mask, Softmax, two MatMuls with V, Concat
    gqa-one-doc-per-run      com.microsoft.GroupQueryAttention, one document per run with the prefix
                             KV as its past (the op's CPU kernel continues a past only at batch 1)
    gqa-batched              the same op on all B documents at once, the prefix copied B times

llama.cpp (with --gguf): Q8_0 and Q4_K_M end to end through answerfirst.load, at n_batch 128 / 256 /
512 and 1 or all threads.

Other GGUF quantizations (with --gguf-more DIR): the variants of another export of the same model
(e.g. `answerfirst export gguf --quant iq4_nl`) beside Q8_0 and Q4_K_M, at the default n_batch.

Reference point (with --genai DIR): the graph onnxruntime-genai's model builder writes for the same
checkpoint (GroupQueryAttention + MatMulNBits int8), timed on W's 32 documents (genai_reference).

Nothing here is used at run time; the results go to the JSON and README's lever table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from answerfirst.bench.flops import ModelShape, best_rate
from answerfirst.offline import QWEN3_0_6B
from answerfirst.runtime._cpu import features

SHAPE = ModelShape.from_config(QWEN3_0_6B)


# ------------------------------------------------------------------------------------------------
# linear layers
# ------------------------------------------------------------------------------------------------


def _layer_inputs(tokens: int, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Activations (tokens, in) and weights (in, out) of one layer's seven matmuls, at the scale of a
    trained layer's (unit-variance activations, weights ~ 1/sqrt(in))."""
    xs = [rng.standard_normal((tokens, a), dtype=np.float32) for a, _ in SHAPE.linear_shapes()]
    ws = [(rng.standard_normal((a, b), dtype=np.float32) / np.sqrt(a)).astype(np.float32) for a, b in SHAPE.linear_shapes()]
    return xs, ws


def _fp32_graph(ws: list[np.ndarray], tokens: int) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    nodes, inputs, outputs, inits = [], [], [], []
    for i, w in enumerate(ws):
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [tokens, w.shape[0]]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [tokens, w.shape[1]]))
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"]))
    graph = helper.make_graph(nodes, "layer_linears", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _int8_graph(ws: list[np.ndarray], tokens: int, per_channel: bool) -> Any:
    """DynamicQuantizeMatMul with symmetric int8 weights: what the int8 export writes."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inputs, outputs, inits = [], [], [], []
    for i, w in enumerate(ws):
        scale = (np.abs(w).max(axis=0) if per_channel else np.abs(w).max()) / 127.0
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        inputs.append(helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [tokens, w.shape[0]]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [tokens, w.shape[1]]))
        zero = np.zeros(scale.shape, dtype=np.int8) if per_channel else np.array(0, dtype=np.int8)
        inits += [numpy_helper.from_array(q, f"w{i}"), numpy_helper.from_array(np.asarray(scale, np.float32), f"s{i}"),
                  numpy_helper.from_array(zero, f"z{i}")]
        nodes.append(helper.make_node("DynamicQuantizeMatMul", [f"x{i}", f"w{i}", f"s{i}", f"z{i}"], [f"y{i}"], domain="com.microsoft"))
    graph = helper.make_graph(nodes, "layer_linears_int8", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=9)


def _nbits_graph(ws: list[np.ndarray], tokens: int, bits: int) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(_fp32_graph(ws, tokens), bits=bits, block_size=32, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    return quantizer.model.model


def _ort_session(model: Any, threads: int, entries: dict[str, str] | None = None) -> Any:
    """A CPU session over `model` (an onnx ModelProto, or the path of a graph on disk)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 4  # the one error this script expects (gqa-batched) is recorded, not logged
    for key, value in (entries or {}).items():
        options.add_session_config_entry(key, value)
    graph = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def _openvino_model(model: Any, threads: int, int8: bool, bf16: bool) -> Any:
    import openvino as ov

    core = ov.Core()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "layer.onnx"
        path.write_bytes(model.SerializeToString())
        ov_model = core.read_model(str(path))
    if int8:
        import logging

        import nncf

        nncf.set_log_level(logging.ERROR)
        ov_model = nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT8_SYM)
    config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32"}
    if int8:
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 32
    return core.compile_model(ov_model, "CPU", config)


def linear_levers(tokens: int, threads: int, min_seconds: float, say=print) -> list[dict[str, Any]]:
    import logging

    import torch

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    rng = np.random.default_rng(0)
    xs, ws = _layer_inputs(tokens, rng)
    reference = [x @ w for x, w in zip(xs, ws, strict=True)]
    feeds = {f"x{i}": x for i, x in enumerate(xs)}
    ops = sum(2 * tokens * a * b for a, b in SHAPE.linear_shapes())
    cpu = features()
    rows: list[dict[str, Any]] = []

    def record(name: str, what: str, run, outputs) -> None:
        rate = best_rate(run, ops, min_seconds)
        error = max(float(np.abs(o - r).max() / np.abs(r).max()) for o, r in zip(outputs(), reference, strict=True))
        rows.append({"lever": name, "what": what, "seconds_per_layer": ops / rate, "gops": rate / 1e9, "max_rel_error": error})
        say(f"  {name:24s} {ops / rate * 1e3:8.1f} ms/layer {rate / 1e9:7.1f} GOP/s  max rel. error {error:.2e}")

    def ort_lever(name: str, what: str, model: Any, entries: dict[str, str] | None = None) -> None:
        session = _ort_session(model, threads, entries)
        record(name, what, lambda: session.run(None, feeds), lambda: session.run(None, feeds))

    ort_lever("ort-fp32", "onnxruntime MatMul (fp32 variant)", _fp32_graph(ws, tokens))
    today = _int8_graph(ws, tokens, per_channel=False)
    ort_lever("ort-int8", "DynamicQuantizeMatMul, per-tensor int8 weights (int8 variant today)", today)
    ort_lever("ort-int8-per-channel", "DynamicQuantizeMatMul, per-channel int8 weights", _int8_graph(ws, tokens, per_channel=True))
    ort_lever("ort-int8 +block-base-4", "today's int8, session.dynamic_block_base=4", today, {"session.dynamic_block_base": "4"})
    ort_lever("ort-int8 -spinning", "today's int8, session.intra_op.allow_spinning=0", today, {"session.intra_op.allow_spinning": "0"})
    for bits in (8, 4):
        ort_lever(f"ort-nbits{bits}-acc4", f"MatMulNBits {bits}-bit, block 32, accuracy_level 4", _nbits_graph(ws, tokens, bits))

    try:
        fp32_model = _fp32_graph(ws, tokens)
        for name, int8, bf16, what in (
            ("openvino-f32", False, False, "OpenVINO CPU plugin, fp32 graph"),
            ("openvino-int8w", True, False, "OpenVINO, nncf int8 weights + dynamic activation quantization (group 32)"),
            ("openvino-int8w-bf16", True, True, "the same with bf16 compute"),
        ):
            if bf16 and not cpu.amx_bf16:
                say(f"  {name}: skipped (no AMX bf16 on this CPU)")
                continue
            compiled = _openvino_model(fp32_model, threads, int8, bf16)
            request = compiled.create_infer_request()

            def ov_outputs(request=request, compiled=compiled):
                result = request.infer(feeds)
                return [np.asarray(result[compiled.output(i)]) for i in range(len(ws))]

            record(name, what, lambda request=request: request.infer(feeds), ov_outputs)
    except ImportError as e:
        say(f"  openvino: skipped ({e})")

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        txs, tws = [torch.from_numpy(x) for x in xs], [torch.from_numpy(w) for w in ws]
        record("torch-fp32", "torch.mm fp32", lambda: [torch.mm(x, w) for x, w in zip(txs, tws, strict=True)],
               lambda: [torch.mm(x, w).numpy() for x, w in zip(txs, tws, strict=True)])
        if cpu.fast_bf16:
            bxs, bws = [x.bfloat16() for x in txs], [w.bfloat16() for w in tws]
            record("torch-bf16", "torch.mm bf16 (activations cast per call not counted)",
                   lambda: [torch.mm(x, w) for x, w in zip(bxs, bws, strict=True)],
                   lambda: [torch.mm(x, w).float().numpy() for x, w in zip(bxs, bws, strict=True)])
        else:
            say("  torch-bf16: skipped (no AMX bf16 or AVX512_BF16 on this CPU)")
        w_scale = [w.abs().amax(dim=0) / 127 for w in tws]
        qws = [torch.round(w / s).clamp(-127, 127).to(torch.int8) for w, s in zip(tws, w_scale, strict=True)]

        def int8_dynamic() -> list[Any]:
            out = []
            for x, qw, s in zip(txs, qws, w_scale, strict=True):
                x_scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127
                qx = torch.round(x / x_scale).to(torch.int8)
                out.append(torch._int_mm(qx, qw).float() * x_scale * s)
            return out

        record("torch-int8-dynamic", "per-row int8 activations, torch._int_mm, per-channel weights",
               int8_dynamic, lambda: [y.numpy() for y in int8_dynamic()])
    finally:
        torch.set_num_threads(previous)
    return rows


# ------------------------------------------------------------------------------------------------
# attention
# ------------------------------------------------------------------------------------------------


def _explicit_attention_graph(prefix: int) -> Any:
    """Today's attention (export/onnx.py: _decoder_layer), rotary left out: q (B,T,H*d), k and v
    (B,T,kv*d), the prefix K/V (1,kv,P,d) -> (B,T,H*d)."""
    from onnx import TensorProto, helper, numpy_helper

    heads, kv, d = SHAPE.num_attention_heads, SHAPE.num_key_value_heads, SHAPE.head_dim
    groups = heads // kv
    f = TensorProto.FLOAT

    def const(name: str, value: Any, dtype=np.int64) -> Any:
        return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)

    inits = [const("shape_q", [0, 0, kv, groups, d]), const("shape_kv", [0, 0, kv, d]), const("axis2", [2]),
             const("scale", 1 / np.sqrt(d), np.float32), const("shape_out", [0, 0, heads * d]),
             const("p_start", [0]), const("p_end", [prefix]), const("t_end", [2**62]), const("last", [-1])]
    nodes = [
        helper.make_node("Reshape", ["q", "shape_q"], ["q5r"]),
        helper.make_node("Transpose", ["q5r"], ["q5"], perm=[0, 2, 3, 1, 4]),  # (B, kv, g, T, d)
        helper.make_node("Reshape", ["k", "shape_kv"], ["k4r"]),
        helper.make_node("Transpose", ["k4r"], ["k4"], perm=[0, 2, 1, 3]),  # (B, kv, T, d)
        helper.make_node("Reshape", ["v", "shape_kv"], ["v4r"]),
        helper.make_node("Transpose", ["v4r"], ["v4"], perm=[0, 2, 1, 3]),
        helper.make_node("Unsqueeze", ["past_k", "axis2"], ["pk5"]),
        helper.make_node("Transpose", ["pk5"], ["pk5t"], perm=[0, 1, 2, 4, 3]),
        helper.make_node("MatMul", ["q5", "pk5t"], ["s_past_raw"]),
        helper.make_node("Mul", ["s_past_raw", "scale"], ["s_past"]),
        helper.make_node("Unsqueeze", ["k4", "axis2"], ["k5"]),
        helper.make_node("Transpose", ["k5"], ["k5t"], perm=[0, 1, 2, 4, 3]),
        helper.make_node("MatMul", ["q5", "k5t"], ["s_new_raw"]),
        helper.make_node("Mul", ["s_new_raw", "scale"], ["s_new_scaled"]),
        helper.make_node("Add", ["s_new_scaled", "causal"], ["s_new"]),
        helper.make_node("Concat", ["s_past", "s_new"], ["scores"], axis=-1),
        helper.make_node("Softmax", ["scores"], ["weights"], axis=-1),
        helper.make_node("Slice", ["weights", "p_start", "p_end", "last"], ["w_past"]),
        helper.make_node("Slice", ["weights", "p_end", "t_end", "last"], ["w_new"]),
        helper.make_node("Unsqueeze", ["past_v", "axis2"], ["pv5"]),
        helper.make_node("MatMul", ["w_past", "pv5"], ["o_past"]),
        helper.make_node("Unsqueeze", ["v4", "axis2"], ["v5"]),
        helper.make_node("MatMul", ["w_new", "v5"], ["o_new"]),
        helper.make_node("Add", ["o_past", "o_new"], ["o5"]),  # (B, kv, g, T, d)
        helper.make_node("Transpose", ["o5"], ["o5t"], perm=[0, 3, 1, 2, 4]),  # (B, T, kv, g, d)
        helper.make_node("Reshape", ["o5t", "shape_out"], ["out"]),
    ]
    inputs = [helper.make_tensor_value_info("q", f, ["B", "T", heads * d]),
              helper.make_tensor_value_info("k", f, ["B", "T", kv * d]),
              helper.make_tensor_value_info("v", f, ["B", "T", kv * d]),
              helper.make_tensor_value_info("past_k", f, [1, kv, prefix, d]),
              helper.make_tensor_value_info("past_v", f, [1, kv, prefix, d]),
              helper.make_tensor_value_info("causal", f, ["T", "T"])]
    outputs = [helper.make_tensor_value_info("out", f, ["B", "T", heads * d])]
    graph = helper.make_graph(nodes, "explicit_attention", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def _gqa_graph() -> Any:
    from onnx import TensorProto, helper

    heads, kv, d = SHAPE.num_attention_heads, SHAPE.num_key_value_heads, SHAPE.head_dim
    f, i32 = TensorProto.FLOAT, TensorProto.INT32
    node = helper.make_node(
        "GroupQueryAttention", ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total_len"],
        ["out", "present_k", "present_v"], domain="com.microsoft", num_heads=heads, kv_num_heads=kv,
        scale=float(1 / np.sqrt(d)),
    )
    inputs = [helper.make_tensor_value_info("q", f, ["B", "T", heads * d]),
              helper.make_tensor_value_info("k", f, ["B", "T", kv * d]),
              helper.make_tensor_value_info("v", f, ["B", "T", kv * d]),
              helper.make_tensor_value_info("past_k", f, ["B", kv, "P", d]),
              helper.make_tensor_value_info("past_v", f, ["B", kv, "P", d]),
              helper.make_tensor_value_info("seqlens_k", i32, ["B"]),
              helper.make_tensor_value_info("total_len", i32, [])]
    outputs = [helper.make_tensor_value_info("out", f, ["B", "T", heads * d]),
               helper.make_tensor_value_info("present_k", f, ["B", kv, "S", d]),
               helper.make_tensor_value_info("present_v", f, ["B", kv, "S", d])]
    graph = helper.make_graph([node], "gqa", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=9)


def attention_levers(docs: int, doc_tokens: int, prefix: int, threads: int, min_seconds: float, say=print) -> list[dict[str, Any]]:
    heads, kv, d = SHAPE.num_attention_heads, SHAPE.num_key_value_heads, SHAPE.head_dim
    rng = np.random.default_rng(0)
    q = rng.standard_normal((docs, doc_tokens, heads * d), dtype=np.float32)
    k = rng.standard_normal((docs, doc_tokens, kv * d), dtype=np.float32)
    v = rng.standard_normal((docs, doc_tokens, kv * d), dtype=np.float32)
    past_k = rng.standard_normal((1, kv, prefix, d), dtype=np.float32)
    past_v = rng.standard_normal((1, kv, prefix, d), dtype=np.float32)
    steps = np.arange(doc_tokens)
    causal = np.where(steps[None, :] > steps[:, None], np.finfo(np.float32).min, 0).astype(np.float32)
    # attention FLOPs: Q·Kᵀ and P·V over prefix + causal half of the new tokens
    ops = docs * 2 * 2 * heads * d * sum(prefix + t + 1 for t in range(doc_tokens))
    rows: list[dict[str, Any]] = []

    def record(name: str, what: str, run, output) -> None:
        try:
            rate = best_rate(run, ops, min_seconds)
        except Exception as e:  # the op's own refusal is the measurement ("does it run batched?")
            message = str(e).strip().splitlines()[0][:300]
            rows.append({"lever": name, "what": what, "error": message})
            say(f"  {name:24s} fails: {message}")
            return
        error = float(np.abs(output() - reference).max() / np.abs(reference).max())
        rows.append({"lever": name, "what": what, "seconds_per_layer": ops / rate, "gflops": rate / 1e9, "max_rel_error": error})
        say(f"  {name:24s} {ops / rate * 1e3:8.1f} ms/layer {rate / 1e9:7.1f} GFLOP/s  max rel. error {error:.2e}")

    explicit = _ort_session(_explicit_attention_graph(prefix), threads)
    feeds = {"q": q, "k": k, "v": v, "past_k": past_k, "past_v": past_v, "causal": causal}
    reference = explicit.run(None, feeds)[0]
    record("explicit-batched", "today's graph: transposes, MatMul, mask, Softmax, MatMul, Concat",
           lambda: explicit.run(None, feeds), lambda: explicit.run(None, feeds)[0])

    gqa = _ort_session(_gqa_graph(), threads)
    total = np.array(prefix + doc_tokens, dtype=np.int32)

    def one_doc(i: int) -> dict[str, np.ndarray]:
        return {"q": q[i : i + 1], "k": k[i : i + 1], "v": v[i : i + 1], "past_k": past_k, "past_v": past_v,
                "seqlens_k": np.array([prefix + doc_tokens - 1], dtype=np.int32), "total_len": total}

    per_doc = [one_doc(i) for i in range(docs)]
    record("gqa-one-doc-per-run", "GroupQueryAttention, one document per run, prefix KV as past",
           lambda: [gqa.run(["out"], f) for f in per_doc],
           lambda: np.concatenate([gqa.run(["out"], f)[0] for f in per_doc]))
    batched = {"q": q, "k": k, "v": v, "past_k": np.repeat(past_k, docs, 0), "past_v": np.repeat(past_v, docs, 0),
               "seqlens_k": np.full(docs, prefix + doc_tokens - 1, dtype=np.int32), "total_len": total}
    record("gqa-batched", "GroupQueryAttention, all documents in one run, prefix copied per document",
           lambda: gqa.run(["out"], batched), lambda: gqa.run(["out"], batched)[0])
    return rows


# ------------------------------------------------------------------------------------------------
# llama.cpp: batch and thread settings, end to end
# ------------------------------------------------------------------------------------------------


def llamacpp_levers(gguf: Path, docs: int, threads: int, say=print) -> list[dict[str, Any]]:
    """Scoring `docs` documents of W through the GGUF backend (answerfirst.load), per quantization,
    n_batch (tokens per llama_decode, also its ubatch) and thread count: seconds per document, the
    better of two calls after a warm-up call, each with its prefix (a new query)."""
    settings = [(gguf, quant, n_batch, threads) for quant in ("q8_0", "q4_k_m") for n_batch in (128, 256, 512)]
    settings += [(gguf, "q4_k_m", 256, 1)] if threads > 1 else []
    return _time_gguf(settings, docs, say)


def quant_levers(gguf: Path, more: list[Path], docs: int, threads: int, say=print) -> list[dict[str, Any]]:
    """Other quantizations beside Q8_0 and Q4_K_M, at the default n_batch: every variant (rank heads
    aside) of the exports in `more` (e.g. `answerfirst export gguf --quant iq4_nl`), timed in the same
    run as `gguf`'s Q4_K_M and Q8_0."""
    from answerfirst.artifact import Manifest

    settings = [(gguf, quant, 256, threads) for quant in ("q8_0", "q4_k_m")]
    for directory in more:
        settings += [(directory, v.name, 256, threads) for v in Manifest.read(directory).variants if not v.name.endswith("-rank")]
    return _time_gguf(settings, docs, say)


def _time_gguf(settings: list[tuple[Path, str, int, int]], docs: int, say) -> list[dict[str, Any]]:
    import answerfirst
    from answerfirst.bench.workload import workload_w
    from answerfirst.runtime import ScorerConfig

    rows: list[dict[str, Any]] = []
    for gguf, quant, n_batch, n_threads in settings:
        scorer = answerfirst.load(gguf, threads=n_threads, variant=quant, config=ScorerConfig(n_batch=n_batch))
        work = workload_w(scorer.prompts, docs)
        best = float("inf")
        for call in range(3):
            scorer.backend.forget_prefixes()
            start = time.perf_counter()
            scorer.score(work.query, list(work.docs))
            if call:  # the first call warms up
                best = min(best, time.perf_counter() - start)
        rows.append({"lever": f"{quant} n_batch {n_batch}, {n_threads} thread(s)", "gguf": str(gguf), "quant": quant,
                     "n_batch": n_batch, "threads": n_threads, "seconds_per_doc": best / docs})
        say(f"  {rows[-1]['lever']:34s} {best / docs * 1e3:7.0f} ms/doc")
        del scorer
    return rows


# ------------------------------------------------------------------------------------------------
# reference point: the onnxruntime-genai model builder's graph of the same model
# ------------------------------------------------------------------------------------------------


def genai_reference(model_dir: Path, checkpoint: Path, docs: int, threads: int, batch: int = 8) -> dict[str, Any]:
    """W's `docs` documents through the graph onnxruntime-genai's model builder writes for this Qwen3
    (GroupQueryAttention + MatMulNBits; built by
    `python -m onnxruntime_genai.models.builder -i CHECKPOINT -o DIR -p int8 -e cpu --extra_options exclude_lm_head=true`),
    run with onnxruntime directly: whole prompts (its GQA takes no batched continuation of a shared
    prefix), right-padded batches of `batch` with an empty past, hidden states out (the grade rows
    of the head would add ~nothing). The better of two timed calls after a warm-up."""
    from transformers import AutoTokenizer

    from answerfirst.artifact import bind_format
    from answerfirst.bench.workload import workload_w

    prompts = bind_format(AutoTokenizer.from_pretrained(checkpoint), None, str(checkpoint))
    work = workload_w(prompts, docs)
    sequences = []
    for doc in work.docs:
        prompt = prompts.prompt(work.query, doc)
        sequences.append([*prompt.prefix_ids, *prompt.doc_ids, *prompts.suffix_ids])
    decoder = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    session = _ort_session(model_dir / "model.onnx", threads)
    inputs = {i.name for i in session.get_inputs()}

    def run(rows: list[list[int]]) -> None:
        width = max(len(r) for r in rows)
        ids, mask = np.zeros((len(rows), width), np.int64), np.zeros((len(rows), width), np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = row, 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "position_ids" in inputs:
            feeds["position_ids"] = np.tile(np.arange(width), (len(rows), 1))
        empty = np.zeros((len(rows), decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
        for layer in range(decoder["num_hidden_layers"]):
            feeds[f"past_key_values.{layer}.key"] = feeds[f"past_key_values.{layer}.value"] = empty
        session.run(None, feeds)

    run(sequences[:2])
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        for first in range(0, len(sequences), batch):
            run(sequences[first : first + batch])
        best = min(best, time.perf_counter() - start)
    print(f"  onnxruntime-genai builder graph: {best:.2f} s/query, {best / docs * 1e3:.0f} ms/doc", flush=True)
    return {"model": str(model_dir), "checkpoint": str(checkpoint), "docs": docs, "batch": batch,
            "seconds_per_query": best, "ms_per_doc": best / docs * 1e3}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/levers.json"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tokens", type=int, default=2048, help="rows of the linear layers' matmuls (a 16-document pass of W: ~2200)")
    parser.add_argument("--docs", type=int, default=16, help="documents per attention pass")
    parser.add_argument("--doc-tokens", type=int, default=140, help="tokens per document (W: 64-192 + the suffix)")
    parser.add_argument("--prefix", type=int, default=126, help="prefix tokens (W's rubric + query: 126)")
    parser.add_argument("--min-seconds", type=float, default=3.0, help="timing per lever (best of three thirds)")
    parser.add_argument("--gguf", type=Path, default=None, help="a GGUF export of the Qwen3-0.6B shape (make bench caches one): "
                        "also time llama.cpp's batch and thread settings end to end")
    parser.add_argument("--gguf-docs", type=int, default=8, help="documents of W per llama.cpp call")
    parser.add_argument("--genai", type=Path, default=None, help="the onnxruntime-genai model builder's output for "
                        "--genai-checkpoint (see genai_reference): time it as a reference point")
    parser.add_argument("--genai-checkpoint", type=Path, default=Path("artifacts/bench/qwen3-0.6b-random"))
    parser.add_argument("--gguf-more", type=Path, action="append", default=[], help="another GGUF export of the same "
                        "model (e.g. --quant iq4_nl): its variants are timed beside --gguf's Q8_0 and Q4_K_M (repeatable)")
    parser.add_argument("--extras-only", action="store_true", help="time only --genai and --gguf-more, added to an existing --out")
    args = parser.parse_args(argv)
    started, loadavg = time.time(), list(os.getloadavg())
    stamp = {"loadavg_before": loadavg, "created_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))}
    extras: dict[str, Any] = {}
    if args.genai is not None:
        print(f"onnxruntime-genai: {args.genai}, 32 documents of W", flush=True)
        extras["genai"] = {**genai_reference(args.genai, args.genai_checkpoint, 32, args.threads), **stamp}
    if args.gguf_more:
        if args.gguf is None:
            parser.error("--gguf-more needs --gguf (the export whose Q8_0 and Q4_K_M it is timed beside)")
        print(f"GGUF quantizations: {args.gguf} and {', '.join(map(str, args.gguf_more))}, {args.gguf_docs} documents of W", flush=True)
        extras["quants"] = {"rows": quant_levers(args.gguf, args.gguf_more, args.gguf_docs, args.threads), "docs": args.gguf_docs, **stamp}
    if args.extras_only:
        if not extras:
            parser.error("--extras-only needs --genai DIR or --gguf-more DIR")
        results = json.loads(args.out.read_text()) if args.out.is_file() else {}
        results.update(extras)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"added {', '.join(extras)} to {args.out}")
        return 0
    print(f"linear layers: {args.tokens} rows, {args.threads} threads", flush=True)
    linears = linear_levers(args.tokens, args.threads, args.min_seconds)
    print(f"attention: {args.docs} documents x {args.doc_tokens} tokens after a {args.prefix}-token prefix", flush=True)
    attention = attention_levers(args.docs, args.doc_tokens, args.prefix, args.threads, args.min_seconds)
    llamacpp = None
    if args.gguf is not None:
        print(f"llama.cpp: {args.gguf}, {args.gguf_docs} documents of W per call", flush=True)
        llamacpp = {"gguf": str(args.gguf), "docs": args.gguf_docs, "rows": llamacpp_levers(args.gguf, args.gguf_docs, args.threads)}
    from answerfirst.bench.runner import machine_description

    results = {
        "created_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "command": " ".join([".venv/bin/python", "bench/levers.py", *sys.argv[1:]]),
        "machine": {**machine_description(), "loadavg_before": loadavg},
        "shape": "Qwen3-0.6B", "threads": args.threads,
        "linear": {"tokens": args.tokens, "rows": linears},
        "attention": {"docs": args.docs, "doc_tokens": args.doc_tokens, "prefix": args.prefix, "rows": attention},
        "llamacpp": llamacpp,
        **extras,
        "seconds": time.time() - started,
        "loadavg_after": list(os.getloadavg()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
