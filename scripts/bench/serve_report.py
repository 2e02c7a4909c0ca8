#!/usr/bin/env python3
"""Medians over repetitions of the loadtest summaries under OUT/rep-N/<server>/summary.json, as a
markdown table per concurrency: output tokens/s, goodput, TTFT/ITL/TPOT/E2E percentiles, with the
ratio graft / llama.cpp (for latencies, lower is better; for rates, higher). Standard library only.

usage: scripts/bench/serve_report.py OUT
"""
import glob
import json
import os
import statistics
import sys


def load(out):
    runs = {}
    for path in sorted(glob.glob(os.path.join(out, "rep-*", "*", "summary.json"))):
        server = os.path.basename(os.path.dirname(path))
        with open(path) as f:
            for level in json.load(f)["levels"]:
                runs.setdefault((server, level["label"]), []).append(level)
    return runs


FIELDS = [
    ("out tok/s", lambda l: l["output_token_rate"], "{:.1f}"),
    ("req/s", lambda l: l["request_rate"], "{:.2f}"),
    ("goodput", lambda l: l["goodput"] or 0.0, "{:.2f}"),
    ("TTFT p50 ms", lambda l: l["ttft_ms"]["p50"], "{:.0f}"),
    ("TTFT p99 ms", lambda l: l["ttft_ms"]["p99"], "{:.0f}"),
    ("ITL p50 ms", lambda l: l["itl_ms"]["p50"], "{:.1f}"),
    ("ITL p99 ms", lambda l: l["itl_ms"]["p99"], "{:.1f}"),
    ("TPOT p50 ms", lambda l: l["tpot_ms"]["p50"], "{:.1f}"),
    ("E2E p50 ms", lambda l: l["e2e_ms"]["p50"], "{:.0f}"),
]


def main():
    out = sys.argv[1]
    runs = load(out)
    labels = sorted({label for _, label in runs}, key=lambda s: int(s.split()[-1]))
    ours = sorted({s for s, _ in runs if s != "llama.cpp"})
    print("| concurrency | metric | " + " | ".join(ours) + " | llama.cpp | " + " | ".join(f"{s} / llama.cpp" for s in ours) + " |")
    print("|---" * (2 + 2 * len(ours) + 1) + "|")
    for label in labels:
        ref = runs.get(("llama.cpp", label), [])
        if not ref:
            continue
        for name, get, fmt in FIELDS:
            ml = statistics.median(map(get, ref))
            mine = [statistics.median(map(get, runs[(s, label)])) if (s, label) in runs else None for s in ours]
            cells = [fmt.format(m) if m is not None else "-" for m in mine]
            ratios = [f"{m / ml:.2f}x" if m is not None and ml else "-" for m in mine]
            print(f"| {label.split()[-1]} | {name} | " + " | ".join(cells) + f" | {fmt.format(ml)} | " + " | ".join(ratios) + " |")
    rss = {}
    for path in glob.glob(os.path.join(out, "rep-*", "*", "peak_rss_kib")):
        with open(path) as f:
            text = f.read().strip()
        if text:
            rss.setdefault(os.path.basename(os.path.dirname(path)), []).append(int(text) / 1024)
    if rss:
        cells = ", ".join(f"{s} {statistics.median(v):.0f} MiB" for s, v in sorted(rss.items()))
        print(f"\npeak RSS over the sweep (its largest level last): {cells}")
    reps = max((len(v) for v in runs.values()), default=0)
    print(f"\nmedians of {reps} repetitions; SLO for goodput: TTFT <= 1 s and TPOT <= 100 ms")


if __name__ == "__main__":
    main()
