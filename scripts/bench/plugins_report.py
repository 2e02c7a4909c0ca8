#!/usr/bin/env python3
"""Medians over repetitions of scripts/bench/plugins_http.sh's loadtest runs: aggregate output
tokens/s and latencies of the base-only run and the mixed-chain run (ratio mix / base), then each
chain inside the mixed run with its median TPOT and TTFT against the base requests of that run.
Standard library only.

usage: scripts/bench/plugins_report.py OUT
"""
import glob
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_report import FIELDS  # noqa: E402


def levels(out, name):
    found = []
    for path in sorted(glob.glob(os.path.join(out, "rep-*", name, "summary.json"))):
        with open(path) as f:
            found.extend(json.load(f)["levels"])
    return found


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec):
    return "-" if v is None else spec.format(v)


# The serving report's metrics, so both benchmarks read the loadtest summaries the same way.
AGGREGATE = [f for f in FIELDS if f[0] in {"out tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms", "TPOT p50 ms"}]


def main():
    out = sys.argv[1]
    base, mix = levels(out, "base"), levels(out, "mix")
    print("| metric | base only | mixed chains | mixed / base |")
    print("|---|---:|---:|---:|")
    for name, get, spec in AGGREGATE:
        b, m = med(map(get, base)), med(map(get, mix))
        ratio = f"{m / b:.3f}" if b and m is not None else "-"
        print(f"| {name} | {fmt(b, spec)} | {fmt(m, spec)} | {ratio} |")
    print("\n| chain in the mixed run | requests | TPOT p50 ms | vs base | TTFT p50 ms | vs base |")
    print("|---|---:|---:|---:|---:|---:|")
    names = [c["name"] for c in mix[0]["chains"]] if mix else []
    for name in names:
        runs = [c for l in mix for c in l["chains"] if c["name"] == name]
        over = [c["overhead"] or {} for c in runs]
        print(
            f"| {name} | {sum(c['completed'] for c in runs)} "
            f"| {fmt(med(c['median']['tpot'] for c in runs), '{:.1f}')} "
            f"| {fmt(med(o.get('tpot') for o in over), '{:.3f}')} "
            f"| {fmt(med(c['median']['ttft'] for c in runs), '{:.0f}')} "
            f"| {fmt(med(o.get('ttft') for o in over), '{:.3f}')} |"
        )
    print(f"\nmedians of {len(mix)} repetitions")


if __name__ == "__main__":
    main()
