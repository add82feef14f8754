"""Demo page: the served endpoints return the runtime's numbers, explanations stream, a real headless
browser can use the page (offline), and 16 concurrent clients all get correct answers.

One app is launched per module on 127.0.0.1 (a free port) with three sources:
  - the readable tiny model (--model): the tiny checkpoint with its byte-fragment token embeddings
    zeroed, so greedy generation emits whole words and an explanation streams visibly;
  - artifacts/student: the tiny checkpoint itself plus a checkpoint manifest;
  - artifacts/onnx: an ONNX "export" whose model file is garbage, so loading it must fail cleanly.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

import answerfirst
from answerfirst.artifact import Manifest, Variant
from answerfirst.demo.app import (
    API_EXPLAIN,
    API_SCORE,
    DemoConfig,
    DemoError,
    Scorers,
    build_app,
    describe_source,
    discover_sources,
    launch,
    load_examples,
    parse_docs,
)

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

QUERY = "red running shoes"
DOCS = [
    "Lightweight red running shoes with a breathable mesh upper.",
    "Over-ear wireless headphones, 30 hour battery, noise cancelling.",
    "Insulated stainless steel bottle, 750 ml, keeps drinks cold.",
    "Red shoes.",
    "Prix: 49,90 € — Größe 42 — couleur rouge — 速干 跑步鞋 — 🏃 fast shipping!",
]
LONG_DOC = ("Lightweight red running shoes with a breathable mesh upper. " * 80).strip() # > 32 tokens: truncated
MAX_DOC_TOKENS = 32  # the student manifest's limit, small so LONG_DOC is cut
SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-artifacts"


# The CI box is 2 shared cores: give HTTP calls room, this module tests correctness, not latency.
HTTP = {"timeout": 120}


def connect(url: str) -> Client:
    return Client(url, verbose=False, httpx_kwargs=dict(HTTP))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readable_copy(checkpoint: Path, out: Path) -> Path:
    """The tiny checkpoint with the embedding rows (tied with the output head) of every token that
    decodes to an incomplete UTF-8 fragment set to zero: greedy decoding then picks whole-text tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    fragments = [i for i in range(len(tokenizer)) if "\ufffd" in tokenizer.decode([i])]
    with torch.no_grad():
        model.get_input_embeddings().weight[fragments] = 0.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def demo_dirs(tiny_checkpoint, tiny_scorer, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    readable = readable_copy(tiny_checkpoint, root / "readable")
    artifacts = root / "artifacts"
    student = shutil.copytree(tiny_checkpoint, artifacts / "student")
    fmt = tiny_scorer.prompts.format.with_overrides(max_doc_tokens=MAX_DOC_TOKENS)
    Manifest("checkpoint", fmt, tiny_scorer.prompts.grade_ids, source={"model": "tiny"}).write(student)
    onnx = artifacts / "onnx"
    onnx.mkdir()
    for tokenizer_file in tiny_checkpoint.glob("*token*"):  # a real export carries the tokenizer
        shutil.copy(tokenizer_file, onnx)
    (onnx / "score.int8.onnx").write_bytes(b"this is not an onnx model")
    variant = Variant("int8", "score.int8.onnx", "int8", parity={"passed": True})
    Manifest("onnx", fmt, tiny_scorer.prompts.grade_ids, variants=[variant]).write(onnx)
    return {"readable": readable, "artifacts": artifacts, "student": student}


@pytest.fixture(scope="module")
def served(demo_dirs):
    """(url, demo, sources by role) of the app launched on 127.0.0.1."""
    config = DemoConfig(model=str(demo_dirs["readable"]), artifacts=str(demo_dirs["artifacts"]), port=free_port())
    scorers = Scorers(discover_sources(config))
    demo = build_app(config, scorers)
    launch(demo, config, block=False)
    for key in scorers.sources:  # warm what loads, as `answerfirst demo` warms its default model
        with contextlib.suppress(DemoError):
            scorers.get(key)
    by_path = {(s.path, s.backend): key for key, s in scorers.sources.items()}
    roles = {
        "readable": by_path[(str(demo_dirs["readable"]), "torch")],
        "student": by_path[(str(demo_dirs["student"]), "torch")],
        "onnx": by_path[(str(demo_dirs["artifacts"] / "onnx"), "onnx")],
    }
    assert list(by_path.values())[0] == roles["readable"]  # the --model path is the default
    yield f"http://127.0.0.1:{config.port}/", demo, roles
    demo.close()
    scorers.close()


@pytest.fixture(scope="module")
def client(served):
    return connect(served[0])


@pytest.fixture(scope="module")
def student_scorer(demo_dirs):
    return answerfirst.load(demo_dirs["student"])


@pytest.fixture(scope="module")
def readable_scorer(demo_dirs):
    return answerfirst.load(demo_dirs["readable"])


def assert_same_scores(payload, docs, expected, exact=True):
    assert [row["doc"] for row in payload["scores"]] == docs
    for row, s in zip(payload["scores"], expected, strict=True):
        assert row["grade"] == s.grade
        assert row["truncated"] == s.truncated
        if exact:
            assert row["expected"] == s.expected
            assert tuple(row["probs"]) == s.probs
        else:
            assert row["expected"] == pytest.approx(s.expected, abs=1e-9)
            assert row["probs"] == pytest.approx(list(s.probs), abs=1e-9)


# ------------------------------------------------------------------------------------------------
# Sources, inputs, examples: the plain functions behind the page
# ------------------------------------------------------------------------------------------------


def test_sources_list_the_model_then_each_artifact_and_variant(demo_dirs):
    config = DemoConfig(model=str(demo_dirs["readable"]), artifacts=str(demo_dirs["artifacts"]))
    sources = discover_sources(config)
    assert [(s.backend, s.variant, s.path) for s in sources] == [
        ("torch", None, str(demo_dirs["readable"])),
        ("torch", None, str(demo_dirs["artifacts"] / "student")),
        ("onnx", "int8", str(demo_dirs["artifacts"] / "onnx")),
    ]
    assert "parity ok" in sources[2].key
    scorers = Scorers(sources)
    info = describe_source(scorers, sources[1].key)  # loads the student on first pick
    assert info.startswith("✓ `torch`") and f"cut at {MAX_DOC_TOKENS} tokens" in info and "grades 0, 1, 2, 3, 4" in info
    # The same directory passed as --model is listed once.
    config = DemoConfig(model=str(demo_dirs["artifacts"] / "student"), artifacts=str(demo_dirs["artifacts"]))
    assert [s.backend for s in discover_sources(config)] == ["torch", "onnx"]


def test_missing_model_and_broken_export_are_messages_not_tracebacks(demo_dirs, tmp_path):
    config = DemoConfig(model=str(tmp_path / "nope"), artifacts=str(tmp_path / "none"))
    (missing,) = discover_sources(config)
    assert missing.problem and "make distill" in missing.problem
    scorers = Scorers([missing])
    with pytest.raises(DemoError, match="make distill"):
        scorers.get(missing.key)
    config = DemoConfig(model=str(demo_dirs["artifacts"] / "onnx"), artifacts=str(tmp_path / "none"))
    (onnx,) = discover_sources(config)
    scorers = Scorers([onnx])
    with pytest.raises(DemoError, match=r"(?s)Could not load.*Pick another model"):
        scorers.get(onnx.key)
    assert describe_source(scorers, onnx.key).startswith("⚠ ")


def test_parse_docs_and_config_validation():
    assert parse_docs("  a \n\n b\n   \n") == ["a", "b"]
    assert parse_docs(None) == []
    with pytest.raises(ValueError, match="concurrency_limit"):
        DemoConfig(concurrency_limit=0)
    with pytest.raises(ValueError, match="port"):
        DemoConfig(port=70000)


def test_examples_come_from_the_sample_data_when_it_exists():
    examples = load_examples()
    assert examples and all(len(e) == 2 and e[0].strip() and len(parse_docs(e[1])) >= 2 for e in examples)
    from answerfirst.distill.sample import sample_pairs

    queries = {str(p["query"] if isinstance(p, dict) else p.query) for p in sample_pairs()}
    assert all(query in queries for query, _ in examples)


# ------------------------------------------------------------------------------------------------
# The served endpoints (gradio_client)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_score_endpoint_returns_exactly_what_scorer_score_returns(served, client, student_scorer):
    _, _, roles = served
    docs = [*DOCS, LONG_DOC]
    table, status, payload, picker = client.predict(QUERY, "\n".join(docs), roles["student"], api_name=f"/{API_SCORE}")
    expected = student_scorer.score(QUERY, docs)
    assert_same_scores(payload, docs, expected)
    assert [s.truncated for s in expected] == [False] * len(DOCS) + [True]
    # The table lists documents best first, with a truncation badge and one bar per grade each.
    ranking = sorted(range(len(docs)), key=lambda i: -expected[i].expected)
    assert payload["ranking"] == ranking
    positions = [table.index(f'title="document {i + 1}"') for i in ranking]
    assert positions == sorted(positions)
    assert table.count('class="af-bar"') == len(docs) * 5
    assert f"truncated to {MAX_DOC_TOKENS} tokens" in table
    assert "Scored 6 documents in" in status and " ms" in status and "1 truncated" in status
    assert picker["value"] == str(ranking[0] + 1) and len(picker["choices"]) == len(docs)


@pytest.mark.slow
def test_score_endpoint_one_document(served, client, student_scorer):
    _, _, roles = served
    _, status, payload, _ = client.predict(QUERY, DOCS[3], roles["student"], api_name=f"/{API_SCORE}")
    assert_same_scores(payload, [DOCS[3]], student_scorer.score(QUERY, [DOCS[3]]))
    assert "Scored 1 document in" in status


@pytest.mark.slow
def test_bad_inputs_get_clear_messages(served, client):
    _, _, roles = served
    cases = [
        (("", "a doc", roles["student"]), "query is empty"),
        (("   ", "a doc", roles["student"]), "query is empty"),
        ((QUERY, "\n \n", roles["student"]), "No documents"),
        ((QUERY, "\n".join(["doc"] * 51), roles["student"]), "51 documents"),
        ((QUERY, "x" * 20_001, roles["student"]), "Document 1 is 20,001 characters"),
        (("q" * 1001, "a doc", roles["student"]), "query is 1,001 characters"),
        ((QUERY, "a doc", roles["onnx"]), "Pick another model"),
        ((QUERY, "a doc", "no such model"), "not in the list of choices"),
    ]
    for args, message in cases:
        with pytest.raises(AppError, match=message):
            client.predict(*args, api_name=f"/{API_SCORE}")
    with pytest.raises(AppError, match="Document 9 no longer exists"):
        client.predict(QUERY, "a doc", "9", roles["student"], 16, api_name=f"/{API_EXPLAIN}")
    # After all that, the page still scores.
    _, _, payload, _ = client.predict(QUERY, "a doc", roles["student"], api_name=f"/{API_SCORE}")
    assert len(payload["scores"]) == 1


@pytest.mark.slow
def test_missing_model_page_says_run_make_distill(tmp_path):
    config = DemoConfig(model=str(tmp_path / "student"), artifacts=str(tmp_path), port=free_port())
    scorers = Scorers(discover_sources(config))
    demo = build_app(config, scorers)
    launch(demo, config, block=False)
    try:
        (key,) = scorers.sources
        with pytest.raises(AppError, match="make distill"):
            connect(f"http://127.0.0.1:{config.port}/").predict(QUERY, "a doc", key, api_name="/score")
    finally:
        demo.close()


@pytest.mark.slow
def test_explain_endpoint_streams_the_runtime_explanation(served, client, readable_scorer):
    _, _, roles = served
    doc = DOCS[0]
    expected = "".join(readable_scorer.explain(QUERY, doc, max_new_tokens=24))
    grade = readable_scorer.score(QUERY, [doc])[0].grade
    job = client.submit(QUERY, "\n".join(DOCS), "1", roles["readable"], 24, api_name=f"/{API_EXPLAIN}")
    updates = [tuple(update) for update in job]  # each streamed (header, explanation so far)
    assert job.outputs()[-1] == updates[-1]
    texts = [text for _, text in updates]
    assert len(set(texts)) >= 5, texts  # several distinct partial explanations arrived
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))  # each extends the last
    header, final = updates[-1]
    assert final == expected and expected.strip()
    assert f"grade **{grade}**" in header and "explained in" in header


# ------------------------------------------------------------------------------------------------
# Load: 16 concurrent clients x 5 requests
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_16_concurrent_clients_x_5_requests(served, student_scorer):
    url, _, roles = served
    requests = [(f"{QUERY} {n}", DOCS[: 1 + n % len(DOCS)]) for n in range(16 * 5)]
    expected = [student_scorer.score(q, docs) for q, docs in requests]
    errors: list[BaseException] = []
    results: dict[int, dict] = {}

    def one_client(c: int) -> None:
        try:
            client = connect(url)
            for r in range(5):
                n = c * 5 + r
                query, docs = requests[n]
                results[n] = client.predict(query, "\n".join(docs), roles["student"], api_name=f"/{API_SCORE}")[2]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=one_client, args=(c,)) for c in range(16)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    assert sorted(results) == list(range(80))
    for n, (query, docs) in enumerate(requests):
        assert results[n]["query"] == query
        # Concurrent requests may run the model with a different intra-op thread split: allow
        # float summation-order noise, nothing more.
        assert_same_scores(results[n], docs, expected[n], exact=False)
    print(f"80 requests from 16 clients in {time.perf_counter() - start:.1f} s")


# ------------------------------------------------------------------------------------------------
# A real browser: Debian's chromium, headless, through Playwright
# ------------------------------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.mark.slow
def test_browser_scores_explains_and_fetches_nothing_from_outside(served, readable_scorer):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is absent: install it with `apt-get install -y chromium` (.ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api")
    url, _, _ = served
    requested: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.on("request", lambda request: requested.append(request.url))
            page.goto(url, wait_until="networkidle")
            page.locator("#af-source-info").get_by_text("✓").wait_for(timeout=30_000)  # default model loaded
            page.locator("#af-query textarea, #af-query input").first.fill(QUERY)
            page.locator("#af-docs textarea").first.fill("\n".join(DOCS))
            page.locator("#af-score").click()
            rows = page.locator("#af-ranked tbody tr")
            rows.first.wait_for(timeout=30_000)
            assert rows.count() == len(DOCS)
            page.locator("#af-status").get_by_text("Scored 5 documents in").wait_for(timeout=10_000)

            page.locator("#af-explain").click()
            page.wait_for_function(
                "() => (document.querySelector('#af-explanation textarea')?.value || '').length > 0"
                " && (document.querySelector('#af-explain-head')?.innerText || '').includes('explained in')",
                timeout=30_000,
            )
            shown = page.locator("#af-explanation textarea").input_value()
            SCREENSHOTS.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOTS / "demo.png"), full_page=True)
        finally:
            browser.close()
    # The top-ranked document is picked after scoring; its explanation is what the runtime generates.
    scores = readable_scorer.score(QUERY, DOCS)
    best = max(range(len(DOCS)), key=lambda i: scores[i].expected)
    assert shown == "".join(readable_scorer.explain(QUERY, DOCS[best], max_new_tokens=128))
    outside = [u for u in requested if not u.startswith((url.rstrip("/"), "data:", "blob:"))]
    assert not outside, f"the page fetched from outside: {outside}"


def test_cli_serves_the_page_and_says_how_to_build_a_missing_model(tmp_path, monkeypatch, capsys):
    """`answerfirst demo --model MISSING` through the real CLI: the page still comes up, the console
    says `make distill`. In-process, with the server started non-blocking so the test can stop it."""
    import urllib.request

    from answerfirst import cli
    from answerfirst.demo import app

    served_demos = []

    def launch_in_background(demo, config, *, block=True):
        served_demos.append(demo)
        return app_launch(demo, config, block=False)

    app_launch = app.launch
    monkeypatch.setattr(app, "launch", launch_in_background)
    port = free_port()
    argv = ["demo", "--model", str(tmp_path / "student"), "--artifacts", str(tmp_path), "--port", str(port)]
    try:
        assert cli.main(argv) == 0
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
        assert "answerfirst demo" in page
    finally:
        for demo in served_demos:
            demo.close()
    output = capsys.readouterr().out
    assert f"{tmp_path / 'student'} (missing)" in output and "make distill" in output
