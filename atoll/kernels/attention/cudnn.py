"""cuDNN fused attention through jax.nn.dot_product_attention (GPU only)."""

from __future__ import annotations

import jax

from atoll.kernels.attention.reference import _split_segment_ids, attention_mask_BTS


def attention_cudnn(
    q_BTNK: jax.Array,
    k_BSHK: jax.Array,
    v_BSHK: jax.Array,
    *,
    causal: bool = False,
    segment_ids=None,
    sm_scale: float | None = None,
    return_lse: bool = False,
):
    mask = None
    if segment_ids is not None:
        q_seg, kv_seg = _split_segment_ids(segment_ids)
        # Causality goes through cuDNN's own mask type; only segments need a tensor.
        mask = attention_mask_BTS(
            q_BTNK.shape[1], k_BSHK.shape[1], causal=False,
            q_segment_ids_BT=q_seg, kv_segment_ids_BS=kv_seg,
        )[:, None]
    out = jax.nn.dot_product_attention(
        q_BTNK, k_BSHK, v_BSHK, mask=mask, scale=sm_scale, is_causal=causal,
        implementation="cudnn", return_residual=return_lse,
    )
    if return_lse:
        out_BTNK, lse_BNT = out
        return out_BTNK, lse_BNT.astype("float32")
    return out
