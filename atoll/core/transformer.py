"""Decoder-only transformer LM as pure flax.linen modules.

Shape letters used in names throughout atoll:
  B batch, T sequence length (tokens), D model width, N query heads,
  H kv heads, K head dim, F MLP hidden width, V vocabulary size, Y layers.
Modules annotate logical axes only (`embed`, `mlp`, `heads`, `act_batch`, ...);
atoll/parallel/sharding.py maps them onto a mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from atoll.core import moe
from atoll.core.moe import MoeConfig, MoeFfn
from atoll.kernels import attention

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 32
    mlp_dim: int = 512
    tie_embeddings: bool = False
    dtype: str = "float32"  # compute dtype; params stay in param_dtype
    param_dtype: str = "float32"
    attention_impl: str | None = None  # None = best for the platform
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    scan_layers: bool = True
    remat: str = "none"
    init_std: float = 0.02
    moe: MoeConfig = MoeConfig()  # num_experts > 0: every moe.every-th block's FFN is an MoE layer
    # None | all_gather | ring | tokenring: how attention runs over a sequence split along the
    # `context` mesh axis. The model only records it; parallel/context_lm.py builds the
    # `attention_fn` that does it (None there: XLA partitions plain attention on its own).
    context_parallel: str | None = None

    @classmethod
    def from_dict(cls, d) -> "TransformerConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in dict(d).items() if k in fields}
        if "moe" in kwargs and not isinstance(kwargs["moe"], MoeConfig):
            kwargs["moe"] = MoeConfig.from_dict(kwargs["moe"])
        return cls(**kwargs)

    def is_moe_block(self, index: int) -> bool:
        return self.moe.enabled and (index + 1) % self.moe.every == 0

    def moe_blocks(self) -> list[int]:
        """Block indices whose FFN is MoE, in depth order."""
        return [i for i in range(self.num_layers) if self.is_moe_block(i)]


def _param(init_std: float, *axes: str):
    return nn.with_logical_partitioning(nn.initializers.normal(init_std), axes)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        scale_D = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x_BTD.shape[-1],), jnp.float32,
        )
        x32 = x_BTD.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale_D).astype(self.dtype)


def rotary_tables(positions_BT: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """sin and cos [B, T, 1, K/2] (fp32) of the rotary angles; computed once per
    forward pass and shared by every layer (recomputing the transcendentals
    inside each layer's fusions costs several percent of a GPU step)."""
    freqs_k = theta ** (-jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)
    angles_BTk = positions_BT[..., None].astype(jnp.float32) * freqs_k
    return jnp.sin(angles_BTk)[:, :, None], jnp.cos(angles_BTk)[:, :, None]


def rotary(x_BTNK: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotary position embedding over the last dim (pairs: first half, second half)."""
    sin, cos = rope
    x1, x2 = jnp.split(x_BTNK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTNK.dtype)


class Linear(nn.Module):
    """y = einsum(spec, x, W) with W [*kernel_shape] annotated with logical `axes`.
    (Own module rather than nn.DenseGeneral, whose reshaped-kernel init breaks
    under active logical-axis rules.)"""

    spec: str
    kernel_shape: tuple[int, ...]
    axes: tuple[str, ...]
    init_std: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", _param(self.init_std, *self.axes), self.kernel_shape, self.param_dtype)
        return jnp.einsum(self.spec, x.astype(self.dtype), kernel.astype(self.dtype))


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions.

    `attention_fn(q, k, v, *, causal, implementation)` replaces the plain
    attention call (parallel/context_lm.py: context parallelism); it sees the
    same full-sequence arrays and must return what plain attention would for
    the layout the caller feeds the model."""

    cfg: TransformerConfig
    attention_fn: Callable | None = None

    @nn.compact
    def __call__(self, x_BTD: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        c = self.cfg
        D, N, H, K = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
        lin = functools.partial(Linear, dtype=c.dtype, param_dtype=c.param_dtype)
        q_BTNK = lin("btd,dnk->btnk", (D, N, K), ("embed", "heads", "head_dim"), c.init_std, name="q")(x_BTD)
        k_BTHK = lin("btd,dhk->bthk", (D, H, K), ("embed", "kv_heads", "head_dim"), c.init_std, name="k")(x_BTD)
        v_BTHK = lin("btd,dhk->bthk", (D, H, K), ("embed", "kv_heads", "head_dim"), c.init_std, name="v")(x_BTD)
        q_BTNK = rotary(q_BTNK, rope)
        k_BTHK = rotary(k_BTHK, rope)
        q_BTNK = nn.with_logical_constraint(q_BTNK, ("act_batch", "act_length", "act_heads", None))
        k_BTHK = nn.with_logical_constraint(k_BTHK, ("act_batch", "act_length", "act_kv_heads", None))
        v_BTHK = nn.with_logical_constraint(v_BTHK, ("act_batch", "act_length", "act_kv_heads", None))
        attend = attention if self.attention_fn is None else self.attention_fn
        o_BTNK = attend(q_BTNK, k_BTHK, v_BTHK, causal=True, implementation=c.attention_impl)
        out_std = c.init_std / (2 * c.num_layers) ** 0.5  # residual-branch scaling (GPT-2)
        return lin("btnk,nkd->btd", (N, K, D), ("heads", "head_dim", "embed"), out_std, name="o")(o_BTNK)


class Mlp(nn.Module):
    cfg: TransformerConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        c = self.cfg
        D, F = c.d_model, c.mlp_dim
        lin = functools.partial(Linear, dtype=c.dtype, param_dtype=c.param_dtype)
        gate_BTF = lin("btd,df->btf", (D, F), ("embed", "mlp"), c.init_std, name="gate")(x_BTD)
        up_BTF = lin("btd,df->btf", (D, F), ("embed", "mlp"), c.init_std, name="up")(x_BTD)
        h_BTF = nn.with_logical_constraint(nn.silu(gate_BTF) * up_BTF, ("act_batch", "act_length", "act_mlp"))
        out_std = c.init_std / (2 * c.num_layers) ** 0.5
        return lin("btf,fd->btd", (F, D), ("mlp", "embed"), out_std, name="down")(h_BTF)


class Block(nn.Module):
    """Pre-norm residual block. Signature (carry, _) -> (carry, None) so nn.scan can stack it."""

    cfg: TransformerConfig
    moe: bool = False  # an MoE FFN (core/moe.py) instead of the dense one
    expert_fn: Callable | None = None
    attention_fn: Callable | None = None

    @nn.compact
    def __call__(self, x_BTD: jax.Array, rope: tuple[jax.Array, jax.Array]):
        c = self.cfg
        attn = Attention(c, self.attention_fn, name="attn")
        x_BTD = x_BTD + attn(RMSNorm(c.norm_eps, c.dtype, name="attn_norm")(x_BTD), rope)
        h_BTD = RMSNorm(c.norm_eps, c.dtype, name="mlp_norm")(x_BTD)
        if self.moe:
            ffn = MoeFfn(c.d_model, c.mlp_dim, c.moe, c.init_std, c.init_std / (2 * c.num_layers) ** 0.5, c.dtype,
                         c.param_dtype, self.expert_fn, name="moe")
        else:
            ffn = Mlp(c, name="mlp")
        x_BTD = x_BTD + ffn(h_BTD)
        x_BTD = nn.with_logical_constraint(x_BTD, ("act_batch", "act_length", "act_embed"))
        return x_BTD, None


class BlockGroup(nn.Module):
    """moe.every consecutive blocks, the last with the MoE FFN: the unit nn.scan
    stacks when only every k-th block is MoE."""

    cfg: TransformerConfig
    expert_fn: Callable | None = None
    attention_fn: Callable | None = None

    @nn.compact
    def __call__(self, x_BTD: jax.Array, rope: tuple[jax.Array, jax.Array]):
        every = self.cfg.moe.every
        for j in range(every):
            x_BTD, _ = Block(self.cfg, j == every - 1, self.expert_fn, self.attention_fn,
                             name=f"block_{j}")(x_BTD, rope)
        return x_BTD, None


def _remat_policy(name: str):
    return {
        "full": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.checkpoint_dots,
        "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[name]


class Transformer(nn.Module):
    cfg: TransformerConfig
    expert_fn: Callable | None = None  # MoE experts on their slots; None = this device (see core/moe.py)
    attention_fn: Callable | None = None  # attention over a split sequence; None = plain (see Attention)

    @nn.compact
    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None) -> jax.Array:
        """Token ids [B, T] -> next-token logits [B, T, V] in float32. positions_BT
        (broadcastable to [B, T]): each token's place in its sequence, for tokens
        fed in another order (context parallelism's zig-zag layout); default 0..T-1."""
        c = self.cfg
        if positions_BT is None:
            positions_BT = jnp.arange(tokens_BT.shape[1])[None]
        rope = rotary_tables(positions_BT, c.head_dim, c.rope_theta)
        embedding_VD = self.param(
            # Unit-scale rows into the residual stream. The table is not split over
            # its vocab axis: a row lookup from a vocab-sharded table cannot be
            # partitioned without gathering the table.
            "embedding", _param(1.0, "table_vocab", "embed"),
            (c.vocab_size, c.d_model), c.param_dtype,
        )
        x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0).astype(c.dtype)
        x_BTD = nn.with_logical_constraint(x_BTD, ("act_batch", "act_length", "act_embed"))

        if c.scan_layers:
            # The scanned unit: one block, or (only every k-th block MoE) a group of k.
            grouped = c.moe.enabled and c.moe.every > 1
            unit = BlockGroup if grouped else Block
            if c.remat != "none":
                unit = nn.remat(unit, policy=_remat_policy(c.remat), prevent_cse=False)
            stack = nn.scan(
                unit, variable_axes={"params": 0, **{col: 0 for col in (*moe.COLLECTIONS, moe.ROUTES)}},
                split_rngs={"params": True}, in_axes=nn.broadcast,
                length=c.num_layers // c.moe.every if grouped else c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            args = ((c, self.expert_fn, self.attention_fn) if grouped
                    else (c, c.moe.enabled, self.expert_fn, self.attention_fn))
            x_BTD, _ = stack(*args, name="blocks")(x_BTD, rope)
        else:
            block = Block
            if c.remat != "none":
                block = nn.remat(Block, policy=_remat_policy(c.remat), prevent_cse=True)
            for i in range(c.num_layers):
                x_BTD, _ = block(c, c.is_moe_block(i), self.expert_fn, self.attention_fn,
                                 name=f"block_{i}")(x_BTD, rope)

        x_BTD = RMSNorm(c.norm_eps, c.dtype, name="final_norm")(x_BTD)
        if c.tie_embeddings:
            # Tied head: logits scaled by 1/sqrt(D). At init the residual stream is
            # mostly the token's own embedding, so a tied head starts out favouring
            # "repeat the current token" (loss above log V); untied starts uniform.
            head_DV = embedding_VD.T * (c.d_model ** -0.5)
        else:
            head_DV = self.param(
                "head", _param(c.init_std, "embed", "vocab"), (c.d_model, c.vocab_size), c.param_dtype
            )
        logits_BTV = jnp.einsum(
            "btd,dv->btv", x_BTD, head_DV.astype(c.dtype), preferred_element_type=jnp.float32
        )
        return nn.with_logical_constraint(logits_BTV, ("act_batch", "act_length", "act_vocab"))


def next_token_loss(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Mean cross-entropy in nats per token (fp32)."""
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return jnp.mean(logz_BT - target_logit_BT)


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
