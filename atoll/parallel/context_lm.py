"""Context parallelism in the LM: the Transformer's `attention_fn`, the zig-zag
batch layout it expects, and its communication figures.

`attention_fn_for(mesh, strategy)` is the hook core/transformer.py's Attention
calls instead of plain attention (as experts.expert_fn_for is MoE's): a
`jax.shard_map` over the current mesh that runs parallel/context.py's
`context_attention` on each device's slice of the sequence. Outside it, the
model is unchanged: activations keep their logical annotations, and
`act_length` -> `context` (parallel/sharding.py) splits them the same way.

A model with such an `attention_fn` (C > 1) takes its tokens in the zig-zag
layout (`context.zigzag_positions`) with their real positions: `lm_batch`
permutes a [B, T+1] window batch once (inputs and targets alike, so the mean
next-token loss is the same number) and train_state calls it for every step
and evaluation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from atoll.kernels.attention import attention
from atoll.parallel.context import CONTEXT_AXIS, STRATEGIES, bytes_per_device, context_attention, zigzag_positions
from atoll.parallel.sharding import dividing_axes, rule_axes


def context_axis_size(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> int:
    """Size of the mesh's `context` axis (1 when it has none)."""
    return int(dict(mesh.shape).get(CONTEXT_AXIS, 1))


@dataclasses.dataclass(frozen=True)
class ContextAttention:
    """Attention over a sequence split into C zig-zag slices along the `context` axis.

    Called with the full (logical) [B, T, heads, K] arrays in the zig-zag
    layout. Inside a mesh whose context axis is C: a shard_map with the batch
    split over the axes the active rules give `act_batch` (also under
    `vmap(spmd_axis_name="island")`), the length over `context`, and the heads
    over the axes `act_heads` and `act_kv_heads` share. With no mesh (shape
    evaluation, or a model applied on one device): plain causal attention in
    the original order, so the result is the same anywhere."""

    strategy: str
    context: int  # C, the size of the context axis the layout was made for

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"context strategy {self.strategy!r} is unknown; choose one of {list(STRATEGIES)}")

    def __call__(self, q_BTNK: jax.Array, k_BTHK: jax.Array, v_BTHK: jax.Array, *, causal: bool = True,
                 implementation: str | None = None) -> jax.Array:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return self._unsplit(q_BTNK, k_BTHK, v_BTHK, causal, implementation)
        sizes = dict(mesh.shape)
        if sizes.get(CONTEXT_AXIS, 1) != self.context:
            raise ValueError(
                f"this model's attention was built for a context axis of {self.context} (its tokens come in that "
                f"zig-zag layout) but runs on a mesh whose context axis is {sizes.get(CONTEXT_AXIS, 1)}; build it "
                "with attention_fn_for(mesh, strategy) for the mesh it runs on")
        B, _, _, _ = q_BTNK.shape
        H = k_BTHK.shape[2]
        split = lambda name: [a for a in rule_axes(name, sizes) if sizes[a] > 1 and a != CONTEXT_AXIS]
        batch = dividing_axes(split("act_batch"), sizes, B)
        kv_axes = split("act_kv_heads")
        shared = [a for a in split("act_heads") if a in kv_axes and a not in batch]
        # One split for both: query head n reads kv head n // (N/H) on the same shard.
        heads = dividing_axes(shared, sizes, H)
        spec = P(batch or None, CONTEXT_AXIS, heads or None, None)
        body = functools.partial(context_attention, strategy=self.strategy, causal=causal,
                                 implementation=implementation)
        return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)(q_BTNK, k_BTHK, v_BTHK)

    def _unsplit(self, q_BTNK, k_BTHK, v_BTHK, causal, implementation):
        if not causal:
            return attention(q_BTNK, k_BTHK, v_BTHK, causal=False, implementation=implementation)
        order = zigzag_positions(q_BTNK.shape[1], self.context)
        back = np.argsort(order)  # layout -> original order
        out = attention(q_BTNK[:, back], k_BTHK[:, back], v_BTHK[:, back], causal=True,
                        implementation=implementation)
        return out[:, order]


def attention_fn_for(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
                     strategy: str | None) -> ContextAttention | None:
    """The Transformer's `attention_fn` on `mesh`: None (plain attention, which
    XLA partitions itself) without a strategy or with a context axis of 1."""
    C = context_axis_size(mesh)
    if strategy is None or C == 1:
        return None
    return ContextAttention(strategy, C)


def layout_context(model) -> int:
    """C of the zig-zag layout `model` takes its tokens in (1: the original order)."""
    fn = getattr(model, "attention_fn", None)
    return fn.context if isinstance(fn, ContextAttention) else 1


def lm_batch(tokens_BT1: jax.Array, C: int = 1) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(inputs [B, T], targets [B, T], positions [1, T] or None) from windows of T+1 tokens.

    C > 1: the columns of inputs and targets permuted alike into the zig-zag
    layout for a context axis of C, and the positions each column had; the
    mean next-token loss over them is the unpermuted one."""
    inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
    if C == 1:
        return inputs_BT, targets_BT, None
    order_T = zigzag_positions(inputs_BT.shape[1], C)
    return inputs_BT[:, order_T], targets_BT[:, order_T], jnp.asarray(order_T, jnp.int32)[None]


def bytes_per_layer(strategy: str, sizes: dict[str, int], *, batch_size: int, seq_len: int, num_heads: int,
                    num_kv_heads: int, head_dim: int, dtype_bytes: int) -> dict[str, float]:
    """`context.bytes_per_device` for one attention layer of a run: the global
    batch divided over island × data × fsdp × expert, the heads over tensor
    when it splits them (as ContextAttention's shard_map does)."""
    C = sizes.get(CONTEXT_AXIS, 1)
    shards = sizes.get("island", 1) * sizes.get("data", 1) * sizes.get("fsdp", 1) * sizes.get("expert", 1)
    t = sizes.get("tensor", 1)
    t = t if num_kv_heads % t == 0 else 1
    return bytes_per_device(strategy, B=batch_size // shards, T=seq_len, N=num_heads // t, H=num_kv_heads // t,
                            K=head_dim, C=C, dtype_bytes=dtype_bytes)
