"""XLA reference attention: plain einsums, fp32 softmax, runs on every backend.

Layout: q [B, T, N, K], k/v [B, S, H, K] with H dividing N (grouped-query
attention: each kv head serves N // H query heads). T = query length,
S = key length, N = query heads, H = kv heads, K = head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite so fully masked rows give a uniform, not NaN, softmax


def attention_mask_BTS(
    T: int,
    S: int,
    *,
    causal: bool,
    q_segment_ids_BT: jax.Array | None = None,
    kv_segment_ids_BS: jax.Array | None = None,
) -> jax.Array | None:
    """Boolean mask (True = attend), [B or 1, T, S]; None when nothing is masked."""
    mask = None
    if causal:
        # Top-left aligned, as jax.nn.dot_product_attention: query i sees keys j <= i.
        mask = (jnp.arange(T)[:, None] >= jnp.arange(S)[None, :])[None]
    if q_segment_ids_BT is not None:
        same = q_segment_ids_BT[:, :, None] == kv_segment_ids_BS[:, None, :]
        mask = same if mask is None else mask & same
    return mask


def attention_reference(
    q_BTNK: jax.Array,
    k_BSHK: jax.Array,
    v_BSHK: jax.Array,
    *,
    causal: bool = False,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    sm_scale: float | None = None,
    return_lse: bool = False,
):
    """Softmax(q·kᵀ·scale + mask)·v. Returns out [B, T, N, K] (and lse [B, N, T] in fp32)."""
    B, T, N, K = q_BTNK.shape
    S, H = k_BSHK.shape[1], k_BSHK.shape[2]
    scale = K**-0.5 if sm_scale is None else sm_scale
    # Grouped-query heads: repeat kv heads up to N (plain 4-D einsums run faster
    # on XLA:CPU than a 5-D grouped einsum; this path is the reference, not the fast one).
    k_BSNK = jnp.repeat(k_BSHK, N // H, axis=2)
    v_BSNK = jnp.repeat(v_BSHK, N // H, axis=2)
    logits_BNTS = jnp.einsum(
        "btnk,bsnk->bnts", q_BTNK, k_BSNK, preferred_element_type=jnp.float32
    ) * jnp.float32(scale)
    q_seg, kv_seg = _split_segment_ids(segment_ids)
    mask_BTS = attention_mask_BTS(
        T, S, causal=causal, q_segment_ids_BT=q_seg, kv_segment_ids_BS=kv_seg
    )
    if mask_BTS is not None:
        logits_BNTS = jnp.where(mask_BTS[:, None], logits_BNTS, _MASKED)
    lse_BNT = jax.nn.logsumexp(logits_BNTS, axis=-1)
    probs_BNTS = jnp.exp(logits_BNTS - lse_BNT[..., None])
    out_BTNK = jnp.einsum(
        "bnts,bsnk->btnk", probs_BNTS.astype(v_BSNK.dtype), v_BSNK,
        preferred_element_type=jnp.float32,
    ).astype(q_BTNK.dtype)
    if return_lse:
        return out_BTNK, lse_BNT
    return out_BTNK


def _split_segment_ids(segment_ids):
    if segment_ids is None:
        return None, None
    if isinstance(segment_ids, (tuple, list)):
        return segment_ids[0], segment_ids[1]
    return segment_ids, segment_ids


def attention_backward_reference(
    q_BTNK: jax.Array,
    k_BSHK: jax.Array,
    v_BSHK: jax.Array,
    lse_BNT: jax.Array,
    d_out_BTNK: jax.Array,
    delta_BNT: jax.Array,
    *,
    causal: bool = False,
    sm_scale: float | None = None,
):
    """The flash-attention backward from saved statistics, in plain einsums.

    With P = exp(q·kᵀ·scale − lse) and dS = P ∘ (dO·vᵀ − delta), returns
    (dq, dk, dv) = (dS·k·scale, dSᵀ·q·scale, Pᵀ·dO), dk/dv summed over each kv
    head's query heads. `lse` and `delta` may be global statistics of a longer
    key sequence than this block (ring attention): then these are this block's
    contributions. delta = rowsum(dO ∘ out) − dlse. Gradients in fp32."""
    B, T, N, K = q_BTNK.shape
    S, H = k_BSHK.shape[1], k_BSHK.shape[2]
    G = N // H
    scale = K**-0.5 if sm_scale is None else sm_scale
    f32 = jnp.float32
    q = q_BTNK.astype(f32).reshape(B, T, H, G, K)
    k, v = k_BSHK.astype(f32), v_BSHK.astype(f32)
    d_out = d_out_BTNK.astype(f32).reshape(B, T, H, G, K)
    logits = jnp.einsum("bthgk,bshk->bhgts", q, k) * f32(scale)
    mask = attention_mask_BTS(T, S, causal=causal)
    lse = lse_BNT.astype(f32).reshape(B, H, G, T)
    p = jnp.exp(logits - jnp.where(lse == -jnp.inf, jnp.inf, lse)[..., None])
    if mask is not None:
        p = jnp.where(mask[:, None, None], p, 0.0)
    dp = jnp.einsum("bthgk,bshk->bhgts", d_out, v)
    ds = p * (dp - delta_BNT.astype(f32).reshape(B, H, G, T)[..., None])
    dq = jnp.einsum("bhgts,bshk->bthgk", ds, k).reshape(B, T, N, K) * scale
    dk = jnp.einsum("bhgts,bthgk->bshk", ds, q) * scale
    dv = jnp.einsum("bhgts,bthgk->bshk", p, d_out)
    return dq, dk, dv
