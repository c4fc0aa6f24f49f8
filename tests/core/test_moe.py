import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from atoll.core import flops, moe
from atoll.core.transformer import Transformer, TransformerConfig
from atoll.kernels import grouped_matmul
from atoll.parallel import train_state

E, K = 4, 2


def _logits(seed=0, G=3, S=16):
    return jax.random.normal(jax.random.key(seed), (G, S, E)) * 2.0


def _weights(seed=1, D=8, F=16):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return moe.ExpertWeights(jax.random.normal(k1, (E, D, F)) * 0.3, jax.random.normal(k2, (E, D, F)) * 0.3,
                             jax.random.normal(k3, (E, F, D)) * 0.3)


@pytest.mark.parametrize("order", ["softmax_topk", "topk_softmax"])
def test_token_choice_routes_each_token_to_k_distinct_experts(order):
    logits = _logits()
    weights, experts = moe.top_k_routing(logits, K, order)
    assert experts.shape == weights.shape == (3, 16, K)
    e = np.asarray(experts)
    assert all(len(set(row)) == K for row in e.reshape(-1, K))  # at most k experts, no repeats
    probs = np.asarray(jax.nn.softmax(logits, -1))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    # the chosen experts are the k most probable ones
    np.testing.assert_array_equal(np.sort(e, -1), np.sort(np.argsort(-probs, -1)[..., :K], -1))
    w = np.asarray(weights)
    if order == "topk_softmax":
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)  # renormalized over the k chosen
    else:
        np.testing.assert_allclose(w, np.take_along_axis(probs, e, -1), rtol=1e-6)
        assert (w.sum(-1) <= 1 + 1e-6).all()


def test_bias_changes_the_choice_but_not_the_weights():
    logits = jnp.zeros((1, 2, E)).at[:, :, 0].set(1.0)
    bias = jnp.array([-10.0, 10.0, 0.0, 0.0])
    weights, experts = moe.top_k_routing(logits, 1, "softmax_topk", bias)
    assert (np.asarray(experts) == 1).all()
    np.testing.assert_allclose(weights, jax.nn.softmax(logits, -1)[..., 1:2], rtol=1e-6)


def test_capacity_dispatch_never_overflows_and_drops_what_a_hand_count_drops():
    experts = jax.random.randint(jax.random.key(3), (2, 12, K), 0, E)
    experts = jnp.sort(experts, -1).at[..., 1].add((experts[..., 0] == experts[..., 1]))  # distinct per token
    experts = experts % E
    C = 4
    slot, kept = moe.capacity_slots(experts, E, C)
    e, s, kp = map(np.asarray, (experts, slot, kept))
    for g in range(2):
        fill = np.zeros(E, int)
        for k in range(K):  # first choices before second choices, tokens in order
            for t in range(12):
                want_slot = fill[e[g, t, k]]
                fill[e[g, t, k]] += 1
                assert s[g, t, k] == want_slot and kp[g, t, k] == (want_slot < C)
    x = jax.random.normal(jax.random.key(4), (2, 12, 8))
    buffer = np.asarray(moe.dispatch_to_slots(x, experts, slot, kept, E, C))
    assert buffer.shape == (2, E, C, 8)
    per_expert = np.zeros((2, E), int)
    for g, t, k in zip(*np.nonzero(kp)):
        np.testing.assert_array_equal(buffer[g, e[g, t, k], s[g, t, k]], np.asarray(x)[g, t])
        per_expert[g, e[g, t, k]] += 1
    assert (per_expert <= C).all()
    hand_drops = sum(max(0, np.sum(e[g] == j) - C) for g in range(2) for j in range(E))
    assert (~kp).sum() == hand_drops


def test_capacity_combine_with_room_for_everything_equals_the_dense_reference():
    x = jax.random.normal(jax.random.key(5), (3, 16, 8))
    weights, experts = moe.top_k_routing(_logits(), K, "topk_softmax")
    w = _weights()
    C = 16  # every token fits
    slot, kept = moe.capacity_slots(experts, E, C)
    assert bool(kept.all())
    y = moe.combine_from_slots(moe.expert_ffn(moe.dispatch_to_slots(x, experts, slot, kept, E, C), w),
                               experts, slot, kept, weights)
    np.testing.assert_allclose(y, moe.masked_dense_reference(x, experts, weights, w), rtol=1e-5, atol=1e-5)


def test_dropless_equals_the_masked_dense_reference_in_value_and_gradient():
    x = jax.random.normal(jax.random.key(6), (3, 16, 8))
    logits = _logits()
    w = _weights()

    def loss(fn, x, logits, w):
        weights, experts = moe.top_k_routing(logits, K, "topk_softmax")
        return jnp.sum(jnp.sin(fn(x, experts, weights, w)))

    got = jax.value_and_grad(lambda *a: loss(moe.dropless_ffn, *a), argnums=(0, 1, 2))(x, logits, w)
    want = jax.value_and_grad(lambda *a: loss(moe.masked_dense_reference, *a), argnums=(0, 1, 2))(x, logits, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_grouped_matmul_matches_per_group_matmuls_and_zeroes_the_tail():
    x = jax.random.normal(jax.random.key(7), (10, 4))
    w = jax.random.normal(jax.random.key(8), (3, 4, 5))
    sizes = jnp.array([3, 0, 5])
    y = np.asarray(grouped_matmul(x, w, sizes))
    np.testing.assert_allclose(y[:3], x[:3] @ w[0], rtol=1e-5)
    np.testing.assert_allclose(y[3:8], x[3:8] @ w[2], rtol=1e-5)
    np.testing.assert_array_equal(y[8:], 0.0)
    with pytest.raises(ValueError, match="group_sizes"):
        grouped_matmul(x, w, jnp.array([10]))


def test_expert_choice_fills_every_expert_exactly_to_capacity():
    probs = jax.nn.softmax(_logits(), -1)
    C = moe.expert_capacity(16, E, K, 1.0)
    assert C == 8
    weights, tokens = moe.expert_choice_routing(probs, C)
    assert tokens.shape == (3, E, C)
    t = np.asarray(tokens)
    assert all(len(set(t[g, e])) == C for g in range(3) for e in range(E))  # C distinct tokens each
    np.testing.assert_allclose(weights, np.take_along_axis(np.swapaxes(np.asarray(probs), 1, 2), t, -1))
    x = jax.random.normal(jax.random.key(9), (3, 16, 8))
    buffer = moe.dispatch_by_tokens(x, tokens)
    np.testing.assert_array_equal(buffer[1, 2, 3], x[1, t[1, 2, 3]])
    ones = moe.combine_by_tokens(jnp.ones((3, E, C, 1)), tokens, jnp.ones((3, E, C)), 16)
    np.testing.assert_array_equal(ones.sum(), 3 * E * C)  # every slot lands on one token


def test_balance_loss_is_one_for_uniform_routing_and_grows_when_it_concentrates():
    G, S = 2, 8
    uniform_probs = jnp.full((G, S, E), 1.0 / E)
    uniform_experts = jnp.broadcast_to(jnp.arange(S)[None, :, None] % E, (G, S, 1))
    assert float(moe.switch_balance_loss(uniform_probs, uniform_experts)) == pytest.approx(1.0)
    assert float(moe.sequence_balance_loss(uniform_probs, uniform_experts)) == pytest.approx(1.0)
    skewed_probs = jnp.zeros((G, S, E)).at[..., 0].set(1.0)
    skewed_experts = jnp.zeros((G, S, 1), jnp.int32)
    assert float(moe.switch_balance_loss(skewed_probs, skewed_experts)) == pytest.approx(E)
    # balanced over the batch but not within each sequence: only the per-sequence loss sees it
    probs = jnp.stack([jnp.zeros((S, E)).at[:, 0].set(1.0), jnp.zeros((S, E)).at[:, 1].set(1.0)])
    experts = jnp.stack([jnp.zeros((S, 1), jnp.int32), jnp.ones((S, 1), jnp.int32)])
    assert float(moe.switch_balance_loss(probs, experts)) == pytest.approx(E / 2)
    assert float(moe.sequence_balance_loss(probs, experts)) == pytest.approx(E)
    assert float(moe.router_z_loss(jnp.zeros((1, 1, E)))) == pytest.approx(np.log(E) ** 2)
    assert float(moe.router_entropy(uniform_probs)) == pytest.approx(np.log(E))


def test_bias_balancing_moves_a_skewed_load_toward_uniform():
    """A router that prefers expert 0 for every token: the bias update alone
    (no gradient) spreads the load out."""
    logits = jnp.broadcast_to(jnp.array([2.0, 1.0, 0.5, 0.0]), (4, 32, E)) + 0.3 * jax.random.normal(
        jax.random.key(10), (4, 32, E))
    bias = jnp.zeros(E)
    spread = []
    for _ in range(60):
        _, experts = moe.top_k_routing(logits, 1, "topk_softmax", bias)
        counts = moe.expert_counts(experts, E)
        spread.append(float(counts.max() / counts.mean()))
        bias = moe.balance_bias_update(bias, counts, 0.05)
    assert spread[0] > 3.0  # nearly everything on expert 0 at first
    assert max(spread[-10:]) < 1.6, spread[-10:]


def _tiny(**moe_fields):
    return TransformerConfig(vocab_size=32, d_model=16, num_layers=4, num_heads=2, num_kv_heads=2, head_dim=8,
                             mlp_dim=32, moe=moe.MoeConfig(num_experts=E, **moe_fields))


@pytest.mark.parametrize("scan", [True, False])
def test_every_kth_block_is_moe_and_the_metrics_come_in_depth_order(scan):
    c = _tiny(every=2, top_k=1)
    c = TransformerConfig(**{**c.__dict__, "scan_layers": scan})
    model = Transformer(c)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
    variables = model.init(jax.random.key(1), tokens)
    params = nn.meta.unbox(variables["params"])
    names = " ".join(jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params))
    assert ("'moe'" in names) and ("'mlp'" in names)
    assert flops.total_params(c) == sum(x.size for x in jax.tree.leaves(params))
    _, recorded = model.apply({"params": params}, tokens, mutable=list(moe.COLLECTIONS) + [moe.ROUTES])
    metrics = moe.layer_metrics(recorded)
    assert metrics["load_fraction"].shape == (2, E)  # blocks 1 and 3
    np.testing.assert_allclose(metrics["load_fraction"].sum(-1), 1.0, rtol=1e-6)
    assert float(moe.aux_loss(recorded)) > 0


def test_active_params_count_k_experts_per_moe_layer():
    dense = TransformerConfig(vocab_size=32, d_model=16, num_layers=4, num_heads=2, num_kv_heads=2, head_dim=8,
                              mlp_dim=32)
    c = _tiny(top_k=2, expert_mlp_dim=16, num_shared_experts=1)  # 2 + 1 experts of 16 ≈ one FFN of 48
    per_layer_router = 16 * E
    assert flops.active_params(c) == flops.total_params(dense) + 4 * (per_layer_router + 3 * 16 * (48 - 32))
    assert flops.total_params(c) - flops.active_params(c) == 4 * (E - 2) * 3 * 16 * 16
    assert flops.executed_moe_flops_factor(c) == 1.25
    assert flops.executed_moe_flops_factor(_tiny(dispatch="dropless")) == 1.0


@pytest.mark.parametrize("fields", [
    dict(router="topk_softmax", dispatch="capacity", num_shared_experts=1),
    dict(router="softmax_topk", dispatch="dropless", bias_rate=0.01),
    dict(router="expert_choice", top_k=1),
], ids=["capacity_shared", "dropless_bias", "expert_choice"])
def test_the_moe_lm_learns_a_copy_task(fields):
    """Loss falls on next-token prediction of a repeating pattern, and (bias
    router) the balance biases move by load, not by the optimizer."""
    c = _tiny(**fields)
    model = Transformer(c)
    tx = optax.adam(3e-3)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"])
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    step = jax.jit(lambda s, b: train_state.train_step(model, tx, s, b))
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(40):
        starts = rng.integers(0, 8, size=(8, 1))
        batch = jnp.asarray((starts + np.arange(17)[None]) % 8, jnp.int32)
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    assert set(metrics["moe"]) >= {"load_fraction", "max_over_mean_load", "drop_rate", "router_entropy",
                                   "z_loss", "aux_loss"}
    if fields.get("bias_rate"):
        flat = jax.tree_util.tree_leaves_with_path(state["params"])
        biases = [v for p, v in flat if moe.BIAS in jax.tree_util.keystr(p)]
        steps = [np.asarray(b) / fields["bias_rate"] for b in biases]  # whole sign steps, no AdamW in them
        assert steps and all(np.allclose(x, np.round(x), atol=1e-3) for x in steps)
        assert any(np.abs(x).max() >= 1 for x in steps)
    if fields["router"] == "expert_choice":
        np.testing.assert_allclose(metrics["moe"]["load_fraction"], 1.0 / E, rtol=1e-6)
