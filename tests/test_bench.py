"""The latency benchmark: runner end to end on the tiny model, FLOP counting by hand, report rendering.

No timing assertions: timings on a shared CI machine say nothing; the numbers checked here are the
ones that must hold on any machine (schema, every contender, speed-ups derived from the latencies).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from answerfirst.bench.flops import ModelShape, floor_seconds, useful_flops
from answerfirst.bench.runner import CONTENDERS, BenchConfig

SMALL = ModelShape(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=4, vocab_size=100)


def test_flops_by_hand():
    # One layer's matmuls per token, 2 FLOPs per multiply-add:
    #   q 8x8, k 8x4, v 8x4, o 8x8, gate 8x16, up 8x16, down 16x8
    #   = 64 + 32 + 32 + 64 + 128 + 128 + 128 = 576 MACs -> 1152 FLOPs; 2 layers -> 2304.
    assert SMALL.linear_flops_per_token() == 2304
    # prefix 3, continuations of 2 and 1 tokens: positions 3, 4 | 3 -> attended 4 + 5 | 4 = 13.
    # attention per attended position: 2 layers * 2 (QK, PV) * 2 FLOPs * 2 heads * 4 dims = 64.
    flops = useful_flops(SMALL, prefix_len=3, continuation_lens=[2, 1], num_grades=5)
    assert flops.tokens == 3
    assert flops.linear == 3 * 2304
    assert flops.attention == 13 * 64
    assert flops.head == 2 * (2 * 8 * 5)  # K grade rows at the last position of each document
    assert flops.total == 6912 + 832 + 160
    # floor: linear at the linear rate, the rest at the fp32 rate
    assert floor_seconds(flops, linear_flops_per_s=6912.0, fp32_flops_per_s=992.0) == pytest.approx(2.0)


def test_the_int8_floor_measures_each_kernel_on_a_layer_and_names_the_fastest():
    from answerfirst.bench.flops import int8_kernels, onednn_int8_throughput
    from answerfirst.bench.report import int8_kernels_line

    kernels = int8_kernels(fast_bf16=True)
    assert set(kernels) == {"torch._int_mm", "onnxruntime MatMulInteger", "oneDNN qlinear -> fp32", "oneDNN qlinear -> bf16"}
    assert "oneDNN qlinear -> bf16" not in int8_kernels(fast_bf16=False)  # emulated bf16 would only lose
    rates = {name: measure(SMALL, 16, 1) for name, measure in int8_kernels(fast_bf16=False).items()}
    assert min(rates.values()) > 0
    with pytest.raises(ValueError, match="out: 'fp32' or 'bf16'"):
        onednn_int8_throughput(SMALL, 16, 1, out="int32")
    # the report names the fastest, with the others' rates from the best of the measurements
    floor = {"measurements": [{"int8_kernels_gops": {"a": 1.0, "b": 3.0}}, {"int8_kernels_gops": {"a": 2.0, "b": 2.5}}]}
    assert int8_kernels_line(floor) == "b, the fastest of the int8 GEMMs measured; the others' GOP/s: a 2"
    assert "MatMulInteger" in int8_kernels_line({})  # a JSON from before the kernels were recorded


def test_prefix_reuse_ceiling_by_hand():
    from answerfirst.bench.flops import prefix_reuse_ceiling

    # prefix 3 once: 3 tokens (6912 linear) attending 1+2+3 = 6 positions (384); then the 2- and
    # 1-token continuations: 6912 + 13 * 64 = 832. Together 15040 FLOPs.
    # Without reuse: 5- and 4-token runs from position 0: 9 * 2304 = 20736 linear, (15 + 10) * 64 = 1600.
    assert prefix_reuse_ceiling(SMALL, 3, [2, 1]) == pytest.approx((20736 + 1600) / 15040)
    assert prefix_reuse_ceiling(SMALL, 100, [1] * 8) > 2  # a long prefix before short documents
    assert prefix_reuse_ceiling(SMALL, 3, [30] * 8) < 1.2  # documents much longer than the prefix


def test_flops_of_qwen3_0_6b_match_its_parameter_count():
    from answerfirst.offline import QWEN3_0_6B

    shape = ModelShape.from_config(QWEN3_0_6B)
    # 2 FLOPs per weight of the decoder's linear layers: 28 * 15.73M weights (published: 0.44B non-embedding)
    assert shape.linear_flops_per_token() == 2 * 28 * (1024 * 2048 * 2 + 1024 * 1024 * 2 + 3 * 1024 * 3072)
    assert 0.43e9 < shape.linear_flops_per_token() / 2 < 0.45e9


def test_one_shape_reader_fills_what_a_config_leaves_out(tiny_checkpoint):
    from transformers import AutoConfig

    from answerfirst.qwen3 import Qwen3Shape

    plain = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    shape = Qwen3Shape.from_config(plain)
    assert (shape.head_dim, shape.num_key_value_heads) == (16, 4)  # hidden / heads; no GQA
    assert Qwen3Shape.from_config({**plain, "head_dim": 32, "num_key_value_heads": 2}).head_dim == 32
    transformers_config = AutoConfig.from_pretrained(tiny_checkpoint)  # an object, not a dict
    assert ModelShape.from_config(transformers_config) == ModelShape.from_config(transformers_config.to_dict())
    with pytest.raises(ValueError, match="no intermediate_size"):
        Qwen3Shape.from_config({k: v for k, v in plain.items() if k != "intermediate_size"})


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="contenders"):
        BenchConfig(contenders=("torch-fp32",))
    with pytest.raises(ValueError, match="docs"):
        BenchConfig(docs=0)
    with pytest.raises(ValueError, match="doc_tokens"):
        BenchConfig(doc_tokens=(100, 50))


def test_workload_token_counts(tiny_checkpoint):
    from transformers import AutoTokenizer

    from answerfirst.artifact import bind_format
    from answerfirst.bench.workload import workload_w

    prompts = bind_format(AutoTokenizer.from_pretrained(tiny_checkpoint), None, "tiny")
    workload = workload_w(prompts, docs=6, doc_tokens=(20, 40), seed=3)
    assert len(workload.docs) == 6
    for doc, count in zip(workload.docs, workload.doc_tokens, strict=True):
        assert count == len(prompts.doc_ids(doc)[0]) == len(prompts.prompt(workload.query, doc).doc_ids)  # as prompts hold it
        assert 17 <= count <= 42  # cut to the drawn length; re-encoding (lead space included) may move it by a token or so
    assert workload.prefix_tokens == len(prompts.prefix_ids(workload.query))
    assert workload.describe()["tokens_per_query_without"] == sum(workload.continuation_lens) + 6 * workload.prefix_tokens


@pytest.fixture(scope="module")
def bench_results(tiny_checkpoint, tmp_path_factory):
    from answerfirst.bench.runner import run_benchmark

    root = tmp_path_factory.mktemp("bench")
    config = BenchConfig(
        model=str(tiny_checkpoint), cache_dir=str(root / "cache"), out_dir=str(root / "results"),
        docs=3, doc_tokens=(20, 40), repeats=3, baseline_repeats=1, noreuse_repeats=2, warmup_docs=2, batch_size=2,
        curve_lengths=(16, 48), curve_length_docs=1, curve_docs=(1, 2), curve_docs_length=16,
        curve_threads=(1,), curve_threads_docs=1, budget_s=600,
    )
    return run_benchmark(config), config


@pytest.mark.slow
def test_runner_end_to_end(bench_results):
    results, config = bench_results
    json.dumps(results)  # serialisable as is
    assert {"machine", "config", "model", "workload", "floor", "contenders", "curves"} <= results.keys()
    assert results["machine"]["nproc"] >= 1 and results["machine"]["cpu_model"]
    from answerfirst.runtime._cpu import ISA_FLAGS, features

    assert results["machine"]["cpu_flags"] == [f for f in ISA_FLAGS if f in features().flags]
    by_name = {c["name"]: c for c in results["contenders"]}
    assert list(by_name) == list(CONTENDERS)  # every contender present, in table order
    for c in by_name.values():
        assert c["status"] in ("ok", "skipped", "failed")
        assert c["status"] == "ok" or c["reason"], f"{c['name']} not measured and no reason given"
    # the peers, torch and both ONNX variants must run on any machine with the [bench] extra
    for name in ("naive", "naive-keep1", "llamacpp-rank", "torch-fp32", "onnx-fp32", "onnx-int8", "openvino-int8",
                 "openvino-int8-static"):
        assert by_name[name]["status"] == "ok", by_name[name]["reason"]

    rates = {}
    for name in ("naive", "naive-keep1"):
        peer = by_name[name]
        assert list(peer["modes"]) == ["noreuse"] and peer["modes"]["noreuse"]["repeats"] == config.baseline_repeats
        rates[name] = 3 / np.mean(peer["modes"]["noreuse"]["latencies_s"])
    naive_rate = rates["naive"]
    assert by_name["naive"]["speedup_vs_naive"] == pytest.approx(1.0)
    assert by_name["naive-keep1"]["speedup_vs_keep1"] == pytest.approx(1.0)
    # logits_to_keep=1 changes which logits are computed, not the grade logits at the last position
    assert by_name["naive-keep1"]["quality"]["max_abs_dp"] < 2e-3
    assert list(by_name["llamacpp-rank"]["modes"]) == ["noreuse"] and by_name["llamacpp-rank"]["peer"]
    for c in by_name.values():
        if c["status"] != "ok":
            continue
        assert c["peak_rss_bytes"] > 50 * 2**20  # a Python process with a model: tens of MiB at least
        assert c["speedup_vs_keep1"] == pytest.approx(c["pairs_per_s"] / rates["naive-keep1"])
        if c["peer"]:
            assert c["prefix_reuse_speedup"] is None
            continue
        reuse, no_reuse = c["modes"]["reuse"], c["modes"]["noreuse"]
        assert reuse["repeats"] == config.repeats and no_reuse["repeats"] == config.noreuse_repeats
        rate = 3 / np.mean(reuse["latencies_s"])
        assert c["pairs_per_s"] == pytest.approx(rate)
        assert c["speedup_vs_naive"] == pytest.approx(rate / naive_rate)
        assert c["prefix_reuse_speedup"] == pytest.approx(rate / (3 / np.mean(no_reuse["latencies_s"])))
        assert c["floor"]["ratio"] == pytest.approx(reuse["p50_s"] / c["floor"]["seconds"])
        # prefix reuse changes the schedule, not the numbers (int8 / K-quant activations are
        # quantized per call, so the prefix alone gets its own scales: a small, bounded change)
        tolerance = 2e-3 if c["precision"] in ("fp32", "f16") else 0.05
        assert c["quality"]["reuse_vs_noreuse_max_abs_dp"] < tolerance, c["name"]
    # fp32 contenders score like the torch reference on the same pairs; llama.cpp's rank head on Q8_0
    # weights within Q8_0's parity bound
    from answerfirst.export.gguf import QUANTS

    assert by_name["llamacpp-rank"]["quality"]["max_abs_dp"] < QUANTS["q8_0"].rank_thresholds.max_abs_dp
    for name in ("naive", "naive-keep1", "onnx-fp32"):
        assert by_name[name]["quality"]["agreement"] == 1.0
        assert by_name[name]["quality"]["max_abs_dp"] < 2e-3

    # torch bf16 runs where the CPU computes bf16 fast, is held to the bf16 floor, and scores within bf16's rounding
    bf16 = by_name["torch-bf16"]
    assert (bf16["status"] == "ok") == features().fast_bf16, bf16["reason"]
    if bf16["status"] == "ok":
        assert bf16["floor"]["kind"] == "bf16" and bf16["quality"]["max_abs_dp"] < 0.05

    floor = results["floor"]
    assert floor["fp32_gflops"] > 0 and floor["int8_gops"] > 0
    assert set(floor["seconds"]) == {"fp32", "bf16", "int8"}
    # measured before the workers start and after the main phase; the floor uses the fastest of each
    assert [m["when"] for m in floor["measurements"]] == ["before the workers start", "after the main phase"]
    assert floor["fp32_gflops"] == max(m["fp32_gflops"] for m in floor["measurements"])
    assert floor["int8_gops"] == max(m["int8_gops"] for m in floor["measurements"])
    # the int8 rate is the fastest of the int8 GEMMs measured, each recorded
    from answerfirst.bench.flops import int8_kernels
    from answerfirst.runtime._cpu import features

    for m in floor["measurements"]:
        kernels = m["int8_kernels_gops"]
        assert set(kernels) == set(int8_kernels(features().fast_bf16)) and min(kernels.values()) > 0
        assert m["int8_gops"] == pytest.approx(max(kernels.values()))
    assert floor["bf16_gflops"] > 0
    assert floor["useful_tokens"] == sum(results["workload"]["doc_tokens"]) + 3 * results["workload"]["suffix_tokens"]
    curves = results["curves"]
    assert curves["backend"] in by_name and curves["backend"] != "naive"
    assert [p["length"] for p in curves["length"]] == [16, 48]
    assert [p["documents"] for p in curves["docs"]] == [1, 2]
    assert [p["threads"] for p in curves["threads"]] == [1]


@pytest.mark.slow
def test_report_renders(bench_results, tmp_path):
    from answerfirst.bench.report import write_report

    results, _ = bench_results
    paths = write_report(results, tmp_path / "out")
    assert json.loads(paths["json"].read_text())["contenders"] == results["contenders"]
    table = paths["markdown"].read_text()
    for name in CONTENDERS:
        assert f"| {name} |" in table
    assert "### Targets" in table and "× naive pairs/s" in table and "× naive-keep1 pairs/s" in table
    assert "the FLOPs of this workload allow" in table and "of the int8 compute floor" in table
    for key in ("throughput_png", "curves_png"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[key].stat().st_size > 5000


@pytest.mark.slow
def test_qwen_tokenizer_has_qwen_ids():
    from answerfirst.afrl import AFRLFormat, PromptTokenizer
    from answerfirst.offline import qwen_tokenizer

    tokenizer = qwen_tokenizer()
    assert len(tokenizer) == 151669
    assert tokenizer.encode("yes", add_special_tokens=False) == [9693]
    assert tokenizer.encode("no", add_special_tokens=False) == [2152]
    assert tokenizer.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    text = "Größe 42 — 速干 跑步鞋 🏃 <|im_end|>"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    # the Qwen3 chat markers and the empty think block of enable_thinking=False
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           enable_thinking=False, tokenize=True)
    ids = prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt
    assert list(ids) == [151644, 872, 198, 6023, 151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]
    prompts = PromptTokenizer(tokenizer, AFRLFormat.from_chat_template(tokenizer))
    assert prompts.grade_ids == (15, 16, 17, 18, 19)  # "0".."4"


def test_render_rewrites_the_report_from_bench_json(bench_results, tmp_path, capsys):
    from answerfirst.cli import main

    results, _ = bench_results
    (tmp_path / "bench.json").write_text(json.dumps(results))
    assert main(["bench", "--render", str(tmp_path / "bench.json")]) == 0
    table = (tmp_path / "bench.md").read_text()
    assert all(f"| {name} |" in table for name in CONTENDERS) and (tmp_path / "curves.png").is_file()
    (tmp_path / "broken.json").write_text("{not json")
    assert main(["bench", "--render", str(tmp_path / "broken.json")]) == 2
    assert "not a readable bench.json" in capsys.readouterr().err


@pytest.mark.slow
def test_device_bench_end_to_end_on_the_cpu(tiny_checkpoint, tmp_path):
    """`answerfirst bench --device` on the CPU (the GPU run is bench/gpu_check.sh): every contender
    measured, MFU and docs/s derived from the latencies, quality against fp32 on the same device."""
    from answerfirst.bench.gpu import CONTENDERS as DEVICE_CONTENDERS
    from answerfirst.bench.gpu import DeviceBenchConfig, run_device_benchmark, write_report

    config = DeviceBenchConfig(device="cpu", model=str(tiny_checkpoint), out_dir=str(tmp_path), docs=6, doc_tokens=(20, 40),
                               repeats=2, budgets=(300,), reference_docs=6, peak_size=128,
                               contenders=tuple(c for c in DEVICE_CONTENDERS if c != "8bit"))
    results = run_device_benchmark(config)
    json.dumps(results)
    by_name = {c["name"]: c for c in results["contenders"]}
    assert list(by_name) == ["careful-b64", "careful-b256", "default", "noreuse", "transformers-forward", "tokens-300", "4bit"]
    peak, useful = results["peak"]["flops_per_s"], results["useful"]["tflop"] * 1e12
    for c in by_name.values():
        assert c["status"] == "ok", c["reason"]
        assert c["repeats"] == 2 and c["p50_s"] == pytest.approx(float(np.median(c["latencies_s"])))
        assert c["docs_per_s"] == pytest.approx(6 / c["p50_s"]) and c["mfu"] == pytest.approx(useful / c["p50_s"] / peak)
        assert c["quality"]["docs"] == 6
    # fp32 on the CPU: every unquantized contender scores what the fp32 reference does; 4-bit does not
    for name in ("careful-b64", "default", "noreuse", "transformers-forward", "tokens-300"):
        assert by_name[name]["quality"]["max_abs_dp"] < 1e-5, name
    assert by_name["4bit"]["quality"]["max_abs_dp"] > 1e-4
    assert by_name["default"]["batch"] == "4096 tokens (device default)" and by_name["tokens-300"]["batch"] == "300 tokens"
    profile = results["profile"]
    assert sum(profile["pass_documents"]) == 6 and len(profile["pass_seconds"]) == len(profile["pass_documents"])
    paths = write_report(results, tmp_path)
    text = paths["markdown"].read_text()
    assert "| default | float32 | 4096 tokens (device default) |" in text and "default load ≥ 2000 docs/s" in text
    assert "aten::" in paths["profile"].read_text()


@pytest.mark.slow
def test_levers_time_equal_work(tmp_path):
    """bench/levers.py (README's lever table): every lever computes what today's kernel computes, within
    its quantization's error, so its timing compares like with like. Small sizes; no timing checked."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("levers", Path(__file__).parents[1] / "bench" / "levers.py")
    levers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(levers)
    out = tmp_path / "levers.json"
    assert levers.main(["--out", str(out), "--tokens", "32", "--docs", "2", "--doc-tokens", "12", "--prefix", "6",
                        "--min-seconds", "0.05", "--threads", "1"]) == 0
    results = json.loads(out.read_text())
    linear = {row["lever"]: row for row in results["linear"]["rows"]}
    bounds = {"ort-fp32": 1e-5, "torch-fp32": 1e-5, "ort-int8": 0.05, "ort-int8-per-channel": 0.05,
              "ort-int8 +block-base-4": 0.05, "ort-int8 -spinning": 0.05, "ort-nbits8-acc4": 0.05,
              "ort-nbits4-acc4": 0.25, "torch-int8-dynamic": 0.05}
    for name, bound in bounds.items():
        assert linear[name]["max_rel_error"] <= bound and linear[name]["gops"] > 0, (name, linear[name])
    for name in ("openvino-f32", "openvino-int8w", "openvino-int8w-bf16", "torch-bf16"):
        assert name not in linear or linear[name]["max_rel_error"] <= 0.05, (name, linear[name])
    attention = {row["lever"]: row for row in results["attention"]["rows"]}
    assert attention["explicit-batched"]["max_rel_error"] == 0  # the reference itself
    assert attention["gqa-one-doc-per-run"]["max_rel_error"] < 1e-5  # the op computes today's attention
    batched = attention["gqa-batched"]  # refused by onnxruntime's CPU kernel today; if it runs, it must agree
    assert "batch_size must be 1" in batched.get("error", "") or batched["max_rel_error"] < 1e-5
    assert results["machine"]["cpu_flags"] is not None and results["threads"] == 1
