"""Action-chunk policy networks, data normalization and weight EMA.

Denoisers `(x_BHA, time_BH, obs_BTO) -> out_BHA` for atoll.core.diffusion: an
action chunk of H actions (A dims each), a per-action noise level (diffusion
step k or flow time t, whatever the objective feeds), and an observation
history of T_o steps (O dims each). Both networks embed the noise level per
action, so each action of a chunk can sit at its own noise level.

  DiTDenoiser      a transformer over the H action tokens, conditioned by
                   adaLN-Zero (shift, scale and gate of every LayerNorm from
                   the token's noise-level embedding plus the observation
                   embedding); bidirectional attention within the chunk.
  ConvUNetDenoiser Diffusion Policy's 1-D temporal U-Net: residual Conv1D
                   blocks (GroupNorm, Mish) with FiLM (per-channel scale and
                   bias) from the same conditioning, pooled along the chunk at
                   each resolution.

Normalizer: per-dimension affine maps fitted on a dataset ("limits": min/max
to [-1, 1] as Diffusion Policy; "gaussian": zero mean, unit variance), a plain
pytree of arrays so it is saved with the checkpoint. ema_decay/ema_update:
Diffusion Policy's warmup EMA.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NORMALIZER_MODES = ("limits", "gaussian")


# -------------------------------------------------------------------- normalization


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Normalizer:
    """y = (x − offset) / scale per dimension (last axis)."""

    offset_D: jax.Array
    scale_D: jax.Array

    def normalize(self, x):
        return (x - self.offset_D) / self.scale_D

    def unnormalize(self, y):
        return y * self.scale_D + self.offset_D


def fit_normalizer(x_ND, mode: str = "limits", eps: float = 1e-6) -> Normalizer:
    """Fits per-dimension statistics over all leading axes of x [..., D].

    "limits" maps [min, max] to [−1, 1]; "gaussian" to zero mean and unit
    variance. A constant dimension keeps scale 1 (it maps to 0), so nothing
    divides by zero."""
    if mode not in NORMALIZER_MODES:
        raise ValueError(f"normalizer mode {mode!r} is unknown; choose one of {list(NORMALIZER_MODES)}")
    x = np.asarray(x_ND, np.float64).reshape(-1, np.shape(x_ND)[-1])
    if x.shape[0] == 0:
        raise ValueError("cannot fit a normalizer on an empty dataset")
    if mode == "limits":
        lo, hi = x.min(0), x.max(0)
        offset, scale = (hi + lo) / 2, (hi - lo) / 2
    else:
        offset, scale = x.mean(0), x.std(0)
    scale = np.where(scale < eps, 1.0, scale)
    return Normalizer(jnp.asarray(offset, jnp.float32), jnp.asarray(scale, jnp.float32))


# ---------------------------------------------------------------------------- EMA


def ema_decay(step, inv_gamma: float = 1.0, power: float = 0.75, min_decay: float = 0.0,
              max_decay: float = 0.9999):
    """Warmup EMA decay 1 − (1 + step/inv_gamma)^−power, clipped to [min_decay, max_decay]
    (Diffusion Policy's defaults: it starts at 0, reaches 0.999 near step 10^4)."""
    decay = 1.0 - (1.0 + jnp.asarray(step, jnp.float32) / inv_gamma) ** -power
    return jnp.clip(decay, min_decay, max_decay)


def ema_update(ema_params, params, decay):
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema_params, params)


# --------------------------------------------------------------------- conditioning


def noise_level_embedding(time_BH, dim: int, max_period: float = 10_000.0):
    """Sinusoidal features of a per-action noise level [B, H] -> [B, H, dim]."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    angles = jnp.asarray(time_BH, jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class Conditioning(nn.Module):
    """Per-action conditioning [B, H, D]: an MLP of the noise level's sinusoidal
    features plus an MLP of the flattened observation history."""

    dim: int
    time_scale: float = 1.0  # flow time in [0, 1] reads better scaled up (e.g. 1000)

    @nn.compact
    def __call__(self, time_BH, obs_BTO):
        t = noise_level_embedding(time_BH * self.time_scale, self.dim)
        t = nn.Dense(self.dim)(nn.silu(nn.Dense(self.dim)(t)))
        o = obs_BTO.reshape(obs_BTO.shape[0], -1)
        o = nn.Dense(self.dim)(nn.silu(nn.Dense(self.dim)(o)))
        return t + o[:, None, :]


# ------------------------------------------------------------------------------ DiT


class DiTBlock(nn.Module):
    dim: int
    heads: int
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x_BHD, c_BHD):
        # adaLN-Zero: shift/scale/gate for the attention and the MLP, from the conditioning; zero
        # init, so each block starts as the identity.
        mod = nn.Dense(6 * self.dim, kernel_init=nn.initializers.zeros)(nn.silu(c_BHD))
        sh1, sc1, g1, sh2, sc2, g2 = jnp.split(mod, 6, axis=-1)
        h = nn.LayerNorm(use_scale=False, use_bias=False)(x_BHD) * (1 + sc1) + sh1
        h = nn.MultiHeadDotProductAttention(num_heads=self.heads)(h, h)
        x_BHD = x_BHD + g1 * h
        h = nn.LayerNorm(use_scale=False, use_bias=False)(x_BHD) * (1 + sc2) + sh2
        h = nn.Dense(self.dim)(nn.gelu(nn.Dense(self.mlp_ratio * self.dim)(h)))
        return x_BHD + g2 * h


class DiTDenoiser(nn.Module):
    action_dim: int
    dim: int = 128
    depth: int = 4
    heads: int = 4
    time_scale: float = 1.0

    @nn.compact
    def __call__(self, x_BHA, time_BH, obs_BTO):
        B, H, _ = x_BHA.shape
        c = Conditioning(self.dim, self.time_scale)(jnp.broadcast_to(time_BH, (B, H)), obs_BTO)
        pos = self.param("pos_HD", nn.initializers.normal(0.02), (H, self.dim))
        x = nn.Dense(self.dim)(x_BHA) + pos
        for i in range(self.depth):
            x = DiTBlock(self.dim, self.heads, name=f"block_{i}")(x, c)
        shift, scale = jnp.split(nn.Dense(2 * self.dim, kernel_init=nn.initializers.zeros)(nn.silu(c)), 2, -1)
        x = nn.LayerNorm(use_scale=False, use_bias=False)(x) * (1 + scale) + shift
        return nn.Dense(self.action_dim, kernel_init=nn.initializers.zeros)(x)


# ----------------------------------------------------------------------- 1-D U-Net


class FiLMResBlock(nn.Module):
    channels: int
    kernel: int = 5
    groups: int = 8

    @nn.compact
    def __call__(self, x_BHC, c_BHD):
        h = nn.Conv(self.channels, (self.kernel,))(x_BHC)
        h = jax.nn.mish(nn.GroupNorm(num_groups=self.groups)(h))
        scale, bias = jnp.split(nn.Dense(2 * self.channels)(jax.nn.mish(c_BHD)), 2, -1)
        h = h * (1 + scale) + bias
        h = nn.Conv(self.channels, (self.kernel,))(h)
        h = jax.nn.mish(nn.GroupNorm(num_groups=self.groups)(h))
        skip = x_BHC if x_BHC.shape[-1] == self.channels else nn.Conv(self.channels, (1,))(x_BHC)
        return h + skip


def _pool2(c_BHD):
    B, H, D = c_BHD.shape
    return c_BHD.reshape(B, H // 2, 2, D).mean(2)


class ConvUNetDenoiser(nn.Module):
    action_dim: int
    channels: tuple[int, ...] = (64, 128, 256)
    cond_dim: int = 128
    kernel: int = 5
    groups: int = 8
    time_scale: float = 1.0

    @nn.compact
    def __call__(self, x_BHA, time_BH, obs_BTO):
        B, H, _ = x_BHA.shape
        levels = len(self.channels)
        if H % 2 ** (levels - 1):
            raise ValueError(f"ConvUNetDenoiser with {levels} levels needs a chunk length divisible by "
                             f"{2 ** (levels - 1)}, not {H}")
        c = Conditioning(self.cond_dim, self.time_scale)(jnp.broadcast_to(time_BH, (B, H)), obs_BTO)
        block = lambda ch, name: FiLMResBlock(ch, self.kernel, self.groups, name=name)  # noqa: E731
        x, skips, conds = x_BHA, [], []
        for i, ch in enumerate(self.channels):
            x = block(ch, f"down_{i}_a")(x, c)
            x = block(ch, f"down_{i}_b")(x, c)
            skips.append(x)
            conds.append(c)
            if i < levels - 1:
                x = nn.Conv(ch, (3,), strides=(2,), name=f"downsample_{i}")(x)
                c = _pool2(c)
        x = block(self.channels[-1], "mid_a")(x, c)
        x = block(self.channels[-1], "mid_b")(x, c)
        for i in reversed(range(levels)):
            x = jnp.concatenate([x, skips[i]], -1)
            x = block(self.channels[i], f"up_{i}_a")(x, conds[i])
            x = block(self.channels[i], f"up_{i}_b")(x, conds[i])
            if i > 0:
                x = nn.ConvTranspose(self.channels[i - 1], (4,), strides=(2,), name=f"upsample_{i}")(x)
        x = jax.nn.mish(nn.GroupNorm(num_groups=self.groups)(nn.Conv(self.channels[0], (self.kernel,))(x)))
        return nn.Conv(self.action_dim, (1,), kernel_init=nn.initializers.zeros)(x)
