import sys

import numpy as np
import pytest

from atoll.data import demos as dl
from atoll.envs import metaworld as mw

try:
    import metaworld  # noqa: F401

    _IMPORT_ERROR = None
except ImportError as e:  # MuJoCo's failure to load surfaces here too
    _IMPORT_ERROR = e

needs_metaworld = pytest.mark.skipif(
    _IMPORT_ERROR is not None,
    reason=f"Meta-World/MuJoCo cannot import ({_IMPORT_ERROR}); pip install -e '.[robot]'",
)

TASK = "reach-v3"  # the cheapest task (about 40 steps per expert episode)
SHORT = 45  # max_steps at which the reach expert fails some episodes (seed 0: 3, 4, 6, 7, ...)


def test_missing_metaworld_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "metaworld.env_dict", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install -e '\.\[robot\]'"):
        mw.MetaWorldEnv(TASK)


@needs_metaworld
def test_task_names():
    names = mw.task_names()
    assert len(names) == 50 and set(mw.MT10_TASKS) <= set(names)
    assert mw.canonical_name("reach") == mw.canonical_name(" Reach-V3 ") == "reach-v3"
    assert mw.canonical_name("pick_place") == "pick-place-v3"
    with pytest.raises(ValueError, match="unknown Meta-World task 'reech'.*reach-v3"):
        mw.canonical_name("reech")
    with pytest.raises(ValueError, match="unknown"):
        mw.MetaWorldEnv("not-a-task")


def _expert_steps(env, obs_D, n):
    obs = [obs_D]
    for _ in range(n):
        obs_D, _, _ = env.step(env.expert_action(obs_D))
        obs.append(obs_D)
    return np.stack(obs)


@needs_metaworld
def test_reset_is_a_function_of_seed_and_episode():
    global_state = np.random.get_state()[1].copy()
    env = mw.MetaWorldEnv(TASK, seed=0)
    assert (env.obs_dim, env.action_dim) == (39, 4)
    obs_D = env.reset(3)
    assert obs_D.shape == (39,) and obs_D.dtype == np.float32
    path_TD = _expert_steps(env, obs_D, 10)
    assert not np.array_equal(env.reset(4), obs_D)  # another episode: another goal
    _expert_steps(env, env.reset(4), 20)  # leave the sim somewhere else
    np.testing.assert_array_equal(_expert_steps(env, env.reset(3), 10), path_TD)  # same env, later
    fresh = mw.MetaWorldEnv(TASK, seed=0)
    np.testing.assert_array_equal(_expert_steps(fresh, fresh.reset(3), 10), path_TD)  # another env
    other_seed = mw.MetaWorldEnv(TASK, seed=mw.EVAL_SEED)
    assert not np.array_equal(other_seed.reset(3), obs_D)
    # The goal (last 3 obs entries) is what varies, and nobody touched numpy's global RNG.
    goals = np.stack([env.reset(i)[-3:] for i in range(5)])
    assert len(np.unique(goals, axis=0)) == 5
    np.testing.assert_array_equal(np.random.get_state()[1], global_state)
    for e in (env, fresh, other_seed):
        e.close()


@needs_metaworld
def test_step_contract():
    with mw.MetaWorldEnv(TASK, seed=0, max_steps=3) as env:
        with pytest.raises(RuntimeError, match="reset"):
            env.step(np.zeros(4))
        env.reset(0)
        with pytest.raises(ValueError, match=r"shape \(4,\)"):
            env.step(np.zeros(3))
        with pytest.raises(ValueError, match="non-finite"):
            env.step(np.full(4, np.nan))
        dones = [env.step(np.full(4, 7.0))[2] for _ in range(3)]  # out-of-range actions are clipped
        assert dones == [False, False, True] and env.num_steps == 3
        with pytest.raises(RuntimeError, match="episode is over"):
            env.step(np.zeros(4))


@needs_metaworld
def test_reach_expert_succeeds():
    results = mw.run_expert(TASK, 3, seed=0)
    assert [r["episode"] for r in results] == [0, 1, 2]
    assert all(r["success"] for r in results)
    assert all(10 < r["length"] < 100 for r in results)


@needs_metaworld
def test_generate_demos_keeps_successes_truncated_at_first_success():
    demos = mw.generate_demos(TASK, 4, seed=0, max_steps=SHORT, progress=False)
    meta = demos.meta
    kept, tried = meta["episodes"], meta["expert_episodes"]
    assert demos.num_episodes == 4 == meta["expert_successes"] == len(kept)
    assert tried == kept[-1] + 1 and tried > 4, "with 45 steps the expert should fail some episodes"
    assert meta["expert_success_rate"] == pytest.approx(4 / tried)
    assert (meta["task"], meta["seed"], meta["max_steps"]) == (TASK, 0, SHORT)
    assert set(meta["versions"]) == {"metaworld", "mujoco", "gymnasium", "numpy"}
    assert meta["versions"]["metaworld"] != "not installed"
    assert (demos.obs_dim, demos.action_dim) == (39, 4)
    # The skipped episodes really fail ...
    skipped = sorted(set(range(tried)) - set(kept))
    assert not any(r["success"] for r in mw.run_expert(TASK, skipped, seed=0, max_steps=SHORT))
    # ... and every kept episode, replayed from the same reset, succeeds first at its last step.
    with mw.MetaWorldEnv(TASK, seed=0, max_steps=SHORT) as env:
        for i, episode in enumerate(kept):
            obs_TD, actions_TA = demos.episode(i)
            obs_D = env.reset(episode)
            successes = []
            for obs_ref_D, action_A in zip(obs_TD, actions_TA):
                np.testing.assert_array_equal(obs_D, obs_ref_D)
                obs_D, success, done = env.step(action_A)
                successes.append(success)
            assert successes[-1] and not any(successes[:-1]) and done


@needs_metaworld
def test_generate_demos_reports_the_measured_rate_when_short():
    with pytest.raises(RuntimeError, match=r"succeeded on 0 of 2 episodes \(0%\)"):
        mw.generate_demos(TASK, 1, seed=0, max_steps=5, max_episodes=2, progress=False)


@needs_metaworld
def test_demos_cached(tmp_path, monkeypatch):
    demos = mw.demos_cached("reach", 1, seed=0, cache_dir=tmp_path, progress=False)
    path = tmp_path / "reach-v3-s0-n1.npz"
    assert path.is_file()

    def no_generation(*args, **kwargs):
        raise AssertionError("should have loaded the cache")

    monkeypatch.setattr(mw, "generate_demos", no_generation)
    again = mw.demos_cached("reach-v3", 1, seed=0, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.actions_NA, demos.actions_NA)
    assert again.meta == demos.meta
    dl.save_demos(tmp_path / "reach-v3-s1-n1.npz", demos)  # a file under the wrong name
    with pytest.raises(ValueError, match="move it away"):
        mw.demos_cached("reach-v3", 1, seed=1, cache_dir=tmp_path)


@needs_metaworld
def test_env_batch_matches_single_envs():
    episodes = [0, 3, 5]  # with SHORT steps: success, failure, success (seed 0)
    single = mw.run_expert(TASK, episodes, seed=0, max_steps=SHORT, record=True)
    with mw.EnvBatch(TASK, seed=0, num_envs=4, max_steps=SHORT) as batch:
        obs_BD = batch.reset(episodes)
        assert obs_BD.shape == (3, 39)
        history = [obs_BD]
        done_B = np.zeros(3, bool)
        while not done_B.all():
            obs_BD, success_B, done_B = batch.step(batch.expert_actions(obs_BD))
            history.append(obs_BD)
        history_TBD = np.stack(history)
        assert batch.steps_B.tolist() == [r["length"] for r in single]
        assert success_B.tolist() == [r["success"] for r in single] == [True, False, True]
        for b, r in enumerate(single):
            length = r["length"]
            np.testing.assert_array_equal(history_TBD[:length, b], r["obs_TD"])
            assert np.all(history_TBD[length:, b] == history_TBD[length, b])  # frozen once done
        obs_again, success_again, _ = batch.step(np.zeros((3, 4)))  # all done: nothing moves
        np.testing.assert_array_equal(obs_again, obs_BD)
        assert success_again.tolist() == success_B.tolist()
        assert batch.reset([7, 8]).shape == (2, 39)  # fewer episodes than envs
        with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
            batch.step(np.zeros((3, 4)))
        with pytest.raises(ValueError, match="1..4 episodes"):
            batch.reset(range(5))


@needs_metaworld
def test_delay_simulation_in_metaworld():
    """The Meta-World timeline of the delay simulator: at d = 0 naive execution is
    eval_policy's receding-horizon loop, episode for episode; sync at d = 3 has
    the same episodes, 3 waiting steps per chunk after the first; the hand
    roll-forward adds the actions' offsets."""
    import jax.numpy as jnp

    from atoll.core import chunking
    from atoll.envs import latency
    from atoll.experiments import eval_policy

    env = mw.MetaWorldEnv(TASK)

    def expert_chunk(weights, obs_BTO, key):  # the expert's action for the newest observation, held
        a = np.stack([env.expert_action(o) for o in np.asarray(obs_BTO)[:, -1]])
        return jnp.asarray(np.repeat(a[:, None], 4, axis=1))

    def act(weights, obs_BTO, running, d_plan, first, key):
        return expert_chunk(weights, obs_BTO, key)

    kw = dict(episodes=3, seed=1000, obs_horizon=2, max_steps=120)
    succ, length = eval_policy.evaluate_metaworld(TASK, expert_chunk, None, execute_steps=2, **kw)
    naive = latency.metaworld_async_episodes(TASK, chunking.Strategy("naive_async"), act, None, horizon=4,
                                             execute_steps=2, **kw)
    np.testing.assert_array_equal(naive["success"], succ)
    np.testing.assert_array_equal(naive["length"], length)
    assert succ.all() and np.all(naive["jerk"] >= 0)
    sync = latency.metaworld_async_episodes(TASK, chunking.Strategy("sync"), act, None, horizon=4, execute_steps=2,
                                            delay=2, **kw)
    np.testing.assert_array_equal(sync["length"], length)
    np.testing.assert_allclose(sync["time"], (length + 2 * (np.ceil(length / 2) - 1)) * env.dt)
    rolled = mw.roll_forward(np.zeros(39, np.float32), np.asarray([[1, 0, -2, 1], [1, 1, 0, 0], [5, 5, 5, 5]]), 2)
    np.testing.assert_allclose(rolled[:4], [0.02, 0.01, -0.01, 0.0])
    env.close()
