#!/usr/bin/env python3
"""Medians over repetitions of the prefix-caching benchmark (OUT/rep-N/<workload>/<server>/),
as one markdown table per workload: time to first token of the first turn and of the later ones,
throughput, the prompt tokens servers report from their caches, and graft's speed-up over graft
without its cache and over llama.cpp with its prompt cache (above 1: graft is better, for
latencies and rates alike). Standard library only.

usage: scripts/bench/prefix_cache_report.py OUT
"""
import glob
import json
import os
import statistics
import sys


def turn(level, name):
    rows = {t["turn"]: t for t in level.get("turns", [])}
    return rows.get(name, {}).get("median_ttft_ms")


def mean_cached(run_dir):
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "requests.jsonl"))]
    cached = [r["cached_tokens"] for r in rows if r.get("cached_tokens") is not None]
    return statistics.mean(cached) if cached else None


# (name, value of one run, format, lower is better)
METRICS = {
    "multi-turn": [
        ("TTFT p50 turn 1 ms", lambda l, d: turn(l, "1"), "{:.0f}", True),
        ("TTFT p50 turns 2+ ms", lambda l, d: turn(l, "2+"), "{:.0f}", True),
        ("E2E p50 ms", lambda l, d: l["e2e_ms"]["p50"], "{:.0f}", True),
        ("out tok/s", lambda l, d: l["output_token_rate"], "{:.1f}", False),
        ("cached prompt tok (mean)", lambda l, d: mean_cached(d), "{:.0f}", None),
    ],
    "shared": [
        ("TTFT p50 ms", lambda l, d: l["ttft_ms"]["p50"], "{:.0f}", True),
        ("TTFT p99 ms", lambda l, d: l["ttft_ms"]["p99"], "{:.0f}", True),
        ("E2E p50 ms", lambda l, d: l["e2e_ms"]["p50"], "{:.0f}", True),
        ("req/s", lambda l, d: l["request_rate"], "{:.2f}", False),
        ("out tok/s", lambda l, d: l["output_token_rate"], "{:.1f}", False),
        ("cached prompt tok (mean)", lambda l, d: mean_cached(d), "{:.0f}", None),
    ],
}
SERVERS = ["graft", "graft-nocache", "llama.cpp"]


def runs(out, workload, server):
    found = []
    for path in sorted(glob.glob(os.path.join(out, "rep-*", workload, server, "summary.json"))):
        with open(path) as f:
            found.append((json.load(f)["levels"][0], os.path.dirname(path)))
    return found


def speedup(ours, theirs, lower_is_better):
    if ours is None or theirs is None or lower_is_better is None or not ours or not theirs:
        return "-"
    return f"{(theirs / ours if lower_is_better else ours / theirs):.2f}x"


def main():
    out = sys.argv[1]
    for workload, metrics in METRICS.items():
        print(f"\n**{workload}** (medians of {len(runs(out, workload, 'graft'))} runs)\n")
        print("| metric | " + " | ".join(SERVERS) + " | graft vs no cache | graft vs llama.cpp |")
        print("|---" * (len(SERVERS) + 3) + "|")
        for name, get, fmt, lower in metrics:
            medians = []
            for server in SERVERS:
                values = [v for v in (get(l, d) for l, d in runs(out, workload, server)) if v is not None]
                medians.append(statistics.median(values) if values else None)
            cells = [fmt.format(m) if m is not None else "-" for m in medians]
            graft, nocache, llama = medians
            print(f"| {name} | " + " | ".join(cells)
                  + f" | {speedup(graft, nocache, lower)} | {speedup(graft, llama, lower)} |")


if __name__ == "__main__":
    main()
