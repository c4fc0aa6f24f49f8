"""Simulated inference latency for chunk policies on the JAX task suite.

`async_rollout` runs any execution strategy of atoll.core.chunking at a delay
of d control steps, fixed or drawn per chunk from a distribution, inside one
jitted `lax.scan` over chunks (and one over the s steps of each), vmapped over
thousands of episodes. The episodes are the ones `jax_tasks.rollout` draws
from the same key (same resets, same action noise), so strategies, delays
and the expert compare episode by episode; at d = 0 the naive strategy is
exactly `jax_tasks.chunked_rollout`.

Timeline of one cycle c (t_c = c·s): the observation history at t_c goes to
the policy; its chunk arrives d steps later; meanwhile the running chunk
continues (asynchronous strategies) or everything waits (sync: the world is
paused too, so sync pays in time, never in success). The episode's first chunk
is computed before its clock starts, so cycle 0 has no delay. Per episode:

  success, length   as `rollout` (steps until the criterion first held)
  time              seconds of wall clock: (length + steps spent waiting)·dt;
                    only sync waits
  jerk              mean |change of the commanded action| per second over the
                    steps taken (Task.action_jerk; for these tasks m/s³)

Delay: `delay` is an int d, or a tuple of probabilities over d = 0, 1, ...
(e.g. (0, 0.5, 0.5) draws d ∈ {1, 2}); the policy is told the largest
possible delay (d_plan), as RTC's forecast from a delay buffer would.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from atoll.core import chunking
from atoll.envs import jax_tasks

# (weights, obs_ETO, running_EHA, d_plan, first, key) -> chunk_EHA, raw units
AsyncActFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


class LatencyEpisodes(NamedTuple):
    success: jax.Array  # [E] bool
    length: jax.Array  # [E] int32 steps
    time: jax.Array  # [E] seconds
    jerk: jax.Array  # [E] mean jerk over the steps taken
    actions_TA: jax.Array | None = None  # [E, T, A] executed (pre-noise) actions, on request


def delay_probs(delay: int | tuple[float, ...]) -> tuple[float, ...]:
    """A delay as probabilities over d = 0..d_plan (an int d is certain)."""
    if isinstance(delay, int) and not isinstance(delay, bool):
        if delay < 0:
            raise ValueError(f"delay d = {delay} must be >= 0")
        return tuple(1.0 if i == delay else 0.0 for i in range(delay + 1))
    probs = tuple(float(p) for p in delay)
    if not probs or any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
        raise ValueError(f"delay {delay!r} must be an int or probabilities over d = 0, 1, ... summing to 1")
    while probs[-1] == 0:
        probs = probs[:-1]
    return probs


def async_rollout(
    task: jax_tasks.Task,
    strategy: chunking.Strategy,
    act_fn: AsyncActFn,
    key: jax.Array,
    num_episodes: int,
    *,
    weights: Any,
    obs_horizon: int,
    horizon: int,
    execute_steps: int,
    delay: int | tuple[float, ...] = 0,
    sample_steps: int = 1,
    trajectory: bool = False,
) -> LatencyEpisodes:
    """num_episodes episodes of `strategy` at the given delay (see the module
    docstring). act_fn must return chunks of `horizon` actions; sample_steps is
    the policy's sampler steps n (FASTER's readiness needs it). The delay is a
    traced input: every delay up to the chunk length reuses one compiled program."""
    probs = delay_probs(delay)
    chunking.check_horizons(strategy.name, len(probs) - 1, execute_steps, horizon)
    probs_P = jnp.zeros((horizon + 1,)).at[:len(probs)].set(jnp.asarray(probs, jnp.float32))
    return _async_rollout(task, strategy, act_fn, key, num_episodes, weights, probs_P, obs_horizon=obs_horizon,
                          horizon=horizon, execute_steps=execute_steps, sample_steps=sample_steps,
                          trajectory=trajectory)


@functools.partial(jax.jit, static_argnames=("task", "strategy", "act_fn", "num_episodes", "obs_horizon",
                                             "horizon", "execute_steps", "sample_steps", "trajectory"))
def _async_rollout(task, strategy, act_fn, key, num_episodes, weights, probs_P, *, obs_horizon, horizon,
                   execute_steps, sample_steps, trajectory):
    H, s, E, T = horizon, execute_steps, num_episodes, task.max_steps
    d_plan = jnp.max(jnp.where(probs_P > 0, jnp.arange(probs_P.shape[0]), 0))
    n_chunks = -(-T // s)
    reset_keys_E, env_keys_CSE, policy_keys_C = jax_tasks.chunk_keys(key, E, T, s)
    d_CE = jax.random.categorical(jax.random.fold_in(key, 0xDE1A), jnp.log(probs_P), shape=(n_chunks, E))

    state = jax.vmap(task.reset)(reset_keys_E)
    obs_ED = jax.vmap(task.observe)(state)
    A = task.action_dim
    K = chunking.ensemble_slots(H, s) - 1
    carry = {
        "state": state, "hist": jnp.repeat(obs_ED[:, None], obs_horizon, axis=1),
        "running": jnp.zeros((E, H, A)), "buffer": jnp.zeros((E, K, H, A)), "valid": jnp.zeros((E, K, H), bool),
        "success": jnp.zeros((E,), bool), "length": jnp.full((E,), T, jnp.int32), "waits": jnp.zeros((E,), jnp.int32),
        "jerk_sum": jnp.zeros((E,)), "jerk_steps": jnp.zeros((E,), jnp.int32), "last": jnp.zeros((E, A)),
    }

    def one_step(carry, inputs):
        action_EA, env_keys_E, i = inputs
        live = i < T
        new = jax.vmap(task.step)(carry["state"], action_EA, env_keys_E)
        state = jax.tree.map(lambda a, b: jnp.where(live, a, b), new, carry["state"])
        counted = live & ~carry["success"]
        jerk = jnp.where(counted & (i > 0), task.action_jerk(carry["last"], action_EA), 0.0)
        now = jax.vmap(task.success)(state) & live
        out = dict(carry, state=state, last=action_EA,
                   length=jnp.where(now & ~carry["success"], i + 1, carry["length"]),
                   success=carry["success"] | now,
                   jerk_sum=carry["jerk_sum"] + jerk,
                   jerk_steps=carry["jerk_steps"] + (counted & (i > 0)).astype(jnp.int32),
                   hist=jnp.concatenate([carry["hist"][:, 1:], jax.vmap(task.observe)(state)[:, None]], axis=1))
        return out, (action_EA if trajectory else None)

    def one_cycle(carry, inputs):
        env_keys_SE, policy_key, c, d_E = inputs
        first = c == 0
        d_E = jnp.where(first, 0, d_E)
        dp = jnp.where(first, 0, d_plan)
        obs_ETO = carry["hist"]
        if strategy.name == "vlash":
            rolled = jax.vmap(task.roll_forward, in_axes=(0, 0, None))(obs_ETO[:, -1], carry["running"], dp)
            obs_ETO = obs_ETO.at[:, -1].set(rolled)
        new_EHA = act_fn(weights, obs_ETO, carry["running"], dp, first, policy_key)
        if new_EHA.shape[1] != H:
            raise ValueError(f"the policy returns chunks of {new_EHA.shape[1]} actions, not horizon = {H}")
        running = jnp.where(first, new_EHA, carry["running"])
        carry = dict(carry)
        if strategy.name == "temporal_ensemble":
            run_ESA, carry["buffer"], carry["valid"] = chunking.ensemble_actions(
                carry["buffer"], carry["valid"], new_EHA, d_E, s, strategy.te_decay)
        else:
            ready = None
            if strategy.name == "faster":
                _, _, ready = chunking.faster_plan(strategy, jnp.full((E,), dp), d_E, H, sample_steps)
            run_ESA, carry["running"] = chunking.cycle_actions(strategy, running, new_EHA, d_E, s, d_plan=dp,
                                                               ready_BH=ready)
        if strategy.name == "sync":
            carry["waits"] = carry["waits"] + jnp.where(carry["success"], 0, d_E)
        steps = (jnp.swapaxes(run_ESA, 0, 1).astype(jnp.float32), env_keys_SE, c * s + jnp.arange(s))
        return jax.lax.scan(one_step, carry, steps)

    carry, actions = jax.lax.scan(one_cycle, carry, (env_keys_CSE, policy_keys_C, jnp.arange(n_chunks), d_CE))
    time_E = (carry["length"] + carry["waits"]).astype(jnp.float32) * task.dt
    jerk_E = carry["jerk_sum"] / jnp.maximum(carry["jerk_steps"], 1)
    if not trajectory:
        return LatencyEpisodes(carry["success"], carry["length"], time_E, jerk_E)
    actions_TEA = actions.reshape((n_chunks * s,) + actions.shape[2:])[:T]
    return LatencyEpisodes(carry["success"], carry["length"], time_E, jerk_E, jnp.swapaxes(actions_TEA, 0, 1))


def policy_act_fn(policy, strategy: chunking.Strategy, execute_steps: int) -> AsyncActFn:
    """A ChunkPolicy under `strategy` as async_rollout's act_fn (one object per
    (policy, strategy, s), so repeated rollouts reuse the compiled program)."""
    return _policy_act_fn(policy, strategy, execute_steps)


@functools.lru_cache(maxsize=64)
def _policy_act_fn(policy, strategy, execute_steps):
    def act(weights, obs_ETO, running_EHA, d_plan, first, key):
        return policy.act_with(strategy, execute_steps, weights, obs_ETO, running_EHA, d_plan, first, key)

    return act


# ------------------------------------------------------------------ Meta-World


def metaworld_async_episodes(task: str, strategy: chunking.Strategy, act_fn: AsyncActFn, weights: Any, *,
                             episodes: int, seed: int, obs_horizon: int, horizon: int, execute_steps: int,
                             delay: int | tuple[float, ...] = 0, sample_steps: int = 1, max_steps: int = 500,
                             batch: int = 25, progress: bool = False) -> dict[str, np.ndarray]:
    """The same timeline as `async_rollout` in Meta-World (MuJoCo on the CPU,
    `batch` environments in lockstep, one sampler call per cycle for all of
    them): per episode success, length, time (s) and jerk of the commanded hand
    path (metaworld.action_jerk, m/s³). Episodes 0..episodes-1 of `seed`
    (EnvBatch's), delays drawn per block of `batch` episodes from a generator
    seeded with (seed, the block's first episode), so every strategy sees the
    same delays cycle by cycle however long its other blocks run. VLASH rolls
    the hand position forward (metaworld.roll_forward)."""
    from tqdm.auto import tqdm

    from atoll.core import chunk_policy
    from atoll.envs import metaworld

    probs = delay_probs(delay)
    d_plan = len(probs) - 1
    H, s = horizon, execute_steps
    chunking.check_horizons(strategy.name, d_plan, s, H)
    key = jax.random.key(seed)
    out = {"success": np.zeros(episodes, bool), "length": np.full(episodes, max_steps, np.int64),
           "time": np.zeros(episodes), "jerk": np.zeros(episodes)}
    bar = tqdm(total=episodes, desc=f"{task} {strategy.name} d={delay}", unit="ep", disable=not progress,
               leave=False)
    with metaworld.EnvBatch(task, seed, min(batch, episodes), max_steps) as envs:
        dt = envs.envs[0].dt
        for start in range(0, episodes, batch):
            ids = np.arange(start, min(start + batch, episodes))
            rng = np.random.default_rng([seed, start])
            B, A = len(ids), envs.action_dim
            obs_BO = np.asarray(envs.reset(list(ids)), np.float32)
            hist = chunk_policy.history_init(obs_BO, obs_horizon)
            running = np.zeros((B, H, A), np.float32)
            K = chunking.ensemble_slots(H, s) - 1
            buffer, valid = np.zeros((B, K, H, A), np.float32), np.zeros((B, K, H), bool)
            success, done = np.zeros(B, bool), np.zeros(B, bool)
            length, waits = np.full(B, max_steps, np.int64), np.zeros(B, np.int64)
            jerk_sum, jerk_n = np.zeros(B), np.zeros(B, np.int64)
            recent: list[np.ndarray] = []  # the last two executed actions
            t, c = 0, 0
            while t < max_steps and not done.all():
                first = c == 0
                d_B = np.zeros(B, np.int64) if first else rng.choice(len(probs), size=B, p=probs)
                dp = 0 if first else d_plan
                obs_in = hist.copy()
                if strategy.name == "vlash":
                    obs_in[:, -1] = [metaworld.roll_forward(o, r, dp) for o, r in zip(hist[:, -1], running)]
                new = np.asarray(act_fn(weights, jnp.asarray(obs_in), jnp.asarray(running), jnp.asarray(dp),
                                        jnp.asarray(first), jax.random.fold_in(jax.random.fold_in(key, start), t)))
                if first:
                    running = new
                if strategy.name == "temporal_ensemble":
                    run, buffer, valid = (np.asarray(x) for x in chunking.ensemble_actions(
                        buffer, valid, new, d_B, s, strategy.te_decay))
                else:
                    ready = None
                    if strategy.name == "faster":
                        ready = chunking.faster_plan(strategy, np.full(B, dp), d_B, H, sample_steps)[2]
                    run, running = (np.asarray(x) for x in chunking.cycle_actions(
                        strategy, running, new, d_B, s, d_plan=dp, ready_BH=ready))
                if strategy.name == "sync" and not first:
                    waits += np.where(done, 0, d_B)
                for j in range(min(s, max_steps - t)):
                    action = run[:, j]
                    live = ~done
                    if len(recent) == 2:
                        jerks = [metaworld.action_jerk(recent[0][i], recent[1][i], action[i], dt) for i in range(B)]
                        jerk_sum += np.where(live, jerks, 0.0)
                        jerk_n += live
                    recent = (recent + [action])[-2:]
                    obs_BO, succ, done = envs.step(action)
                    t += 1
                    newly = np.asarray(succ, bool) & ~success
                    length[newly] = t
                    success |= np.asarray(succ, bool)
                    hist = chunk_policy.history_push(hist, np.asarray(obs_BO, np.float32))
                    if done.all():
                        break
                c += 1
            out["success"][ids], out["length"][ids] = success, length
            out["time"][ids] = (length + waits) * dt
            out["jerk"][ids] = jerk_sum / np.maximum(jerk_n, 1)
            bar.update(B)
    bar.close()
    return out
