"""The Gradio demo page: score documents for a query, see each grade distribution, stream an explanation.

    answerfirst demo --model artifacts/student [--host 127.0.0.1] [--port 7860]
    make demo

The page talks to the runtime API only (`answerfirst.load`, `Scorer.score`, `Scorer.explain`,
`Scorer.grades`, `Scorer.prompts.format`, `Scorer.manifest`); prompts, scores and backends all live
there. It lists every artifact it finds locally (the --model path, artifacts/student, artifacts/onnx,
artifacts/gguf and each variant of an export), loads one only when it is first picked, and says
plainly when one cannot be loaded. It runs fully offline: analytics off, the theme's fonts are the ones bundled with gradio,
no share link, no server-side rendering. Requests go through gradio's queue, which runs at most
`concurrency_limit` model calls at once.

Layout of this file: config, sources (what can be loaded), the scorer cache, the two page actions
(score, explain) as plain functions, HTML rendering, the Blocks page, then the CLI.
"""

from __future__ import annotations

import argparse
import html
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Set before gradio is imported anywhere: gradio reads these at import / Blocks creation.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

logger = logging.getLogger(__name__)

DEFAULT_ARTIFACTS = "artifacts"
# The directories `make distill` / `make export` write under the artifacts dir, in picker order.
ARTIFACT_DIRS = ("student", "onnx", "gguf")
API_SCORE, API_EXPLAIN = "score", "explain"

EXAMPLE_QUERIES = 6  # how many queries of the sample data become examples
EXAMPLE_DOCS = 6  # documents per example query


class DemoError(Exception):
    """A message for the person using the page (bad input, a model that cannot load); no traceback."""


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    """The demo's knobs.

    model: the artifact opened first (student checkpoint, ONNX/GGUF export dir, .gguf file);
        None = $ANSWERFIRST_MODEL, else artifacts/student (what `make distill` writes).
    artifacts: where `make distill` / `make export` put student/, onnx/, gguf/ (all listed if present).
    concurrency_limit: model calls (score or explain) running at once; the rest wait in the queue.
    max_queue: requests allowed to wait; more get a "queue full" error instead of an endless wait.
    max_docs / max_doc_chars / max_query_chars: input limits, so one request cannot tie the model up;
        documents are cut to the artifact's max_doc_tokens by the runtime (and shown as truncated).
    max_new_tokens_limit: the largest explanation length the slider offers.
    threads: torch / onnxruntime / llama.cpp threads per loaded model (None = the backend's default).
    """

    model: str | None = None
    artifacts: str = DEFAULT_ARTIFACTS
    host: str = "127.0.0.1"
    port: int | None = None
    concurrency_limit: int = 2
    max_queue: int = 64
    max_docs: int = 50
    max_doc_chars: int = 20_000
    max_query_chars: int = 1_000
    max_new_tokens_limit: int = 512
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.port is not None and not 0 < self.port < 65536:
            raise ValueError(f"port: must be in 1..65535, got {self.port}")
        if not self.host:
            raise ValueError("host: must be a host name or address, e.g. 127.0.0.1")
        for name in ("concurrency_limit", "max_queue", "max_docs", "max_doc_chars", "max_query_chars"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.max_new_tokens_limit, int) or self.max_new_tokens_limit < 8:
            raise ValueError(f"max_new_tokens_limit: must be an integer >= 8, got {self.max_new_tokens_limit!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads: must be a positive integer or None, got {self.threads!r}")

    @property
    def default_model(self) -> str:
        from answerfirst.runtime.api import DEFAULT_MODEL_ENV

        return self.model or os.environ.get(DEFAULT_MODEL_ENV) or str(Path(self.artifacts) / "student")


# ------------------------------------------------------------------------------------------------
# Sources: every artifact (and export variant) that exists locally
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One choice of the backend/artifact picker.

    key: the label shown in the picker (unique). backend: torch | onnx | gguf, or "" when unknown.
    problem: why this source cannot be loaded (missing path, unreadable manifest), else None.
    """

    key: str
    path: str
    backend: str
    variant: str | None = None
    problem: str | None = None


def discover_sources(config: DemoConfig) -> list[Source]:
    """The --model path first (even when missing, so the page can say how to build it), then
    artifacts/student, artifacts/onnx, artifacts/gguf with one entry per export variant."""
    paths = [config.default_model] + [str(Path(config.artifacts) / name) for name in ARTIFACT_DIRS]
    sources: list[Source] = []
    seen: set[str] = set()
    for i, path in enumerate(paths):
        resolved = str(Path(path).resolve())
        if resolved in seen:
            continue
        seen.add(resolved)
        if not Path(path).exists():
            if i == 0:  # only the requested model is listed when missing; absent exports are simply not there
                sources.append(Source(f"{path} (missing)", path, "", problem=missing_model_message(path)))
            continue
        sources.extend(_sources_of(path))
    return sources


def missing_model_message(path: str) -> str:
    return (
        f"No model at `{path}`. Build the default student with `make distill` "
        "(or start the demo with `--model PATH` pointing at a student checkpoint, ONNX or GGUF export)."
    )


def _sources_of(path: str) -> list[Source]:
    """One source per loadable file at `path`: the runtime's own artifact-kind detector decides."""
    from answerfirst.artifact import ManifestError, artifact_kind
    from answerfirst.runtime.api import BACKEND_OF_KIND

    location = Path(path)
    try:
        kind, manifest = artifact_kind(location)
    except ManifestError as e:
        return [Source(f"{path} (not loadable)", path, "", problem=f"`{path}`: {e}")]
    backend = BACKEND_OF_KIND[kind]
    if manifest is None or manifest.kind == "checkpoint" or not manifest.variants:
        return [Source(_label(location, backend, path), path, backend)]
    sources = []
    for v in manifest.variants:  # fastest first, as the exporter lists them
        parity = "parity ok" if v.parity_passed else "parity FAILED" if v.parity else "no parity report"
        sources.append(Source(_label(location, f"{backend} {v.name} ({parity})", path), path, backend, v.name))
    return sources


def _label(location: Path, what: str, path: str) -> str:
    """"student · torch — artifacts/student"; the directory name is left out when it repeats the backend."""
    name = location.name
    return f"{what} — {path}" if what.split()[0] == name else f"{name} · {what} — {path}"


# ------------------------------------------------------------------------------------------------
# Scorers: loaded lazily, once per source, shared by every request
# ------------------------------------------------------------------------------------------------


class Scorers:
    """Loads each source's Scorer on first use; a load that fails is reported, not cached (the
    artifact may still be being written), and other sources stay usable."""

    def __init__(self, sources: Sequence[Source], threads: int | None = None):
        self.sources = {s.key: s for s in sources}
        self.threads = threads
        self._scorers: dict[str, Any] = {}
        self._locks = {key: threading.Lock() for key in self.sources}
        self.load_seconds: dict[str, float] = {}

    def get(self, key: str | None) -> Any:
        if not key:
            raise DemoError("Pick a model in the backend / artifact list.")
        source = self.sources.get(key)
        if source is None:
            raise DemoError(f"Unknown model choice {key!r}; reload the page.")
        if source.problem:
            raise DemoError(source.problem)
        with self._locks[key]:  # two first requests for one source load it once
            if key not in self._scorers:
                self._scorers[key] = self._load(source)
            return self._scorers[key]

    def _load(self, source: Source) -> Any:
        import answerfirst

        start = time.perf_counter()
        backend = source.backend if source.backend in ("torch", "onnx", "gguf") else "auto"
        try:
            scorer = answerfirst.load(source.path, backend=backend, threads=self.threads, variant=source.variant)
        except Exception as e:  # noqa: BLE001 - any load failure becomes a message on the page
            logger.warning("could not load %s: %s", source.key, e)
            raise DemoError(f"Could not load {source.key}: {e}. Pick another model.") from None
        self.load_seconds[source.key] = time.perf_counter() - start
        logger.debug("loaded %s in %.2f s", source.key, self.load_seconds[source.key])
        return scorer

    def close(self) -> None:
        for scorer in self._scorers.values():
            scorer.close()
        self._scorers.clear()


# ------------------------------------------------------------------------------------------------
# Page actions, as plain functions (the Blocks handlers below only wrap them)
# ------------------------------------------------------------------------------------------------


def parse_docs(text: str | None) -> list[str]:
    """One document per line; blank lines are skipped."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def check_inputs(config: DemoConfig, query: str | None, docs: list[str]) -> str:
    query = (query or "").strip()
    if not query:
        raise DemoError("The query is empty: type what the searcher asked for.")
    if len(query) > config.max_query_chars:
        raise DemoError(
            f"The query is {len(query):,} characters; the demo accepts up to {config.max_query_chars:,}. Shorten it."
        )
    if not docs:
        raise DemoError("No documents: paste one document per line.")
    if len(docs) > config.max_docs:
        raise DemoError(f"{len(docs)} documents; the demo scores up to {config.max_docs} at once. Remove some lines.")
    for i, doc in enumerate(docs, 1):
        if len(doc) > config.max_doc_chars:
            raise DemoError(
                f"Document {i} is {len(doc):,} characters; the demo accepts up to {config.max_doc_chars:,} per "
                "document (the model reads only its first max_doc_tokens tokens anyway). Shorten it."
            )
    return query


@dataclass(frozen=True)
class ScoredDocs:
    """One Score call: the inputs, the runtime's scores (input order) and how long the call took."""

    query: str
    docs: list[str]
    scores: list[Any]  # answerfirst.Score, one per doc, input order
    grades: tuple[str, ...]
    values: tuple[float, ...]
    grade_names: dict[str, str]
    max_doc_tokens: int | None
    seconds: float
    backend: str
    source: str

    @property
    def ranking(self) -> list[int]:
        """Document indices, best first (by expected grade; ties keep input order)."""
        return sorted(range(len(self.docs)), key=lambda i: -self.scores[i].expected)

    def as_json(self) -> dict[str, Any]:
        """Exactly the runtime's numbers (float64 repr round-trips through JSON), in input order."""
        return {
            "query": self.query,
            "grades": list(self.grades),
            "backend": self.backend,
            "source": self.source,
            "latency_ms": round(self.seconds * 1000, 3),
            "ranking": self.ranking,
            "scores": [
                {
                    "doc": doc,
                    "grade": s.grade,
                    "grade_label": self.grades[s.grade],
                    "expected": s.expected,
                    "probs": list(s.probs),
                    "truncated": s.truncated,
                }
                for doc, s in zip(self.docs, self.scores, strict=True)
            ],
        }


def score_documents(scorers: Scorers, config: DemoConfig, source_key: str, query: str, docs_text: str) -> ScoredDocs:
    docs = parse_docs(docs_text)
    query = check_inputs(config, query, docs)
    scorer = scorers.get(source_key)
    start = time.perf_counter()
    from answerfirst.runtime.api import NonFiniteScoreError

    try:
        scores = scorer.score(query, docs)
    except (ValueError, NonFiniteScoreError) as e:  # the runtime names what is wrong with the input or model
        raise DemoError(str(e)) from None
    seconds = time.perf_counter() - start
    fmt = scorer.prompts.format  # the format it scores with (the manifest's, with any max_doc_tokens override)
    return ScoredDocs(
        query=query,
        docs=docs,
        scores=scores,
        grades=tuple(scorer.grades),
        values=tuple(fmt.values),
        grade_names=grade_names(scorer),
        max_doc_tokens=fmt.max_doc_tokens,
        seconds=seconds,
        backend=getattr(scorer.backend, "name", "?"),
        source=source_key,
    )


def explain_document(
    scorers: Scorers, config: DemoConfig, source_key: str, query: str, docs_text: str, doc_choice: Any, max_new_tokens: Any
) -> Iterator[tuple[str, str]]:
    """Yields (header_markdown, explanation_so_far): first the fixed grade, then the text as it grows."""
    docs = parse_docs(docs_text)
    query = check_inputs(config, query, docs)
    index = doc_index(doc_choice, len(docs))
    try:
        max_new_tokens = int(max_new_tokens)
    except (TypeError, ValueError):
        raise DemoError(f"Explanation length must be a number of tokens, got {max_new_tokens!r}.") from None
    if not 1 <= max_new_tokens <= config.max_new_tokens_limit:
        raise DemoError(f"Explanation length must be between 1 and {config.max_new_tokens_limit} tokens.")
    scorer = scorers.get(source_key)
    doc = docs[index]
    try:
        score = scorer.score(query, [doc])[0]
        pieces = scorer.explain(query, doc, max_new_tokens=max_new_tokens)
    except ValueError as e:
        raise DemoError(str(e)) from None
    names = grade_names(scorer)
    grade = scorer.grades[score.grade]
    name = f" · {names[grade]}" if grade in names else ""
    cut = " · document truncated" if score.truncated else ""
    head = (
        f"**Document {index + 1}** — grade **{html.escape(grade)}**{html.escape(name)} "
        f"(p = {score.probs[score.grade]:.2f}, expected {score.expected:.2f}){cut}"
    )
    yield head + " · *explaining…*", ""
    start = time.perf_counter()
    text = ""
    for piece in pieces:
        text += piece
        yield head + " · *explaining…*", text
    seconds = time.perf_counter() - start
    yield head + f" · explained in {seconds:.2f} s", text


def describe_source(scorers: Scorers, source_key: str | None) -> str:
    """Load the picked model (first pick only) and say what it is, or why it cannot be used."""
    try:
        scorer = scorers.get(source_key)
    except DemoError as e:
        return f"⚠ {e}"
    source = scorers.sources[source_key]
    parts = [f"✓ `{getattr(scorer.backend, 'name', source.backend)}`"]
    if source.key in scorers.load_seconds:
        parts.append(f"loaded in {scorers.load_seconds[source.key]:.1f} s")
    parts.append("grades " + ", ".join(scorer.grades))
    manifest = scorer.manifest
    if manifest is not None:
        parts.append(f"documents cut at {manifest.format.max_doc_tokens} tokens")
        if source.variant:
            v = manifest.variant(source.variant)
            parity = "passed" if v.parity_passed else "FAILED" if v.parity else "not measured"
            parts.append(f"{v.quantization} · parity vs torch {parity}")
    else:
        parts.append("no answerfirst.json (default format)")
    return " · ".join(parts)


def doc_index(doc_choice: Any, n_docs: int) -> int:
    """The picked document (1-based in the picker) as a 0-based index; none picked = the first."""
    if doc_choice in (None, ""):
        return 0
    try:
        index = int(doc_choice) - 1
    except (TypeError, ValueError):
        raise DemoError(f"Unknown document choice {doc_choice!r}; score again and pick a document.") from None
    if not 0 <= index < n_docs:
        raise DemoError(f"Document {index + 1} no longer exists ({n_docs} documents now); pick another one.")
    return index


def doc_choices(docs_text: str | None) -> list[tuple[str, str]]:
    """Picker entries ("3 · first words of doc", "3") for the current documents."""
    return [(f"{i} · {_snippet(doc, 70)}", str(i)) for i, doc in enumerate(parse_docs(docs_text), 1)]


def grade_names(scorer: Any) -> dict[str, str]:
    """Grade -> short name from the artifact's rubric lines "4 = exact match: ..." (empty if none)."""
    return {scorer.grades[k]: name for k, name in scorer.prompts.format.grade_names().items()}


def load_examples() -> list[list[str]]:
    """[query, documents (one per line)] examples from the sample data (answerfirst.distill.sample),
    grouped by query."""
    from answerfirst.distill.sample import sample_pairs

    pairs = list(sample_pairs())
    # Held-out queries first: the student never trained on them, so the demo shows honest scores.
    pairs.sort(key=lambda pair: (pair.get("split") if isinstance(pair, dict) else None) != "heldout")
    by_query: dict[str, list[str]] = {}
    for pair in pairs:
        query, doc = _field(pair, "query"), _field(pair, "doc")
        docs = by_query.setdefault(query, [])
        if len(docs) < EXAMPLE_DOCS and doc not in docs and "\n" not in doc.strip():
            docs.append(doc.strip())
    return [[q, "\n".join(d)] for q, d in by_query.items() if len(d) >= 2][:EXAMPLE_QUERIES]


def _field(pair: Any, name: str) -> str:
    return str(pair[name] if isinstance(pair, dict) else getattr(pair, name))


# ------------------------------------------------------------------------------------------------
# HTML: the ranked table with a grade-probability chart per document
# ------------------------------------------------------------------------------------------------

# Bar colour per grade position, low (red) to high (green); interpolated for other K.
_GRADE_COLOURS = ("#d9534f", "#f0883e", "#e3b341", "#7cb342", "#2e9d5b")

CSS = """
.af-title h1 { margin-bottom: 0; }
.af-status { font-size: 0.95em; }
.af-hint { font-size: 0.85em; color: var(--body-text-color-subdued); }
.af-table { width: 100%; border-collapse: collapse; font-size: 0.95em; border: none !important; }
.af-table th, .af-table td { border-left: none !important; border-right: none !important;
  border-top: none !important; background: transparent !important; }
.af-table tr { border: none !important; }
.af-table tbody tr:hover td { background: var(--background-fill-secondary) !important; }
.af-table th { text-align: left; padding: 6px 8px; border-bottom: 2px solid var(--border-color-primary);
  color: var(--body-text-color-subdued); font-weight: 600; }
.af-table td { padding: 8px; border-bottom: 1px solid var(--border-color-primary); vertical-align: middle; }
.af-rank { font-weight: 700; width: 2.5em; color: var(--body-text-color-subdued); }
.af-doc { max-width: 34em; }
.af-num { font-variant-numeric: tabular-nums; white-space: nowrap; }
.af-grade { display: inline-block; min-width: 1.8em; text-align: center; border-radius: 6px; padding: 2px 6px;
  color: white; font-weight: 700; }
.af-name { color: var(--body-text-color-subdued); font-size: 0.85em; margin-left: 6px; }
.af-p { display: block; color: var(--body-text-color-subdued); font-size: 0.8em; margin-top: 2px; }
#af-explain { align-self: flex-end; min-height: 42px; }
.af-exp { display: flex; align-items: center; gap: 6px; }
.af-expbar { width: 70px; height: 8px; background: var(--border-color-primary); border-radius: 4px; overflow: hidden; }
.af-expbar > div { height: 100%; background: var(--color-accent); }
.af-chart { display: flex; align-items: flex-end; gap: 3px; height: 58px; }
.af-col { display: flex; flex-direction: column; align-items: center; justify-content: flex-end; height: 100%;
  width: 22px; }
.af-bar { width: 16px; border-radius: 3px 3px 0 0; min-height: 1px; }
.af-lab { font-size: 0.7em; color: var(--body-text-color-subdued); line-height: 1.2; }
.af-cut { display: inline-block; margin-left: 6px; padding: 0 6px; border-radius: 6px; font-size: 0.8em;
  background: #fff3cd; color: #7a5b00; border: 1px solid #e3c66b; }
.af-empty { color: var(--body-text-color-subdued); padding: 12px 0; }
#af-explanation textarea { font-family: var(--font-mono); font-size: 0.92em; }
"""


def grade_colour(k: int, n: int) -> str:
    if n <= 1:
        return _GRADE_COLOURS[-1]
    return _GRADE_COLOURS[round(k * (len(_GRADE_COLOURS) - 1) / (n - 1))]


def render_table(result: ScoredDocs) -> str:
    grades, n = result.grades, len(result.grades)
    top, bottom = max(result.values), min(result.values)
    rows = []
    for rank, i in enumerate(result.ranking, 1):
        s = result.scores[i]
        grade = grades[s.grade]
        name = result.grade_names.get(grade, "")
        cut = ""
        if s.truncated:
            limit = f" to {result.max_doc_tokens} tokens" if result.max_doc_tokens else ""
            cut = f'<span class="af-cut" title="only the first tokens were scored">truncated{limit}</span>'
        share = 0.0 if top == bottom else (s.expected - bottom) / (top - bottom)
        bars = "".join(
            f'<div class="af-col" title="P(grade {_esc(g)}) = {p:.3f}">'
            f'<div class="af-bar" style="height:{max(p, 0.0) * 44:.1f}px;background:{grade_colour(k, n)}"></div>'
            f'<div class="af-lab">{_esc(g)}</div></div>'
            for k, (g, p) in enumerate(zip(grades, s.probs, strict=True))
        )
        rows.append(
            "<tr>"
            f'<td class="af-rank">{rank}</td>'
            f'<td class="af-doc" title="document {i + 1}">{_esc(_snippet(result.docs[i], 220))}{cut}</td>'
            f'<td class="af-num"><span class="af-grade" style="background:{grade_colour(s.grade, n)}">{_esc(grade)}'
            f'</span><span class="af-name">{_esc(name)}</span>'
            f'<span class="af-p">p = {s.probs[s.grade]:.2f}</span></td>'
            f'<td class="af-num"><div class="af-exp">{s.expected:.3f}'
            f'<div class="af-expbar"><div style="width:{share * 100:.1f}%"></div></div></div></td>'
            f'<td><div class="af-chart">{bars}</div></td>'
            "</tr>"
        )
    return (
        '<table class="af-table" id="af-ranked"><thead><tr><th>#</th><th>Document</th><th>Grade</th>'
        "<th>Expected</th><th>P(grade)</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def render_status(result: ScoredDocs) -> str:
    n = len(result.docs)
    docs = "1 document" if n == 1 else f"{n} documents"
    cut = sum(s.truncated for s in result.scores)
    note = ""
    if cut:
        limit = f"{result.max_doc_tokens} tokens" if result.max_doc_tokens else "the model's document limit"
        note = f" · ⚠ {cut} truncated to {limit} (only the start of each was scored)"
    return f"Scored {docs} in **{result.seconds * 1000:.1f} ms** on `{result.backend}` ({result.source}){note}"


EMPTY_TABLE = '<div class="af-empty">Type a query and documents, then press <b>Score</b>.</div>'


def _snippet(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _esc(text: str) -> str:
    # "$" too: gr.HTML renders its value through a JS template string.
    return html.escape(text).replace("$", "&#36;")


# ------------------------------------------------------------------------------------------------
# The page
# ------------------------------------------------------------------------------------------------


def build_app(config: DemoConfig, scorers: Scorers | None = None) -> Any:
    """The Blocks page. API endpoints: /score (query, docs, model) -> (table_html, status, json, picker)
    and /explain (query, docs, doc, model, max_new_tokens) -> streamed (header, explanation)."""
    gr = _gradio()
    scorers = scorers or Scorers(discover_sources(config), threads=config.threads)
    with gr.Blocks(title="answerfirst demo", analytics_enabled=False) as demo:
        page = _page(gr, config, list(scorers.sources.values()))
        _connect(gr, demo, page, config, scorers)
    demo.queue(max_size=config.max_queue, default_concurrency_limit=config.concurrency_limit)
    return demo


def _page(gr: Any, config: DemoConfig, sources: list[Source]) -> dict[str, Any]:
    """Lay out the page (inside the Blocks context); returns its interactive components by name."""
    keys = [s.key for s in sources]
    default = next((s.key for s in sources if not s.problem), keys[0] if keys else None)
    problem = next((s.problem for s in sources if s.key == default and s.problem), None)
    gr.Markdown(
        "# answerfirst · relevance demo\n"
        "Answer-First, Reason-Later: the grade is the model's **first** token, so a score is one forward "
        "pass (a softmax over the grade tokens). The explanation is generated only when you ask.",
        elem_classes="af-title",
    )
    if problem:
        gr.Markdown(f"⚠ {problem}", elem_id="af-problem")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            query = gr.Textbox(label="Query", placeholder="e.g. red running shoes", max_lines=2, elem_id="af-query")
            docs = gr.Textbox(
                label="Documents (one per line)",
                lines=7,
                max_lines=20,
                placeholder="Lightweight red running shoes with a breathable mesh upper.\nBlue trail shoes, size 42.",
                elem_id="af-docs",
            )
        with gr.Column(scale=1, min_width=260):
            source = gr.Dropdown(
                choices=keys, value=default, label="Backend / artifact", elem_id="af-source", interactive=True
            )
            source_info = gr.Markdown("", elem_classes="af-hint", elem_id="af-source-info")
            score_button = gr.Button("Score", variant="primary", size="lg", elem_id="af-score")
            gr.Markdown(
                "Ranks the documents by expected grade. Models load on first use; "
                "the latency shown is the scoring call alone.",
                elem_classes="af-hint",
            )
    gr.Examples(examples=load_examples(), inputs=[query, docs], label="Examples (sample data)", examples_per_page=6)
    status = gr.Markdown("", label="status", elem_classes="af-status", elem_id="af-status")
    table = gr.HTML(EMPTY_TABLE, label="ranked documents", elem_id="af-table")
    with gr.Accordion("Scores as JSON (exactly what Scorer.score() returned)", open=False):
        scores_json = gr.JSON(label="scores", elem_id="af-json")
    gr.Markdown("### Explain a document")
    with gr.Row(equal_height=False):
        doc_pick = gr.Dropdown(  # custom values allowed: API callers pass a number without scoring first
            choices=[], label="Document", elem_id="af-doc-pick", scale=3, interactive=True, allow_custom_value=True
        )
        max_new_tokens = gr.Slider(
            8, config.max_new_tokens_limit, value=min(128, config.max_new_tokens_limit), step=8,
            label="Max explanation length (tokens)", elem_id="af-max-tokens", scale=2,
        )
        explain_button = gr.Button("Explain", elem_id="af-explain", scale=1, min_width=120)
    explain_head = gr.Markdown("", label="grade", elem_id="af-explain-head")
    explanation = gr.Textbox(
        label="Explanation (streamed after the fixed grade)", lines=6, max_lines=20, interactive=False,
        elem_id="af-explanation",
    )

    return {
        "query": query, "docs": docs, "source": source, "source_info": source_info, "score": score_button,
        "status": status, "table": table, "json": scores_json, "doc_pick": doc_pick, "max_new_tokens": max_new_tokens,
        "explain": explain_button, "explain_head": explain_head, "explanation": explanation,
    }  # fmt: skip


def _connect(gr: Any, demo: Any, page: dict[str, Any], config: DemoConfig, scorers: Scorers) -> None:
    """Wire the page's events to the plain functions above; DemoError becomes a message on the page."""

    def on_score(query: str, docs_text: str, source_key: str):
        try:
            result = score_documents(scorers, config, source_key, query, docs_text)
        except DemoError as e:
            raise gr.Error(str(e), print_exception=False) from None
        best = str(result.ranking[0] + 1)
        return (
            render_table(result),
            render_status(result),
            result.as_json(),
            gr.Dropdown(choices=doc_choices(docs_text), value=best),
        )

    def on_explain(query: str, docs_text: str, doc_choice: str, source_key: str, max_new_tokens: float):
        try:
            yield from explain_document(scorers, config, source_key, query, docs_text, doc_choice, max_new_tokens)
        except DemoError as e:
            raise gr.Error(str(e), print_exception=False) from None

    def on_docs_change(docs_text: str, doc_choice: str):
        choices = doc_choices(docs_text)
        value = doc_choice if doc_choice in {v for _, v in choices} else (choices[0][1] if choices else None)
        return gr.Dropdown(choices=choices, value=value)

    # One concurrency group for both model calls: at most `concurrency_limit` run at once.
    model_calls = dict(concurrency_id="model", concurrency_limit=config.concurrency_limit)
    score_inputs = [page["query"], page["docs"], page["source"]]
    score_outputs = [page["table"], page["status"], page["json"], page["doc_pick"]]
    page["score"].click(on_score, score_inputs, score_outputs, api_name=API_SCORE, **model_calls)
    # Enter in the query box scores too; same queue slot, no second API name
    page["query"].submit(on_score, score_inputs, score_outputs, api_name=False, **model_calls)
    page["explain"].click(
        on_explain, [page["query"], page["docs"], page["doc_pick"], page["source"], page["max_new_tokens"]],
        [page["explain_head"], page["explanation"]], api_name=API_EXPLAIN, **model_calls,
    )  # fmt: skip
    # Picking a model loads it (once) and says what it is, or why it cannot be loaded.
    for trigger in (page["source"].change, demo.load):
        trigger(lambda key: describe_source(scorers, key), [page["source"]], [page["source_info"]], api_name=False,
                show_progress="minimal", **model_calls)
    page["docs"].change(on_docs_change, [page["docs"], page["doc_pick"]], [page["doc_pick"]], queue=False,
                        api_name=False, show_progress="hidden")


def launch(demo: Any, config: DemoConfig, *, block: bool = True) -> Any:
    """Serve the page on config.host:config.port; offline settings only (no share link, no SSR)."""
    gr = _gradio()
    theme = gr.themes.Soft(primary_hue="indigo", neutral_hue="slate")  # fonts bundled with gradio
    return demo.launch(
        server_name=config.host,
        server_port=config.port,
        share=False,
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        inbrowser=False,
        prevent_thread_lock=not block,
        quiet=not block,
        show_error=True,
        footer_links=["api"],
        theme=theme,
        css=CSS,
    )


def _gradio() -> Any:
    from answerfirst.extras import requires

    with requires("demo", "the demo"):
        import gradio as gr
    return gr


# ------------------------------------------------------------------------------------------------
# CLI: `answerfirst demo`
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None,
        help="artifact to open first (default: $ANSWERFIRST_MODEL, else artifacts/student from `make distill`)",
    )
    parser.add_argument("--artifacts", default=DEFAULT_ARTIFACTS, help="where student/, onnx/, gguf/ are listed from")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 = every interface)")
    parser.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    parser.add_argument("--concurrency", type=int, default=2, help="model calls running at once (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="threads per loaded model")


def run(args: argparse.Namespace) -> int:
    _gradio()  # a missing [demo] extra fails before any model loads
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own startup self-checks, one line each
    config = DemoConfig(
        model=args.model, artifacts=args.artifacts, host=args.host, port=args.port,
        concurrency_limit=args.concurrency, threads=args.threads,
    )
    scorers = Scorers(discover_sources(config), threads=config.threads)
    print("answerfirst demo: models found")
    for source in scorers.sources.values():
        print(f"  {source.key}" + (f"  -- {source.problem}" if source.problem else ""))
    first = next((s for s in scorers.sources.values() if not s.problem), None)
    if first is None:
        print(f"answerfirst demo: {missing_model_message(config.default_model)}")
    else:
        try:  # warm the default model so the first click is fast; a failure shows on the page instead
            scorers.get(first.key)
            print(f"answerfirst demo: loaded {first.key} in {scorers.load_seconds[first.key]:.1f} s")
        except DemoError as e:
            print(f"answerfirst demo: {e}")
    demo = build_app(config, scorers)
    try:
        launch(demo, config, block=True)
    finally:
        scorers.close()
    return 0
