"""`atoll.kernels.grouped_matmul`: one matmul per group of rows (dropless MoE).

    grouped_matmul(x_MD, w_GDF, group_sizes_G, *, implementation=None) -> y_MF

Rows of `x_MD` are sorted by group: the first group_sizes_G[0] rows use
w_GDF[0], the next group_sizes_G[1] rows w_GDF[1], and so on. Rows past
sum(group_sizes_G) come out as zeros. `implementation`:
  None   the best available backend (today always "xla")
  "xla"  jax.lax.ragged_dot: runs everywhere, differentiable
The Pallas (Mosaic GPU) backend arrives with the grouped-matmul kernel issue;
../shared/research/h100_baseline.md measured ragged_dot's default GPU lowering
at ~1/4 of a dense batched einsum's speed, which is what that kernel is for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)


def grouped_matmul_reference(x_MD: jax.Array, w_GDF: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
    return jax.lax.ragged_dot(x_MD, w_GDF, group_sizes_G.astype(jnp.int32),
                              preferred_element_type=jnp.float32).astype(x_MD.dtype)


_BACKENDS = {"xla": grouped_matmul_reference}


def grouped_matmul(x_MD: jax.Array, w_GDF: jax.Array, group_sizes_G: jax.Array, *,
                   implementation: str | None = None) -> jax.Array:
    if x_MD.ndim != 2 or w_GDF.ndim != 3 or x_MD.shape[1] != w_GDF.shape[1]:
        raise ValueError(f"grouped_matmul takes x [M, D] and w [G, D, F]; got {x_MD.shape} and {w_GDF.shape}")
    if group_sizes_G.shape != (w_GDF.shape[0],):
        raise ValueError(f"group_sizes has shape {group_sizes_G.shape}; expected ({w_GDF.shape[0]},), one per group")
    implementation = implementation or "xla"
    if implementation not in _BACKENDS:
        raise ValueError(f"grouped_matmul implementation {implementation!r} is unknown; "
                         f"choose one of {list(IMPLEMENTATIONS)} or None (automatic)")
    return _BACKENDS[implementation](x_MD, w_GDF, group_sizes_G)
