"""Execution strategies for chunked policies: bookkeeping on hand-made chunks,
RTC guidance, prefix inpainting, FASTER's clocks and the fuser's seam."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from atoll.core import chunking, diffusion

H, S, A = 8, 4, 1


def _chunks(B=1):
    """prev row i holds 100 + i, new row i holds 200 + i: which one ran is readable."""
    i = jnp.arange(H, dtype=jnp.float32)[None, :, None]
    return jnp.broadcast_to(100 + i, (B, H, A)), jnp.broadcast_to(200 + i, (B, H, A))


def _ran(run_BSA):
    return np.asarray(run_BSA)[0, :, 0].tolist()


@pytest.mark.parametrize("name,d,expected,next_first", [
    ("sync", 2, [200, 201, 202, 203], 204),
    ("naive_async", 0, [200, 201, 202, 203], 204),
    ("naive_async", 2, [100, 101, 202, 203], 204),
    ("rtc", 3, [100, 101, 102, 203], 204),
    ("prefix", 4, [100, 101, 102, 103], 204),
    ("remac", 2, [100, 101, 202, 203], 204),
    ("vlash", 2, [100, 101, 200, 201], 202),  # the new chunk starts d steps later
])
def test_which_action_runs(name, d, expected, next_first):
    prev, new = _chunks()
    run, running = chunking.cycle_actions(chunking.Strategy(name), prev, new, d, S)
    assert _ran(run) == expected
    assert float(running[0, 0, 0]) == next_first
    # the shifted chunk repeats its last real action, never zeros
    assert float(running[0, -1, 0]) == 207


def test_faster_runs_each_new_action_once_it_is_ready():
    prev, new = _chunks()
    ready = jnp.asarray([[0, 2, 2, 5, 9, 9, 9, 9]])
    run, _ = chunking.cycle_actions(chunking.Strategy("faster"), prev, new, 4, S, ready_BH=ready)
    assert _ran(run) == [200, 101, 202, 103]


def test_delays_per_episode():
    prev, new = _chunks(B=3)
    run, _ = chunking.cycle_actions(chunking.Strategy("naive_async"), prev, new, jnp.asarray([0, 1, 3]), S)
    assert np.asarray(run)[:, :, 0].tolist() == [[200, 201, 202, 203], [100, 201, 202, 203],
                                                 [100, 101, 102, 203]]


def test_shift_pads_with_the_last_real_action():
    chunk = jnp.arange(1.0, 6.0)[None, :, None]
    assert np.asarray(chunking.shift_chunk(chunk, 3))[0, :, 0].tolist() == [4, 5, 5, 5, 5]


@pytest.mark.parametrize("name,d,s,h,message", [
    ("naive_async", 5, 4, 8, "d <= s"),
    ("rtc", 3, 6, 8, "s <= H - d"),
    ("prefix", 0, 9, 8, r"\[1, H"),
    ("vlash", 4, 6, 8, "s <= H - d"),
    ("sync", 9, 8, 8, "exceeds the chunk length"),
])
def test_invariants_are_guarded(name, d, s, h, message):
    with pytest.raises(ValueError, match=message):
        chunking.check_horizons(name, d, s, h)


def test_allowed_horizons_pass():
    chunking.check_horizons("vlash", 4, 4, 8)
    chunking.check_horizons("sync", 7, 8, 8)  # sync never overlaps chunks
    with pytest.raises(ValueError, match="unknown"):
        chunking.Strategy("asap")


def test_conditioning_must_match_the_training():
    chunking.check_conditioning(chunking.Strategy("prefix"), "faster", "flow")  # FASTER trains prefixes too
    chunking.check_conditioning(chunking.Strategy("prefix"), "remac", "flow")
    with pytest.raises(ValueError, match="policy.conditioning='remac'"):
        chunking.check_conditioning(chunking.Strategy("remac"), "prefix", "flow")
    chunking.check_conditioning(chunking.Strategy("naive_async"), "vlash", "ddpm")
    with pytest.raises(ValueError, match="policy.conditioning='vlash'"):
        chunking.check_conditioning(chunking.Strategy("vlash"), "none", "flow")
    with pytest.raises(ValueError, match="flow sampler"):
        chunking.check_conditioning(chunking.Strategy("rtc"), "none", "ddpm")


@pytest.mark.parametrize("schedule", ["exp", "linear"])
def test_prefix_weights(schedule):
    d, s = 2, 3
    w = np.asarray(chunking.prefix_weights(d, s, H, schedule))
    assert w[:d].tolist() == [1.0, 1.0] and w[H - s:].tolist() == [0.0] * s
    middle = w[d:H - s]
    assert np.all(middle > 0) and np.all(middle < 1) and np.all(np.diff(middle) < 0)
    hard = np.asarray(chunking.prefix_weights(d, s, H, "hard"))
    assert hard.tolist() == [1, 1] + [0] * (H - 2)
    per_episode = np.asarray(chunking.prefix_weights(jnp.asarray([0, 2]), s, H, schedule))
    assert per_episode.shape == (2, H) and np.allclose(per_episode[1], w)


def test_temporal_ensemble_matches_a_direct_count():
    """ACT's vote, cycle by cycle through the buffer, against every chunk ever made."""
    h, s, d, m, cycles = 6, 2, 1, 0.3, 7
    rng = np.random.default_rng(0)
    made = rng.normal(size=(cycles, h, 1)).astype(np.float32)
    K = chunking.ensemble_slots(h, s) - 1
    buf, valid = jnp.zeros((1, K, h, 1)), jnp.zeros((1, K, h), bool)
    got = []
    for c in range(cycles):
        run, buf, valid = chunking.ensemble_actions(buf, valid, jnp.asarray(made[c])[None], 0 if c == 0 else d, s, m)
        got.extend(np.asarray(run)[0, :, 0])
    want = []
    for t in range(cycles * s):
        voters = [c for c in range(cycles) if c * s + (0 if c == 0 else d) <= t < c * s + h]  # oldest first
        w = np.exp(-m * np.arange(len(voters)))
        want.append(sum(wi * made[c, t - c * s, 0] for wi, c in zip(w, voters)) / w.sum())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------- samplers


def _gaussian_velocity(x, t):
    """The exact flow velocity for data ~ N(0, I) (t: 0 noise, 1 data)."""
    t = t[..., None]
    x1_hat = t * x / ((1 - t) ** 2 + t**2)
    return (x1_hat - x) / jnp.maximum(1 - t, 1e-6)


def test_rtc_with_zero_weight_is_plain_euler():
    shape, key = (4, H, 2), jax.random.key(0)
    y = jnp.full(shape, 3.0)
    plain = diffusion.euler_sample(_gaussian_velocity, shape, key, 8)
    w = chunking.prefix_weights(2, S, H)
    np.testing.assert_allclose(chunking.rtc_euler(_gaussian_velocity, y, jnp.zeros((H,)), shape, key, 8, 5.0),
                               plain, atol=1e-6)
    np.testing.assert_allclose(chunking.rtc_euler(_gaussian_velocity, y, w, shape, key, 8, 0.0), plain, atol=1e-6)


def test_rtc_with_a_hard_mask_reproduces_the_prefix():
    shape, d = (256, H, 1), 3
    y = jnp.full(shape, 1.5)
    w = chunking.prefix_weights(d, S, H, "hard")
    x = np.asarray(chunking.rtc_euler(_gaussian_velocity, y, w, shape, jax.random.key(1), 50, 100.0))
    free = np.asarray(diffusion.euler_sample(_gaussian_velocity, shape, jax.random.key(1), 50))
    assert np.abs(x[:, :d] - 1.5).max() < 0.1  # held to the committed actions
    assert np.abs(free[:, :d] - 1.5).mean() > 0.5  # which plain sampling is not
    # independent elements: the free part is the unguided sample
    np.testing.assert_allclose(x[:, d:], free[:, d:], atol=1e-5)


def test_prefix_euler_holds_the_prefix_and_shows_it_clean():
    """A model whose velocity is the chunk's mean time: the free actions move by
    Σ dt·mean(time), which counts the prefix at time 1."""
    shape, d, n = (2, H, 1), 3, 4
    y = jnp.full(shape, -2.0)

    def mean_time(x, t):
        return jnp.broadcast_to(jnp.mean(t, axis=-1, keepdims=True)[..., None], x.shape)

    key = jax.random.key(2)
    x = np.asarray(chunking.prefix_euler(mean_time, y, d, shape, key, n))
    assert np.all(x[:, :d] == -2.0)
    start = np.asarray(jax.random.normal(key, shape))
    moved = sum((d + (H - d) * k / n) / H for k in range(n)) / n
    np.testing.assert_allclose(x[:, d:], start[:, d:] + moved, rtol=1e-5)


def test_faster_clocks_and_readiness_agree():
    n, alpha = 10, 0.6
    u0 = (n - 1) / n
    for p in (0, 2):
        u = chunking.faster_offsets(H, p, alpha, u0)
        k = np.asarray(chunking.faster_ready_steps(u, n))
        assert k[p] == 1 and k[-1] == n and np.all(np.diff(k[p:]) >= 0)
        for step in range(n + 1):
            done = np.asarray(chunking.faster_times(step / n, u)) >= 1.0 - 1e-6
            assert np.array_equal(done[p:], step >= k[p:])


def test_faster_sampler_finishes_the_first_free_action_first():
    """With the exact denoiser of a one-point distribution, an action lands on the
    data point exactly when its clock reaches 1."""
    mu, n = 0.7, 5
    u = chunking.faster_offsets(H, 1, 0.6, (n - 1) / n)
    k = np.asarray(chunking.faster_ready_steps(u, n))

    def point(x, t):
        return (mu - x) / jnp.maximum(1 - t[..., None], 1e-6)

    shape, y = (1, H, 1), jnp.zeros((1, H, 1))
    for steps in range(1, n + 1):
        # run only the first `steps` of the n-step schedule
        x = chunking.prefix_euler(point, y, 1, shape, jax.random.key(3), n, offsets_BH=u, stop_after=steps)
        at_mu = np.isclose(np.asarray(x)[0, 1:, 0], mu, atol=1e-5)
        assert np.array_equal(at_mu, steps >= k[1:])


def test_fuser_is_continuous_at_the_seam():
    tt = np.arange(H * 4) * 0.05
    prev = jnp.asarray(np.sin(2 * tt) + 0.3 * tt, jnp.float32)[None, :, None]
    new = jnp.asarray(np.cos(1.5 * tt) - 0.4, jnp.float32)[None, :, None]
    seam, steps = 5, 8
    fused = np.asarray(chunking.fuse(prev, new, seam, steps))[0, :, 0]
    p, n = np.asarray(prev)[0, :, 0], np.asarray(new)[0, :, 0]
    ran = np.concatenate([p[:seam], fused[seam:]])
    naive = np.concatenate([p[:seam], n[seam:]])

    def mismatch(x):
        """value, velocity and acceleration at the seam against the old chunk's continuation"""
        return np.abs([x[seam] - p[seam], (x[seam + 1] - x[seam - 1]) / 2 - (p[seam + 1] - p[seam - 1]) / 2,
                       (x[seam + 1] - 2 * x[seam] + x[seam - 1]) - (p[seam + 1] - 2 * p[seam] + p[seam - 1])])

    # value exactly; slopes up to the quintic's own higher-order terms, O(1/steps³) in these units
    assert mismatch(ran)[0] < 1e-6
    assert np.all(mismatch(ran) <= 0.15 * mismatch(naive))
    value_only = np.concatenate([p[:seam], n[seam:] + (p[seam] - n[seam])])  # a blend that ignores slopes
    assert mismatch(value_only)[1] > 0.5 * mismatch(naive)[1]
    np.testing.assert_allclose(fused[seam + steps:], n[seam + steps:])  # the correction is gone after the window
    np.testing.assert_allclose(fused[:seam], n[:seam])
    assert math.isfinite(float(np.abs(fused).max()))


def test_fuser_holds_the_old_plan_past_its_end():
    """A running chunk shifted by s holds H - s rows of the old plan, then repeats
    its last one (the robot's hold). At a seam past the plan's end the fused
    chunk starts from that held action, not from the new chunk, and leaves it
    with the hold's slope, 0, up to the quintic's grid error; the next cycle
    runs the fused chunk from there."""
    H, s, d, steps = 8, 4, 4, 8
    q = lambda i: 0.1 + 0.2 * i + 0.03 * i**2  # noqa: E731
    p = q(np.minimum(np.arange(H), H - s - 1))  # real rows 0..3, then row 3 repeated
    prev = jnp.asarray(p, jnp.float32)[None, :, None]
    new = jnp.full((1, H, 1), -0.5, jnp.float32)
    _, running = chunking.cycle_actions(chunking.Strategy("fused", fuse_steps=steps), prev, new, d, s)
    fused = np.asarray(chunking.fuse(prev, new, d, steps))[0, :, 0]
    np.testing.assert_allclose(fused[d], q(H - s - 1), rtol=1e-6)
    naive_slope = abs(new[0, d + 1, 0] - p[d - 1]) / 2
    assert abs(fused[d + 1] - p[d - 1]) / 2 < 0.1 * naive_slope  # central difference at the seam: near the hold's 0
    np.testing.assert_allclose(np.asarray(running)[0, :H - s, 0], fused[s:])
