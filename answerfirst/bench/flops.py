"""The compute floor: the useful FLOPs of a scoring call and this machine's matmul throughput.

Useful work is what no backend can skip: the decoder layers over the document and suffix tokens
(the rubric+query prefix is computed once per query and excluded), and the K grade rows of the
output head at the last position of each document. For a token at absolute position p (it attends
to p + 1 positions) one decoder layer costs

    linear:    2 · (H·q + 2·H·kv + q·H + 3·H·I)     q = heads · head_dim, kv = kv_heads · head_dim
    attention: 2 · 2 · heads · head_dim · (p + 1)   (Q·Kᵀ and P·V)

and the head 2 · H · K once per document. RMSNorm, RoPE, SiLU and softmax are O(H) per token and
left out. The floor time divides the linear FLOPs by the machine's measured matmul rate at the
model's own shapes (fp32, or int8 for the quantized backends) and the attention FLOPs by the fp32
rate (every backend here runs attention in floating point).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from answerfirst.qwen3 import Qwen3Shape

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape(Qwen3Shape):
    """A Qwen3-style decoder's dimensions (answerfirst.qwen3), with what its scoring costs."""

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of every matmul in one decoder layer: q, k, v, o, gate, up, down."""
        h, i = self.hidden_size, self.intermediate_size
        return [(h, self.q_dim), (h, self.kv_dim), (h, self.kv_dim), (self.q_dim, h), (h, i), (h, i), (i, h)]

    def linear_flops_per_token(self) -> int:
        """All decoder layers' matmul FLOPs for one token (2 per multiply-add)."""
        return self.num_hidden_layers * sum(2 * a * b for a, b in self.linear_shapes())

    def attention_flops(self, position: int) -> int:
        """All decoder layers' attention FLOPs for the token at absolute `position` (0-based)."""
        return self.num_hidden_layers * 2 * 2 * self.num_attention_heads * self.head_dim * (position + 1)


@dataclass(frozen=True)
class UsefulFlops:
    linear: int  # decoder matmuls over document + suffix tokens
    attention: int  # Q·Kᵀ and P·V of those tokens, against prefix + their own row
    head: int  # K grade rows of the output head, once per document
    tokens: int  # document + suffix tokens counted

    @property
    def total(self) -> int:
        return self.linear + self.attention + self.head


def useful_flops(shape: ModelShape, prefix_len: int, continuation_lens: Sequence[int], num_grades: int) -> UsefulFlops:
    """The FLOPs no backend can avoid for one query: every continuation (doc + suffix) of length c
    follows a prefix of `prefix_len` tokens, so its tokens sit at positions prefix_len .. prefix_len + c - 1."""
    if prefix_len < 0 or any(c < 1 for c in continuation_lens):
        raise ValueError("prefix_len must be >= 0 and every continuation length >= 1")
    tokens = sum(continuation_lens)
    per_layer_attention = 2 * 2 * shape.num_attention_heads * shape.head_dim
    # Σ over positions p = P .. P + c - 1 of (p + 1) = c·P + c(c + 1)/2
    attended = sum(c * prefix_len + c * (c + 1) // 2 for c in continuation_lens)
    return UsefulFlops(
        linear=tokens * shape.linear_flops_per_token(),
        attention=shape.num_hidden_layers * per_layer_attention * attended,
        head=len(continuation_lens) * 2 * shape.hidden_size * num_grades,
        tokens=tokens,
    )


def prefix_reuse_ceiling(shape: ModelShape, prefix_len: int, continuation_lens: Sequence[int]) -> float:
    """The most prefix reuse can speed up one query: the decoder FLOPs of running the prefix with
    every continuation, over those of running it once and continuing each document from it. Below
    2× whenever the prefix is shorter than the mean continuation."""
    def decoder(flops: UsefulFlops) -> int:
        return flops.linear + flops.attention

    once = decoder(useful_flops(shape, 0, [prefix_len], 0)) + decoder(useful_flops(shape, prefix_len, continuation_lens, 0))
    every = decoder(useful_flops(shape, 0, [prefix_len + c for c in continuation_lens], 0))
    return every / once


def floor_seconds(flops: UsefulFlops, linear_flops_per_s: float, fp32_flops_per_s: float) -> float:
    """Time at the measured matmul rates: linear layers at `linear_flops_per_s` (fp32 or int8),
    attention and head at the fp32 rate."""
    return flops.linear / linear_flops_per_s + (flops.attention + flops.head) / fp32_flops_per_s


def best_rate(run: Callable[[], None], flops: int, min_seconds: float) -> float:
    """FLOP/s of `run` (which does `flops` FLOPs): one warm-up call, then the best of three runs of at
    least min_seconds / 3 each (the least disturbed by other processes)."""
    run()  # warm-up: kernel selection, page faults
    best = 0.0
    for _ in range(3):
        runs, start = 0, time.perf_counter()
        while True:
            run()
            runs += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds / 3:
                break
        best = max(best, runs * flops / elapsed)
    return best


def onnxruntime_int8_throughput(shape: ModelShape, tokens: int, threads: int, min_seconds: float = 1.0) -> float:
    """OP/s of onnxruntime's int8 GEMM (MatMulInteger: uint8 activations × int8 weights -> int32, the
    kernel of our int8 graph; AMX or VNNI where the CPU has them) for one decoder layer's matmuls at
    `tokens` rows. On an AMX Xeon it outran torch._int_mm by ~1.6x, so the int8 floor takes the best
    of both."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inputs, outputs, weights, feeds = [], [], [], [], {}
    for i, (n_in, n_out) in enumerate(shape.linear_shapes()):
        inputs.append(helper.make_tensor_value_info(f"a{i}", TensorProto.UINT8, [tokens, n_in]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.INT32, [tokens, n_out]))
        weights.append(numpy_helper.from_array(rng.integers(-127, 128, (n_in, n_out), dtype=np.int8), f"w{i}"))
        nodes.append(helper.make_node("MatMulInteger", [f"a{i}", f"w{i}"], [f"y{i}"]))
        feeds[f"a{i}"] = rng.integers(0, 256, (tokens, n_in), dtype=np.uint8)
    graph = helper.make_graph(nodes, "int8_layer", inputs, outputs, weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    layer_flops = sum(2 * tokens * a * b for a, b in shape.linear_shapes())
    return best_rate(lambda: session.run(None, feeds), layer_flops, min_seconds)


def onednn_int8_throughput(shape: ModelShape, tokens: int, threads: int, out: str, min_seconds: float = 1.0) -> float:
    """OP/s of oneDNN's quantized linear layer as torch runs it (`onednn::qlinear_pointwise`: uint8
    activations with a zero point × int8 weights prepacked into oneDNN's blocked layout, per-channel
    weight scales applied inside the kernel, `out` = "fp32" or "bf16" written) for one decoder
    layer's matmuls at `tokens` rows. Its epilogue writes the dequantized result, so no int32 matrix
    goes through memory: on an AMX Xeon it outran onnxruntime's MatMulInteger by ~1.3x with a bf16
    output (3.6-3.7 against 2.8 TOP/s at 2224 rows, make bench 2026-12-05), so the floor takes it
    into its best."""
    import torch

    if out not in ("fp32", "bf16"):
        raise ValueError(f"out: 'fp32' or 'bf16', got {out!r}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        scale, zero_point = torch.tensor(0.02), torch.tensor(128)
        operands = []
        for n_in, n_out in shape.linear_shapes():
            activations = torch.randint(0, 256, (tokens, n_in), dtype=torch.uint8, generator=generator)
            weights = torch.randint(-127, 128, (n_out, n_in), dtype=torch.int8, generator=generator)
            packed = torch.ops.onednn.qlinear_prepack(weights, [tokens, n_in])
            channel_scales = torch.rand(n_out, generator=generator) * 0.01 + 1e-3
            operands.append((activations, packed, channel_scales, torch.zeros(n_out, dtype=torch.int64)))
        dtype = torch.float32 if out == "fp32" else torch.bfloat16
        linear = torch.ops.onednn.qlinear_pointwise.tensor

        def one_layer() -> None:
            for activations, packed, channel_scales, channel_zeros in operands:
                linear(activations, scale, zero_point, packed, channel_scales, channel_zeros, None, 1.0, 0, dtype, "none", [], "")

        layer_flops = sum(2 * tokens * a * b for a, b in shape.linear_shapes())
        return best_rate(one_layer, layer_flops, min_seconds)
    finally:
        torch.set_num_threads(previous_threads)


def matmul_throughput(shape: ModelShape, tokens: int, dtype: str, threads: int, min_seconds: float = 1.0) -> float:
    """FLOP/s of this machine for one decoder layer's matmuls at `tokens` rows, in "fp32" (torch.mm,
    oneDNN/MKL sgemm), "bf16" (torch.mm on bf16: AMX / AVX-512 BF16 where present, emulated and slow
    elsewhere) or "int8" (torch._int_mm: int8 × int8 -> int32, VNNI/AMX where the CPU has them).

    Runs the seven matmuls of a layer back to back (best_rate)."""
    import torch

    if dtype not in ("fp32", "bf16", "int8"):
        raise ValueError(f"dtype: 'fp32', 'bf16' or 'int8', got {dtype!r}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        operands = []
        for n_in, n_out in shape.linear_shapes():
            if dtype == "int8":
                a = torch.randint(-127, 128, (tokens, n_in), dtype=torch.int8, generator=generator)
                b = torch.randint(-127, 128, (n_in, n_out), dtype=torch.int8, generator=generator)
            else:
                kind = torch.float32 if dtype == "fp32" else torch.bfloat16
                a = torch.randn(tokens, n_in, generator=generator).to(kind)
                b = torch.randn(n_in, n_out, generator=generator).to(kind)
            operands.append((a, b))
        matmul = torch._int_mm if dtype == "int8" else torch.mm
        layer_flops = sum(2 * tokens * a * b for a, b in shape.linear_shapes())

        def one_layer() -> None:
            for a, b in operands:
                matmul(a, b)

        best = best_rate(one_layer, layer_flops, min_seconds)
        logger.info("%s matmul at %d tokens, %d threads: %.1f GFLOP/s", dtype, tokens, threads, best / 1e9)
        return best
    finally:
        torch.set_num_threads(previous_threads)


def int8_kernels(fast_bf16: bool) -> dict[str, Callable[[ModelShape, int, int], float]]:
    """The int8 GEMMs the floor's rate is the best of, by name: each takes (shape, tokens, threads)
    and returns OP/s at one decoder layer's matmuls. The bf16-output kernel only where the CPU computes
    bf16 fast (runtime/_cpu.py: CpuFeatures.fast_bf16); elsewhere bf16 is emulated."""
    kernels: dict[str, Callable[[ModelShape, int, int], float]] = {
        "torch._int_mm": lambda shape, tokens, threads: matmul_throughput(shape, tokens, "int8", threads),
        "onnxruntime MatMulInteger": onnxruntime_int8_throughput,
        "oneDNN qlinear -> fp32": partial(onednn_int8_throughput, out="fp32"),
    }
    if fast_bf16:
        kernels["oneDNN qlinear -> bf16"] = partial(onednn_int8_throughput, out="bf16")
    return kernels
