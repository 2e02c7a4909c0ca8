"""Steering vectors over real HTTP: a control-vector GGUF written with the Python `gguf`
package (as llama.cpp's tools and repeng write them) loads as a `steer` plug-in and changes
the default model's output per request; scale 0 is the base model; files that do not fit the
model are refused."""
import gguf
import numpy as np
import openai
import pytest
import requests

from conftest import MODEL_ID

HIDDEN, LAYERS = 576, 30
GREEDY = dict(messages=[{"role": "user", "content": "Tell me about the ocean."}], max_tokens=16, temperature=0)


def write_control_vector(path, layers, hidden=HIDDEN, seed=0):
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "controlvector")
    w.add_string("controlvector.model_hint", "llama")
    w.add_uint32("controlvector.layer_count", len(layers))
    for layer in layers:
        d = rng.standard_normal(hidden).astype(np.float32)
        w.add_tensor(f"direction.{layer}", d / np.linalg.norm(d))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def steer(name, scale, **extra):
    return {"plugins": [{"type": "steer", "name": name, "scale": scale, **extra}]}


def test_a_vector_written_by_python_gguf_steers_per_request(server, client, plugin_dir):
    write_control_vector(plugin_dir / "random.gguf", range(8, 20))
    r = requests.post(server.url + "/v1/plugins", json={"type": "steer", "name": "random", "path": "random.gguf"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["type"] == "steer"

    def text(**kw):
        return client.chat.completions.create(model=MODEL_ID, **GREEDY, **kw).choices[0].message.content

    base = text()
    assert text(extra_body=steer("random", 0.0)) == base
    steered = text(extra_body=steer("random", 8.0))
    assert steered != base
    assert text(extra_body=steer("random", 8.0, layers=[8, 9])) != steered, "the layer range narrows the steering"
    with pytest.raises(openai.BadRequestError) as e:
        text(extra_body=steer("random", 8.0, layers=[0, 3]))
    assert e.value.body["param"] == "plugins[0].layers"


def test_vectors_that_do_not_fit_the_model_are_refused_by_name(server, plugin_dir):
    write_control_vector(plugin_dir / "wide.gguf", [3], hidden=HIDDEN + 1)
    write_control_vector(plugin_dir / "deep.gguf", [LAYERS + 2])
    for name, needle in [("wide", "hidden size is 576"), ("deep", "beyond the base model's 30 layers")]:
        r = requests.post(server.url + "/v1/plugins", json={"type": "steer", "name": name, "path": f"{name}.gguf"}, timeout=60)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    server.assert_serving()
