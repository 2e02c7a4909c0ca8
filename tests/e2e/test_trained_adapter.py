"""An adapter trained by `server train lora` on data/ahoy (every reply opening with "Ahoy,
matey!", a behaviour the default model lacks; README "Training plug-ins" has the command) is
loaded into the running server; on instructions held out of training, requests with it get the
behaviour and requests without it do not."""
import json
import shutil

import requests

from conftest import MODEL_ID, ROOT

AHOY = ROOT / "data" / "ahoy"


def opening(client, model, instruction):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": instruction}], max_tokens=6, temperature=0
    )
    return r.choices[0].message.content


def test_the_trained_adapter_greets_on_held_out_prompts_and_the_base_model_does_not(server, client, plugin_dir):
    shutil.copytree(AHOY / "adapter", plugin_dir / "ahoy", dirs_exist_ok=True)
    r = requests.post(server.url + "/v1/plugins", json={"type": "lora", "name": "ahoy", "path": "ahoy"}, timeout=60)
    assert r.status_code == 200, r.text
    heldout = json.loads((AHOY / "heldout.json").read_text())
    trained = {json.loads(line)["messages"][0]["content"] for line in (AHOY / "train.jsonl").open()}
    assert len(heldout) >= 20 and not trained & set(heldout), "held-out instructions are unseen"
    with_adapter = [opening(client, "ahoy", i) for i in heldout]
    without = [opening(client, MODEL_ID, i) for i in heldout]
    greets = sum(t.startswith("Ahoy") for t in with_adapter)
    assert greets >= 0.8 * len(heldout), with_adapter
    assert not any(t.startswith("Ahoy") for t in without), without
    assert requests.delete(server.url + "/v1/plugins/ahoy", timeout=10).status_code == 200
    server.assert_serving()
