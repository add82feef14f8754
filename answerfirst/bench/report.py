"""Benchmark results -> bench.json, bench.md (table + targets) and PNG plots.

    write_report(results, out_dir) -> {"json": ..., "markdown": ..., "throughput_png": ..., "curves_png": ...}

`results` is what runner.run_benchmark returns; every contender entry carries `speedup_vs_naive`
and `speedup_vs_keep1`. The targets section reads only these numbers, so it says the same thing the
JSON does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from answerfirst.bench.flops import ModelShape, prefix_reuse_ceiling

GB = 1e9
# Targets on workload W (issue 16): against both user baselines, the int8 compute floor, memory, and
# prefix reuse against what the FLOPs of W allow.
TARGET_SPEEDUP = {"speedup_vs_naive": (10.0, "naive"), "speedup_vs_keep1": (7.0, "naive-keep1")}
TARGET_PREFIX_SHARE = 0.9  # of prefix_reuse_ceiling
TARGET_FLOOR_RATIO = {"int8/Q8": 1.5, "Q4_K_M": 2.0}
TARGET_RSS = {"int8": 1.2 * GB, "q8_0": 1.2 * GB, "q4_k_m": 0.8 * GB}


def is_peer(contender: dict[str, Any]) -> bool:
    """A peer (naive, naive-keep1, llamacpp-rank) rather than one of ours; older results lack the flag."""
    return contender.get("peer", contender["name"] == "naive")


def write_report(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "bench.json",
        "markdown": out / "bench.md",
        "throughput_png": out / "throughput.png",
        "curves_png": out / "curves.png",
    }
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, paths["json"])
    paths["markdown"].write_text(markdown(results, plots=(paths["throughput_png"].name, paths["curves_png"].name)))
    plot_throughput(results, paths["throughput_png"])
    plot_curves(results, paths["curves_png"])
    return paths


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".2f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def markdown(results: dict[str, Any], plots: tuple[str, ...] = ()) -> str:
    machine, workload, floor = results["machine"], results["workload"], results["floor"]
    lines = [
        f"## Latency benchmark ({results['created_utc']})",
        "",
        f"Command: `{results['command']}` · machine: {machine['nproc']} cores, {machine['cpu_model']}, "
        f"{machine['memory_gib']} GiB, flags {' '.join(machine.get('cpu_flags', [])) or 'not recorded'} · load average before/after: "
        f"{machine['loadavg_before'][0]:.2f} / {machine['loadavg_after'][0]:.2f} · run took {results['wall_seconds'] / 60:.1f} min",
        "",
        f"Model: {results['model']['num_hidden_layers']} layers, hidden {results['model']['hidden_size']}, "
        f"vocabulary {results['model']['vocab_size']} ({results['model']['path']}). "
        f"Workload {workload['name']}: 1 query × {workload['documents']} documents of "
        f"{workload['doc_tokens_min']}–{workload['doc_tokens_max']} tokens (mean {workload['doc_tokens_mean']:.0f}); "
        f"prefix {workload['prefix_tokens']} tokens, suffix {workload['suffix_tokens']}; "
        f"{workload['tokens_per_query_with_prefix_reuse']} tokens per query with prefix reuse, "
        f"{workload['tokens_per_query_without']} without.",
        "",
        "| contender | precision | pairs/s | p50 s/query | p95 s/query | ms/doc | × naive | × naive-keep1 | "
        "prefix reuse gain | peak RSS MB | × floor | agreement | Spearman |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in results["contenders"]:
        if c["status"] != "ok":
            lines.append(f"| {c['name']} | {c['precision']} | {c['status']}: {c['reason'][:120]} ||||||||||")
            continue
        quality = c["quality"]
        lines.append(
            f"| {c['name']} | {c['precision']} | {_fmt(c['pairs_per_s'])} | {_fmt(c['p50_s'])} | {_fmt(c['p95_s'])} | "
            f"{_fmt(c['ms_per_doc'], '.0f')} | {_fmt(c['speedup_vs_naive'], '.1f', '×')} | "
            f"{_fmt(c.get('speedup_vs_keep1'), '.1f', '×')} | "
            f"{_fmt(c['prefix_reuse_speedup'], '.2f', '×')} | {_fmt(c['peak_rss_bytes'] and c['peak_rss_bytes'] / 2**20, '.0f')} | "
            f"{_fmt(c['floor']['ratio'], '.1f', '×')} | {_fmt(quality.get('agreement'), '.2f')} | {_fmt(quality.get('spearman'), '.3f')} |"
        )
    repeats = sorted({m["repeats"] for c in results["contenders"] for m in c["modes"].values()})
    lines += [
        "",
        f"pairs/s, p50/p95 and ms/doc: with prefix reuse (the peers naive, naive-keep1 and llamacpp-rank: none), "
        f"from {'/'.join(map(str, repeats))} timed "
        "queries per mode after a warm-up, contenders interleaved, each in its own process. "
        "× floor: p50 over the compute floor of W "
        f"({floor['useful_gflop']:.3g} useful GFLOP; the best of {len(floor.get('measurements', [])) or 1} "
        f"rate measurements: {floor['fp32_gflops']:.3g} GFLOP/s fp32 -> "
        f"{floor['seconds']['fp32']:.2f} s, {floor['int8_gops']:.3g} GOP/s int8 ({int8_kernels_line(floor)}) -> "
        f"{floor['seconds']['int8']:.2f} s; bf16 {floor.get('bf16_gflops') or 0:.3g} GFLOP/s"
        + (f" -> {floor['seconds']['bf16']:.2f} s" if "bf16" in floor["seconds"] else " for the record")
        + "; F16 is held to the fp32 floor, bf16 to the bf16 one, int8/Q8_0/Q4_K_M to the int8 one). Agreement / Spearman: grade argmax and "
        "expected grade vs torch fp32 on the same pairs.",
        "",
        "### Targets",
        "",
        *[f"- {line}" for line in targets(results)],
    ]
    curves = results.get("curves", {})
    if curves.get("backend"):
        lines += ["", f"Curves ({curves['backend']}, prefix reuse on):", ""]
        for key, label in (("length", "length"), ("docs", "documents"), ("threads", "threads")):
            points = ", ".join(f"{p[label]}: {p['ms_per_doc']:.0f}" for p in curves.get(key, []))
            lines.append(f"- ms/doc vs {label}: {points or '–'}")
        if curves.get("skipped"):
            lines.append(f"- skipped (time budget or limits): {', '.join(curves['skipped'])}")
    lines += ["", *[f"![{Path(p).stem}]({p})" for p in plots], ""]
    return "\n".join(lines)


def int8_kernels_line(floor: dict[str, Any]) -> str:
    """Which int8 GEMMs the floor's rate is the best of, fastest named with its rate, from the rate
    measurements the results recorded (a JSON from before they were recorded names the two of then)."""
    best: dict[str, float] = {}
    for measurement in floor.get("measurements", []):
        for name, rate in measurement.get("int8_kernels_gops", {}).items():
            best[name] = max(best.get(name, 0.0), rate)
    if not best:
        return "the faster of torch._int_mm and onnxruntime's MatMulInteger"
    ranked = sorted(best, key=best.get, reverse=True)
    others = ", ".join(f"{name} {best[name]:.3g}" for name in ranked[1:])
    return f"{ranked[0]}, the fastest of the int8 GEMMs measured; the others' GOP/s: {others}" if others else ranked[0]


def targets(results: dict[str, Any]) -> list[str]:
    """One line per target: met or missed, and by how much."""
    ok = [c for c in results["contenders"] if c["status"] == "ok" and not is_peer(c)]
    verdict = lambda met: "**met**" if met else "**missed**"  # noqa: E731
    lines = []
    for key, (target, baseline) in TARGET_SPEEDUP.items():
        rated = [c for c in ok if c.get(key) is not None]
        if rated:
            best = max(rated, key=lambda c: c[key])
            s = best[key]
            lines.append(f"best backend ≥ {target:.0f}× {baseline} pairs/s: {best['name']} {s:.1f}× — {verdict(s >= target)}"
                         + ("" if s >= target else f" (short by {target / s:.2f}×)"))
    gains = [c for c in ok if c["prefix_reuse_speedup"] is not None]
    if gains:
        w = results["workload"]
        ceiling = prefix_reuse_ceiling(ModelShape.from_config(results["model"]), w["prefix_tokens"],
                                       [n + w["suffix_tokens"] for n in w["doc_tokens"]])
        per = ", ".join(f"{c['name']} {c['prefix_reuse_speedup']:.2f}×" for c in gains)
        worst = min(gains, key=lambda c: c["prefix_reuse_speedup"])
        share = worst["prefix_reuse_speedup"] / ceiling
        lines.append(f"prefix reuse ≥ {TARGET_PREFIX_SHARE:.0%} of the {ceiling:.2f}× the FLOPs of this workload allow: {per} "
                     f"— {verdict(share >= TARGET_PREFIX_SHARE)} (lowest, {worst['name']}, at {share:.0%})")
    for label, precisions in (("int8/Q8", ("int8", "q8_0")), ("Q4_K_M", ("q4_k_m",))):
        target = TARGET_FLOOR_RATIO[label]
        quantized = [c for c in ok if c["precision"] in precisions and c["floor"]["ratio"] is not None]
        if quantized:
            best = min(quantized, key=lambda c: c["floor"]["ratio"])
            r = best["floor"]["ratio"]
            lines.append(f"best {label} within {target}× of the int8 compute floor: {best['name']} {r:.2f}× — "
                         f"{verdict(r <= target)}" + ("" if r <= target else f" ({r / target:.2f}× over)"))
    for c in ok:
        limit = TARGET_RSS.get(c["precision"])
        if limit is not None and c["peak_rss_bytes"] is not None:
            rss = c["peak_rss_bytes"]
            lines.append(f"peak RSS {c['name']} ≤ {limit / GB:.1f} GB: {rss / GB:.2f} GB — {verdict(rss <= limit)}"
                         + ("" if rss <= limit else f" ({(rss - limit) / 2**20:.0f} MiB over)"))
    missing = [c["name"] for c in results["contenders"] if c["status"] != "ok"]
    if missing:
        lines.append(f"not measured: {', '.join(missing)} (see the table for why)")
    return lines


# ------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------


def _pyplot():
    from answerfirst.extras import requires

    with requires("bench", "the benchmark plots"):
        import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_throughput(results: dict[str, Any], path: Path) -> None:
    """Bars: pairs/s of every contender, with and without prefix reuse (peers: without only),
    annotated with × naive / × naive-keep1."""
    plt = _pyplot()
    ok = [c for c in results["contenders"] if c["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(ok) + 2), 4.5))
    names = [c["name"] for c in ok]
    reuse = [c["modes"].get("reuse", {}).get("pairs_per_s", 0) if not is_peer(c) else 0 for c in ok]
    no_reuse = [c["modes"].get("noreuse", {}).get("pairs_per_s", 0) for c in ok]
    x = range(len(ok))
    off = ax.bar([i - 0.2 for i in x], no_reuse, width=0.4, label="prefix reuse off", color="#b0b0b0")
    on = ax.bar([i + 0.2 for i in x], reuse, width=0.4, label="prefix reuse on", color="#2a7ab9")
    for i, c in enumerate(ok):
        if c["name"] == "naive" or c["speedup_vs_naive"] is None:
            continue
        bar = off[i] if is_peer(c) else on[i]  # the bar of the row's own numbers
        label = f"{c['speedup_vs_naive']:.1f}×" + (f"\n{c['speedup_vs_keep1']:.1f}×" if c.get("speedup_vs_keep1") else "")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylabel("pairs / s (higher is better)")
    w = results["workload"]
    ax.set_title(f"Workload {w['name']}: 1 query × {w['documents']} docs, {results['machine']['nproc']} cores "
                 "(labels: × naive, × naive-keep1)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """ms per document vs document length, vs documents per query, vs threads."""
    plt = _pyplot()
    curves = results.get("curves", {})
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, (key, label, xlabel) in zip(axes, (("length", "length", "document tokens"),
                                               ("docs", "documents", "documents per query"),
                                               ("threads", "threads", "threads")), strict=True):
        points = curves.get(key) or []
        if points:
            ax.plot([p[label] for p in points], [p["ms_per_doc"] for p in points], marker="o", color="#2a7ab9")
            if key != "threads":
                ax.set_xscale("log", base=2)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms per document")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{curves.get('backend', 'no backend')}: ms per document (prefix reuse on)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
