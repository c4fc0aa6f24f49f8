"""train_lm with islands: outer config, accounting, and exact resume mid-round."""

import shutil
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from atoll.configs import lm
from atoll.configs.validation import ConfigError
from atoll.experiments import outputs
from atoll.experiments.train_lm import train
from atoll.parallel import checkpoint


def island_config(method="diloco", steps=12, layers=2, **outer):
    """A small model on 4 islands × data 2. layers=1 compiles faster where no check needs two
    (streaming_diloco's fragments are groups of layers: it keeps two)."""
    c = lm.get_config("tiny")
    c.model.update(d_model=32, num_layers=layers, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64)
    c.data.seq_len = 32
    c.train.update(steps=steps, batch_size=8, warmup_steps=2, log_every=2, eval_every=6, eval_batches=1,
                   checkpoint_every=100)
    c.mesh.update(island=4, data=2)
    c.outer.update(method=method, H=4, **outer)
    return c


@pytest.fixture(scope="module")
def diloco_runs(tmp_path_factory):
    """island_config("diloco", steps=12) straight, and the same run stopped at step 4:
    one engine, compiled once, for the tests that read these or resume a copy."""
    root = tmp_path_factory.mktemp("diloco")
    c = island_config("diloco", steps=12, layers=1)
    straight = train(c, root / "straight", progress=False)
    train(c, root / "split4", stop_at_step=4, progress=False)
    return SimpleNamespace(root=root, straight=straight)


def _leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state))]


@pytest.mark.parametrize("method,outer,stop", [
    ("streaming_diloco", {"fragments": 2, "tau": 1, "quantization": "fp4"}, 6),  # fragment 0 sent, not applied
    ("sparseloco", {"topk_chunk": 256, "topk_k": 8}, 5),  # error feedback carried over
    # plain DiLoCo mid-H runs here too (the two fastest islands take every step): two inner steps into the
    # second round, and islands of different speeds, the slowest spanning two rounds: its anchor carried over
    ("diloco", {"speeds": (1, 1, .5, .25), "heterogeneity": "heterogeneous", "min_inner_steps": 2}, 6),
])
def test_resume_mid_round_is_exact(tmp_path, method, outer, stop):
    c = island_config(method, layers=2 if method == "streaming_diloco" else 1, **outer)
    straight = train(c, tmp_path / "straight", progress=False)
    train(c, tmp_path / "split", stop_at_step=stop, progress=False)
    resumed = train(c, tmp_path / "split", progress=False)
    for a, b in zip(_leaves(straight.state), _leaves(resumed.state)):
        np.testing.assert_array_equal(a, b)
    for key in ("bytes_per_island", "peak_bytes_per_step", "ddp_bytes_per_island", "syncs"):
        assert straight.summary[key] == resumed.summary[key], key


def test_accounting_in_metrics_and_summary(diloco_runs, tmp_path):
    s = diloco_runs.straight.summary  # diloco, 12 steps
    assert s["syncs"] == 3 and s["islands"] == 4
    assert s["bytes_ratio_to_ddp"] == pytest.approx(4.0)  # H = 4: one fp32 all-reduce per 4 steps
    assert s["peak_bytes_per_step"] == pytest.approx(s["bytes_per_island"] / 3)
    rows = outputs.read_metrics(diloco_runs.root / "straight")
    sent = [r["comm_sent_bytes"] for r in rows if "comm_sent_bytes" in r]
    assert sent == sorted(sent) and sent[-1] == s["bytes_per_island"]
    assert any("outer/delta_norm" in r for r in rows)

    # islands at speeds 1, 1, 0.5, 0.25 (H = 4: 4, 4, 2, 1 steps a round) train on fewer tokens
    het = island_config("diloco", steps=4, layers=1, step_seconds=(0.1, 0.1, 0.2, 0.4), heterogeneity="heterogeneous")
    h = train(het, tmp_path / "het", progress=False).summary
    assert h["tokens"] == s["tokens"] // 3 * (4 + 4 + 2 + 1) // 16  # one round of the three
    assert h["island_schedule"]["steps_per_period"] == [4, 4, 2, 1]
    assert h["bytes_per_island"] == s["bytes_per_island"] / 3  # the same all-reduce every round

    d = train(island_config("ddp", steps=4, layers=1), tmp_path / "ddp", progress=False).summary
    assert d["bytes_ratio_to_ddp"] == pytest.approx(1.0) and d["syncs"] == 4


@pytest.mark.parametrize("change,message", [
    ({"mesh.island": 3}, "island"),
    ({"outer.method": "streaming_diloco", "outer.fragments": 3}, "fragments"),
    ({"outer.method": "streaming_diloco", "outer.fragments": 2, "outer.H": 5}, "outer.H"),
    ({"outer.method": "streaming_diloco", "outer.tau": 4}, "tau"),
    ({"outer.method": "sparseloco", "outer.quantization": "fp4"}, "quantization"),
    ({"outer.method": "nope"}, "outer.method"),
    ({"outer.method": "none"}, "outer.method"),
    ({"outer.heterogeneity": "heterogeneous"}, "needs island speeds"),
    ({"outer.heterogeneity": "fastest"}, "outer.heterogeneity"),
    ({"outer.speeds": (1.0, 0.5)}, "one per island"),
    ({"outer.speeds": (1.0, 1.0, 0.0, 1.0)}, "positive"),
    ({"outer.speeds": (1.0,) * 4, "outer.step_seconds": (1.0,) * 4}, "not both"),
    ({"outer.speeds": (1.0, 1.0, 0.5, 0.5), "outer.heterogeneity": "heterogeneous", "outer.method": "noloco"},
     "works with"),
    ({"outer.min_inner_steps": 5}, "min_inner_steps"),
])
def test_bad_outer_configs_name_the_field(tmp_path, change, message):
    c = island_config()
    for k, v in change.items():
        section, field = k.split(".")
        c[section][field] = v
    with pytest.raises(ConfigError, match=message):
        train(c, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_another_island_count_is_refused_unless_fresh_islands_from_the_outer_params(diloco_runs, tmp_path):
    c = island_config("diloco", steps=12, layers=1)
    run = shutil.copytree(diloco_runs.root / "split4", tmp_path / "run")  # 4 islands, stopped at step 4
    saved = checkpoint.read_on_host(tmp_path / "run" / "checkpoints", 4)
    c.mesh.update(island=2, data=4)
    with pytest.raises(ConfigError, match="config.mesh.island = 4.*restore_outer_into_fresh_islands"):
        train(c, run, progress=False)
    # two fresh islands, both starting from island 0's saved outer params, with fresh optimizer states
    fresh = train(c, run, stop_at_step=4, progress=False, fresh_islands=True).state
    for got, want in zip(_leaves(fresh["params"]), jax.tree.leaves(saved["outer"]["params"])):
        assert got.shape[0] == 2
        np.testing.assert_array_equal(got, np.broadcast_to(want[0], got.shape))
    moments = [x for p, x in jax.tree_util.tree_leaves_with_path(fresh["opt_state"]) if ".mu" in jax.tree_util.keystr(p)]
    assert moments and all(np.all(np.asarray(m) == 0) for m in moments)
    resumed = train(c, run, stop_at_step=6, progress=False).summary  # and it trains on as 2 islands
    assert resumed["step"] == 6 and resumed["islands"] == 2
