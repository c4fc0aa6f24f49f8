import json

import numpy as np
import pytest

from atoll.data import demos as dl


def _episodes(lengths, obs_dim=3, action_dim=2):
    """Episode i, step k: obs = 100*i + k, action = -(100*i + k), so a value names its row."""
    out = []
    for i, length in enumerate(lengths):
        step_T = 100 * i + np.arange(length, dtype=np.float32)
        out.append((np.repeat(step_T[:, None], obs_dim, 1), -np.repeat(step_T[:, None], action_dim, 1)))
    return out


def _demos(lengths=(3, 1, 5)):
    return dl.from_episodes(_episodes(lengths), {"task": "toy", "seed": 0})


def test_from_episodes_layout():
    demos = _demos((3, 1, 5))
    assert demos.num_episodes == 3 and demos.num_steps == 9
    assert (demos.obs_dim, demos.action_dim) == (3, 2)
    assert demos.episode_ends_E.tolist() == [3, 4, 9] and demos.episode_ends_E.dtype == np.int64
    assert demos.obs_ND.dtype == np.float32 and demos.actions_NA.dtype == np.float32
    obs_TD, actions_TA = demos.episode(2)
    np.testing.assert_array_equal(obs_TD[:, 0], 200 + np.arange(5))
    np.testing.assert_array_equal(actions_TA[:, 1], -(200 + np.arange(5)))
    assert demos.episode(-1)[0].shape == (5, 3)
    with pytest.raises(IndexError, match="3 episodes"):
        demos.episode(3)


def test_invalid_datasets_get_one_clear_error():
    obs, act = np.zeros((5, 3)), np.zeros((5, 2))
    with pytest.raises(ValueError, match="must equal the number of steps"):
        dl.Demos(obs, act, np.array([2, 4]))
    with pytest.raises(ValueError, match="strictly increasing"):
        dl.Demos(obs, act, np.array([3, 3, 5]))
    with pytest.raises(ValueError, match="5 steps but actions_NA has 4"):
        dl.Demos(obs, act[:4], np.array([5]))
    with pytest.raises(ValueError, match="JSON"):
        dl.Demos(obs, act, np.array([5]), meta={"bad": object()})
    with pytest.raises(ValueError, match="non-zero"):
        dl.from_episodes([(np.zeros((0, 3)), np.zeros((0, 2)))])


def test_save_load_round_trip(tmp_path):
    demos = _demos()
    path = dl.save_demos(tmp_path / "sub" / "toy", demos)
    assert path == tmp_path / "sub" / "toy.npz"
    back = dl.load_demos(path)
    np.testing.assert_array_equal(back.obs_ND, demos.obs_ND)
    np.testing.assert_array_equal(back.actions_NA, demos.actions_NA)
    np.testing.assert_array_equal(back.episode_ends_E, demos.episode_ends_E)
    assert back.meta == demos.meta
    # No temp file is left behind, and the file holds no pickles.
    assert [p.name for p in path.parent.iterdir()] == ["toy.npz"]
    np.load(path, allow_pickle=False).close()


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    path = dl.save_demos(tmp_path / "toy.npz", _demos((2,)))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        dl.save_demos(path, _demos((4, 4)))
    assert [p.name for p in tmp_path.iterdir()] == ["toy.npz"]  # no temp file left
    assert dl.load_demos(path).num_steps == 2  # the old file is intact


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no demo dataset"):
        dl.load_demos(tmp_path / "missing.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="not a readable atoll demo dataset"):
        dl.load_demos(tmp_path / "garbage.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a readable atoll demo dataset"):
        dl.load_demos(tmp_path / "other.npz")
    good = dl.save_demos(tmp_path / "good.npz", _demos())
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable atoll demo dataset"):
        dl.load_demos(truncated)
    # A file whose arrays disagree names the problem too.
    np.savez(
        tmp_path / "bad_ends.npz",
        format=np.array(dl.FORMAT),
        format_version=np.array(1),
        obs_ND=np.zeros((4, 3), np.float32),
        actions_NA=np.zeros((4, 2), np.float32),
        episode_ends_E=np.array([2, 3]),
        meta_json=np.array(json.dumps({})),
    )
    with pytest.raises(ValueError, match="must equal the number of steps"):
        dl.load_demos(tmp_path / "bad_ends.npz")


def test_take(tmp_path):
    demos = _demos((3, 1, 5))
    first = dl.take(demos, 2)
    assert first.num_episodes == 2 and first.num_steps == 4
    np.testing.assert_array_equal(first.obs_ND, demos.obs_ND[:4])
    assert first.meta["taken"] == {"num_episodes": 2, "of": 3} and first.meta["task"] == "toy"
    assert dl.take(demos, 3).num_steps == 9
    with pytest.raises(ValueError, match="asked for 4 demo episodes but toy has 3"):
        dl.take(demos, 4)
    with pytest.raises(ValueError, match="asked for 0"):
        dl.take(demos, 0)


@pytest.mark.parametrize("obs_horizon,action_horizon", [(1, 1), (2, 4), (3, 16)])
def test_window_indices(obs_horizon, action_horizon):
    lengths = (3, 1, 7)
    demos = _demos(lengths)
    obs_idx_NT, act_idx_NH = dl.window_indices(demos.episode_ends_E, obs_horizon, action_horizon)
    n = sum(lengths)
    assert obs_idx_NT.shape == (n, obs_horizon) and act_idx_NH.shape == (n, action_horizon)
    assert obs_idx_NT.dtype == np.int32 and act_idx_NH.dtype == np.int32
    # The newest obs and the first action of sample t are step t itself.
    np.testing.assert_array_equal(obs_idx_NT[:, -1], np.arange(n))
    np.testing.assert_array_equal(act_idx_NH[:, 0], np.arange(n))
    # Gathered values stay inside their episode (value // 100 is the episode).
    episode_N = np.repeat(np.arange(len(lengths)), lengths)
    obs_NTD, act_NHA = demos.obs_ND[obs_idx_NT], demos.actions_NA[act_idx_NH]
    assert np.all(obs_NTD[..., 0] // 100 == episode_N[:, None])
    assert np.all(-act_NHA[..., 0] // 100 == episode_N[:, None])
    # Windows are consecutive steps except for padding, which repeats the
    # first obs / last action of the episode.
    starts = np.concatenate([[0], demos.episode_ends_E[:-1]])
    for t in range(n):
        e = episode_N[t]
        first, last = starts[e], demos.episode_ends_E[e] - 1
        want_obs = [max(t - obs_horizon + 1 + k, first) for k in range(obs_horizon)]
        want_act = [min(t + k, last) for k in range(action_horizon)]
        assert obs_idx_NT[t].tolist() == want_obs and act_idx_NH[t].tolist() == want_act


def test_window_indices_padding_examples():
    obs_idx_NT, act_idx_NH = dl.window_indices([2, 5], obs_horizon=2, action_horizon=3)
    assert obs_idx_NT.tolist() == [[0, 0], [0, 1], [2, 2], [2, 3], [3, 4]]
    assert act_idx_NH.tolist() == [[0, 1, 1], [1, 1, 1], [2, 3, 4], [3, 4, 4], [4, 4, 4]]
    with pytest.raises(ValueError, match=">= 1"):
        dl.window_indices([2], 0, 3)
    empty_obs, empty_act = dl.window_indices(np.zeros(0, np.int64), 2, 3)
    assert empty_obs.shape == (0, 2) and empty_act.shape == (0, 3)


def test_package_versions():
    versions = dl.package_versions(["numpy", "surely-not-a-package-xyz"])
    assert versions["numpy"] == np.__version__
    assert versions["surely-not-a-package-xyz"] == "not installed"
