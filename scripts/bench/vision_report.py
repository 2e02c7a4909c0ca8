#!/usr/bin/env python3
"""Medians over `server eval vision` reports (scripts/bench/vision.sh): dense accuracy and
prefill time, and per pruning scorer and kept fraction the accuracy, the share of questions
answered word for word as dense, the prefill speed-up over dense measured in the same run, and
the prefill-FLOPs ratio, as a Markdown table."""
import json
import statistics
import sys

COLOURS = {"dense": "#333333", "random": "#1f77b4", "attention": "#d62728", "learned": "#2ca02c"}


def svg(rows, dense_acc, path):
    """Two panels against the share of image tokens kept: accuracy, and prefill speed-up."""
    w, h, pad = 360, 240, 44
    panels = [("accuracy (%)", lambda r: r[2] * 100, dense_acc * 100, 0, 100),
              ("prefill speed-up (x)", lambda r: r[3], 1.0, 0.8, 2.0)]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w}" height="{h}" '
           'font-family="sans-serif" font-size="11">']
    for p, (title, value, dense, lo, hi) in enumerate(panels):
        x0 = p * w

        def px(keep):
            return x0 + pad + (1 - keep) * (w - 2 * pad)

        def py(v):
            return h - pad - (v - lo) / (hi - lo) * (h - 2 * pad)

        out.append(f'<text x="{x0 + w / 2}" y="16" text-anchor="middle">{title}</text>')
        out.append(f'<line x1="{x0 + pad}" y1="{h - pad}" x2="{x0 + w - pad}" y2="{h - pad}" stroke="black"/>')
        out.append(f'<line x1="{x0 + pad}" y1="{pad}" x2="{x0 + pad}" y2="{h - pad}" stroke="black"/>')
        for keep in (1.0, 0.5, 0.25, 0.1):
            out.append(f'<text x="{px(keep)}" y="{h - pad + 14}" text-anchor="middle">{keep * 100:.0f}%</text>')
        out.append(f'<text x="{x0 + w / 2}" y="{h - 8}" text-anchor="middle">image tokens kept</text>')
        for v in (lo, (lo + hi) / 2, hi):
            out.append(f'<text x="{x0 + pad - 4}" y="{py(v) + 4}" text-anchor="end">{v:g}</text>')
        for scorer in sorted({r[0] for r in rows}):
            pts = [(1.0, dense)] + [(r[1], value(r)) for r in rows if r[0] == scorer]
            line = " ".join(f"{px(k):.1f},{py(v):.1f}" for k, v in pts)
            colour = COLOURS.get(scorer, "#777777")
            out.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>')
            k, v = pts[-1]
            out.append(f'<text x="{px(k) + 4}" y="{py(v)}" fill="{colour}">{scorer}</text>')
    out.append("</svg>")
    open(path, "w").write("\n".join(out))


def main(args):
    plot = None
    if args[:1] == ["--svg"]:
        plot, args = args[1], args[2:]
    reports = [json.load(open(p)) for p in args]
    dense_ms = statistics.median(r["median_prefill_ms"] for r in reports)
    tower_ms = statistics.median(r["median_vision_tower_ms"] for r in reports)
    first = reports[0]
    runs = "run" if len(reports) == 1 else "runs"
    print(f"{len(reports)} {runs} of {first['questions']} held-out questions; "
          f"median prompt {first['median_prompt_tokens']:.0f} tokens; "
          f"vision tower {tower_ms:.1f} ms; dense prefill {dense_ms:.1f} ms\n")
    print("| scorer | image tokens kept | accuracy | same answer as dense | prefill ms "
          "| prefill speed-up | FLOPs ratio |")
    print("|---|---|---|---|---|---|---|")
    print(f"| dense | 100% | {first['accuracy'] * 100:.1f}% | 100% | {dense_ms:.1f} | 1.00x "
          "| 1.00x |")
    rows, points = {}, []
    for r in reports:
        for row in r["pruning"]:
            rows.setdefault((row["scorer"], row["keep"]), []).append(row)
    for (scorer, keep), runs in rows.items():
        acc = runs[0]["accuracy"]  # greedy answers: every run answers alike
        ms = statistics.median(x["median_prefill_ms"] for x in runs)
        speedup = statistics.median(x["prefill_speedup"] for x in runs)
        flops = runs[0]["prefill_flops_ratio"]
        agree = runs[0].get("agrees_with_dense")
        agree = "" if agree is None else f"{agree * 100:.1f}%"
        print(f"| {scorer} | {keep * 100:.0f}% | {acc * 100:.1f}% | {agree} | {ms:.1f} | "
              f"{speedup:.2f}x | {flops:.2f}x |")
        points.append((scorer, keep, acc, speedup))
    if plot:
        svg(points, first["accuracy"], plot)


if __name__ == "__main__":
    main(sys.argv[1:])
