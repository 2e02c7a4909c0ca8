#!/usr/bin/env python3
"""The table of scripts/bench/memory_ppl.sh: one column per text set, one row per configuration:
the base model, each memory decoder served at its default λ, at the best λ of its curve and
alone, the kNN-LM at its best λ, each LoRA adapter; each cell the perplexity and its ratio to
the base on that set.
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
    paths = sorted(glob.glob(os.path.join(out, "*.json")))
    if not paths:
        sys.exit(f"no <set>.json in {out}")
    sets = {}
    for path in paths:
        with open(path) as f:
            sets[os.path.basename(path)[:-5]] = json.load(f)
    # Rows in the order they first appear; a cell per set: perplexity, λ, ratio to base.
    table = {}
    for set_name, report in sets.items():
        cols = columns(report["results"])
        base = cols[0][1]
        for title, ppl, lam in cols:
            table.setdefault(title, {})[set_name] = (ppl, lam, ppl / base)
    names = list(sets)
    print("| configuration | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for title, cells in table.items():
        shown = []
        for n in names:
            if n not in cells:
                shown.append("-")
                continue
            ppl, lam, ratio = cells[n]
            at = "" if lam is None or lam == 1.0 else f" at λ {lam:.1f}"
            shown.append(f"{ppl:.3f} ({ratio:.3f}x){at}")
        print(f"| {title} | " + " | ".join(shown) + " |")
    tokens = {n: r["scored_tokens"] for n, r in sets.items()}
    print(f"\nScored tokens per set: {tokens}; windows of {next(iter(sets.values()))['window']}.")


if __name__ == "__main__":
    main()
