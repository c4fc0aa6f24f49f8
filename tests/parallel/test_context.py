"""Context parallelism (atoll.parallel.context) against single-device attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atoll.kernels.attention import attention
from atoll.parallel import context as cp

B, T, N, H, K = 2, 64, 4, 2, 16
SPEC = jax.P(None, "context")




def _inputs(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, T, N, K)).astype(np.float32)
    k, v = (rng.standard_normal((B, T, H, K)).astype(np.float32) for _ in range(2))
    d_out = rng.standard_normal((B, T, N, K)).astype(np.float32)
    w_lse = rng.standard_normal((B, N, T)).astype(np.float32)
    return [jnp.asarray(a, dtype) for a in (q, k, v)], d_out, w_lse


def _sharded(C, strategy, causal):
    mesh = jax.make_mesh((C,), ("context",))

    def local(q, k, v):
        return cp.context_attention(q, k, v, strategy=strategy, causal=causal, implementation="xla",
                                    return_lse=True)

    lse_spec = jax.P(None, None, "context")
    fn = jax.shard_map(local, mesh=mesh, in_specs=(SPEC,) * 3, out_specs=(SPEC, lse_spec))
    return mesh, fn


def _run(C, strategy, causal):
    """Output, lse and gradients (through both) of the context-parallel attention, in the original order."""
    (q, k, v), d_out, w_lse = _inputs()
    order = cp.zigzag_positions(T, C) if causal else np.arange(T)
    mesh, fn = _sharded(C, strategy, causal)
    put = lambda x: jax.device_put(x[:, order], jax.NamedSharding(mesh, SPEC))  # noqa: E731
    d_out_z, w_lse_z = d_out[:, order], w_lse[:, :, order]

    def loss(q, k, v):
        out, lse = fn(q, k, v)
        return jnp.sum(out * d_out_z) + jnp.sum(lse * w_lse_z), (out, lse)

    # One compilation for output, lse and gradients.
    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        put(q), put(k), put(v))
    back = np.argsort(order)
    return (np.asarray(out)[:, back], np.asarray(lse)[:, :, back],
            [np.asarray(g)[:, back] for g in grads])


def _reference(causal):
    (q, k, v), d_out, w_lse = _inputs()

    def fn(q, k, v):
        return attention(q, k, v, causal=causal, implementation="xla", return_lse=True)

    def loss(q, k, v):
        out, lse = fn(q, k, v)
        return jnp.sum(out * d_out) + jnp.sum(lse * w_lse)

    out, lse = fn(q, k, v)
    return np.asarray(out), np.asarray(lse), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("C", [2, 8])  # one hop, and many (4 adds no code path, only time)
def test_every_strategy_equals_single_device_attention(C, causal):
    want_out, want_lse, want_grads = _reference(causal)
    results = {}
    # all_gather's causal path is C-independent code (a scan over gathered blocks, autodiff
    # backward) and the slowest to compile: once at C = 2; ring and TokenRing at every C.
    strategies = cp.STRATEGIES if (C == 2 or not causal) else ("ring", "tokenring")
    for strategy in strategies:
        out, lse, grads = _run(C, strategy, causal)
        np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=2e-5, err_msg=strategy)
        np.testing.assert_allclose(lse, want_lse, atol=2e-5, rtol=2e-5, err_msg=strategy)
        for name, got, want in zip("qkv", grads, want_grads):
            np.testing.assert_allclose(got, np.asarray(want), atol=5e-5, rtol=5e-5, err_msg=f"{strategy} d{name}")
        results[strategy] = (out, grads)
    # TokenRing and ring: the same result, not merely both close to the reference.
    np.testing.assert_allclose(results["tokenring"][0], results["ring"][0], atol=1e-6)
    for a, b in zip(results["tokenring"][1], results["ring"][1]):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("C", [1, 2, 3, 4, 8])
def test_zigzag_layout_balances_causal_work(C):
    order = cp.zigzag_positions(16 * C, C)
    assert sorted(order) == list(range(16 * C))  # a permutation
    # Brute force over tokens: visible (query, key) token pairs per device are equal.
    per_device = order.reshape(C, -1)
    pairs = [int(np.sum(rows[:, None] >= np.arange(16 * C)[None, :])) for rows in per_device]
    assert len(set(pairs)) == 1, pairs
    # The ring schedule computes exactly the visible chunk pairs, the same number on every device.
    visible = cp.visible_chunk_pairs(C)
    assert visible == [2 * C + 1] * C
    assert cp.scheduled_chunk_pairs(C) == visible


@pytest.mark.parametrize("strategy", cp.STRATEGIES)
def test_byte_model_equals_the_traced_collectives(strategy):
    C = 4
    mesh = jax.make_mesh((C,), ("context",))
    sharding = jax.NamedSharding(mesh, SPEC)
    q = jax.ShapeDtypeStruct((B, T, N, K), jnp.bfloat16, sharding=sharding)
    kv = jax.ShapeDtypeStruct((B, T, H, K), jnp.bfloat16, sharding=sharding)
    fn = jax.shard_map(lambda q, k, v: cp.context_attention(q, k, v, strategy=strategy, implementation="xla"),
                       mesh=mesh, in_specs=(SPEC,) * 3, out_specs=SPEC)
    forward = cp.collective_bytes(jax.make_jaxpr(fn)(q, kv, kv), {"context": C})
    both = cp.collective_bytes(jax.make_jaxpr(jax.grad(
        lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))(q, kv, kv), {"context": C})
    model = cp.bytes_per_device(strategy, B=B, T=T, N=N, H=H, K=K, C=C, dtype_bytes=2)
    assert model["forward"] == forward > 0
    assert model["total"] == both


def test_bad_lengths_and_strategies_are_named():
    with pytest.raises(ValueError, match="multiple of 8"):
        cp.zigzag_positions(36, 4)
    with pytest.raises(ValueError, match="unknown"):
        cp.bytes_per_device("spiral", B=1, T=8, N=1, H=1, K=1, C=2)
    mesh, _ = _sharded(4, "ring", True)
    fn = jax.shard_map(lambda q: cp.context_attention(q, q, q, strategy="ring"), mesh=mesh,
                       in_specs=SPEC, out_specs=SPEC)
    with pytest.raises(ValueError, match="sequence length 36 must be a multiple of 8"):
        jax.eval_shape(fn, jax.ShapeDtypeStruct((1, 36, 1, 8), jnp.float32,
                                                sharding=jax.NamedSharding(mesh, SPEC)))
