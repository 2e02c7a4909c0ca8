"""A vision tower attached to the default model with `--vision`, through the official openai
client: the test trains a small tower with `server train vision` (a few steps: the trained
model's accuracy is measured by `server eval vision`, README "Vision"), asks `server eval
vision` for its answers to held-out questions through the serving forward pass in-process, then
sends the same images as data: URLs to a server with the tower attached: every answer is the
in-process one, the image tokens count in usage, and text that spells the borrowed image token
is refused."""
import base64
import json
import subprocess

import openai
import pytest

from conftest import BIN, Server

TINY = ["--hidden-size", "32", "--layers", "1", "--heads", "1", "--align-batch", "2",
        "--batch", "1", "--turns", "2", "--align-steps", "2", "--steps", "1",
        "--test-questions", "2"]


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    root = tmp_path_factory.mktemp("vision")
    out, evaluated = root / "tower", root / "eval"
    subprocess.run([str(BIN), "train", "vision", "--out", str(out), *TINY], check=True,
                   capture_output=True)
    subprocess.run([str(BIN), "eval", "vision", "--vision", str(out), "--questions", "4",
                    "--samples", "4", "--out", str(evaluated)], check=True, capture_output=True)
    return out, evaluated / "samples"


@pytest.fixture(scope="module")
def seeing(tower, tmp_path_factory):
    """The server with the tower and two `vision_prune` plug-ins after layer 14: random scoring
    (config written here) and a decision module `server train vision-prune` trained for the
    tower (one step: what it learned is measured by `server eval vision`)."""
    plugins = tmp_path_factory.mktemp("plugins")
    subprocess.run([str(BIN), "train", "vision-prune", "--tower", str(tower[0]), "--out",
                    str(plugins / "learned"), "--steps", "1", "--batch", "1", "--test-steps",
                    "1", "--inner-size", "16", "--heads", "2"], check=True, capture_output=True)
    (plugins / "prune").mkdir()
    image_token = json.loads((tower[0] / "config.json").read_text())["image_token_id"]
    config = {"type": "vision_prune", "layer": 14, "image_token_id": image_token,
              "scorer": "random", "keep": 0.25,
              "base_model": {"architecture": "llama", "hidden_size": 576, "num_layers": 30,
                             "vocab_size": 49152}}
    (plugins / "prune" / "config.json").write_text(json.dumps(config))
    server = Server("--vision", str(tower[0]), "--plugin-dir", str(plugins),
                    "--plugin", "vision_prune:prune=prune",
                    "--plugin", "vision_prune:learned=learned")
    yield server
    assert server.stop() == 0


def client(server: Server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def image_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def ask(server: Server, url: str, question: str, max_tokens: int = 4, **extra):
    return client(server).chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": question},
        ]}],
        max_tokens=max_tokens,
        temperature=0,
        **extra,
    )


def answer_logprobs(server: Server, samples, index: int, plugins):
    """The log-probs of the first two answer tokens to held-out question `index` of `samples`
    (its image as a data: URL) with the plug-in chain `plugins` (None: the model alone), and
    the prompt's token count."""
    q = json.loads((samples / "questions.jsonl").read_text().splitlines()[index])
    extra = {"extra_body": {"plugins": plugins}} if plugins else {}
    got = ask(server, image_url(samples / q["image"]), q["question"], max_tokens=2,
              logprobs=True, **extra)
    return [t.logprob for t in got.choices[0].logprobs.content], got.usage.prompt_tokens


def test_the_server_answers_as_the_serving_forward_pass_does_in_process(tower, seeing):
    samples = tower[1]
    lines = [json.loads(line) for line in (samples / "questions.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    for q in lines:
        got = ask(seeing, image_url(samples / q["image"]), q["question"])
        assert got.choices[0].message.content.strip() == q["model_answer"], q
        # 256 image tokens, the two around them and the global marker, then the text.
        assert got.usage.prompt_tokens > 256 + 3
    seeing.assert_serving()


def test_text_that_spells_the_image_token_is_refused(tower, seeing):
    url = image_url(tower[1] / "000.png")
    with pytest.raises(openai.BadRequestError) as e:
        ask(seeing, url, "what is <empty_output>?", max_tokens=2)
    assert "image tokens" in e.value.body["message"], e.value.body
    seeing.assert_serving()


def test_pruning_image_tokens_through_the_server(tower, seeing):
    """keep 1 answers with the dense model's log-probs exactly; keep 0.1 changes them (the
    image tokens left the later layers), answers, and counts the same prompt tokens."""
    def logprobs(plugins):
        return answer_logprobs(seeing, tower[1], 0, plugins)

    dense, tokens = logprobs(None)
    whole, whole_tokens = logprobs([{"type": "vision_prune", "name": "prune", "keep": 1.0}])
    pruned, pruned_tokens = logprobs([{"type": "vision_prune", "name": "prune", "keep": 0.1}])
    assert whole == dense
    assert pruned[0] != dense[0]
    assert tokens == whole_tokens == pruned_tokens
    with pytest.raises(openai.BadRequestError) as e:
        logprobs([{"type": "vision_prune", "name": "prune", "keep": 0}])
    assert "keep" in e.value.body["message"], e.value.body
    seeing.assert_serving()


def test_the_learned_scorer_through_the_server(tower, seeing):
    """A trained decision module serves: keep 1 is the dense model, its trained fraction (the
    file's default keep, 0.25) changes the answer's log-probs and counts the same prompt
    tokens, and a chain naming it with a bad keep is a 400."""
    def logprobs(plugins):
        return answer_logprobs(seeing, tower[1], 1, plugins)

    dense, tokens = logprobs(None)
    assert logprobs([{"type": "vision_prune", "name": "learned", "keep": 1.0}]) == (dense, tokens)
    learned, learned_tokens = logprobs([{"type": "vision_prune", "name": "learned"}])
    assert learned[0] != dense[0] and learned_tokens == tokens
    with pytest.raises(openai.BadRequestError) as e:
        logprobs([{"type": "vision_prune", "name": "learned", "keep": 2}])
    assert "keep" in e.value.body["message"], e.value.body
    seeing.assert_serving()
