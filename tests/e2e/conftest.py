"""Starts the real `server` binary on the real default model for the end-to-end tests.

The binary is the one `cargo test` built (target/debug/server unless GRAFT_SERVER_BIN says
otherwise); the model is the library's cached default model (`server fetch` runs first in
scripts/test.sh). Each server runs on a free local port and is stopped with SIGTERM at the end,
which also checks that shutdown exits cleanly.
"""
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("GRAFT_SERVER_BIN", ROOT / "target" / "debug" / "server"))
# The HTTP stack over the scripted fake engine (server/examples/fake_server.rs), for fuzzing.
FAKE_BIN = BIN.parent / "examples" / "fake_server"
MODEL_ID = "smollm2-135m-instruct"
# The session server's plug-in folder is a temporary copy holding the LoRA adapter made with
# PEFT for the reference tests (plugins/tests/fixtures/lora_smollm2), registered at start-up as
# "reference"; tests write further plug-in files into it.
FIXTURES = ROOT / "plugins" / "tests" / "fixtures"
ADAPTER = "reference"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, log_name: str, what: str, timeout: float) -> None:
    """Polls `url`/health until it answers 200; fails at once if `proc` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {log_name}")
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{what} did not become ready")


class Server:
    def __init__(self, *args: str, command: tuple[str, ...] = (str(BIN), "serve")):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(ROOT / "target" / f"e2e-server-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [*command, "--port", str(self.port), *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 180.0) -> None:
        wait_healthy(self.url, self.proc, self.log.name, "server", timeout)

    def assert_serving(self, model: str = MODEL_ID) -> None:
        """The server still answers a real generation after whatever the test did."""
        r = requests.post(
            self.url + "/v1/completions",
            json={"model": model, "prompt": "The sky is", "max_tokens": 2, "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1

    def metrics(self) -> dict:
        """/metrics parsed by the official Prometheus client library (so the page must be valid
        exposition text): {(sample name, labels as a sorted tuple): value}."""
        text = requests.get(self.url + "/metrics", timeout=10).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        finally:
            self.log.close()
        return code


@pytest.fixture(scope="session")
def plugin_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("plugins")
    shutil.copytree(FIXTURES / "lora_smollm2", d / "lora_smollm2")
    return d


@pytest.fixture(scope="session")
def server(plugin_dir):
    s = Server("--plugin-dir", str(plugin_dir), "--plugin", f"lora:{ADAPTER}=lora_smollm2")
    yield s
    assert s.stop() == 0, "server did not exit 0 on SIGTERM"


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
