"""ONNX export + onnxruntime backend: numbers equal torch, prefix reuse and batching change nothing,
explanations decode the same tokens, and broken exports fail with errors that say what to do."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pairs import DOCS, PAIRS, QUERY, as_array

import answerfirst
from answerfirst.afrl import FormatError
from answerfirst.artifact import Manifest, ManifestError, checkpoint_hash
from answerfirst.runtime.api import ScorerConfig

pytest.importorskip("onnxruntime")

# int8 dynamic quantization of a random tiny model (hidden 64): measured max |dp| ~1e-2 on these pairs.
INT8_MAX_ABS_DP = 0.05


@pytest.fixture(scope="module")
def onnx_export(tiny_checkpoint, tmp_path_factory) -> Path:
    from answerfirst.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("onnx") / "export"
    export_onnx(tiny_checkpoint, out, probe_pairs=PAIRS)
    return out


@pytest.fixture(scope="module")
def fp32_scorer(onnx_export):
    return answerfirst.load(onnx_export, variant="fp32")


@pytest.fixture
def export_copy(onnx_export, tmp_path) -> Path:
    out = tmp_path / "export"
    shutil.copytree(onnx_export, out)
    return out


# -- the export ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_manifest_lists_int8_then_fp32_with_parity_and_is_self_contained(onnx_export, tiny_checkpoint):
    manifest = Manifest.read(onnx_export)
    assert manifest.kind == "onnx"
    assert [v.name for v in manifest.variants] == ["int8", "fp32"]  # fastest first
    fp32 = manifest.variant("fp32")
    assert fp32.parity["passed"] and fp32.parity["max_abs_dp"] <= 1e-4
    assert fp32.parity["pairs"] == len(PAIRS)
    int8 = manifest.variant("int8")
    assert int8.quantization in ("int8-dynamic-per-channel", "int8-dynamic-per-tensor")
    assert set(manifest.info["int8"]["candidates"]) == {"per-channel", "per-tensor"}
    assert manifest.source["sha256"] and manifest.source["model"] == str(tiny_checkpoint)
    assert (onnx_export / "tokenizer.json").is_file()
    # every file the export needs is inside it: the checkpoint is not read when loading
    scorer = answerfirst.load(onnx_export, variant="fp32")
    assert scorer.backend.name == "onnx"
    # the int8 file is smaller than the fp32 one (the layers' weights are 1 byte instead of 4)
    assert (onnx_export / int8.file).stat().st_size < (onnx_export / fp32.file).stat().st_size


def test_default_variant_is_the_fastest_that_passed(onnx_export):
    manifest = Manifest.read(onnx_export)
    expected = next(v.name for v in manifest.variants if v.parity_passed)
    scorer = answerfirst.load(onnx_export)
    assert scorer.backend.where.endswith(manifest.variant(expected).file)


@pytest.mark.slow
def test_failed_parity_is_recorded_and_logged_not_silent(tiny_checkpoint, tmp_path, caplog):
    """A random tiny model's int8 misses Spearman >= 0.99 on a small probe set of near-equal scores
    (or passes); either way the manifest records exactly what the report measured."""
    from answerfirst.export.onnx import export_onnx

    with caplog.at_level("WARNING"):
        manifest = export_onnx(tiny_checkpoint, tmp_path / "e", probe_pairs=PAIRS, int8_scheme="per-tensor")
    int8 = manifest.variant("int8")
    assert int8.quantization == "int8-dynamic-per-tensor"
    report = int8.parity
    expected_pass = report["grade_agreement"] >= 0.98 and (
        np.isnan(report["spearman_expected"]) or report["spearman_expected"] >= 0.99
    )
    assert report["passed"] == expected_pass
    if not expected_pass:
        assert report["failures"] and any("parity FAILED" in r.message for r in caplog.records)
        assert Manifest.read(tmp_path / "e").variant(None).name == "fp32"


def test_resume_reuses_the_fp32_graph_of_the_same_weights(tiny_checkpoint, export_copy):
    from answerfirst.export.onnx import FP32_FILE, export_onnx

    before = (export_copy / FP32_FILE).stat().st_mtime_ns
    export_onnx(tiny_checkpoint, export_copy, int8=False, probe_pairs=PAIRS[:2])
    assert (export_copy / FP32_FILE).stat().st_mtime_ns == before
    assert [v.name for v in Manifest.read(export_copy).variants] == ["fp32"]


def test_a_graph_of_an_earlier_exporter_revision_is_made_again(tiny_checkpoint, export_copy):
    """The same weights, an older graph: neither the export's resume nor make bench's export cache
    takes it for this exporter's (GRAPH_REVISION)."""
    import onnx

    from answerfirst.bench.runner import stale_export
    from answerfirst.export.onnx import FP32_FILE, GRAPH_REVISION, META_GRAPH_REVISION, export_onnx

    manifest = Manifest.read(export_copy)
    digest, wanted = checkpoint_hash(tiny_checkpoint), ("fp32", "int8")
    assert manifest.info["graph_revision"] == GRAPH_REVISION
    assert stale_export(manifest, "onnx", digest, wanted) is None
    assert "other weights" in stale_export(manifest, "onnx", "0" * 64, wanted)
    assert "lacks variant(s) q8_0" in stale_export(manifest, "onnx", digest, ("fp32", "q8_0"))
    manifest.info.pop("graph_revision")  # what an export before the revision was recorded says
    assert stale_export(manifest, "onnx", digest, wanted) == f"its graph is revision 1, this exporter writes {GRAPH_REVISION}"

    graph = onnx.load(str(export_copy / FP32_FILE))
    for prop in graph.metadata_props:
        if prop.key == META_GRAPH_REVISION:
            prop.value = "1"
    onnx.save(graph, str(export_copy / FP32_FILE))
    before = (export_copy / FP32_FILE).stat().st_mtime_ns
    export_onnx(tiny_checkpoint, export_copy, int8=False, probe_pairs=PAIRS[:2])
    assert (export_copy / FP32_FILE).stat().st_mtime_ns != before  # traced again
    stored = {p.key: p.value for p in onnx.load(str(export_copy / FP32_FILE)).metadata_props}
    assert stored[META_GRAPH_REVISION] == GRAPH_REVISION


# -- numbers ---------------------------------------------------------------------------------------


def test_fp32_onnx_equals_torch(tiny_scorer, fp32_scorer):
    torch_probs = as_array(tiny_scorer.score(QUERY, DOCS))
    onnx_probs = as_array(fp32_scorer.score(QUERY, DOCS))
    np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-5)
    assert torch_probs.max() - torch_probs.min() > 0.05  # informative distributions, not uniform
    pairs = [(QUERY, DOCS[0]), ("wireless headphones", DOCS[1]), (QUERY, DOCS[4])]
    np.testing.assert_allclose(as_array(fp32_scorer.score_pairs(pairs)), as_array(tiny_scorer.score_pairs(pairs)), atol=1e-5)


def test_int8_within_tolerance(tiny_scorer, onnx_export):
    int8 = answerfirst.load(onnx_export, variant="int8")
    diff = np.abs(as_array(int8.score(QUERY, DOCS)) - as_array(tiny_scorer.score(QUERY, DOCS)))
    assert diff.max() <= INT8_MAX_ABS_DP
    assert diff.max() > 0  # it really is a different (quantized) graph


def test_prefix_reuse_equals_no_reuse(onnx_export, fp32_scorer):
    no_reuse = answerfirst.load(onnx_export, variant="fp32", config=ScorerConfig(reuse_prefix=False))
    np.testing.assert_allclose(as_array(fp32_scorer.score(QUERY, DOCS)), as_array(no_reuse.score(QUERY, DOCS)), atol=1e-6)


def test_batch_equals_single(onnx_export, fp32_scorer):
    single = answerfirst.load(onnx_export, variant="fp32", config=ScorerConfig(batch_size=1))
    batched = as_array(fp32_scorer.score(QUERY, DOCS))
    one_by_one = np.array([single.score(QUERY, [d])[0].probs for d in DOCS])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-6)


def test_even_spans_give_the_prefixs_last_token_to_every_document_and_change_no_score(onnx_export, fp32_scorer):
    """even_spans (on where OpenVINO computes in bf16: odd attention spans ran ~4x slower there) splits the
    same prompts otherwise: an odd prefix's last token opens every continuation, and each pass is
    padded to an even length. The fp32 graph scores them as before."""
    from answerfirst.runtime._common import even_spans, right_padded

    prompts = fp32_scorer.prompts.prompts(QUERY, DOCS[:3])
    prefix, continuations = prompts[0].prefix_ids, [p.continuation_ids for p in prompts]
    assert len(prefix) % 2 == 1  # the case the graph is run on below
    assert even_spans(prefix[:4], continuations) == (prefix[:4], continuations)
    shorter, moved = even_spans(prefix[:5], continuations)
    assert list(shorter) == list(prefix[:4]) and [list(c) for c in moved] == [[prefix[4], *c] for c in continuations]
    assert even_spans(prefix[:1], continuations) == (prefix[:1], continuations)
    assert even_spans(None, continuations) == (None, continuations)
    assert right_padded([[1, 2, 3], [4]], 0).tolist() == [[1, 2, 3], [4, 0, 0]]
    assert right_padded([[1, 2, 3], [4]], 0, even=True).tolist() == [[1, 2, 3, 0], [4, 0, 0, 0]]
    assert right_padded([[1, 2], [4]], 0, even=True).tolist() == [[1, 2], [4, 0]]

    scorer = answerfirst.load(onnx_export, variant="fp32", config=ScorerConfig(batch_size=2))
    scorer.backend.even_spans = True
    feeds, run = [], scorer.backend.session.run
    scorer.backend.session.run = lambda names, feed: feeds.append(feed) or run(names, feed)
    np.testing.assert_allclose(as_array(scorer.score(QUERY, DOCS)), as_array(fp32_scorer.score(QUERY, DOCS)), atol=1e-6)
    assert len(feeds) == 4  # the prefix, then 3 passes of 2 + 2 + 1 documents
    assert {feed["input_ids"].shape[1] % 2 for feed in feeds} == {0}
    assert {feed["past_key.0"].shape[2] for feed in feeds[1:]} == {len(prefix) - 1}


def test_prefix_kv_is_shared_not_copied(fp32_scorer):
    """The graph broadcasts ONE (1, kv, P, d) prefix KV over the batch and returns no KV while scoring."""
    backend = fp32_scorer.backend
    prompts = fp32_scorer.prompts.prompts(QUERY, DOCS[:3])
    past = backend._run_prefix(prompts[0].prefix_ids)
    k0 = past["past_key.0"]
    assert k0.shape == (1, backend.kv_heads, len(prompts[0].prefix_ids), backend.head_dim)
    continuations = [p.continuation_ids for p in prompts]
    lengths = np.array([len(c) for c in continuations])
    ids = np.full((3, lengths.max()), backend.pad_id)
    for r, c in enumerate(continuations):
        ids[r, : len(c)] = c
    empty = np.zeros((0,), dtype=np.int64)
    feed = {"input_ids": ids, "lengths": lengths, "kv_rows": empty, "vocab_rows": empty, **past}
    grade, vocab, present_k0 = backend.session.run(["grade_logits", "next_token_logits", "present_key.0"], feed)
    assert grade.shape == (3, len(fp32_scorer.grades)) and vocab.shape == (0, backend.vocab_size)
    assert present_k0.shape[0] == 0


@pytest.mark.slow
def test_explain_gives_the_same_greedy_tokens_as_torch(tiny_scorer, fp32_scorer):
    for doc in DOCS[:2]:
        grade = fp32_scorer.score(QUERY, [doc])[0].grade
        assert grade == tiny_scorer.score(QUERY, [doc])[0].grade
        # what explain() decodes: the prompt plus the scored grade token, greedily, with the KV cache
        ids = [*tiny_scorer.prompts.prompt(QUERY, doc).input_ids, tiny_scorer.prompts.grade_ids[grade]]
        torch_tokens = list(tiny_scorer.backend.generate(ids, 16))
        assert list(fp32_scorer.backend.generate(ids, 16)) == torch_tokens
        expected_text = "".join(tiny_scorer.prompts.stream_explanation(torch_tokens))
        assert "".join(fp32_scorer.explain(QUERY, doc, 16)) == expected_text


def test_decoding_logits_equal_torch_full_vocabulary(tiny_scorer, fp32_scorer):
    import torch

    ids = tiny_scorer.prompts.prompt(QUERY, DOCS[0]).input_ids
    with torch.no_grad():
        expected = tiny_scorer.backend.model(input_ids=torch.tensor([ids])).logits[0, -1].numpy()  # (V,)
    backend = fp32_scorer.backend
    row0 = np.zeros((1,), dtype=np.int64)
    (logits,) = backend.session.run(
        ["next_token_logits"],
        {"input_ids": np.array([ids]), "lengths": np.array([len(ids)]), "kv_rows": np.zeros((0,), dtype=np.int64),
         "vocab_rows": row0, **backend._empty_feed()},
    )
    np.testing.assert_allclose(logits[0], expected, atol=1e-4)


# -- errors ----------------------------------------------------------------------------------------


def test_corrupted_graph_is_a_clear_error(export_copy):
    manifest = Manifest.read(export_copy)
    path = export_copy / manifest.variant("fp32").file
    data = bytearray(path.read_bytes())
    data[: 4096] = b"\xff" * 4096  # same size, garbage header
    path.write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="could not be loaded by onnxruntime.*re-run `answerfirst export onnx`"):
        answerfirst.load(export_copy, variant="fp32")


def test_truncated_graph_is_a_clear_error(export_copy):
    manifest = Manifest.read(export_copy)
    path = export_copy / manifest.variant("fp32").file
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ManifestError, match="truncated or corrupted"):
        answerfirst.load(export_copy, variant="fp32")
    # without the recorded sizes the runtime still refuses it with a clear message
    data = json.loads((export_copy / "answerfirst.json").read_text())
    data["info"].pop("files")
    (export_copy / "answerfirst.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="could not be loaded by onnxruntime"):
        answerfirst.load(export_copy, variant="fp32")


@pytest.mark.parametrize("change", ["other_k", "other_ids"])
def test_manifest_graph_mismatch_is_a_clear_error(export_copy, change):
    path = export_copy / "answerfirst.json"
    data = json.loads(path.read_text())
    ids = data["grade_token_ids"]
    if change == "other_k":  # a manifest for 4 grades beside a graph that scores 5
        data["format"]["grades"], data["format"]["values"] = data["format"]["grades"][:4], data["format"]["values"][:4]
        data["grade_token_ids"] = ids[:4]
    else:  # same K, grade ids of another tokenizer/model
        data["grade_token_ids"] = ids[1:] + ids[:1]
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="grade token ids"):
        answerfirst.load(export_copy, variant="fp32")


def test_graph_with_other_grade_ids_than_its_manifest(export_copy):
    """Swap in a graph exported for different grade tokens: the graph's metadata disagrees with the manifest."""
    import onnx

    manifest = Manifest.read(export_copy)
    path = export_copy / manifest.variant("fp32").file
    proto = onnx.load(str(path))
    for prop in proto.metadata_props:
        if prop.key == "answerfirst.grade_token_ids":
            prop.value = json.dumps(list(reversed(manifest.grade_token_ids)))
    onnx.save(proto, str(path))
    data = json.loads((export_copy / "answerfirst.json").read_text())
    data["info"].pop("files")
    (export_copy / "answerfirst.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="graph scores grade token ids .* different exports"):
        answerfirst.load(export_copy, variant="fp32")


def test_unknown_variant_and_missing_manifest(export_copy):
    with pytest.raises(ManifestError, match="no variant 'fp16'"):
        answerfirst.load(export_copy, variant="fp16")
    (export_copy / "answerfirst.json").unlink()
    with pytest.raises(ManifestError, match="no answerfirst.json"):
        answerfirst.load(export_copy)


@pytest.mark.slow
def test_missing_onnxruntime_is_a_clear_import_error(onnx_export, tiny_checkpoint, tmp_path):
    code = f"""
import sys
sys.modules["onnxruntime"] = None  # as if it were not installed
import answerfirst
from answerfirst.export.onnx import export_onnx
for call in (lambda: answerfirst.load({str(onnx_export)!r}), lambda: export_onnx({str(tiny_checkpoint)!r}, {str(tmp_path / "x")!r})):
    try:
        call()
    except ImportError as e:
        print("IMPORT-ERROR:", e)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stdout.splitlines() if line.startswith("IMPORT-ERROR:")]
    assert len(lines) == 2, result.stdout + result.stderr
    assert all('pip install "answerfirst[onnx]"' in line for line in lines)


def test_bad_export_arguments(tiny_checkpoint, tmp_path):
    from answerfirst.export.onnx import export_onnx

    with pytest.raises(ValueError, match="int8_scheme"):
        export_onnx(tiny_checkpoint, tmp_path / "x", int8_scheme="per-row")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        export_onnx(tmp_path / "missing", tmp_path / "x")
    with pytest.raises(ValueError, match="--out must differ"):
        export_onnx(tiny_checkpoint, tiny_checkpoint)


def test_prefix_runs_once_per_query_across_batches(onnx_export):
    scorer = answerfirst.load(onnx_export, variant="fp32", config=ScorerConfig(batch_size=2))
    scorer.score(QUERY, DOCS)  # 5 docs -> 3 batches
    assert scorer.backend.prefix_cache.misses == 1


# -- profile ---------------------------------------------------------------------------------------


def test_kernel_time_is_summed_per_op_type_from_the_given_start():
    from answerfirst.bench.profile import kernel_time_by_op

    events = [
        {"cat": "Node", "name": "a_kernel_time", "ts": 5, "dur": 30, "args": {"op_name": "MatMul"}},
        {"cat": "Node", "name": "b_kernel_time", "ts": 20, "dur": 10, "args": {"op_name": "MatMul"}},
        {"cat": "Node", "name": "c_kernel_time", "ts": 40, "dur": 10, "args": {"op_name": "Softmax"}},
        {"cat": "Node", "name": "c_fence_before", "ts": 40, "dur": 99, "args": {"op_name": "Softmax"}},
        {"cat": "Session", "name": "model_run", "ts": 10, "dur": 500},
    ]
    rows = kernel_time_by_op(events, since_us=10)
    assert [(r["op"], r["ms"], r["calls"]) for r in rows] == [("MatMul", 0.01, 1), ("Softmax", 0.01, 1)]
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)


@pytest.mark.parametrize("docs", [4, 20])
def test_profile_covers_one_scoring_call_of_the_int8_graph(onnx_export, docs):
    from answerfirst.bench.profile import markdown, profile_export
    from answerfirst.bench.workload import workload_w

    scorer = answerfirst.load(onnx_export, variant="int8", threads=1)
    workload = workload_w(scorer.prompts, docs)
    passes = len(scorer.plan(workload.query, workload.docs).passes)  # under the backend's default budget
    assert passes > 1 or docs == 4
    profile = profile_export(onnx_export, variant="int8", docs=docs, threads=1)
    runs = 1 + passes
    assert profile["session_runs"] == runs  # the prefix + one run per pass; the warm-up is left out
    ops = {row["op"] for row in profile["ops"]}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}, ops  # the quantized matmuls ran
    assert 0 < profile["kernel_seconds"] <= profile["wall_seconds"]
    assert sum(row["share"] for row in profile["ops"]) == pytest.approx(1.0)
    assert f"{runs} session runs" in markdown(profile)


# -- trust: files, numbers, inputs, threads ---------------------------------------------------------


@pytest.fixture(scope="module")
def external_export(tiny_checkpoint, tmp_path_factory) -> Path:
    """An fp32 export whose weights live in score_fp32.onnx.data, as every real-size export's do."""
    import answerfirst.export.onnx as onnx_export_module

    out = tmp_path_factory.mktemp("onnx-data") / "export"
    before = onnx_export_module.EXTERNAL_DATA_THRESHOLD
    onnx_export_module.EXTERNAL_DATA_THRESHOLD = 0  # the tiny model's weights are far below 32 MiB
    try:
        onnx_export_module.export_onnx(tiny_checkpoint, out, int8=False, probe_pairs=PAIRS)
    finally:
        onnx_export_module.EXTERNAL_DATA_THRESHOLD = before
    return out


@pytest.fixture
def external_copy(external_export, tmp_path) -> Path:
    out = tmp_path / "export"
    shutil.copytree(external_export, out)
    return out


def poison_matmul_weight(graph: Path, value: float) -> None:
    """Overwrite the first decoder linear weight stored in GRAPH.data with `value`, in place: the files keep
    their sizes."""
    import onnx

    proto = onnx.load(str(graph), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.name.endswith("_proj.weight_t") and t.external_data)
    where = {e.key: e.value for e in tensor.external_data}
    count = int(where["length"]) // 4
    with (graph.parent / where["location"]).open("r+b") as f:
        f.seek(int(where["offset"]))
        f.write(np.full(count, value, dtype=np.float32).tobytes())


def test_exported_files_are_readable_like_every_other_artifact(external_export):
    mode = (external_export / "answerfirst.json").stat().st_mode & 0o777
    files = sorted(external_export.iterdir())
    assert any(f.name.endswith(".onnx.data") for f in files)
    for f in files:
        assert f.stat().st_mode & 0o777 == mode, f.name  # onnx writes .data 0600 itself
    recorded = Manifest.read(external_export).info
    assert set(recorded["files"]) == set(recorded["files_sha256"]) == {f.name for f in files} - {"answerfirst.json"}


def test_exported_files_are_world_readable_under_the_usual_umask(tiny_checkpoint, tmp_path):
    import os

    from answerfirst.export.onnx import export_onnx

    previous = os.umask(0o022)
    try:
        export_onnx(tiny_checkpoint, tmp_path / "x", int8=False, probe_pairs=PAIRS[:2])
    finally:
        os.umask(previous)
    for f in (tmp_path / "x").iterdir():
        assert f.stat().st_mode & 0o777 == 0o644, f.name


def test_truncated_onnx_data_fails_at_load_naming_the_file(external_copy):
    data = external_copy / "score_fp32.onnx.data"
    data.write_bytes(data.read_bytes()[:-4096])
    with pytest.raises(ManifestError, match=r"score_fp32\.onnx\.data is \d+ bytes but was \d+ bytes when exported.*re-run"):
        answerfirst.load(external_copy)


def test_corrupt_onnx_data_fails_verify_and_never_scores_nan(external_copy, tiny_scorer):
    from answerfirst.export.onnx import INT8_THRESHOLDS
    from answerfirst.export.parity import measure
    from answerfirst.runtime.api import NonFiniteScoreError

    assert answerfirst.load(external_copy, verify=True).backend.name == "onnx"  # intact: verifies
    graph = external_copy / "score_fp32.onnx"
    poison_matmul_weight(graph, np.nan)  # what an overflowing kernel leaves behind
    with pytest.raises(ManifestError, match=r"score_fp32\.onnx\.data: sha256 .* recorded at export: the file is corrupted"):
        answerfirst.load(external_copy, verify=True)
    scorer = answerfirst.load(external_copy)  # sizes match: the cheap checks pass
    with pytest.raises(NonFiniteScoreError, match=r"score_fp32\.onnx gave non-finite grade logits"):
        scorer.score(QUERY, DOCS)
    # an export whose variant produces NaN fails its parity instead of recording a number
    report = measure(tiny_scorer.score_pairs(PAIRS), lambda: scorer.score_pairs(PAIRS), INT8_THRESHOLDS)
    assert not report["passed"] and "non-finite" in report["failures"][0]

    out = subprocess.run([sys.executable, "-m", "answerfirst.cli", "verify", str(external_copy)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "FAILED" in out.stdout and "score_fp32.onnx.data" in out.stdout and "ok      tokenizer.json" in out.stdout


def test_cli_verify_of_an_intact_export(external_export):
    out = subprocess.run([sys.executable, "-m", "answerfirst.cli", "verify", str(external_export)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ok      score_fp32.onnx.data" in out.stdout and "FAILED" not in out.stdout


def test_future_format_version_fails_at_load_naming_the_manifest(external_copy):
    path = external_copy / "answerfirst.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 99}))
    with pytest.raises(ManifestError, match=f"{path}: format_version 99 .* upgrade"):
        answerfirst.load(external_copy)


def test_huge_query_and_prompt_beyond_the_context_are_refused_before_any_forward_pass(onnx_export):
    from pairs import HUGE_QUERY

    from answerfirst.runtime.api import ContextLengthError

    scorer = answerfirst.load(onnx_export, variant="fp32")
    with pytest.raises(FormatError, match="query is \\d+ tokens, over the limit of 256"):
        scorer.score(HUGE_QUERY, DOCS)
    unlimited = answerfirst.load(onnx_export, variant="fp32", config=ScorerConfig(max_query_tokens=10**7))
    assert unlimited.backend.max_positions == 4096  # the exported model's max_position_embeddings
    with pytest.raises(ContextLengthError, match="does not fit the context of 4096"):
        unlimited.score(HUGE_QUERY, DOCS)
    assert scorer.backend.prefix_cache.misses == unlimited.backend.prefix_cache.misses == 0  # nothing ran


def test_each_scorer_keeps_its_own_threads(onnx_export):
    one = answerfirst.load(onnx_export, variant="fp32", threads=1)
    two = answerfirst.load(onnx_export, variant="fp32", threads=2)
    assert (one.backend.threads, two.backend.threads) == (1, 2)
    assert one.backend.session.get_session_options().intra_op_num_threads == 1  # loading `two` changed nothing
    np.testing.assert_allclose(as_array(one.score(QUERY, DOCS)), as_array(two.score(QUERY, DOCS)), atol=1e-6)


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_threads_with_distinct_queries_equal_sequential(onnx_export, variant):
    from pairs import assert_threads_equal_sequential

    scorer = answerfirst.load(onnx_export, variant=variant)
    assert_threads_equal_sequential(scorer)
    assert scorer.backend.prefix_cache.misses > scorer.backend.prefix_cache.capacity
