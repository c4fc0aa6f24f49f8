import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from atoll.experiments.bench import context as bench
from atoll.parallel.context import STRATEGIES

# The run below: B, S, N (query heads), H (kv heads), K (head dim), float32.
B, S, N, H, K = 1, 64, 2, 1, 16
DEVICES = (2,)  # one mesh keeps the subprocess short; tests/parallel/test_context.py covers 2, 4 and 8
# Bytes one device sends at C=2 (T/C = 32 tokens), counted by hand:
#   kv = 2·32·H·K·4 = 4096, q = out = dO = 32·N·K·4 = 4096, lse = delta = 32·N·4 = 256, fp32 dq = 4096
HAND_C2 = {  # (forward, backward)
    "all_gather": (4096, 4096),  # gather k, v; reduce-scatter dk, dv
    "ring": (4096, 4096 + 4096 + 4096),  # k, v; k, v with fp32 dk, dv; dk, dv home
    "tokenring": (4096 + 4096 + 256, 4096 + 4096 + 256 + 256 + 4096),  # q, out, lse; q, dO, lse, delta, dq
}


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    out_path = tmp_path_factory.mktemp("bench_context") / "rows.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
               JAX_DISABLE_MOST_OPTIMIZATIONS="1")  # the contract, not the speed: compile fast
    out = subprocess.run(
        [sys.executable, "-m", "atoll.experiments.bench.context", f"--devices={','.join(map(str, DEVICES))}",
         f"--seq_lens={S}", f"--batch={B}", f"--heads={N}", f"--kv_heads={H}", f"--head_dim={K}",
         "--repeats=2", "--warmup=1", f"--out={out_path}"],
        env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    return [json.loads(line) for line in lines], out.stderr, out_path.read_text().splitlines(), lines


def test_rows_lead_with_the_contract_keys(output):
    lines, _, _, _ = output
    rows = lines[:-1]
    for r in rows:
        assert tuple(r)[:len(bench.LEADING_KEYS)] == bench.LEADING_KEYS, list(r)
        assert r["seq"] == S and r["time_s"] > 0 and r["time_min_s"] <= r["time_s"] <= r["time_max_s"]
        assert (r["B"], r["N"], r["H"], r["K"], r["dtype"], r["causal"]) == (B, N, H, K, "float32", True)
        assert r["device"] and r["jax"] and r["python"]
    assert [(r["strategy"], r["devices"]) for r in rows] == (
        [("single_device", 1)] + [(s, C) for C in DEVICES for s in STRATEGIES])


def test_every_strategy_is_right_and_sends_what_the_model_says(output):
    lines, _, _, _ = output
    rows = {(r["strategy"], r["devices"]): r for r in lines[:-1]}
    base = rows[("single_device", 1)]
    assert base["max_err"] == 0.0 and base["bytes_per_device"] == base["bytes_traced"] == 0.0
    assert base["ratio_vs_single_device"] == 1.0 and base["implementation"] == "xla"
    for C in DEVICES:
        ag = rows[("all_gather", C)]
        for s in STRATEGIES:
            r = rows[(s, C)]
            assert r["max_err"] < 1e-4, (s, C, r["max_err"])
            assert r["bytes_per_device"] == r["bytes_traced"] > 0 and r["bytes_match"] is True, (s, C)
            assert r["bytes_forward"] == r["bytes_traced_forward"], (s, C)
            assert r["bytes_forward"] + r["bytes_backward"] == r["bytes_per_device"]
            assert r["ratio_vs_all_gather"] == ag["time_s"] / r["time_s"]
            assert r["ratio_vs_single_device"] == base["time_s"] / r["time_s"]
            if C == 2:
                assert (r["bytes_forward"], r["bytes_backward"]) == HAND_C2[s], s


def test_summary_table_and_out_file(output):
    lines, stderr, written, stdout_lines = output
    summary, rows = lines[-1], lines[:-1]
    assert summary["summary"] == "context" and summary["bytes_match"] is True and summary["bytes_mismatches"] == []
    assert summary["max_err"] == max(r["max_err"] for r in rows)
    assert summary["ring_vs_all_gather_C2_S64"] == next(
        r["ratio_vs_all_gather"] for r in rows if (r["strategy"], r["devices"]) == ("ring", 2))
    assert summary["devices"] == list(DEVICES) and summary["seq_lens"] == [S] and summary["date"]
    assert "strategy" in stderr and "traced MiB" in stderr
    assert written == stdout_lines


# ------------------------------------------------------------------ helpers, in this process


def test_requested_host_devices():
    assert bench.requested_host_devices([]) == 8
    assert bench.requested_host_devices(["--devices=2,4"]) == 4
    assert bench.requested_host_devices(["--repeats=2", "--devices", "16,2"]) == 16
    assert bench.requested_host_devices(["--devices=two"]) == 1


def test_max_abs_err_undoes_the_layout():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 16, 3)).astype(np.float32)
    positions = bench.layout(16, 4, causal=True)
    assert sorted(positions) == list(range(16)) and list(positions[:2]) == [0, 1]  # device 0: chunks 0 and 7
    laid = ref[:, positions]
    assert bench.max_abs_err([laid], [ref], positions) == 0.0
    assert bench.max_abs_err([laid], [ref], np.arange(16)) > 0
    bumped = laid.copy()
    bumped[1, 5, 2] += 0.25
    assert bench.max_abs_err([laid, bumped], [ref, ref], positions) == pytest.approx(0.25)
    assert list(bench.layout(8, 4, causal=False)) == list(range(8))


def test_rows_and_summary_from_times():
    times = {"single_device": [4.0, 2.0, 3.0], "all_gather/C2": [2.0, 1.0, 1.0], "ring/C2": [1.0, 0.5, 0.5],
             "tokenring/C2": [3.0, 3.0, 3.0]}
    extras = {"single_device": {"max_err": 0.0, "bytes_traced": 0.0},
              **{f"{s}/C2": {"bytes_per_device": 10.0, "max_err": 1e-6, "bytes_traced": 10.0,
                             "bytes_forward": 4.0, "bytes_traced_forward": 4.0} for s in STRATEGIES}}
    extras["tokenring/C2"]["bytes_traced"] = 11.0
    rows = bench.make_rows(64, [2], list(STRATEGIES), times, extras)
    assert [r["strategy"] for r in rows] == ["single_device", *STRATEGIES]
    assert all(tuple(r)[:6] == bench.LEADING_KEYS for r in rows)
    by = {r["strategy"]: r for r in rows}
    assert by["ring"]["ratio_vs_all_gather"] == 2.0 and by["ring"]["ratio_vs_single_device"] == 6.0
    assert by["single_device"]["ratio_vs_all_gather"] is None and by["single_device"]["bytes_per_device"] == 0.0
    assert by["tokenring"]["time_min_s"] == by["tokenring"]["time_max_s"] == 3.0
    s = bench.summary(rows)
    assert s["bytes_match"] is False and len(s["bytes_mismatches"]) == 1 and "tokenring C=2" in s["bytes_mismatches"][0]
    assert s["ring_vs_all_gather_C2_S64"] == 2.0 and "all_gather_vs_all_gather_C2_S64" not in s
    assert s["tokenring_vs_single_device_C2_S64"] == 1.0 and s["max_err"] == 1e-6
    assert not bench.bytes_match({"bytes_per_device": 4.0, "bytes_traced": 4.0, "bytes_forward": 2.0,
                                  "bytes_traced_forward": 3.0})


def test_trace_only_counts_bytes_without_devices():
    f = {"batch": B, "heads": N, "kv_heads": H, "head_dim": K, "causal": True, "implementation": "xla"}
    rows = bench.trace_seq(S, [2], list(STRATEGIES), f, jnp.float32)
    rows += bench.trace_seq(S, [16], ["ring", "tokenring"], f, jnp.float32)  # 16 > the 8 test devices
    assert [(r["strategy"], r["devices"]) for r in rows] == [(s, 2) for s in STRATEGIES] + [("ring", 16),
                                                                                            ("tokenring", 16)]
    for r in rows:
        assert tuple(r)[:6] == bench.LEADING_KEYS and r["time_s"] is None and bench.bytes_match(r), r
        if r["devices"] == 2:
            assert (r["bytes_forward"], r["bytes_backward"]) == HAND_C2[r["strategy"]]
