import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atoll.core import compress as cx

SHAPES = [(3,), (7, 5), (129,), (2, 3, 65), (1024,)]


def _data(shape, seed=0):
    """Normal data with a few large outliers (they set the block scales)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32).reshape(-1)
    x[rng.choice(x.size, size=max(1, x.size // 50), replace=False)] *= 40.0
    return x.reshape(shape)


def _block_absmax(x, block):
    x_N = np.abs(x.reshape(-1))
    s_G = np.pad(x_N, (0, -x_N.size % block)).reshape(-1, block).max(axis=1)
    return np.repeat(s_G, block)[: x_N.size].reshape(x.shape)


_encode = jax.jit(cx.encode, static_argnums=(1, 2))
_decode = jax.jit(cx.decode, static_argnums=(1, 2, 3))


def _roundtrip(x, fmt, block):
    payload = _encode(jnp.asarray(x), fmt, block)
    return np.asarray(_decode(payload, fmt, x.shape, block)), payload


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [128, 7])
def test_dense_roundtrip_within_each_formats_bound(shape, block):
    x = _data(shape)
    s = _block_absmax(x, block)
    slack = 1e-6 * s + 1e-30
    q, _ = _roundtrip(x, "fp32", block)
    np.testing.assert_array_equal(q, x)
    q, _ = _roundtrip(x, "bf16", block)
    assert q.dtype == np.float32 and np.all(np.abs(q - x) <= 2.0 ** -8 * np.abs(x))
    q, _ = _roundtrip(x, "int8", block)
    assert q.shape == x.shape and np.all(np.abs(q - x) <= s / 254 + slack)
    q, _ = _roundtrip(x, "fp4", block)
    assert q.shape == x.shape and np.all(np.abs(q - x) <= np.maximum(np.abs(x) / 3, s * 2.0 ** -7) + slack)
    assert np.all(np.sign(q)[q != 0] == np.sign(x)[q != 0])


def test_fp4_takes_the_linearly_nearest_level():
    s = 4.0
    # Linear, not log, nearest: midpoints are 0.75s and 0.375s (log would use s/sqrt2, s/sqrt8).
    x = np.array([s, 0.72 * s, 0.8 * s, 0.37 * s, 0.38 * s, s * 2.0 ** -7 * 0.9, s * 2.0 ** -7 * 1.1,
                  -0.3 * s, 0.0, -s * 2.0 ** -8], np.float32)
    q, _ = _roundtrip(x, "fp4", 16)
    want = [s, s / 2, s, s / 4, s / 2, 0.0, s * 2.0 ** -6, -s / 4, 0.0, 0.0]
    np.testing.assert_array_equal(q, np.array(want, np.float32))
    assert not np.any(np.signbit(q[-2:]))  # zero has one code, +0


def test_fp4_representable_values_and_zeros_are_exact():
    rng = np.random.default_rng(1)
    s = 3.7
    e = rng.integers(0, 8, size=300)
    x = np.where(e == 0, 0.0, s * 2.0 ** (e - 7.0)) * rng.choice([-1.0, 1.0], size=300)
    x[::128] = s  # every block's absmax is s
    x = x.astype(np.float32)
    q, _ = _roundtrip(x, "fp4", 128)
    np.testing.assert_array_equal(q, x)
    z = np.zeros((5, 9), np.float32)
    for fmt in cx.FORMATS:
        q, _ = _roundtrip(z, fmt, 16)
        np.testing.assert_array_equal(q, z)
        assert not np.any(np.signbit(q))


def test_int8_and_bf16_accept_bf16_inputs_and_int8_hits_the_absmax():
    x = jnp.asarray(_data((300,)), jnp.bfloat16)
    for fmt in cx.FORMATS:
        q = _decode(_encode(x, fmt, 64), fmt, x.shape, 64)
        assert q.dtype == jnp.float32
    x = _data((256,))
    q, _ = _roundtrip(x, "int8", 128)
    i = np.argmax(np.abs(x[:128]))
    assert q[i] == x[i]


def test_payload_bytes_match_the_formulas():
    x = jnp.zeros((1024,), jnp.float32)
    expect = {"fp32": 4096, "bf16": 2048, "int8": 1024 + 8 * 4, "fp4": 512 + 8 * 4}
    for fmt, nbytes in expect.items():
        assert cx.payload_nbytes(cx.encode(x, fmt, 128)) == nbytes
        shapes = jax.eval_shape(lambda v, f=fmt: cx.encode(v, f, 128), x)
        assert cx.payload_nbytes(shapes) == nbytes
        assert cx.wire_bits_per_value(fmt, 128) * 1024 / 8 == nbytes
    # Odd sizes pad to whole blocks; fp4 with an odd block packs an odd count.
    assert cx.payload_nbytes(cx.encode(jnp.ones((7, 5)), "fp4", 7)) == math.ceil(35 * 4 / 8) + 5 * 4
    assert cx.payload_nbytes(cx.encode(jnp.ones((129,)), "int8", 128)) == 256 + 2 * 4
    assert cx.payload_nbytes(cx.encode(jnp.ones((129,)), "fp4", 128)) == 128 + 2 * 4
    with pytest.raises(ValueError, match="fp8"):
        cx.encode(x, "fp8")


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7, 8, 12, 16])
@pytest.mark.parametrize("count", [1, 13, 100, 1001])
def test_pack_unpack_bits_roundtrip(bits, count):
    rng = np.random.default_rng(bits * 1000 + count)
    codes = rng.integers(0, 2 ** bits, size=count, dtype=np.uint32)
    packed = jax.jit(cx.pack_bits, static_argnums=1)(jnp.asarray(codes), bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (math.ceil(count * bits / 8),)
    out = jax.jit(cx.unpack_bits, static_argnums=(1, 2))(packed, bits, count)
    np.testing.assert_array_equal(np.asarray(out), codes)


def test_pack_bits_is_one_msb_first_bitstream():
    # Same stream as numpy's packbits over each code's bits, MSB first, for both code paths.
    rng = np.random.default_rng(0)
    for bits in (3, 4, 12):
        codes = rng.integers(0, 2 ** bits, size=37, dtype=np.uint32)
        bits_Nb = (codes[:, None] >> np.arange(bits - 1, -1, -1)) & 1
        np.testing.assert_array_equal(np.asarray(cx.pack_bits(jnp.asarray(codes), bits)),
                                      np.packbits(bits_Nb.reshape(-1).astype(np.uint8)))


_topk_decode = jax.jit(cx.topk_decode, static_argnums=(1, 2, 3, 4))


def _topk_mask(acc, chunk, k):
    a = np.pad(np.abs(acc.reshape(-1)), (0, -acc.size % chunk)).reshape(-1, chunk)
    mask = np.zeros_like(a, bool)
    np.put_along_axis(mask, np.argsort(-a, axis=1)[:, :k], True, axis=1)
    return mask.reshape(-1)[: acc.size].reshape(acc.shape)


@pytest.mark.parametrize("shape,chunk,k", [((3, 4096), 4096, 64), ((10000,), 4096, 64),
                                           ((7, 5), 4096, 64), ((2, 3, 65), 64, 8), ((50,), 16, 100)])
def test_topk_sends_exactly_the_largest_entries_of_each_chunk(shape, chunk, k):
    acc = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    payload = jax.jit(cx.topk_encode, static_argnums=(1, 2))(jnp.asarray(acc), chunk, k)
    sent = np.asarray(jax.jit(cx.topk_decode, static_argnums=(1, 2, 3))(payload, shape, chunk, k))
    c = math.ceil(acc.size / chunk)
    k_eff = min(k, chunk, acc.size)
    mask = _topk_mask(acc, chunk, k_eff)
    np.testing.assert_array_equal(sent != 0, mask)
    if k_eff <= chunk // 8:  # a true top-k is bimodal, so 2-bit bin means keep the signs
        np.testing.assert_array_equal(np.sign(sent[mask]), np.sign(acc[mask]))
    bits = (chunk - 1).bit_length()
    assert payload["indices"].shape == (math.ceil(c * k_eff * bits / 8),)
    assert payload["codes"].shape == (math.ceil(c * k_eff * 2 / 8),)
    assert cx.payload_nbytes(payload) == math.ceil(c * k_eff * bits / 8) + math.ceil(c * k_eff * 2 / 8) + 16


def test_topk_payload_size_for_4096_chunks():
    e = jnp.zeros((5 * 4096,))
    nbytes = cx.payload_nbytes(jax.eval_shape(lambda v: cx.topk_encode(v, 4096, 64, 4), e))
    assert nbytes == math.ceil(5 * 64 * 12 / 8) + math.ceil(5 * 64 * 2 / 8) + 4 * 4


def test_topk_table_holds_the_bin_means():
    rng = np.random.default_rng(3)
    acc = rng.standard_normal((4096 * 2 + 10,)).astype(np.float32)  # last chunk: 10 real, k=64
    chunk, k = 4096, 64
    payload = jax.jit(cx.topk_encode, static_argnums=(1, 2, 3))(jnp.asarray(acc), chunk, k, 4, 6.0)
    sent = np.asarray(jax.jit(cx.topk_decode, static_argnums=(1, 2, 3, 4))(payload, acc.shape, chunk, k, 4))
    v = acc[sent != 0].astype(np.float64)
    assert v.size == 2 * k + 10  # selected padding is neither sent nor counted in the statistics
    mu, sigma = v.mean(), v.std()
    code = np.clip(np.floor((v - (mu - 6 * sigma)) / (3 * sigma)), 0, 3).astype(int)
    table = np.asarray(payload["table"])
    for b in range(4):
        want = v[code == b].mean() if np.any(code == b) else mu - 6 * sigma + (b + 0.5) * 3 * sigma
        np.testing.assert_allclose(table[b], want, rtol=1e-5)
    np.testing.assert_allclose(sent[sent != 0], table[code], rtol=0)


def test_error_feedback_conserves_mass_and_accumulates():
    rng = np.random.default_rng(4)
    shape, chunk, k, beta = (3, 1000), 256, 16, 0.9
    e = jnp.zeros(shape)
    step = jax.jit(cx.error_feedback_step, static_argnums=(3, 4, 5))
    for i in range(4):
        delta = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
        acc = beta * e + delta
        payload, e_new = step(e, delta, beta, chunk, k, 4, 6.0)
        sent = _topk_decode(payload, shape, chunk, k, 4)
        np.testing.assert_allclose(np.asarray(sent + e_new), np.asarray(acc), rtol=1e-6, atol=1e-6)
        # Only the sent positions change; everything else stays in the buffer untouched.
        unsent = np.asarray(sent) == 0  # (acc here may round differently from the jitted one)
        np.testing.assert_allclose(np.asarray(e_new)[unsent], np.asarray(acc)[unsent], rtol=1e-6, atol=1e-6)
        e = e_new


def test_topk_of_a_constant_or_zero_tensor_is_finite():
    for value in (0.0, 2.5):
        x = jnp.full((300,), value)
        out = jax.jit(lambda v: cx.topk_decode(cx.topk_encode(v, 128, 8), (300,), 128, 8))(x)
        assert np.all(np.isfinite(np.asarray(out)))
        np.testing.assert_allclose(np.asarray(out)[np.asarray(out) != 0], value)


@pytest.mark.parametrize("fmt", cx.FORMATS)
def test_dense_codecs_vmap_over_islands(fmt):
    x_MN = jnp.asarray(np.stack([_data((7, 37), seed=i) for i in range(3)]))
    enc = jax.jit(jax.vmap(lambda v: cx.encode(v, fmt, 32)))
    dec = jax.jit(jax.vmap(lambda p: cx.decode(p, fmt, (7, 37), 32)))
    q_MN = np.asarray(dec(enc(x_MN)))
    for i in range(3):
        np.testing.assert_array_equal(q_MN[i], np.asarray(cx.decode(cx.encode(x_MN[i], fmt, 32), fmt,
                                                                    (7, 37), 32)))  # eager, too
    single = cx.payload_nbytes(jax.eval_shape(lambda v: cx.encode(v, fmt, 32), x_MN[0]))
    assert cx.payload_nbytes(jax.eval_shape(enc, x_MN)) == 3 * single


def test_error_feedback_vmaps_over_islands():
    rng = np.random.default_rng(5)
    e_MX = jnp.asarray(rng.standard_normal((4, 700)).astype(np.float32))
    d_MX = jnp.asarray(rng.standard_normal((4, 700)).astype(np.float32))
    step = jax.jit(jax.vmap(lambda e, d: cx.error_feedback_step(e, d, 0.5, 256, 8, 4, 6.0)))
    payload_M, e_new_MX = step(e_MX, d_MX)
    sent_MX = jax.jit(jax.vmap(lambda p: cx.topk_decode(p, (700,), 256, 8, 4)))(payload_M)
    one = jax.jit(cx.error_feedback_step, static_argnums=(3, 4, 5))
    for i in range(4):
        p, e_new = one(e_MX[i], d_MX[i], 0.5, 256, 8, 4, 6.0)
        for key in ("indices", "codes"):
            np.testing.assert_array_equal(np.asarray(payload_M[key][i]), np.asarray(p[key]))
        # Batched reductions may sum in another order: the table agrees to an ulp or so.
        np.testing.assert_allclose(np.asarray(payload_M["table"][i]), np.asarray(p["table"]), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(e_new_MX[i]), np.asarray(e_new), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(sent_MX[i]), np.asarray(_topk_decode(p, (700,), 256, 8, 4)),
                                   rtol=1e-6)
