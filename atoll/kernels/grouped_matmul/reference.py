"""Grouped-matmul backends that run everywhere.

  "xla"    jax.lax.ragged_dot (and ragged_dot_general for the transposed form)
  "dense"  one-hot group membership per row and an einsum over all G groups:
           G times the work, but obviously right; the tests' oracle
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _out_dtype(x, preferred_element_type):
    return jnp.dtype(x.dtype if preferred_element_type is None else preferred_element_type)


def group_membership(group_sizes_G: jax.Array, M: int) -> jax.Array:
    """[M, G] float32: 1 where row m belongs to group g. Rows past sum(group_sizes) belong to none."""
    ends_G = jnp.cumsum(group_sizes_G.astype(jnp.int32))
    starts_G = ends_G - group_sizes_G.astype(jnp.int32)
    rows_M1 = jnp.arange(M, dtype=jnp.int32)[:, None]
    return ((rows_M1 >= starts_G[None]) & (rows_M1 < ends_G[None])).astype(jnp.float32)


def grouped_matmul_xla(x_MD, w_GDF, group_sizes_G, *, preferred_element_type=None):
    y = lax.ragged_dot(x_MD, w_GDF, group_sizes_G.astype(jnp.int32), preferred_element_type=jnp.float32)
    return y.astype(_out_dtype(x_MD, preferred_element_type))


def grouped_matmul_transposed_xla(x_MD, dy_MF, group_sizes_G, *, preferred_element_type=None):
    dims = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(((0,), (0,)), ((), ())), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    dw = lax.ragged_dot_general(x_MD, dy_MF, group_sizes_G.astype(jnp.int32), dims,
                                preferred_element_type=jnp.float32)
    return dw.astype(_out_dtype(x_MD, preferred_element_type))


def grouped_matmul_dense(x_MD, w_GDF, group_sizes_G, *, preferred_element_type=None):
    member_MG = group_membership(group_sizes_G, x_MD.shape[0])
    y_GMF = jnp.einsum("md,gdf->gmf", x_MD.astype(jnp.float32), w_GDF.astype(jnp.float32),
                       precision=lax.Precision.HIGHEST)
    y_MF = jnp.einsum("mg,gmf->mf", member_MG, y_GMF, precision=lax.Precision.HIGHEST)
    return y_MF.astype(_out_dtype(x_MD, preferred_element_type))


def grouped_matmul_transposed_dense(x_MD, dy_MF, group_sizes_G, *, preferred_element_type=None):
    member_MG = group_membership(group_sizes_G, x_MD.shape[0])
    dw_GDF = jnp.einsum("mg,md,mf->gdf", member_MG, x_MD.astype(jnp.float32), dy_MF.astype(jnp.float32),
                        precision=lax.Precision.HIGHEST)
    return dw_GDF.astype(_out_dtype(x_MD, preferred_element_type))
