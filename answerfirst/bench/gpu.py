"""`answerfirst bench --device cuda`: the torch scorer on one device, against a careful transformers user.

    config -> model (random Qwen3-0.6B with the Qwen vocabulary; cached) -> workload W (1 query x 512
           documents of 64-192 tokens) -> the device's matmul peak -> contenders, loaded once each in
           this process -> warm-up -> interleaved repeats -> quality against fp32 on the same device
           -> one profiled call of the default -> OUT/{bench-gpu.json, bench-gpu.md, profile-gpu.txt}

Contenders:
  careful-b64, careful-b256   what a careful transformers user writes: bf16 on a GPU, left-padded
                              batches of 64 / 256 whole prompts, `logits_to_keep=1`, the grade columns
  default                     answerfirst.load(path, device=...), nothing tuned
  noreuse                     the same Scorer, prefix reuse off
  transformers-forward        the same budget through transformers' forward with a DynamicCache
                              (what scored before the adapter's own shared-prefix pass)
  tokens-N                    the same backend with ScorerConfig(batch_tokens=N), for each N of `budgets`
  8bit, 4bit                  load(..., quantization=...) through bitsandbytes

docs/s is W's documents over the median wall time of a score() call (tokenization included, a new
prefix each call). MFU is the useful FLOPs of W (bench/flops.py: the decoder over each document and
the suffix, attending to the prefix, and the K grade rows; the prefix once) over that time, over the
device's peak: the best of a few large matmuls in the model's dtype (bf16 on a GPU, as load() uses),
measured in the same run, like the CPU benchmark's floor. Every contender in one process, one at a
time on the device: a GPU's memory is shared, and each contender's peak is read from torch's allocator.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from answerfirst.bench.flops import ModelShape, useful_flops
from answerfirst.bench.workload import Workload, workload_w

logger = logging.getLogger(__name__)

CONTENDERS = ("careful-b64", "careful-b256", "default", "noreuse", "transformers-forward", "tokens", "8bit", "4bit")
REFERENCE = "fp32"  # quality reference: the adapter in float32 on the same device
# Targets of issue 20 on W, on an H100/H200-class GPU.
TARGET_DOCS_PER_S = 2000.0
TARGET_VS_CAREFUL = 4.5


@dataclass
class DeviceBenchConfig:
    """What `answerfirst bench --device DEVICE` runs.

    model: a torch checkpoint; None = a random Qwen3-0.6B with the Qwen vocabulary (built once, cached
        under cache_dir). num_layers: a shallower random model (tests).
    budgets: the ScorerConfig.batch_tokens values the `tokens` contender sweeps.
    reference_docs: documents of W scored by the fp32 reference for the quality columns.
    budget_s: wall-clock budget of the warm-up and timed calls (building and loading the models come
        on top); each contender is timed at least once, its further repeats stop (and the results say
        so) when the budget is spent.
    """

    device: str = "cuda"
    model: str | None = None
    num_layers: int | None = None
    out_dir: str = "bench/results/gpu"
    cache_dir: str = "artifacts/bench"
    contenders: tuple[str, ...] = CONTENDERS
    docs: int = 512
    doc_tokens: tuple[int, int] = (64, 192)
    repeats: int = 4
    budgets: tuple[int, ...] = (8192, 16384, 32768, 131072, 262144)
    reference_docs: int = 128
    peak_size: int | None = None  # n of the n x n x n matmuls the peak is measured on; None: 8192 on a GPU, 1024 on a CPU
    profile: bool = True
    budget_s: float = 4 * 60
    seed: int = 0

    def __post_init__(self) -> None:
        self.contenders = tuple(self.contenders)
        self.budgets = tuple(self.budgets)
        unknown = [c for c in self.contenders if c not in CONTENDERS]
        if unknown:
            raise ValueError(f"contenders: unknown {unknown}; choose from {', '.join(CONTENDERS)}")
        if self.peak_size is None:
            self.peak_size = 8192 if self.device.startswith("cuda") else 1024
        for name in ("docs", "repeats", "reference_docs", "peak_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if not self.device.startswith(("cuda", "cpu")):
            raise ValueError(f"device: a torch device, cuda, cuda:N or cpu; got {self.device!r}")
        if any(b < 1 for b in self.budgets):
            raise ValueError(f"budgets: every batch_tokens must be >= 1, got {self.budgets}")
        if self.budget_s <= 0:
            raise ValueError(f"budget_s: must be positive, got {self.budget_s}")


# ------------------------------------------------------------------------------------------------
# The careful transformers user
# ------------------------------------------------------------------------------------------------


class CarefulUser:
    """The reranker a careful transformers user writes for a GPU: the model in bf16 (fp32 on a CPU),
    left-padded batches of whole prompts in the order given, a forward that computes logits at the
    last position only (`logits_to_keep=1`), then the grade columns. The prompts come from
    PromptTokenizer, so every contender scores the same token sequences."""

    def __init__(self, model: Any, prompts: Any, device: Any, batch_size: int):
        self.model, self.prompts, self.device, self.batch_size = model, prompts, device, batch_size

    def score(self, query: str, docs: Sequence[str]) -> list[Any]:
        import torch

        from answerfirst.afrl import scores_from_logits

        prompts = self.prompts.prompts(query, docs)
        grade_ids = list(self.prompts.grade_ids)
        grade_logits = []
        with torch.inference_mode():
            for start in range(0, len(prompts), self.batch_size):
                batch = [p.input_ids for p in prompts[start : start + self.batch_size]]
                width = max(len(ids) for ids in batch)
                input_ids = torch.tensor([[self.prompts.pad_id] * (width - len(ids)) + ids for ids in batch], device=self.device)
                attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=self.device)
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1).logits[:, -1]
                grade_logits.append(logits[:, grade_ids].float().cpu().numpy())  # (B, K)
        return scores_from_logits(np.concatenate(grade_logits), self.prompts.format.values, [p.truncated for p in prompts])

    def forget_prefixes(self) -> None:  # nothing cached between calls
        pass


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


@dataclass
class Entry:
    name: str
    precision: str
    status: str = "pending"  # ok | skipped | failed
    reason: str = ""
    batch: str = ""  # what bounds a pass
    load_seconds: float | None = None
    seconds: list[float] | None = None
    work_bytes: int | None = None  # GPU memory a call takes beyond what was allocated before it (weights of every model)
    probs: list[list[float]] | None = None
    expected: list[float] | None = None


def run_device_benchmark(config: DeviceBenchConfig, progress: Callable[[str], None] = logger.info) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import answerfirst
    from answerfirst.bench.runner import random_checkpoint
    from answerfirst.runtime._torch import TorchBackend

    started = time.perf_counter()
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {config.device}: torch sees no CUDA GPU")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    progress(f"device bench config: {json.dumps(asdict(config))}")
    checkpoint = Path(config.model) if config.model else random_checkpoint(Path(config.cache_dir), config.num_layers, progress)
    shape = ModelShape.from_config(json.loads((checkpoint / "config.json").read_text()))

    from answerfirst.artifact import Manifest, bind_format, has_manifest

    manifest = Manifest.read(checkpoint) if has_manifest(checkpoint) else None
    prompts = bind_format(AutoTokenizer.from_pretrained(checkpoint), manifest, str(checkpoint))
    workload = workload_w(prompts, config.docs, config.doc_tokens, config.seed)
    progress(f"workload W: {json.dumps({k: v for k, v in workload.describe().items() if k != 'doc_tokens'})}")
    flops = useful_flops(shape, workload.prefix_tokens, workload.continuation_lens, len(prompts.grade_ids))
    peak = matmul_peak(device, dtype, config.peak_size)
    progress(f"{_device_name(device)}: {dtype} matmul peak {peak / 1e12:.1f} TFLOP/s; W is {flops.total / 1e12:.2f} useful TFLOP")

    entries: dict[str, Entry] = {}
    runners: dict[str, Any] = {}
    precision = str(dtype).removeprefix("torch.")

    def add(name: str, precision: str, build: Callable[[], tuple[Any, str]]) -> None:
        """Build one contender (timing its load); one that cannot be built is recorded as failed."""
        started_load = time.perf_counter()
        try:
            runner, batch = build()
        except Exception as e:  # recorded, and the other contenders still run
            entries[name] = Entry(name, precision, status="failed", reason=f"{type(e).__name__}: {str(e)[:300]}")
            progress(f"{name}: FAILED to load: {entries[name].reason}")
            return
        entries[name] = Entry(name, precision, status="ok", batch=batch, load_seconds=time.perf_counter() - started_load)
        runners[name] = runner
        progress(f"{name}: ready in {entries[name].load_seconds:.1f} s, passes of {batch}")

    # The default first: a fresh process, nothing tuned.
    add("default", precision, lambda: (lambda s: (s, f"{s.config.batch_tokens} tokens (device default)"))(
        answerfirst.load(checkpoint, device=config.device)))
    default = runners.get("default")
    if default is not None:
        base = default.config
        if "noreuse" in config.contenders:
            add("noreuse", precision, lambda: (answerfirst.Scorer(default.backend, prompts, replace(base, reuse_prefix=False), manifest),
                                               f"{base.batch_tokens} tokens"))
        if "tokens" in config.contenders:
            for budget in config.budgets:
                add(f"tokens-{budget}", precision, lambda b=budget: (
                    answerfirst.Scorer(default.backend, prompts, replace(base, batch_tokens=b), manifest), f"{b} tokens"))
    # The careful user and transformers' forward share one more copy of the weights, loaded as the user would.
    plain: dict[str, Any] = {}

    def plain_model() -> Any:
        if "model" not in plain:
            plain["model"] = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
        return plain["model"]

    for size in (64, 256):
        if f"careful-b{size}" in config.contenders:
            add(f"careful-b{size}", precision, lambda n=size: (CarefulUser(plain_model(), prompts, device, n), f"{n} documents"))
    if "transformers-forward" in config.contenders:
        def transformers_forward() -> tuple[Any, str]:
            backend = TorchBackend(plain_model(), prompts.grade_ids, prompts.pad_id, device, decoder_pass=False)
            budget = default.config.batch_tokens if default is not None else backend.default_batch_tokens
            return answerfirst.Scorer(backend, prompts, answerfirst.ScorerConfig(batch_tokens=budget), manifest), f"{budget} tokens"

        add("transformers-forward", precision, transformers_forward)
    for quantization in ("8bit", "4bit"):
        if quantization in config.contenders:
            add(quantization, quantization, lambda q=quantization: (lambda s: (s, f"{s.config.batch_tokens} tokens (device default)"))(
                answerfirst.load(checkpoint, device=config.device, quantization=q)))
    if "default" not in config.contenders:
        entries.pop("default", None)
        runners.pop("default", None)

    _time_contenders(config, workload, entries, runners, device, progress)
    reference = _reference_scores(checkpoint, prompts, workload, config, device, TorchBackend, AutoModelForCausalLM)
    profile = _profile(default, workload, device) if config.profile and default is not None else None
    return _summarise(config, entries, workload, shape, flops, peak, reference, profile, device, dtype, started, checkpoint)


def _timed_load(load: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    loaded = load()
    return loaded, time.perf_counter() - started


def _time_contenders(config, workload: Workload, entries, runners, device, progress) -> None:
    """A warm-up call each (every pass shape W needs), then rounds of one timed call per contender,
    in an order rotated per round, until `repeats` or the time budget (counted from the warm-up on:
    building and loading the models come on top)."""
    import torch

    started = time.perf_counter()

    def call(name: str) -> list[Any] | None:
        runner = runners[name]
        getattr(runner, "backend", runner).forget_prefixes()  # every call is a new query: its prefix runs too
        try:
            return runner.score(workload.query, workload.docs)
        except Exception as e:  # recorded, and the other contenders still run
            entries[name].status, entries[name].reason = "failed", f"{type(e).__name__}: {str(e)[:300]}"
            progress(f"{name}: FAILED: {entries[name].reason}")
            return None

    for name in list(runners):
        call(name)  # warm-up
    names = [n for n in runners if entries[n].status == "ok"]
    progress(f"warm-up done; timing {len(names)} contenders x {config.repeats} calls of {len(workload.docs)} documents")
    for round_index in range(config.repeats):
        if round_index > 0 and time.perf_counter() - started > config.budget_s:
            progress(f"time budget spent: stopping at {round_index} timed calls per contender")
            break
        shift = round_index % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            entry = entries[name]
            if entry.status != "ok":
                continue
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            scores = call(name)
            seconds = time.perf_counter() - start  # scores are on the host: the device work is done
            if scores is None:
                continue
            entry.seconds = [*(entry.seconds or []), seconds]
            if device.type == "cuda":
                entry.work_bytes = max(entry.work_bytes or 0, torch.cuda.max_memory_allocated(device) - resident)
            if entry.probs is None:
                entry.probs = [list(s.probs) for s in scores]
                entry.expected = [s.expected for s in scores]
            progress(f"round {round_index + 1}/{config.repeats}  {name:<22} {seconds:7.3f} s  {len(workload.docs) / seconds:8.1f} docs/s")


def _reference_scores(checkpoint, prompts, workload, config, device, backend_class, model_class) -> dict[str, Any]:
    """The first reference_docs documents of W scored by the adapter over a float32 copy of the model."""
    import torch

    import answerfirst

    model = model_class.from_pretrained(checkpoint, dtype=torch.float32).to(device).eval()
    backend = backend_class(model, prompts.grade_ids, prompts.pad_id, device)
    docs = workload.docs[: config.reference_docs]
    scores = answerfirst.Scorer(backend, prompts, answerfirst.ScorerConfig(batch_tokens=16384), None).score(workload.query, docs)
    del backend, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"docs": len(docs), "probs": [list(s.probs) for s in scores], "expected": [s.expected for s in scores]}


def _profile(scorer, workload: Workload, device) -> dict[str, Any]:
    """One default call split into host work (tokenize + plan) and passes, then the same call under
    torch.profiler: the operators and kernels that take the time."""
    from torch.profiler import ProfilerActivity, profile

    scorer.backend.forget_prefixes()
    start = time.perf_counter()
    plan = scorer.plan(workload.query, workload.docs)
    plan_seconds = time.perf_counter() - start
    pass_seconds = []
    for forward_pass in plan.passes:
        start = time.perf_counter()
        scorer.run_pass(forward_pass)
        pass_seconds.append(time.perf_counter() - start)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    scorer.backend.forget_prefixes()
    with profile(activities=activities) as profiler:
        scorer.score(workload.query, workload.docs)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages().table(sort_by=sort, row_limit=25)
    return {
        "plan_seconds": plan_seconds,  # tokenize, check, sort, cut into passes
        "pass_seconds": pass_seconds,  # each pass, the first one running the prefix too
        "pass_documents": [len(p.rows) for p in plan.passes],
        "pass_tokens": [len(p.rows) * max(map(len, p.continuations)) for p in plan.passes],
        "table": table,
    }


def matmul_peak(device, dtype, size: int, repeats: int = 10) -> float:
    """FLOP/s of the best of three timings of `repeats` size^3 matmuls on random data, after a warm-up
    (random, not zeros: zeros ran 13% faster on an H200)."""
    import torch

    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    torch.mm(a, b)
    best = 0.0
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, repeats * 2 * size**3 / (time.perf_counter() - start))
    return best


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from answerfirst.bench.runner import machine_description

    return machine_description()["cpu_model"]


def _machine(device) -> dict[str, Any]:
    import torch

    from answerfirst.bench.runner import machine_description

    machine = machine_description()
    for package in ("bitsandbytes", "accelerate", "tokenizers", "answerfirst"):
        try:
            machine["versions"][package] = __import__(package).__version__
        except (ImportError, AttributeError):
            machine["versions"][package] = None
    machine["versions"]["cuda"] = torch.version.cuda
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        machine["gpu"] = {"name": properties.name, "memory_gib": round(properties.total_memory / 2**30, 1),
                          "multiprocessors": properties.multi_processor_count,
                          "capability": f"{properties.major}.{properties.minor}"}
        try:
            machine["gpu"]["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True,
                timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            machine["gpu"]["driver"] = None
    return machine


def _summarise(config, entries, workload, shape, flops, peak, reference, profile, device, dtype, started, checkpoint) -> dict[str, Any]:
    from answerfirst.metrics import agreement, spearman

    ref_probs = np.asarray(reference["probs"])
    rows = []
    family = lambda name: CONTENDERS.index(name.split("-")[0] if name.startswith("tokens-") else name)  # noqa: E731
    for entry in sorted(entries.values(), key=lambda e: family(e.name)):  # table order: CONTENDERS
        row: dict[str, Any] = {"name": entry.name, "precision": entry.precision, "status": entry.status,
                               "reason": entry.reason, "batch": entry.batch, "load_seconds": entry.load_seconds}
        if entry.seconds:
            median = float(np.median(entry.seconds))
            row.update(latencies_s=entry.seconds, repeats=len(entry.seconds), p50_s=median,
                       docs_per_s=len(workload.docs) / median, mfu=flops.total / median / peak,
                       call_gpu_bytes=entry.work_bytes)
            mine = np.asarray(entry.probs[: reference["docs"]])
            row["quality"] = {"vs": REFERENCE, "docs": reference["docs"], "max_abs_dp": float(np.abs(mine - ref_probs).max()),
                              "agreement": agreement(ref_probs.argmax(1), mine.argmax(1)),
                              "spearman": spearman(reference["expected"], entry.expected[: reference["docs"]])}
        rows.append(row)
    return {
        "schema": 1,
        "command": f"answerfirst bench --device {config.device}",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_seconds": time.perf_counter() - started,
        "machine": _machine(device),
        "config": asdict(config),
        "model": {"path": str(checkpoint), **asdict(shape), "dtype": str(dtype).removeprefix("torch."),
                  "linear_gflop_per_token": shape.linear_flops_per_token() / 1e9},
        "workload": workload.describe(),
        "peak": {"dtype": str(dtype).removeprefix("torch."), "flops_per_s": peak, "matmul": f"{config.peak_size}^3"},
        "useful": {"tflop": flops.total / 1e12, "linear_tflop": flops.linear / 1e12, "attention_tflop": flops.attention / 1e12,
                   "tokens": flops.tokens},
        "contenders": rows,
        "profile": profile,
    }


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def write_report(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "bench-gpu.json", "markdown": out / "bench-gpu.md"}
    profile = results.get("profile")
    if profile:
        paths["profile"] = out / "profile-gpu.txt"
        paths["profile"].write_text(profile["table"] + "\n")
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["markdown"].write_text(markdown(results))
    return paths


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    machine, workload, versions = results["machine"], results["workload"], results["machine"]["versions"]
    gpu = machine.get("gpu") or {}
    where = (f"{gpu['name']} ({gpu['memory_gib']} GiB, driver {gpu.get('driver') or '?'}), CUDA {versions.get('cuda')}"
             if gpu else f"{machine['nproc']} cores, {machine['cpu_model']}")
    lines = [
        f"## Device benchmark ({results['created_utc']})",
        "",
        f"Command: `{results['command']}` · {where} · host: {machine['nproc']} cores, {machine['cpu_model']} · "
        f"torch {versions.get('torch')}, transformers {versions.get('transformers')}, bitsandbytes {versions.get('bitsandbytes')}, "
        f"accelerate {versions.get('accelerate')}, Python {machine['python']} · run took {results['wall_seconds'] / 60:.1f} min",
        "",
        f"Model: {results['model']['num_hidden_layers']} layers, hidden {results['model']['hidden_size']}, vocabulary "
        f"{results['model']['vocab_size']}, {results['model']['dtype']}. Workload {workload['name']}: 1 query × "
        f"{workload['documents']} documents of {workload['doc_tokens_min']}–{workload['doc_tokens_max']} tokens "
        f"(mean {workload['doc_tokens_mean']:.0f}); prefix {workload['prefix_tokens']} tokens, suffix {workload['suffix_tokens']}; "
        f"{results['useful']['tflop']:.3g} useful TFLOP. Peak: {results['peak']['flops_per_s'] / 1e12:.3g} TFLOP/s "
        f"({results['peak']['dtype']} {results['peak']['matmul']} matmul, measured in this run).",
        "",
        "| contender | precision | batches of | docs/s | p50 s | MFU | GPU GiB a call | max abs dp | agreement | Spearman |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in results["contenders"]:
        if c["status"] != "ok" or not c.get("docs_per_s"):
            lines.append(f"| {c['name']} | {c['precision']} | {c['status']}: {c['reason'][:160]} |||||||")
            continue
        quality = c.get("quality", {})
        lines.append(
            f"| {c['name']} | {c['precision']} | {c['batch']} | {c['docs_per_s']:.0f} | {c['p50_s']:.3f} | "
            f"{100 * c['mfu']:.1f}% | {_fmt(c['call_gpu_bytes'] and c['call_gpu_bytes'] / 2**30, '.2f')} | "
            f"{_fmt(quality.get('max_abs_dp'), '.4f')} | {_fmt(quality.get('agreement'), '.3f')} | {_fmt(quality.get('spearman'), '.4f')} |"
        )
    repeats = sorted({c.get("repeats", 0) for c in results["contenders"] if c.get("repeats")})
    lines += [
        "",
        f"docs/s: W's documents over the median of {'/'.join(map(str, repeats)) or '0'} timed score() calls after a warm-up "
        "(tokenization included, the prefix run anew each call), contenders interleaved in one process. GPU GiB a call: the "
        "peak of torch's allocator during a call over what was allocated before it (the weights of every model loaded). MFU: the useful "
        "FLOPs of W over that time over the measured peak. Quality: against the same adapter in float32 on the same device, "
        f"on the first {results['contenders'] and next((c['quality']['docs'] for c in results['contenders'] if c.get('quality')), 0)} documents.",
        "",
        "### Targets",
        "",
        *[f"- {line}" for line in targets(results)],
    ]
    profile = results.get("profile")
    if profile:
        lines += [
            "",
            f"Profile of one default call: tokenize + plan {1000 * profile['plan_seconds']:.0f} ms, then "
            f"{len(profile['pass_seconds'])} passes of {', '.join(map(str, profile['pass_documents']))} documents "
            f"({', '.join(map(str, profile['pass_tokens']))} padded tokens): "
            f"{', '.join(f'{1000 * s:.0f}' for s in profile['pass_seconds'])} ms. Operators: profile-gpu.txt.",
        ]
    return "\n".join(lines) + "\n"


def targets(results: dict[str, Any]) -> list[str]:
    by_name = {c["name"]: c for c in results["contenders"] if c["status"] == "ok" and c.get("docs_per_s")}
    default, careful = by_name.get("default"), by_name.get("careful-b256")
    lines = []
    if default:
        rate = default["docs_per_s"]
        lines.append(f"default load ≥ {TARGET_DOCS_PER_S:.0f} docs/s on W: {rate:.0f} — "
                     + ("**met**" if rate >= TARGET_DOCS_PER_S else f"**missed** (short by {TARGET_DOCS_PER_S / rate:.2f}×)")
                     + f"; MFU {100 * default['mfu']:.1f}%")
        if careful:
            ratio = rate / careful["docs_per_s"]
            lines.append(f"default ≥ {TARGET_VS_CAREFUL}× the careful user at batch 256: {ratio:.2f}× — "
                         + ("**met**" if ratio >= TARGET_VS_CAREFUL else "**missed**"))
    return lines


# ------------------------------------------------------------------------------------------------
# CLI (dispatched by `answerfirst bench --device DEVICE`, see runner.add_arguments)
# ------------------------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace) -> DeviceBenchConfig:
    overrides: dict[str, Any] = {"device": args.device}
    for arg, name in (("model", "model"), ("cache", "cache_dir"), ("docs", "docs"), ("repeats", "repeats"),
                      ("layers", "num_layers"), ("out", "out_dir")):
        if getattr(args, arg, None) is not None:
            overrides[name] = getattr(args, arg)
    if getattr(args, "contenders", None):
        overrides["contenders"] = tuple(c.strip() for c in args.contenders.split(",") if c.strip())
    if getattr(args, "budget_minutes", None) is not None:
        overrides["budget_s"] = 60 * args.budget_minutes
    if getattr(args, "no_profile", False):
        overrides["profile"] = False
    return DeviceBenchConfig(**overrides)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    results = run_device_benchmark(config, progress=lambda message: print(message, flush=True))
    paths = write_report(results, config.out_dir)
    print(Path(paths["markdown"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


__all__ = ["CONTENDERS", "CarefulUser", "DeviceBenchConfig", "matmul_peak", "run", "run_device_benchmark", "write_report"]
