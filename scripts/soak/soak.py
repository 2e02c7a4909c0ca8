#!/usr/bin/env python3
"""Soak test: the real `server` binary on the real default model under mixed, hostile load.

For --duration seconds, worker threads send streaming and non-streaming chat and completion
requests (some through LoRA adapters), clients that disconnect mid-stream, bad requests of
every class the server must refuse, plug-in churn (load, replace, delete, and eviction under
a small plug-in memory budget) and overload bursts well past the waiting queue. Then it checks:

- no crash: the process is alive at the end, answers a generation, and exits 0 on SIGTERM;
- no 5xx anywhere, and every status is one that request's class may get;
- no hung request: every request got its whole answer within its client timeout;
- every accepted request answered: each 200 stream ended with `[DONE]`, each body parsed;
- metrics consistent: the server's `graft_requests_total` per route equals what the clients
  sent, status by status (a disconnected client is 499, or 200 if it finished first), the
  running and waiting gauges are back to 0, and cancellations never exceed disconnects;
- RSS bounded: after the load, resident memory less what the server keeps on purpose
  (resident plug-ins, and the prefix cache's kept KV caches, which stay inside the KV budget)
  returns within 1.5x of the idle figure within 10 s.

Writes a JSON report and an SVG of RSS and request rate over time (--out), prints one line per
check, and exits non-zero if any check fails. docs/SOAK.md has the 30-minute run.
"""
import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import BadRequests, Ledger, Workers  # noqa: E402
from report import write_svg  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL_ID = "smollm2-135m-instruct"
ADAPTER = ROOT / "plugins" / "tests" / "fixtures" / "lora_smollm2"
# Small limits so the overload bursts and the plug-in budget are reached quickly.
MAX_RUNNING, MAX_WAITING, PLUGIN_MIB, MAX_BODY = 4, 8, 6, 65536
RSS_SLACK = 1.5
SETTLE_SECONDS = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def metrics(url: str) -> dict:
    text = requests.get(url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def settled_metrics(url: str) -> dict:
    """/metrics once the last requests are through: a client that left is noticed by the
    server at its next write or step, so give the gauges a few seconds to reach 0."""
    deadline = time.time() + SETTLE_SECONDS
    while True:
        m = metrics(url)
        busy = metric(m, "vllm:num_requests_running") + metric(m, "vllm:num_requests_waiting")
        if busy == 0 or time.time() > deadline:
            return m
        time.sleep(0.5)


def metric(m: dict, name: str) -> float:
    return sum(v for (n, _), v in m.items() if n == name)


class Server:
    def __init__(self, binary: Path, plugin_dir: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        args = [
            str(binary), "serve", "--port", str(self.port),
            "--plugin-dir", str(plugin_dir), "--plugin", "lora:reference=reference",
            "--plugin-memory-mib", str(PLUGIN_MIB), "--max-running", str(MAX_RUNNING),
            "--max-waiting", str(MAX_WAITING), "--max-body-bytes", str(MAX_BODY),
        ]
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {log}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.25)
        raise TimeoutError("server did not become ready")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=90)
        finally:
            self.log.close()


class RssSampler(threading.Thread):
    def __init__(self, pid: int, ledger: Ledger):
        super().__init__(daemon=True)
        self.pid, self.ledger = pid, ledger
        self.samples: list[tuple[float, int, int]] = []  # (t, rss bytes, requests so far)
        self.stopping = threading.Event()
        self.t0 = time.time()

    def run(self):
        while not self.stopping.is_set():
            try:
                self.samples.append((time.time() - self.t0, rss_bytes(self.pid), self.ledger.sent()))
            except OSError:
                return
            self.stopping.wait(0.5)


def check_statuses(ledger: Ledger) -> list[str]:
    bad = []
    for (cls, route, status), n in sorted(ledger.outcomes.items(), key=str):
        if status == "hung":
            bad.append(f"{n} {cls} request(s) to {route} hung (no complete answer in time)")
        elif isinstance(status, int) and status >= 500 and status not in ledger.allowed(cls):
            bad.append(f"{n} {cls} request(s) to {route} got {status}")
        elif status not in ledger.allowed(cls):
            bad.append(f"{n} {cls} request(s) to {route} got unexpected {status}")
    bad += ledger.incomplete
    return bad


def check_metrics(ledger: Ledger, m: dict) -> list[str]:
    """The server's request counts by status equal the clients' own (a client that left is
    499, or 200 if its answer had started or finished), and the gauges are back to 0."""
    server: Counter = Counter()
    for (name, labels), v in m.items():
        d = dict(labels)
        if name == "graft_requests_total" and d.get("route") not in ("/metrics", "/health"):
            server[d["status"]] += int(v)
    client: Counter = Counter()
    for (_, _, status), n in ledger.outcomes.items():
        client["200|499" if status == "disconnect" else str(status).split(":")[0]] += n
    server["200|499"] = server.pop("200", 0) + server.pop("499", 0)
    client["200|499"] += client.pop("200", 0)
    problems = []
    if +server != +client:
        problems.append(f"server counted {dict(sorted(server.items()))}, clients saw {dict(sorted(client.items()))}")
    cancelled = metric(m, "graft_requests_cancelled_total")
    disconnects = sum(n for (_, _, st), n in ledger.outcomes.items() if st == "disconnect")
    if cancelled > disconnects:
        problems.append(f"{cancelled:.0f} cancellations counted for {disconnects} disconnects")
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
        if metric(m, gauge) != 0:
            problems.append(f"{gauge} is {metric(m, gauge)} after the load")
    return problems


def check_overload(ledger: Ledger) -> list[str]:
    """The bursts did reach the queue's limit (else the soak tested nothing there)."""
    busy = sum(n for (cls, _, st), n in ledger.outcomes.items() if cls == "burst" and st == 429)
    return [] if busy else ["no burst request got 429: the overload path was not exercised"]


def check_rss(sampler: RssSampler, idle: int, m: dict, pid: int) -> tuple[list[str], dict]:
    kept = int(metric(m, "graft_plugin_resident_bytes")) + int(metric(m, "graft_prefix_cache_bytes"))
    deadline = time.time() + SETTLE_SECONDS
    final = rss_bytes(pid)
    while final - kept > RSS_SLACK * idle and time.time() < deadline:
        time.sleep(0.5)
        final = rss_bytes(pid)
    peak = max(s[1] for s in sampler.samples) if sampler.samples else final
    figures = {"idle_rss": idle, "peak_rss": peak, "final_rss": final, "kept_bytes": kept}
    if final - kept > RSS_SLACK * idle:
        return [f"RSS {final >> 20} MiB less {kept >> 20} MiB kept is over {RSS_SLACK}x the idle {idle >> 20} MiB {SETTLE_SECONDS} s after the load"], figures
    return [], figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=1800, help="seconds of load (default 1800)")
    ap.add_argument("--bin", type=Path, default=Path(os.environ.get("GRAFT_SERVER_BIN", ROOT / "target" / "debug" / "server")))
    ap.add_argument("--out", type=Path, default=ROOT / "target" / "soak", help="report folder")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    plugin_dir = Path(tempfile.mkdtemp(prefix="graft-soak-plugins-"))
    shutil.copytree(ADAPTER, plugin_dir / "reference")
    server = Server(args.bin, plugin_dir, args.out / "server.log")
    ledger = Ledger()
    try:
        # Warm up (first allocations, lazy set-up), then take the idle RSS.
        for _ in range(3):
            r = requests.post(server.url + "/v1/completions", json={"model": MODEL_ID, "prompt": "Hi", "max_tokens": 4}, timeout=120)
            ledger.record("warm-up", "/v1/completions", r.status_code)
        time.sleep(2)
        idle = rss_bytes(server.proc.pid)
        sampler = RssSampler(server.proc.pid, ledger)
        sampler.start()
        workers = Workers(server.url, MODEL_ID, ledger, plugin_dir, ADAPTER, BadRequests(MODEL_ID, MAX_BODY), MAX_RUNNING + MAX_WAITING)
        print(f"soak: {args.duration:.0f} s of load on {server.url} (log {args.out / 'server.log'})", flush=True)
        workers.run(args.duration, progress=lambda s: print(s, flush=True))
        alive = server.proc.poll() is None
        m = settled_metrics(server.url) if alive else {}
        failures = {
            "process alive after the load": [] if alive else [f"server exited with {server.proc.returncode}"],
            "statuses (no 5xx, none unexpected, none hung)": check_statuses(ledger),
            "metrics match what clients saw": check_metrics(ledger, m) if alive else ["no metrics"],
            "overload bursts answered 429 with Retry-After": check_overload(ledger),
        }
        rss_problems, figures = check_rss(sampler, idle, m, server.proc.pid) if alive else (["server gone"], {})
        failures["RSS returns near idle"] = rss_problems
        sampler.stopping.set()
        ok = requests.post(server.url + "/v1/completions", json={"model": MODEL_ID, "prompt": "The sky is", "max_tokens": 2, "temperature": 0}, timeout=60) if alive else None
        failures["still serving"] = [] if ok is not None and ok.status_code == 200 else ["final generation failed"]
    finally:
        code = server.stop()
        shutil.rmtree(plugin_dir, ignore_errors=True)
    failures["exits 0 on SIGTERM"] = [] if code == 0 else [f"exit status {code}"]
    report = {
        "duration_s": args.duration,
        "requests": ledger.sent(),
        "outcomes": {f"{c} {r} {s}": n for (c, r, s), n in sorted(ledger.outcomes.items(), key=str)},
        "rss": figures,
        "failures": failures,
    }
    (args.out / "soak.json").write_text(json.dumps(report, indent=2))
    write_svg(args.out / "soak.svg", sampler.samples, figures)
    for name, problems in failures.items():
        print(f"{'FAIL' if problems else 'ok  '} {name}" + "".join(f"\n     {p}" for p in problems[:10]))
    print(f"soak: {ledger.sent()} requests; RSS idle {figures.get('idle_rss', 0) >> 20} MiB, peak {figures.get('peak_rss', 0) >> 20} MiB, final {figures.get('final_rss', 0) >> 20} MiB; report {args.out / 'soak.json'}")
    return 1 if any(failures.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
