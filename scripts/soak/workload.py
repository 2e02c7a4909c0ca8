"""The soak test's clients: what each sends, which statuses it may get, and the ledger of what
they saw (soak.py checks it against the server's own metrics)."""
import json
import os
import random
import shutil
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import requests

CLIENT_TIMEOUT = 180  # seconds; a request without a complete answer by then is "hung"
OK_OR_BUSY = {200, 429}
# A plug-in operation may find the plug-in memory budget taken by plug-ins that running
# requests hold: a designed 503 with Retry-After, told apart from failures by its code.
BUDGET_FULL = "503:plugin_memory_exhausted"

ALLOWED = {
    "warm-up": {200},
    "generate": OK_OR_BUSY,
    "burst": OK_OR_BUSY,
    "churn-generate": OK_OR_BUSY | {404, BUDGET_FULL},
    "disconnect": OK_OR_BUSY | {"disconnect"},
    "plugin-load": {200, 409, BUDGET_FULL},
    "plugin-delete": {200, 404},
}


class Ledger:
    """Every request's outcome, by (class, route, status); thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.outcomes: Counter = Counter()
        self.incomplete: list[str] = []
        self.expected: dict[str, set] = dict(ALLOWED)

    def record(self, cls: str, route: str, status, problem: str | None = None):
        with self.lock:
            self.outcomes[(cls, route, status)] += 1
            if problem and len(self.incomplete) < 50:
                self.incomplete.append(f"{cls} {route}: {problem}")

    def allowed(self, cls: str) -> set:
        return self.expected.get(cls, set())

    def sent(self) -> int:
        with self.lock:
            return sum(self.outcomes.values())


def status_of(r: requests.Response):
    if r.status_code == 503:
        try:
            return f"503:{r.json()['error']['code']}"
        except (ValueError, KeyError, TypeError):
            return 503
    return r.status_code


class BadRequests:
    """One request of each class the server must refuse, with the status it must answer."""

    def __init__(self, model: str, max_body: int):
        chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        j = json.dumps
        self.cases = [
            ("bad-json", "POST", "/v1/chat/completions", b'{"model": "x", "messages": [', 400),
            ("bad-type", "POST", "/v1/chat/completions", j({**chat, "max_tokens": "four"}), 400),
            ("bad-range", "POST", "/v1/chat/completions", j({**chat, "temperature": 7}), 400),
            ("bad-model", "POST", "/v1/chat/completions", j({**chat, "model": "no-such-model"}), 404),
            ("bad-plugin", "POST", "/v1/chat/completions", j({**chat, "plugins": [{"type": "lora", "name": "nope"}]}), 404),
            ("bad-plugin-param", "POST", "/v1/chat/completions", j({**chat, "plugins": [{"type": "lora", "name": "reference", "scale": 99}]}), 400),
            ("bad-context", "POST", "/v1/completions", j({"model": model, "prompt": "hello " * 9000, "max_tokens": 16}), 400),
            ("bad-body-size", "POST", "/v1/completions", j({"model": model, "prompt": "x" * (max_body + 4096)}), 413),
            ("bad-route", "POST", "/v1/nothing", j({}), 404),
            ("bad-method", "GET", "/v1/chat/completions", None, 405),
            ("bad-plugin-path", "POST", "/v1/plugins", j({"type": "lora", "name": "x", "path": "../../etc"}), 400),
            ("bad-plugin-name", "POST", "/v1/plugins", j({"type": "lora", "name": "..", "path": "reference"}), 400),
            ("bad-plugin-symlink", "POST", "/v1/plugins", j({"type": "lora", "name": "sneaky", "path": "sneaky"}), 400),
            ("bad-delete", "DELETE", "/v1/plugins/never-loaded", None, 404),
        ]

    def register(self, ledger: Ledger):
        for cls, *_, status in self.cases:
            ledger.expected[cls] = {status}


class Workers:
    def __init__(self, url, model, ledger, plugin_dir: Path, adapter: Path, bad: BadRequests, capacity: int):
        self.url, self.model, self.ledger = url, model, ledger
        self.plugin_dir, self.adapter, self.bad, self.capacity = plugin_dir, adapter, bad, capacity
        self.stop = threading.Event()
        bad.register(ledger)
        # A plug-in folder whose config is a symlink out of the plug-in directory.
        sneaky = plugin_dir / "sneaky"
        sneaky.mkdir(exist_ok=True)
        shutil.copy(adapter / "adapter_model.safetensors", sneaky)
        if not (sneaky / "adapter_config.json").exists():
            os.symlink("/etc/hostname", sneaky / "adapter_config.json")

    # ---- one request of each kind -------------------------------------------------------

    def generate(self, cls: str, plugins: list, rng: random.Random):
        chat = rng.random() < 0.5
        stream = rng.random() < 0.5
        route = "/v1/chat/completions" if chat else "/v1/completions"
        body = {"model": self.model, "max_tokens": rng.randint(1, 24), "temperature": rng.choice([0, 0.7, 1.0]), "stream": stream}
        body.update({"messages": [{"role": "user", "content": rng.choice(PROMPTS)}]} if chat else {"prompt": rng.choice(PROMPTS)})
        if plugins:
            body["plugins"] = plugins
        try:
            with requests.post(self.url + route, json=body, stream=stream, timeout=CLIENT_TIMEOUT) as r:
                status = status_of(r)
                problem = None
                if r.status_code == 200:
                    problem = read_stream(r) if stream else read_json(r)
                self.ledger.record(cls, route, status, problem)
        except requests.RequestException as e:
            self.ledger.record(cls, route, "hung" if isinstance(e, requests.Timeout) else "connection-error", str(e)[:200])

    def long_prompt(self, rng: random.Random):
        """A prompt of about 3,000 tokens: the large activations and KV cache that make an
        allocator keep memory after the load."""
        body = {"model": self.model, "prompt": " ".join(rng.choice(PROMPTS) for _ in range(400)), "max_tokens": 4}
        try:
            r = requests.post(self.url + "/v1/completions", json=body, timeout=CLIENT_TIMEOUT)
            self.ledger.record("generate", "/v1/completions", status_of(r), read_json(r) if r.status_code == 200 else None)
        except requests.RequestException as e:
            self.ledger.record("generate", "/v1/completions", "hung" if isinstance(e, requests.Timeout) else "connection-error", str(e)[:200])

    def disconnect(self, rng: random.Random):
        """A client that leaves: a stream after its first chunk, a plain request while the
        server is still generating."""
        u = urlparse(self.url)
        stream = rng.random() < 0.7
        body = json.dumps({"model": self.model, "prompt": rng.choice(PROMPTS), "max_tokens": 200, "stream": stream}).encode()
        head = f"POST /v1/completions HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        route = "/v1/completions"
        try:
            with socket.create_connection((u.hostname, u.port), timeout=CLIENT_TIMEOUT) as s:
                s.sendall(head.encode() + body)
                if not stream:
                    # Leave while it generates, unless an answer (a 429, say) comes first.
                    s.settimeout(rng.uniform(0.05, 0.5))
                try:
                    first = s.recv(65536)
                except socket.timeout:
                    self.ledger.record("disconnect", route, "disconnect")
                    return
                status = int(first.split(b" ", 2)[1]) if first.startswith(b"HTTP/1.1 ") else 0
                if status == 200 and stream and b"[DONE]" not in first:
                    self.ledger.record("disconnect", route, "disconnect")
                else:
                    self.ledger.record("disconnect", route, status)
        except OSError as e:
            self.ledger.record("disconnect", route, "connection-error", str(e)[:200])

    def bad_request(self, rng: random.Random):
        cls, method, path, data, _ = rng.choice(self.bad.cases)
        try:
            r = requests.request(method, self.url + path, data=data, headers={"content-type": "application/json"}, timeout=CLIENT_TIMEOUT)
            problem = None
            try:
                if set(r.json()["error"]) < {"message", "type", "param", "code"}:
                    problem = f"error body lacks OpenAI fields: {r.text[:200]}"
            except (ValueError, KeyError, TypeError):
                problem = f"not an OpenAI error body: {r.text[:200]}"
            self.ledger.record(cls, path if not path.startswith("/v1/plugins/") else "/v1/plugins/{name}", status_of(r), problem)
        except requests.RequestException as e:
            self.ledger.record(cls, path, "connection-error", str(e)[:200])

    def churn(self, rng: random.Random):
        """Load, replace or delete one of four adapters; past the budget, idle ones are evicted."""
        name = f"churn-{rng.randrange(4)}"
        if not (self.plugin_dir / name).exists():
            shutil.copytree(self.adapter, self.plugin_dir / name)
        roll = rng.random()
        try:
            if roll < 0.3:
                r = requests.delete(f"{self.url}/v1/plugins/{name}", timeout=CLIENT_TIMEOUT)
                self.ledger.record("plugin-delete", "/v1/plugins/{name}", status_of(r))
            else:
                body = {"type": "lora", "name": name, "path": name, "replace": roll < 0.8}
                r = requests.post(self.url + "/v1/plugins", json=body, timeout=CLIENT_TIMEOUT)
                self.ledger.record("plugin-load", "/v1/plugins", status_of(r))
        except requests.RequestException as e:
            self.ledger.record("plugin-churn", "/v1/plugins", "connection-error", str(e)[:200])

    def burst(self):
        """Three times what the batch and the queue hold, all at once."""
        threads = [threading.Thread(target=self.burst_one, args=(random.Random(i),)) for i in range(3 * self.capacity)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def burst_one(self, rng):
        body = {"model": self.model, "prompt": rng.choice(PROMPTS), "max_tokens": 8}
        try:
            r = requests.post(self.url + "/v1/completions", json=body, timeout=CLIENT_TIMEOUT)
            if r.status_code == 429 and "retry-after" not in {k.lower() for k in r.headers}:
                self.ledger.record("burst", "/v1/completions", 429, "429 without Retry-After")
            else:
                self.ledger.record("burst", "/v1/completions", status_of(r), read_json(r) if r.status_code == 200 else None)
        except requests.RequestException as e:
            self.ledger.record("burst", "/v1/completions", "hung" if isinstance(e, requests.Timeout) else "connection-error", str(e)[:200])

    # ---- the schedule -------------------------------------------------------------------

    def loop(self, seed: int, pause: float, action):
        rng = random.Random(seed)
        while not self.stop.is_set():
            action(rng)
            self.stop.wait(pause * rng.random() * 2)

    def run(self, duration: float, progress):
        plans = [
            (0.2, lambda rng: self.generate("generate", [], rng)),
            (0.2, lambda rng: self.generate("generate", [], rng)),
            (0.2, lambda rng: self.generate("generate", [{"type": "lora", "name": "reference"}], rng)),
            (0.5, lambda rng: self.generate("churn-generate", [{"type": "lora", "name": f"churn-{rng.randrange(4)}"}], rng)),
            (1.0, self.disconnect),
            (8.0, self.long_prompt),
            (0.3, self.bad_request),
            (1.0, self.churn),
            (20.0, lambda rng: self.burst()),
        ]
        threads = [threading.Thread(target=self.loop, args=(i, pause, action), daemon=True) for i, (pause, action) in enumerate(plans)]
        start = time.time()
        for t in threads:
            t.start()
        next_report = start + min(60.0, duration / 4)
        while time.time() - start < duration:
            time.sleep(1)
            if time.time() >= next_report:
                progress(f"soak: {time.time() - start:.0f}/{duration:.0f} s, {self.ledger.sent()} requests")
                next_report += min(60.0, duration / 4)
        self.stop.set()
        for t in threads:
            t.join(CLIENT_TIMEOUT + 10)
            if t.is_alive():
                self.ledger.record("worker", "-", "hung", "a client thread did not finish")


def read_stream(r: requests.Response) -> str | None:
    done = False
    for line in r.iter_lines():
        if line.startswith(b"data: ") and line[6:].startswith(b'{"error"'):
            return f"error event: {line[:200]!r}"
        done |= line == b"data: [DONE]"
    return None if done else "stream ended without [DONE]"


def read_json(r: requests.Response) -> str | None:
    try:
        body = r.json()
        return None if body.get("choices") else f"no choices: {r.text[:200]}"
    except ValueError:
        return f"not JSON: {r.text[:200]}"


PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Once upon a time",
    "Explain what a hash table is in one sentence.",
    "def fibonacci(n):",
]
