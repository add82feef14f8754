"""Would splitting the torch backend's prefix attention in two pay on a CPU? One layer, timed.

    .venv/bin/python bench/split_attention.py                 # bf16, W's sizes: 16 documents x 140 tokens, prefix 125
    .venv/bin/python bench/split_attention.py --dtype fp32

With a reused prefix, each document's T queries attend to P prefix keys and, causally, to their own
T keys. The torch backend concatenates the prefix K/V into every row and runs SDPA under an explicit
(T, P + T) mask (runtime/_torch.py: _decoder_pass). The alternative is two attentions, the prefix one
without a mask (the prefix K/V broadcast, never copied) and a causal one over the T new keys, merged
by their log-sum-exps, which torch's CPU flash kernel returns through the private
`aten::_scaled_dot_product_flash_attention_for_cpu`. This script times, best of 20 after 3 warm-ups:

    masked (today)     concat + SDPA over P + T keys with the mask
    split              both attentions and the merge (the merge compiled by torch.compile)
    split, kernels     the two flash calls alone, no merge
    causal T x T       the flash kernel on the new keys, causal
    full T x T         the same, not causal: what causality saves at this size

and the largest difference between the masked and the split outputs.
"""

from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=140)
    parser.add_argument("--prefix", type=int, default=125)
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    batch, seq, past, heads, kv_heads, d = args.docs, args.tokens, args.prefix, 16, 8, 128  # Qwen3-0.6B
    torch.manual_seed(0)
    q = torch.randn(batch, seq, heads, d, dtype=dtype).transpose(1, 2)  # the layouts the backend has
    k, v = (torch.randn(batch, seq, kv_heads, d, dtype=dtype).transpose(1, 2) for _ in range(2))
    prefix_k, prefix_v = (torch.randn(1, kv_heads, past, d, dtype=dtype) for _ in range(2))
    mask = torch.ones(seq, past + seq, dtype=torch.bool).tril(past)
    scale = d**-0.5

    def masked():
        keys = torch.cat((prefix_k.expand(batch, -1, -1, -1), k), dim=2)
        values = torch.cat((prefix_v.expand(batch, -1, -1, -1), v), dim=2)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)

    def merge(out_prefix, lse_prefix, out_own, lse_own):
        lse = torch.logaddexp(lse_prefix, lse_own)
        merged = out_prefix.float() * (lse_prefix - lse).exp()[..., None] + out_own.float() * (lse_own - lse).exp()[..., None]
        return merged.to(out_prefix.dtype)

    merge_fused = torch.compile(merge, dynamic=True)

    def kernels():
        out_prefix, lse_prefix = flash(q, prefix_k.expand(batch, -1, -1, -1), prefix_v.expand(batch, -1, -1, -1), 0.0, False, scale=scale)
        out_own, lse_own = flash(q, k, v, 0.0, True, scale=scale)
        return out_prefix, lse_prefix, out_own, lse_own

    def split():
        return merge_fused(*kernels())

    cases = [
        ("masked (today)", masked),
        ("split", split),
        ("split, kernels", kernels),
        ("causal T x T", lambda: flash(q, k, v, 0.0, True, scale=scale)),
        ("full T x T", lambda: flash(q, k, v, 0.0, False, scale=scale)),
    ]
    print(f"{args.dtype}, {batch} documents x {seq} tokens after a {past}-token prefix, {torch.get_num_threads()} threads; "
          f"max |masked - split| = {(masked().float() - split().float()).abs().max():.2e}")
    for name, fn in cases:
        for _ in range(3):
            fn()
        times = []
        for _ in range(20):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        print(f"{name:<16} {min(times) * 1e3:7.2f} ms / layer", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
