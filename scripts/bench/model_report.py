"""Prints the graft vs llama.cpp single-stream table (markdown) from model_vs_llamacpp.sh's outputs."""
import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])
graft = json.loads((out / "graft.json").read_text())
llama = json.loads((out / "llamacpp.json").read_text())
rss_llama = int((out / "llamacpp_rss_kib.txt").read_text().split()[-1]) / 1024


def llama_rate(kind, depth=0):
    # llama-bench reports one entry per test: n_prompt>0 is prefill (pp), n_gen>0 decode (tg),
    # each at a context depth n_depth.
    for e in llama:
        if e.get("n_depth", 0) != depth:
            continue
        if (kind == "pp" and e["n_prompt"] > 0 and e["n_gen"] == 0) or (kind == "tg" and e["n_gen"] > 0 and e["n_prompt"] == 0):
            return statistics.median(e["samples_ts"]), e.get("build_commit", "?"), e.get("build_number", "?")
    raise SystemExit(f"no {kind} entry in llama-bench output")


pp, commit, build = llama_rate("pp")
tg, _, _ = llama_rate("tg")
tg_deep, _, _ = llama_rate("tg", 512)
print(f"llama.cpp build {build} ({commit}), threads {graft['threads']}, runs {graft['runs']}")
print((out / "load.txt").read_text().strip())
print()
print("| metric | graft | llama.cpp | ratio |")
print("|---|---|---|---|")
print(f"| prefill 512 tokens, tokens/s | {graft['prefill_tok_s']:.1f} | {pp:.1f} | {graft['prefill_tok_s'] / pp:.2f}x |")
print(f"| decode 128 tokens from empty context, tokens/s | {graft['decode_tok_s']:.1f} | {tg:.1f} | {graft['decode_tok_s'] / tg:.2f}x |")
print(f"| decode 128 tokens after 512, tokens/s | {graft['decode_depth512_tok_s']:.1f} | {tg_deep:.1f} | {graft['decode_depth512_tok_s'] / tg_deep:.2f}x |")
print(f"| peak RSS, MiB | {graft['peak_rss_mib']:.0f} | {rss_llama:.0f} | {graft['peak_rss_mib'] / rss_llama:.2f}x |")
print(f"| decode with an idle no-op hook chain, tokens/s | {graft['decode_noop_hooks_tok_s']:.1f} | | {graft['decode_noop_hooks_tok_s'] / graft['decode_tok_s']:.2f}x of graft's base |")
