"""Diffusion / flow-matching action-chunk policies trained on scripted demos.

Variants, chosen by the argument after the colon:

  metaworld  What it shows: a state-based chunk policy imitates Meta-World's
             scripted expert on one task (env.task, any v3 name, "reach" or
             "reach-v3"). 50 expert demos (successful episodes only; the
             expert's own measured success rate is stored with them), DiT
             denoiser, rectified flow, H=16 actions predicted from T_o=2
             observations, 8 executed before replanning (Diffusion Policy's
             low-dim horizons), 20k steps of batch 256. Hardware: a GPU
             (MuJoCo evaluates on the CPU either way); on a 2-core CPU a step
             of this DiT (width 128, depth 4) takes about 1 s, so there use
             width 64, depth 2, batch 64, lr 1e-3, 3000 steps: measured
             2026-11-29 on reach, 96% over 50 episodes (expert 100%) after 5
             min of training (docs/REPRODUCTIONS.md).
             python -m atoll.experiments.train_policy --config=atoll/configs/policy.py:metaworld \
                 --config.env.task=push --workdir=runs/push
             python -m atoll.experiments.eval_policy --checkpoint=runs/push --episodes=100 --seeds=1000,1001
  intercept  The JAX suite's intercept task (a point mass catches a target that
  waypoints  changes velocity at random times; or tracks a goal through
             waypoints): thousands of evaluation episodes in parallel under
             vmap/scan, the fast bench for real-time execution. H=8, s=4.
             Measured (intercept, 2026-11-29, 1500 of the 4000 steps, about 12
             min on a loaded 2-core CPU; colab/robot_policy.ipynb): 80% success
             over 500 episodes with s=4 (s=1: 91%, s=8: 44%); the expert 100%.
             python -m atoll.experiments.train_policy --config=atoll/configs/policy.py:intercept --workdir=runs/icpt
  tiny       intercept with a small DiT (width 64, 2 blocks), chunks of H=4 with
             s=2 executed, 400 steps on one device: the test and notebook size.
             Measured 2026-11-29: 90.6% success over its 128 evaluation
             episodes (expert 100%; 300 steps: 85%) after 17 s of training on
             a 2-core CPU.

Fields (shapes: H = policy.action_horizon, T_o = policy.obs_horizon,
s = policy.execute_steps):
  env.suite       metaworld | jax;  env.task: the task name;  env.max_steps:
                  episode limit (0: the task's default; Meta-World uses 500).
  data            num_demos successful expert episodes generated with seed
                  data.seed (cached under data.cache_dir, default
                  $ATOLL_CACHE/demos); data.path: use this .npz instead.
  policy.conditioning  none | prefix (training-time RTC: clean prefixes of
                  d ~ U{0..max_delay} actions) | vlash (robot state offset by
                  δ ~ U{0..max_delay} steps) | faster (prefix + per-action
                  clocks) | remac (prefix, with REMAC's self-conditioning:
                  the prefixes blend from the demo's own actions into the
                  stale plans of a frozen policy, policy.frozen_policy = a
                  train_policy workdir of the same task, over the first
                  policy.self_condition_steps steps, 0 = half the run): the
                  training the real-time strategies need (atoll.core.chunking;
                  eval with --strategy).
  model.net       dit (dim, depth, heads) | unet (channels, cond_dim, kernel, groups).
  objective       kind flow | ddpm; ddpm: prediction epsilon | v, schedule,
                  diffusion_steps K, sampler ddim | ddpm; sample_steps: Euler or
                  DDIM steps per chunk (the network calls at run time).
  normalizer      limits (to [-1, 1], Diffusion Policy's) | gaussian.
  train           AdamW with warmup + cosine; ema (Diffusion Policy's warmup EMA,
                  power 0.75) evaluated and saved beside the raw weights.
  eval            episodes from seed eval.seed on (disjoint from the demo seed)
                  every eval_every steps and at the end.
  mesh            data-parallel over the first mesh.data devices (-1: all of them).
"""

from __future__ import annotations

import ml_collections

from atoll.configs import validation as v

VARIANTS = ("metaworld", "intercept", "waypoints", "tiny")


def get_config(variant: str = "metaworld") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise v.ConfigError(f"policy config variant {variant!r} is unknown; choose one of {list(VARIANTS)}")
    c = ml_collections.ConfigDict()
    c.variant = variant
    c.seed = 0

    c.env = ml_collections.ConfigDict()
    c.env.suite = "metaworld"
    c.env.task = "reach-v3"
    c.env.max_steps = 500

    c.data = ml_collections.ConfigDict()
    c.data.num_demos = 50
    c.data.seed = 0
    c.data.cache_dir = ""
    c.data.path = ""

    c.policy = ml_collections.ConfigDict()
    c.policy.obs_horizon = 2
    c.policy.action_horizon = 16
    c.policy.execute_steps = 8
    c.policy.conditioning = "none"
    c.policy.max_delay = 0
    c.policy.frozen_policy = ""
    c.policy.self_condition_steps = 0

    c.model = ml_collections.ConfigDict()
    c.model.net = "dit"
    c.model.dim = 128
    c.model.depth = 4
    c.model.heads = 4
    c.model.channels = (64, 128, 256)
    c.model.cond_dim = 128
    c.model.kernel = 5
    c.model.groups = 8

    c.objective = ml_collections.ConfigDict()
    c.objective.kind = "flow"
    c.objective.prediction = "epsilon"
    c.objective.schedule = "squaredcos_cap_v2"
    c.objective.diffusion_steps = 100
    c.objective.sampler = "ddim"
    c.objective.sample_steps = 10
    c.normalizer = "limits"

    c.train = ml_collections.ConfigDict()
    c.train.steps = 20_000
    c.train.batch_size = 256
    c.train.lr = 3e-4
    c.train.weight_decay = 1e-6
    c.train.warmup_steps = 500
    c.train.grad_clip = 1.0
    c.train.ema = True
    c.train.ema_power = 0.75
    c.train.log_every = 100
    c.train.checkpoint_every = 2000

    c.eval = ml_collections.ConfigDict()
    c.eval.seed = 1000
    c.eval.every = 5000
    c.eval.episodes = 20
    c.eval.final_episodes = 50

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1

    if variant in ("intercept", "waypoints", "tiny"):
        c.env.suite = "jax"
        c.env.task = "waypoints" if variant == "waypoints" else "intercept"
        c.env.max_steps = 0
        c.data.num_demos = 200
        c.policy.action_horizon = 8
        c.policy.execute_steps = 4
        c.model.dim, c.model.depth = 64, 3
        c.train.steps = 4000
        c.train.warmup_steps = 200
        c.train.log_every = 50
        c.train.checkpoint_every = 1000
        c.eval.every = 1000
        c.eval.episodes = 256
        c.eval.final_episodes = 1000
    if variant == "tiny":
        c.data.num_demos = 64
        c.policy.action_horizon, c.policy.execute_steps = 4, 2
        c.model.dim, c.model.depth, c.model.heads = 64, 2, 2
        c.objective.sample_steps = 5
        c.train.steps = 400
        c.train.batch_size = 128
        c.train.lr = 2e-3
        c.train.warmup_steps = 30
        c.train.log_every = 50
        c.train.checkpoint_every = 200
        c.eval.every = 200
        c.eval.episodes = 128  # = final_episodes: one compiled rollout serves both
        c.eval.final_episodes = 128
        c.mesh.data = 1  # a model this small gains nothing from splitting its batch over CPU devices
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first bad field."""
    from atoll.core.chunk_policy import NETWORKS, OBJECTIVES, SAMPLERS  # configs stay import-light
    from atoll.core.chunking import CONDITIONING
    from atoll.core.diffusion import PREDICTIONS, SCHEDULES
    from atoll.core.policy import NORMALIZER_MODES

    v.choice(c, "env.suite", ("metaworld", "jax"))
    v.non_negative(c, "env.max_steps", "data.seed", "eval.seed", "seed")
    v.positive(c, "data.num_demos", "policy.obs_horizon", "policy.action_horizon", "policy.execute_steps")
    if c.policy.execute_steps > c.policy.action_horizon:
        raise v.ConfigError(f"config.policy.execute_steps = {c.policy.execute_steps} must be at most "
                            f"config.policy.action_horizon = {c.policy.action_horizon} (a chunk holds H actions)")
    v.choice(c, "policy.conditioning", CONDITIONING)
    v.non_negative(c, "policy.max_delay", "policy.self_condition_steps")
    if c.policy.conditioning != "remac" and (c.policy.frozen_policy or c.policy.self_condition_steps):
        raise v.ConfigError("config.policy.frozen_policy and self_condition_steps belong to conditioning 'remac'; "
                            f"this run's conditioning is {c.policy.conditioning!r}")
    if c.policy.self_condition_steps > c.train.steps:
        raise v.ConfigError(f"config.policy.self_condition_steps = {c.policy.self_condition_steps} exceeds "
                            f"config.train.steps = {c.train.steps}: the frozen plans would never take over")
    if c.policy.conditioning != "none":
        if c.policy.conditioning != "vlash" and c.objective.kind != "flow":
            raise v.ConfigError(f"config.policy.conditioning = {c.policy.conditioning!r} trains a flow sampler's "
                                f"prefix; config.objective.kind must be 'flow', not {c.objective.kind!r}")
        if c.policy.conditioning == "remac" and not c.policy.frozen_policy:
            raise v.ConfigError("config.policy.conditioning = 'remac' learns from a frozen policy's plans: set "
                                "config.policy.frozen_policy to a train_policy workdir of the same task")
        if not 1 <= c.policy.max_delay < c.policy.action_horizon:
            raise v.ConfigError(f"config.policy.max_delay = {c.policy.max_delay} must lie in [1, "
                                f"{c.policy.action_horizon - 1}] (below action_horizon) with conditioning "
                                f"{c.policy.conditioning!r}")
    v.choice(c, "model.net", NETWORKS)
    if c.model.net == "dit":
        v.positive(c, "model.dim", "model.depth", "model.heads")
        v.divides(c, "model.heads", "model.dim", "attention heads split the width")
    else:
        v.positive(c, "model.cond_dim", "model.kernel", "model.groups")
        levels = len(c.model.channels)
        if c.policy.action_horizon % 2 ** (levels - 1):
            raise v.ConfigError(f"config.policy.action_horizon = {c.policy.action_horizon} must be divisible by "
                                f"{2 ** (levels - 1)} for a U-Net with {levels} levels (config.model.channels)")
        for ch in c.model.channels:
            if ch % c.model.groups:
                raise v.ConfigError(f"config.model.channels {tuple(c.model.channels)} must all be divisible by "
                                    f"config.model.groups = {c.model.groups} (GroupNorm)")
    v.choice(c, "objective.kind", OBJECTIVES)
    v.choice(c, "objective.prediction", PREDICTIONS)
    v.choice(c, "objective.schedule", SCHEDULES)
    v.choice(c, "objective.sampler", SAMPLERS)
    v.positive(c, "objective.diffusion_steps", "objective.sample_steps")
    if c.objective.kind == "ddpm" and c.objective.sampler == "ddim" and \
            c.objective.sample_steps > c.objective.diffusion_steps:
        raise v.ConfigError(f"config.objective.sample_steps = {c.objective.sample_steps} (DDIM) cannot exceed "
                            f"config.objective.diffusion_steps = {c.objective.diffusion_steps}")
    v.choice(c, "normalizer", NORMALIZER_MODES)
    v.positive(c, "train.steps", "train.batch_size", "train.lr", "train.log_every", "train.checkpoint_every",
               "eval.every", "eval.episodes", "eval.final_episodes")
    v.non_negative(c, "train.weight_decay", "train.warmup_steps", "train.grad_clip")
    v.in_range(c, "train.ema_power", 0.0, 1.0)
    for axis, size in c.mesh.items():
        if not isinstance(size, int) or size == 0 or size < -1:
            raise v.ConfigError(f"config.mesh.{axis} = {size!r} must be a positive int or -1")


# Fields added after runs were saved: a saved config.json without them had these values.
ADDED_DEFAULTS = {("policy", "frozen_policy"): "", ("policy", "self_condition_steps"): 0}


def with_added_defaults(saved: dict) -> dict:
    """A saved config (a plain dict from config.json) with the fields added since filled in."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for (section, key), value in ADDED_DEFAULTS.items():
        if isinstance(out.get(section), dict):
            out[section].setdefault(key, value)
    return out
