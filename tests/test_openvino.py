"""OpenVINO export + backend: parity with torch and onnxruntime on the shared pairs, the manifest, the
kernel choice by CPU flags, and clear errors. Tiny models built here."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

from pairs import DOCS, PAIRS, QUERY, as_array  # noqa: E402

import answerfirst  # noqa: E402
from answerfirst.artifact import Manifest, ManifestError, checkpoint_hash  # noqa: E402
from answerfirst.runtime._cpu import CpuFeatures, features  # noqa: E402
from answerfirst.runtime._openvino import compile_config, inference_precision  # noqa: E402


@pytest.fixture(scope="module")
def openvino_export(tiny_checkpoint, tmp_path_factory):
    from answerfirst.export.openvino import export_openvino

    out = tmp_path_factory.mktemp("openvino") / "export"
    export_openvino(tiny_checkpoint, out, probe_pairs=PAIRS, threads=1)
    return out


def test_export_records_ir_files_and_parity_measured_with_this_cpus_precision(openvino_export, tiny_checkpoint):
    from answerfirst.export.openvino import INT8_THRESHOLDS

    manifest = Manifest.read(openvino_export)
    assert manifest.kind == "openvino" and [v.name for v in manifest.variants] == ["int8"]
    assert manifest.source == {"model": str(tiny_checkpoint), "sha256": checkpoint_hash(tiny_checkpoint)}
    parity = manifest.variants[0].parity
    assert parity["passed"], parity
    assert parity["inference_precision"] == inference_precision(features())
    assert parity["thresholds"]["max_abs_dp"] == INT8_THRESHOLDS.max_abs_dp
    assert {"score_int8.xml", "score_int8.bin", "tokenizer.json"} <= set(manifest.info["files_sha256"])
    assert not list(openvino_export.glob(".trace-*")), "the temporary ONNX graph must be removed"


def test_the_vocabulary_head_reads_the_int8_embedding_as_weights(openvino_export):
    """The IR's next-token head multiplies the rows by the (transposed) int8 embedding, the form the CPU
    plugin runs on int8 weights, not the embedding by the rows, where the plugin keeps a decompressed
    copy of the embedding. (Its logits are checked by the first greedy token in the parity test below.)"""
    import openvino as ov

    graph = ov.Core().read_model(str(openvino_export / "score_int8.xml"))
    head = graph.output("next_token_logits").get_node().input_value(0).get_node()  # the Result's producer
    assert head.get_type_name() == "MatMul" and head.get_attributes() == {"transpose_a": False, "transpose_b": True}
    weights = head.input_value(1).get_node()
    while weights.get_type_name() in ("Convert", "Subtract", "Multiply"):  # nncf's decompression chain
        weights = weights.input_value(0).get_node()
    assert weights.get_type_name() == "Constant" and weights.get_element_type().get_type_name() == "u8"


def test_openvino_export_scores_like_torch_and_its_manifest_tells_the_truth(openvino_export, tiny_checkpoint):
    scorer = answerfirst.load(openvino_export, threads=1, verify=True)
    assert scorer.backend.name == "openvino"
    got = as_array(scorer.score_pairs(PAIRS))
    reference = as_array(answerfirst.load(tiny_checkpoint).score_pairs(PAIRS))
    recorded = Manifest.read(openvino_export).variants[0].parity
    assert np.abs(got - reference).max() == pytest.approx(recorded["max_abs_dp"], abs=1e-6)
    assert (got.argmax(1) == reference.argmax(1)).all()
    # prefix reuse changes the schedule, not the numbers (beyond the compute precision's rounding)
    no_reuse = answerfirst.Scorer(scorer.backend, scorer.prompts,
                                  answerfirst.ScorerConfig(reuse_prefix=False), scorer.manifest)
    scorer.backend.forget_prefixes()
    tolerance = 2e-2 if scorer.backend.session.precision == "bf16" else 1e-4
    np.testing.assert_allclose(as_array(no_reuse.score(QUERY, DOCS)), as_array(scorer.score(QUERY, DOCS)), atol=tolerance)
    # decoding runs OnnxBackend's KV-cache loop on OpenVINO: the first greedy token is the top logit of
    # the prompt's last position, as onnxruntime's fp32 graph computes it
    prompt = scorer.prompts.prompt(QUERY, DOCS[0]).input_ids
    first = next(iter(scorer.backend.generate(prompt, 1)))
    assert first == next(iter(answerfirst.load(tiny_checkpoint).backend.generate(prompt, 1)))


def test_backend_openvino_runs_an_onnx_exports_fp32_graph(tiny_onnx_export):
    onnx_fp32 = answerfirst.load(tiny_onnx_export, variant="fp32", threads=1)
    scorer = answerfirst.load(tiny_onnx_export, backend="openvino", threads=1)
    assert scorer.backend.name == "openvino" and scorer.backend.artifact.endswith("score_fp32.onnx")
    tolerance = 2e-2 if scorer.backend.session.precision == "bf16" else 1e-4
    np.testing.assert_allclose(as_array(scorer.score_pairs(PAIRS)), as_array(onnx_fp32.score_pairs(PAIRS)), atol=tolerance)
    with pytest.raises(ManifestError, match="onnxruntime's"):
        answerfirst.load(tiny_onnx_export, backend="openvino", variant="int8", threads=1)


def test_kernels_follow_the_cpu_flags():
    """bf16 only with AMX bf16 tiles: an AVX2-only CPU computes in f32 (bf16 is emulated there, 7x slower)."""
    amx = CpuFeatures("xeon", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}))
    zen4 = CpuFeatures("epyc zen 4", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}))
    avx2 = CpuFeatures("epyc", frozenset({"avx2", "fma"}))
    assert [inference_precision(c) for c in (amx, zen4, avx2)] == ["bf16", "f32", "f32"]
    assert compile_config(2, avx2)["INFERENCE_PRECISION_HINT"] == "f32"
    assert compile_config(2, avx2)["INFERENCE_NUM_THREADS"] == "2"
    assert avx2.fast_bf16 is False and zen4.fast_bf16 and amx.amx_int8 and not zen4.amx_bf16


def test_broken_ir_is_a_clear_error(openvino_export, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(openvino_export, broken)
    xml = broken / "score_int8.xml"
    xml.write_text(xml.read_text()[: len(xml.read_text()) // 2])
    with pytest.raises(ManifestError, match="score_int8.xml"):
        answerfirst.load(broken, threads=1)
