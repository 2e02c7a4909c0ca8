"""Schemathesis hooks for the short run on the real model (test_openapi.py): generated requests
keep their shape but ask for at most a few tokens and choices, so each generation takes a
fraction of a second on CPU (the server's --max-tokens-default covers requests without
`max_tokens`), and name no model or plug-in, so they reach the engine instead of stopping at
a 404 (the fake-engine run covers those)."""
import schemathesis

MAX_TOKENS = 4
MAX_N = 2
MAX_PROMPTS = 4


def capped(value, cap):
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return cap if is_int and value > cap else value


@schemathesis.hook
def map_body(context, body):
    if not isinstance(body, dict):
        return body
    body.pop("model", None)
    body.pop("plugins", None)
    for field in ("max_tokens", "max_completion_tokens"):
        if field in body:
            body[field] = capped(body[field], MAX_TOKENS)
    if "n" in body:
        body["n"] = capped(body["n"], MAX_N)
    if isinstance(body.get("prompt"), list):
        body["prompt"] = body["prompt"][:MAX_PROMPTS]
    return body
