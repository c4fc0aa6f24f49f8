import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atoll.core import chunk_policy, policy


def _exact_model(chunk_BHA, objective):
    """The ideal denoiser when every training chunk equals `chunk_BHA` (a point mass):
    flow's velocity is (x_1 − x_t) / (1 − t); diffusion's ε̂ follows from x_k and x_0."""
    sched = objective.schedule_arrays() if objective.kind == "ddpm" else None

    def apply(x, time, obs):
        del obs
        if objective.kind == "flow":
            t = time[..., None]
            return (chunk_BHA - x) / jnp.maximum(1 - t, 1e-3)
        k = time.astype(jnp.int32)
        ab = sched.alpha_bars_K[k][..., None]
        return (x - jnp.sqrt(ab) * chunk_BHA) / jnp.sqrt(1 - ab)
    return apply


@pytest.mark.parametrize("objective", [
    chunk_policy.Objective("flow", sample_steps=8),
    chunk_policy.Objective("ddpm", sampler="ddim", sample_steps=10),
    chunk_policy.Objective("ddpm", sampler="ddpm", diffusion_steps=50),
], ids=["flow-euler", "ddpm-ddim", "ddpm-ancestral"])
def test_samplers_land_on_the_chunk_an_exact_denoiser_knows(objective):
    """With the exact denoiser for a single training chunk every sampler must return that
    chunk; a wrong time convention, scale or sampler wiring lands elsewhere."""
    chunk = jnp.asarray(np.random.default_rng(0).uniform(-0.9, 0.9, (3, 6, 2)), jnp.float32)
    out = chunk_policy.sample_chunk(_exact_model(chunk, objective), objective, jnp.zeros((3, 2, 5)),
                                    jax.random.key(0), 6, 2)
    np.testing.assert_allclose(out, chunk, atol=2e-2)
    # ... and its loss is (near) zero for that chunk, while a wrong model's is not
    loss = chunk_policy.training_loss(_exact_model(chunk, objective), objective, chunk, jnp.zeros((3, 2, 5)),
                                      jax.random.key(1))
    wrong = chunk_policy.training_loss(_exact_model(-chunk, objective), objective, chunk, jnp.zeros((3, 2, 5)),
                                       jax.random.key(1))
    assert float(wrong) > 100 * max(float(loss), 1e-6)


def test_objective_validation_and_network_evaluations():
    assert chunk_policy.Objective("flow", sample_steps=7).network_evaluations == 7
    assert chunk_policy.Objective("ddpm", sampler="ddpm", diffusion_steps=30).network_evaluations == 30
    assert chunk_policy.Objective("flow").time_scale == 100.0
    assert chunk_policy.Objective("ddpm").time_scale == 1.0
    for bad, match in [({"kind": "gan"}, "objective 'gan'"), ({"sampler": "dpm"}, "sampler"),
                       ({"prediction": "x0"}, "prediction"), ({"sample_steps": 0}, "at least 1"),
                       ({"kind": "ddpm", "sample_steps": 200}, "cannot exceed")]:
        with pytest.raises(ValueError, match=match):
            chunk_policy.Objective(**bad)
    with pytest.raises(ValueError, match="network 'mlp'"):
        chunk_policy.make_denoiser("mlp", 2, chunk_policy.Objective())


def test_history_pads_with_the_first_observation_and_shifts():
    obs = np.arange(6, dtype=np.float32).reshape(2, 3)
    hist = chunk_policy.history_init(obs, 3)
    assert hist.shape == (2, 3, 3) and np.all(hist == obs[:, None])
    hist = chunk_policy.history_push(hist, obs + 10)
    np.testing.assert_array_equal(hist[:, :2], np.repeat(obs[:, None], 2, 1))
    np.testing.assert_array_equal(hist[:, 2], obs + 10)
    jhist = chunk_policy.history_push(chunk_policy.history_init(jnp.asarray(obs), 3), jnp.asarray(obs + 10))
    assert isinstance(jhist, jax.Array)
    np.testing.assert_array_equal(jhist, hist)


def test_act_unnormalizes_what_the_sampler_returns():
    """ChunkPolicy.act maps normalized chunks back to raw action units."""
    obj = chunk_policy.Objective("flow", sample_steps=2)
    model = chunk_policy.make_denoiser("dit", 2, obj, dim=16, depth=1, heads=2)
    x = jnp.zeros((1, 4, 2))
    params = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: model.init(jax.random.key(0), x, x[..., 0],
                                                                             jnp.zeros((1, 2, 3)))))
    pol = chunk_policy.ChunkPolicy(model, obj, obs_horizon=2, action_horizon=4, action_dim=2)
    act_norm = policy.Normalizer(jnp.asarray([10.0, -5.0]), jnp.asarray([2.0, 0.5]))
    weights = {"params": params, "obs_norm": chunk_policy.normalizer_tree(policy.Normalizer(jnp.zeros(3), jnp.ones(3))),
               "act_norm": chunk_policy.normalizer_tree(act_norm)}
    key = jax.random.key(3)
    raw = pol.act(weights, jnp.zeros((5, 2, 3)), key)
    # a zero network leaves the initial noise unchanged: raw = noise · scale + offset
    noise = jax.random.normal(key, (5, 4, 2))
    np.testing.assert_allclose(raw, noise * act_norm.scale_D + act_norm.offset_D, rtol=1e-5)


def test_prefix_training_scores_only_the_free_actions():
    """Prefix conditioning: an exact denoiser scores zero; one that is wrong only
    on clean actions (time 1, the prefix) still scores zero; wrong on noisy
    actions, it does not. FASTER's clocks stagger times within a chunk."""
    objective = chunk_policy.Objective("flow", sample_steps=10)
    chunk = jnp.asarray(np.random.default_rng(1).uniform(-0.9, 0.9, (64, 8, 2)), jnp.float32)
    exact = _exact_model(chunk, objective)
    obs = jnp.zeros((64, 2, 3))
    times = []

    def wrong_where(pred):
        def apply(x, time, o):
            times.append(time)
            return jnp.where(pred(time)[..., None], 7.0, exact(x, time, o))
        return apply

    for cond in ("prefix", "faster"):
        loss = lambda fn: float(chunk_policy.training_loss(fn, objective, chunk, obs, jax.random.key(2),  # noqa: E731
                                                           conditioning=cond, max_delay=7))
        assert loss(exact) < 1e-6
        assert loss(wrong_where(lambda t: t == 1.0)) < 1e-6  # the clean prefix does not count
        assert loss(wrong_where(lambda t: t < 1.0)) > 1.0
        clean = np.asarray(times[-1]) == 1.0
        assert 0.2 < clean.mean() < 0.6  # d ~ U{0..7} of 8 actions: 7/16 of them clean on average
        assert np.all(np.diff(clean.astype(int), axis=1) <= 0)  # clean actions form a prefix
    staggered = np.asarray(times[-1])
    spread = [len(set(np.round(row[row < 1], 6))) for row in staggered]
    assert max(spread) > 1  # some chunks run FASTER's per-action clocks
    with pytest.raises(ValueError, match="flow"):
        chunk_policy.training_loss(exact, chunk_policy.Objective("ddpm"), chunk, obs, jax.random.key(0),
                                   conditioning="prefix", max_delay=2)


def test_remac_prefixes_blend_from_the_demo_into_the_frozen_plan():
    """Self-conditioning changes only the model's input on the prefix rows:
    weight 0 is plain prefix training, weight 1 shows the frozen plan there,
    0.5 their mean; the free rows always learn the demo's actions."""
    objective = chunk_policy.Objective("flow", sample_steps=10)
    rng = np.random.default_rng(3)
    chunk = jnp.asarray(rng.uniform(-0.9, 0.9, (32, 8, 2)), jnp.float32)
    source = jnp.asarray(rng.uniform(-0.9, 0.9, (32, 8, 2)), jnp.float32)
    seen = {}

    def apply(x, time, o):
        seen["x"], seen["t"] = x, time
        return jnp.zeros_like(x)

    def run(cond, **kw):
        loss = chunk_policy.training_loss(apply, objective, chunk, jnp.zeros((32, 2, 3)), jax.random.key(4),
                                          conditioning=cond, max_delay=4, **kw)
        return float(loss), np.asarray(seen["x"]), np.asarray(seen["t"]) == 1.0

    plain, x_plain, prefix = run("prefix")
    assert 0 < prefix.sum() < prefix.size
    for w in (0.0, 0.5, 1.0):
        loss, x, same_prefix = run("remac", source_BHA=source, source_weight=w)
        np.testing.assert_array_equal(same_prefix, prefix)  # same key: same delays and times
        want = np.where(prefix[..., None], (1 - w) * np.asarray(chunk) + w * np.asarray(source), x_plain)
        np.testing.assert_allclose(x, want, atol=1e-6)
        assert loss == pytest.approx(plain, rel=1e-6)  # the target and the scored rows do not change
    with pytest.raises(ValueError, match="source_BHA"):
        run("remac")
