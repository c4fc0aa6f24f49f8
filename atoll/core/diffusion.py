"""Generative core for action-chunk policies: DDPM / DDIM diffusion and flow matching.

Pure functions over arrays x [..., A] (e.g. an action chunk [B, H, A]). Every
objective takes a *per-element time*: one noise level per action (shape
x.shape[:-1], e.g. [B, H]), so later work can hold a clean prefix (time at the
data end for the executed actions) or use horizon-aware schedules. A scalar or
[B]-shaped time broadcasts.

`model_fn(x_noisy, time) -> output` is the denoiser, time of shape x.shape[:-1].

Diffusion (discrete, K steps; index k = 0 is the least noisy, K-1 the most):
  x_k = sqrt(ᾱ_k)·x_0 + sqrt(1 − ᾱ_k)·ε.  The model sees time = k (a float).
  prediction "epsilon": the model predicts ε.  "v": v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x_0
  (Salimans & Ho), which keeps the target's scale fixed across noise levels.
  Schedules: "squaredcos_cap_v2" (Nichol & Dhariwal's cosine ᾱ, β clipped at
  0.999; Diffusion Policy's default), "cosine" (the same), "linear" (β from
  1e-4 to 0.02 scaled to K steps as in DDPM).
  Samplers: DDPM ancestral with the posterior ("fixed_small") variance, DDIM
  on a subset of steps (eta 0: deterministic; eta 1: DDPM-like noise).

Flow matching (rectified flow), time convention t ∈ [0, 1]:
  t = 0 is pure noise, t = 1 is data (as RTC's reference code; openpi and
  LeRobot use the reverse, τ = 1 − t, so their velocity is the negative of
  this one).  x_t = (1 − t)·ε + t·x_1, target velocity u = x_1 − ε, and the
  Euler sampler integrates dx/dt = v(x, t) from t = 0 to 1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

SCHEDULES = ("squaredcos_cap_v2", "cosine", "linear")
PREDICTIONS = ("epsilon", "v")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A discrete noise schedule of K steps: betas, alphas = 1 − β, alpha_bars = Πα."""

    betas_K: jax.Array
    alpha_bars_K: jax.Array

    @property
    def num_steps(self) -> int:
        return self.betas_K.shape[0]


def make_schedule(name: str, num_steps: int) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"noise schedule {name!r} is unknown; choose one of {list(SCHEDULES)}")
    if num_steps < 1:
        raise ValueError(f"a noise schedule needs at least one step, not {num_steps}")
    if name == "linear":
        scale = 1000.0 / num_steps
        betas = jnp.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=jnp.float32)
    else:
        betas = cosine_betas(num_steps)
    return Schedule(betas, jnp.cumprod(1.0 - betas))


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> jax.Array:
    """β_k = 1 − ᾱ(k+1)/ᾱ(k) for ᾱ(τ) = cos²((τ/K + s)/(1 + s)·π/2), clipped at max_beta."""
    def alpha_bar(tau):
        return math.cos((tau / num_steps + s) / (1 + s) * math.pi / 2) ** 2

    return jnp.asarray([min(1 - alpha_bar(k + 1) / alpha_bar(k), max_beta) for k in range(num_steps)],
                       jnp.float32)


def _expand(x, coef):
    """A per-element coefficient [...] against x [..., A]."""
    return jnp.asarray(coef)[..., None]


def _sig(schedule: Schedule, k):
    """sqrt(ᾱ_k), sqrt(1 − ᾱ_k) for integer steps k of any shape."""
    ab = schedule.alpha_bars_K[k]
    return jnp.sqrt(ab), jnp.sqrt(1.0 - ab)


def noisy(schedule: Schedule, x0, noise, k):
    """x_k = sqrt(ᾱ_k)·x_0 + sqrt(1 − ᾱ_k)·ε, k per element (shape x0.shape[:-1] or broadcastable)."""
    a, s = _sig(schedule, jnp.broadcast_to(k, x0.shape[:-1]))
    return _expand(x0, a) * x0 + _expand(x0, s) * noise


def diffusion_target(schedule: Schedule, x0, noise, k, prediction: str):
    if prediction == "epsilon":
        return noise
    if prediction == "v":
        a, s = _sig(schedule, jnp.broadcast_to(k, x0.shape[:-1]))
        return _expand(x0, a) * noise - _expand(x0, s) * x0
    raise ValueError(f"prediction {prediction!r} is unknown; choose one of {list(PREDICTIONS)}")


def x0_and_eps(schedule: Schedule, x_k, k, model_out, prediction: str):
    """(x̂_0, ε̂) from the model's output at step k."""
    a, s = _sig(schedule, jnp.broadcast_to(k, x_k.shape[:-1]))
    a, s = _expand(x_k, a), _expand(x_k, s)
    if prediction == "epsilon":
        eps = model_out
        return (x_k - s * eps) / a, eps
    if prediction == "v":
        # v = a·ε − s·x0 and x_k = a·x0 + s·ε (a² + s² = 1): x0 = a·x_k − s·v, ε = s·x_k + a·v
        return a * x_k - s * model_out, s * x_k + a * model_out
    raise ValueError(f"prediction {prediction!r} is unknown; choose one of {list(PREDICTIONS)}")


def diffusion_loss(model_fn: ModelFn, schedule: Schedule, x0, key, prediction: str = "epsilon", k=None,
                   mask=None):
    """Mean squared error of the model's prediction at random steps (uniform per element
    unless `k` is given). `mask` (shape x0.shape[:-1], 1 = counts) excludes elements,
    e.g. a clean prefix."""
    k_key, n_key = jax.random.split(key)
    if k is None:
        k = jax.random.randint(k_key, x0.shape[:-1], 0, schedule.num_steps)
    k = jnp.broadcast_to(k, x0.shape[:-1])
    noise = jax.random.normal(n_key, x0.shape, x0.dtype)
    out = model_fn(noisy(schedule, x0, noise, k), k.astype(jnp.float32))
    err = jnp.mean((out - diffusion_target(schedule, x0, noise, k, prediction)) ** 2, axis=-1)
    return _masked_mean(err, mask)


def ddpm_sample(model_fn: ModelFn, schedule: Schedule, shape, key, prediction: str = "epsilon",
                clip: float | None = None):
    """Ancestral DDPM from x_{K-1} ~ N(0, I) to x_0, posterior ("fixed_small") variance.
    `clip`: clamp x̂_0 to [−clip, clip] each step (Diffusion Policy's clip_sample)."""
    K = schedule.num_steps
    betas, ab = schedule.betas_K, schedule.alpha_bars_K
    ab_prev = jnp.concatenate([jnp.ones((1,), ab.dtype), ab[:-1]])
    key, init = jax.random.split(key)
    x = jax.random.normal(init, shape, jnp.float32)

    def step(x, inputs):
        k, step_key = inputs
        k_arr = jnp.full(shape[:-1], k)
        x0, _ = x0_and_eps(schedule, x, k_arr, model_fn(x, k_arr.astype(jnp.float32)), prediction)
        if clip is not None:
            x0 = jnp.clip(x0, -clip, clip)
        # Posterior q(x_{k-1} | x_k, x0): mean c0·x0 + ck·x_k, variance β̃_k.
        c0 = jnp.sqrt(ab_prev[k]) * betas[k] / (1 - ab[k])
        ck = jnp.sqrt(1 - betas[k]) * (1 - ab_prev[k]) / (1 - ab[k])
        var = betas[k] * (1 - ab_prev[k]) / (1 - ab[k])
        noise = jax.random.normal(step_key, shape, jnp.float32)
        return c0 * x0 + ck * x + jnp.where(k > 0, jnp.sqrt(var), 0.0) * noise, None

    ks = jnp.arange(K - 1, -1, -1)
    x, _ = jax.lax.scan(step, x, (ks, jax.random.split(key, K)))
    return x


def ddim_sample(model_fn: ModelFn, schedule: Schedule, shape, key, num_steps: int,
                prediction: str = "epsilon", eta: float = 0.0, clip: float | None = None):
    """DDIM over `num_steps` evenly spaced steps of the schedule (eta 0: deterministic)."""
    K = schedule.num_steps
    if not 1 <= num_steps <= K:
        raise ValueError(f"DDIM num_steps = {num_steps} must lie in [1, {K}] (the schedule's steps)")
    ab = schedule.alpha_bars_K
    ks = jnp.asarray([round(i * (K - 1) / max(num_steps - 1, 1)) for i in range(num_steps)][::-1], jnp.int32)
    ks_prev = jnp.concatenate([ks[1:], jnp.full((1,), -1, jnp.int32)])
    key, init = jax.random.split(key)
    x = jax.random.normal(init, shape, jnp.float32)

    def step(x, inputs):
        k, k_prev, step_key = inputs
        k_arr = jnp.full(shape[:-1], k)
        x0, eps = x0_and_eps(schedule, x, k_arr, model_fn(x, k_arr.astype(jnp.float32)), prediction)
        if clip is not None:
            x0 = jnp.clip(x0, -clip, clip)
            eps = (x - jnp.sqrt(ab[k]) * x0) / jnp.sqrt(1 - ab[k])
        ab_p = jnp.where(k_prev >= 0, ab[jnp.maximum(k_prev, 0)], 1.0)
        sigma = eta * jnp.sqrt((1 - ab_p) / (1 - ab[k]) * (1 - ab[k] / ab_p))
        noise = jax.random.normal(step_key, shape, jnp.float32)
        x = jnp.sqrt(ab_p) * x0 + jnp.sqrt(jnp.maximum(1 - ab_p - sigma**2, 0.0)) * eps + sigma * noise
        return x, None

    x, _ = jax.lax.scan(step, x, (ks, ks_prev, jax.random.split(key, num_steps)))
    return x


# ---------------------------------------------------------------------------- flow


def flow_interpolate(x1, noise, t):
    """(x_t, u): x_t = (1 − t)·ε + t·x_1 and the target velocity u = x_1 − ε, t per element."""
    t = _expand(x1, jnp.broadcast_to(t, x1.shape[:-1]))
    return (1 - t) * noise + t * x1, x1 - noise


def flow_loss(model_fn: ModelFn, x1, key, t=None, mask=None):
    """Rectified-flow loss ‖v(x_t, t) − (x_1 − ε)‖²; t ~ U[0, 1) per element unless given."""
    t_key, n_key = jax.random.split(key)
    if t is None:
        t = jax.random.uniform(t_key, x1.shape[:-1])
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x1.shape[:-1])
    noise = jax.random.normal(n_key, x1.shape, x1.dtype)
    x_t, u = flow_interpolate(x1, noise, t)
    err = jnp.mean((model_fn(x_t, t) - u) ** 2, axis=-1)
    return _masked_mean(err, mask)


def euler_sample(model_fn: ModelFn, shape, key, num_steps: int):
    """Integrates dx/dt = v(x, t) from noise at t = 0 to data at t = 1 in `num_steps` Euler steps."""
    if num_steps < 1:
        raise ValueError(f"Euler num_steps = {num_steps} must be at least 1")
    x = jax.random.normal(key, shape, jnp.float32)
    dt = 1.0 / num_steps

    def step(x, i):
        t = jnp.full(shape[:-1], i * dt)
        return x + dt * model_fn(x, t), None

    x, _ = jax.lax.scan(step, x, jnp.arange(num_steps, dtype=jnp.float32))
    return x


def _masked_mean(err, mask):
    if mask is None:
        return jnp.mean(err)
    mask = jnp.broadcast_to(mask, err.shape).astype(err.dtype)
    return jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask), 1.0)
