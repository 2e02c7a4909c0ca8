"""Learned sparse attention through the real server and the official openai client: gates
trained by `server train sparse-attention` (a small run on the default model over this
repository's own documentation), registered through POST /v1/plugins and selected per request
with `extra_body`. An ~8k-token prompt decodes with a 1k budget while reading a fraction of the
cache (the server's counters say how much); a budget covering the context gives the dense
answer token for token and log-prob for log-prob, alone and sharing steps with a dense
request. Bad parameters and files made for another model are 400s naming them."""
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from conftest import BIN, MODEL_ID

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


@pytest.fixture(scope="module")
def trained(server, plugin_dir):
    out = plugin_dir / "sparse_attention"
    subprocess.run(
        [str(BIN), "train", "sparse-attention", "--text", *map(str, DOCS), "--out", str(out),
         "--length", "1024", "--sequences", "4", "--queries", "32", "--steps", "20", "--batch", "2"],
        check=True, timeout=900,
    )
    r = requests.post(server.url + "/v1/plugins", timeout=120,
                      json={"type": "sparse_attention", "name": "sa", "path": "sparse_attention"})
    assert r.status_code == 200, r.text
    return json.loads((out / "report.json").read_text())


def long_prompt(server, tokens=7900):
    """About `tokens` tokens of the documentation, cut by the server's own tokenizer."""
    text = "\n\n".join(p.read_text() for p in DOCS)
    ids = requests.post(server.url + "/tokenize", json={"model": MODEL_ID, "prompt": text}, timeout=60).json()["tokens"]
    assert len(ids) > tokens, "the documentation is shorter than the test's prompt"
    r = requests.post(server.url + "/detokenize", json={"model": MODEL_ID, "tokens": ids[:tokens]}, timeout=60)
    return r.json()["prompt"]


def complete(client, prompt, plugins, max_tokens=12):
    c = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                  logprobs=1, extra_body={"plugins": plugins, "ignore_eos": True})
    return c.choices[0].text, c.choices[0].logprobs.token_logprobs, c.usage.prompt_tokens


def reads(server):
    m = server.metrics()
    value = lambda name: sum(v for (n, labels), v in m.items() if n == name and ("name", "sa") in labels)
    return value("graft_sparse_attention_keys_in_context_total"), value("graft_sparse_attention_keys_read_total")


def test_an_8k_prompt_decodes_reading_a_fraction_of_the_cache(server, client, trained):
    assert len(trained["layers"]) == 30 and trained["train_windows"] >= 3
    prompt = long_prompt(server)
    dense_text, dense_lp, used = complete(client, prompt, [])
    assert used > 7500
    before = reads(server)
    text, lp, _ = complete(client, prompt, [{"type": "sparse_attention", "name": "sa", "budget": 1024}])
    context, read = (a - b for a, b in zip(reads(server), before))
    # 11 decode steps (the first token comes from the dense prefill) x 30 layers x 3 kv heads.
    assert context >= 11 * 30 * 3 * 7500, context
    assert read <= context * 0.15, (read, context)
    assert text.strip() and len(lp) == len(dense_lp)
    # A budget covering the whole context reads densely: the dense answer, bit for bit.
    covered = complete(client, prompt, [{"type": "sparse_attention", "name": "sa", "budget": 8192}])
    assert covered[:2] == (dense_text, dense_lp)


def test_rows_with_and_without_the_plugin_share_steps_and_keep_their_answers(server, client, trained):
    prompt = long_prompt(server, 1500)
    sparse = [{"type": "sparse_attention", "name": "sa", "threshold": 1e-30}]
    alone = [complete(client, prompt, p, 24) for p in ([], sparse)]
    assert alone[0][:2] == alone[1][:2], "a threshold no block misses reads every block"
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: complete(client, prompt, p, 24), [[], sparse, [], sparse]))
    for got, want in zip(together, alone * 2):
        assert got[:2] == want[:2]


def test_bad_parameters_and_foreign_files_are_400s_naming_them(server, plugin_dir, trained):
    for plugins, param in [
        ([{"type": "sparse_attention", "name": "sa", "budget": 8}], "plugins[0].budget"),
        ([{"type": "sparse_attention", "name": "sa", "threshold": 1.0}], "plugins[0].threshold"),
        ([{"type": "sparse_attention", "name": "sa", "budget": 512, "threshold": 0.01}], "plugins[0].threshold"),
        ([{"type": "sparse_attention", "name": "sa", "top_k": 4}], "plugins[0].top_k"),
    ]:
        r = requests.post(server.url + "/v1/completions", timeout=60, json={
            "model": MODEL_ID, "prompt": "hi", "max_tokens": 1, "plugins": plugins})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.text
    for field, value, words in [("num_kv_heads", 5, "key/value heads"), ("block_size", 48, "block_size 48")]:
        foreign = plugin_dir / f"sparse_attention_{field}"
        foreign.mkdir(exist_ok=True)
        config = json.loads((plugin_dir / "sparse_attention" / "config.json").read_text())
        config[field] = value
        (foreign / "config.json").write_text(json.dumps(config))
        (foreign / "gates.safetensors").write_bytes((plugin_dir / "sparse_attention" / "gates.safetensors").read_bytes())
        r = requests.post(server.url + "/v1/plugins", timeout=60,
                          json={"type": "sparse_attention", "name": f"bad_{field}", "path": foreign.name})
        assert r.status_code == 400 and words in r.text, r.text
    server.assert_serving()
