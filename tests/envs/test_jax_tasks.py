import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atoll.envs import jax_tasks as jt


E = 1024  # episodes per measurement
MAX_DELAY = 10


@functools.partial(jax.jit, static_argnames=("task", "num_episodes"))
def delayed_expert(task, key, delay, compensate, gain, num_episodes=E):
    """The expert acting at step t on the observation of step t - delay (the first
    observation stands in before that), its action scaled by `gain` (0: the
    do-nothing policy). With `compensate`, it first predicts the present: it
    replays its own last `delay` actions through the agent's dynamics and moves
    the target on at its observed velocity, which is exact unless the target
    re-steered in between. delay, compensate and gain are traced, so one
    compile per task serves them all (compiling dominates these tests); pass all
    of them, as leaving one to its default would compile again."""
    move_target = getattr(task, "move_target", lambda p, v: (p + task.dt * v, v))

    def init(obs_D):
        return jnp.repeat(obs_D[None], MAX_DELAY + 1, axis=0), jnp.zeros((MAX_DELAY, 2))

    def policy(carry, obs_D, key):
        obs_buf_ND, act_buf_MA = carry  # obs t-MAX_DELAY..t, actions t-MAX_DELAY..t-1
        obs_buf_ND = jnp.concatenate([obs_buf_ND[1:], obs_D[None]])
        old_D = obs_buf_ND[MAX_DELAY - delay]
        now = (old_D[0:2], old_D[2:4], old_D[4:6], old_D[6:8])

        def predict(i, now):
            pos, vel = task.move_agent(now[0], now[1], act_buf_MA[MAX_DELAY - delay + i])
            nxt = (pos, vel) + move_target(now[2], now[3])
            return jax.tree.map(lambda a, b: jnp.where(compensate & (i < delay), a, b), nxt, now)

        now = jax.lax.fori_loop(0, MAX_DELAY, predict, now)
        action_A = gain * task.expert(jnp.concatenate(now))
        act_buf_MA = jnp.concatenate([act_buf_MA[1:], jnp.clip(action_A, -1, 1)[None]])
        return (obs_buf_ND, act_buf_MA), action_A

    episode = functools.partial(jt.scan_episode, task, policy, policy_init=init, trajectory=True)
    return jax.vmap(episode)(jax.random.split(key, num_episodes))


@pytest.mark.parametrize("name", ["intercept", "waypoints"])
def test_expert_succeeds_zero_policy_fails_and_stale_expert_does_worse(name):
    task = jt.make_task(name)
    key = jax.random.key(0)
    expert = delayed_expert(task, key, 0, False, 1.0)
    zero = delayed_expert(task, key, 0, False, 0.0)
    assert expert.success.shape == (E,) and expert.length.shape == (E,)
    assert np.all(np.asarray(zero.actions_TA) == 0)
    assert float(expert.success.mean()) >= 0.95
    assert float(zero.success.mean()) < 0.2
    assert np.all(np.asarray(zero.length)[~np.asarray(zero.success)] == task.max_steps)
    assert expert.obs_TD.shape == (E, task.max_steps, task.obs_dim)
    assert expert.actions_TA.shape == (E, task.max_steps, task.action_dim)

    stale = delayed_expert(task, key, MAX_DELAY, False, 1.0)
    drop = float(expert.success.mean() - stale.success.mean())
    slower = float(stale.length.mean() / expert.length.mean())
    assert drop >= 0.10, drop
    if name == "intercept":  # (waypoints cannot succeed before required_steps, so lengths barely move)
        assert slower >= 1.5, slower


def test_intercept_success_and_lengths_follow_the_trajectory():
    task = jt.make_task("intercept")
    ep = delayed_expert(task, jax.random.key(0), 0, False, 1.0)
    obs_ETD = np.asarray(ep.obs_TD)
    # Observation t is the state after t steps; the catch is judged on states 1..T.
    after_ETD = np.concatenate([obs_ETD[:, 1:], np.full_like(obs_ETD[:, :1], np.nan)], axis=1)
    dist_ET = np.linalg.norm(after_ETD[..., 4:6] - after_ETD[..., 0:2], axis=-1)
    rel_speed_ET = np.linalg.norm(after_ETD[..., 6:8] - after_ETD[..., 2:4], axis=-1)
    caught_ET = (dist_ET < task.catch_tol) & (rel_speed_ET < task.catch_speed_tol)
    first_E = np.where(caught_ET.any(1), caught_ET.argmax(1) + 1, task.max_steps)
    ok_E = np.asarray(ep.length) < task.max_steps  # the last state is not in obs_TD
    np.testing.assert_array_equal(np.asarray(ep.length)[ok_E], first_E[ok_E])
    assert ok_E.mean() > 0.9


def test_waypoints_success_needs_the_required_number_of_steps_on_track():
    task = jt.make_task("waypoints")
    ep = delayed_expert(task, jax.random.key(0), 0, False, 1.0)
    assert task.required_steps == math.ceil(task.required_fraction * task.max_steps)
    assert np.all(np.asarray(ep.length)[np.asarray(ep.success)] >= task.required_steps)


def test_random_switches_are_what_punishes_a_perfectly_compensated_delay():
    key = jax.random.key(1)
    calm = jt.make_task("intercept", switch_rate=0.0)
    fresh = delayed_expert(calm, key, 0, True, 1.0)
    comp = delayed_expert(calm, key, MAX_DELAY, True, 1.0)
    naive = delayed_expert(calm, key, MAX_DELAY, False, 1.0)
    # Without switches the delay is fully predictable: compensation recovers the expert...
    assert float(comp.success.mean()) >= 0.95
    assert float(comp.length.mean()) <= 1.15 * float(fresh.length.mean())
    # ...which the naive stale expert does not: delayed feedback alone breaks it.
    assert float(naive.success.mean()) <= float(fresh.success.mean()) - 0.5

    task = jt.make_task("intercept")
    fresh = delayed_expert(task, key, 0, True, 1.0)
    comp = delayed_expert(task, key, MAX_DELAY, True, 1.0)
    assert float(comp.success.mean()) <= float(fresh.success.mean()) - 0.10
    assert float(comp.length.mean()) >= 1.5 * float(fresh.length.mean())


@functools.partial(jax.jit, static_argnames=("task",))
def _zero_action_episodes(task, keys):
    def episode(key):
        def body(state, _):
            state = task.step(state, jnp.zeros(2), key)
            return state, task.observe(state)

        state = task.reset(key)
        return state, jax.lax.scan(body, state, None, length=task.max_steps)[1]

    return jax.vmap(episode)(keys)


def test_target_switches_at_poisson_times_only_and_stays_in_the_arena():
    task = jt.make_task("intercept")
    start, obs_ETD = _zero_action_episodes(task, jax.random.split(jax.random.key(2), 256))
    speed_ET = np.linalg.norm(np.asarray(obs_ETD)[..., 6:8], axis=-1)
    speed_ET = np.concatenate([np.linalg.norm(np.asarray(start.target_vel_2), axis=-1)[:, None], speed_ET], 1)
    changed_ET = ~np.isclose(speed_ET[:, 1:], speed_ET[:, :-1], rtol=1e-6, atol=0)  # walls keep the speed
    steps_ES = np.asarray(start.switch_steps_S)
    assert len({tuple(row) for row in steps_ES}) == len(steps_ES)  # each key its own switch times
    expected_ET = (steps_ES[:, :, None] == np.arange(task.max_steps)[None, None, :]).any(1)
    np.testing.assert_array_equal(changed_ET, expected_ET)
    assert steps_ES[:, -1].min() >= task.max_steps  # enough slots: no switch is lost
    # Switch counts match the Poisson rate (intervals round up to whole steps).
    rate = expected_ET.sum(1).mean() / (task.max_steps * task.dt)
    assert 0.85 * task.switch_rate < rate < 1.05 * task.switch_rate
    assert speed_ET.min() >= task.target_speed_min - 1e-5 and speed_ET.max() <= task.target_speed_max + 1e-5
    assert np.abs(np.asarray(obs_ETD)[..., 4:6]).max() <= task.half_width + 1e-6


def test_same_key_same_episodes_and_policies_see_the_same_targets():
    task = jt.make_task("intercept")
    a = jt.rollout(task, jt.expert_policy(task), jax.random.key(3), E)
    b = jt.rollout(task, jt.expert_policy(task), jax.random.key(3), E)
    c = jt.rollout(task, jt.expert_policy(task), jax.random.key(4), E)
    np.testing.assert_array_equal(a.success, b.success)
    np.testing.assert_array_equal(a.length, b.length)
    assert not np.array_equal(a.length, c.length)
    assert a.obs_TD is None and float(a.success.mean()) >= 0.95
    # The environment's randomness does not depend on the policy: same targets.
    ep0 = delayed_expert(task, jax.random.key(3), 0, False, 1.0)
    ep10 = delayed_expert(task, jax.random.key(3), MAX_DELAY, False, 1.0)
    np.testing.assert_array_equal(ep0.obs_TD[..., 4:8], ep10.obs_TD[..., 4:8])
    # A stateful policy (carry, no delay) is the plain expert policy, episode for episode.
    np.testing.assert_array_equal(ep0.success, a.success)
    np.testing.assert_array_equal(ep0.length, a.length)
    assert not np.array_equal(ep0.obs_TD[:, 0, 4:6], np.roll(ep0.obs_TD[:, 0, 4:6], 1, axis=0))


def test_step_integrates_clips_actions_and_latches_the_catch():
    task = jt.make_task("intercept")
    S = task.num_switch_slots
    state = jt.InterceptState(  # built by hand (no random draws to compile), no switch due
        pos_2=jnp.array([0.1, -0.2]),
        vel_2=jnp.array([0.5, 0.0]),
        target_pos_2=jnp.array([0.6, 0.5]),
        target_vel_2=jnp.array([0.3, -0.4]),
        switch_steps_S=jnp.full((S,), 10_000, jnp.int32),
        switch_vel_S2=jnp.zeros((S, 2)),
        t=jnp.int32(0),
        caught=jnp.bool_(False),
    )
    key = jax.random.key(9)  # unused without action noise
    step = jax.jit(task.step)
    nxt = step(state, jnp.array([5.0, -0.5]), key)  # 5 is clipped to 1
    vel0, executed = np.array([0.5, 0.0]), np.array([1.0, -0.5])
    vel = vel0 + task.dt * (task.accel_max * executed - task.damping * vel0)
    np.testing.assert_allclose(nxt.vel_2, vel, rtol=1e-6)
    np.testing.assert_allclose(nxt.pos_2, np.array([0.1, -0.2]) + task.dt * vel, rtol=1e-6)
    np.testing.assert_allclose(nxt.target_pos_2, state.target_pos_2 + task.dt * state.target_vel_2, rtol=1e-6)
    assert int(nxt.t) == 1 and not bool(task.success(nxt))

    # A soft catch needs the velocity matched too; once caught, it stays caught.
    near = state._replace(pos_2=state.target_pos_2, vel_2=state.target_vel_2 + jnp.array([0.5, 0.0]))
    assert not bool(task.success(step(near, jnp.zeros(2), key)))
    near = near._replace(vel_2=state.target_vel_2)
    caught = step(near, task.expert(task.observe(near)), key)
    assert bool(task.success(caught))
    assert bool(task.success(step(caught._replace(pos_2=jnp.array([-0.9, -0.9])), jnp.zeros(2), key)))

    # A wall stops the agent.
    wall = step(state._replace(pos_2=jnp.array([0.999, 0.0]), vel_2=jnp.array([1.0, 0.0])), jnp.ones(2), key)
    assert float(wall.pos_2[0]) == task.half_width and float(wall.vel_2[0]) == 0.0


def test_action_noise_is_drawn_from_the_step_key_only_when_asked():
    quiet, noisy = jt.make_task("waypoints"), jt.make_task("waypoints", action_noise=0.1)
    step = jax.jit(lambda task, state, key: task.step(state, jnp.array([0.3, -0.2]), key).vel_2, static_argnums=0)
    state = quiet.reset(jax.random.key(0))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    np.testing.assert_array_equal(step(quiet, state, k1), step(quiet, state, k2))
    v1, v2 = step(noisy, state, k1), step(noisy, state, k2)
    assert not np.allclose(v1, v2)
    np.testing.assert_array_equal(v1, step(noisy, state, k1))
    assert 0.09 < float(jnp.std(noisy.execute(jnp.zeros((1000, 2)), k1))) < 0.11
    assert float(jnp.abs(noisy.execute(jnp.full((1000, 2), 0.95), k1)).max()) == 1.0  # clipped after the noise


def test_waypoint_goal_moves_along_the_polyline_at_constant_speed():
    task = jt.make_task("waypoints", goal_speed=0.6, dt=0.05)  # 0.03 m per step
    wp_K2 = jnp.array([[0.0, 0.0], [0.3, 0.0], [0.3, 0.6]])
    goal = jax.jit(task.goal)
    for t, pos, vel in [
        (0, [0.0, 0.0], [0.6, 0.0]),
        (5, [0.15, 0.0], [0.6, 0.0]),
        (11, [0.3, 0.03], [0.0, 0.6]),
        (15, [0.3, 0.15], [0.0, 0.6]),
        (31, [0.3, 0.6], [0.0, 0.0]),
        (100, [0.3, 0.6], [0.0, 0.0]),
    ]:
        g, v = goal(wp_K2, jnp.int32(t))
        np.testing.assert_allclose(g, pos, atol=1e-6, err_msg=f"t={t}")
        np.testing.assert_allclose(v, vel, atol=1e-6, err_msg=f"t={t}")
    state, obs_D = jax.jit(lambda key: (task.reset(key), task.observe(task.reset(key))))(jax.random.key(0))
    np.testing.assert_array_equal(state.pos_2, state.waypoints_K2[0])
    np.testing.assert_array_equal(obs_D[0:2], state.waypoints_K2[0])
    np.testing.assert_allclose(obs_D[4:6], state.waypoints_K2[0], atol=1e-6)  # the goal, interpolated at t = 0


def test_make_task_names_and_parameters_fail_clearly():
    assert isinstance(jt.make_task("intercept"), jt.InterceptTask)
    assert jt.make_task("waypoints", num_waypoints=3).num_waypoints == 3
    with pytest.raises(ValueError, match="intercept.*waypoints"):
        jt.make_task("pendulum")
    with pytest.raises(ValueError, match="catch_tol"):
        jt.make_task("intercept", catch_tol=-0.1)
    with pytest.raises(ValueError, match="no parameter.*catch_radius"):
        jt.make_task("intercept", catch_radius=0.1)
    with pytest.raises(ValueError, match="max_steps"):
        jt.make_task("waypoints", max_steps=0)
    with pytest.raises(ValueError, match="target_speed_max"):
        jt.make_task("intercept", target_speed_min=1.0, target_speed_max=0.5)
    with pytest.raises(ValueError, match="required_fraction"):
        jt.make_task("waypoints", required_fraction=1.5)


# ------------------------------------------------------- receding-horizon chunks


def test_chunked_rollout_with_one_step_chunks_is_the_step_policy_rollout():
    """s = H = 1 replans every step: the same episodes as `rollout` (same resets and
    noise from the same key), step for step."""
    task = jt.make_task("intercept", action_noise=0.1, max_steps=60)
    key = jax.random.key(3)
    ref = jt.rollout(task, jt.expert_policy(task), key, 16, trajectory=True)
    act = lambda w, obs_ETO, k: jax.vmap(task.expert)(obs_ETO[:, -1])[:, None, :]  # noqa: E731
    got = jt.chunked_rollout(task, act, key, 16, weights=None, obs_horizon=2, execute_steps=1, trajectory=True)
    np.testing.assert_array_equal(got.success, ref.success)
    np.testing.assert_array_equal(got.length, ref.length)
    np.testing.assert_allclose(got.obs_TD, ref.obs_TD, atol=1e-6)


def test_chunked_rollout_replans_every_s_steps_from_the_observation_history():
    """A chunk of H = 6 actions, s = 4 executed: the policy is called at steps 0, 4, 8, ...
    with the last T_o = 2 observations (the first repeated at the start); it returns
    the expert's action on the *older* observation plus the chunk position, so the
    executed actions show both when it replanned and what it saw."""
    task = jt.make_task("waypoints", max_steps=30)  # 30 is not a multiple of s: the tail chunk is cut
    H, s = 6, 4

    def act(w, obs_ETO, k):
        base = jax.vmap(task.expert)(obs_ETO[:, 0])
        return base[:, None, :] + 0.01 * jnp.arange(H, dtype=jnp.float32)[None, :, None]

    out = jt.chunked_rollout(task, act, jax.random.key(0), 8, weights=None, obs_horizon=2, execute_steps=s,
                             trajectory=True)
    obs, actions = np.asarray(out.obs_TD), np.asarray(out.actions_TA)  # [E, T, ...]
    assert obs.shape == (8, 30, 8) and actions.shape == (8, 30, 2)
    expert = np.asarray(jax.vmap(jax.vmap(task.expert))(jnp.asarray(obs)))
    for t in range(30):
        start = t - t % s
        older = max(start - 1, 0)  # T_o = 2: the history at a replan is (obs[start-1], obs[start])
        np.testing.assert_allclose(actions[:, t], expert[:, older] + 0.01 * (t - start), atol=1e-5)
    with pytest.raises(ValueError, match="chunks of 2 actions but executes 4"):
        jt.chunked_rollout(task, lambda w, o, k: jnp.zeros((o.shape[0], 2, 2)), jax.random.key(0), 2,
                           weights=None, obs_horizon=1, execute_steps=4)


def test_expert_demos_keep_successes_cut_at_their_first_success():
    task = jt.make_task("intercept", max_steps=80)
    key = jax.random.key(5)
    kept, rate = jt.expert_demos(task, key, 12)
    ref = jax.device_get(jt.rollout(task, jt.expert_policy(task), key, 12, trajectory=True))
    assert rate == pytest.approx(float(np.mean(ref.success))) and len(kept) == int(ref.success.sum())
    lengths = [int(n) for n, ok in zip(ref.length, ref.success) if ok]
    assert [len(o) for o, _ in kept] == lengths and all(len(a) == len(o) for o, a in kept)
