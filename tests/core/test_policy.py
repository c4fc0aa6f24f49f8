import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from atoll.core import diffusion, policy



def numpy_params(model, *args):
    """Params drawn with numpy on the model's shapes (fan-in scaled): compiling flax's
    random init costs tens of seconds for these models on a CPU, far more than the tests."""
    shapes = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), *args)
    rng = np.random.default_rng(0)

    def draw(path, leaf):  # numpy arrays: jnp.zeros / jnp.asarray would compile a program per shape
        name = jax.tree_util.keystr(path)
        if "bias" in name:
            return np.zeros(leaf.shape, leaf.dtype)
        if "scale" in name:
            return np.ones(leaf.shape, leaf.dtype)
        if "pos_HD" in name:
            return rng.normal(0, 0.02, leaf.shape).astype(leaf.dtype)
        qkv = any(k in name for k in ("query", "key", "value"))
        fan_in = leaf.shape[0] if qkv else int(np.prod(leaf.shape[:-1]))
        return rng.normal(0, fan_in**-0.5, leaf.shape).astype(leaf.dtype)
    return jax.device_put(jax.tree_util.tree_map_with_path(draw, shapes))


@pytest.mark.parametrize("mode", policy.NORMALIZER_MODES)
def test_normalizer_round_trips_and_hits_its_range(mode):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (500, 4)).astype(np.float32)
    x[:, 2] = 7.0  # a constant dimension
    norm = policy.fit_normalizer(x, mode)
    y = norm.normalize(x)
    np.testing.assert_allclose(norm.unnormalize(y), x, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(y)) and np.allclose(y[:, 2], 0.0)
    if mode == "limits":
        np.testing.assert_allclose(y[:, [0, 1, 3]].min(0), -1.0, atol=1e-5)
        np.testing.assert_allclose(y[:, [0, 1, 3]].max(0), 1.0, atol=1e-5)
    else:
        np.testing.assert_allclose(y[:, [0, 1, 3]].mean(0), 0.0, atol=1e-4)
        np.testing.assert_allclose(y[:, [0, 1, 3]].std(0), 1.0, atol=1e-4)
    # A pytree: it travels through jit and checkpoints as arrays.
    np.testing.assert_allclose(jax.jit(lambda n, v: n.normalize(v))(norm, x), y, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown"):
        policy.fit_normalizer(x, "quantile")


def test_ema_decay_and_update():
    assert float(policy.ema_decay(0)) == 0.0
    d = [float(policy.ema_decay(s)) for s in (1, 10, 100, 10_000, 10**9)]
    assert d == sorted(d) and d[-1] == pytest.approx(0.9999)
    assert d[0] == pytest.approx(1 - 2**-0.75)
    ema = policy.ema_update({"w": jnp.ones(3)}, {"w": jnp.zeros(3)}, 0.9)
    np.testing.assert_allclose(ema["w"], 0.9)


def test_dit_learns_an_observation_conditioned_flow():
    """A tiny flow policy maps an observation (±1) to its action chunk: the sampled
    chunk must follow the observation, so conditioning, time and loss all work."""
    H, A, B = 8, 2, 32
    net = "dit"
    model = policy.DiTDenoiser(A, dim=32, depth=2, heads=2, time_scale=100.0)
    ramp_HA = jnp.stack([jnp.linspace(-1, 1, H), jnp.linspace(1, 0, H)], -1) * 0.8
    obs_B11 = jnp.where(jnp.arange(B) % 2 == 0, 1.0, -1.0)[:, None, None]
    chunks_BHA = obs_B11 * ramp_HA

    params = numpy_params(model, chunks_BHA, jnp.zeros((B, H)), obs_B11)
    tx = optax.adam(3e-3)

    def step(carry, key):
        params, opt = carry

        def loss(p):
            return diffusion.flow_loss(lambda x, t: model.apply(p, x, t, obs_B11), chunks_BHA, key)
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt = tx.update(grads, opt)
        return (optax.apply_updates(params, updates), opt), value

    # One compiled loop over all steps (a Python loop of jitted steps costs more in dispatch here),
    # the optimizer's init inside it (eagerly, its zeros would compile a program per shape).
    train = jax.jit(lambda params: jax.lax.scan(step, (params, tx.init(params)),
                                                jax.random.split(jax.random.key(1), 200)))
    (params, _), losses = train(params)
    losses = np.asarray(losses)
    assert np.mean(losses[-20:]) < 0.3 * np.mean(losses[:20])
    # One compiled sampler for both signs (eagerly, each call would compile its own scan).
    sample_fn = jax.jit(lambda params, obs: diffusion.euler_sample(lambda x, t: model.apply(params, x, t, obs),
                                                                   (16, H, A), jax.random.key(7), 10))
    for sign in (1.0, -1.0):
        sample = sample_fn(params, jnp.full((16, 1, 1), sign))
        err = float(jnp.abs(sample - sign * ramp_HA).mean())
        assert err < 0.2, (net, sign, err)


def test_unet_shapes_and_conditioning():
    # (Training it is covered by the DiT test's pipeline; its compile alone costs ~15 s on CPU.)
    # The zero-initialized output layer of a real init is replaced by numpy draws here.
    B, H, A = 3, 8, 2
    model = policy.ConvUNetDenoiser(A, channels=(8, 16), cond_dim=16, groups=4)
    x = jax.random.normal(jax.random.key(0), (B, H, A))
    obs = jax.random.normal(jax.random.key(1), (B, 2, 5))
    t = jnp.full((B, H), 0.5)
    params = numpy_params(model, x, t, obs)
    apply = jax.jit(model.apply)  # one compilation for the four calls below
    out = apply(params, x, t, obs)
    assert float(jnp.abs(out).max()) > 0.0
    for changed in (apply(params, x + 1.0, t, obs), apply(params, x, t * 0.1, obs),
                    apply(params, x, t, obs + 1.0)):
        assert float(jnp.abs(changed - out).max()) > 1e-4


def test_unet_rejects_an_indivisible_chunk():
    model = policy.ConvUNetDenoiser(2, channels=(8, 16, 32), cond_dim=8, groups=4)
    with pytest.raises(ValueError, match="divisible by 4"):
        model.init(jax.random.key(0), jnp.zeros((1, 6, 2)), jnp.zeros((1, 6)), jnp.zeros((1, 1, 3)))
