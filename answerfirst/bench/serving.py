"""`answerfirst serve-bench`: throughput and latency of a running `answerfirst serve` vs concurrency.

For each concurrency level C (default 1, 4, 16, 32), C clients, each with its own connection, send
the same `requests` rerank requests between them as fast as the replies come back: every level does
the same work, so the levels differ in concurrency alone. Every level runs `rounds` times (default
2), the levels in alternating order (1, 4, 16, 32, 32, 16, 4, 1), so a drift of the machine's speed
during the run weighs on every level alike. Within a run every request is a new query with its own
product documents (from the distillation sample generator), so no two requests share a prefix or a
pass and the numbers show the server's scheduling, not its reuse of repeated work (the server's
prefix cache holds the last two queries, and a run starts from the set's first request, sent last
long before). Per level: requests and documents per second (completed requests over the runs' wall
time), p50/p90/p99 latency, and every non-200 reply by status. Writes serve-bench.json and
serve-bench.md.

    answerfirst serve --model artifacts/onnx --timeout 600 &
    answerfirst serve-bench --url http://127.0.0.1:8080 --out bench/results/serve

Requests wait in the server's queue at high concurrency: give the server a --timeout longer than
C x the single-client latency, or the deepest levels count 504s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")


@dataclass(frozen=True)
class ServeBenchConfig:
    """url: the server; concurrency: client counts, one level each; requests: per run of a level;
    rounds: runs of every level, in alternating order; docs / doc_words: documents per request and
    their length range in words (~1.3 tokens each)."""

    url: str = "http://127.0.0.1:8080"
    concurrency: tuple[int, ...] = (1, 4, 16, 32)
    requests: int = 64
    docs: int = 8
    doc_words: tuple[int, int] = (48, 144)
    warmup: int = 2
    rounds: int = 2
    api_key: str | None = None
    client_timeout_s: float = 900.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency: positive client counts, got {list(self.concurrency)}")
        if self.requests < 1 or self.docs < 1 or self.warmup < 0 or self.rounds < 1:
            raise ValueError("requests, docs and rounds must be >= 1 and warmup >= 0")
        low, high = self.doc_words
        if not 1 <= low <= high:
            raise ValueError(f"doc_words: a range LOW,HIGH with 1 <= LOW <= HIGH, got {self.doc_words}")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url: an http(s) URL of a running `answerfirst serve`, got {self.url!r}")


def build_requests(config: ServeBenchConfig, count: int) -> list[dict[str, Any]]:
    """`count` rerank bodies, each a distinct query with `docs` product documents."""
    from answerfirst.distill.sample import sample_pairs

    rows = sample_pairs(seed=config.seed, n_queries=max(count, 2), docs_per_query=max(config.docs, 2),
                        heldout_fraction=0.5, doc_words=config.doc_words)
    by_query: dict[str, list[str]] = {}
    for row in rows:
        by_query.setdefault(row["query"], []).append(row["doc"])
    bodies = [{"query": q, "documents": docs[: config.docs]} for q, docs in by_query.items()]
    random.Random(config.seed).shuffle(bodies)
    return bodies[:count]


async def _level_run(config: ServeBenchConfig, concurrency: int, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """One run of `bodies` by `concurrency` clients: its raw counts (see _level)."""
    import httpx

    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    pending = list(reversed(bodies))
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    documents = tokens = 0

    async def client() -> None:
        nonlocal documents, tokens
        async with httpx.AsyncClient(base_url=config.url, timeout=config.client_timeout_s, headers=headers) as http:
            while pending:
                body = pending.pop()
                start = time.perf_counter()
                try:
                    response = await http.post("/v1/rerank", json=body)
                except httpx.TransportError as e:
                    statuses[type(e).__name__] += 1
                    continue
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                    documents += len(body["documents"])
                    tokens += response.json()["usage"]["total_tokens"]
                statuses[str(response.status_code)] += 1

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return {"seconds": time.perf_counter() - start, "latencies": latencies, "statuses": statuses,
            "documents": documents, "tokens": tokens}


def _level(concurrency: int, requests: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A level's results over its runs: throughput is everything completed over the runs' total time."""
    seconds = sum(r["seconds"] for r in runs)
    latencies = [t for r in runs for t in r["latencies"]]
    statuses = sum((r["statuses"] for r in runs), Counter())
    documents, tokens = sum(r["documents"] for r in runs), sum(r["tokens"] for r in runs)
    ok = len(latencies)
    percentiles = np.percentile(latencies, [50, 90, 99]).tolist() if latencies else [None] * 3
    return {
        "concurrency": concurrency,
        "requests": requests * len(runs),
        "runs": len(runs),
        "run_requests_per_s": [len(r["latencies"]) / r["seconds"] for r in runs],
        "ok": ok,
        "errors": {status: n for status, n in sorted(statuses.items()) if status != "200"},
        "seconds": seconds,
        "requests_per_s": ok / seconds,
        "documents_per_s": documents / seconds,
        "prompt_tokens": tokens,  # the server's count: equal at every level when every level does the same work
        "prompt_tokens_per_s": tokens / seconds,
        "latency_s": {"p50": percentiles[0], "p90": percentiles[1], "p99": percentiles[2],
                      "mean": float(np.mean(latencies)) if latencies else None, "max": max(latencies, default=None)},
    }


def run_serve_bench(config: ServeBenchConfig, progress=print) -> dict[str, Any]:
    """Run every level against config.url and return the results (what serve-bench.json holds)."""
    import httpx

    from answerfirst.bench.runner import machine_description

    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    try:
        health = httpx.get(f"{config.url}/health", timeout=30)
        models = httpx.get(f"{config.url}/v1/models", headers=headers, timeout=30)
    except httpx.TransportError as e:
        raise RuntimeError(f"no answerfirst server at {config.url} ({e}); start one with `answerfirst serve --model PATH`") from None
    if health.status_code != 200:
        raise RuntimeError(f"{config.url}/health is {health.status_code} ({health.text.strip()}); wait until the server is ready")
    if models.status_code != 200:
        raise RuntimeError(f"{config.url}/v1/models is {models.status_code}: {models.text.strip()} (pass --api-key?)")

    # Every level sends the same requests, so the levels differ in concurrency alone: with a new set
    # per level, the spread of document lengths between sets moves throughput by several percent.
    bodies = build_requests(config, config.warmup + config.requests)
    machine = {**machine_description(), "cpu_flags": _cpu_flags(), "loadavg_before": list(os.getloadavg())}
    started = datetime.now(timezone.utc)
    if config.warmup:
        progress(f"serve-bench: {config.warmup} warm-up request(s)")
        asyncio.run(_level_run(config, 1, bodies[: config.warmup]))
    # The levels run `rounds` times, in alternating order (1, 4, 16, 32, then 32, 16, 4, 1, ...): a
    # machine whose speed drifts during the run (this one's did, by several percent over minutes)
    # then weighs on every level alike instead of on the last ones.
    runs: dict[int, list[dict[str, Any]]] = {c: [] for c in config.concurrency}
    for round_ in range(config.rounds):
        for concurrency in (config.concurrency if round_ % 2 == 0 else tuple(reversed(config.concurrency))):
            run = asyncio.run(_level_run(config, concurrency, bodies[config.warmup :]))
            runs[concurrency].append(run)
            progress(f"serve-bench: round {round_ + 1}/{config.rounds}, {concurrency:3d} clients: "
                     f"{len(run['latencies']) / run['seconds']:.2f} req/s")
    levels = []
    for concurrency in config.concurrency:
        level = _level(concurrency, config.requests, runs[concurrency])
        levels.append(level)
        latency = level["latency_s"]
        progress(
            f"serve-bench: {concurrency:3d} clients: {level['requests_per_s']:.2f} req/s, {level['documents_per_s']:.1f} docs/s, "
            f"p50 {_fmt(latency['p50'])} s, p99 {_fmt(latency['p99'])} s, errors {level['errors'] or 0}"
        )
    machine["loadavg_after"] = list(os.getloadavg())
    by_clients = {level["concurrency"]: level["documents_per_s"] for level in levels}
    ratio = by_clients[16] / by_clients[1] if 1 in by_clients and 16 in by_clients and by_clients[1] else None
    return {
        "created_utc": started.strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["answerfirst", "serve-bench", *sys.argv[2:]]) if sys.argv[1:2] == ["serve-bench"] else None,
        "config": {**asdict(config), "api_key": bool(config.api_key)},
        "server": models.json()["data"][0],
        "machine": machine,
        "levels": levels,
        "throughput_16_over_1": ratio,
    }


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in CPU_FLAGS if flag in present]
    except OSError:
        pass
    return []


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "–" if value is None else f"{value:{spec}}"


def markdown(results: dict[str, Any]) -> str:
    machine, server, config = results["machine"], results["server"], results["config"]
    lines = [
        f"## answerfirst serve-bench ({results['created_utc']})",
        "",
        f"Server: `{server['id']}` on {server.get('backend', '?')}"
        + (f" ({server['variant']})" if server.get("variant") else "")
        + f", max batch {server.get('max_batch', '?')}, {server.get('concurrent_passes', 1)} concurrent pass(es)"
        + f" · requests: {config['docs']} documents of "
        f"{config['doc_words'][0]}–{config['doc_words'][1]} words, a new query each, the same {config['requests']} at every level, {config.get('rounds', 1)} run(s) of each in alternating order",
        f"Machine: {machine['nproc']} cores, {machine['cpu_model']} ({', '.join(machine['cpu_flags']) or 'no AVX-512/AMX'}) · "
        f"load average before/after: {machine['loadavg_before'][0]:.2f} / {machine['loadavg_after'][0]:.2f}",
        "",
        "| clients | requests/s | documents/s | p50 s | p90 s | p99 s | errors |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for level in results["levels"]:
        latency = level["latency_s"]
        errors = ", ".join(f"{n}× {status}" for status, n in level["errors"].items()) or "0"
        lines.append(
            f"| {level['concurrency']} | {level['requests_per_s']:.2f} | {level['documents_per_s']:.1f} | "
            f"{_fmt(latency['p50'])} | {_fmt(latency['p90'])} | {_fmt(latency['p99'])} | {errors} |"
        )
    ratio = results["throughput_16_over_1"]
    if ratio is not None:
        verdict = "met" if ratio >= 1.0 else "**missed**"
        lines += ["", f"Throughput at 16 clients / 1 client: {ratio:.2f}× (target ≥ 1.0×: {verdict})."]
    if results.get("command"):
        lines += ["", f"Command: `{results['command']}`"]
    return "\n".join(lines) + "\n"


def write_results(results: dict[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "serve-bench.json", "markdown": out / "serve-bench.md"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["markdown"].write_text(markdown(results))
    return paths


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="a running `answerfirst serve`")
    parser.add_argument("--concurrency", default="1,4,16,32", help="client counts, one level each (default 1,4,16,32)")
    parser.add_argument("--requests", type=int, default=64, help="requests per level (default 64)")
    parser.add_argument("--docs", type=int, default=8, help="documents per request (default 8)")
    parser.add_argument("--doc-words", default="48,144", help="document length range in words (default 48,144)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured requests first (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="times every level runs, in alternating order (default 2)")
    parser.add_argument("--api-key", default=None, help="the server's key (default: $ANSWERFIRST_API_KEY)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/serve", help="where serve-bench.json and .md go")


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    try:
        concurrency = tuple(int(c) for c in args.concurrency.split(","))
        low, high = (int(w) for w in args.doc_words.split(","))
    except ValueError:
        raise ValueError(f"--concurrency takes integers like 1,4,16,32 and --doc-words LOW,HIGH; got {args.concurrency!r}, {args.doc_words!r}") from None
    config = ServeBenchConfig(
        url=args.url.rstrip("/"), concurrency=concurrency, requests=args.requests, docs=args.docs,
        doc_words=(low, high), warmup=args.warmup, rounds=args.rounds, api_key=args.api_key or os.environ.get("ANSWERFIRST_API_KEY"), seed=args.seed,
    )
    results = run_serve_bench(config)
    paths = write_results(results, args.out)
    print(markdown(results))
    print(f"serve-bench: wrote {paths['json']} and {paths['markdown']}")
    return 0
