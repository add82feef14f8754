"""One contender in its own process: `python -m answerfirst.bench.worker SPEC_JSON`.

The runner starts one worker per backend, so each backend's peak RSS is its own and no backend
inherits another's thread pools or allocator state. The worker loads the model, answers "ready",
then serves JSON-line requests on stdin until EOF:

    {"op": "score", "mode": "reuse" | "noreuse", "query": str, "docs": [str]}
        -> {"seconds": wall time of the scoring call, "probs": [[K floats]], "expected": [float],
            "peak_rss_bytes": the process's peak RSS during this call (see reset_peak_rss)}
    {"op": "stats"} -> {"peak_rss_bytes": int, "rss_bytes": int}

The "ready" reply carries the peak RSS of loading. Each call's own peak lets the runner report the
peak of the product configuration (prefix reuse on) apart from the no-reuse measurement runs, whose
batches are twice as long.

Replies go to the original stdout; fd 1 is pointed at stderr, so a library that prints (llama.cpp
does) cannot corrupt the protocol.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from typing import Any

MODES = ("reuse", "noreuse")


def open_contender(spec: dict[str, Any]) -> dict[str, Any]:
    """mode -> an object with .score(query, docs) -> list[Score]. A peer (the code a user writes
    without answerfirst) has the one mode "noreuse"; ours are timed with prefix reuse on and off."""
    threads, batch_size = spec["threads"], spec["batch_size"]
    if spec["kind"] in ("naive", "naive-keep1"):
        from answerfirst.bench.naive import NaiveReranker

        keep_last = spec["kind"] == "naive-keep1"
        return {"noreuse": NaiveReranker(spec["path"], threads=threads, batch_size=batch_size, keep_last=keep_last)}
    if spec["kind"] == "llamacpp-rank":
        from answerfirst.bench.llamacpp_rank import LlamaCppRankReranker

        peer = LlamaCppRankReranker(spec["path"], spec["variant"], threads, batch_size, spec["max_prompt_tokens"])
        return {"noreuse": peer}
    import answerfirst

    config = answerfirst.ScorerConfig()  # the shipped defaults: the CPU token budget (batch_size is the naive reference's)
    scorer = answerfirst.load(spec["path"], threads=threads, variant=spec.get("variant"), config=config,
                              precision=spec.get("precision"))
    # Same adapter (same weights, same threads), prefix reuse switched off: its gain is measured.
    no_reuse = answerfirst.Scorer(scorer.backend, scorer.prompts, replace(config, reuse_prefix=False), scorer.manifest)
    return {"reuse": scorer, "noreuse": no_reuse}


def peak_rss_bytes() -> int:
    """VmHWM: the high-water mark of this process's own address space. (getrusage's ru_maxrss is
    not used: Linux carries it over from the parent through fork + exec, so every worker would
    report at least the runner's RSS.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("/proc/self/status has no VmHWM line")


def reset_peak_rss() -> None:
    """Start a new VmHWM window (Linux >= 4.0: write 5 to clear_refs). Where the kernel refuses, the
    peak stays cumulative, which can only over-report."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> int:
    spec = json.loads(sys.argv[1])
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(message: dict[str, Any]) -> None:
        protocol.write(json.dumps(message) + "\n")

    try:
        started = time.perf_counter()
        scorers = open_contender(spec)
        reply({"ready": True, "load_seconds": time.perf_counter() - started, "rss_bytes": rss_bytes(),
               "peak_rss_bytes": peak_rss_bytes()})
    except Exception as e:  # reported to the runner, which records the contender as failed
        reply({"ready": False, "error": f"{type(e).__name__}: {e}"})
        return 1

    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "stats":
            reply({"peak_rss_bytes": peak_rss_bytes(), "rss_bytes": rss_bytes()})
            continue
        scorer = scorers.get(request["mode"])
        if scorer is None:
            reply({"error": f"{spec['name']} has no mode {request['mode']!r}"})
            continue
        if hasattr(scorer, "backend"):
            scorer.backend.forget_prefixes()  # every timed call is a new query: its prefix runs too
        try:
            reset_peak_rss()
            start = time.perf_counter()
            scores = scorer.score(request["query"], request["docs"])
            seconds = time.perf_counter() - start
        except Exception as e:
            reply({"error": f"{type(e).__name__}: {e}"})
            continue
        reply({"seconds": seconds, "probs": [list(s.probs) for s in scores], "expected": [s.expected for s in scores],
               "peak_rss_bytes": peak_rss_bytes()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
