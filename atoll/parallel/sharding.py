"""The one table that maps logical axes to mesh axes.

Model code annotates parameters and activations with logical names only;
this module is the single place that decides where they live on the mesh.
Parameter axes and activation axes have separate names (`embed` vs
`act_embed`) because FSDP shards a weight's embed dimension while the
activations' embed dimension stays whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec as P

# Inside an island the batch splits over data × fsdp × expert (outside the MoE
# layers the expert axis is one more data axis, as in GShard). Training that is
# not split into islands (island = 1, or DDP across islands) also splits it over
# `island`, so gradients are averaged across islands every step.
BATCH_AXES = ("data", "fsdp", "expert")
DDP_BATCH_AXES = ("island",) + BATCH_AXES

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "tensor"),
    ("table_vocab", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("expert", "expert"),  # MoE experts [E, ...]: one slice of them per expert-axis shard
    ("expert_mlp", "tensor"),
    ("router_experts", None),
    # activations
    ("act_batch", DDP_BATCH_AXES),
    ("act_length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def logical_rules(within_island: bool = False):
    """The rules in the form flax.linen's `logical_axis_rules` context takes.

    `within_island`: for model code running under `vmap(spmd_axis_name="island")`
    (one replica per island), where vmap itself puts the island dimension on
    `island`, so the batch only splits over data × fsdp.
    """
    if not within_island:
        return RULES
    return tuple((name, BATCH_AXES if name == "act_batch" else axes) for name, axes in RULES)


def logical_to_spec(logical_axes: tuple[str | None, ...]) -> P:
    """PartitionSpec for one array annotated with logical axis names."""
    return nn.logical_to_mesh_axes(logical_axes, RULES)


def tree_shardings(boxed_tree, mesh: jax.sharding.Mesh):
    """NamedShardings for a pytree whose leaves may be flax LogicallyPartitioned boxes
    (e.g. `jax.eval_shape` of an init function); unannotated leaves are replicated."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed_tree), mesh, RULES)


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 2) -> NamedSharding:
    """Token batches [B, ...] are split over island × data × fsdp × expert and replicated elsewhere."""
    return NamedSharding(mesh, P(DDP_BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def rule_axes(logical: str, sizes: dict[str, int]) -> tuple[str, ...]:
    """The mesh axes the active flax logical rules give `logical` (none outside a rules context)."""
    axes = nn.logical_to_mesh_axes((logical,))[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return tuple(a for a in axes if a in sizes)


def dividing_axes(axes: Sequence[str], sizes: dict[str, int], dim: int) -> tuple[str, ...]:
    """The axes (in order) that together split `dim` evenly; shard_map, unlike a
    sharding constraint, cannot pad, and an axis left out only replicates work."""
    kept, product = [], 1
    for a in axes:
        if dim % (product * sizes[a]) == 0:
            kept.append(a)
            product *= sizes[a]
    return tuple(kept)
