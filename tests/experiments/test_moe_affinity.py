"""Inter-layer expert affinity: the counting on hand-built routes, the depth
order of recorded routes (scanned and unscanned models agree), and the CLI on
a workdir built by hand (plain and island checkpoints)."""

import dataclasses
import json
import os
import subprocess
import sys
import types

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from absl import logging as absl_logging

from atoll.configs import lm
from atoll.core import moe
from atoll.core.moe import MoeConfig
from atoll.core.transformer import Transformer, TransformerConfig
from atoll.experiments import moe_affinity as ma
from atoll.parallel import checkpoint

E = 4
SEQ = 16


def tiny_cfg(**kw) -> TransformerConfig:
    moe_kw = {"num_experts": E, "top_k": 2, **kw.pop("moe", {})}
    return TransformerConfig(**{"num_layers": 4, "d_model": 32, "num_heads": 2, "num_kv_heads": 2, "head_dim": 16,
                                "mlp_dim": 64, "moe": MoeConfig(**moe_kw), **kw})


def init_params(cfg, seed=0):
    """A random init drawn in numpy on the model's param shapes (the init's
    compiled threefry would cost most of this file's CPU time)."""
    shapes = jax.eval_shape(lambda: nn.meta.unbox(Transformer(cfg).init(jax.random.key(0),
                                                                        np.zeros((1, SEQ), np.int32))["params"]))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if "scale" in name:  # RMSNorm
            return np.ones(x.shape, x.dtype)
        return rng.normal(0.0, 1.0 if "embedding" in name else 0.02, x.shape).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def unscanned(params, num_layers):
    """The same model's params laid out for scan_layers=False."""
    out = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(num_layers):
        out[f"block_{i}"] = jax.tree.map(lambda x: x[i], params["blocks"])
    return out


# ------------------------------------------------------------------ counting


def test_a_fixed_permutation_between_layers_gives_the_permutation_matrix():
    rng = np.random.default_rng(0)
    perm1, perm2 = rng.permutation(E), rng.permutation(E)
    r0 = rng.integers(0, E, size=(500, 1))
    routes = np.stack([r0, perm1[r0], perm2[perm1[r0]]])  # [3, N, 1]
    A = ma.expert_affinity(routes, E)
    assert A.shape == (2, E, E)
    np.testing.assert_array_equal(A[0], np.eye(E)[perm1])
    np.testing.assert_array_equal(A[1], np.eye(E)[perm2])
    s = ma.affinity_summary(routes, E)
    p0 = np.bincount(r0[:, 0], minlength=E) / len(r0)
    entropy = -np.sum(p0 * np.log2(p0))
    for row in s["pairs"]:
        assert row["mean_max_prob"] == 1.0
        assert row["mutual_information_bits"] == pytest.approx(entropy)  # the next expert is fully determined
        assert row["shuffled_mutual_information_bits"] < 0.05


def test_with_top2_a_row_is_capped_at_one_half_and_the_first_choice_is_not():
    """Each token's expert set is mapped by a permutation: every pair is
    counted, so a row spreads over both successors; first choices stay exact."""
    rng = np.random.default_rng(1)
    r0 = np.argsort(rng.random((2000, E)), axis=-1)[:, :2]  # two distinct experts per token
    perm = rng.permutation(E)
    routes = np.stack([r0, perm[r0]])
    A = ma.expert_affinity(routes, E)
    assert A.max() <= 0.5 + 1e-12
    np.testing.assert_allclose(A[0][np.arange(E), perm], 0.5)
    row = ma.affinity_summary(routes, E)["pairs"][0]
    assert row["mean_max_prob"] == pytest.approx(0.5)
    assert row["first_choice_mean_max_prob"] == 1.0


def test_independent_uniform_routes_give_rows_near_one_over_E():
    rng = np.random.default_rng(2)
    routes = np.argsort(rng.random((3, 20_000, E)), axis=-1)[..., :2]
    A = ma.expert_affinity(routes, E)
    np.testing.assert_allclose(A, 1 / E, atol=0.02)
    s = ma.affinity_summary(routes, E)
    assert s["uniform_prob"] == 1 / E and s["max_prob_ceiling"] == 0.5
    for row in s["pairs"]:
        assert row["mutual_information_bits"] < 0.01 and row["shuffled_mutual_information_bits"] < 0.01
        assert abs(row["mean_max_prob"] - row["independent_max_prob"]) < 0.02


def test_rows_sum_to_one_for_chosen_experts_and_are_zero_otherwise():
    rng = np.random.default_rng(3)
    routes = np.stack([np.argsort(rng.random((300, E - 1)), axis=-1)[:, :2],  # expert 3 never chosen at layer 0
                       np.argsort(rng.random((300, E)), axis=-1)[:, :2],
                       np.argsort(rng.random((300, E)), axis=-1)[:, :2]])
    A = ma.expert_affinity(routes, E)
    np.testing.assert_allclose(A[0, :3].sum(-1), 1.0)
    np.testing.assert_array_equal(A[0, 3], 0.0)
    np.testing.assert_allclose(A[1].sum(-1), 1.0)
    counts = ma.pair_counts(routes, E)
    assert counts[0].sum() == 300 * 2 * 2  # K² pairs per token


def test_bad_routes_are_refused():
    with pytest.raises(ma.AffinityError, match="adjacent MoE layers"):
        ma.expert_affinity(np.zeros((1, 5, 2), np.int32), E)
    with pytest.raises(ma.AffinityError, match="outside"):
        ma.expert_affinity(np.full((2, 5, 1), E), E)


# ------------------------------------------------------------------ recorded routes


def test_recorded_routes_come_in_depth_order():
    g = lambda v: np.full((2, 3, 1), v)  # [G, S, K]
    recorded = {moe.ROUTES: {f"block_{i}": {"moe": {"experts": g(i)}} for i in (10, 2, 1)}}
    assert ma.routes_by_layer(recorded)[:, 0, 0].tolist() == [1, 2, 10]
    scanned = {"blocks": {"moe": {"experts": np.stack([g(i) for i in range(3)])}}}  # no collection key
    r = ma.routes_by_layer(scanned)
    assert r.shape == (3, 6, 1) and r[:, 0, 0].tolist() == [0, 1, 2]
    with pytest.raises(ma.AffinityError, match="expert-choice"):
        ma.routes_by_layer({moe.ROUTES: {"block_0": {"moe": {"expert_tokens": g(0)}}}})
    with pytest.raises(ma.AffinityError, match="no MoE routes"):
        ma.routes_by_layer({moe.ROUTES: {}})


def test_models_without_affinity_are_refused_by_name():
    with pytest.raises(ma.AffinityError, match="no MoE layers"):
        ma.check_model(tiny_cfg(moe={"num_experts": 0}))
    with pytest.raises(ma.AffinityError, match="1 MoE layer"):
        ma.check_model(tiny_cfg(num_layers=2, moe={"every": 2}))
    with pytest.raises(ma.AffinityError, match="expert_choice"):
        ma.check_model(tiny_cfg(moe={"router": "expert_choice"}))
    assert ma.check_model(tiny_cfg(moe={"every": 2})) == [1, 3]


def test_model_path_scanned_and_unscanned_agree():
    cfg = tiny_cfg()
    params = init_params(cfg)
    tokens = np.random.default_rng(0).integers(0, 256, (5, SEQ)).astype(np.int32)
    # One batch shape (4 sequences) throughout, so each model compiles once.
    A, summary = ma.affinity_from_params(cfg, params, tokens, batch_size=4)  # 2 batches, the last padded
    assert A.shape == (3, E, E)
    assert summary["moe_layers"] == [0, 1, 2, 3] and summary["tokens"] == 5 * SEQ and len(summary["pairs"]) == 3
    chosen = A.sum(-1) > 0
    np.testing.assert_allclose(A.sum(-1)[chosen], 1.0)
    routes = ma.routes_from_params(cfg, params, tokens, batch_size=4)
    assert routes.shape == (4, 5 * SEQ, 2)
    np.testing.assert_array_equal(ma.routes_from_params(cfg, params, tokens[:4], batch_size=4),
                                  routes[:, :4 * SEQ])  # padding changed nothing
    flat = dataclasses.replace(cfg, scan_layers=False)
    routes_flat = ma.routes_from_params(flat, unscanned(params, 4), tokens, batch_size=4)
    np.testing.assert_array_equal(routes, routes_flat)  # same layers, same depth order
    A_flat, _ = ma.affinity_from_params(flat, unscanned(params, 4), tokens, batch_size=4)
    assert A_flat.shape == (3, E, E)
    np.testing.assert_array_equal(A, A_flat)


# ------------------------------------------------------------------ the CLI


def make_workdir(path, cfg_overrides=None, islands=0, step=3, save=True):
    """config.json + checkpoints/STEP (plain, or island runs with `islands` > 0) + a .npy corpus."""
    rng = np.random.default_rng(0)
    path.mkdir(parents=True)
    np.save(path / "tokens.npy", rng.integers(0, 256, 4000).astype(np.int32))
    cfg = tiny_cfg(moe=cfg_overrides or {})  # the model the tests above compiled
    model_fields = dataclasses.asdict(cfg)
    moe_fields = model_fields.pop("moe")
    c = lm.get_config("tiny")
    c.model.update(**model_fields)
    if "moe" in c.model:
        c.model.moe.update(**moe_fields)
    else:  # lm.py without config.model.moe
        c.model.moe = ml_collections.ConfigDict(moe_fields)
    c.data.update(path=str(path / "tokens.npy"), seq_len=SEQ, val_fraction=0.25)
    (path / "config.json").write_text(c.to_json_best_effort())
    assert TransformerConfig.from_dict(ml_collections.ConfigDict(json.loads(c.to_json_best_effort())).model) == cfg
    if not save:
        return cfg, None
    params = init_params(cfg, seed=0)
    if islands:  # island 0's outer params are the model; the others differ
        others = [init_params(cfg, seed=i) for i in range(1, islands)]
        stacked = jax.tree.map(lambda *xs: np.stack(xs), params, *others)
        state = {"step": np.int32(step), "params": stacked, "outer": {"params": stacked}}
    else:
        state = {"step": np.int32(step), "params": params}
    ck = checkpoint.Checkpointer(path / "checkpoints", mode="sync")
    ck.save(step, jax.tree.map(jax.numpy.asarray, state), {})
    ck.close()
    return cfg, params


def test_run_reads_plain_and_island_checkpoints(tmp_path):
    cfg, params = make_workdir(tmp_path / "plain")
    res = ma.run(tmp_path / "plain", windows=4, progress=False)
    out = tmp_path / "plain" / "analysis"
    assert (out / "affinity.png").stat().st_size > 0
    saved = json.loads((out / "affinity.json").read_text())
    assert saved["step"] == 3 and np.asarray(saved["affinity"]).shape == (3, E, E)
    assert saved["tokens"] == 4 * SEQ and saved["pairs"][0]["layers"] == [0, 1]

    _, params0 = make_workdir(tmp_path / "islands", islands=2)
    res_islands = ma.run(tmp_path / "islands", windows=4, out=tmp_path / "elsewhere", progress=False)
    assert (tmp_path / "elsewhere" / "affinity.json").exists()
    np.testing.assert_array_equal(res_islands["affinity"], res["affinity"])  # island 0 = the plain run's params

    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint at step 7 .* saved steps: \\[3\\]"):
        ma.run(tmp_path / "plain", step=7, progress=False)


def test_run_errors(tmp_path):
    make_workdir(tmp_path / "dense", {"num_experts": 0}, save=False)  # refused before any checkpoint is read
    with pytest.raises(ma.AffinityError, match="no MoE layers"):
        ma.run(tmp_path / "dense", progress=False)
    with pytest.raises(ma.AffinityError, match="config.json does not exist"):
        ma.run(tmp_path / "nothing", progress=False)


def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "atoll.experiments.moe_affinity", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_json_and_png_and_fails_clearly(tmp_path, monkeypatch, capsys):
    make_workdir(tmp_path / "run")
    # main() in this process, its flags as the script defines them (the program
    # compiled above is reused); the `python -m` entry point runs below.
    values = {"workdir": f"{tmp_path}/run", "step": "latest", "windows": 4, "out": f"{tmp_path}/o", "batch_size": 16}
    for name, value in values.items():
        monkeypatch.setitem(ma._FLAGS, name, types.SimpleNamespace(value=value))
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # main() adds atoll's defaults
    verbosity = absl_logging.get_verbosity()
    try:
        ma.main([])
    finally:
        absl_logging.set_verbosity(verbosity)
    assert "mean max P" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "affinity.json").read_text())["windows"] == 4
    assert (tmp_path / "o" / "affinity.png").stat().st_size > 0
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((tmp_path / "run" / "config.json").read_text())
    out = _cli(f"--workdir={tmp_path}/empty", "--windows=4", f"--out={tmp_path}/o2", cwd=tmp_path)
    assert out.returncode == 2 and "no checkpoint in" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "o2").exists()
