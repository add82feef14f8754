"""Where the max |Δp| parity thresholds come from: healthy vs broken exports of a LEARNED student.

    .venv/bin/python bench/parity_thresholds.py --model artifacts/student --work /tmp/parity-thresholds

Exports the student (ONNX fp32 + int8 per-channel and per-tensor, OpenVINO int8 weights, GGUF F16 /
Q8_0 / Q4_K_M through the logits and through the rank head) and the
same exports of broken copies of it, then scores every variant on the student's probe pairs and
compares it with the HEALTHY student in torch fp32 (what parity does at export). Broken copies are
what a faulty converter or quantizer leaves:

    zeroed-mlp     one layer's MLP down projection is all zeros (a tensor lost in conversion)
    permuted-rows  layer 0's attention output rows are shuffled (a block-layout bug)
    scales-x2      every layer's q/k/v/o weights are doubled (a scale applied twice)
    no-scales      every linear weight rounded to 2 bits per tensor (a quantizer that lost its block scales)

Prints one Markdown row per (checkpoint, variant): max |Δp|, agreement, Spearman, and whether the
shipped thresholds pass it. A threshold is right when every healthy row passes and every broken one
fails. Nothing here is used at run time.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

BROKEN = ("zeroed-mlp", "permuted-rows", "scales-x2", "no-scales")


def break_checkpoint(source: Path, out: Path, how: str) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out, dirs_exist_ok=True)
    (out / "answerfirst.json").unlink(missing_ok=True)  # its recorded sha256 would not match any more
    weights = load_file(out / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    for name, tensor in weights.items():
        if how == "zeroed-mlp" and name == "model.layers.1.mlp.down_proj.weight":
            tensor.zero_()
        elif how == "permuted-rows" and name == "model.layers.0.self_attn.o_proj.weight":
            tensor.copy_(tensor[torch.randperm(tensor.shape[0], generator=generator)])
        elif how == "scales-x2" and any(f"self_attn.{p}_proj" in name for p in "qkvo"):
            tensor.mul_(2.0)
        elif how == "no-scales" and tensor.dim() == 2 and "embed" not in name:
            step = tensor.abs().max() / 1.5  # 4 levels: -1.5, -0.5, 0.5, 1.5 steps
            tensor.copy_((torch.floor(tensor / step) + 0.5).clamp(-1.5, 1.5) * step)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a learned student checkpoint (with its probe pairs)")
    parser.add_argument("--work", required=True, help="scratch directory for the exports")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quants", default="f16,q8_0,q4_k_m")
    args = parser.parse_args()

    import answerfirst
    from answerfirst.artifact import Manifest
    from answerfirst.export.gguf import QUANTS, export_gguf
    from answerfirst.export.onnx import FP32_THRESHOLDS, INT8_THRESHOLDS, export_onnx
    from answerfirst.export.openvino import INT8_THRESHOLDS as OPENVINO_THRESHOLDS
    from answerfirst.export.openvino import export_openvino
    from answerfirst.export.parity import measure, probe_pairs, summary
    from answerfirst.runtime.api import ScorerConfig

    model, work = Path(args.model), Path(args.work)
    pairs = probe_pairs(Manifest.read(model))
    reference = answerfirst.load(model, threads=args.threads).score_pairs(pairs)
    thresholds = ({"fp32": FP32_THRESHOLDS, "int8": INT8_THRESHOLDS} | {q: QUANTS[q].thresholds for q in QUANTS}
                  | {q + "-rank": QUANTS[q].rank_thresholds for q in QUANTS})
    exact_kv = ScorerConfig(kv_cache_type="f32", flash_attn=False, n_ctx=4096, batch_size=4)
    rows = []
    for name in ("healthy", *BROKEN):
        checkpoint = model if name == "healthy" else break_checkpoint(model, work / name / "checkpoint", name)
        onnx_dir, gguf_dir = work / name / "onnx", work / name / "gguf"
        for scheme in ("per-channel", "per-tensor"):
            export_onnx(checkpoint, onnx_dir, int8_scheme=scheme, probe_pairs=pairs, threads=args.threads, force=True)
            scorer = answerfirst.load(onnx_dir, variant="int8", threads=args.threads)
            rows.append((name, f"onnx int8 {scheme}", measure(reference, lambda s=scorer: s.score_pairs(pairs), INT8_THRESHOLDS)))
        scorer = answerfirst.load(onnx_dir, variant="fp32", threads=args.threads)
        rows.append((name, "onnx fp32", measure(reference, lambda s=scorer: s.score_pairs(pairs), FP32_THRESHOLDS)))
        openvino_dir = work / name / "openvino"
        export_openvino(checkpoint, openvino_dir, probe_pairs=pairs, threads=args.threads)
        scorer = answerfirst.load(openvino_dir, threads=args.threads)
        precision = scorer.backend.session.precision
        rows.append((name, f"openvino int8 ({precision})", measure(reference, lambda s=scorer: s.score_pairs(pairs), OPENVINO_THRESHOLDS)))
        export_gguf(checkpoint, gguf_dir, args.quants, probe_pairs=pairs, threads=args.threads, force=True)
        manifest = Manifest.read(gguf_dir)
        for variant in manifest.variants:
            scorer = answerfirst.load(gguf_dir, variant=variant.name, threads=args.threads, config=exact_kv)
            report = measure(reference, lambda s=scorer: s.score_pairs(pairs), thresholds[variant.name])
            types = manifest.info["export"]["tensor_types"][variant.name.removesuffix("-rank")]
            rows.append((name, f"gguf {variant.name} {types}", report))
            scorer.close()
    print(f"\n{len(pairs)} probe pairs of {model}; reference: the healthy student, torch fp32\n")
    print("| checkpoint | variant | max abs dp | agreement / spearman | passes its thresholds |")
    print("|---|---|---:|---|---|")
    for name, variant, report in rows:
        numbers = summary(report)
        dp = numbers.split()[0].split("=")[1]
        rest = " / ".join(part.split("=")[1] for part in numbers.split()[1:])
        verdict = "yes" if report["passed"] else "no: " + "; ".join(report["failures"])[:90]
        print(f"| {name} | {variant} | {dp} | {rest} | {verdict} |")
    (work / "rows.json").write_text(json.dumps([[n, v, r] for n, v, r in rows], indent=1))
    spread = np.ptp([s.expected for s in reference])
    print(f"\nreference expected grades span {spread:.3f}; rows in {work / 'rows.json'}")


if __name__ == "__main__":
    main()
