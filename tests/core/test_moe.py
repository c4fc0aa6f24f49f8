import functools

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
    y = _through_slots(x, experts, slot, kept, weights, w, C)
    np.testing.assert_allclose(y, moe.masked_dense_reference(x, experts, weights, w), rtol=1e-5, atol=1e-5)


@functools.partial(jax.jit, static_argnums=6)
def _through_slots(x, experts, slot, kept, weights, w, C):
    buffer = moe.dispatch_to_slots(x, experts, slot, kept, E, C)
    return moe.combine_from_slots(moe.expert_ffn(buffer, w), experts, slot, kept, weights)


def test_capacity_combine_with_drops_equals_the_reference_without_the_dropped_assignments():
    x = jax.random.normal(jax.random.key(11), (3, 16, 8))
    weights, experts = moe.top_k_routing(_logits(), K, "topk_softmax")
    w = _weights()
    C = 5  # 32 assignments over 4 experts per group: some overflow
    slot, kept = moe.capacity_slots(experts, E, C)
    assert 0 < int((~kept).sum())
    y = _through_slots(x, experts, slot, kept, weights, w, C)
    want = moe.masked_dense_reference(x, experts, jnp.where(kept, weights, 0.0), w)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)


def test_expert_choice_combine_equals_a_dense_reference():
    x = jax.random.normal(jax.random.key(12), (3, 16, 8))
    probs = jax.nn.softmax(_logits(), -1)
    w = _weights()
    weights, tokens = moe.expert_choice_routing(probs, 6)
    y = moe.combine_by_tokens(moe.expert_ffn(moe.dispatch_by_tokens(x, tokens), w), tokens, weights, 16)
    # every expert on every token, each token's outputs weighted by the slots it holds
    h = nn.silu(jnp.einsum("gsd,edf->gsef", x, w.gate_EDF)) * jnp.einsum("gsd,edf->gsef", x, w.up_EDF)
    y_GSED = jnp.einsum("gsef,efd->gsed", h, w.down_EFD)
    combine_GSE = jnp.einsum("gecs,gec->gse", jax.nn.one_hot(tokens, 16), weights)
    np.testing.assert_allclose(y, jnp.einsum("gsed,gse->gsd", y_GSED, combine_GSE), rtol=1e-5, atol=1e-5)


def test_layer_metrics_come_in_depth_order_from_unrolled_and_scanned_models():
    layer = lambda i: {"drop_rate": jnp.float32(i), "load_fraction": jnp.full((E,), i, jnp.float32)}
    unrolled = {moe.METRICS: {f"block_{i}": {"moe": layer(i)} for i in (10, 2, 1)}}
    np.testing.assert_array_equal(moe.layer_metrics(unrolled)["drop_rate"], [1, 2, 10])
    # scanned groups of 2 with an MoE block at both positions: depth = group * 2 + position
    scanned = {moe.METRICS: {"blocks": {f"block_{j}": {"moe": {
        "drop_rate": jnp.array([2.0 * g + j for g in range(3)]),
        "load_fraction": jnp.zeros((3, E))}} for j in (1, 0)}}}
    np.testing.assert_array_equal(moe.layer_metrics(scanned)["drop_rate"], [0, 1, 2, 3, 4, 5])
    assert moe.layer_metrics(unrolled)["load_fraction"].shape == (3, E)


def test_dropless_equals_the_masked_dense_reference_in_value_and_gradient():
    x = jax.random.normal(jax.random.key(6), (3, 16, 8))
    logits = _logits()
    w = _weights()

    def loss(fn, x, logits, w):
        weights, experts = moe.top_k_routing(logits, K, "topk_softmax")
        return jnp.sum(jnp.sin(fn(x, experts, weights, w)))

    got = jax.jit(jax.value_and_grad(lambda *a: loss(moe.dropless_ffn, *a), argnums=(0, 1, 2)))(x, logits, w)
    want = jax.jit(jax.value_and_grad(lambda *a: loss(moe.masked_dense_reference, *a), argnums=(0, 1, 2)))(
        x, logits, w)
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


def _params(model, tokens):
    """Params drawn with numpy on the model's shapes: compiling flax's random init
    costs seconds per model on CPU, far more than these tests' steps."""
    shapes = jax.eval_shape(lambda t: nn.meta.unbox(model.init(jax.random.key(0), t)["params"]), tokens)
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        if moe.BIAS in name:
            return jnp.zeros(leaf.shape, leaf.dtype)
        std = 1.0 if "embedding" in name else 0.05
        return jnp.asarray(rng.normal(0, std, leaf.shape), leaf.dtype)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def _tiny(num_layers=4, **moe_fields):
    return TransformerConfig(vocab_size=32, d_model=16, num_layers=num_layers, num_heads=2, num_kv_heads=2,
                             head_dim=8, mlp_dim=32, moe=moe.MoeConfig(num_experts=E, **moe_fields))


@pytest.mark.parametrize("scan", [True, False])
def test_every_kth_block_is_moe_and_the_metrics_come_in_depth_order(scan):
    c = _tiny(every=2, top_k=1)
    c = TransformerConfig(**{**c.__dict__, "scan_layers": scan})
    model = Transformer(c)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
    params = _params(model, tokens)
    names = " ".join(jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params))
    assert ("'moe'" in names) and ("'mlp'" in names)
    assert flops.total_params(c) == sum(x.size for x in jax.tree.leaves(params))
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t, mutable=list(moe.COLLECTIONS) + [moe.ROUTES]))
    _, recorded = apply(params, tokens)
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
    c = _tiny(num_layers=2, **fields)
    model = Transformer(c)
    tx = optax.adam(3e-3)
    params = _params(model, jnp.zeros((1, 16), jnp.int32))
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
    if fields["router"] == "expert_choice":  # every token still reached some expert
        assert float(np.max(metrics["moe"]["drop_rate"])) < 0.5


@pytest.mark.parametrize("overrides, message", [
    ({"model.moe.router": "hash"}, "model.moe.router"),
    ({"model.moe.top_k": 9}, "exceeds"),
    ({"model.moe.every": 3}, "must divide config.model.num_layers"),
    ({"model.moe.router": "expert_choice", "model.moe.bias_rate": 0.001}, "balanced by construction"),
    ({"model.moe.router": "expert_choice", "model.moe.dispatch": "dropless"}, "dispatch = 'capacity'"),
    ({"mesh.expert": 3}, "divisible by config.mesh.expert"),
    ({"mesh.expert": 2, "model.moe.dispatch": "dropless"}, "ragged_all_to_all"),
    ({"model.moe.num_experts": 0, "mesh.expert": 2}, "dense model"),
    ({"mesh.tensor": 2, "model.moe.expert_mlp_dim": 33}, "expert_mlp_dim"),
    ({"mesh.context": 2}, "context"),
])
def test_bad_moe_configs_name_the_field(overrides, message):
    from atoll.configs import lm
    from atoll.configs.validation import ConfigError

    c = lm.get_config("tiny")
    c.model.moe.update(num_experts=8, top_k=2, expert_mlp_dim=64)
    for dotted, value in overrides.items():
        section, field = dotted.rsplit(".", 1)
        node = c
        for part in section.split("."):
            node = node[part]
        node[field] = value
    with pytest.raises(ConfigError, match=message):
        lm.validate(c)
