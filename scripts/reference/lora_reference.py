#!/usr/bin/env python3
"""Reference for LoRA adapters on SmolLM2-135M-Instruct, made with Hugging Face `peft` on top of
transformers (GGUF dequantized to float32, exactly as model_reference.py loads it).

usage: lora_reference.py GGUF [--adapter-dir DIR] [--out PATH] [--threads N] [--steps 16]
                              [--std 0.06] [--seed 1234]

Writes
  plugins/tests/fixtures/lora_smollm2/adapter_config.json        PEFT's config (r=4, alpha=8, 7 targets)
  plugins/tests/fixtures/lora_smollm2/adapter_model.safetensors  lora_A/lora_B weights, float16
  plugins/tests/fixtures/lora_smollm2_reference.json             log-probs of the adapted model

The adapter: LoraConfig(r=4, lora_alpha=8, target_modules=q/k/v/o/gate/up/down_proj,
lora_dropout=0, bias="none", use_rslora=False) wrapped around the model with get_peft_model; then,
after torch.manual_seed(seed), every lora_A and lora_B weight (in named_parameters order, A before
B within a module) is overwritten with normal(0, std) values and rounded to float16 and back, so
the float16 file holds exactly the weights the reference used. Each targeted linear becomes
    y = W x + scale * (lora_alpha / r) * B (A x)        (lora_alpha / r = 2)
with A: [r, in], B: [out, r]. Sections: scale 1.0 and scale 0.5 (every LoRA module's
scaling["default"] multiplied by 0.5), plus the base model's (adapter disabled) last-position
top-10 per prompt.

RoPE layout: transformers un-permutes llama.cpp's attn_q/attn_k row permutation when it loads the
GGUF, so q_proj/k_proj (and hence the rows of their lora_B) are in the Hugging Face rotate-half
layout. The script checks this against the GGUF tensors and that the base model reproduces
models/tests/fixtures/smollm2_reference.json. An implementation that keeps the GGUF's
(llama.cpp-permuted) attn_q/attn_k must apply the same permutation to the rows of q_proj/k_proj
lora_B (equivalently to the rows of B @ A); lora_A and the other targets need no change.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smollm2_common as C  # noqa: E402

PLUGIN_FIXTURES = os.path.join(C.REPO_ROOT, "plugins", "tests", "fixtures")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8
BASE_MODEL_NAME = "SmolLM2-135M-Instruct"


def r5(x: float) -> float:
    return round(float(x), 5)


def llamacpp_permute(w, n_head: int):
    """llama.cpp convert_hf_to_gguf.py's permute (HF rotate-half rows -> interleaved rows)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_qk_layout(gguf_path: str, model) -> int:
    """Assert HF q_proj/k_proj == llama.cpp-unpermuted GGUF attn_q/attn_k (and != as stored)."""
    import gguf
    import numpy as np

    cfg = model.config
    layers = model.model.layers
    r = gguf.GGUFReader(gguf_path)
    n = 0
    for t in r.tensors:
        parts = t.name.split(".")
        if len(parts) != 4 or parts[2] not in ("attn_q", "attn_k"):
            continue
        li, kind = int(parts[1]), parts[2]
        stored = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        attn = layers[li].self_attn
        hf = (attn.q_proj if kind == "attn_q" else attn.k_proj).base_layer.weight.detach().numpy()
        heads = cfg.num_attention_heads if kind == "attn_q" else cfg.num_key_value_heads
        assert stored.shape == hf.shape, (t.name, stored.shape, hf.shape)
        assert np.array_equal(llamacpp_permute(hf, heads), stored), f"{t.name}: not the llama.cpp permutation of HF"
        assert not np.array_equal(hf, stored), f"{t.name}: HF weight equals the stored (permuted) one"
        n += 1
    del r
    return n


def tool_versions() -> dict:
    v = C.versions()
    for pkg in ("peft", "safetensors"):
        v[pkg] = importlib.metadata.version(pkg)
    return v


def lora_modules(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def run_prompts(model, tok, meta, steps: int) -> list[dict]:
    """model_reference.py's computation (top10, prompt_logprobs, greedy without KV cache)."""
    import torch

    out = []
    for p in C.PROMPTS:
        ids = C.encode(tok, C.prompt_text(meta, p))
        x = torch.tensor([ids], dtype=torch.long)
        logp = torch.log_softmax(model(input_ids=x, use_cache=False).logits[0].double(), dim=-1)
        top = torch.topk(logp[-1], 10)
        top10 = [[int(i), r5(v)] for v, i in zip(top.values, top.indices)]
        prompt_lp = logp[:-1].gather(1, x[0, 1:][:, None])[:, 0].tolist()
        seq, last = list(ids), logp[-1]
        g_ids, g_lp, g_margin = [], [], []
        for step in range(steps):
            t2 = torch.topk(last, 2)
            nxt = int(t2.indices[0])
            g_ids.append(nxt)
            g_lp.append(r5(t2.values[0]))
            g_margin.append(r5(t2.values[0] - t2.values[1]))
            if step + 1 == steps:
                break
            seq.append(nxt)
            o = model(input_ids=torch.tensor([seq], dtype=torch.long), use_cache=False)
            last = torch.log_softmax(o.logits[0, -1].double(), dim=-1)
        eos = {meta["eos_token_id"], 0}
        out.append({
            "name": p["name"],
            "kind": p["kind"],
            "n_prompt": len(ids),
            "prompt_ids": ids,
            "top10": top10,
            "top1_logprob_unrounded": float(top.values[0]),
            "prompt_logprobs": [r5(v) for v in prompt_lp],
            "greedy_ids": g_ids,
            "greedy_text": tok.decode(g_ids, skip_special_tokens=False),
            "greedy_first_eos_index": next((i for i, t in enumerate(g_ids) if t in eos), None),
            "greedy_logprobs": g_lp,
            "greedy_margins": g_margin,
        })
        C.eprint(f"  {p['name']}: n={len(ids)} top1={top10[0]} min_margin={min(g_margin):.5f} "
                 f"text={out[-1]['greedy_text']!r}")
    return out


def last_logp(model, ids):
    import torch

    o = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return torch.log_softmax(o.logits[0, -1].double(), dim=-1)


def base_greedy(model, ids, steps: int) -> list[int]:
    seq, g = list(ids), []
    for _ in range(steps):
        g.append(int(last_logp(model, seq).argmax()))
        seq.append(g[-1])
    return g


def save_adapter(model, adapter_dir: str) -> dict:
    """save_pretrained, then rewrite the safetensors as float16 (same names) and fix the config."""
    import torch
    from safetensors.torch import load_file, save_file

    os.makedirs(adapter_dir, exist_ok=True)
    for f in os.listdir(adapter_dir):
        os.remove(os.path.join(adapter_dir, f))
    model.save_pretrained(adapter_dir)
    st = os.path.join(adapter_dir, "adapter_model.safetensors")
    tensors = load_file(st)
    f16 = {k: v.to(torch.float16).contiguous() for k, v in sorted(tensors.items())}
    for k, v in tensors.items():
        assert torch.equal(f16[k].float(), v.float()), f"{k}: not exactly representable in float16"
    save_file(f16, st, metadata={"format": "pt"})
    os.chmod(st, 0o644)
    cfg_path = os.path.join(adapter_dir, "adapter_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = BASE_MODEL_NAME
    assert sorted(cfg["target_modules"]) == sorted(TARGETS), cfg["target_modules"]
    cfg["target_modules"] = TARGETS  # PEFT writes its set in hash order; keep the file deterministic
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    readme = os.path.join(adapter_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    assert sorted(os.listdir(adapter_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
    return f16


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("--adapter-dir", default=os.path.join(PLUGIN_FIXTURES, "lora_smollm2"))
    ap.add_argument("--out", default=os.path.join(PLUGIN_FIXTURES, "lora_smollm2_reference.json"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--std", type=float, default=0.06, help="std of the normal init of lora_A and lora_B")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    t0 = time.time()
    meta = C.gguf_meta(args.gguf)
    assert meta["add_bos_token"] is False
    tok = C.build_tokenizer(meta)
    tok_hf = C.transformers_tokenizer(args.gguf, fix_pre_tokenizer=True)
    for p in C.PROMPTS:
        text = C.prompt_text(meta, p)
        assert C.encode(tok, text) == C.encode(tok_hf, text), f"{p['name']}: tokenizers disagree"
    model = C.load_model(args.gguf, args.threads)

    lcfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM", use_rslora=False)
    pm = get_peft_model(model, lcfg)
    pm.eval()
    mods = lora_modules(pm)
    assert len(mods) == len(TARGETS) * model.config.num_hidden_layers, len(mods)
    assert all(m.scaling["default"] == ALPHA / RANK for m in mods)

    n_qk = check_qk_layout(args.gguf, pm.base_model.model)
    C.eprint(f"q/k layout: {n_qk} attn_q/attn_k tensors: HF weight = llama.cpp-unpermuted GGUF tensor")

    torch.manual_seed(args.seed)
    n_lora = 0
    with torch.no_grad():
        for name, prm in pm.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                prm.normal_(0.0, args.std)
                prm.copy_(prm.to(torch.float16).to(torch.float32))
                n_lora += 1
    assert n_lora == 2 * len(mods)
    C.eprint(f"loaded and initialised {n_lora} LoRA tensors (std {args.std}, seed {args.seed}) "
             f"in {time.time() - t0:.1f}s")

    f16 = save_adapter(pm, args.adapter_dir)
    params = dict(pm.named_parameters())
    for k, v in f16.items():  # saved names drop the adapter name ("default")
        live = params[k.replace(".weight", ".default.weight")]
        assert torch.equal(live.detach(), v.float()), k
    C.eprint(f"saved {len(f16)} float16 tensors to {args.adapter_dir}")

    ref = json.load(open(os.path.join(C.FIXTURES, "smollm2_reference.json"), encoding="utf-8"))
    ref_by_name = {p["name"]: p for p in ref["prompts"]}

    sections = {}
    with torch.inference_mode():
        # Base model (adapter disabled): last-position top-10, checked against smollm2_reference.json.
        base_top10, base_lp, base_g, max_base_err = {}, {}, {}, 0.0
        with pm.disable_adapter():
            for p in C.PROMPTS:
                ids = C.encode(tok, C.prompt_text(meta, p))
                lp = last_logp(pm, ids)
                top = torch.topk(lp, 10)
                base_top10[p["name"]] = [[int(i), r5(v)] for v, i in zip(top.values, top.indices)]
                base_lp[p["name"]] = lp
                fx = ref_by_name[p["name"]]["top10"]
                assert [i for i, _ in base_top10[p["name"]]] == [i for i, _ in fx], p["name"]
                max_base_err = max(max_base_err, max(abs(float(v) - fv) for v, (_, fv) in zip(top.values, fx)))
                base_g[p["name"]] = base_greedy(pm, ids, args.steps)
                assert base_g[p["name"]] == ref_by_name[p["name"]]["greedy_ids"][:args.steps], p["name"]
        C.eprint(f"base (adapter disabled) vs smollm2_reference.json: same top-10 ids and first "
                 f"{args.steps} greedy ids on all {len(C.PROMPTS)} prompts, max |dlogprob| {max_base_err:.2e}")
        assert max_base_err < 1e-4

        for scale in (1.0, 0.5):
            for m in mods:
                m.scaling["default"] = ALPHA / RANK * scale
            C.eprint(f"scale {scale}:")
            sections[str(scale)] = {"prompts": run_prompts(pm, tok, meta, args.steps)}
            for e in sections[str(scale)]["prompts"]:
                b1 = int(base_lp[e["name"]].argmax())
                e["base_top1_logprob"] = float(last_logp(pm, e["prompt_ids"])[b1])
        for m in mods:
            m.scaling["default"] = ALPHA / RANK

    # Sanity: how far the adapter moved things.
    sanity = {}
    for key, sec in sections.items():
        d_top1, d_basetop1, n_diff = [], [], 0
        for e in sec["prompts"]:
            lp0 = base_lp[e["name"]]
            d_top1.append(e.pop("top1_logprob_unrounded") - float(lp0.max()))
            d_basetop1.append(e.pop("base_top1_logprob") - float(lp0.max()))
            if e["greedy_ids"] != base_g[e["name"]]:
                n_diff += 1
        sanity[key] = {
            "mean_abs_delta_top1_logprob": r5(sum(map(abs, d_top1)) / len(d_top1)),
            "delta_top1_logprob": {e["name"]: r5(d) for e, d in zip(sec["prompts"], d_top1)},
            "mean_abs_delta_base_top1_token_logprob": r5(sum(map(abs, d_basetop1)) / len(d_basetop1)),
            "delta_base_top1_token_logprob": {e["name"]: r5(d) for e, d in zip(sec["prompts"], d_basetop1)},
            "top1_id_changed": sum(e["top10"][0][0] != base_top10[e["name"]][0][0] for e in sec["prompts"]),
            "greedy_differs_from_base": n_diff,
        }
        C.eprint(f"scale {key}: mean |delta top-1 logprob| vs base = "
                 f"{sanity[key]['mean_abs_delta_top1_logprob']:.3f} nats "
                 f"(per prompt {[round(d, 2) for d in d_top1]}); mean |delta logprob of the base "
                 f"top-1 token| = {sanity[key]['mean_abs_delta_base_top1_token_logprob']:.3f} "
                 f"(per prompt {[round(d, 2) for d in d_basetop1]}); top-1 id changed on "
                 f"{sanity[key]['top1_id_changed']}/{len(d_top1)}; greedy ({args.steps} tokens) differs "
                 f"from base on {n_diff}/{len(d_top1)}")

    # The saved (float16) adapter, loaded by PEFT onto a fresh base, must give the same numbers.
    with torch.inference_mode():
        fresh = PeftModel.from_pretrained(C.load_model(args.gguf, args.threads), args.adapter_dir)
        fresh.eval()
        worst = 0.0
        for e in sections["1.0"]["prompts"]:
            lp = last_logp(fresh, e["prompt_ids"])
            worst = max(worst, max(abs(float(lp[i]) - v) for i, v in e["top10"]))
        C.eprint(f"adapter reloaded with PeftModel.from_pretrained: max |dlogprob| on top-10 = {worst:.1e}")
        assert worst < 1e-5
        del fresh

    rel_dir = os.path.relpath(args.adapter_dir, os.path.dirname(os.path.abspath(args.out)))
    doc = {
        "description": "SmolLM2-135M-Instruct + a random LoRA adapter (peft), GGUF dequantized to float32",
        "generator": "scripts/reference/lora_reference.py",
        "tools": tool_versions(),
        "gguf_file": os.path.basename(args.gguf),
        "gguf_sha256": C.sha256_file(args.gguf),
        "dtype": "float32",
        "bos_added": False,
        "adapter": {
            "path": rel_dir,
            "format": "PEFT save_pretrained (adapter_config.json + adapter_model.safetensors)",
            "r": RANK,
            "lora_alpha": ALPHA,
            "scaling": ALPHA / RANK,
            "use_rslora": False,
            "targets": TARGETS,
            "n_layers": model.config.num_hidden_layers,
            "n_tensors": len(f16),
            "seed": args.seed,
            "init": f"torch.manual_seed({args.seed}); every lora_A/lora_B weight, in named_parameters "
                    f"order, .normal_(0, {args.std}); then rounded to float16",
            "init_std": args.std,
            "dtype": "float16",
            "formula": "W' x = W x + scale * (lora_alpha / r) * lora_B @ (lora_A @ x); "
                       "lora_A [r, in_features], lora_B [out_features, r]",
            "rope_layout": "q_proj/k_proj are in the Hugging Face rotate-half layout (transformers "
                           "un-permutes the GGUF's attn_q/attn_k); with the GGUF tensors as stored "
                           "(llama.cpp-permuted rows, interleaved rope) apply llama.cpp's permute to "
                           "the rows of q_proj/k_proj lora_B",
        },
        "definitions": {
            "logprob": "natural-log log_softmax over the full vocabulary, float64 from float32 logits, 5 decimals",
            "top10": "[[token_id, logprob]] of the next token after the full prompt, best first",
            "prompt_logprobs": "logprob of prompt_ids[i] given prompt_ids[:i], i = 1..n_prompt-1",
            "greedy_ids": f"{args.steps} argmax tokens after the prompt (full recompute each step, no KV cache), no stop on EOS",
            "greedy_logprobs": "logprob of the greedy token at each step",
            "greedy_margins": "logprob(top-1) - logprob(top-2) at each greedy step, nats; a small "
                              "margin means a near-tie that another implementation may break differently",
            "greedy_first_eos_index": "index in greedy_ids of the first <|im_end|> (2) or <|endoftext|> (0), or null",
            "scales": "key = adapter scale s: every LoRA module's scaling multiplied by s "
                      "(effective scaling s * lora_alpha / r)",
            "base_top10": "top10 of the base model (adapter disabled), per prompt name; equals "
                          "models/tests/fixtures/smollm2_reference.json's top10 to ~1e-5",
            "sanity": "per scale, at the last prompt position: delta_top1_logprob = top-1 logprob "
                      "(adapted) - top-1 logprob (base); delta_base_top1_token_logprob = adapted - base "
                      "logprob of the base model's top-1 token; top1_id_changed = prompts whose top-1 id "
                      "differs from the base's; greedy_differs_from_base = prompts whose greedy_ids differ "
                      "from the base model's first greedy tokens",
        },
        "prompt_set": "PROMPTS of scripts/reference/smollm2_common.py (the prompts of "
                      "models/tests/fixtures/smollm2_reference.json, same names and prompt_ids)",
        "scales": sections,
        "base_top10": base_top10,
        "sanity": sanity,
    }
    C.write_json(args.out, doc)
    C.eprint(f"wrote {args.out} ({os.path.getsize(args.out)} bytes) and {args.adapter_dir} "
             f"({sum(os.path.getsize(os.path.join(args.adapter_dir, f)) for f in os.listdir(args.adapter_dir))} "
             f"bytes) in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
