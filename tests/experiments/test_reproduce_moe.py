"""The MoE routing reproduction's outputs (and train_lm's MoE logging), at a toy size."""

import json

from atoll.core import flops
from atoll.core.transformer import TransformerConfig
from atoll.experiments import outputs
from atoll.experiments.reproduce import moe_routing as mr


def test_reproduction_writes_the_contract_the_plots_and_routing_metrics(tmp_path, monkeypatch):
    toy = {"variant": "tiny", "islands": 1, "steps": 6, "batch_size": 8, "seq_len": 16, "eval_every": 3,
           "eval_batches": 1, "warmup_steps": 1, "affinity_windows": 4,
           "model": {"d_model": 16, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2, "head_dim": 8,
                     "mlp_dim": 32}}
    monkeypatch.setitem(mr.PRESETS, "toy", toy)
    monkeypatch.setattr(mr, "RUNS", (mr.RUNS[0], mr.RUNS[1]))  # dense and the balanced token-choice run
    mr.reproduce("toy", tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    dense, balanced = saved["runs"]
    for r in saved["runs"]:
        assert {"name", "moe", "router", "active_params", "final_val_loss", "max_over_mean_load",
                "drop_rate"} <= set(r)
        assert isinstance(r["final_val_loss"], float)
    assert (dense["moe"], balanced["moe"]) == (False, True) and balanced["router"] == "topk_softmax"
    # equal active parameters up to the router's D·E per layer
    assert balanced["active_params"] - dense["active_params"] == 2 * 16 * mr.EXPERTS
    assert balanced["params"] > balanced["active_params"]
    cfg = TransformerConfig.from_dict(mr.run_config(toy, mr.RUNS[1][1]).model)
    assert balanced["params"] == flops.total_params(cfg)
    last = [r for r in outputs.read_metrics(tmp_path / "runs" / "topk_balanced") if "loss" in r][-1]
    want = (last["moe/block0/max_over_mean_load"] + last["moe/block1/max_over_mean_load"]) / 2
    assert abs(balanced["max_over_mean_load"] - want) < 1e-9 and 0.0 <= balanced["drop_rate"] <= 1.0
    assert dense["max_over_mean_load"] is None
    affinity = saved["affinity"]["matrices"]
    assert len(affinity) == 1 and len(affinity[0]) == mr.EXPERTS  # one adjacent pair, E x E
    for name in ("results.md", "loss.png", "balance.png", "affinity.png"):
        assert (tmp_path / name).exists(), name
    assert "Direction:" in (tmp_path / "results.md").read_text()
    # train_lm logged every MoE layer's routing and drew routing.png
    rows = outputs.read_metrics(tmp_path / "runs" / "topk_balanced")
    logged = [r for r in rows if "loss" in r]
    assert {"moe/aux_loss", "moe/block0/drop_rate", "moe/block1/max_over_mean_load"} <= set(logged[-1])
    assert len(logged[-1]["moe/block1/load_fraction"]) == mr.EXPERTS
    assert abs(sum(logged[-1]["moe/block1/load_fraction"]) - 1.0) < 1e-5
    assert (tmp_path / "runs" / "topk_balanced" / "routing.png").exists()
