"""The official `openai` client against the real server and model."""
from conftest import MODEL_ID

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_lists_the_default_model(client):
    ids = [m.id for m in client.models.list().data]
    assert MODEL_ID in ids


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=CAPITAL, max_tokens=16, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming_equals_non_streaming(client):
    kwargs = dict(model=MODEL_ID, messages=CAPITAL, max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [finals[0]] and finals[0] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_completions(client):
    r = client.completions.create(model=MODEL_ID, prompt="One, two, three,", max_tokens=8, temperature=0)
    assert r.choices[0].text.strip() != ""
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 8


def test_seed_makes_sampling_reproducible(client):
    kwargs = dict(model=MODEL_ID, messages=CAPITAL, max_tokens=24, temperature=1.0, top_p=0.95)
    a = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kwargs).choices[0].message.content
    others = {client.chat.completions.create(seed=s, **kwargs).choices[0].message.content for s in range(5)}
    assert a == b
    assert len(others | {a}) > 1, "different seeds never changed the sample"


def test_stop_sequence_is_not_in_the_output(client):
    base = client.completions.create(model=MODEL_ID, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = base.choices[0].text
    assert " 6" in text, text  # the greedy continuation counts on
    r = client.completions.create(model=MODEL_ID, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stop=[" 6"])
    assert r.choices[0].finish_reason == "stop"
    assert " 6" not in r.choices[0].text
    assert text.startswith(r.choices[0].text)


def test_vllm_output_extensions_through_extra_body(client):
    kwargs = dict(model=MODEL_ID, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = client.completions.create(**kwargs).choices[0].text
    kept = client.completions.create(stop=[" 6"], extra_body={"include_stop_str_in_output": True}, **kwargs)
    assert kept.choices[0].finish_reason == "stop"
    assert kept.choices[0].text == text[: text.index(" 6") + 2]
    # The greedy reply's first token as a stop token ends the reply at once, unless
    # min_tokens holds it off (then the token is masked and another one comes first).
    first = client.completions.create(logprobs=0, extra_body={"return_tokens_as_token_ids": True}, **kwargs)
    first_id = int(first.choices[0].logprobs.tokens[0].removeprefix("token_id:"))
    stopped = client.completions.create(extra_body={"stop_token_ids": [first_id]}, **kwargs)
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == ("", "stop")
    assert stopped.usage.completion_tokens == 1
    held = client.completions.create(extra_body={"stop_token_ids": [first_id], "min_tokens": 3}, **kwargs)
    assert held.usage.completion_tokens >= 3
    assert held.choices[0].text != ""


def test_chat_continues_the_final_message(client):
    messages = CAPITAL + [{"role": "assistant", "content": "The capital of France is"}]
    r = client.chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=4, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False})
    assert "Paris" in r.choices[0].message.content


def test_n_greater_than_one(client):
    r = client.chat.completions.create(model=MODEL_ID, messages=CAPITAL, max_tokens=8, temperature=1.0, n=3, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.message.content for c in r.choices)


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL_ID, messages=CAPITAL, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert abs(entry.top_logprobs[0].logprob - entry.logprob) < 1e-4


def test_completions_echo_scores_the_prompt(client):
    # What lm-evaluation-harness's completions backend sends to score a continuation.
    r = client.completions.create(model=MODEL_ID, prompt="Paris is the capital of France", max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "Paris is the capital of France"
    assert lp.token_logprobs[0] is None
    assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.prompt_tokens


def test_n_choices_share_one_prefill_and_each_equals_its_own_request(client, server):
    """`n` choices fork off one prefill of their prompt (the engine copies the cache); each
    samples with seed + its index, so each equals the n = 1 request with that seed."""
    import re
    import time

    import requests

    def step_tokens():
        text = requests.get(server.url + "/metrics", timeout=30).text
        return float(re.search(r"^graft_engine_step_tokens_sum (\S+)$", text, re.M).group(1))

    kwargs = dict(model=MODEL_ID, messages=CAPITAL, max_tokens=12, temperature=1.0)
    before = step_tokens()
    r = client.chat.completions.create(n=3, seed=40, **kwargs)
    texts = [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
    # The prompt went in once (less what an earlier request left in the prefix cache); each
    # choice feeds every sampled token but its last.
    prompt = r.usage.prompt_tokens - r.usage.prompt_tokens_details.cached_tokens
    fed_tokens = r.usage.completion_tokens - 3
    # The engine records a step's tokens after it has sent the step's tokens out, so the
    # response can arrive before its last step is counted: wait for the count to settle.
    deadline = time.monotonic() + 10
    while (fed := step_tokens() - before) < prompt + fed_tokens and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fed == prompt + fed_tokens, (fed, prompt, r.usage)
    for i, text in enumerate(texts):
        alone = client.chat.completions.create(n=1, seed=40 + i, **kwargs).choices[0].message.content
        assert alone == text, (i, alone, text)
    assert len(set(texts)) > 1, texts
