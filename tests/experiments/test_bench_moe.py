import json
import os
import subprocess
import sys

import pytest

# D, E, K, F, B, T of the run below, and the FLOPs per token counted by hand
# (forward matmuls, 2 per multiply-add):
D, E, K, F, B, T = 16, 4, 2, 8, 2, 16
ROUTER = 2 * D * E  # 128
DENSE = 2 * 3 * D * (K * F)  # 1536: SwiGLU of width K·F
ACTIVE = ROUTER + K * 2 * 3 * D * F  # 1664
C = 10  # ceil(1.25 · T · K / E) = ceil(10.0)
CAPACITY = ROUTER + (E * C / T) * 2 * 3 * D * F  # 2048: all E·C slots run, 2.5 per token
C_EC = 8  # ceil(1.0 · T · K / E): exactly K experts per token on average
GMM = 2 * K * D * F  # 512: one expert matmul over the token's K assignments

ROWS = ["dense_ffn", "moe_capacity", "moe_dropless", "moe_expert_choice",
        "grouped_matmul_einsum", "grouped_matmul_ragged_dot"]


@pytest.fixture(scope="module")
def output():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
               JAX_DISABLE_MOST_OPTIMIZATIONS="1")  # the contract, not the speed: compile fast
    out = subprocess.run(
        [sys.executable, "-m", "atoll.experiments.bench.moe", f"--d_model={D}", f"--experts={E}", f"--top_k={K}",
         f"--expert_mlp_dim={F}", f"--batch={B}", f"--seq_len={T}", "--repeats=3", "--warmup=1"],
        env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {r["name"]: r for r in lines[:-1]}, [r["name"] for r in lines[:-1]], lines[-1]


def test_rows_and_their_ratios(output):
    rows, names, _ = output
    assert names == ROWS
    for name, r in rows.items():
        base = rows[r["baseline"]]
        assert r["step_time_s"] > 0 and r["forward_time_s"] > 0
        assert r["tokens_per_sec"] == pytest.approx(B * T / r["step_time_s"], rel=1e-12)
        assert r["ratio"] == base["step_time_s"] / r["step_time_s"]
        assert r["forward_ratio"] == base["forward_time_s"] / r["forward_time_s"]
        assert r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
        assert r["dtype"] == "float32" and r["device"] and r["jax"]
    assert {r["baseline"] for n, r in rows.items() if n.startswith(("dense", "moe"))} == {"dense_ffn"}
    assert rows["grouped_matmul_ragged_dot"]["baseline"] == "grouped_matmul_einsum"
    assert rows["dense_ffn"]["ratio"] == rows["grouped_matmul_einsum"]["ratio"] == 1.0
    assert rows["moe_dropless"]["drop_rate"] == 0.0
    assert 0.0 <= rows["moe_capacity"]["drop_rate"] < 1.0 and 0.0 <= rows["moe_expert_choice"]["drop_rate"] < 1.0


def test_summary_repeats_the_rows(output):
    rows, _, summary = output
    assert summary["moe_vs_dense_capacity"] == rows["moe_capacity"]["ratio"]
    assert summary["moe_vs_dense_dropless"] == rows["moe_dropless"]["ratio"]
    assert summary["moe_vs_dense_expert_choice"] == rows["moe_expert_choice"]["ratio"]
    assert summary["ragged_dot_vs_einsum"] == rows["grouped_matmul_ragged_dot"]["ratio"]
    assert summary["forward_ragged_dot_vs_einsum"] == rows["grouped_matmul_ragged_dot"]["forward_ratio"]
    assert summary["device"] == rows["dense_ffn"]["device"] and summary["jax"] == rows["dense_ffn"]["jax"]


def test_flops_match_the_hand_count(output):
    rows, _, _ = output
    expected = {"dense_ffn": (DENSE, DENSE), "moe_capacity": (ACTIVE, CAPACITY), "moe_dropless": (ACTIVE, ACTIVE),
                "moe_expert_choice": (ACTIVE, ACTIVE), "grouped_matmul_einsum": (GMM, GMM),
                "grouped_matmul_ragged_dot": (GMM, GMM)}
    for name, (active, executed) in expected.items():
        assert (rows[name]["active_flops"], rows[name]["executed_flops"]) == (active, executed), name
        r = rows[name]
        assert r["executed_tflops_per_sec"] == pytest.approx(3 * executed * B * T / r["step_time_s"] / 1e12)
        if r["xla_flops"] is not None:  # XLA counts at least the matmuls we count
            assert r["xla_flops"] >= executed, name
    assert rows["moe_capacity"]["capacity"] == C and rows["moe_expert_choice"]["capacity"] == C_EC
