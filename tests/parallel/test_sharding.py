import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from atoll.core import optim
from atoll.core.transformer import Transformer, TransformerConfig
from atoll.parallel import sharding, train_state
from atoll.parallel.mesh import make_mesh

# One layer: the rules go by param name (block_0 is what EXPECTED checks), and each layer adds compile time.
CFG = TransformerConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                        mlp_dim=48, scan_layers=False)
T = 16

# Written out by hand from the rules table, so a changed rule or annotation fails here.
EXPECTED = {
    ("embedding",): P(None, "fsdp"),
    ("head",): P("fsdp", "tensor"),
    ("final_norm", "scale"): P(None),
    ("block_0", "attn", "q", "kernel"): P("fsdp", "tensor", None),
    ("block_0", "attn", "k", "kernel"): P("fsdp", "tensor", None),
    ("block_0", "attn", "v", "kernel"): P("fsdp", "tensor", None),
    ("block_0", "attn", "o", "kernel"): P("tensor", None, "fsdp"),
    ("block_0", "mlp", "gate", "kernel"): P("fsdp", "tensor"),
    ("block_0", "mlp", "up", "kernel"): P("fsdp", "tensor"),
    ("block_0", "mlp", "down", "kernel"): P("tensor", "fsdp"),
    ("block_0", "attn_norm", "scale"): P(None),
}


def _tx():
    return optim.adamw(1e-3, warmup_steps=1, total_steps=10)[0]


def _path(path):
    return tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)


def _norm(spec):
    return tuple(spec) + (None,) * 4  # compare specs regardless of trailing Nones


def test_every_param_lands_where_the_rules_say():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    state = train_state.init_state(Transformer(CFG), _tx(), mesh, T, jax.random.key(0))
    seen = set()
    for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"]):
        key = _path(path)
        seen.add(key)
        if key in EXPECTED:
            assert leaf.sharding.mesh.shape == mesh.shape
            assert _norm(leaf.sharding.spec)[: leaf.ndim] == _norm(EXPECTED[key])[: leaf.ndim], key
    assert set(EXPECTED) <= seen
    # Adam moments follow their params.
    mu = state["opt_state"][1][0].mu
    assert _norm(mu["block_0"]["mlp"]["down"]["kernel"].sharding.spec)[:2] == ("tensor", "fsdp")
    # An FSDP×tensor-sharded weight holds a quarter of the matrix on each device.
    w = state["params"]["block_0"]["mlp"]["gate"]["kernel"]
    assert w.addressable_shards[0].data.shape == (CFG.d_model // 2, CFG.mlp_dim // 2)


def test_same_params_and_batch_same_loss_on_one_device_and_on_a_2x2x2_mesh():
    tokens = jax.random.randint(jax.random.key(1), (8, T + 1), 0, CFG.vocab_size)
    model, tx = Transformer(CFG), _tx()
    one = make_mesh({"data": 1}, devices=jax.devices()[:1])
    big = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    s1 = train_state.init_state(model, tx, one, T, jax.random.key(0))
    s8 = train_state.init_state(model, tx, big, T, jax.random.key(0))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), s1["params"], s8["params"])
    step1 = train_state.make_train_step(model, tx, one, T)
    step8 = train_state.make_train_step(model, tx, big, T)
    s1, m1 = step1(s1, tokens)
    s8, m8 = step8(s8, tokens)
    np.testing.assert_allclose(m1["loss"], m8["loss"], rtol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m8["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
                 s1["params"], s8["params"])


def test_activation_constraints_resolve_through_the_rules():
    # outside islands the batch also splits over `island` (DDP across islands); inside one it does not;
    # `expert` is one more batch axis outside the MoE layers
    assert sharding.logical_to_spec(("act_batch", "act_length", "act_embed")) == P(
        ("island", "data", "fsdp", "expert"), "context", None)
    within = dict(sharding.logical_rules(within_island=True))
    assert within["act_batch"] == ("data", "fsdp", "expert") and within["act_mlp"] == "tensor"
    assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("expert", "embed", "expert_mlp")) == P("expert", "fsdp", "tensor")
    mesh = make_mesh({"data": 4, "tensor": 2})
    with train_state.mesh_context(mesh):
        f = jax.jit(lambda x: nn.with_logical_constraint(x * 2, ("act_batch", None, "act_mlp")))
        y = f(jnp.ones((8, 4, 6)))
    want = jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))
    assert y.sharding.is_equivalent_to(want, 3)
    assert y.addressable_shards[0].data.shape == (2, 4, 3)
