"""Plug-in chains over real HTTP: a PEFT LoRA adapter on the real default model, selected the
three ways clients select adapters, echoed back, managed through /v1/plugins, with errors the
official client raises as its typed exceptions."""
import openai
import pytest
import requests

from conftest import ADAPTER, MODEL_ID

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = dict(messages=CAPITAL, max_tokens=16, temperature=0)


def text(r):
    return r.choices[0].message.content


def test_an_adapter_selected_three_ways_gives_one_output_that_differs_from_the_base(client):
    base = client.chat.completions.create(model=MODEL_ID, **GREEDY)
    by_pair = client.chat.completions.create(model=f"{MODEL_ID}::{ADAPTER}", **GREEDY)
    by_name = client.chat.completions.create(model=ADAPTER, **GREEDY)
    by_list = client.chat.completions.create(
        model=MODEL_ID, extra_body={"plugins": [{"type": "lora", "name": ADAPTER, "scale": 1.0}]}, **GREEDY
    )
    assert text(by_pair) == text(by_name) == text(by_list)
    assert text(by_pair) != text(base)
    assert by_name.model == ADAPTER and by_pair.model == f"{MODEL_ID}::{ADAPTER}"
    echo = by_list.model_extra["plugins"]
    assert [(p["type"], p["name"]) for p in echo] == [("lora", ADAPTER)]
    assert echo[0]["hash"].startswith("sha256:")
    assert "plugins" not in (base.model_extra or {})


def test_scale_zero_is_the_base_model_and_streams_echo_the_chain_first(client):
    base = client.chat.completions.create(model=MODEL_ID, **GREEDY)
    zero = client.chat.completions.create(
        model=MODEL_ID, extra_body={"plugins": [{"type": "lora", "name": ADAPTER, "scale": 0.0}]}, **GREEDY
    )
    assert text(zero) == text(base)
    chunks = list(client.chat.completions.create(model=ADAPTER, stream=True, **GREEDY))
    assert chunks[0].model_extra["plugins"][0]["name"] == ADAPTER
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text(client.chat.completions.create(model=ADAPTER, **GREEDY))


def test_bad_selections_raise_the_clients_typed_errors(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=f"{MODEL_ID}::nope", **GREEDY)
    assert "nope" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=MODEL_ID, extra_body={"plugins": [{"type": "lora", "name": "nope"}]}, **GREEDY)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL_ID, extra_body={"plugins": [{"type": "lora", "name": ADAPTER, "scale": "big"}]}, **GREEDY
        )
    assert e.value.body["param"] == "plugins[0].scale"


def test_adapters_load_list_and_unload_at_run_time(server, client):
    url = server.url + "/v1/plugins"
    r = requests.post(url, json={"type": "lora", "name": "again", "path": "lora_smollm2"}, timeout=60)
    assert r.status_code == 200, r.text
    listed = {p["name"]: p for p in requests.get(url, timeout=10).json()["data"]}
    assert listed["again"]["hash"] == listed[ADAPTER]["hash"], "same files, same content hash"
    models = {m.id: m for m in client.models.list().data}
    assert models["again"].model_extra["parent"] == MODEL_ID
    assert text(client.chat.completions.create(model="again", **GREEDY)) == text(
        client.chat.completions.create(model=ADAPTER, **GREEDY)
    )
    escape = requests.post(url, json={"type": "lora", "name": "x", "path": "/etc"}, timeout=10)
    assert escape.status_code == 400 and "outside the plug-in folder" in escape.json()["error"]["message"]
    assert requests.delete(url + "/again", timeout=10).json()["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="again", **GREEDY)
    server.assert_serving()
