#!/usr/bin/env python3
"""Medians over `server eval vision` reports (scripts/bench/vision.sh): dense accuracy and
prefill time, and per pruning scorer and kept fraction the accuracy, the prefill speed-up over
dense measured in the same run, and the prefill-FLOPs ratio, as a Markdown table."""
import json
import statistics
import sys


def main(paths):
    reports = [json.load(open(p)) for p in paths]
    dense_ms = statistics.median(r["median_prefill_ms"] for r in reports)
    tower_ms = statistics.median(r["median_vision_tower_ms"] for r in reports)
    first = reports[0]
    print(f"{len(reports)} runs of {first['questions']} held-out questions; "
          f"median prompt {first['median_prompt_tokens']:.0f} tokens; "
          f"vision tower {tower_ms:.1f} ms; dense prefill {dense_ms:.1f} ms\n")
    print("| scorer | image tokens kept | accuracy | prefill ms | prefill speed-up | FLOPs ratio |")
    print("|---|---|---|---|---|---|")
    print(f"| dense | 100% | {first['accuracy'] * 100:.1f}% | {dense_ms:.1f} | 1.00x | 1.00x |")
    rows = {}
    for r in reports:
        for row in r["pruning"]:
            rows.setdefault((row["scorer"], row["keep"]), []).append(row)
    for (scorer, keep), runs in rows.items():
        acc = runs[0]["accuracy"]  # greedy answers: every run answers alike
        ms = statistics.median(x["median_prefill_ms"] for x in runs)
        speedup = statistics.median(x["prefill_speedup"] for x in runs)
        flops = runs[0]["prefill_flops_ratio"]
        print(f"| {scorer} | {keep * 100:.0f}% | {acc * 100:.1f}% | {ms:.1f} | "
              f"{speedup:.2f}x | {flops:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1:])
