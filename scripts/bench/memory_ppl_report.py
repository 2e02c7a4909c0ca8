#!/usr/bin/env python3
"""The table of scripts/bench/memory_ppl.sh: per text set, the perplexity of the base model, of
each memory decoder served at its default λ and at the best λ of its curve, of the memory alone,
of the kNN-LM at its best λ and of each LoRA adapter, each with its ratio to the base.
Standard library only.

usage: scripts/bench/memory_ppl_report.py OUT   (reads OUT/<set>.json)
"""
import glob
import json
import os
import sys


def name(chain_label: str) -> str:
    """`[{"type":"memory","name":"py"}]` -> `memory py`."""
    chain = json.loads(chain_label)
    return " + ".join(f"{p['type']} {p['name']}" for p in chain)


def columns(rows):
    """(column title, perplexity, λ or None) for one set's rows, in a fixed order."""
    out = []
    by_config = {}
    for r in rows:
        by_config.setdefault(r["config"], []).append(r)
    for config, rs in by_config.items():
        if config == "base":
            out.append(("base", rs[0]["perplexity"], None))
        elif config == "knn-lm":
            best = min(rs, key=lambda r: r["perplexity"])
            out.append(("kNN-LM, best λ", best["perplexity"], best["lambda"]))
        elif config.endswith(" alone"):
            out.append((f"{name(config[:-6])} alone", rs[0]["perplexity"], 1.0))
        elif config.endswith(" mixed"):
            best = min(rs, key=lambda r: r["perplexity"])
            out.append((f"{name(config[:-6])}, best λ", best["perplexity"], best["lambda"]))
        else:
            out.append((f"{name(config)}, served", rs[0]["perplexity"], None))
    return out


def main():
    out = sys.argv[1]
    sets = sorted(glob.glob(os.path.join(out, "*.json")))
    if not sets:
        sys.exit(f"no <set>.json in {out}")
    for path in sets:
        with open(path) as f:
            report = json.load(f)
        cols = columns(report["results"])
        base = cols[0][1]
        print(f"\n**{os.path.basename(path)[:-5]}** ({report['scored_tokens']} tokens scored, "
              f"windows of {report['window']} every {report['stride']})\n")
        print("| configuration | λ | perplexity | vs base |")
        print("|---|---:|---:|---:|")
        for title, ppl, lam in cols:
            shown = "-" if lam is None else f"{lam:.1f}"
            print(f"| {title} | {shown} | {ppl:.3f} | {ppl / base:.3f} |")


if __name__ == "__main__":
    main()
