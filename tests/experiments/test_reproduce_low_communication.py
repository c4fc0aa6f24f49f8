"""The low-communication reproduction's outputs, at a toy size."""

import json

import pytest

from atoll.experiments.reproduce import low_communication as lc


def test_reproduction_writes_results_in_the_issue_schema(tmp_path, monkeypatch):
    toy = {"variant": "tiny", "islands": 4, "steps": 8, "batch_size": 8, "seq_len": 32, "eval_every": 4,
           "eval_batches": 1, "warmup_steps": 2,
           "model": {"d_model": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2, "head_dim": 16,
                     "mlp_dim": 64}}
    monkeypatch.setitem(lc.PRESETS, "toy", toy)
    monkeypatch.setattr(lc, "RUNS", (
        ("ddp", {"method": "ddp"}),
        ("diloco_H30", {"method": "diloco", "H": 4}),
        ("streaming_diloco_fp4_H30", {"method": "streaming_diloco", "H": 4, "fragments": 2, "tau": 1,
                                      "quantization": "fp4"}),
    ))
    results = lc.reproduce("toy", tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(results["runs"]))
    by = {r["name"]: r for r in saved["runs"]}
    for r in saved["runs"]:
        assert {"method", "H", "quantization", "final_val_loss", "bytes_per_island", "peak_bytes_per_step"} <= set(r)
    assert by["ddp"]["ratio_to_ddp"] == pytest.approx(1.0)
    assert by["diloco_H30"]["ratio_to_ddp"] == pytest.approx(4.0)  # H = 4, fp32
    s = by["streaming_diloco_fp4_H30"]
    assert s["ratio_to_ddp"] > 4 * 7  # 4.25 bits instead of 32, once per H
    assert s["peak_bytes_per_step"] <= by["diloco_H30"]["peak_bytes_per_step"] / 2 * 0.15  # one fragment, 4.25 bits
    assert set(saved["checks"]) >= {"diloco_H30_within_3pct", "streaming_fp4_bytes_ratio_ge_200",
                                    "streaming_peak_le_diloco_peak_over_P"}
    md = (tmp_path / "results.md").read_text()
    assert "| ddp |" in md and "3.54" in md  # the paper's row sits beside ours
    assert (tmp_path / "loss.png").stat().st_size > 10_000
