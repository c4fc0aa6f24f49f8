"""Point-mass tasks in pure JAX for benchmarking real-time, chunked policies.

Thousands of episodes run in parallel with `jax.vmap` over episodes and
`jax.lax.scan` over steps (`rollout`, `scan_episode`). Each task has a scripted
expert (a pure function of the observation, so it is also a demonstrator and a
policy) and an episode-level success criterion. The dynamics punish stale
actions, so these tasks are the fast CPU benchmark for asynchronous / delayed
execution of action chunks (RTC's d/s/H bookkeeping, VLASH, BID...).

Units: metres, seconds, m/s, m/s². One step lasts `dt` seconds (0.05 s, 20 Hz).

Agent (both tasks): a 2-D point mass, double integrator with linear damping,
semi-implicit Euler,
    vel <- vel + dt * (accel_max * a - damping * vel);  pos <- pos + dt * vel,
where a is the executed action in [-1, 1]^2 (an acceleration command, so the
top speed is accel_max / damping). The arena is the square [-half_width,
half_width]^2; the agent stops at a wall (position clipped, that velocity
component zeroed). Executed action = clip(a + action_noise * N(0, I), -1, 1)
(RTC's NoisyActionWrapper; action_noise defaults to 0).

Observation (both tasks, obs_dim = 8): [agent pos (2), agent vel (2),
target pos (2), target vel (2)] — state observations, see `OBS_LAYOUT`.

"intercept" (`InterceptTask`): catch a target that wanders the arena at a
speed in [target_speed_min, target_speed_max] and picks a fresh random heading
and speed at random times (a Poisson process of `switch_rate` per second, drawn
from the episode's reset key); it bounces off the walls. Success: at some step,
distance < catch_tol AND relative speed < catch_speed_tol (a soft catch, as a
gripper would need; catch_speed_tol=inf gives a distance-only catch), before
max_steps. Expert: PD pursuit of the target's predicted position (lead time
min(distance / lead_speed, max_lead)), with the target velocity fed forward
and the damping cancelled. Why latency matters, twice over: (1) acting on an
observation k steps old is delayed feedback, and the gains that the time
limit needs leave little delay margin, so a naively stale expert overshoots
and oscillates instead of matching the target's velocity; (2) even a policy
that compensates its delay perfectly (it replays its committed actions through
the known dynamics and moves the target ahead at its observed velocity) is
wrong after every switch it has not yet seen, and switches come about once
every 1 / switch_rate seconds; with switch_rate=0 such a policy loses nothing
to delay (tests/envs/test_jax_tasks.py measures both).

"waypoints" (`WaypointsTask`): track a goal that moves at `goal_speed` along a
polyline through `num_waypoints` random waypoints (starting at the first one,
where the agent starts at rest; it then waits at the last one). Success: the
tracking error |pos - goal| is below track_tol on at least required_fraction of
the episode's max_steps steps (so success is known, and latched, as soon as
that count is reached). Expert: PD tracking of the goal with its velocity fed
forward and the damping cancelled. Why latency matters: the goal turns
sharply at every waypoint and the observation does not show the next one, so
a stale action keeps driving along the old segment (goal_speed * k * dt metres
of lag for a k-step delay), and delayed feedback with tight gains oscillates.

API: a task is a frozen dataclass of parameters (hashable, a static argument
under jit) with pure methods `reset(key) -> state`, `step(state, action_A, key)
-> state` (the key only feeds action noise), `observe(state) -> obs_D`,
`success(state) -> bool` (latched: once true it stays true), `expert(obs_D) ->
action_A`, and `move_agent` / `move_target` (one step of the noise-free,
switch-free dynamics, for policies that predict ahead); states are NamedTuples.
`TASKS` / `make_task(name, **overrides)` build tasks by name.
`rollout(task, policy_fn, key, num_episodes)` (jitted; vmap over episodes of
`scan_episode`, a `lax.scan` over max_steps steps) returns per-episode success
and length (steps until success first held, else max_steps) and, on request,
the trajectory. policy_fn(obs_D, key) -> action_A is called every step;
stateful policies (chunk queues, delay buffers) and traced parameters are
supported, see `scan_episode`. `expert_policy(task)` wraps the expert.
`chunked_rollout` runs a chunk policy receding-horizon (predict H actions from
the last T_o observations, execute s, replan), batched over episodes, on the
same episodes `rollout` draws; `expert_demos` keeps the expert's successes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Column ranges of the observation vector, shared by both tasks.
OBS_LAYOUT = {"pos": slice(0, 2), "vel": slice(2, 4), "target_pos": slice(4, 6), "target_vel": slice(6, 8)}
# The agent's own state, what `roll_forward` advances (VLASH's offsets in training shift the same rows).
ROBOT_STATE = slice(0, 4)

PolicyFn = Callable[..., Any]  # (obs_D, key) -> action_A, or (carry, obs_D, key) -> (carry, action_A)


# ----------------------------------------------------------------- helpers


def _split_obs(obs_D: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    return tuple(obs_D[..., s] for s in OBS_LAYOUT.values())  # type: ignore[return-value]


def _agent_step(pos_2, vel_2, accel_2, *, dt: float, damping: float, half_width: float):
    """Damped double integrator, semi-implicit Euler; walls stop the agent."""
    vel_2 = vel_2 + dt * (accel_2 - damping * vel_2)
    moved_2 = pos_2 + dt * vel_2
    pos_2 = jnp.clip(moved_2, -half_width, half_width)
    return pos_2, jnp.where(pos_2 != moved_2, 0.0, vel_2)


def _bounce(pos_2, vel_2, half_width: float):
    """Constant-velocity move already applied; reflect off the arena walls."""
    over, under = pos_2 > half_width, pos_2 < -half_width
    pos_2 = jnp.where(over, 2 * half_width - pos_2, jnp.where(under, -2 * half_width - pos_2, pos_2))
    return pos_2, jnp.where(over | under, -vel_2, vel_2)


def _pd_accel(pos_2, vel_2, aim_2, aim_vel_2, *, kp: float, kd: float, damping: float):
    """Acceleration making the error e = pos - aim obey e'' = -kp e - kd e'."""
    return kp * (aim_2 - pos_2) + kd * (aim_vel_2 - vel_2) + damping * vel_2


# ------------------------------------------------------------------- tasks


@dataclasses.dataclass(frozen=True)
class Task:
    """Parameters shared by the tasks: agent dynamics, arena, episode length."""

    obs_dim: ClassVar[int] = 8
    action_dim: ClassVar[int] = 2

    max_steps: int = 150
    dt: float = 0.05  # s per step
    accel_max: float = 4.0  # m/s² at |a| = 1
    damping: float = 1.0  # 1/s
    half_width: float = 1.0  # m; the arena is [-half_width, half_width]^2
    action_noise: float = 0.0  # std of Gaussian noise added to executed actions
    expert_kp: float = 16.0  # 1/s²
    expert_kd: float = 8.0  # 1/s; 2 * sqrt(kp) is critical damping

    def __post_init__(self):
        if not isinstance(self.max_steps, int) or isinstance(self.max_steps, bool) or self.max_steps < 1:
            raise ValueError(f"{type(self).__name__}.max_steps must be an int >= 1, got {self.max_steps!r}")
        for name in ("dt", "accel_max", "half_width", "expert_kp", "expert_kd"):
            _check(self, name, lambda v: v > 0, "> 0")
        for name in ("damping", "action_noise"):
            _check(self, name, lambda v: v >= 0, ">= 0")

    def execute(self, action_A: jax.Array, key: jax.Array) -> jax.Array:
        """The action the plant receives: noise added, clipped to [-1, 1]."""
        action_A = jnp.asarray(action_A, jnp.float32)
        if self.action_noise > 0:
            action_A = action_A + self.action_noise * jax.random.normal(key, action_A.shape)
        return jnp.clip(action_A, -1.0, 1.0)

    def move_agent(self, pos_2: jax.Array, vel_2: jax.Array, executed_A: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One step of the agent's dynamics under an executed action in [-1, 1]^2
        (public so that delay-compensating policies can predict ahead)."""
        return _agent_step(
            pos_2, vel_2, self.accel_max * executed_A, dt=self.dt, damping=self.damping, half_width=self.half_width
        )

    def roll_forward(self, obs_D: jax.Array, actions_KA: jax.Array, n: jax.Array) -> jax.Array:
        """The observation with the agent's own state (position, velocity) advanced
        through the first n of the K actions by the noise-free dynamics, the rest
        (the target) as observed: VLASH's rolled-forward state. n may be traced."""
        def body(k, pv):
            moved = self.move_agent(*pv, jnp.clip(actions_KA[k], -1.0, 1.0))
            return tuple(jnp.where(k < n, new, old) for new, old in zip(moved, pv))

        pos_2, vel_2 = jax.lax.fori_loop(0, actions_KA.shape[0], body, (obs_D[OBS_LAYOUT["pos"]],
                                                                         obs_D[OBS_LAYOUT["vel"]]))
        return obs_D.at[OBS_LAYOUT["pos"]].set(pos_2).at[OBS_LAYOUT["vel"]].set(vel_2)

    def action_jerk(self, before_A: jax.Array, action_A: jax.Array) -> jax.Array:
        """Jerk of the commanded acceleration between two steps, m/s³ (actions are
        accelerations, so jerk is their rate of change)."""
        change = jnp.clip(action_A, -1.0, 1.0) - jnp.clip(before_A, -1.0, 1.0)
        return self.accel_max * jnp.linalg.norm(change, axis=-1) / self.dt

    # The interface every task implements.
    def reset(self, key: jax.Array) -> Any:
        raise NotImplementedError

    def step(self, state: Any, action_A: jax.Array, key: jax.Array) -> Any:
        raise NotImplementedError

    def observe(self, state: Any) -> jax.Array:
        raise NotImplementedError

    def success(self, state: Any) -> jax.Array:
        raise NotImplementedError

    def expert(self, obs_D: jax.Array) -> jax.Array:
        raise NotImplementedError


def _check(task: Task, name: str, ok: Callable[[float], bool], want: str) -> None:
    value = getattr(task, name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not ok(value):
        raise ValueError(f"{type(task).__name__}.{name} must be a number {want}, got {value!r}")


class InterceptState(NamedTuple):
    pos_2: jax.Array
    vel_2: jax.Array
    target_pos_2: jax.Array
    target_vel_2: jax.Array
    switch_steps_S: jax.Array  # int32, increasing: at the step taken from t == s the target re-draws its velocity
    switch_vel_S2: jax.Array  # the velocity it takes at each switch
    t: jax.Array  # int32 steps taken
    caught: jax.Array  # bool, latched


@dataclasses.dataclass(frozen=True)
class InterceptTask(Task):
    """Catch a randomly re-steering target (see the module docstring)."""

    target_speed_min: float = 0.4  # m/s
    target_speed_max: float = 0.8  # m/s
    switch_rate: float = 1.5  # target velocity switches per second (Poisson)
    catch_tol: float = 0.05  # m
    catch_speed_tol: float = 0.2  # m/s; float("inf") makes it a distance-only catch
    lead_speed: float = 1.5  # m/s; the expert's lead time is distance / lead_speed ...
    max_lead: float = 0.5  # s; ... at most this

    def __post_init__(self):
        super().__post_init__()
        for name in ("target_speed_min", "catch_tol", "catch_speed_tol", "lead_speed"):
            _check(self, name, lambda v: v > 0, "> 0")
        for name in ("switch_rate", "max_lead"):
            _check(self, name, lambda v: v >= 0, ">= 0")
        _check(self, "target_speed_max", lambda v: v >= self.target_speed_min, ">= target_speed_min")
        _check(self, "half_width", lambda v: v > self.catch_tol, "> catch_tol")

    @property
    def num_switch_slots(self) -> int:
        """Pre-drawn switches per episode: the Poisson mean + 6 sigma + 4."""
        mean = self.switch_rate * self.max_steps * self.dt
        return int(math.ceil(mean + 6 * math.sqrt(mean) + 4))

    def reset(self, key: jax.Array) -> InterceptState:
        # One uniform draw for everything: each random-number call costs XLA
        # compile time, which dominates a rollout on CPU.
        S = self.num_switch_slots
        u = jax.random.uniform(key, (4 + 3 * (S + 1),))
        inner = 0.9 * self.half_width  # keep the target off the walls at the start
        pos_2, target_pos_2 = (2 * u[0:2] - 1) * inner, (2 * u[2:4] - 1) * inner
        angle, speed, gap = u[4:].reshape(3, S + 1)
        speed = self.target_speed_min + (self.target_speed_max - self.target_speed_min) * speed
        vel_S2 = jnp.stack([jnp.cos(2 * math.pi * angle), jnp.sin(2 * math.pi * angle)], axis=-1) * speed[:, None]
        if self.switch_rate > 0:
            gaps_S = -jnp.log1p(-gap[1:]) / (self.switch_rate * self.dt)  # exponential, in steps
            switch_steps_S = jnp.cumsum(jnp.maximum(jnp.ceil(gaps_S), 1.0)).astype(jnp.int32)
        else:
            switch_steps_S = jnp.full((S,), self.max_steps, jnp.int32)  # never fires
        return InterceptState(
            pos_2=pos_2,
            vel_2=jnp.zeros(2),
            target_pos_2=target_pos_2,
            target_vel_2=vel_S2[0],
            switch_steps_S=switch_steps_S,
            switch_vel_S2=vel_S2[1:],
            t=jnp.zeros((), jnp.int32),
            caught=jnp.zeros((), bool),
        )

    def step(self, state: InterceptState, action_A: jax.Array, key: jax.Array) -> InterceptState:
        pos_2, vel_2 = self.move_agent(state.pos_2, state.vel_2, self.execute(action_A, key))
        hit_S = state.switch_steps_S == state.t
        target_vel_2 = jnp.where(hit_S.any(), state.switch_vel_S2[jnp.argmax(hit_S)], state.target_vel_2)
        target_pos_2, target_vel_2 = self.move_target(state.target_pos_2, target_vel_2)
        caught = (jnp.linalg.norm(target_pos_2 - pos_2) < self.catch_tol) & (
            jnp.linalg.norm(target_vel_2 - vel_2) < self.catch_speed_tol
        )
        return state._replace(
            pos_2=pos_2,
            vel_2=vel_2,
            target_pos_2=target_pos_2,
            target_vel_2=target_vel_2,
            t=state.t + 1,
            caught=state.caught | caught,
        )

    def move_target(self, pos_2: jax.Array, vel_2: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One step of the target between switches: constant velocity, walls bounce."""
        return _bounce(pos_2 + self.dt * vel_2, vel_2, self.half_width)

    def observe(self, state: InterceptState) -> jax.Array:
        return jnp.concatenate([state.pos_2, state.vel_2, state.target_pos_2, state.target_vel_2])

    def success(self, state: InterceptState) -> jax.Array:
        return state.caught

    def expert(self, obs_D: jax.Array) -> jax.Array:
        pos_2, vel_2, target_pos_2, target_vel_2 = _split_obs(obs_D)
        distance = jnp.linalg.norm(target_pos_2 - pos_2, axis=-1, keepdims=True)
        aim_2 = target_pos_2 + jnp.minimum(distance / self.lead_speed, self.max_lead) * target_vel_2
        gains = dict(kp=self.expert_kp, kd=self.expert_kd, damping=self.damping)
        accel_2 = _pd_accel(pos_2, vel_2, aim_2, target_vel_2, **gains)
        return jnp.clip(accel_2 / self.accel_max, -1.0, 1.0)


class WaypointsState(NamedTuple):
    pos_2: jax.Array
    vel_2: jax.Array
    waypoints_K2: jax.Array
    t: jax.Array  # int32 steps taken
    steps_on_track: jax.Array  # int32 steps with |pos - goal| < track_tol


@dataclasses.dataclass(frozen=True)
class WaypointsTask(Task):
    """Track a goal moving through random waypoints (see the module docstring)."""

    num_waypoints: int = 6  # K
    goal_speed: float = 0.6  # m/s along the polyline
    track_tol: float = 0.15  # m
    required_fraction: float = 0.8  # of max_steps, with the error below track_tol
    waypoint_margin: float = 0.8  # waypoints are drawn in [-margin, margin]^2 * half_width

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.num_waypoints, int) or isinstance(self.num_waypoints, bool) or self.num_waypoints < 2:
            raise ValueError(f"WaypointsTask.num_waypoints must be an int >= 2, got {self.num_waypoints!r}")
        for name in ("goal_speed", "track_tol"):
            _check(self, name, lambda v: v > 0, "> 0")
        for name in ("required_fraction", "waypoint_margin"):
            _check(self, name, lambda v: 0 < v <= 1, "in (0, 1]")

    @property
    def required_steps(self) -> int:
        return int(math.ceil(self.required_fraction * self.max_steps))

    def goal(self, waypoints_K2: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Goal position and velocity after t steps: arc length goal_speed * t * dt."""
        seg_J2 = waypoints_K2[1:] - waypoints_K2[:-1]  # J = K - 1 segments
        len_J = jnp.linalg.norm(seg_J2, axis=-1)
        start_J = jnp.cumsum(len_J) - len_J  # arc length where each segment starts
        arc = self.goal_speed * self.dt * t
        j = jnp.clip(jnp.searchsorted(start_J, arc, side="right") - 1, 0, len_J.shape[0] - 1)
        dir_2 = seg_J2[j] / jnp.maximum(len_J[j], 1e-9)
        along = jnp.clip(arc - start_J[j], 0.0, len_J[j])
        moving = arc < start_J[-1] + len_J[-1]
        return waypoints_K2[j] + along * dir_2, jnp.where(moving, self.goal_speed * dir_2, 0.0)

    def reset(self, key: jax.Array) -> WaypointsState:
        edge = self.waypoint_margin * self.half_width
        waypoints_K2 = jax.random.uniform(key, (self.num_waypoints, 2), minval=-edge, maxval=edge)
        return WaypointsState(
            pos_2=waypoints_K2[0],
            vel_2=jnp.zeros(2),
            waypoints_K2=waypoints_K2,
            t=jnp.zeros((), jnp.int32),
            steps_on_track=jnp.zeros((), jnp.int32),
        )

    def step(self, state: WaypointsState, action_A: jax.Array, key: jax.Array) -> WaypointsState:
        pos_2, vel_2 = self.move_agent(state.pos_2, state.vel_2, self.execute(action_A, key))
        goal_2, _ = self.goal(state.waypoints_K2, state.t + 1)
        on_track = jnp.linalg.norm(pos_2 - goal_2) < self.track_tol
        return state._replace(
            pos_2=pos_2, vel_2=vel_2, t=state.t + 1, steps_on_track=state.steps_on_track + on_track.astype(jnp.int32)
        )

    def observe(self, state: WaypointsState) -> jax.Array:
        goal_2, goal_vel_2 = self.goal(state.waypoints_K2, state.t)
        return jnp.concatenate([state.pos_2, state.vel_2, goal_2, goal_vel_2])

    def success(self, state: WaypointsState) -> jax.Array:
        return state.steps_on_track >= self.required_steps

    def expert(self, obs_D: jax.Array) -> jax.Array:
        pos_2, vel_2, goal_2, goal_vel_2 = _split_obs(obs_D)
        gains = dict(kp=self.expert_kp, kd=self.expert_kd, damping=self.damping)
        accel_2 = _pd_accel(pos_2, vel_2, goal_2, goal_vel_2, **gains)
        return jnp.clip(accel_2 / self.accel_max, -1.0, 1.0)


TASKS: dict[str, type[Task]] = {"intercept": InterceptTask, "waypoints": WaypointsTask}


def make_task(name: str, **overrides: Any) -> Task:
    """The task called `name` with its default parameters, some overridden."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"task {name!r} has no parameter(s) {unknown}; its parameters: {', '.join(sorted(fields))}")
    return cls(**overrides)


# ---------------------------------------------------------------- rollouts


class Episodes(NamedTuple):
    """What a rollout returns; `rollout` adds a leading episode axis E.

    success: bool, the criterion held by the last step. length: int32, steps
    taken until it first held (1-based), or max_steps. obs_TD: the observation
    each step's policy saw; actions_TA: what the policy returned (before noise
    and clipping). Both are None unless trajectory=True.
    """

    success: jax.Array
    length: jax.Array
    obs_TD: jax.Array | None = None
    actions_TA: jax.Array | None = None


def scan_episode(
    task: Task,
    policy_fn: PolicyFn,
    key: jax.Array,
    *,
    params: Any = None,
    policy_init: Callable[..., Any] | None = None,
    trajectory: bool = False,
) -> Episodes:
    """One episode of task.max_steps steps under `lax.scan`.

    policy_fn(obs_D, key) -> action_A is called every step. A stateful policy
    (a chunk queue, a delay buffer) passes policy_init(first_obs_D) -> carry and
    policy_fn(carry, obs_D, key) -> (carry, action_A). With `params` (a pytree,
    e.g. network weights: traced, so new values reuse the compiled rollout) both
    functions get it as their first argument. The environment's randomness comes
    from its own split of `key`, so the target's motion does not depend on the
    policy: policies compared on the same key see the same episodes.
    """
    if params is not None:
        policy_fn = functools.partial(policy_fn, params)
        policy_init = None if policy_init is None else functools.partial(policy_init, params)
    # One split for the whole episode (random-number calls dominate compile time).
    keys = jax.random.split(key, 1 + 2 * task.max_steps)
    step_keys_T2 = keys[1:].reshape((task.max_steps, 2) + keys.shape[1:])  # typed or raw keys
    state = task.reset(keys[0])
    carry = None if policy_init is None else policy_init(task.observe(state))

    def body(loop, keys_2):
        state, carry = loop
        policy_key, env_key = keys_2[0], keys_2[1]
        obs_D = task.observe(state)
        if policy_init is None:
            action_A = policy_fn(obs_D, policy_key)
        else:
            carry, action_A = policy_fn(carry, obs_D, policy_key)
        state = task.step(state, action_A, env_key)
        out = (task.success(state), obs_D, action_A) if trajectory else (task.success(state),)
        return (state, carry), out

    _, outs = jax.lax.scan(body, (state, carry), step_keys_T2)
    success_T = outs[0]
    length = jnp.where(success_T.any(), jnp.argmax(success_T) + 1, task.max_steps).astype(jnp.int32)
    if trajectory:
        return Episodes(success_T[-1], length, outs[1], jnp.asarray(outs[2], jnp.float32))
    return Episodes(success_T[-1], length)


@functools.partial(jax.jit, static_argnames=("task", "policy_fn", "num_episodes", "policy_init", "trajectory"))
def rollout(
    task: Task,
    policy_fn: PolicyFn,
    key: jax.Array,
    num_episodes: int,
    *,
    params: Any = None,
    policy_init: Callable[..., Any] | None = None,
    trajectory: bool = False,
) -> Episodes:
    """`scan_episode` vmapped over num_episodes keys split from `key`, jitted.

    Fields gain a leading E axis (success_E, length_E, obs_ETD, actions_ETA).
    task, policy_fn and policy_init are static (pass the same function objects
    to reuse the compiled rollout); key and params are traced.
    """
    episode = functools.partial(
        scan_episode, task, policy_fn, params=params, policy_init=policy_init, trajectory=trajectory
    )
    return jax.vmap(episode)(jax.random.split(key, num_episodes))


def expert_policy(task: Task) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The task's expert as a policy_fn(obs_D, key) (one object per task, so
    repeated rollouts reuse the compiled program)."""
    return _expert_policy(task)


@functools.lru_cache(maxsize=None)
def _expert_policy(task: Task):
    return lambda obs_D, key: task.expert(obs_D)


# ------------------------------------------------------- receding-horizon chunks

ChunkFn = Callable[[Any, jax.Array, jax.Array], jax.Array]  # (weights, obs_ETO, key) -> actions_EHA


@functools.partial(jax.jit, static_argnames=("task", "act_fn", "num_episodes", "obs_horizon", "execute_steps",
                                             "trajectory"))
def chunked_rollout(
    task: Task,
    act_fn: ChunkFn,
    key: jax.Array,
    num_episodes: int,
    *,
    weights: Any,
    obs_horizon: int,
    execute_steps: int,
    trajectory: bool = False,
) -> Episodes:
    """Receding-horizon execution of a chunk policy on num_episodes episodes at once.

    Every execute_steps (s) steps the policy sees the last obs_horizon
    observations of each episode (the first one repeated at the start) and
    returns a chunk of H >= s actions, batched: act_fn(weights, obs_ETO, key)
    -> actions_EHA, one call for all episodes (the sampler runs once per
    replan, not once per episode). The first s actions run open loop, then it
    replans. Episodes are the ones `rollout` draws from the same key (same
    resets, same action noise), so a chunk policy and the expert can be
    compared episode by episode. Returns Episodes with a leading E axis.
    """
    T, s = task.max_steps, execute_steps
    n_chunks = -(-T // s)
    reset_keys_E, env_keys_CSE, policy_keys_C = chunk_keys(key, num_episodes, T, s)

    state = jax.vmap(task.reset)(reset_keys_E)
    obs_ED = jax.vmap(task.observe)(state)
    hist_ETD = jnp.repeat(obs_ED[:, None], obs_horizon, axis=1)
    success_E = jnp.zeros((num_episodes,), bool)
    length_E = jnp.full((num_episodes,), T, jnp.int32)

    def one_step(carry, inputs):
        state, hist_ETD, success_E, length_E = carry
        action_EA, env_keys_E, i = inputs
        obs_ED = hist_ETD[:, -1]
        new = jax.vmap(task.step)(state, action_EA, env_keys_E)
        live = i < T
        state = jax.tree.map(lambda a, b: jnp.where(live, a, b), new, state)
        now_E = jax.vmap(task.success)(state) & live
        length_E = jnp.where(now_E & ~success_E, i + 1, length_E)
        success_E = success_E | now_E
        hist_ETD = jnp.concatenate([hist_ETD[:, 1:], jax.vmap(task.observe)(state)[:, None]], axis=1)
        return (state, hist_ETD, success_E, length_E), ((obs_ED, action_EA) if trajectory else None)

    def one_chunk(carry, inputs):
        env_keys_SE, policy_key, c = inputs
        actions_EHA = act_fn(weights, carry[1], policy_key)
        if actions_EHA.shape[1] < s:
            raise ValueError(f"the policy returns chunks of {actions_EHA.shape[1]} actions but executes {s}")
        steps = (jnp.swapaxes(actions_EHA[:, :s], 0, 1).astype(jnp.float32), env_keys_SE, c * s + jnp.arange(s))
        return jax.lax.scan(one_step, carry, steps)

    carry = (state, hist_ETD, success_E, length_E)
    (_, _, success_E, length_E), traj = jax.lax.scan(
        one_chunk, carry, (env_keys_CSE, policy_keys_C, jnp.arange(n_chunks)))
    if not trajectory:
        return Episodes(success_E, length_E)
    obs_TED, actions_TEA = (x.reshape((n_chunks * s,) + x.shape[2:])[:T] for x in traj)
    return Episodes(success_E, length_E, jnp.swapaxes(obs_TED, 0, 1), jnp.swapaxes(actions_TEA, 0, 1))


def chunk_keys(key: jax.Array, num_episodes: int, max_steps: int, execute_steps: int):
    """The keys of chunked execution, laid out as `rollout` draws its episodes:
    (reset keys [E], the environment's step keys [C, s, E] for C = ceil(T / s)
    chunks, steps past max_steps repeating the last, policy keys [C])."""
    T, s = max_steps, execute_steps
    n_chunks = -(-T // s)
    split_EK = jax.vmap(lambda k: jax.random.split(k, 1 + 2 * T))(jax.random.split(key, num_episodes))
    env_keys_TE = jnp.swapaxes(split_EK[:, 1:].reshape((num_episodes, T, 2) + split_EK.shape[2:])[:, :, 1], 0, 1)
    pad = n_chunks * s - T  # steps past max_steps are computed and ignored
    env_keys_CSE = jnp.concatenate([env_keys_TE, env_keys_TE[-1:].repeat(pad, 0)]).reshape(
        (n_chunks, s) + env_keys_TE.shape[1:])
    return split_EK[:, 0], env_keys_CSE, jax.random.split(jax.random.fold_in(key, 0x5EED), n_chunks)


def expert_demos(task: Task, key: jax.Array, num_episodes: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    """The expert's successful episodes from `rollout(task, expert, key, num_episodes)`,
    each cut at its first success: a list of (obs_TD, actions_TA) numpy pairs, and
    the expert's success rate over all num_episodes episodes."""
    eps = jax.device_get(rollout(task, expert_policy(task), key, num_episodes, trajectory=True))
    kept = [(np.asarray(eps.obs_TD[e, :n]), np.asarray(eps.actions_TA[e, :n]))
            for e, n in enumerate(eps.length) if eps.success[e]]
    return kept, float(np.mean(eps.success))
