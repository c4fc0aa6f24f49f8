"""Cross-island collectives, called inside `jax.shard_map` over the `island` axis.

Each function works on one island's block (no island dimension) and returns
what that island ends up with. Next to each one is the number of bytes an
island sends (and, by symmetry, receives) when it runs, computed from the
sizes of the arrays that actually go into the collective, so the accounting
and the HLO cannot drift apart. Conventions (shared with parallel/netsim.py):
a ring all-reduce of S bytes moves 2(M−1)/M·S per island, an all-gather of a
per-island payload of S bytes moves (M−1)·S, a pairwise exchange moves S.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from atoll.core import compress
from atoll.parallel import netsim

ISLAND = "island"


def _nbytes(tree) -> int:
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------
# dense mean (fp32 on the wire): XLA all-reduce
# ---------------------------------------------------------------------------

def mean(tree):
    return jax.tree.map(lambda x: jax.lax.pmean(x, ISLAND), tree)


def weighted_sum(tree, weight):
    """Σ_i w_i·x_i over islands (w_i this island's scalar weight): the same
    all-reduce as `mean`, so the same bytes (mean_wire_bytes)."""
    return jax.tree.map(lambda x: jax.lax.psum(weight.astype(x.dtype) * x, ISLAND), tree)


def mean_wire_bytes(tree, num_islands: int) -> float:
    return netsim.ring_allreduce_bytes(_nbytes(tree), num_islands)


# ---------------------------------------------------------------------------
# quantized mean: reduce-scatter of quantized shards (all_to_all), fp32
# accumulation of the island's own shard, all-gather of the re-quantized shard
# ---------------------------------------------------------------------------

def _rows(n: int, num_islands: int, block: int) -> int:
    """Row length: n split into M rows, each a whole number of quantization blocks."""
    per = -(-n // num_islands)
    return -(-per // block) * block


def quantized_mean(x_N: jax.Array, fmt: str, num_islands: int, block: int = 128) -> jax.Array:
    """Mean over islands of a flat fp32 vector, with `fmt` (bf16/int8/fp4) on the
    wire both ways and fp32 accumulation; every island gets the same result."""
    if fmt == "fp32":
        return jax.lax.pmean(x_N, ISLAND)
    n, M = x_N.shape[0], num_islands
    S = _rows(n, M, block)
    x_MS = jnp.pad(x_N.astype(jnp.float32), (0, M * S - n)).reshape(M, S)
    sent = jax.vmap(lambda r: compress.encode(r, fmt, block))(x_MS)
    got = jax.tree.map(lambda a: jax.lax.all_to_all(a, ISLAND, 0, 0, tiled=True), sent)
    mine_S = jnp.mean(jax.vmap(lambda p: compress.decode(p, fmt, (S,), block))(got), axis=0)
    shard = compress.encode(mine_S, fmt, block)
    gathered = jax.tree.map(lambda a: jax.lax.all_gather(a, ISLAND), shard)
    out_MS = jax.vmap(lambda p: compress.decode(p, fmt, (S,), block))(gathered)
    return out_MS.reshape(-1)[:n]


def quantized_mean_wire_bytes(n: int, fmt: str, num_islands: int, block: int = 128) -> float:
    if fmt == "fp32":
        return netsim.ring_allreduce_bytes(4 * n, num_islands)
    S = _rows(n, num_islands, block)
    row = jax.eval_shape(lambda r: compress.encode(r, fmt, block), jax.ShapeDtypeStruct((S,), jnp.float32))
    return 2 * (num_islands - 1) * compress.payload_nbytes(row)


# ---------------------------------------------------------------------------
# all-gather of per-island payloads (sparse, SparseLoCo) and of scalars (EDiT)
# ---------------------------------------------------------------------------

def gather(tree):
    """Every island's `tree`, stacked on a new leading axis [M, ...]."""
    return jax.tree.map(lambda x: jax.lax.all_gather(x, ISLAND), tree)


def gather_wire_bytes(tree, num_islands: int) -> float:
    return netsim.allgather_bytes(_nbytes(tree), num_islands)


def island_index() -> jax.Array:
    return jax.lax.axis_index(ISLAND)


# ---------------------------------------------------------------------------
# pairwise exchange (NoLoCo): no all-reduce anywhere
# ---------------------------------------------------------------------------

def swap(tree, partners: tuple[int, ...]):
    """The partner's `tree`: island i receives from partners[i] (a perfect matching)."""
    perm = [(src, dst) for dst, src in enumerate(partners)]
    return jax.tree.map(lambda x: jax.lax.ppermute(x, ISLAND, perm), tree)


def swap_wire_bytes(tree) -> float:
    return netsim.p2p_bytes(_nbytes(tree))


# ---------------------------------------------------------------------------
# host-side metrics (not training traffic, not counted)
# ---------------------------------------------------------------------------

def to_host(tree):
    """Per-island metrics ([M] arrays sharded over `island`) as numpy on every
    process. In one process that is a device_get; across processes each holds
    only its islands' entries, so the few scalars are all-gathered first."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return jax.device_get(x)
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(one, tree)

