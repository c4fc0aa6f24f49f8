"""Samplers and objectives of atoll.core.diffusion against a known 1-D mixture.

With data x ~ Σ π_i N(μ_i, σ_i²) and x_noisy = a·x + s·ε, the posterior mean
E[x | x_noisy] is closed-form, so the exact ε-, v- and velocity predictors are
known: the samplers run with them and must give back the mixture.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atoll.core import diffusion

PI = np.array([0.3, 0.7])
MU = np.array([-2.0, 1.5])
SIGMA = np.array([0.3, 0.5])
N = 20000


def posterior_mean(x, a, s):
    """E[x_0 | a·x_0 + s·ε = x] for the mixture; x [..., 1], a and s broadcastable to x."""
    var = a**2 * SIGMA**2 + s**2  # [..., 2] per component
    logw = np.log(PI) - 0.5 * (x - a * MU) ** 2 / var - 0.5 * jnp.log(var)
    w = jax.nn.softmax(logw, axis=-1)
    cond = MU + a * SIGMA**2 / var * (x - a * MU)
    return jnp.sum(w * cond, axis=-1, keepdims=True)


def exact_diffusion_model(schedule, prediction):
    def model(x, k):
        ab = schedule.alpha_bars_K[k.astype(jnp.int32)][..., None]
        a, s = jnp.sqrt(ab), jnp.sqrt(1 - ab)
        x0 = posterior_mean(x, a, s)
        eps = (x - a * x0) / s
        return eps if prediction == "epsilon" else a * eps - s * x0
    return model


def exact_velocity(x, t):
    t = t[..., None]
    x1 = posterior_mean(x, t, 1 - t)
    return (x1 - x) / (1 - t)


def assert_is_the_mixture(samples):
    x = np.asarray(samples).ravel()
    assert np.isfinite(x).all()
    left = x < 0
    assert abs(left.mean() - PI[0]) < 0.02, left.mean()
    for side, mu, sigma in ((left, MU[0], SIGMA[0]), (~left, MU[1], SIGMA[1])):
        assert abs(x[side].mean() - mu) < 0.05, (x[side].mean(), mu)
        assert abs(x[side].std() - sigma) < 0.06, (x[side].std(), sigma)


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_ddpm_and_ddim_recover_the_mixture(prediction):
    schedule = diffusion.make_schedule("squaredcos_cap_v2", 100)
    model = exact_diffusion_model(schedule, prediction)
    assert_is_the_mixture(jax.jit(lambda key: diffusion.ddpm_sample(model, schedule, (N, 1), key, prediction))(
        jax.random.key(0)))
    # DDIM on every 10th step of a 1000-step schedule. (Its first-order steps are biased at
    # few steps on these sharp modes: 25 steps put the left mode's mean at -1.95, 100 at -1.98.)
    schedule = diffusion.make_schedule("squaredcos_cap_v2", 1000)
    model = exact_diffusion_model(schedule, prediction)
    assert_is_the_mixture(jax.jit(lambda key: diffusion.ddim_sample(model, schedule, (N, 1), key, 100, prediction))(
        jax.random.key(1)))


def test_euler_flow_recovers_the_mixture():
    # The exact field diverges like 1/(1−t) only at t = 1, which Euler never evaluates.
    samples = jax.jit(lambda key: diffusion.euler_sample(exact_velocity, (N, 1), key, 100))(jax.random.key(2))
    assert_is_the_mixture(samples)


def test_a_wrong_model_does_not_recover_the_mixture():
    # The check above can fail: a model that ignores the data gives back the prior.
    schedule = diffusion.make_schedule("linear", 100)
    samples = diffusion.ddpm_sample(lambda x, k: jnp.zeros_like(x), schedule, (N, 1), jax.random.key(3))
    with pytest.raises(AssertionError):
        assert_is_the_mixture(samples)


def test_exact_predictors_have_zero_loss_on_a_single_point():
    x1 = jnp.full((64, 8, 2), 0.7)  # a point mass: the exact predictors are deterministic
    schedule = diffusion.make_schedule("linear", 50)

    def eps_model(x, k):
        a, s = diffusion._sig(schedule, k.astype(jnp.int32))
        return (x - a[..., None] * x1) / s[..., None]

    def v_model(x, k):
        a, s = diffusion._sig(schedule, k.astype(jnp.int32))
        eps = (x - a[..., None] * x1) / s[..., None]
        return a[..., None] * eps - s[..., None] * x1

    def velocity(x, t):
        return (x1 - x) / (1 - t[..., None])

    key = jax.random.key(4)
    assert float(diffusion.flow_loss(velocity, x1, key)) < 1e-8
    assert float(diffusion.diffusion_loss(eps_model, schedule, x1, key, "epsilon")) < 1e-8
    assert float(diffusion.diffusion_loss(v_model, schedule, x1, key, "v")) < 1e-8
    # ... and a wrong field does not.
    assert float(diffusion.flow_loss(lambda x, t: jnp.zeros_like(x), x1, key)) > 0.1


def test_per_element_time_and_mask():
    x1 = jax.random.normal(jax.random.key(5), (4, 6, 3))
    noise = jax.random.normal(jax.random.key(6), x1.shape)
    t_BH = jnp.tile(jnp.linspace(0.0, 1.0, 6), (4, 1))
    x_t, u = diffusion.flow_interpolate(x1, noise, t_BH)
    np.testing.assert_allclose(x_t[:, 0], noise[:, 0], atol=1e-6)  # t = 0: noise
    np.testing.assert_allclose(x_t[:, -1], x1[:, -1], atol=1e-6)  # t = 1: data
    np.testing.assert_allclose(u, x1 - noise, atol=1e-6)
    # A mask drops elements: a model exact except on a clean prefix has zero masked loss.
    point = jnp.full((4, 6, 3), 0.5)  # a point mass, so the exact velocity is known for any draw
    prefix = jnp.arange(6) < 2

    def wrong_on_prefix(x, t):
        return (point - x) / (1 - t[..., None]) + jnp.where(prefix[None, :, None], 5.0, 0.0)

    key = jax.random.key(7)
    assert float(diffusion.flow_loss(wrong_on_prefix, point, key, mask=~prefix)) < 1e-8
    assert float(diffusion.flow_loss(wrong_on_prefix, point, key)) > 1.0


def test_diffusion_round_trip_and_errors():
    schedule = diffusion.make_schedule("squaredcos_cap_v2", 100)
    assert schedule.num_steps == 100 and float(schedule.betas_K.max()) <= 0.999 + 1e-6
    assert np.all(np.diff(np.asarray(schedule.alpha_bars_K)) < 0)
    x0 = jax.random.normal(jax.random.key(8), (5, 4, 2))
    noise = jax.random.normal(jax.random.key(9), x0.shape)
    k = jnp.array([[0, 10, 50, 99]] * 5)
    x_k = diffusion.noisy(schedule, x0, noise, k)
    for prediction in diffusion.PREDICTIONS:
        target = diffusion.diffusion_target(schedule, x0, noise, k, prediction)
        x0_hat, eps_hat = diffusion.x0_and_eps(schedule, x_k, k, target, prediction)
        np.testing.assert_allclose(x0_hat, x0, atol=2e-4)
        np.testing.assert_allclose(eps_hat, noise, atol=2e-4)
    with pytest.raises(ValueError, match="unknown"):
        diffusion.make_schedule("sigmoid", 10)
    with pytest.raises(ValueError, match="unknown"):
        diffusion.diffusion_target(schedule, x0, noise, k, "x0")
    with pytest.raises(ValueError, match="must lie in"):
        diffusion.ddim_sample(lambda x, k: x, schedule, (2, 1), jax.random.key(0), 0)
