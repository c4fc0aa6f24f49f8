"""Expert parallelism: MoE experts split over the `expert` mesh axis, tokens
moved to them and back by all-to-all (GShard).

`expert_parallel_ffn` is a drop-in `expert_fn` for core/moe.py's MoeFfn (and
`Transformer(cfg, expert_fn=...)`): it takes the capacity-padded slot buffer
[G, E, C, D] that capacity dispatch and expert choice build, so every
all-to-all has a static shape and runs on every backend, CPU included.
Dropless dispatch does not go through the hook: its expert-parallel form needs
`jax.lax.ragged_all_to_all`, which XLA:CPU cannot lower ("HLO opcode
ragged-all-to-all is not supported"), so config validation refuses dropless
with an expert axis > 1.

Model code keeps naming logical axes only; this module reads the active flax
logical rules (parallel/sharding.py) to learn which mesh axes split the
groups, and names the `expert` axis it communicates over.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec as P

from atoll.core import moe
from atoll.parallel import sharding

EXPERT_AXIS = "expert"


def expert_axis_size(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> int:
    """Size of the mesh's `expert` axis (1 when it has none)."""
    return int(dict(mesh.shape).get(EXPERT_AXIS, 1))


def check_expert_mesh(num_experts: int, mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> None:
    """Raises a ValueError naming both numbers when the experts cannot be split evenly over the expert axis."""
    n = expert_axis_size(mesh)
    if num_experts % n:
        raise ValueError(
            f"moe.num_experts={num_experts} cannot be split over the mesh's expert axis of size {n}: "
            f"choose num_experts a multiple of {n}, or an expert axis size that divides {num_experts}")


def expert_fn_for(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> Callable | None:
    """The `expert_fn` for a model on `mesh`: None (every expert local) when
    the expert axis is 1, else `expert_parallel_ffn`."""
    return None if expert_axis_size(mesh) == 1 else expert_parallel_ffn


def all_to_all_bytes(G: int, E: int, C: int, D: int, dtype_bytes: int, n: int) -> int:
    """Bytes one shard sends (and, as many, receives) in one MoE layer's forward.

    G: the routing groups the shard holds; n: the expert axis size. Each of the
    two all-to-alls (dispatch, combine) keeps the 1/n of the [G, E, C, D]
    buffer that belongs to the shard's own experts and sends the rest:
    2 · (n−1)/n · G·E·C·D · dtype_bytes. The backward pass moves as much again.
    """
    return 2 * (n - 1) * G * (E // n) * C * D * dtype_bytes


def expert_parallel_ffn(buffer_GECD: jax.Array, w: moe.ExpertWeights) -> jax.Array:
    """`moe.expert_ffn` with the experts split over the `expert` mesh axis.

    A `jax.shard_map` over the current mesh (jax.set_mesh; also under
    `vmap(spmd_axis_name="island")`). Groups split over the axes the active
    rules give `act_batch`; each shard's [G/b, E, C, D] slots go by all-to-all
    to the shards owning their experts, which run their E/n experts on the
    [n·G/b, E/n, C, D] they receive; a second all-to-all brings the results
    back. An expert hidden dim the rules split (`expert_mlp`: tensor) stays
    split and the outputs are summed over it. Groups not split over `expert`
    (init's batch of 1) need no exchange: each shard runs its experts on its
    own slice and the results are gathered. No mesh, or an expert axis of 1:
    `moe.expert_ffn`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    sizes = dict(mesh.shape)
    n = sizes.get(EXPERT_AXIS, 1)
    if mesh.empty or n == 1:
        return moe.expert_ffn(buffer_GECD, w)
    G, E, _, _ = buffer_GECD.shape
    check_expert_mesh(E, mesh)
    batch = sharding.dividing_axes(sharding.rule_axes("act_batch", sizes), sizes, G)
    free = [a for a in sharding.rule_axes("expert_mlp", sizes) if a != EXPERT_AXIS and a not in batch]
    hidden = sharding.dividing_axes(free, sizes, w.gate_EDF.shape[-1])
    f = hidden or None
    # The embed dim is left out of the specs: FSDP-sharded weights are gathered on entry, as a dense layer's are.
    w_specs = moe.ExpertWeights(P(EXPERT_AXIS, None, f), P(EXPERT_AXIS, None, f), P(EXPERT_AXIS, f, None))

    def run_local(x_GECD, w_local):
        y_GECD = moe.expert_ffn(x_GECD, w_local)
        return jax.lax.psum(y_GECD, hidden) if hidden else y_GECD  # partial sums over the split F

    if EXPERT_AXIS in batch:
        def body(x_GECD, w_local):
            # [G/b, E, C, D] -> [n·G/b, E/n, C, D]: block i of the rows came from shard i.
            x_GECD = jax.lax.all_to_all(x_GECD, EXPERT_AXIS, split_axis=1, concat_axis=0, tiled=True)
            y_GECD = run_local(x_GECD, w_local)
            return jax.lax.all_to_all(y_GECD, EXPERT_AXIS, split_axis=0, concat_axis=1, tiled=True)
        spec = P(batch or None)
    else:
        body, spec = run_local, P(batch or None, EXPERT_AXIS)
    return jax.shard_map(body, mesh=mesh, in_specs=(spec, w_specs), out_specs=spec)(buffer_GECD, w)

