"""Real-time execution of action chunks: what the robot does while the next chunk is computed.

Notation: H = chunk length, s = actions executed per chunk (an inference
starts every s control steps), d = inference delay in control steps (the new
chunk arrives d steps after the observation it was computed from), n = sampler
steps. d may differ from cycle to cycle (sampled delays); d_plan is what the
policy is told to expect (the largest delay it may meet), d the actual one.

Alignment: every chunk handed to these functions is aligned to the current
cycle: row i is the action planned for step t_c + i, where t_c is the step at
which the cycle's observation was taken. After a cycle the chunk that keeps
running is shifted left by s (`shift_chunk`) and padded with its last real
action, never with zeros (zero in normalized units decodes to the dataset's
mean action, a jump).

Strategies (STRATEGIES), per cycle; prev = the executing chunk, new = the one
computed from the observation at t_c:
  sync               inference blocks: the robot and, in simulation, the world
                     wait d steps per chunk (time is lost, the plan is fresh);
                     new[0:s] runs.
  naive_async        the old chunk keeps running until the new one arrives:
                     prev[j] for j < d, then new[j] (its first d actions are
                     already in the past and are skipped).
  temporal_ensemble  ACT: every arrived chunk that covers step t_c + j votes,
                     weight exp(-m·i) with i = 0 the oldest vote (m = te_decay).
  rtc                naive bookkeeping; the new chunk is sampled with RTC's
                     guidance towards prev under a soft prefix mask
                     (`prefix_weights`, `rtc_euler`): inference time only.
  prefix             naive bookkeeping; a model trained with clean prefixes of
                     random length (training-time RTC / REMAC) samples with
                     new[:d_plan] held to prev[:d_plan] (`prefix_euler`).
  remac              the prefix strategy with a model whose training prefixes
                     came from a frozen policy's stale plans (REMAC's
                     self-conditioned curriculum; `policy.conditioning=remac`),
                     not only from the demonstration's own future.
  vlash              the new chunk starts at t_c + d_plan: the observation's
                     robot state is rolled forward through prev[:d_plan] (the
                     actions that run during inference) by the task's own
                     dynamics; prev[j] for j < d_plan, then new[j - d_plan].
                     Trained with the matching offset augmentation.
  faster             prefix conditioning plus a horizon-aware per-action
                     schedule (`faster_offsets`): action i is final after k_i
                     of the n steps and is streamed as soon as it is ready, at
                     ceil(d·k_i/n) steps; prev[j] runs only where new[j] is not
                     ready yet. Trained with the same schedule.
  fused              naive bookkeeping, with the new chunk blended into the old
                     one at the seam (`fuse`): a quintic correction that takes
                     over the old plan's value exactly and its slope and
                     curvature approximately (position, velocity and
                     acceleration of a position-like action signal) and
                     vanishes after fuse_steps steps (VLA-RAIL's min-jerk mode).

Invariants (`check_horizons`): 1 <= s <= H always; asynchronous strategies
keep one inference in flight, so d_plan <= s, and the old chunk must cover the
wait, so s <= H - d_plan (vlash too: the episode's first chunk starts at once,
so the next cycle's wait runs on its rows s..s+d_plan-1).

Flow time convention: as atoll.core.diffusion, t = 0 noise and t = 1 data; a
clean prefix action has time 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

STRATEGIES = ("sync", "naive_async", "temporal_ensemble", "rtc", "prefix", "remac", "vlash", "faster", "fused")
RTC_SCHEDULES = ("exp", "linear", "hard")
# The training each strategy needs from the policy (config.policy.conditioning).
CONDITIONING = ("none", "prefix", "remac", "vlash", "faster")
NEEDS = {"prefix": "prefix", "remac": "remac", "vlash": "vlash", "faster": "faster"}
# Trainings whose models accept clean prefixes (flow time 1 on the first rows).
PREFIX_TRAINED = ("prefix", "remac", "faster")
# Strategies whose chunks come from a guided or prefix-holding flow sampler.
GUIDED = ("rtc", "prefix", "remac", "faster")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_BHA, time_BH) -> velocity_BHA


@dataclasses.dataclass(frozen=True)
class Strategy:
    """One execution strategy and its knobs (defaults from the papers' code).

    rtc_beta: the guidance clip β (RTC's Kinetix code: 5); rtc_schedule: the
    prefix mask's decay (exp, linear, or hard: 1 on the first d actions only).
    te_decay: ACT's m in exp(-m·i). faster_alpha, faster_u0: FASTER's α and
    u0 (None: (n - 1)/n, so the first action is final after one step; the
    trainer's `faster` conditioning uses α = 0.6 and that u0, so other values
    sample off the trained schedule).
    fuse_steps: how many steps the fuser's correction lasts.
    """

    name: str = "naive_async"
    rtc_beta: float = 5.0
    rtc_schedule: str = "exp"
    te_decay: float = 0.01
    faster_alpha: float = 0.6
    faster_u0: float | None = None
    fuse_steps: int = 2

    def __post_init__(self):
        if self.name not in STRATEGIES:
            raise ValueError(f"execution strategy {self.name!r} is unknown; choose one of {list(STRATEGIES)}")
        if self.rtc_schedule not in RTC_SCHEDULES:
            raise ValueError(f"RTC schedule {self.rtc_schedule!r} is unknown; choose one of {list(RTC_SCHEDULES)}")
        if self.rtc_beta < 0 or self.te_decay < 0 or self.faster_alpha <= 0:
            raise ValueError("rtc_beta and te_decay must be >= 0 and faster_alpha > 0")
        if self.faster_u0 is not None and not 0 <= self.faster_u0 < 1:
            raise ValueError(f"faster_u0 = {self.faster_u0} must lie in [0, 1)")
        if self.fuse_steps < 1:
            raise ValueError(f"fuse_steps = {self.fuse_steps} must be at least 1")

    @property
    def conditioning(self) -> str:
        """The policy training this strategy needs (config.policy.conditioning)."""
        return NEEDS.get(self.name, "none")

    @property
    def guided(self) -> bool:
        """Sampled by a guided / prefix-holding flow sampler that reads the running chunk."""
        return self.name in GUIDED

    @property
    def asynchronous(self) -> bool:
        return self.name != "sync"


def check_horizons(name: str, d_plan: int, s: int, H: int) -> None:
    """Raises ValueError naming the violated invariant (see the module docstring)."""
    if not 1 <= s <= H:
        raise ValueError(f"execute_steps s = {s} must lie in [1, H = {H}]")
    if d_plan < 0:
        raise ValueError(f"delay d = {d_plan} must be >= 0")
    if name == "sync":
        if d_plan > H:
            raise ValueError(f"sync: delay d = {d_plan} exceeds the chunk length H = {H} this simulation covers")
        return
    if d_plan > s:
        raise ValueError(f"{name}: delay d = {d_plan} exceeds execute_steps s = {s}; asynchronous execution keeps "
                         "one inference in flight, so it needs d <= s (execute more steps per chunk)")
    if s > H - d_plan:
        raise ValueError(f"{name}: s = {s} > H - d = {H - d_plan}; the running chunk must cover the d steps of "
                         "the next inference, so it needs s <= H - d (a longer chunk or fewer executed steps)")


def check_conditioning(strategy: Strategy, trained: str, objective_kind: str) -> None:
    """Raises ValueError when a policy trained with `trained` cannot run `strategy`."""
    if trained not in CONDITIONING:
        raise ValueError(f"policy conditioning {trained!r} is unknown; choose one of {list(CONDITIONING)}")
    if strategy.guided and objective_kind != "flow":
        raise ValueError(f"strategy {strategy.name!r} guides a flow sampler; this policy is {objective_kind!r}")
    need = strategy.conditioning
    if need == "prefix" and trained in PREFIX_TRAINED:
        return
    if need != "none" and need != trained:
        raise ValueError(f"strategy {strategy.name!r} needs a policy trained with policy.conditioning={need!r}; "
                         f"this one was trained with {trained!r}")


# ------------------------------------------------------------------- bookkeeping


def shift_chunk(chunk_BHA, n):
    """Row i becomes row i + n; the tail repeats the last real action. n may be traced."""
    H = chunk_BHA.shape[-2]
    idx = jnp.minimum(jnp.arange(H) + n, H - 1)
    return jnp.take(chunk_BHA, idx, axis=-2)


def _per_batch(d, batch_shape):
    """A delay (scalar or [B]) as [B, 1] for comparisons against [H] indices."""
    return jnp.broadcast_to(jnp.asarray(d), batch_shape)[..., None]


def prefix_weights(d, s: int, H: int, schedule: str = "exp"):
    """RTC's soft mask [..., H]: 1 on the first d actions (committed), decaying to 0
    at H - s (the actions no old chunk covers), 0 beyond. d: scalar or [B]."""
    i = jnp.arange(H)
    d = jnp.asarray(d)[..., None]
    if schedule == "hard":
        return (i < d).astype(jnp.float32)
    end = H - s
    w = jnp.clip((d - 1 - i) / jnp.maximum(end - d + 1, 1) + 1, 0.0, 1.0)
    if schedule == "exp":
        w = w * jnp.expm1(w) / (math.e - 1)
    w = jnp.where(i < d, 1.0, jnp.where(i < end, w, 0.0))
    return w.astype(jnp.float32)


def faster_offsets(H: int, p, alpha: float, u0: float):
    """FASTER's per-action head start u_i in [0, u0] [..., H]: u0 for the first
    free action (index p), 0 for the last, (1 - j^α)·u0 between (j the position
    in the free part). p: the prefix length, scalar or [B]."""
    i = jnp.arange(H)
    p = jnp.asarray(p)[..., None]
    j = jnp.clip((i - p) / jnp.maximum(H - 1 - p, 1), 0.0, 1.0)
    return (1.0 - j**alpha) * u0


def faster_times(t, u_H):
    """Per-action flow time [..., H] at global time t (scalar or [B]): action i runs
    ahead on the clock min(t / (1 - u_i), 1), final after (1 - u_i)·n of n steps."""
    return jnp.clip(jnp.asarray(t)[..., None] / (1.0 - u_H), 0.0, 1.0)


def faster_ready_steps(u_H, n: int):
    """Sampler steps after which each action is final: ceil(n·(1 - u_i))."""
    return jnp.maximum(jnp.ceil(n * (1.0 - u_H) - 1e-4), 1.0).astype(jnp.int32)


def faster_u0(strategy: Strategy, n: int) -> float:
    return strategy.faster_u0 if strategy.faster_u0 is not None else (n - 1) / n


def faster_plan(strategy: Strategy, d_plan, d, H: int, n: int):
    """FASTER's prefix length p (the steps until its first free action is final,
    at the planned delay), offsets u [..., H] and the step at which each action
    of the new chunk is ready at the actual delay d: ceil(d·k_i/n) for the k_i
    sampler steps it needs (the prefix, equal to the old chunk, at once)."""
    u0 = faster_u0(strategy, n)
    first = max(1, math.ceil(n * (1 - u0) - 1e-4))
    p = jnp.ceil(jnp.asarray(d_plan) * first / n).astype(jnp.int32)
    u = faster_offsets(H, p, strategy.faster_alpha, u0)
    k = faster_ready_steps(u, n)
    ready = jnp.ceil(jnp.asarray(d)[..., None] * k / n).astype(jnp.int32)
    return p, u, jnp.where(jnp.arange(H) < jnp.asarray(p)[..., None], 0, ready)


def fuse(prev_BHA, new_BHA, seam, steps: int):
    """The new chunk with a correction c that makes [prev[:seam], new[seam:] + c[seam:]]
    take over the old plan's value at the seam exactly and its slope and
    curvature (forward differences of each chunk at the seam, matched as
    continuous-time derivatives of the quintic) approximately: c is a quintic in
    k = i - seam that vanishes with its first two derivatives at k = steps and
    is 0 after, so on the step grid the slope and curvature mismatch shrink by
    a factor that grows with `steps` (tests/core/test_chunking.py measures it).
    seam may be traced (scalar or [B]), 0 <= seam <= H - 3.

    Past its real rows the old plan is what its padding says: hold the last
    action (a running chunk shifted by s has H - s real rows, then repeats the
    last), what a robot does when no new chunk comes. So a seam within two rows
    of the plan's end meets a plan that flattens there. Continuing the plan as
    the quadratic through its last three rows instead was measured on the ci
    study (2026-11-30): fused at d = 4 fell from 1.6% to 0.9% success and its
    jerk rose from 21 to 77 m/s³ (a 2-step correction chasing an extrapolated
    slope and curvature), so the hold stays."""
    H = prev_BHA.shape[-2]
    seam = jnp.broadcast_to(jnp.asarray(seam), prev_BHA.shape[:-2])

    def at(x, k):
        idx = jnp.clip(seam + k, 0, H - 1)[..., None, None]
        return jnp.take_along_axis(x, idx, axis=-2)[..., 0, :]

    def derivs(x):  # forward differences: the seam may be the chunk's first row
        return at(x, 0), at(x, 1) - at(x, 0), at(x, 2) - 2 * at(x, 1) + at(x, 0)

    e0, e1, e2 = (a - b for a, b in zip(derivs(prev_BHA), derivs(new_BHA)))
    m = float(steps)
    tau = (jnp.arange(H) - seam[..., None]) / m  # [..., H]
    # Quintic q(τ) = e0 + m·e1·τ + (m²·e2/2)·τ² + c3·τ³ + c4·τ⁴ + c5·τ⁵ with q, q', q'' = 0 at τ = 1.
    a0, a1, a2 = e0, m * e1, m * m * e2 / 2
    c3 = -10 * a0 - 6 * a1 - 3 * a2
    c4 = 15 * a0 + 8 * a1 + 3 * a2
    c5 = -6 * a0 - 3 * a1 - a2
    t = tau[..., None]
    q = a0[..., None, :] + t * (a1[..., None, :] + t * (a2[..., None, :] + t * (
        c3[..., None, :] + t * (c4[..., None, :] + t * c5[..., None, :]))))
    return new_BHA + jnp.where((t >= 0) & (t < 1), q, 0.0)


def cycle_actions(strategy: Strategy, prev_BHA, new_BHA, d, s: int, d_plan=None, ready_BH=None):
    """The s actions [B, s, A] executed this cycle and the chunk that keeps
    running, aligned to the next cycle [B, H, A]. d: the actual delay (scalar or
    [B]); d_plan: the planned one (vlash's offset; default d). ready_BH (faster):
    the step at which each new action is available."""
    B = new_BHA.shape[:-2]
    j = jnp.arange(s)
    d_B1 = _per_batch(d, B)
    if strategy.name == "sync":
        return new_BHA[..., :s, :], shift_chunk(new_BHA, s)
    if strategy.name == "vlash":
        off = jnp.broadcast_to(jnp.asarray(d if d_plan is None else d_plan), B)
        idx = jnp.clip(j - off[..., None], 0, new_BHA.shape[-2] - 1)
        from_new = jnp.take_along_axis(new_BHA, idx[..., None], axis=-2)
        run = jnp.where((j < off[..., None])[..., None], prev_BHA[..., :s, :], from_new)
        return run, _shift_each(new_BHA, s - off)
    if strategy.name == "faster":
        use_new = ready_BH[..., :s] <= j
        run = jnp.where(use_new[..., None], new_BHA[..., :s, :], prev_BHA[..., :s, :])
        return run, shift_chunk(new_BHA, s)
    if strategy.name == "fused":
        new_BHA = fuse(prev_BHA, new_BHA, jnp.broadcast_to(d, B), strategy.fuse_steps)
    run = jnp.where((j < d_B1)[..., None], prev_BHA[..., :s, :], new_BHA[..., :s, :])
    return run, shift_chunk(new_BHA, s)


def _shift_each(chunk_BHA, n_B):
    H = chunk_BHA.shape[-2]
    idx = jnp.minimum(jnp.arange(H) + jnp.asarray(n_B)[..., None], H - 1)
    return jnp.take_along_axis(chunk_BHA, idx[..., None], axis=-2)


# ------------------------------------------------------------ temporal ensembling


def ensemble_slots(H: int, s: int) -> int:
    """Chunks that can cover one step: ceil(H / s) + 1 (the newest one arriving)."""
    return -(-H // s) + 1


def ensemble_actions(chunks_BKHA, valid_BKH, new_BHA, d, s: int, decay: float):
    """ACT's temporal ensemble over the buffered chunks (oldest first, aligned to
    this cycle, valid_BKH marking rows they cover) and the new chunk, which
    votes from step d on. Returns the s actions and the buffer for the next
    cycle (every chunk shifted by s, the oldest dropped)."""
    H = new_BHA.shape[-2]
    B = new_BHA.shape[:-2]
    arrived_BH = jnp.arange(H) >= _per_batch(d, B)
    chunks = jnp.concatenate([chunks_BKHA, new_BHA[..., None, :, :]], axis=-3)
    valid = jnp.concatenate([valid_BKH, jnp.ones_like(arrived_BH)[..., None, :]], axis=-2)
    votes = jnp.concatenate([valid_BKH, arrived_BH[..., None, :]], axis=-2).astype(jnp.float32)
    rank = jnp.cumsum(votes, axis=-2) - votes  # 0 for the oldest vote at each step
    w = votes * jnp.exp(-decay * rank)
    run = jnp.sum(w[..., None] * chunks, axis=-3) / jnp.maximum(jnp.sum(w, axis=-2), 1e-12)[..., None]
    keep_chunks, keep_valid = chunks[..., 1:, :, :], valid[..., 1:, :]
    idx = jnp.arange(H) + s
    shifted_valid = jnp.where(idx < H, jnp.take(keep_valid, jnp.minimum(idx, H - 1), axis=-1), False)
    return run[..., :s, :], shift_chunk(keep_chunks, s), shifted_valid


# --------------------------------------------------------------------- samplers


def rtc_euler(model_fn: ModelFn, y_BHA, w_BH, shape, key, num_steps: int, beta: float):
    """Euler flow sampling with RTC's guidance (ΠGDM inpainting) towards y on the
    soft mask w: at time t, with Â¹ = x + (1 - t)·v the predicted clean chunk,
    v ← v + min(β, (1 - t)/t · r⁻²)·Jᵀ[w ⊙ (y − Â¹)], r⁻² = (t² + (1 − t)²)/(1 − t)²,
    J the Jacobian of Â¹ in x (one VJP per step). β = 0 or w = 0 is plain Euler."""
    x = jax.random.normal(key, shape, jnp.float32)
    dt = 1.0 / num_steps
    w = jnp.broadcast_to(w_BH, shape[:-1])[..., None]

    def step(x, i):
        t = i * dt
        time = jnp.full(shape[:-1], t)

        def denoise(x):
            v = model_fn(x, time)
            return x + (1.0 - t) * v, v

        x1, vjp, v = jax.vjp(denoise, x, has_aux=True)
        (correction,) = vjp(w * (y_BHA - x1))
        inv_r2 = (t**2 + (1.0 - t) ** 2) / (1.0 - t) ** 2
        c = jnp.where(t > 0, (1.0 - t) / jnp.maximum(t, 1e-12), beta)
        g = jnp.minimum(c * inv_r2, beta)
        return x + dt * (v + g * correction), None

    x, _ = jax.lax.scan(step, x, jnp.arange(num_steps, dtype=jnp.float32))
    return x


def prefix_euler(model_fn: ModelFn, y_BHA, d, shape, key, num_steps: int, offsets_BH=None,
                 stop_after: int | None = None):
    """Euler flow sampling with the first d actions held to y and shown to the
    model as clean (time 1): training-time RTC's hard inpainting. With
    offsets_BH (FASTER's u), action i runs on its own clock faster_times(t, u).
    stop_after: return after that many of the num_steps steps (what a stream
    has ready by then)."""
    mask_BH = jnp.arange(shape[-2]) < _per_batch(d, shape[:-2])
    y_BHA = jnp.broadcast_to(y_BHA, shape)
    x = jnp.where(mask_BH[..., None], y_BHA, jax.random.normal(key, shape, jnp.float32))
    dt = 1.0 / num_steps
    u = jnp.zeros(shape[:-1]) if offsets_BH is None else jnp.broadcast_to(offsets_BH, shape[:-1])

    def clock(t):
        return jnp.where(mask_BH, 1.0, jnp.clip(t / (1.0 - u), 0.0, 1.0))

    def step(x, i):
        now, nxt = clock(i * dt), clock((i + 1) * dt)
        x = x + (nxt - now)[..., None] * model_fn(x, now)
        return jnp.where(mask_BH[..., None], y_BHA, x), None

    steps = num_steps if stop_after is None else stop_after
    x, _ = jax.lax.scan(step, x, jnp.arange(steps, dtype=jnp.float32))
    return x
