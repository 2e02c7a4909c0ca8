"""The load tester (target/debug/loadtest, built by scripts/e2e.sh) against the real server on
the real default model: a small bounded closed loop with exact output lengths whose token
counts must agree with the server's own counters, and a chain mix with the session's LoRA
adapter, each writing its --out files."""
import json
import os
import subprocess
from pathlib import Path

from conftest import ADAPTER, MODEL_ID, ROOT

LOADTEST = Path(os.environ.get("GRAFT_LOADTEST_BIN", ROOT / "target" / "debug" / "loadtest"))


def loadtest(server, out: Path, *args: str) -> dict:
    r = subprocess.run(
        [str(LOADTEST), "--url", server.url, "--no-progress", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "report.html").read_text().count("<svg") >= 9
    return json.loads((out / "summary.json").read_text())


def test_a_bounded_closed_loop_completes_every_request_with_exact_usage(server, tmp_path):
    summary = loadtest(
        server, tmp_path,
        "--concurrency", "2", "--requests", "6", "--input-tokens", "32",
        "--output-tokens", "8", "--ignore-eos", "--scrape-metrics",
    )
    assert summary["model"] == MODEL_ID, "found through /v1/models"
    level = summary["levels"][0]
    assert (level["sent"], level["completed"], level["errors"], level["incomplete"]) == (6, 6, 0, 0)
    assert level["output_tokens"] == 48 and level["token_sources"] == {"usage": 6}
    assert level["input_tokens"] >= 6 * 32
    assert level["output_token_rate"] > 0 and level["request_rate"] > 0
    assert 0 < level["ttft_ms"]["p50"] <= level["e2e_ms"]["p50"]
    assert level["tpot_ms"]["count"] == 6 and level["itl_ms"]["count"] > 0
    # The server counted the same tokens the client read from usage.
    deltas = level["metrics"]["deltas"]
    generated = sum(v for k, v in deltas.items() if k.startswith("graft_generation_tokens_total"))
    assert generated == 48, deltas
    rows = (tmp_path / "requests.jsonl").read_text().splitlines()
    assert len(rows) == 6 and all(json.loads(r)["output_tokens"] == 8 for r in rows)
    server.assert_serving()


def test_a_chain_mix_with_the_adapter_reports_each_chain_against_base(server, tmp_path):
    summary = loadtest(
        server, tmp_path,
        "--model", MODEL_ID, "--concurrency", "2", "--requests", "4", "--input-tokens", "16",
        "--output-tokens", "4", "--ignore-eos",
        "--mix", "base=1,lora=1", "--chain", json_chain("lora", {"model": f"{MODEL_ID}::{ADAPTER}"}),
    )
    level = summary["levels"][0]
    assert (level["completed"], level["errors"]) == (4, 0)
    chains = {c["name"]: c for c in level["chains"]}
    assert chains["base"]["completed"] == chains["lora"]["completed"] == 2
    assert chains["base"]["overhead"] is None
    assert chains["lora"]["overhead"]["e2e"] > 0


def json_chain(name: str, fragment: dict) -> str:
    return f"{name}={json.dumps(fragment)}"
