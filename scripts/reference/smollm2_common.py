"""Shared helpers for the SmolLM2 reference scripts (model, perplexity, tokenizer fixtures).

Everything here reads the GGUF file itself; nothing is fetched from a model hub.

Tokenizer note: the GGUF says tokenizer.ggml.model = "gpt2", tokenizer.ggml.pre = "smollm". The
"smollm" pre-tokenizer (llama.cpp) / the original tokenizer.json (Hugging Face) first splits every
digit into its own piece and only then applies the GPT-2 byte-level regex. transformers' GGUF
tokenizer conversion drops the digit split, so it gives different ids for e.g. "  12" or " ½".
`build_tokenizer` builds the correct one from the GGUF vocab and merges with the `tokenizers`
package; `transformers_tokenizer(..., fix_pre_tokenizer=True)` patches transformers' converted one.
Both must agree (tokenizer_reference.py checks them against llama.cpp).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import sys

# Never reach for a model hub: everything comes from the GGUF file.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
FIXTURES = os.path.join(REPO_ROOT, "models", "tests", "fixtures")

# The template the brief (and SmolLM2's tokenizer_config.json) gives; the GGUF's own
# tokenizer.chat_template is what is used, this constant only lets the scripts assert they match.
EXPECTED_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LONG_TEXT = (
    "The lighthouse at the end of the northern pier was built in 1871, when the harbour still "
    "served the fishing fleet and the small steamers that carried coal along the coast. For more "
    "than a century a keeper lived in the narrow stone house beside it, climbing the spiral stair "
    "each evening to light the lamp, wind the clockwork that turned the lens, and write the weather "
    "in a leather-bound log. The logs survive. They record storms that tore the roof from the "
    "boathouse, a winter so cold that the sea froze a hundred metres out from the shore, and long "
    "calm summers in which nothing happened at all except the slow passing of ships. In 1958 the "
    "lamp was converted to electricity, and in 1987 the last keeper left; since then the light has "
    "been controlled from a station forty kilometres away. Today the keeper's house is a small "
    "museum. Visitors can climb the stair, look through the great glass lens, and read a few pages "
    "of the old logs, which describe the same sea they can see from the window: grey in the "
    "morning, green at noon, and dark blue in the evening when the light begins to turn. Most "
    "visitors come in August, but the guides say that the best time to visit is November, when "
    "the wind is strong, the waves break over the end of the pier, and it is easy to imagine what "
    "the keepers saw through all those long nights. Summarise this passage in two sentences."
)

# The fixed prompt set of smollm2_reference.json (also tokenized by tokenizer_reference.py).
# kind "chat": rendered with the GGUF chat template, add_generation_prompt=True.
# kind "raw": the text as is. No BOS is ever added (tokenizer.ggml.add_bos_token = false).
PROMPTS = [
    {"name": "chat_capital", "kind": "chat",
     "messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"name": "chat_digits", "kind": "chat",
     "messages": [{"role": "user", "content":
                   "In 1984 there were 12 apples and 7 pears in the basket. How many fruits were there?"}]},
    {"name": "chat_multiturn_system", "kind": "chat",
     "messages": [
         {"role": "system", "content": "You are a terse assistant. Answer in one word."},
         {"role": "user", "content": "What colour is the sky on a clear day?"},
         {"role": "assistant", "content": "Blue."},
         {"role": "user", "content": "And grass?"}]},
    {"name": "chat_long", "kind": "chat",
     "messages": [{"role": "user", "content": LONG_TEXT}]},
    {"name": "raw_short", "kind": "raw", "text": "The quick brown fox"},
    {"name": "raw_digits", "kind": "raw",
     "text": "In 1984 there were 12 apples on the table, and by  2024 only 3 were left. Count: 1, 2, 3,"},
    {"name": "raw_non_ascii", "kind": "raw",
     "text": "Zürich, São Paulo, Kraków and Besançon are cities. 東京は日本の首都です。北京是"},
    {"name": "raw_code", "kind": "raw",
     "text": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return n\n    return"},
]


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "tokenizers", "gguf", "numpy", "jinja2", "accelerate"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def gguf_meta(path: str) -> dict:
    """The tokenizer / template metadata of the GGUF, read with the `gguf` package."""
    import gguf

    r = gguf.GGUFReader(path)

    def get(key, default=None):
        f = r.fields.get(key)
        return default if f is None else f.contents()

    meta = {
        "architecture": get("general.architecture"),
        "tokenizer_model": get("tokenizer.ggml.model"),
        "tokenizer_pre": get("tokenizer.ggml.pre"),
        "tokens": get("tokenizer.ggml.tokens"),
        "token_types": get("tokenizer.ggml.token_type"),
        "merges": get("tokenizer.ggml.merges"),
        "bos_token_id": get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": get("tokenizer.ggml.eos_token_id"),
        "add_bos_token": get("tokenizer.ggml.add_bos_token"),
        "add_eos_token": get("tokenizer.ggml.add_eos_token"),
        "chat_template": get("tokenizer.chat_template"),
        "rope_freq_base": get("llama.rope.freq_base"),
        "rms_norm_eps": get("llama.attention.layer_norm_rms_epsilon"),
    }
    del r
    return meta


def gguf_summary(meta: dict) -> dict:
    """Small, JSON-friendly subset of the metadata for fixture headers."""
    return {
        "architecture": meta["architecture"],
        "tokenizer.ggml.model": meta["tokenizer_model"],
        "tokenizer.ggml.pre": meta["tokenizer_pre"],
        "tokenizer.ggml.add_bos_token": meta["add_bos_token"],
        "tokenizer.ggml.bos_token_id": meta["bos_token_id"],
        "tokenizer.ggml.eos_token_id": meta["eos_token_id"],
        "vocab_size": len(meta["tokens"]),
        "n_merges": len(meta["merges"]),
    }


def _smollm_pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])


def build_tokenizer(meta: dict):
    """The SmolLM2 tokenizer built from the GGUF vocab and merges (tokens of type CONTROL=3 or
    USER_DEFINED=4 become special added tokens, matched before pre-tokenization)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    assert meta["tokenizer_model"] == "gpt2", meta["tokenizer_model"]
    assert meta["tokenizer_pre"] == "smollm", meta["tokenizer_pre"]
    tokens = meta["tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens in GGUF vocab"
    merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _smollm_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False, single_word=False, lstrip=False, rstrip=False)
                for t, ty in zip(tokens, meta["token_types"]) if ty in (3, 4)]
    tok.add_special_tokens(specials)
    for t in specials:
        assert tok.token_to_id(t.content) == vocab[t.content]
    return tok


def transformers_tokenizer(gguf_path: str, fix_pre_tokenizer: bool = True):
    """transformers' own GGUF-converted tokenizer (its `tokenizers` backend), with the pre-tokenizer
    replaced by the correct SmolLM one when fix_pre_tokenizer is set."""
    from transformers import AutoTokenizer

    d, f = os.path.split(os.path.abspath(gguf_path))
    hf = AutoTokenizer.from_pretrained(d, gguf_file=f)
    backend = hf.backend_tokenizer
    if fix_pre_tokenizer:
        backend.pre_tokenizer = _smollm_pre_tokenizer()
    return backend


def encode(tok, text: str, parse_special: bool = True) -> list[int]:
    """Token ids of `text`, no BOS/EOS added. parse_special=False treats special-token text as
    plain text (like llama.cpp's parse_special=false)."""
    old = tok.encode_special_tokens
    tok.encode_special_tokens = not parse_special
    try:
        return tok.encode(text, add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = old


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render like transformers' apply_chat_template (sandboxed jinja2, trim/lstrip blocks)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


def prompt_text(meta: dict, prompt: dict) -> str:
    if prompt["kind"] == "chat":
        return render_chat(meta["chat_template"], prompt["messages"], add_generation_prompt=True)
    return prompt["text"]


def load_model(gguf_path: str, threads: int):
    """The GGUF dequantized to float32 by transformers (Q/K weights are un-permuted back to the
    Hugging Face rotate-half layout by transformers' GGUF loader)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    d, f = os.path.split(os.path.abspath(gguf_path))
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    model.eval()
    assert next(model.parameters()).dtype == torch.float32
    return model


def eprint(*a):
    print(*a, file=sys.stderr, flush=True)


def _fmt(v, indent: int) -> str:
    import json

    def scalar(x):
        return not isinstance(x, (dict, list))

    def flat(x):  # a list of scalars, or of lists of scalars (e.g. top10 pairs)
        return isinstance(x, list) and all(scalar(e) or (isinstance(e, list) and all(map(scalar, e))) for e in x)

    pad, pad2 = " " * indent, " " * (indent + 2)
    if isinstance(v, dict):
        if not v:
            return "{}"
        items = [f"{pad2}{json.dumps(k, ensure_ascii=False)}: {_fmt(x, indent + 2)}" for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(v, list) and not flat(v):
        return "[\n" + ",\n".join(pad2 + _fmt(x, indent + 2) for x in v) + "\n" + pad + "]"
    return json.dumps(v, ensure_ascii=False, separators=(",", ":"))


def write_json(path: str, doc) -> None:
    """JSON with objects indented and number lists kept on one line (small, diff-friendly)."""
    import json

    text = _fmt(doc, 0) + "\n"
    assert json.loads(text) == doc
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
