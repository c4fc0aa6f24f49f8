"""The load test and the serve_policy CLI, briefly."""

import json
import subprocess
import sys
from pathlib import Path

from atoll.experiments.bench import serve as bench

ROOT = Path(__file__).resolve().parents[2]


def test_load_test_serves_every_client_without_errors():
    lines = []
    rows = bench.run(bench.tiny_policy_server(), [1, 16], seconds=1.0, max_batch=4, direct_calls=5,
                     emit=lines.append)
    direct, one, many, summary = rows
    assert [json.loads(x) for x in lines] == rows
    assert direct["mode"] == "direct" and direct["p50_ms"] > 0
    assert one["clients"] == 1 and many["clients"] == 16
    assert many["errors"] == 0 and one["errors"] == 0 and many["requests"] >= 16
    assert many["p50_ms"] <= many["p99_ms"] and many["mean_batch"] >= 1
    assert summary["summary"]["clients"] == 16 and summary["summary"]["errors"] == 0


def test_serve_policy_cli_explains_a_bad_checkpoint(tmp_path):
    out = subprocess.run([sys.executable, "-m", "atoll.experiments.serve_policy", f"--checkpoint={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not a train_policy workdir" in out.stderr, out.stderr
