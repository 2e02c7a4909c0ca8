"""Three graft replicas behind vllm-router (the vLLM project's router, PyPI vllm-router), all
on loopback: the router's rewritten requests are served, plug-in selection passes through it,
and when one replica is SIGKILLed and another SIGTERMed in the middle of a load, every request
completes or fails cleanly, none hangs, the drained replica finishes its streams, and the
router routes around both. The run's figures go to target/router-faults.json
(docs/BENCHMARKS.md, "Replicas behind vllm-router")."""
import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from conftest import ADAPTER, MODEL_ID, ROOT, Server, free_port, wait_healthy

ROUTER = Path(os.environ.get("VLLM_ROUTER_BIN", ROOT / ".venv-e2e" / "bin" / "vllm-router"))
PROMPT = "Write a short story about a lighthouse keeper."


class Router:
    def __init__(self, workers: list[Server], policy: str = "round_robin"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(ROOT / "target" / f"e2e-router-{self.port}.log", "w")
        self.proc = subprocess.Popen(
            [str(ROUTER), "--host", "127.0.0.1", "--port", str(self.port), "--policy", policy,
             "--worker-urls", *[w.url for w in workers],
             "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
             "--retry-max-retries", "2", "--log-level", "warning",
             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_healthy(self.url, self.proc, self.log.name, "vllm-router", 60)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def replicas(plugin_dir):
    if not ROUTER.exists():
        pytest.fail(f"{ROUTER} is missing: scripts/e2e.sh installs vllm-router")
    servers = [Server("--plugin-dir", str(plugin_dir), "--plugin", f"lora:{ADAPTER}=lora_smollm2",
                      "--drain-seconds", "120") for _ in range(3)]
    yield servers
    for s in servers:
        if s.proc.poll() is None:
            s.stop()


def greedy(url: str, **extra) -> str:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 12,
            "temperature": 0, **extra}
    r = requests.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_routed_requests_are_served_and_plugin_selection_passes_through(replicas):
    router = Router(replicas)
    try:
        direct = greedy(replicas[0].url)
        adapter = greedy(replicas[0].url, model=ADAPTER)
        listed = greedy(replicas[0].url, plugins=[{"type": "lora", "name": ADAPTER}])
        assert adapter != direct, "the adapter must change the greedy reply for this check to mean anything"
        # Three requests each, so round robin sends one to every replica.
        for _ in range(3):
            assert greedy(router.url) == direct
            assert greedy(router.url, model=ADAPTER) == adapter
            assert greedy(router.url, plugins=[{"type": "lora", "name": ADAPTER}]) == listed
    finally:
        router.stop()


def stream(url: str, outcomes: list, lock: threading.Lock, index: int) -> None:
    """One streaming completion through the router; records how it ended."""
    body = {"model": MODEL_ID, "prompt": PROMPT, "max_tokens": 48, "temperature": 0,
            "ignore_eos": True, "stream": True}
    started = time.monotonic()
    outcome = {"index": index, "started": started}
    try:
        with requests.post(url + "/v1/completions", json=body, stream=True, timeout=(10, 120)) as r:
            outcome["status"] = r.status_code
            if r.status_code == 200:
                events = [line.removeprefix(b"data: ") for line in r.iter_lines() if line]
                chunks = [json.loads(e) for e in events if e != b"[DONE]"]
                finish = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
                outcome["finished"] = events[-1:] == [b"[DONE]"] and "length" in finish
                outcome["error_event"] = any("error" in c for c in chunks)
    except requests.RequestException as e:
        outcome["exception"] = type(e).__name__
    outcome["ended"] = time.monotonic()
    with lock:
        outcomes.append(outcome)


def test_a_killed_and_a_drained_replica_lose_no_request_silently(replicas):
    router = Router(replicas)
    outcomes, lock = [], threading.Lock()
    killed, drained, survivor = replicas
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            futures = [pool.submit(stream, router.url, outcomes, lock, i) for i in range(6)]
            time.sleep(3)
            in_flight_on_killed = killed.metrics()[("vllm:num_requests_running", ())]
            kill_at = time.monotonic()
            killed.proc.send_signal(signal.SIGKILL)
            drained.proc.send_signal(signal.SIGTERM)
            futures += [pool.submit(stream, router.url, outcomes, lock, 6 + i) for i in range(12)]
            for f in futures:
                f.result(timeout=600)  # none hangs
        assert killed.proc.wait(timeout=10) == -signal.SIGKILL
        assert drained.proc.wait(timeout=180) == 0, "the drained replica exits 0 once its streams end"
        completed = [o for o in outcomes if o.get("finished")]
        failed = [o for o in outcomes if not o.get("finished")]
        # A failure is clean: an HTTP error status, an error event or a closed connection,
        # never a 200 stream that just stops. Connections break only for the streams the dead
        # replica held; error statuses (the draining replica's 503, the router's answer for
        # the dead one) only until the router's health checks (every second) catch up.
        for o in failed:
            assert o.get("status", 0) != 200 or o.get("error_event") or "exception" in o, o
        broken = [o for o in failed if "exception" in o]
        assert len(broken) <= in_flight_on_killed, (broken, in_flight_on_killed)
        refused = [o for o in failed if "exception" not in o]
        assert all(o["started"] - kill_at < 5 for o in refused), refused
        # After the faults the router sends everything to the survivor.
        for _ in range(3):
            greedy(router.url)
        survivor.assert_serving()
        # Routing around the dead replica took until the last request started after the kill
        # that still failed.
        late_failures = [o["started"] - kill_at for o in failed if o["started"] > kill_at]
        figures = {
            "requests": len(outcomes), "completed": len(completed), "failed": len(failed),
            "in_flight_on_killed_replica": in_flight_on_killed,
            "broken_streams": len(broken),
            "error_statuses": sorted(o.get("status") for o in refused),
            "seconds_to_route_around": round(max(late_failures, default=0.0), 3),
        }
        (ROOT / "target" / "router-faults.json").write_text(json.dumps(figures, indent=2))
    finally:
        router.stop()


def completions_served(server: Server) -> float:
    return sum(v for (name, labels), v in server.metrics().items()
               if name == "graft_requests_total" and ("route", "/v1/completions") in labels)


def test_cache_aware_keeps_each_prefix_on_one_replica(replicas):
    """The policy to use for prefix (and so prompt cache) affinity: vllm-router's cache_aware
    matches each request's text against a tree of what it sent where."""
    router = Router(replicas, policy="cache_aware")
    try:
        prefixes = [f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * 20
                    for i in range(3)]
        placement = {}
        for i, prefix in enumerate(prefixes):
            before = [completions_served(s) for s in replicas]
            for q in range(4):
                body = {"model": MODEL_ID, "prompt": prefix + f"Question {q}?", "max_tokens": 1}
                assert requests.post(router.url + "/v1/completions", json=body, timeout=120).status_code == 200
            grew = [completions_served(s) - b for s, b in zip(replicas, before)]
            assert sorted(grew) == [0, 0, 4], f"prefix {i} was spread over replicas: {grew}"
            placement[i] = grew.index(4)
        print("prefix -> replica:", placement)
    finally:
        router.stop()
