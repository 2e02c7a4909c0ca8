"""The soak test's 60-second version (scripts/soak/soak.py; the 30-minute run is in
docs/SOAK.md): mixed streaming and plain load, disconnects, bad requests, plug-in churn with
eviction and overload bursts on the real binary and model, ending with no crash, no 5xx, no
hung request, metrics that match what the clients saw, RSS back near idle and a clean exit."""
import json
import subprocess
import sys

from conftest import BIN, ROOT


def test_a_minute_of_mixed_hostile_load_leaves_the_server_healthy(tmp_path):
    out = tmp_path / "soak"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "soak" / "soak.py"), "--duration", "60", "--bin", str(BIN), "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    report = json.loads((out / "soak.json").read_text())
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert all(not problems for problems in report["failures"].values()), report["failures"]
    # The run exercised what it claims to: each class of client got answers.
    classes = {key.split()[0] for key in report["outcomes"]}
    assert {"generate", "churn-generate", "disconnect", "burst", "plugin-load", "bad-json", "bad-body-size"} <= classes, classes
    assert (out / "soak.svg").stat().st_size > 1000
