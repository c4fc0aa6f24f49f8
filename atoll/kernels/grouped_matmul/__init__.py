"""`atoll.kernels.grouped_matmul`: one matmul per group of rows (dropless MoE).

    grouped_matmul(x_MD, w_GDF, group_sizes_G, *, implementation=None,
                   preferred_element_type=None) -> y_MF
    grouped_matmul_transposed(x_MD, dy_MF, group_sizes_G, *, implementation=None,
                              preferred_element_type=None) -> dw_GDF

Rows of `x_MD` are sorted by group: the first group_sizes_G[0] rows use
w_GDF[0], the next group_sizes_G[1] rows w_GDF[1], and so on. Rows past
sum(group_sizes_G) come out as zeros. The transposed form is the weight
gradient: dw[g] = x[rows of g]ᵀ @ dy[rows of g] (zeros for an empty group).
Products accumulate in fp32; the result has x's dtype unless
`preferred_element_type` says otherwise. `implementation`:
  None      the fastest correct backend (`default_implementation`): "xla"
            today; "pallas" on a Hopper GPU for bf16/fp16 with D and F
            multiples of 64 once the H100 figures show it correct and faster
            (PALLAS_BY_DEFAULT)
  "xla"     jax.lax.ragged_dot (ragged_dot_general for the transposed form):
            runs everywhere, differentiable
  "dense"   a masked dense reference: one-hot group membership per row and an
            einsum over all G groups (G times the work); the tests' oracle
  "pallas"  atoll's Mosaic GPU kernels (Hopper: TMA + wgmma), with a custom VJP
            (dx by the forward kernel with wᵀ, dw by the transposed kernel); on
            other platforms the same kernels run in Pallas' GPU interpreter
            (slow, for tests)
../shared/research/h100_baseline.md measured ragged_dot's default GPU lowering
at ~1/4 of a dense batched einsum's speed, which is what the Pallas kernel is for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from atoll.kernels import _lazy
from atoll.kernels.grouped_matmul.reference import (
    grouped_matmul_dense,
    grouped_matmul_transposed_dense,
    grouped_matmul_transposed_xla,
    grouped_matmul_xla,
)

IMPLEMENTATIONS = ("xla", "dense", "pallas")

# The Mosaic GPU kernels load on first use (see atoll/kernels/_lazy.py).
__getattr__ = _lazy.module_getattr(__name__, "pallas_mgpu", ("BlockSizes",))
grouped_matmul_pallas = _lazy.forwarder(f"{__name__}.pallas_mgpu", "grouped_matmul_pallas")
grouped_matmul_transposed_pallas = _lazy.forwarder(f"{__name__}.pallas_mgpu", "grouped_matmul_transposed_pallas")


def grouped_matmul_reference(x_MD: jax.Array, w_GDF: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
    """ragged_dot with fp32 accumulation, in x's dtype (the "xla" backend)."""
    return grouped_matmul_xla(x_MD, w_GDF, group_sizes_G)


_BACKENDS = {"xla": grouped_matmul_xla, "dense": grouped_matmul_dense, "pallas": grouped_matmul_pallas}
_TRANSPOSED = {"xla": grouped_matmul_transposed_xla, "dense": grouped_matmul_transposed_dense,
               "pallas": grouped_matmul_transposed_pallas}


def _on_hopper() -> bool:
    if jax.default_backend() != "gpu":
        return False
    capability = getattr(jax.devices()[0], "compute_capability", None)
    return capability is not None and str(capability).split(".")[0] == "9"


# The automatic choice takes the Pallas kernel only once it has been measured
# correct and faster on an H100 (tests/kernels/test_grouped_matmul.py's `gpu`
# tests and atoll.experiments.bench.grouped_matmul, issue 11). Until then it has
# only run in the CPU interpreter and been lowered for CUDA, so None stays on
# ragged_dot and the kernel is opt-in: implementation="pallas" (the MoE config:
# --config.model.moe.grouped_matmul_impl=pallas).
PALLAS_BY_DEFAULT = False


def default_implementation(dtype, D: int | None = None, F: int | None = None) -> str:
    """The backend `implementation=None` resolves to on this platform: "pallas" on a
    Hopper GPU (compute capability 9.x) for inputs the kernel supports (bf16/fp16;
    D, F multiples of 64, when given) once PALLAS_BY_DEFAULT is set, else "xla"."""
    if not (PALLAS_BY_DEFAULT and _on_hopper()):
        return "xla"
    from atoll.kernels.grouped_matmul import pallas_mgpu

    ok = pallas_mgpu.supports(dtype, 64 if D is None else D, 64 if F is None else F)
    return "pallas" if ok else "xla"


def _resolve(implementation: str | None, dtype, D: int, F: int) -> str:
    if implementation is None:
        return default_implementation(dtype, D, F)
    if implementation not in _BACKENDS:
        raise ValueError(f"grouped_matmul implementation {implementation!r} is unknown; "
                         f"choose one of {list(IMPLEMENTATIONS)} or None (automatic)")
    return implementation


def _check_groups(group_sizes_G, G: int) -> None:
    if group_sizes_G.shape != (G,):
        raise ValueError(f"group_sizes has shape {group_sizes_G.shape}; expected ({G},), one per group")
    if not jnp.issubdtype(group_sizes_G.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integers, not {group_sizes_G.dtype}")


def grouped_matmul(x_MD: jax.Array, w_GDF: jax.Array, group_sizes_G: jax.Array, *,
                   implementation: str | None = None, preferred_element_type=None) -> jax.Array:
    """y_MF: x[rows of g] @ w[g] per group; see the module docstring for the contract."""
    if x_MD.ndim != 2 or w_GDF.ndim != 3 or x_MD.shape[1] != w_GDF.shape[1]:
        raise ValueError(f"grouped_matmul takes x [M, D] and w [G, D, F]; got {x_MD.shape} and {w_GDF.shape}")
    _check_groups(group_sizes_G, w_GDF.shape[0])
    implementation = _resolve(implementation, x_MD.dtype, *w_GDF.shape[1:])
    return _BACKENDS[implementation](x_MD, w_GDF, group_sizes_G, preferred_element_type=preferred_element_type)


def grouped_matmul_transposed(x_MD: jax.Array, dy_MF: jax.Array, group_sizes_G: jax.Array, *,
                              implementation: str | None = None, preferred_element_type=None) -> jax.Array:
    """dw_GDF: x[rows of g]ᵀ @ dy[rows of g] per group (G = len(group_sizes))."""
    if x_MD.ndim != 2 or dy_MF.ndim != 2 or x_MD.shape[0] != dy_MF.shape[0]:
        raise ValueError(f"grouped_matmul_transposed takes x [M, D] and dy [M, F]; got {x_MD.shape} and "
                         f"{dy_MF.shape}")
    if group_sizes_G.ndim != 1:
        raise ValueError(f"group_sizes has shape {group_sizes_G.shape}; expected (G,)")
    _check_groups(group_sizes_G, group_sizes_G.shape[0])
    implementation = _resolve(implementation, x_MD.dtype, x_MD.shape[1], dy_MF.shape[1])
    return _TRANSPOSED[implementation](x_MD, dy_MF, group_sizes_G, preferred_element_type=preferred_element_type)


__all__ = [
    "grouped_matmul", "grouped_matmul_transposed", "grouped_matmul_reference", "grouped_matmul_dense",
    "grouped_matmul_pallas", "grouped_matmul_transposed_pallas", "default_implementation", "BlockSizes",
    "IMPLEMENTATIONS",
]
