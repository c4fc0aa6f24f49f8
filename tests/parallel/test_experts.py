"""Expert parallelism equals the single-device MoE layer, forward and backward.

Params come from numpy (shapes from eval_shape): on 2 CPU cores each XLA
compile costs seconds, so the tests compile nothing they do not check.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from atoll.core import moe
from atoll.core.moe import MoeConfig
from atoll.core.transformer import Transformer, TransformerConfig
from atoll.parallel import experts, sharding, train_state
from atoll.parallel.mesh import make_mesh

S, D, F, E = 8, 16, 32, 8  # tokens per group, width, expert hidden width, experts


def _layer(router: str = "topk_softmax", expert_fn=None) -> moe.MoeFfn:
    cfg = MoeConfig(num_experts=E, top_k=2, router=router, dispatch="capacity")
    return moe.MoeFfn(D, F, cfg, init_std=0.3, out_std=0.3, dtype=jnp.float32, param_dtype=jnp.float32,
                      expert_fn=expert_fn)


def _random_like(tree, seed: int):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32), tree)


def _setup(G: int, seed: int = 0):
    """(params, their abstract boxed form, x_GSD), on the host."""
    x_GSD = np.random.default_rng(seed).standard_normal((G, S, D)).astype(np.float32)
    boxed = jax.eval_shape(_layer().init, jax.random.key(0), x_GSD)["params"]
    return _random_like(nn.meta.unbox(boxed), seed + 1), boxed, x_GSD


def _layer_loss(layer, params, x_GSD):
    """Weighs every output element differently; the aux losses reach the router."""
    y_GSD, recorded = layer.apply({"params": params}, x_GSD, mutable=list(moe.COLLECTIONS))
    return jnp.sum(jnp.sin(y_GSD)) + moe.aux_loss(recorded), y_GSD


def _grads(layer):
    """-> ((loss, y_GSD), (d params, d x_GSD))."""
    return jax.value_and_grad(functools.partial(_layer_loss, layer), argnums=(0, 1), has_aux=True)


def _assert_close(actual, expected):
    """fp32 agreement, relative to each array's own scale."""
    def one(a, e):
        a, e = np.asarray(a), np.asarray(e)
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5 * float(np.abs(e).max()) + 1e-9)
    jax.tree.map(one, actual, expected)


def _compile(fn, mesh, *args, within_island: bool = False):
    with train_state.mesh_context(mesh, within_island):
        return jax.jit(fn).lower(*args).compile()


@pytest.mark.parametrize("router, sizes, G, expect_all_to_all", [
    ("topk_softmax", {"data": 2, "expert": 4}, 8, True),
    ("expert_choice", {"data": 2, "expert": 4}, 8, True),
    ("topk_softmax", {"data": 2, "expert": 2, "tensor": 2}, 4, True),  # expert hidden dims split over tensor
    ("topk_softmax", {"expert": 8}, 4, False),  # 4 groups do not split 8 ways: no exchange, outputs gathered
])
def test_layer_matches_single_device(router, sizes, G, expect_all_to_all):
    mesh = make_mesh(sizes)
    params, boxed, x_GSD = _setup(G)
    params_sh = jax.device_put(params, sharding.tree_shardings(boxed, mesh))  # experts over `expert`
    batch = sharding.DDP_BATCH_AXES if G % (mesh.size // mesh.shape["tensor"]) == 0 else None
    x_sh = jax.device_put(x_GSD, NamedSharding(mesh, P(batch)))
    compiled = _compile(_grads(_layer(router, experts.expert_fn_for(mesh))), mesh, params_sh, x_sh)
    assert ("all-to-all" in compiled.as_text()) == expect_all_to_all
    _assert_close(compiled(params_sh, x_sh), jax.jit(_grads(_layer(router)))(params, x_GSD))


def test_inside_island_vmap():
    mesh = make_mesh({"island": 2, "expert": 4})
    params, boxed, x_GSD = _setup(G=4)
    # Two islands with different params and tokens, so a mix-up between them would show.
    islands = [(params, x_GSD), (_random_like(params, 7), -x_GSD)]
    params_M, x_MGSD = jax.tree.map(lambda *a: np.stack(a), *islands)
    inner = sharding.tree_shardings(boxed, mesh)
    params_M = jax.device_put(params_M, jax.tree.map(lambda s: NamedSharding(mesh, P("island", *s.spec)), inner))
    x_MGSD = jax.device_put(x_MGSD, NamedSharding(mesh, P("island", sharding.BATCH_AXES)))
    step = jax.vmap(_grads(_layer("topk_softmax", experts.expert_fn_for(mesh))), spmd_axis_name="island")
    compiled = _compile(step, mesh, params_M, x_MGSD, within_island=True)
    assert "all-to-all" in compiled.as_text()
    out_M = compiled(params_M, x_MGSD)
    reference = jax.jit(_grads(_layer("topk_softmax")))
    for i, (p, x) in enumerate(islands):
        _assert_close(jax.tree.map(lambda a: a[i], out_M), reference(p, x))


def test_transformer_with_sharded_state():
    """Through Transformer(expert_fn=...), nn.scan and the train state's shardings."""
    cfg = TransformerConfig(vocab_size=32, d_model=D, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
                            mlp_dim=F, moe=MoeConfig(num_experts=E, top_k=2, router="topk_softmax"))
    mesh, T = make_mesh({"data": 2, "expert": 4}), 8
    model = Transformer(cfg, expert_fn=experts.expert_fn_for(mesh))
    tx = optax.sgd(1.0)
    state_shardings = train_state.state_shardings(model, tx, mesh, T)
    shardings = state_shardings["params"]
    params = _random_like(train_state.abstract_state(model, tx, T, state_shardings)["params"], 0)
    params_sh = jax.device_put(params, shardings)
    gate = params_sh["blocks"]["moe"]["gate"]  # [layers, E, D, F]: 2 experts per expert shard
    assert gate.sharding.shard_shape(gate.shape)[1] == E // 4
    tokens_BT1 = np.random.default_rng(1).integers(0, cfg.vocab_size, (8, T + 1)).astype(np.int32)
    loss = lambda m, p, t: train_state.train_loss_fn(m, p, t)[0]  # next-token + aux losses
    compiled = _compile(functools.partial(loss, model), mesh, params_sh,
                        jax.device_put(tokens_BT1, sharding.batch_sharding(mesh)))
    assert "all-to-all" in compiled.as_text()
    _assert_close(compiled(params_sh, tokens_BT1), jax.jit(functools.partial(loss, Transformer(cfg)))(params, tokens_BT1))


def test_expert_count_must_divide_the_expert_axis():
    mesh = make_mesh({"data": 2, "expert": 4})
    with pytest.raises(ValueError, match=r"num_experts=6 .* expert axis of size 4"):
        experts.check_expert_mesh(6, mesh)
    experts.check_expert_mesh(8, mesh)
    layer = moe.MoeFfn(D, F, MoeConfig(num_experts=6), 0.02, 0.02, jnp.float32, jnp.float32,
                       experts.expert_fn_for(mesh))
    with train_state.mesh_context(mesh), pytest.raises(ValueError, match="num_experts=6"):
        jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros((8, S, D)))


def test_expert_fn_for():
    assert experts.expert_fn_for(make_mesh({"data": 8})) is None
    assert experts.expert_fn_for(make_mesh({"data": 2, "expert": 4})) is experts.expert_parallel_ffn
    # Without a mesh the hook is the local one.
    w = moe.ExpertWeights(*_random_like([jax.ShapeDtypeStruct(s, jnp.float32) for s in
                                         [(4, 8, 6), (4, 8, 6), (4, 6, 8)]], 0))
    buffer_GECD = _random_like(jax.ShapeDtypeStruct((2, 4, 3, 8), jnp.float32), 1)
    np.testing.assert_array_equal(experts.expert_parallel_ffn(buffer_GECD, w), moe.expert_ffn(buffer_GECD, w))


def test_all_to_all_bytes():
    # 2 all-to-alls, each sending 3 of its 4 expert blocks: 2 · 3/4 · (2·8·3·16 values · 4 bytes)
    assert experts.all_to_all_bytes(G=2, E=8, C=3, D=16, dtype_bytes=4, n=4) == 2 * 3 * 2 * 2 * 3 * 16 * 4
    assert experts.all_to_all_bytes(G=2, E=8, C=3, D=16, dtype_bytes=2, n=1) == 0
