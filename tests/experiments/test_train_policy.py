"""train_policy / eval_policy on the JAX suite (Meta-World runs through the same
code in test_reproduce_metaworld)."""

import json

import jax
import numpy as np
import pytest

from atoll.configs import policy as policy_config
from atoll.configs.validation import ConfigError
from atoll.experiments import eval_policy, train_policy
from atoll.parallel import checkpoint


def test_tiny_flow_policy_learns_intercept_and_eval_reproduces_it(tmp_path):
    """One tiny training run (the expensive part) checked four ways: it learns; eval_policy
    from the checkpoint alone (EMA weights, normalizers, config) gives the trainer's final
    figure on the same seed and episodes, twice; a rerun of the
    finished run logs its final eval once."""
    workdir = tmp_path / "tiny"
    summary = train_policy.train(policy_config.get_config("tiny"), workdir, progress=False)
    assert summary["finished"] and summary["expert_success"] >= 0.95
    assert summary["success"] >= 0.8, summary
    for name in ("config.json", "demos.json", "metrics.jsonl", "summary.json", "loss.png", "success.png"):
        assert (workdir / name).exists(), name
    rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2])
    assert [r["step"] for r in rows if "success" in r] == [200, 400]

    kw = dict(checkpoint_path=str(workdir), step=None, policy_kind="checkpoint", task=None, suite=None,
              episodes=summary["eval_episodes"], seeds=[summary["eval_seed"]], execute_steps=None, max_steps=None,
              progress=False)
    a = eval_policy.run(**kw)
    assert a["success"] == summary["success"] and a["step"] == 400
    b = eval_policy.run(**kw)
    assert a["per_seed"] == b["per_seed"]
    lo, hi = a["success_ci95"]
    assert lo <= a["success"] <= hi and a["per_seed"][0]["seed"] == summary["eval_seed"]
    with pytest.raises(eval_policy.EvalError, match="execute_steps = 5"):
        eval_policy.run(**{**kw, "execute_steps": 5})
    # the delay simulator at d = 0 runs the same episodes the same way
    c = eval_policy.run(**kw, strategy="naive_async", delay=0)
    assert c["per_seed"][0]["successes"] == a["per_seed"][0]["successes"] and c["strategy"] == "naive_async"
    assert c["per_seed"][0]["mean_time"] == pytest.approx(a["mean_length"] * 0.05)
    with pytest.raises(eval_policy.EvalError, match="policy.conditioning='vlash'"):
        eval_policy.run(**kw, strategy="vlash", delay=1)
    with pytest.raises(eval_policy.EvalError, match="d <= s"):
        eval_policy.run(**kw, strategy="naive_async", delay=3)
    with pytest.raises(eval_policy.EvalError, match="not a train_policy workdir"):
        eval_policy.run(**{**kw, "checkpoint_path": str(workdir / "tb")})

    again = train_policy.train(policy_config.get_config("tiny"), workdir, progress=False)
    assert again["resumed_from"] == 400 and again["success"] == summary["success"]
    rows = [json.loads(r) for r in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "success" in r] == [200, 400]


def test_wilson_interval():
    assert eval_policy.wilson_interval(0, 20)[0] == 0.0 and 0.1 < eval_policy.wilson_interval(0, 20)[1] < 0.2
    lo, hi = eval_policy.wilson_interval(50, 100)
    assert lo == pytest.approx(1 - hi) and 0.40 < lo < 0.41
    assert eval_policy.wilson_interval(20, 20)[1] == 1.0


def _small(steps=12):
    c = policy_config.get_config("tiny")
    c.train.steps, c.train.log_every, c.train.checkpoint_every = steps, 4, 100
    c.eval.every, c.eval.episodes, c.eval.final_episodes = 100, 4, 4
    c.data.num_demos, c.model.dim, c.model.depth = 8, 16, 1
    c.mesh.data = 2  # data-parallel (2 of the 8 test devices: 8 would only add partitioning overhead here)
    return c


def test_a_stopped_run_resumes_to_the_same_params(tmp_path):
    straight = train_policy.train(_small(), tmp_path / "a", progress=False)
    stopped = train_policy.train(_small(), tmp_path / "b", progress=False, stop_at_step=5)
    assert stopped == {"step": 5, "finished": False}
    resumed = train_policy.train(_small(), tmp_path / "b", progress=False)
    assert resumed["resumed_from"] == 5 and straight["success"] == resumed["success"]
    a = checkpoint.read_on_host(tmp_path / "a" / "checkpoints", 12)
    b = checkpoint.read_on_host(tmp_path / "b" / "checkpoints", 12)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    steps = [json.loads(r)["step"] for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4, 8, 12, 12]  # the loss rows, then the final eval; none twice

    other = _small()
    other.model.dim = 32
    before = (tmp_path / "b" / "config.json").read_text()
    with pytest.raises(ConfigError, match="different model.dim"):
        train_policy.train(other, tmp_path / "b", progress=False)
    assert (tmp_path / "b" / "config.json").read_text() == before

    # REMAC: prefixes self-conditioned on the finished run's plans (a frozen policy)
    remac = _small(steps=4)
    remac.policy.update(conditioning="remac", max_delay=2, frozen_policy=str(tmp_path / "a"))
    summary = train_policy.train(remac, tmp_path / "remac", progress=False)
    assert summary["finished"] and np.isfinite(json.loads(
        (tmp_path / "remac" / "metrics.jsonl").read_text().splitlines()[0])["loss"])
    record = tmp_path / "remac" / "frozen.json"
    assert json.loads(record.read_text())["step"] == 12
    record.write_text(json.dumps({**json.loads(record.read_text()), "weights_fingerprints": {}}))
    for frozen, workdir, match in [(tmp_path / "a", "remac", "not the policy this run started from"),
                                   (tmp_path / "nothing", "remac2", "not a train_policy workdir"),
                                   (tmp_path / "remac2", "remac2", "own workdir")]:
        remac.policy.frozen_policy = str(frozen)
        with pytest.raises(ConfigError, match=match):
            train_policy.train(remac, tmp_path / workdir, progress=False)
    assert not (tmp_path / "remac2").exists()  # a refused run leaves nothing behind


@pytest.mark.parametrize("field,value,match", [
    ("policy.execute_steps", 9, "at most config.policy.action_horizon"),
    ("model.net", "mlp", "model.net"),
    ("objective.kind", "gan", "objective.kind"),
    ("env.suite", "robosuite", "env.suite"),
    ("train.batch_size", 0, "train.batch_size"),
    ("policy.conditioning", "remac", "frozen_policy"),
    ("policy.frozen_policy", "runs/plain", "belong to conditioning 'remac'"),
])
def test_bad_configs_name_the_field(tmp_path, field, value, match):
    c = _small()
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(ConfigError, match=match):
        train_policy.train(c, tmp_path / "w", progress=False)
    assert not (tmp_path / "w").exists()


def test_unet_horizon_and_batch_split_are_checked(tmp_path):
    c = _small()
    c.model.net, c.policy.action_horizon, c.policy.execute_steps = "unet", 6, 2
    with pytest.raises(ConfigError, match="divisible by 4"):
        train_policy.train(c, tmp_path / "w", progress=False)
    c = _small()
    c.mesh.data, c.train.batch_size = -1, 12  # all 8 test devices on mesh.data
    with pytest.raises(ConfigError, match="divisible by the 8 devices"):
        train_policy.train(c, tmp_path / "w", progress=False)



def test_vlash_windows_carry_the_robot_state_of_a_later_step():
    """VLASH's augmentation: for offset δ the newest observation's robot columns
    (0:4) come from step t + δ (clamped at the episode end) and so do the actions,
    while the rest of the observation stays at step t."""
    from atoll.core import policy as policy_nets
    from atoll.data import demos as demos_lib
    from atoll.experiments.train_policy import windows

    steps = np.arange(7, dtype=np.float32)  # one episode of 4 steps, one of 3; values = global step index
    obs = np.repeat(steps[:, None], 6, axis=1) + np.arange(6)[None] * 100
    demos = demos_lib.Demos(obs, np.repeat(steps[:, None], 2, axis=1), np.asarray([4, 7]), {})
    ident = policy_nets.Normalizer(np.zeros(6, np.float32), np.ones(6, np.float32))
    ident_a = policy_nets.Normalizer(np.zeros(2, np.float32), np.ones(2, np.float32))
    obs_NTO, act_NHA = windows(demos, ident, ident_a, obs_horizon=2, action_horizon=3, offsets=2)
    assert obs_NTO.shape == (21, 2, 6) and act_NHA.shape == (21, 3, 2)
    for delta in range(3):
        for n in range(7):
            row = delta * 7 + n
            end = 3 if n < 4 else 6
            later = min(n + delta, end)
            assert np.all(obs_NTO[row, -1, :4] == obs[later, :4])  # robot state from t + δ
            assert np.all(obs_NTO[row, -1, 4:] == obs[n, 4:])  # the target as at t
            assert np.all(obs_NTO[row, 0] == obs[max(n - 1, 0 if n < 4 else 4)])  # the older frame untouched
            assert act_NHA[row, 0, 0] == later  # actions start at t + δ


def test_vlash_offsets_shift_what_each_suites_roll_forward_moves():
    """Training's offsets and run time's roll-forward touch the same rows: in
    Meta-World the hand position, not the gripper opening (obs[3]), which
    roll_forward leaves as observed; in the JAX suite position and velocity."""
    import jax.numpy as jnp

    from atoll.core import policy as policy_nets
    from atoll.data import demos as demos_lib
    from atoll.envs import jax_tasks, metaworld
    from atoll.experiments.train_policy import robot_state, windows

    def moved(before, after):
        return set(np.flatnonzero(np.asarray(before) != np.asarray(after)))

    obs_D = np.arange(1, 40, dtype=np.float32)
    rolled = metaworld.roll_forward(obs_D, np.full((3, 4), 0.5, np.float32), 2)
    rows = robot_state("metaworld")
    assert moved(obs_D, rolled) == set(range(39)[rows]) == {0, 1, 2}

    task = jax_tasks.make_task("intercept")
    obs = jnp.asarray(np.linspace(0.1, 0.8, 8, dtype=np.float32))  # inside the arena: no wall clips
    rolled = task.roll_forward(obs, jnp.ones((2, 2)), 2)
    assert moved(obs, rolled) == set(range(8)[robot_state("jax")]) == {0, 1, 2, 3}

    steps = np.arange(4, dtype=np.float32)  # one episode; values = step index + 100 · column
    obs = np.repeat(steps[:, None], 6, axis=1) + np.arange(6)[None] * 100
    demos = demos_lib.Demos(obs, np.repeat(steps[:, None], 4, axis=1), np.asarray([4]), {})
    ident = policy_nets.Normalizer(np.zeros(6, np.float32), np.ones(6, np.float32))
    ident_a = policy_nets.Normalizer(np.zeros(4, np.float32), np.ones(4, np.float32))
    obs_NTO, _ = windows(demos, ident, ident_a, obs_horizon=1, action_horizon=2, offsets=1, robot_state_rows=rows)
    assert np.all(obs_NTO[4 + 1, -1, :3] == obs[2, :3])  # step 1's window, offset 1: the hand of step 2
    assert np.all(obs_NTO[4 + 1, -1, 3:] == obs[1, 3:])  # the gripper opening as observed at step 1


def test_frozen_plans_are_the_running_chunk_aligned_to_each_step():
    """REMAC's source for step t is the chunk planned s steps earlier (clamped to
    the episode's first step), read from the row for step t on, its tail
    repeating its last row. A fake frozen policy plans action = its newest
    observation's step index + row, so the right plan for t reads t, t+1, …"""
    import dataclasses

    import jax.numpy as jnp

    from atoll.core import policy as policy_nets
    from atoll.data import demos as demos_lib

    @dataclasses.dataclass(frozen=True)
    class Planner:
        obs_horizon: int = 2
        action_horizon: int = 6

        def act(self, weights, obs_BTO, key):
            return obs_BTO[:, -1, :1, None] + jnp.arange(self.action_horizon, dtype=jnp.float32)[None, :, None]

    steps = np.arange(9, dtype=np.float32)  # episodes of 5 and 4 steps; observation = global step index
    demos = demos_lib.Demos(np.repeat(steps[:, None], 3, axis=1), np.zeros((9, 1), np.float32), np.asarray([5, 9]),
                            {})
    ident = policy_nets.Normalizer(np.zeros(1, np.float32), np.ones(1, np.float32))
    plans_NHA = train_policy.frozen_plans(demos, Planner(), {}, ident, execute_steps=2, action_horizon=4, seed=0,
                                          batch=4)
    assert plans_NHA.shape == (9, 4, 1)
    for t in range(9):
        first = 0 if t < 5 else 5
        stale = max(t - 2, first)
        rows = [stale + min(t - stale + i, 5) for i in range(4)]  # the frozen chunk has 6 rows
        assert plans_NHA[t, :, 0].tolist() == rows, t
    assert train_policy.stale_steps([5, 9], 2).tolist() == [0, 0, 0, 1, 2, 5, 5, 5, 6]
