"""Simulated inference delay on the JAX task suite (atoll.envs.latency)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atoll.core import chunk_policy, chunking
from atoll.envs import jax_tasks, latency

H, S, E = 8, 4, 64
TASK = jax_tasks.make_task("intercept", max_steps=100)


@functools.lru_cache(maxsize=None)
def expert_planner(task, horizon):
    """A chunk policy without learning: the expert rolled through the known
    dynamics (target at constant velocity) from the newest observation."""
    def plan(obs_D):
        def body(o, _):
            a = task.expert(o)
            pos, vel = task.move_agent(o[0:2], o[2:4], a)
            tpos, tvel = task.move_target(o[4:6], o[6:8])
            return jnp.concatenate([pos, vel, tpos, tvel]), a

        return jax.lax.scan(body, obs_D, None, length=horizon)[1]

    def act(weights, obs_ETO, running_EHA, d_plan, first, key):
        return jax.vmap(plan)(obs_ETO[:, -1])

    return act


def run(strategy="naive_async", delay=0, task=TASK, act=None, weights=None, trajectory=True):
    """Always with the trajectory (one compiled program per strategy and act for all these tests:
    success, length, time and jerk are computed the same way without it)."""
    return latency.async_rollout(task, chunking.Strategy(strategy), act or expert_planner(task, H), jax.random.key(7),
                                 E, weights=weights, obs_horizon=2, horizon=H, execute_steps=S, delay=delay,
                                 trajectory=trajectory)


def test_naive_at_zero_delay_is_chunked_rollout():
    plan = expert_planner(TASK, H)
    ref = jax_tasks.chunked_rollout(TASK, lambda w, o, k: plan(w, o, None, 0, True, k), jax.random.key(7), E,
                                    weights=None, obs_horizon=2, execute_steps=S, trajectory=True)
    got = run(trajectory=True)
    np.testing.assert_array_equal(got.success, ref.success)
    np.testing.assert_array_equal(got.length, ref.length)
    # two programs, compiled apart: the same actions up to float rounding (XLA may fuse them differently)
    np.testing.assert_allclose(got.actions_TA, ref.actions_TA, atol=1e-5)
    np.testing.assert_allclose(got.time, np.asarray(ref.length) * TASK.dt, rtol=1e-6)
    assert float(np.mean(got.success)) >= 0.9  # the planner is a working policy


def test_sync_pays_in_time_not_success():
    base, sync = run(), run("sync", delay=3)
    np.testing.assert_array_equal(sync.success, base.success)
    np.testing.assert_array_equal(sync.length, base.length)
    waits = 3 * (np.ceil(np.asarray(base.length) / S) - 1)
    np.testing.assert_allclose(sync.time, (np.asarray(base.length) + waits) * TASK.dt, rtol=1e-6)


def test_stale_chunks_cost_success():
    """The intercept task punishes running old plans: naive asynchronous execution
    at d = 4 succeeds less often than at d = 0 on the same episodes."""
    assert float(np.mean(run(delay=4).success)) < float(np.mean(run().success)) - 0.1


def test_a_certain_delay_equals_its_distribution():
    a, b = run(delay=2, trajectory=True), run(delay=(0.0, 0.0, 1.0), trajectory=True)
    np.testing.assert_array_equal(a.actions_TA, b.actions_TA)
    assert latency.delay_probs((0.5, 0.5, 0.0)) == (0.5, 0.5)
    with pytest.raises(ValueError, match="summing to 1"):
        latency.delay_probs((0.5, 0.4))
    mixed = run(delay=(0.5, 0.0, 0.5))
    assert mixed.success.shape == (E,)


def test_vlash_at_zero_delay_is_naive():
    np.testing.assert_array_equal(run("vlash", trajectory=True).actions_TA, run(trajectory=True).actions_TA)


def _fixed_rows(weights, obs_ETO, running, d_plan, first, key):
    """Every chunk is `weights` (H values, both action axes): traced, so one compiled rollout serves both rows."""
    return jnp.broadcast_to(weights[None, :, None], (obs_ETO.shape[0], H, 2))


def test_jerk_of_constant_and_alternating_actions():
    constant = np.full(H, 0.5, np.float32)
    alternating = np.where(np.arange(H) % 2 == 0, 1.0, -1.0).astype(np.float32)
    assert float(jnp.max(run(act=_fixed_rows, weights=constant).jerk)) == 0.0
    want = TASK.accel_max * 2 * math.sqrt(2) / TASK.dt  # the action flips by 2 in both axes every step
    np.testing.assert_allclose(run(act=_fixed_rows, weights=alternating).jerk, want, rtol=1e-5)


def test_invariant_errors_reach_the_caller():
    with pytest.raises(ValueError, match="d <= s"):
        run(delay=5)


def test_roll_forward_is_the_state_the_chunk_reaches():
    task = jax_tasks.make_task("intercept")
    state = task.reset(jax.random.key(3))
    actions = jax.random.uniform(jax.random.key(4), (6, 2), minval=-1.2, maxval=1.2)
    obs0 = task.observe(state)
    step, roll_forward = jax.jit(task.step), jax.jit(task.roll_forward)  # one compile each, not one per op
    for n in range(7):
        s = state
        for k in range(n):
            s = step(s, actions[k], jax.random.key(0))
        rolled = roll_forward(obs0, actions, n)
        np.testing.assert_allclose(rolled[:4], task.observe(s)[:4], atol=1e-6)
        np.testing.assert_array_equal(rolled[4:], obs0[4:])  # the target is as observed


@functools.lru_cache(maxsize=None)
def _tiny_policy():
    obj = chunk_policy.Objective(kind="flow", sample_steps=3)
    model = chunk_policy.make_denoiser("dit", 2, obj, dim=16, depth=1, heads=2)
    policy = chunk_policy.ChunkPolicy(model, obj, obs_horizon=2, action_horizon=H, action_dim=2)
    # Random weights drawn with numpy on the model's shapes: flax's init, run eagerly, compiles op by op.
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, H, 2)), jnp.zeros((1, H)),
                            jnp.zeros((1, 2, 8)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (rng.normal(0, 0.3, x.shape)).astype(x.dtype), shapes)
    ident = {"offset_D": np.zeros(8, np.float32), "scale_D": np.ones(8, np.float32)}
    weights = {"params": params, "obs_norm": ident,
               "act_norm": {"offset_D": np.zeros(2, np.float32), "scale_D": np.ones(2, np.float32)}}
    return policy, jax.device_put(weights)


def test_strategies_with_their_own_sampler_run_a_policy():
    """An untrained flow DiT under the strategies whose sampling differs (RTC's
    guidance, prefix inpainting, FASTER's clocks) and the ensemble's buffer:
    sampler, bookkeeping and rollout compile together and give finite numbers
    (the others run the plain sampler, exercised above with a planner)."""
    policy, weights = _tiny_policy()
    short = jax_tasks.make_task("intercept", max_steps=12)
    for name in ("rtc", "prefix", "faster", "temporal_ensemble"):
        strategy = chunking.Strategy(name)
        act = latency.policy_act_fn(policy, strategy, S)
        out = latency.async_rollout(short, strategy, act, jax.random.key(0), 4, weights=weights, obs_horizon=2,
                                    horizon=H, execute_steps=S, delay=2, sample_steps=3)
        assert out.success.shape == (4,) and np.all(np.isfinite(np.asarray(out.jerk))), name
