"""The heterogeneous-islands reproduction's outputs, at a toy size."""

import json

import pytest

from atoll.experiments.reproduce import heterogeneous_islands as hi
from atoll.parallel import netsim


def test_reproduction_compares_waiting_with_heterogeneous_steps_in_simulated_time(tmp_path, monkeypatch):
    toy = {"variant": "tiny", "islands": 4, "steps": 8, "batch_size": 8, "seq_len": 32, "eval_every": 4,
           "eval_batches": 1, "warmup_steps": 2, "step_seconds": 2.0, "bandwidth_gbit_s": 0.01, "latency_ms": 5.0,
           "model": {"d_model": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2, "head_dim": 16,
                     "mlp_dim": 64}}
    monkeypatch.setitem(hi.PRESETS, "toy", toy)
    monkeypatch.setattr(hi, "H", 4)
    monkeypatch.setattr(hi, "RUNS", hi.RUNS[:2])  # the stale variant's schedule is tested in test_islands
    results = hi.reproduce("toy", tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    by = {r["name"]: r for r in saved["runs"]}
    assert [r["mode"] for r in saved["runs"]] == ["wait_for_slowest", "heterogeneous"]
    for r in saved["runs"]:
        assert isinstance(r["final_val_loss"], float) and r["sim_seconds_to_target"] > 0
        assert r["sim_seconds_to_target"] <= r["sim_seconds_total"] + 1e-9
    assert saved["target_val_loss"] == max(r["final_val_loss"] for r in saved["runs"])
    wait, het = by["wait_for_slowest"], by["heterogeneous"]
    assert wait["steps_per_period"] == [4, 4, 4, 4] and het["steps_per_period"] == [4, 4, 2, 1]
    assert het["tokens"] == wait["tokens"] * 11 // 16  # 8 + 8 + 4 + 2 of 32 steps
    # a round by hand: compute of the last island to finish, then the blocking fp32 all-reduce
    sync_s = 6 * 5e-3 + netsim.ring_allreduce_bytes(4 * wait["params"], 4) * 8 / 0.01e9
    assert wait["round_seconds"] == pytest.approx(4 * 2.0 / 0.25 + sync_s)
    assert het["round_seconds"] == pytest.approx(4 * 2.0 + sync_s)
    assert wait["sim_seconds_total"] == pytest.approx(2 * wait["round_seconds"])
    md = (tmp_path / "results.md").read_text()
    assert "| wait_for_slowest |" in md and "Direction:" in md
    assert (tmp_path / "loss_vs_time.png").stat().st_size > 10_000
    assert saved["runs"] == json.loads(json.dumps(results["runs"]))
