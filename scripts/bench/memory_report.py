#!/usr/bin/env python3
"""Medians over repetitions of scripts/bench/memory_http.sh: output tokens/s and TPOT of the base
model and of the base with a memory decoder, at concurrency 1 and 8 (ratio memory / base), and
what the memory holds (bytes /v1/plugins reports, the server's RSS change on loading it).
Standard library only.

usage: scripts/bench/memory_report.py OUT
"""
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_report import FIELDS  # noqa: E402
from plugins_report import levels, med  # noqa: E402

SHOWN = [f for f in FIELDS if f[0] in {"out tok/s", "TPOT p50 ms", "TTFT p50 ms"}]


def main():
    out = sys.argv[1]
    print("| concurrency | metric | base | with the memory | memory / base |")
    print("|---:|---|---:|---:|---:|")
    for c in (1, 8):
        base, memory = levels(out, f"base-c{c}"), levels(out, f"memory-c{c}")
        for name, get, spec in SHOWN:
            b, m = med(map(get, base)), med(map(get, memory))
            ratio = f"{m / b:.3f}" if b and m is not None else "-"
            show = lambda v: "-" if v is None else spec.format(v)
            print(f"| {c} | {name} | {show(b)} | {show(m)} | {ratio} |")
    with open(os.path.join(out, "memory.json")) as f:
        mem = json.load(f)
    mib = lambda b: b / 2**20
    print(f"\nmemory plug-in: {mib(mem['plugin_bytes']):.1f} MiB in /v1/plugins; server RSS "
          f"{mib(mem['rss_before']):.0f} -> {mib(mem['rss_after']):.0f} MiB "
          f"(+{mib(mem['rss_after'] - mem['rss_before']):.1f}) on loading it")


if __name__ == "__main__":
    main()
