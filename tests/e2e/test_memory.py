"""Memory decoders over real HTTP on the default model: a memory that is the default model
itself (a copy of its GGUF with a `graft` block), registered through POST /v1/plugins and
selected per request with `extra_body`. Mixing a model with itself leaves every reported
log-prob (echoed prompt and generated) unchanged; at memory temperature 2 they change. A
memory whose vocabulary is not the model's is refused with both sizes named."""
import json
import shutil
import subprocess

import pytest
import requests

from conftest import BIN, MODEL_ID

PROMPT = "The history of the printing press begins"


@pytest.fixture(scope="module")
def memory(server, plugin_dir):
    path = subprocess.run([str(BIN), "fetch"], check=True, capture_output=True, text=True).stdout.strip()
    folder = plugin_dir / "memory_self"
    folder.mkdir(exist_ok=True)
    shutil.copyfile(path, folder / "model.gguf")
    graft = {"type": "memory_decoder", "lambda": 0.5}
    (folder / "config.json").write_text(json.dumps({"graft": graft}))
    r = requests.post(server.url + "/v1/plugins", json={"type": "memory", "name": "self", "path": "memory_self"}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["type"] == "memory"
    return "self"


def logprobs(client, **extra):
    c = client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=6, temperature=0, echo=True, logprobs=1, **extra
    ).choices[0]
    return c.logprobs.tokens, c.logprobs.token_logprobs


def test_a_memory_that_is_the_model_itself_leaves_log_probs_unchanged(client, memory):
    tokens, base = logprobs(client)
    same_tokens, mixed = logprobs(client, extra_body={"plugins": [{"type": "memory", "name": memory, "lambda": 0.7}]})
    assert same_tokens == tokens
    assert len(base) > 6 and base[0] is None and mixed[0] is None
    assert max(abs(a - b) for a, b in zip(base[1:], mixed[1:])) < 1e-4
    _, hot = logprobs(client, extra_body={"plugins": [{"type": "memory", "name": memory, "lambda": 0.7, "temperature": 2.0}]})
    assert max(abs(a - b) for a, b in zip(base[1:], hot[1:])) > 1e-2


def test_a_memory_with_another_vocabulary_is_refused_naming_both_sizes(server, plugin_dir):
    folder = plugin_dir / "memory_small"
    folder.mkdir(exist_ok=True)
    config = {
        "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
        "num_attention_heads": 2, "vocab_size": 1000, "max_position_embeddings": 8192,
        "graft": {"type": "memory_decoder", "lambda": 0.5},
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    r = requests.post(server.url + "/v1/plugins", json={"type": "memory", "name": "small", "path": "memory_small"}, timeout=60)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "1000 tokens" in message and "49152" in message, message
    server.assert_serving()


def test_a_memory_trained_with_another_tokenizer_is_refused(server, plugin_dir, memory):
    folder = plugin_dir / "memory_self"
    other = plugin_dir / "memory_other_tokenizer"
    other.mkdir(exist_ok=True)
    shutil.copyfile(folder / "model.gguf", other / "model.gguf")
    graft = {"type": "memory_decoder", "lambda": 0.5, "tokenizer_hash": "sha256:00"}
    (other / "config.json").write_text(json.dumps({"graft": graft}))
    r = requests.post(server.url + "/v1/plugins", json={"type": "memory", "name": "other", "path": "memory_other_tokenizer"}, timeout=120)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "tokenizer sha256:00" in message and "base model's is sha256:" in message, message
    server.assert_serving()
