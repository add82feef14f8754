"""Two torch levers tried on workload W and not kept: each decoder layer compiled whole, and int8 linears.

    .venv/bin/python bench/torch_layers.py                    # make bench's random-weight Qwen3-0.6B
    .venv/bin/python bench/torch_layers.py --model artifacts/student --precision-check artifacts/work/pairs.jsonl

Three settings of `load(model, precision="bf16")`, one after another in this process, each timed on W
(one query x 32 documents as `make bench` builds it, a new query each time, prefix reuse on):
- `chains`: the backend as shipped, its RMSNorms, rotary embedding and SiLU gate each one compiled
  kernel (runtime/_torch.py: FusedKernels) between eager matmuls and attention;
- `whole`: the same decoder layer compiled whole by torch.compile (one graph the 28 layers share,
  inductor fusing everything between the matmuls and SDPA);
- `whole-int8`: that, with every linear layer on oneDNN's quantized linear (int8 weights per output
  channel, activations quantized per call to uint8 with one scale per tensor, bf16 written):
  the int8 GEMM that sets the int8 floor's rate (bench/flops.py: onednn_int8_throughput).
Prints each call's time: the first includes what torch.compile does for the shapes it has not seen
in this process (from inductor's disk cache where it holds them). --precision-check scores the first
400 held-out pairs of a JSONL in fp32 and in each setting and prints max / mean |dp| against fp32
(run it on a learned student: random weights give flat distributions).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np


def compile_whole_layers() -> None:
    """Make the torch backend run each layer (runtime/_torch.py: _decoder_layer) as one compiled graph
    (until the process ends). The graph fuses its elementwise steps itself, so it is compiled over
    the eager steps: the FusedKernels the backend passes in are not used."""
    import torch

    from answerfirst.runtime import _torch

    whole = torch.compile(_torch._decoder_layer, dynamic=True)
    _torch._decoder_layer = lambda *args: whole(*args[:-1], None)  # the last argument: `fused`


PACKED: list[Any] = []  # oneDNN-packed int8 weights; the compiled graph passes an index (a tensor) to them


def int8_linears(model: Any) -> None:
    """Replace every decoder linear layer of `model` by oneDNN's quantized linear (see the docstring)."""
    import torch

    # the schema spelled out: this module's annotations are strings (from __future__ import annotations)
    @torch.library.custom_op("answerfirst_bench::qlinear", mutates_args=(), schema=(
        "(Tensor q, Tensor scale, Tensor zero, Tensor channel_scales, Tensor channel_zeros, Tensor index) -> Tensor"))
    def qlinear(q, scale, zero, channel_scales, channel_zeros, index):
        return torch.ops.onednn.qlinear_pointwise.tensor(q, scale, zero, PACKED[int(index)], channel_scales, channel_zeros,
                                                         None, 1.0, 0, torch.bfloat16, "none", [], "")

    @qlinear.register_fake
    def _(q, scale, zero, channel_scales, channel_zeros, index):
        return q.new_empty((q.shape[0], channel_scales.shape[0]), dtype=torch.bfloat16)

    class Int8Linear(torch.nn.Module):
        def __init__(self, linear: Any):
            super().__init__()
            weight = linear.weight.detach().float()
            scales = weight.abs().amax(1).clamp(min=1e-8) / 127
            PACKED.append(torch.ops.onednn.qlinear_prepack(torch.round(weight / scales[:, None]).clamp(-128, 127).to(torch.int8), None))
            self.register_buffer("index", torch.tensor(len(PACKED) - 1))
            self.register_buffer("scales", scales)
            self.register_buffer("zeros", torch.zeros(len(scales), dtype=torch.int64))
            self.out_features = linear.out_features

        def forward(self, x):
            rows = x.reshape(-1, x.shape[-1])
            low, high = rows.aminmax()
            low, high = low.float().clamp(max=0), high.float().clamp(min=0)
            scale = ((high - low) / 255).clamp(min=1e-8)
            zero = torch.round(-low / scale).to(torch.int64)
            q = (torch.round(rows.float() / scale) + zero).clamp(0, 255).to(torch.uint8)
            return qlinear(q, scale, zero, self.scales, self.zeros, self.index).view(*x.shape[:-1], self.out_features)

    for layer in model.model.layers:
        for block in (layer.self_attn, layer.mlp):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
                if hasattr(block, name):
                    setattr(block, name, Int8Linear(getattr(block, name)))


def held_out(path: str, n: int = 400) -> dict[str, list[str]]:
    from answerfirst.distill.label import read_pairs

    rows = [r for r in read_pairs(path)[0] if r.get("split") == "heldout"][:n]
    by_query: dict[str, list[str]] = {}
    for row in rows:
        by_query.setdefault(row["query"], []).append(row["doc"])
    return by_query


def probabilities(scorer, by_query: dict[str, list[str]]) -> np.ndarray:
    return np.concatenate([np.array([s.probs for s in scorer.score(q, docs)]) for q, docs in by_query.items()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="artifacts/bench/qwen3-0.6b-random", help="a torch checkpoint")
    parser.add_argument("--rounds", type=int, default=4, help="W calls per setting (the first compiles)")
    parser.add_argument("--precision-check", default=None, metavar="PAIRS", help="JSONL of pairs with a split field")
    args = parser.parse_args(argv)

    import answerfirst
    from answerfirst.bench.workload import workload_w

    scorer = answerfirst.load(args.model, precision="bf16")
    workload = workload_w(scorer.prompts)
    pairs = held_out(args.precision_check) if args.precision_check else None
    reference = probabilities(answerfirst.load(args.model, precision="fp32"), pairs) if pairs else None
    for setting in ("chains", "whole", "whole-int8"):
        if setting == "whole":
            compile_whole_layers()
        elif setting == "whole-int8":
            int8_linears(scorer.backend.model)
        seconds = []
        for _ in range(args.rounds):
            scorer.backend.forget_prefixes()
            start = time.perf_counter()
            scorer.score(workload.query, workload.docs)
            seconds.append(time.perf_counter() - start)
        line = f"{setting}: W in {', '.join(f'{s:.2f}' for s in seconds)} s (best {min(seconds):.2f} s)"
        if pairs:
            dp = np.abs(probabilities(scorer, pairs) - reference).max(axis=1)
            line += f"; vs fp32 on {len(dp)} held-out pairs max |dp| {dp.max():.3f}, mean {dp.mean():.4f}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
