#!/usr/bin/env python3
"""Medians over repetitions of scripts/bench/speculative.sh: output tokens/s and TPOT of the
base and ngram runs per workload and concurrency, the speed-up (ngram / base), and the share
of draft tokens accepted with the mean tokens emitted per verification step. Standard library
only.

usage: scripts/bench/speculative_report.py OUT
"""
import glob
import json
import os
import statistics
import sys


def level(path):
    with open(path) as f:
        return json.load(f)["levels"][0]


def med(values):
    values = list(values)
    return statistics.median(values) if values else None


def main():
    out = sys.argv[1]
    runs = {}
    for path in glob.glob(os.path.join(out, "rep-*", "*", "summary.json")):
        workload, c, config = os.path.basename(os.path.dirname(path)).rsplit("-", 2)
        runs.setdefault((workload, c, config), []).append(level(path))
    print("| workload | concurrency | base out tok/s | ngram out tok/s | speed-up | base TPOT p50 ms | ngram TPOT p50 ms | drafts accepted | tokens per verify step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for workload in ("grounded", "chat"):
        for c in sorted({k[1] for k in runs if k[0] == workload}, key=lambda s: int(s[1:])):
            base, ngram = runs.get((workload, c, "base"), []), runs.get((workload, c, "ngram"), [])
            b = med(l["output_token_rate"] for l in base)
            n = med(l["output_token_rate"] for l in ngram)
            bt = med(l["tpot_ms"]["p50"] for l in base)
            nt = med(l["tpot_ms"]["p50"] for l in ngram)
            deltas = []
            for path in glob.glob(os.path.join(out, f"spec-{workload}-{c}-rep-*.json")):
                with open(path) as f:
                    d = json.load(f)
                deltas.append({k: d["after"][k] - d["before"][k] for k in d["after"]})
            fed = sum(d["draft_tokens"] for d in deltas)
            accepted = sum(d["accepted_tokens"] for d in deltas)
            steps = sum(d["drafts"] for d in deltas)
            share = f"{accepted / fed:.0%}" if fed else "-"
            per_step = f"{1 + accepted / steps:.2f}" if steps else "-"
            ratio = f"{n / b:.2f}x" if b and n else "-"
            print(f"| {workload} | {c[1:]} | {b:.1f} | {n:.1f} | {ratio} | {bt:.1f} | {nt:.1f} | {share} | {per_step} |")


if __name__ == "__main__":
    main()
