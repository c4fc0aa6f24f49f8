"""atoll's Pallas (Mosaic GPU) flash attention.

On the CPU the kernels run in Pallas' GPU interpreter (simulated threads,
barriers and TMA copies), eagerly: a few seconds per kernel even at these
sizes, so the shapes are small and each test covers several features at once.
The interpreter runs the kernels eagerly only; under an outer jax.jit on a
2-core machine its simulated threads can starve XLA:CPU's thread pool.
The wgmma forms the interpreter cannot run are checked by lowering the same
kernels for CUDA on the CPU (`test_kernels_lower_for_cuda`), and on a GPU by
the `gpu`-marked tests.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atoll.kernels import attention
from atoll.kernels.attention import BlockSizes, attention_pallas, pallas_mgpu

from tests.kernels.test_attention import naive_attention



def _inputs(seed, B, T, S, N, H, K, dtype):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(shape).astype(np.float32)
               for shape in ((B, T, N, K), (B, S, H, K), (B, S, H, K)))
    d_out = rng.standard_normal((B, T, N, K)).astype(np.float32)
    w_lse = rng.standard_normal((B, N, T)).astype(np.float32)
    return [jnp.asarray(a, dtype) for a in (q, k, v)], jnp.asarray(d_out), jnp.asarray(w_lse)


def _loss(fn, d_out, w_lse):
    """A scalar using both outputs, so the gradient runs through out and the log-sum-exp."""
    def loss(q, k, v):
        out, lse = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(lse * w_lse)
    return loss


def _check_against_reference(B, T, S, N, H, K, dtype, causal, seg_q=None, seg_kv=None):
    (q, k, v), d_out, w_lse = _inputs(T * 7 + S, B, T, S, N, H, K, dtype)
    d_out = d_out.astype(dtype).astype(jnp.float32)  # the same cotangent for both, in q's dtype
    segs = None if seg_q is None else (jnp.asarray(seg_q), jnp.asarray(seg_kv))

    def pallas(q, k, v):
        return attention(q, k, v, causal=causal, segment_ids=segs, implementation="pallas", return_lse=True)

    def reference(q, k, v):
        return attention(q, k, v, causal=causal, segment_ids=segs, implementation="xla", return_lse=True)

    # One forward for both the outputs and the gradients (each interpreted kernel costs seconds).
    (out, lse), vjp = jax.vjp(pallas, q, k, v)
    grads = vjp((d_out.astype(out.dtype), w_lse))
    q32, k32, v32 = (a.astype(jnp.float32) for a in (q, k, v))
    want, want_lse = naive_attention(q32, k32, v32, causal=causal,
                                     seg=None if seg_q is None else np.asarray(seg_q))
    want_grads = jax.grad(_loss(reference, d_out, w_lse), argnums=(0, 1, 2))(q32, k32, v32)
    # bf16 / fp16 inputs and outputs: tolerances are a few units in the last place.
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2, rtol=2e-2)
    np.testing.assert_allclose(np.asarray(lse), want_lse, atol=2e-3, rtol=1e-3)
    for name, got, ref in zip("qkv", grads, want_grads):
        ref = np.asarray(ref)
        err = np.abs(np.asarray(got, np.float32) - ref).max() / np.abs(ref).max()
        assert err < 2e-2, f"d{name}: relative error {err:.3g}"
    return out, grads


def test_causal_gqa_segments_odd_length():
    # 100 tokens (padded to 128 inside), 2 query heads per kv head, three packed
    # segments crossing the 64-row block boundaries; gradients through out and lse.
    seg = np.repeat(np.arange(3), 34)[None, :100]
    _check_against_reference(1, 100, 100, 2, 1, 64, jnp.bfloat16, causal=True, seg_q=seg, seg_kv=seg)


def test_cross_attention_padded_keys_gqa():
    # Non-causal, 50 queries against 100 keys: padded keys sit in the key block and must
    # be masked (the dQ kernel sweeps two 64-key blocks, the second one part padding).
    out, grads = _check_against_reference(1, 50, 100, 2, 1, 64, jnp.bfloat16, causal=False)
    assert out.shape == (1, 50, 2, 64) and grads[1].shape == (1, 100, 1, 64)


def test_head_dim_128_fp16_causal_forward_batch_of_two():
    (q, k, v), _, _ = _inputs(5, 2, 64, 64, 1, 1, 128, jnp.float16)
    out = attention(q, k, v, causal=True, implementation="pallas")
    want, _ = naive_attention(*(a.astype(jnp.float32) for a in (q, k, v)), causal=True)
    assert out.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("causal,segments,K", [(True, True, 128), (False, False, 64)])
def test_kernels_lower_for_cuda(causal, segments, K):
    """The compiled path (wgmma on shared memory and registers, layouts, TMA) lowers to
    Mosaic GPU: forward, dq and dkv kernels, GQA and a padded length included."""
    B, T, N, H = 2, 200, 4, 2
    q = jax.ShapeDtypeStruct((B, T, N, K), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((B, T, H, K), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def loss(q, k, v, seg):
        out, lse = attention_pallas(q, k, v, causal=causal, segment_ids=seg if segments else None,
                                    return_lse=True, interpret=False)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("custom_call @mosaic_gpu") == 3


def _brute_force_blocks(T, S, kv_len, bq, bkv, causal):
    """For every query block: key blocks with any visible pair, and those with all pairs visible."""
    q_ids = np.arange(T)[:, None]
    k_ids = np.arange(S)[None, :]
    visible = np.broadcast_to((k_ids < kv_len) & ((q_ids >= k_ids) if causal else True), (T, S))
    any_, all_ = [], []
    for i in range(T // bq):
        rows = visible[i * bq:(i + 1) * bq]
        blocks = [rows[:, j * bkv:(j + 1) * bkv] for j in range(S // bkv)]
        any_.append([j for j, blk in enumerate(blocks) if blk.any()])
        all_.append([j for j, blk in enumerate(blocks) if blk.all()])
    return any_, all_


@pytest.mark.parametrize("bq,bkv,causal", list(itertools.product([64, 128], [64, 128], [False, True])))
@pytest.mark.parametrize("T,S", [(1024, 1024), (512, 1024), (1024, 512)])
def test_block_ranges_match_brute_force(bq, bkv, causal, T, S):
    """The block ranges each kernel visits (what decides which tiles are skipped or
    masked), checked at sizes the interpreter cannot afford."""
    for kv_len in (S, S - 37):
        st = pallas_mgpu._Static(causal=causal, has_segments=False, kv_len=kv_len, q_len=T, scale=1.0, group=1)
        any_, all_ = _brute_force_blocks(T, S, kv_len, bq, bkv, causal)
        for i in range(T // bq):
            n_full, n_total = (int(x) for x in pallas_mgpu._q_ranges(i * bq, bq, bkv, S // bkv, st))
            # Every block with a visible pair is visited, and no other; the unmasked fast
            # path takes exactly the blocks whose pairs are all visible.
            assert list(range(n_total)) == any_[i], (i, kv_len)
            assert list(range(n_full)) == all_[i], (i, kv_len)
        # The dkv kernel: query blocks that see key block j, and those that see all of it
        # (padded keys need no mask there: their gradients are sliced off).
        st_full = pallas_mgpu._Static(causal=causal, has_segments=False, kv_len=S, q_len=T, scale=1.0, group=1)
        any_t, all_t = _brute_force_blocks(T, S, S, bq, bkv, causal)
        for j in range(S // bkv):
            start, first_full = (int(x) for x in pallas_mgpu._kv_ranges(j * bkv, bq, bkv, T // bq, st_full))
            sees = [i for i in range(T // bq) if j in any_t[i]]
            sees_all = [i for i in range(T // bq) if j in all_t[i]]
            assert sees == list(range(start, T // bq))
            assert sees_all == list(range(first_full, T // bq))


def test_unsupported_inputs_are_named():
    q = jnp.zeros((1, 64, 2, 64), jnp.float32)
    with pytest.raises(ValueError, match="bfloat16 and float16"):
        attention(q, q, q, implementation="pallas")
    q = jnp.zeros((1, 64, 2, 32), jnp.bfloat16)
    with pytest.raises(ValueError, match="head_dim 64 and 128"):
        attention(q, q, q, implementation="pallas")
    q = jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="segment ids must be"):
        attention(q, q, q, segment_ids=jnp.zeros((1, 63), jnp.int32), implementation="pallas")
    with pytest.raises(ValueError, match="multiple of 64"):
        BlockSizes(block_kv=96)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("K", [64, 128])
def test_pallas_matches_reference_on_gpu(causal, K):
    B, T, N, H = 2, 1000, 8, 2
    seg = np.repeat(np.arange(4), 250)[None].repeat(B, 0)
    _check_against_reference(B, T, T, N, H, K, jnp.bfloat16, causal=causal)
    _check_against_reference(B, T, T, N, H, K, jnp.bfloat16, causal=causal, seg_q=seg, seg_kv=seg)
