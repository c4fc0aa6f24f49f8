import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atoll.core import flops
from atoll.core.transformer import Transformer, TransformerConfig, count_params, next_token_loss

SMALL = TransformerConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                          mlp_dim=48)


# Everything runs jitted: eagerly, each op compiles on its own (the suite runs with most
# XLA optimizations off), which cost these tests most of their time.
def _init(cfg, T=16, seed=0):
    model = Transformer(cfg)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, T), jnp.int32))["params"])
    return model, params


def _apply(model, params, tokens):
    return jax.jit(model.apply)({"params": params}, tokens)


@pytest.mark.parametrize("scan", [True, False])
def test_changing_a_future_token_never_changes_past_logits(scan):
    cfg = dataclasses.replace(SMALL, scan_layers=scan)
    model, params = _init(cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    t = 9
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % cfg.vocab_size)
    a = _apply(model, params, tokens)
    b = _apply(model, params, changed)
    np.testing.assert_array_equal(a[:, :t], b[:, :t])
    assert not np.allclose(a[:, t:], b[:, t:]), "the changed token must affect its own and later logits"


def test_param_count_matches_flop_accounting():
    for cfg in (SMALL, dataclasses.replace(SMALL, tie_embeddings=True, scan_layers=False)):
        _, params = _init(cfg)
        assert count_params(params) == flops.total_params(cfg)


def test_flops_per_token_by_hand():
    c = TransformerConfig(vocab_size=100, d_model=10, num_layers=3, num_heads=2, num_kv_heads=1, head_dim=5,
                          mlp_dim=20, tie_embeddings=True)
    # per layer: q 10*2*5=100, k 50, v 50, o 100, mlp 3*10*20=600 -> 900; 3 layers 2700; head 100*10=1000
    assert flops.matmul_params(c) == 3700
    T = 7
    assert flops.train_flops_per_token(c, T) == 6 * 3700 + 6 * 3 * 7 * 2 * 5
    assert flops.total_params(c) == 2700 + 1000 + (2 * 3 + 1) * 10
    assert flops.baseline_convention_flops_per_token(c, T) == 6 * flops.total_params(c) + 12 * 3 * 10 * 7
    untied = dataclasses.replace(c, tie_embeddings=False)  # a second table, but no extra matmul
    assert flops.total_params(untied) == flops.total_params(c) + 1000
    assert flops.matmul_params(untied) == 3700
    assert flops.device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.device_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.device_peak_flops("cpu") is None


def test_remat_and_scan_do_not_change_the_math():
    """Same params (restacked) give the same loss and gradients with remat and unrolled layers."""
    tokens = jax.random.randint(jax.random.key(2), (2, 17), 0, SMALL.vocab_size)
    model, params = _init(SMALL)
    loss = lambda m, p: next_token_loss(m.apply({"params": p}, tokens[:, :-1]), tokens[:, 1:])  # noqa: E731
    l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
    remat = Transformer(dataclasses.replace(SMALL, remat="full"))
    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(remat, p)))(params)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g0, g1)
    unrolled = Transformer(dataclasses.replace(SMALL, scan_layers=False))
    stacked = params["blocks"]
    p2 = {k: v for k, v in params.items() if k != "blocks"}
    for i in range(SMALL.num_layers):
        p2[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    np.testing.assert_allclose(jax.jit(loss, static_argnums=0)(unrolled, p2), l0, rtol=1e-6)


def test_bf16_compute_keeps_fp32_params_and_logits():
    cfg = dataclasses.replace(SMALL, dtype="bfloat16")
    model, params = _init(cfg)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, cfg.vocab_size)
    logits = _apply(model, params, tokens)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 16, cfg.vocab_size)
    ref = _apply(Transformer(SMALL), params, tokens)
    assert float(jnp.max(jnp.abs(logits - ref))) < 0.1  # bf16 rounding, not a different model


def test_initial_loss_is_near_uniform():
    """An untied head starts from near-uniform predictions (a bad init scale breaks this)."""
    model, params = _init(SMALL)
    tokens = jax.random.randint(jax.random.key(4), (4, 33), 0, SMALL.vocab_size)
    loss = next_token_loss(_apply(model, params, tokens[:, :-1]), tokens[:, 1:])
    assert abs(float(loss) - np.log(SMALL.vocab_size)) < 0.05
