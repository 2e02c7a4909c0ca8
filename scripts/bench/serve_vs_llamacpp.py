#!/usr/bin/env python3
"""Serving load generator and report for scripts/bench/serve_vs_llamacpp.sh (issue 3, point 9).

  serve_vs_llamacpp.py quiet   [--max-wait S] [--below CORES] [--exclude-pid PID]
      waits (at most S seconds) until processes other than PID keep less than CORES cores busy;
      prints the machine state as JSON.
  serve_vs_llamacpp.py load    --url URL --server NAME --rep N --out FILE [--pid PID] ...
      runs one phase per concurrency against one server and writes the raw results as JSON.
  serve_vs_llamacpp.py report  DIR
      reads DIR/raw/*.json, writes DIR/summary.json, DIR/results.md and DIR/latency.html
      (self-contained, inline SVG) and prints the markdown table.

The load: for each concurrency c, c client tasks each send streaming /v1/chat/completions requests
back to back (temperature 0.7, a seed per request, max_tokens 128, prompts from a fixed list of 20
instructions that ask for long answers, in a seeded shuffle per client) for WARMUP + DURATION
seconds. Only the last DURATION seconds (the window) are measured, so every client is busy for
all of it:
  - output tokens/s = output tokens that arrive inside the window / DURATION: a content chunk is
    one token on both servers, except that a token adding no text (part of a character split over
    several tokens) sends no chunk, so a completed request's completion_tokens from the usage chunk
    is spread evenly over its chunks (requests with usage != chunks are counted in the report);
  - TTFT = request sent -> first non-empty content chunk, for requests sent inside the window;
  - ITL = gaps between consecutive content chunks of one request, both inside the window;
  - e2e latency for requests sent inside the window that completed inside it.
When the window closes, clients send no new requests; a request in flight is closed (client
disconnect) as soon as it has its first token, so TTFTs of requests sent late in the window are
still measured. Only Python 3.11's standard library and httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import html
import json
import math
import os
import random
import resource
import statistics
import sys
import time

PROMPTS = [
    "Write a detailed, step-by-step guide for a beginner who wants to start growing vegetables on a small apartment balcony, covering containers, soil, sunlight, watering and the first crops to try.",
    "Explain in depth how the human immune system fights a common cold virus, from the first infected cell to recovery, and describe what each kind of cell involved actually does.",
    "Tell a long story about a lighthouse keeper on a remote island who finds a message in a bottle, and describe the weeks that follow as she tries to find out who sent it.",
    "Describe the history of the printing press, from woodblock printing in East Asia to Gutenberg and beyond, and explain how it changed science, religion and politics in Europe.",
    "Give a thorough comparison of renewable energy sources such as solar, wind, hydro and geothermal power, with the advantages, drawbacks and typical costs of each one.",
    "Write a detailed lesson plan for teaching ten-year-old children how the water cycle works, including activities, simple experiments, questions to ask and a short quiz at the end.",
    "Explain how a modern computer boots up, from pressing the power button to seeing the desktop, describing the firmware, the bootloader, the kernel and the first programs that start.",
    "Describe a full day in the life of a Roman soldier stationed on Hadrian's Wall in the second century, including his food, duties, equipment, pay and what he did for fun.",
    "Write a long and friendly letter to a pen pal in another country describing your town, your school or job, your favourite foods, your hobbies and the festivals you celebrate.",
    "Explain the main causes of the First World War in detail, including the alliances, militarism, nationalism, imperial rivalry and the events that followed the assassination in Sarajevo.",
    "Give detailed advice to someone preparing for their first marathon: a sixteen-week training plan, nutrition, hydration, choosing shoes, avoiding injuries and what to do on race day.",
    "Describe how bread is made in a traditional bakery, from mixing flour, water, salt and yeast to kneading, proving, shaping, baking and cooling, and explain the chemistry of each step.",
    "Write a detailed travel itinerary for a two-week trip through Japan, with cities to visit, things to see each day, local dishes to try, transport between places and useful tips.",
    "Explain how vaccines are developed, tested and approved, describing each phase of clinical trials, how safety is monitored and why the whole process usually takes many years.",
    "Tell a long adventure story about two friends who build a raft and sail down a great river, describing the people they meet, the dangers they face and what they learn on the way.",
    "Describe the life cycle of a star like our Sun in detail, from a cloud of gas and dust to a main-sequence star, a red giant and finally a white dwarf, and explain the physics involved.",
    "Write a complete beginner's guide to personal finance that explains budgeting, saving an emergency fund, paying off debt, how interest works and the basics of investing for retirement.",
    "Explain how the internet delivers a web page to your browser, covering DNS, IP addresses, routing, TCP, TLS, HTTP requests and responses, and how the browser finally renders the page.",
    "Describe the ecosystem of a tropical rainforest in detail, including its layers, the plants and animals of each layer, the food web and the threats the rainforest faces today.",
    "Write a detailed biography of an imaginary inventor who grew up in a small village, explaining her childhood, her education, her greatest inventions and how they changed the world.",
]
MAX_TOKENS = 128
TEMPERATURE = 0.7
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1


# ---------------------------------------------------------------- machine state


def loadavg() -> dict:
    with open("/proc/loadavg") as f:
        p = f.read().split()
    run, total = p[3].split("/")
    return {"load1": float(p[0]), "load5": float(p[1]), "load15": float(p[2]), "procs_running": int(run), "procs": int(total)}


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    total = sum(v[:8])
    return total - idle, total


def proc_jiffies(pid: int | None) -> int:
    if not pid:
        return 0
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
        fields = s[s.rindex(")") + 2 :].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return 0


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_status(pid: int | None) -> dict:
    out = {}
    if not pid:
        return out
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS", "Threads"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


class CpuMeter:
    """Cores kept busy, over an interval, by the server, this client and everything else."""

    def __init__(self, pid: int | None):
        self.pid = pid
        self.t = time.perf_counter()
        self.busy, self.total = cpu_jiffies()
        self.srv = proc_jiffies(pid)
        self.me = self_cpu_s()

    def read(self) -> dict:
        busy, total = cpu_jiffies()
        dt = time.perf_counter() - self.t
        d_total = max(total - self.total, 1)
        machine = (busy - self.busy) / d_total * NCPU
        server = (proc_jiffies(self.pid) - self.srv) / CLK_TCK / dt if self.pid else 0.0
        client = (self_cpu_s() - self.me) / dt
        return {
            "seconds": round(dt, 3),
            "machine_cores": round(machine, 3),
            "server_cores": round(server, 3),
            "client_cores": round(client, 3),
            "other_cores": round(max(machine - server - client, 0.0), 3),
        }


def quiet(max_wait: float, below: float, pid: int | None) -> dict:
    """Waits until others keep fewer than `below` cores busy over 2 s, at most max_wait s."""
    start = time.perf_counter()
    while True:
        m = CpuMeter(pid)
        time.sleep(2.0)
        r = m.read()
        waited = time.perf_counter() - start
        if r["other_cores"] < below or waited >= max_wait:
            r["waited_s"] = round(waited, 1)
            r["quiet"] = r["other_cores"] < below
            r.update(loadavg())
            return r


# ---------------------------------------------------------------- load


async def one_request(client, url, body, t_end, hard_end):
    """One streaming request; returns its record (times relative to perf_counter)."""
    rec = {"sent": time.perf_counter(), "chunks": [], "usage": None, "finish": None, "status": None,
           "error": None, "done": False, "closed_early": False}
    try:
        async with client.stream("POST", url, json=body) as resp:
            rec["status"] = resp.status_code
            if resp.status_code != 200:
                rec["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return rec
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    rec["done"] = True
                    break
                try:
                    ev = json.loads(data)
                except json.JSONDecodeError:
                    rec["error"] = f"bad SSE data: {data[:200]}"
                    break
                if "error" in ev:
                    rec["error"] = f"stream error: {json.dumps(ev['error'])[:300]}"
                    break
                if ev.get("usage"):
                    rec["usage"] = ev["usage"].get("completion_tokens")
                for ch in ev.get("choices") or []:
                    if (ch.get("delta") or {}).get("content"):
                        rec["chunks"].append(now)
                    if ch.get("finish_reason"):
                        rec["finish"] = ch["finish_reason"]
                # The window is over: leave as soon as the TTFT is known (client disconnect).
                if now >= t_end and rec["chunks"] or now >= hard_end:
                    rec["closed_early"] = True
                    break
    except Exception as e:  # noqa: BLE001 - any transport failure is a failed request
        rec["error"] = f"{type(e).__name__}: {e}"
    return rec


async def client_task(i, c, args, model, url, t_end, hard_end, records):
    import httpx

    rng = random.Random(f"{args.seed}:{c}:{i}")
    order = list(range(len(PROMPTS)))
    rng.shuffle(order)
    k = 0
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0)) as client:
        while time.perf_counter() < t_end:
            seed = args.seed * 1_000_000 + c * 10_000 + i * 100 + k
            body = {
                "model": model,
                "messages": [{"role": "user", "content": PROMPTS[order[k % len(order)]]}],
                # With jitter, lengths differ, so clients drift apart instead of moving in lockstep.
                "max_tokens": MAX_TOKENS + (random.Random(seed).randint(-args.max_tokens_jitter, args.max_tokens_jitter)
                                            if args.max_tokens_jitter else 0),
                "temperature": TEMPERATURE,
                "seed": seed,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            if args.server == "llama.cpp":
                body["cache_prompt"] = False
            rec = await one_request(client, url, body, t_end, hard_end)
            rec["client"], rec["k"], rec["prompt"], rec["seed"] = i, k, order[k % len(order)], seed
            records.append(rec)
            k += 1
            if rec["error"]:
                await asyncio.sleep(0.2)  # do not spin on a failing server


async def wait_idle(base, server, limit=30.0):
    """Waits until the server reports nothing running (graft: /metrics; llama.cpp: /slots)."""
    import httpx

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=5.0) as client:
        while time.perf_counter() - start < limit:
            try:
                if server == "graft":
                    text = (await client.get(f"{base}/metrics")).text
                    vals = [float(l.split()[-1]) for l in text.splitlines()
                            if l.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting"))]
                    if vals and all(v == 0 for v in vals):
                        return round(time.perf_counter() - start, 2)
                else:
                    slots = (await client.get(f"{base}/slots")).json()
                    if isinstance(slots, list) and not any(s.get("is_processing") for s in slots):
                        return round(time.perf_counter() - start, 2)
            except Exception:  # noqa: BLE001
                await asyncio.sleep(2.0)
                return None
            await asyncio.sleep(0.25)
    return None


async def run_phase(c, args, model):
    url = f"{args.url}/v1/chat/completions"
    records: list[dict] = []
    state_before = {**loadavg(), **proc_status(args.pid)}
    t0 = time.perf_counter()
    w0 = t0 + args.warmup
    w1 = w0 + args.duration
    hard_end = w1 + args.grace
    meter: CpuMeter | None = None

    async def start_meter():
        nonlocal meter
        await asyncio.sleep(max(w0 - time.perf_counter(), 0))
        meter = CpuMeter(args.pid)
        await asyncio.sleep(max(w1 - time.perf_counter(), 0))
        return meter.read()

    tasks = [asyncio.create_task(client_task(i, c, args, model, url, w1, hard_end, records)) for i in range(c)]
    cpu = await start_meter()
    await asyncio.gather(*tasks)
    t_last = time.perf_counter()
    idle_after = await wait_idle(args.url, args.server)
    state_after = {**loadavg(), **proc_status(args.pid)}

    def rel(x):
        return round(x - w0, 5)

    reqs = []
    for r in records:
        reqs.append({
            "client": r["client"], "k": r["k"], "prompt": r["prompt"], "seed": r["seed"],
            "sent": rel(r["sent"]), "chunks": [rel(x) for x in r["chunks"]], "usage_tokens": r["usage"],
            "finish": r["finish"], "status": r["status"], "error": r["error"], "done": r["done"],
            "closed_early": r["closed_early"],
        })
    return {
        "concurrency": c, "warmup_s": args.warmup, "duration_s": args.duration,
        "window": [0.0, args.duration], "phase_start": rel(t0), "phase_end": rel(t_last),
        "cpu_in_window": cpu, "state_before": state_before, "state_after": state_after,
        "idle_after_s": idle_after, "requests": reqs,
    }


async def load_main(args):
    import httpx

    async with httpx.AsyncClient(timeout=10.0) as client:
        models = (await client.get(f"{args.url}/v1/models")).json()
    model = models["data"][0]["id"]
    out = {
        "server": args.server, "rep": args.rep, "url": args.url, "model": model, "pid": args.pid,
        "seed": args.seed, "max_tokens": MAX_TOKENS, "max_tokens_jitter": args.max_tokens_jitter,
        "temperature": TEMPERATURE, "ncpu": NCPU,
        "meta": json.loads(args.meta) if args.meta else {}, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "phases": [],
    }
    for c in args.concurrency:
        q = quiet(args.quiet_wait, args.quiet_below, args.pid) if args.quiet_wait > 0 else None
        ph = await run_phase(c, args, model)
        ph["quiet_before"] = q
        s = phase_stats(ph)
        print(f"  {args.server:9s} rep {args.rep} c={c:2d}: {s['tok_s']:7.1f} tok/s  "
              f"TTFT p50 {fmt(s['ttft_p50_ms'])} p99 {fmt(s['ttft_p99_ms'])} ms  "
              f"ITL p50 {fmt(s['itl_p50_ms'])} p99 {fmt(s['itl_p99_ms'])} ms  "
              f"reqs {s['requests_in_window']}  errors {s['errors']}  "
              f"others {ph['cpu_in_window']['other_cores']:.2f} cores  "
              f"load {ph['state_before']['load1']:.2f}->{ph['state_after']['load1']:.2f}"
              + (f"  VmHWM {ph['state_after'].get('VmHWM', 0) / 1024:.0f} MiB" if args.pid else ""),
              flush=True)
        out["phases"].append(ph)
    out["final_status"] = proc_status(args.pid)
    with open(args.out, "w") as f:
        json.dump(out, f)


# ---------------------------------------------------------------- statistics


def pct(xs, p):
    """Percentile with linear interpolation (numpy's default)."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def fmt(x, nd=0):
    return "-" if x is None else f"{x:.{nd}f}"


def phase_stats(ph):
    d = ph["duration_s"]
    toks = 0
    ttft, itl, e2e = [], [], []
    per_client = {}
    errors, mismatches, completed, closed = [], 0, 0, 0
    in_window = 0
    out_tokens_done = []
    finishes = {}
    for r in ph["requests"]:
        ch = r["chunks"]
        # A chunk is one token, except where a token adds no text (a character split over several
        # tokens): a completed request's usage count is spread evenly over its chunks.
        w = r["usage_tokens"] / len(ch) if r["done"] and r["usage_tokens"] and ch else 1.0
        n_in = sum(1 for t in ch if 0 <= t <= d) * w
        toks += n_in
        per_client[r["client"]] = per_client.get(r["client"], 0) + n_in
        for a, b in zip(ch, ch[1:]):
            if a >= 0 and b <= d:
                itl.append((b - a) * 1000)
        if r["error"]:
            errors.append(r["error"])
        if 0 <= r["sent"] < d:
            in_window += 1
            if ch:
                ttft.append((ch[0] - r["sent"]) * 1000)
            if r["done"] and ch and ch[-1] <= d:
                e2e.append((ch[-1] - r["sent"]) * 1000)
        if r["done"]:
            completed += 1
            out_tokens_done.append(r["usage_tokens"] if r["usage_tokens"] is not None else len(ch))
            finishes[r["finish"]] = finishes.get(r["finish"], 0) + 1
            if r["usage_tokens"] is not None and r["usage_tokens"] != len(ch):
                mismatches += 1
        elif not r["error"]:
            closed += 1
    counts = [per_client.get(i, 0) for i in range(ph["concurrency"])]
    jain = (sum(counts) ** 2 / (len(counts) * sum(x * x for x in counts))) if any(counts) else None
    return {
        "concurrency": ph["concurrency"],
        "tok_s": toks / d,
        "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
        "itl_p50_ms": pct(itl, 50), "itl_p99_ms": pct(itl, 99), "itl_max_ms": max(itl) if itl else None,
        "e2e_p50_ms": pct(e2e, 50), "e2e_p99_ms": pct(e2e, 99),
        "requests_in_window": in_window, "ttft_samples": len(ttft), "itl_samples": len(itl),
        "completed": completed, "closed_at_window_end": closed, "errors": len(errors),
        "error_examples": errors[:3], "usage_chunk_mismatches": mismatches,
        "mean_output_tokens_completed": statistics.mean(out_tokens_done) if out_tokens_done else None,
        "finish_reasons": finishes,
        "client_tokens_min": min(counts) if counts else 0, "client_tokens_max": max(counts) if counts else 0,
        "jain_fairness": jain,
        "cpu": ph["cpu_in_window"], "load_before": ph["state_before"]["load1"],
        "load_after": ph["state_after"]["load1"],
        "quiet_before": ph.get("quiet_before"),
        "vmhwm_kib": ph["state_after"].get("VmHWM"), "idle_after_s": ph.get("idle_after_s"),
    }


METRICS = [("tok_s", "tok/s", True), ("ttft_p50_ms", "TTFT p50 ms", False), ("ttft_p99_ms", "TTFT p99 ms", False),
           ("itl_p50_ms", "ITL p50 ms", False), ("itl_p99_ms", "ITL p99 ms", False)]
SERVERS = ["graft", "llama.cpp"]


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return None if a is None or not b else a / b


def report(dirpath):
    raws = []
    for p in sorted(glob.glob(os.path.join(dirpath, "raw", "*.json"))):
        with open(p) as f:
            raws.append(json.load(f))
    if not raws:
        sys.exit(f"no raw results under {dirpath}/raw")
    per = {}  # (server, c) -> list of stats, one per rep
    itl_pool = {}  # (server, c) -> pooled ITL gaps (ms)
    rss = {s: [] for s in SERVERS}
    for raw in raws:
        for ph in raw["phases"]:
            st = phase_stats(ph)
            st["rep"] = raw["rep"]
            key = (raw["server"], ph["concurrency"])
            per.setdefault(key, []).append(st)
            gaps = itl_pool.setdefault(key, [])
            d = ph["duration_s"]
            for r in ph["requests"]:
                ch = r["chunks"]
                gaps.extend((b - a) * 1000 for a, b in zip(ch, ch[1:]) if a >= 0 and b <= d)
        hwm = raw.get("final_status", {}).get("VmHWM")
        if hwm and raw["server"] in rss:
            rss[raw["server"]].append(hwm)
    concs = sorted({c for (_, c) in per})
    summary = {"runs": [{"server": r["server"], "rep": r["rep"], "started": r["started"], "meta": r.get("meta", {})}
                        for r in raws], "rows": []}
    for c in concs:
        row = {"concurrency": c}
        for s in SERVERS:
            sts = per.get((s, c), [])
            row[s] = {m: med([st[m] for st in sts]) for m, _, _ in METRICS}
            row[s]["reps"] = len(sts)
            row[s]["tok_s_min"] = min((st["tok_s"] for st in sts), default=None)
            row[s]["tok_s_max"] = max((st["tok_s"] for st in sts), default=None)
            row[s]["per_rep"] = sts
        row["ratio"] = {m: ratio(row["graft"][m], row["llama.cpp"][m]) for m, _, _ in METRICS}
        summary["rows"].append(row)
    summary["peak_rss_kib"] = {s: (max(v) if v else None) for s, v in rss.items()}
    summary["peak_rss_kib_median"] = {s: med(v) for s, v in rss.items()}
    with open(os.path.join(dirpath, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    lines = []
    reps = {s: sorted({r["rep"] for r in raws if r["server"] == s}) for s in SERVERS}
    lines.append(f"Medians over repetitions (graft: {len(reps['graft'])}, llama.cpp: {len(reps['llama.cpp'])}); "
                 "ratio = graft / llama.cpp (higher is better for tok/s, lower for latencies).")
    lines.append("")
    head = "| c |" + "|".join(f" {n} graft | {n} llama.cpp | ratio " for _, n, _ in METRICS) + "|"
    lines.append(head)
    lines.append("|---:|" + "---:|---:|---:|" * len(METRICS))
    for row in summary["rows"]:
        cells = [str(row["concurrency"])]
        for m, _, _ in METRICS:
            nd = 1 if m == "tok_s" else 0
            cells += [fmt(row["graft"][m], nd), fmt(row["llama.cpp"][m], nd), fmt(row["ratio"][m], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    g, l = summary["peak_rss_kib"]["graft"], summary["peak_rss_kib"]["llama.cpp"]
    lines.append(f"Peak RSS (VmHWM after the c=16 phase, max over reps): graft {fmt(g and g / 1024)} MiB, "
                 f"llama.cpp {fmt(l and l / 1024)} MiB.")
    lines.append("")
    lines.append("Per repetition (tok/s; other = cores kept busy by other processes during the window; "
                 "load = 1-min loadavg before -> after the phase; reqs = requests sent in the window; "
                 "err = failed requests; tok/req = mean output tokens of completed requests; "
                 "usage≠chunks = completed requests whose usage count differs from their content chunks; "
                 "jain = fairness of tokens across clients, 1 = equal):")
    lines.append("")
    lines.append("| server | c | rep | tok/s | TTFT p99 | ITL p99 | reqs | err | tok/req | usage≠chunks | server cores | client cores | other cores | load | jain |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for row in summary["rows"]:
        for s in SERVERS:
            for st in row[s]["per_rep"]:
                cpu = st["cpu"]
                lines.append(f"| {s} | {st['concurrency']} | {st['rep']} | {st['tok_s']:.1f} | {fmt(st['ttft_p99_ms'])} | "
                             f"{fmt(st['itl_p99_ms'])} | {st['requests_in_window']} | {st['errors']} | "
                             f"{fmt(st['mean_output_tokens_completed'], 1)} | {st['usage_chunk_mismatches']} | "
                             f"{cpu['server_cores']:.2f} | {cpu['client_cores']:.2f} | {cpu['other_cores']:.2f} | "
                             f"{st['load_before']:.2f} -> {st['load_after']:.2f} | {fmt(st['jain_fairness'], 3)} |")
    text = "\n".join(lines)
    with open(os.path.join(dirpath, "results.md"), "w") as f:
        f.write(text + "\n")
    write_html(dirpath, summary, itl_pool, text)
    print(text)


# ---------------------------------------------------------------- plot (inline SVG)

COLORS = {"graft": "#1f77b4", "llama.cpp": "#d62728"}


def svg_chart(title, xlabel, ylabel, series, logx=False, logy=False, w=460, h=300):
    """series: list of (label, color, dash, [(x, y)], [(x, lo, hi)] or None)."""
    ml, mr, mt, mb = 60, 15, 30, 45
    pts = [(x, y) for _, _, _, xy, _ in series for x, y in xy if y is not None]
    for _, _, _, _, err in series:
        for x, lo, hi in err or []:
            pts += [(x, lo), (x, hi)]
    if not pts:
        return ""
    fx = (lambda v: math.log10(v)) if logx else (lambda v: v)
    fy = (lambda v: math.log10(max(v, 1e-3))) if logy else (lambda v: v)
    xs = [fx(p[0]) for p in pts]
    ys = [fy(p[1]) for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = (min(ys), max(ys)) if logy else (0.0, max(ys) * 1.08)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1

    def X(v):
        return ml + (fx(v) - x0) / (x1 - x0) * (w - ml - mr)

    def Y(v):
        return h - mb - (fy(v) - y0) / (y1 - y0) * (h - mt - mb)

    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
         f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
         f'<line x1="{ml}" y1="{h - mb}" x2="{w - mr}" y2="{h - mb}" stroke="#333"/>',
         f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{h - mb}" stroke="#333"/>',
         f'<text x="{(ml + w - mr) / 2}" y="{h - 8}" text-anchor="middle">{html.escape(xlabel)}</text>',
         f'<text transform="translate(14,{(mt + h - mb) / 2}) rotate(-90)" text-anchor="middle">{html.escape(ylabel)}</text>']
    for i in range(6):
        yv = y0 + (y1 - y0) * i / 5
        val = 10 ** yv if logy else yv
        yy = h - mb - i / 5 * (h - mt - mb)
        o.append(f'<line x1="{ml}" y1="{yy:.1f}" x2="{w - mr}" y2="{yy:.1f}" stroke="#eee"/>')
        o.append(f'<text x="{ml - 4}" y="{yy + 4:.1f}" text-anchor="end">{val:.3g}</text>')
    xt = sorted({p[0] for _, _, _, xy, _ in series for p in xy}) if not logx else \
        [10 ** e for e in range(math.floor(x0), math.ceil(x1) + 1)]
    if len(xt) > 10:
        xt = [10 ** (x0 + (x1 - x0) * i / 5) for i in range(6)]
    for xv in xt:
        if x0 - 1e-9 <= fx(xv) <= x1 + 1e-9:
            o.append(f'<text x="{X(xv):.1f}" y="{h - mb + 14}" text-anchor="middle">{xv:.3g}</text>')
    for k, (label, color, dash, xy, err) in enumerate(series):
        xy = [(x, y) for x, y in xy if y is not None]
        if xy:
            d = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in xy)
            o.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}" points="{d}"/>')
            if len(xy) <= 12:
                for x, y in xy:
                    o.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3" fill="{color}"/>')
        for x, lo, hi in err or []:
            o.append(f'<line x1="{X(x):.1f}" y1="{Y(lo):.1f}" x2="{X(x):.1f}" y2="{Y(hi):.1f}" stroke="{color}"/>')
        ly = mt + 6 + 14 * k
        o.append(f'<line x1="{ml + 10}" y1="{ly}" x2="{ml + 30}" y2="{ly}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>')
        o.append(f'<text x="{ml + 34}" y="{ly + 4}">{html.escape(label)}</text>')
    o.append("</svg>")
    return "\n".join(o)


def write_html(dirpath, summary, itl_pool, table_md):
    rows = summary["rows"]
    cs = [r["concurrency"] for r in rows]
    charts = []

    def series_for(metric, dash="", suffix=""):
        out = []
        for s in SERVERS:
            xy = [(r["concurrency"], r[s][metric]) for r in rows]
            err = [(r["concurrency"], min(st[metric] for st in r[s]["per_rep"] if st[metric] is not None),
                    max(st[metric] for st in r[s]["per_rep"] if st[metric] is not None))
                   for r in rows if any(st[metric] is not None for st in r[s]["per_rep"])]
            out.append((s + suffix, COLORS[s], dash, xy, err))
        return out

    charts.append(svg_chart("Aggregate output tokens/s (median; bars: min-max over reps)", "concurrency", "tokens/s",
                            series_for("tok_s")))
    charts.append(svg_chart("Time to first token", "concurrency", "ms (log)",
                            series_for("ttft_p50_ms", "", " p50") + series_for("ttft_p99_ms", "5,3", " p99"), logy=True))
    charts.append(svg_chart("Inter-token latency", "concurrency", "ms (log)",
                            series_for("itl_p50_ms", "", " p50") + series_for("itl_p99_ms", "5,3", " p99"), logy=True))
    for c in cs:
        ser = []
        for s in SERVERS:
            gaps = sorted(itl_pool.get((s, c), []))
            if not gaps:
                continue
            n = len(gaps)
            step = max(1, n // 400)
            xy = [(max(gaps[i], 0.1), (i + 1) / n) for i in range(0, n, step)] + [(max(gaps[-1], 0.1), 1.0)]
            ser.append((f"{s} (n={n})", COLORS[s], "", xy, None))
        charts.append(svg_chart(f"ITL distribution, c={c} (all reps pooled)", "gap ms (log)", "fraction <= x", ser, logx=True))
    doc = ["<!doctype html><html><head><meta charset='utf-8'><title>graft vs llama.cpp serving</title>",
           "<style>body{font-family:sans-serif;margin:20px} svg{margin:6px;border:1px solid #ddd} "
           "pre{background:#f6f6f6;padding:8px;font-size:12px;overflow-x:auto}</style></head><body>",
           "<h2>graft vs llama.cpp: streaming chat completions, default model</h2>",
           "<div>" + "".join(charts) + "</div>",
           f"<pre>{html.escape(table_md)}</pre></body></html>"]
    with open(os.path.join(dirpath, "latency.html"), "w") as f:
        f.write("\n".join(doc))


# ---------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quiet")
    q.add_argument("--max-wait", type=float, default=60)
    q.add_argument("--below", type=float, default=0.3)
    q.add_argument("--exclude-pid", type=int)
    lo = sub.add_parser("load")
    lo.add_argument("--url", required=True)
    lo.add_argument("--server", required=True, choices=SERVERS)
    lo.add_argument("--rep", type=int, default=1)
    lo.add_argument("--out", required=True)
    lo.add_argument("--pid", type=int, help="server process: CPU use and VmHWM are read from /proc")
    lo.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    lo.add_argument("--duration", type=float, default=30)
    lo.add_argument("--warmup", type=float, default=5)
    lo.add_argument("--grace", type=float, default=60, help="longest wait for first tokens after the window")
    lo.add_argument("--seed", type=int, default=1)
    lo.add_argument("--max-tokens-jitter", type=int, default=0,
                    help="max_tokens drawn per request from 128 +- this (seeded, the same for both servers)")
    lo.add_argument("--quiet-wait", type=float, default=0, help="before each phase, wait at most this long for a quiet machine")
    lo.add_argument("--quiet-below", type=float, default=0.3)
    lo.add_argument("--meta", help="JSON object stored with the results")
    rp = sub.add_parser("report")
    rp.add_argument("dir")
    args = ap.parse_args()
    if args.cmd == "quiet":
        print(json.dumps(quiet(args.max_wait, args.below, args.exclude_pid)))
    elif args.cmd == "load":
        asyncio.run(load_main(args))
    else:
        report(args.dir)


if __name__ == "__main__":
    main()
