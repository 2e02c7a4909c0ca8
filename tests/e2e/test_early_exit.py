"""Speculative early exit through the real server and the official openai client: predictors
trained by `server train early-exit` (a small run on the default model's own answers),
registered through POST /v1/plugins and selected per request with `extra_body`. At threshold 1
no predictor fires and the answer is the base model's, token for token and log-prob for
log-prob; at a low threshold tokens do leave early (the server's exit counters say how many)
and the answer stays fluent text. Bad parameters and files made for another model are 400s
naming them."""
import json
import subprocess

import pytest
import requests

from conftest import BIN, MODEL_ID

PROMPTS = [
    "Name three primary colours.", "What is the capital of France?", "Describe a cat in one sentence.",
    "List the days of the week.", "Explain what a noun is.", "Give two synonyms for happy.",
    "What is two plus two?", "Write a short greeting for a friend.", "Why is the sky blue?",
    "Name a fruit that is yellow.", "What does a thermometer measure?", "Count from one to five.",
]


def answer(client, plugins, prompt="Tell me about the moon."):
    c = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0,
        logprobs=True, extra_body={"plugins": plugins},
    )
    return c.choices[0].message.content, [e.logprob for e in c.choices[0].logprobs.content], c.model_extra.get("plugins")


def exits(server):
    metrics = requests.get(server.url + "/metrics", timeout=30).text
    return sum(float(l.split()[-1]) for l in metrics.splitlines() if l.startswith("graft_early_exit_tokens_total{"))


@pytest.fixture(scope="module")
def trained(server, plugin_dir, tmp_path_factory):
    prompts = tmp_path_factory.mktemp("early_exit") / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    out = plugin_dir / "early_exit"
    subprocess.run(
        [str(BIN), "train", "early-exit", "--prompts", str(prompts), "--out", str(out), "--limit", "12",
         "--max-new-tokens", "24", "--epochs", "30", "--threshold", "0.3"],
        check=True, timeout=900,
    )
    r = requests.post(server.url + "/v1/plugins", json={"type": "early_exit", "name": "ee", "path": "early_exit"}, timeout=120)
    assert r.status_code == 200, r.text
    return json.loads((out / "report.json").read_text())["report"]


def test_trained_predictors_load_exit_early_and_at_threshold_one_change_nothing(server, client, trained):
    # Layers 7 (a quarter of 30) to 27 have predictors; a fifth of 6 feature prompts is held out.
    assert len(trained["layers"]) == 21 and trained["tokens"] > 0
    base_text, base_lp, _ = answer(client, [])
    text, lp, chain = answer(client, [{"type": "early_exit", "name": "ee", "threshold": 1.0}])
    assert (text, lp) == (base_text, base_lp)
    assert chain[0]["type"] == "early_exit" and chain[0]["hash"].startswith("sha256:")

    before = exits(server)
    for p in PROMPTS[:6]:
        text, _, _ = answer(client, [{"type": "early_exit", "name": "ee", "threshold": 0.05, "min_layer": 7}], p)
        assert text.strip()
    assert exits(server) > before, "no token left early at threshold 0.05"


def test_bad_parameters_and_foreign_files_are_400s_naming_them(server, plugin_dir, trained):
    for plugins, param in [
        ([{"type": "early_exit", "name": "ee", "threshold": 2}], "plugins[0].threshold"),
        ([{"type": "early_exit", "name": "ee", "min_layer": 40}], "plugins[0].min_layer"),
        ([{"type": "early_exit", "name": "ee", "verify": True}], "plugins[0].verify"),
    ]:
        r = requests.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "plugins": plugins})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.text
    foreign = plugin_dir / "early_exit_foreign"
    foreign.mkdir(exist_ok=True)
    config = json.loads((plugin_dir / "early_exit" / "config.json").read_text())
    config["base_model"]["num_layers"] = 24
    (foreign / "config.json").write_text(json.dumps(config))
    (foreign / "predictors.safetensors").write_bytes((plugin_dir / "early_exit" / "predictors.safetensors").read_bytes())
    r = requests.post(server.url + "/v1/plugins", json={"type": "early_exit", "name": "foreign", "path": "early_exit_foreign"}, timeout=60)
    assert r.status_code == 400, r.text
    assert "num_layers: 24" in r.json()["error"]["message"], r.text
