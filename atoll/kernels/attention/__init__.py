"""`atoll.kernels.attention`: one entry point, several backends.

    attention(q, k, v, *, causal=False, segment_ids=None, sm_scale=None,
              implementation=None)

Layout [batch, seq, heads, head_dim]; k/v may have fewer heads than q
(grouped-query attention). `implementation`:
  None     the best available backend: "cudnn" on a GPU (fp16/bf16), else "xla"
  "xla"    the reference (plain einsums, fp32 softmax); runs everywhere
  "cudnn"  cuDNN fused attention via jax.nn.dot_product_attention (GPU only)
  "pallas" atoll's flash-attention kernels on Mosaic GPU (Hopper; bf16/fp16,
           head_dim 64 or 128), forward and backward; on other platforms
           the same kernels run in Pallas' GPU interpreter (slow, for tests)
All backends take causal=, segment_ids= (one [B, T] array, or a (q, kv) pair)
and return_lse= (the log-sum-exp [B, N, T] in fp32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from atoll.kernels import _lazy
from atoll.kernels.attention.cudnn import attention_cudnn
from atoll.kernels.attention.reference import attention_backward_reference, attention_reference

# The Mosaic GPU kernels load on first use (see atoll/kernels/_lazy.py).
__getattr__ = _lazy.module_getattr(__name__, "pallas_mgpu", ("BlockSizes",))
attention_pallas = _lazy.forwarder(f"{__name__}.pallas_mgpu", "attention_pallas")
attention_backward_pallas = _lazy.forwarder(f"{__name__}.pallas_mgpu", "attention_backward_pallas")

IMPLEMENTATIONS = ("xla", "cudnn", "pallas")

_BACKENDS = {"xla": attention_reference, "cudnn": attention_cudnn, "pallas": attention_pallas}


def default_implementation(dtype) -> str:
    """The backend `implementation=None` resolves to for this platform and dtype."""
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return "cudnn"
    return "xla"


def attention(
    q_BTNK: jax.Array,
    k_BSHK: jax.Array,
    v_BSHK: jax.Array,
    *,
    causal: bool = False,
    segment_ids=None,
    sm_scale: float | None = None,
    implementation: str | None = None,
    return_lse: bool = False,
):
    """Scaled dot-product attention; see the module docstring for the contract."""
    _check_shapes(q_BTNK, k_BSHK, v_BSHK)
    implementation = _resolve(implementation, q_BTNK.dtype)
    return _BACKENDS[implementation](
        q_BTNK, k_BSHK, v_BSHK, causal=causal, segment_ids=segment_ids,
        sm_scale=sm_scale, return_lse=return_lse,
    )


def attention_backward(
    q_BTNK: jax.Array,
    k_BSHK: jax.Array,
    v_BSHK: jax.Array,
    out_BTNK: jax.Array,
    lse_BNT: jax.Array,
    d_out_BTNK: jax.Array,
    d_lse_BNT: jax.Array | None = None,
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    implementation: str | None = None,
):
    """(dq, dk, dv) of attention from a forward's saved `out` and `lse`.

    `out` and `lse` may be the merged result over more keys than `k` holds (a
    ring step): the gradients are then this key block's contributions, which
    sum over blocks to the full gradient. "pallas" runs atoll's dQ and dK/dV
    kernels; "xla" (and "cudnn", which has no such entry) the einsum reference.
    Gradients come back in fp32 (xla) or q's dtype (pallas)."""
    delta_BNT = jnp.einsum("btnk,btnk->bnt", out_BTNK.astype(jnp.float32), d_out_BTNK.astype(jnp.float32))
    if d_lse_BNT is not None:
        delta_BNT = delta_BNT - d_lse_BNT.astype(jnp.float32)
    return attention_backward_stats(q_BTNK, k_BSHK, v_BSHK, lse_BNT, d_out_BTNK, delta_BNT, causal=causal,
                                    sm_scale=sm_scale, implementation=implementation)


def attention_backward_stats(q_BTNK, k_BSHK, v_BSHK, lse_BNT, d_out_BTNK, delta_BNT, *, causal=False,
                             sm_scale=None, implementation=None):
    """`attention_backward` with delta = rowsum(dO ∘ out) − dlse given instead of out."""
    _check_shapes(q_BTNK, k_BSHK, v_BSHK)
    implementation = _resolve(implementation, q_BTNK.dtype)
    backward = attention_backward_pallas if implementation == "pallas" else attention_backward_reference
    return backward(q_BTNK, k_BSHK, v_BSHK, lse_BNT, d_out_BTNK, delta_BNT, causal=causal, sm_scale=sm_scale)


def _resolve(implementation: str | None, dtype) -> str:
    """The backend to run: the platform's default for None; a clear error for an unknown name."""
    if implementation is None:
        return default_implementation(dtype)
    if implementation not in _BACKENDS:
        raise ValueError(
            f"attention implementation {implementation!r} is unknown; "
            f"choose one of {list(IMPLEMENTATIONS)} or None (automatic)"
        )
    return implementation


def _check_shapes(q, k, v) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            "attention expects [batch, seq, heads, head_dim] arrays; got shapes "
            f"q={q.shape}, k={k.shape}, v={v.shape}"
        )
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} differ in batch or head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(
            f"kv heads ({k.shape[2]}) must divide query heads ({q.shape[2]})"
        )


__all__ = [
    "attention", "attention_backward", "attention_backward_stats", "attention_reference", "attention_pallas", "BlockSizes",
    "default_implementation", "IMPLEMENTATIONS",
]
