"""Context parallelism in the LM (parallel/context_lm.py): the model's loss and
gradients on a sequence split over the context axis equal one device's, the
train loop runs it and reports its bytes, and configs that cannot run fail
naming the field. (The attention math itself: tests/parallel/test_context.py.)"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atoll.configs import lm
from atoll.configs.validation import ConfigError
from atoll.core.transformer import Transformer, TransformerConfig
from atoll.experiments.train_lm import _check_workdir_config, train
from atoll.parallel import context, context_lm, mesh as mesh_lib, train_state

CFG = TransformerConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                        mlp_dim=64, scan_layers=False)
B, T = 4, 32


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    # numpy params: flax's random init would compile for seconds
    shapes = jax.eval_shape(lambda: nn.meta.unbox(Transformer(CFG).init(jax.random.key(0),
                                                                         jnp.zeros((1, T), jnp.int32))["params"]))
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), shapes)
    tokens_BT1 = jnp.asarray(rng.integers(0, CFG.vocab_size, (B, T + 1)), jnp.int32)
    loss, grads = jax.jit(jax.value_and_grad(lambda p, t: train_state.loss_fn(Transformer(CFG), p, t)))(
        params, tokens_BT1)
    return params, tokens_BT1, loss, grads


def test_zigzag_batch_moves_inputs_and_targets_together():
    tokens_BT1 = np.arange(2 * 17).reshape(2, 17)
    inputs, targets, positions = context_lm.lm_batch(jnp.asarray(tokens_BT1), 4)
    order = context.zigzag_positions(16, 4)
    np.testing.assert_array_equal(positions, order[None])
    np.testing.assert_array_equal(inputs, tokens_BT1[:, :-1][:, order])
    np.testing.assert_array_equal(targets, inputs + 1)  # each target is still its input's successor
    plain = context_lm.lm_batch(jnp.asarray(tokens_BT1), 1)
    assert plain[2] is None and np.array_equal(plain[0], tokens_BT1[:, :-1])


@pytest.mark.parametrize("strategy", context.STRATEGIES)
def test_loss_on_a_split_sequence_equals_one_device(setup, strategy):
    """context = 4 (× data 2) against the plain model on one device; gradients for ring."""
    params, tokens_BT1, loss_1, grads_1 = setup
    mesh = mesh_lib.make_mesh({"context": 4, "data": 2})
    model = Transformer(CFG, attention_fn=context_lm.attention_fn_for(mesh, strategy))
    with_grads = strategy == "ring"
    fn = lambda p, t: train_state.loss_fn(model, p, t)
    fn = jax.value_and_grad(fn) if with_grads else fn
    with train_state.mesh_context(mesh):
        out = jax.jit(fn)(params, tokens_BT1)
    loss = out[0] if with_grads else out
    np.testing.assert_allclose(loss, loss_1, rtol=1e-5, atol=1e-5)
    if with_grads:
        for a, b in zip(jax.tree.leaves(out[1]), jax.tree.leaves(grads_1)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        # The same model off the mesh takes the same zig-zag batch and agrees (plain attention, reordered).
        np.testing.assert_allclose(jax.jit(lambda p, t: train_state.loss_fn(model, p, t))(params, tokens_BT1),
                                   loss_1, rtol=1e-5, atol=1e-5)


def test_inside_island_vmap(setup):
    """One replica per island (vmap over `island`), each sequence split over context."""
    params, tokens_BT1, loss_1, _ = setup
    mesh = mesh_lib.make_mesh({"island": 2, "context": 4})
    model = Transformer(CFG, attention_fn=context_lm.attention_fn_for(mesh, "tokenring"))
    params_M = jax.tree.map(lambda x: jnp.stack([x, x]), params)
    tokens_MBT1 = jnp.stack([tokens_BT1, tokens_BT1[::-1]])
    fn = jax.vmap(lambda p, t: train_state.loss_fn(model, p, t), spmd_axis_name="island")
    with train_state.mesh_context(mesh, within_island=True):
        loss_M = jax.jit(fn)(params_M, tokens_MBT1)
    np.testing.assert_allclose(loss_M, [loss_1, loss_1], rtol=1e-5, atol=1e-5)  # batch order does not matter


def test_model_and_mesh_must_agree():
    mesh4 = mesh_lib.make_mesh({"context": 4, "data": 2})
    mesh2 = mesh_lib.make_mesh({"context": 2, "data": 4})
    assert context_lm.attention_fn_for(mesh4, None) is None
    assert context_lm.attention_fn_for(mesh_lib.make_mesh({"data": 8}), "ring") is None
    fn = context_lm.attention_fn_for(mesh4, "ring")
    assert context_lm.layout_context(Transformer(CFG, attention_fn=fn)) == 4
    assert context_lm.layout_context(Transformer(CFG)) == 1
    q = jnp.zeros((2, 16, 4, 8))
    with jax.set_mesh(mesh2), pytest.raises(ValueError, match="built for a context axis of 4"):
        jax.eval_shape(lambda x: fn(x, x, x), q)
    with pytest.raises(ValueError, match="unknown"):
        context_lm.ContextAttention("rings", 4)


def test_train_run_reports_context_bytes(tmp_path):
    c = lm.get_config("long")  # shrunk: ring over context 4 × data 2
    c.model.update(d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
    c.data.seq_len = 128
    c.train.update(steps=2, batch_size=4, log_every=2, eval_every=2, checkpoint_every=2, eval_batches=1)
    result = train(c, tmp_path / "run", progress=False)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["finished"] and np.isfinite(saved["val_loss"])
    assert saved["context_parallel"] == "ring"
    expected = context.bytes_per_device("ring", B=2, T=128, N=4, H=2, K=8, C=4, dtype_bytes=4)
    assert saved["context_bytes_per_device_per_layer"] == expected
    assert result.summary["mesh"]["context"] == 4
    # The strategy only places the computation: the workdir resumes under another one.
    c.model.context_parallel = "tokenring"
    _check_workdir_config(tmp_path / "run", c)


@pytest.mark.parametrize("update,message", [
    ({"model.context_parallel": "rings"}, "config.model.context_parallel = 'rings' is not allowed; choose one of "
                                           "[None, 'all_gather', 'ring', 'tokenring']"),
    ({"data.seq_len": 100}, r"config.data.seq_len = 100 must be a multiple of 2 × config.mesh.context = 8"),
    ({"model.moe.num_experts": 4}, "context parallelism would split it"),
])
def test_validation_names_the_field(update, message):
    c = lm.get_config("long")
    for dotted, value in update.items():
        section, *rest = dotted.split(".")
        node = c[section]
        for part in rest[:-1]:
            node = node[part]
        node[rest[-1]] = value
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        lm.validate(c)


def test_context_one_with_a_strategy_is_plain_attention():
    c = lm.get_config("long")
    c.mesh.update(data=-1, context=1)
    c.data.seq_len = 100  # no zig-zag constraint without a split
    lm.validate(c)


def test_a_length_the_mesh_cannot_split_is_refused_before_training(tmp_path):
    c = lm.get_config("long")
    c.mesh.update(data=1, context=-1)  # 8: validate cannot know the length's constraint yet
    c.data.seq_len = 24
    lm.validate(c)
    with pytest.raises(ConfigError, match=r"config.data.seq_len = 24 must be a multiple of 2 × mesh context = 16"):
        train(c, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()
