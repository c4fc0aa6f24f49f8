"""A generative action-chunk policy: denoiser + objective + observation history.

Glue between the networks (atoll.core.policy) and the generative core
(atoll.core.diffusion), so the trainer, the evaluators and the notebook share
one definition of "train on a chunk" and "sample a chunk":

  training_loss(apply, objective, actions_BHA, obs_BTO, key)   one scalar
  sample_chunk(apply, objective, obs_BTO, key, H, A)          actions_BHA

Both work in normalized units; `ChunkPolicy.act` wraps sampling with the
normalizers (raw observations in, raw actions out).

Time per chunk: every action of a training chunk shares one noise level (one
flow time t or diffusion step k per sample, as Diffusion Policy and π0 train).
The denoisers accept per-action time, so prefix conditioning (issue 10) only
changes the time tensor and the loss mask passed here.

Time conditioning scale: diffusion feeds the step index k ∈ [0, K) to the
network, flow feeds t ∈ [0, 1]; `Objective.time_scale` maps flow time onto the
same range (t·K), so the sinusoidal embedding sees comparable frequencies.

Observation history (T_o steps, oldest first): `history_init` repeats the
first observation (Diffusion Policy's padding at an episode's start) and
`history_push` shifts in the newest one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from atoll.core import chunking, diffusion
from atoll.core import policy as policy_nets

OBJECTIVES = ("flow", "ddpm")
SAMPLERS = ("ddim", "ddpm")
NETWORKS = ("dit", "unet")

ApplyFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]  # (x_BHA, time_BH, obs_BTO) -> out_BHA


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the denoiser learns and how a chunk is sampled.

    kind "flow": rectified flow (t: 0 noise → 1 data), Euler with sample_steps.
    kind "ddpm": diffusion over diffusion_steps steps (schedule, prediction
    "epsilon" | "v"), sampled by DDIM in sample_steps or by full ancestral DDPM
    (sampler "ddpm" ignores sample_steps). clip: x̂_0 clamp in normalized units
    (Diffusion Policy's clip_sample; actions normalized by "limits" lie in
    [−1, 1]); None turns it off.
    """

    kind: str = "flow"
    prediction: str = "epsilon"
    schedule: str = "squaredcos_cap_v2"
    diffusion_steps: int = 100
    sampler: str = "ddim"
    sample_steps: int = 10
    clip: float | None = 1.0

    def __post_init__(self):
        if self.kind not in OBJECTIVES:
            raise ValueError(f"objective {self.kind!r} is unknown; choose one of {list(OBJECTIVES)}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r} is unknown; choose one of {list(SAMPLERS)}")
        if self.prediction not in diffusion.PREDICTIONS:
            raise ValueError(f"prediction {self.prediction!r} is unknown; choose one of {list(diffusion.PREDICTIONS)}")
        if self.schedule not in diffusion.SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is unknown; choose one of {list(diffusion.SCHEDULES)}")
        if self.sample_steps < 1 or self.diffusion_steps < 1:
            raise ValueError("sample_steps and diffusion_steps must be at least 1")
        if self.kind == "ddpm" and self.sampler == "ddim" and self.sample_steps > self.diffusion_steps:
            raise ValueError(f"DDIM sample_steps ({self.sample_steps}) cannot exceed diffusion_steps "
                             f"({self.diffusion_steps})")

    @property
    def time_scale(self) -> float:
        return float(self.diffusion_steps) if self.kind == "flow" else 1.0

    @property
    def network_evaluations(self) -> int:
        """Denoiser calls per sampled chunk (the latency that matters at run time)."""
        if self.kind == "ddpm" and self.sampler == "ddpm":
            return self.diffusion_steps
        return self.sample_steps

    def schedule_arrays(self) -> diffusion.Schedule:
        return diffusion.make_schedule(self.schedule, self.diffusion_steps)


def make_denoiser(net: str, action_dim: int, objective: Objective, **sizes: Any) -> nn.Module:
    """A DiT ("dit": dim, depth, heads) or a 1-D conv U-Net ("unet": channels, cond_dim, kernel, groups)."""
    if net == "dit":
        return policy_nets.DiTDenoiser(action_dim, time_scale=objective.time_scale, **sizes)
    if net == "unet":
        sizes = {k: tuple(v) if k == "channels" else v for k, v in sizes.items()}
        return policy_nets.ConvUNetDenoiser(action_dim, time_scale=objective.time_scale, **sizes)
    raise ValueError(f"network {net!r} is unknown; choose one of {list(NETWORKS)}")


def training_loss(apply: ApplyFn, objective: Objective, actions_BHA, obs_BTO, key, conditioning: str = "none",
                  max_delay: int = 0, faster_alpha: float = 0.6, faster_mix: float = 0.5,
                  source_BHA=None, source_weight=0.0) -> jax.Array:
    """The objective's loss on a batch of normalized chunks, one noise level per chunk.

    conditioning "prefix" (training-time RTC): each chunk keeps a clean prefix
    of d ~ U{0..max_delay} actions (flow time 1, excluded from the loss), so the
    sampler can hold committed actions fixed. "remac": the same, with REMAC's
    self-conditioning: the prefix rows are (1 - w)·the demo's own actions +
    w·source_BHA (a frozen policy's stale plan for the same steps), w =
    source_weight (annealed 0 -> 1 by the trainer, REMAC's σ = 1 - w); the free
    rows still learn the demo's actions. "faster": prefixes, and with
    probability faster_mix the free actions run on FASTER's per-action clocks
    (chunking.faster_times) instead of one shared time. "vlash" and "none" train
    plainly (VLASH's offsets live in the data windows)."""
    model_fn = lambda x, time: apply(x, time, obs_BTO)  # noqa: E731
    B, H = actions_BHA.shape[:2]
    t_key, d_key, m_key, key = jax.random.split(key, 4)
    if conditioning in chunking.PREFIX_TRAINED:
        if objective.kind != "flow":
            raise ValueError(f"conditioning {conditioning!r} needs the flow objective, not {objective.kind!r}")
        d_B = jax.random.randint(d_key, (B,), 0, max_delay + 1)
        prefix_BH = jnp.arange(H) < d_B[:, None]
        t_BH = jnp.broadcast_to(jax.random.uniform(t_key, (B, 1)), (B, H))
        if conditioning == "faster":
            n = objective.sample_steps
            u_BH = chunking.faster_offsets(H, d_B, faster_alpha, (n - 1) / n)
            staggered = jax.random.uniform(m_key, (B, 1)) < faster_mix
            t_BH = jnp.where(staggered, chunking.faster_times(t_BH[:, 0], u_BH), t_BH)
        t_BH = jnp.where(prefix_BH, 1.0, t_BH)
        if conditioning == "remac":
            if source_BHA is None:
                raise ValueError("conditioning 'remac' needs source_BHA, the frozen policy's plans for the prefix")
            mixed_BHA = (1.0 - source_weight) * actions_BHA + source_weight * source_BHA
            actions_BHA = jnp.where(prefix_BH[..., None], mixed_BHA, actions_BHA)
        # Clean actions (the prefix, and FASTER's finished clocks) carry no noise to
        # predict: their target x_1 − ε is unknowable from x_t = x_1, so they do not count.
        return diffusion.flow_loss(model_fn, actions_BHA, key, t=t_BH, mask=t_BH < 1.0)
    if objective.kind == "flow":
        t_B1 = jax.random.uniform(t_key, (B, 1))
        return diffusion.flow_loss(model_fn, actions_BHA, key, t=t_B1)
    k_B1 = jax.random.randint(t_key, (B, 1), 0, objective.diffusion_steps)
    return diffusion.diffusion_loss(model_fn, objective.schedule_arrays(), actions_BHA, key,
                                    prediction=objective.prediction, k=k_B1)


def sample_chunk(apply: ApplyFn, objective: Objective, obs_BTO, key, horizon: int, action_dim: int) -> jax.Array:
    """A normalized chunk [B, H, A] for each observation history."""
    model_fn = lambda x, time: apply(x, time, obs_BTO)  # noqa: E731
    shape = (obs_BTO.shape[0], horizon, action_dim)
    if objective.kind == "flow":
        return diffusion.euler_sample(model_fn, shape, key, objective.sample_steps)
    schedule = objective.schedule_arrays()
    if objective.sampler == "ddpm":
        return diffusion.ddpm_sample(model_fn, schedule, shape, key, objective.prediction, clip=objective.clip)
    return diffusion.ddim_sample(model_fn, schedule, shape, key, objective.sample_steps, objective.prediction,
                                 clip=objective.clip)


def sample_for_strategy(apply: ApplyFn, objective: Objective, strategy: chunking.Strategy, obs_BTO, prev_BHA, d_plan,
                        first, execute_steps: int, key, horizon: int, action_dim: int) -> jax.Array:
    """A normalized chunk [B, H, A] conditioned as `strategy` needs on the running
    chunk prev_BHA (normalized, aligned to this cycle) and the planned delay
    d_plan (scalar or [B]); `first` (a traced bool) marks the episode's first
    chunk, which has nothing to continue. Strategies without a sampler of their
    own (sync, naive_async, temporal_ensemble, vlash, fused) sample plainly."""
    name = strategy.name
    if not strategy.guided:
        return sample_chunk(apply, objective, obs_BTO, key, horizon, action_dim)
    if objective.kind != "flow":
        raise ValueError(f"strategy {name!r} guides a flow sampler; this policy's objective is {objective.kind!r}")
    model_fn = lambda x, time: apply(x, time, obs_BTO)  # noqa: E731
    shape = (obs_BTO.shape[0], horizon, action_dim)
    n = objective.sample_steps
    d = jnp.where(first, 0, jnp.asarray(d_plan))
    if name == "rtc":
        w_BH = chunking.prefix_weights(d, execute_steps, horizon, strategy.rtc_schedule)
        w_BH = jnp.where(first, 0.0, w_BH)
        return chunking.rtc_euler(model_fn, prev_BHA, w_BH, shape, key, n, strategy.rtc_beta)
    if name in ("prefix", "remac"):
        return chunking.prefix_euler(model_fn, prev_BHA, d, shape, key, n)
    p, u_BH, _ = chunking.faster_plan(strategy, d, d, horizon, n)
    return chunking.prefix_euler(model_fn, prev_BHA, p, shape, key, n, offsets_BH=u_BH)


def history_init(obs_BO, obs_horizon: int):
    """[B, T_o, O]: the first observation repeated (works on numpy and jax arrays)."""
    xp = jnp if isinstance(obs_BO, jax.Array) else np
    return xp.repeat(obs_BO[:, None], obs_horizon, axis=1)


def history_push(obs_BTO, obs_BO):
    """Drops the oldest observation and appends the newest."""
    xp = jnp if isinstance(obs_BTO, jax.Array) else np
    return xp.concatenate([obs_BTO[:, 1:], obs_BO[:, None]], axis=1)


def normalizer_from(tree: Mapping[str, Any]) -> policy_nets.Normalizer:
    return policy_nets.Normalizer(jnp.asarray(tree["offset_D"]), jnp.asarray(tree["scale_D"]))


def normalizer_tree(norm: policy_nets.Normalizer) -> dict[str, jax.Array]:
    """A plain dict (what checkpoints store; Normalizer is rebuilt by `normalizer_from`)."""
    return {"offset_D": norm.offset_D, "scale_D": norm.scale_D}


@dataclasses.dataclass(frozen=True)
class ChunkPolicy:
    """Everything static about a trained policy; its arrays travel as `weights`:
    {"params": ..., "obs_norm": {offset_D, scale_D}, "act_norm": {...}}."""

    model: nn.Module
    objective: Objective
    obs_horizon: int
    action_horizon: int
    action_dim: int

    def act(self, weights: Mapping[str, Any], obs_BTO, key) -> jax.Array:
        """Raw observation histories [B, T_o, O] -> raw action chunks [B, H, A]."""
        obs_norm, act_norm = normalizer_from(weights["obs_norm"]), normalizer_from(weights["act_norm"])
        apply = lambda x, time, o: self.model.apply(weights["params"], x, time, o)  # noqa: E731
        chunk = sample_chunk(apply, self.objective, obs_norm.normalize(obs_BTO), key, self.action_horizon,
                             self.action_dim)
        return act_norm.unnormalize(chunk)

    def act_with(self, strategy: chunking.Strategy, execute_steps: int, weights: Mapping[str, Any], obs_BTO,
                 prev_BHA, d_plan, first, key) -> jax.Array:
        """`act` under an execution strategy: raw histories, the raw running chunk
        (aligned to this cycle) and the planned delay in, a raw chunk out."""
        obs_norm, act_norm = normalizer_from(weights["obs_norm"]), normalizer_from(weights["act_norm"])
        apply = lambda x, time, o: self.model.apply(weights["params"], x, time, o)  # noqa: E731
        chunk = sample_for_strategy(apply, self.objective, strategy, obs_norm.normalize(obs_BTO),
                                    act_norm.normalize(prev_BHA), d_plan, first, execute_steps, key,
                                    self.action_horizon, self.action_dim)
        return act_norm.unnormalize(chunk)
