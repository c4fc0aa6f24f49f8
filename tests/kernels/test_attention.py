import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atoll.kernels import attention
from atoll.kernels.attention import default_implementation


def naive_attention(q, k, v, *, causal, seg=None, scale=None):
    """Loop-free numpy float64 attention, written independently of atoll's."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, N, K = q.shape
    S, H = k.shape[1], k.shape[2]
    scale = K**-0.5 if scale is None else scale
    k = np.repeat(k, N // H, axis=2)
    v = np.repeat(v, N // H, axis=2)
    s = np.einsum("btnk,bsnk->bnts", q, k) * scale
    allowed = np.ones((B, T, S), bool)
    if causal:
        allowed &= np.tril(np.ones((T, S), bool))[None]
    if seg is not None:
        allowed &= seg[:, :, None] == seg[:, None, :]
    s = np.where(allowed[:, None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - m)
    lse = (np.log(p.sum(-1)) + m[..., 0])
    return np.einsum("bnts,bsnk->btnk", p / p.sum(-1, keepdims=True), v), lse


def _qkv(key, B=2, T=13, N=4, H=2, K=16, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(key, 3)
    return (jax.random.normal(kq, (B, T, N, K), dtype), jax.random.normal(kk, (B, T, H, K), dtype),
            jax.random.normal(kv, (B, T, H, K), dtype))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_reference_matches_naive(causal, heads):
    q, k, v = _qkv(jax.random.key(1), N=heads[0], H=heads[1])
    out, lse = attention(q, k, v, causal=causal, implementation="xla", return_lse=True)
    want, want_lse = naive_attention(q, k, v, causal=causal)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=2e-5)


def test_segment_ids_and_scale():
    q, k, v = _qkv(jax.random.key(2), T=11)
    seg = jnp.array([[0] * 4 + [1] * 7, [0] * 11])
    out = attention(q, k, v, causal=True, segment_ids=seg, sm_scale=0.3, implementation="xla")
    want, _ = naive_attention(q, k, v, causal=True, seg=np.asarray(seg), scale=0.3)
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)
    # A token of segment 1 must ignore segment 0: perturbing segment 0's keys leaves it unchanged.
    k2 = k.at[0, :4].add(5.0)
    out2 = attention(q, k2, v, causal=True, segment_ids=seg, sm_scale=0.3, implementation="xla")
    np.testing.assert_allclose(out2[0, 4:], out[0, 4:], atol=1e-6)
    assert not np.allclose(out2[0, :4], out[0, :4])


def test_gradients_match_naive_finite_differences():
    q, k, v = _qkv(jax.random.key(3), B=1, T=5, N=2, H=1, K=4)
    f = lambda q, k, v: jnp.sum(attention(q, k, v, causal=True, implementation="xla") ** 2)  # noqa: E731
    grads = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
    g = lambda q, k, v: np.sum(naive_attention(q, k, v, causal=True)[0] ** 2)  # noqa: E731
    eps = 1e-3
    for i, (arr, grad) in enumerate(zip((q, k, v), grads)):
        idx = (0, 2, 0, 1)
        plus = [np.asarray(a, np.float64) for a in (q, k, v)]
        minus = [np.asarray(a, np.float64) for a in (q, k, v)]
        plus[i][idx] += eps
        minus[i][idx] -= eps
        fd = (g(*plus) - g(*minus)) / (2 * eps)
        assert abs(fd - float(grad[idx])) < 1e-2 * max(1.0, abs(fd)), (i, fd, float(grad[idx]))


def test_default_implementation_and_errors():
    assert default_implementation(jnp.bfloat16) == ("cudnn" if jax.default_backend() == "gpu" else "xla")
    assert default_implementation(jnp.float32) == "xla"
    q, k, v = _qkv(jax.random.key(0))
    with pytest.raises(ValueError, match="unknown"):
        attention(q, k, v, implementation="flash9000")
    with pytest.raises(ValueError, match="must divide"):
        attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2))
    with pytest.raises(ValueError, match=r"\[batch, seq, heads, head_dim\]"):
        attention(q[0], k[0], v[0])


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_matches_reference(causal):
    q, k, v = _qkv(jax.random.key(4), B=2, T=256, N=8, H=2, K=64, dtype=jnp.bfloat16)
    out = attention(q, k, v, causal=causal, implementation="cudnn")
    ref = attention(q, k, v, causal=causal, implementation="xla")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)
