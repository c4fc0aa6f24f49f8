"""Demonstration datasets on disk: one `.npz` per dataset, pure numpy.

Layout (Diffusion Policy's replay-buffer convention): all episodes'
observations and actions concatenated along one time axis, plus
`episode_ends_E`, the cumulative *exclusive* end index of each episode, so
episode i spans `[episode_ends_E[i-1], episode_ends_E[i])` (0 for i = 0).
Row t of `obs_ND` is the observation the action in row t of `actions_NA` was
taken from; an episode's final observation (after its last action) is not
stored. `meta` is a JSON-able dict that says where the data came from (source,
task, seed, the expert's measured success rate, package versions...), so a
dataset carries its own provenance.

Files are written atomically (temp file in the same folder, then `os.replace`),
so an interrupted write leaves either the old file or no file, never half of
one. `window_indices` turns the episode layout into training samples with
Diffusion Policy's padding: observation history clamped to the episode's
first step, future actions clamped to its last step, never crossing episodes.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "atoll-demos"
FORMAT_VERSION = 1
_KEYS = ("format", "format_version", "obs_ND", "actions_NA", "episode_ends_E", "meta_json")


@dataclasses.dataclass(frozen=True, eq=False)
class Demos:
    """Episodes of (observation, action) pairs, concatenated along time."""

    obs_ND: np.ndarray  # float32 [N, D], N = total steps over all episodes
    actions_NA: np.ndarray  # float32 [N, A]
    episode_ends_E: np.ndarray  # int64 [E], cumulative exclusive ends; last == N
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        obs = np.asarray(self.obs_ND, dtype=np.float32)
        act = np.asarray(self.actions_NA, dtype=np.float32)
        ends = np.asarray(self.episode_ends_E)
        problems = _problems(obs, act, ends, self.meta)
        if problems:
            raise ValueError("invalid demo dataset: " + "; ".join(problems))
        object.__setattr__(self, "obs_ND", obs)
        object.__setattr__(self, "actions_NA", act)
        object.__setattr__(self, "episode_ends_E", ends.astype(np.int64))
        object.__setattr__(self, "meta", dict(self.meta))

    @property
    def num_episodes(self) -> int:
        return int(self.episode_ends_E.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.obs_ND.shape[0])

    @property
    def obs_dim(self) -> int:
        return int(self.obs_ND.shape[1])

    @property
    def action_dim(self) -> int:
        return int(self.actions_NA.shape[1])

    @property
    def episode_lengths_E(self) -> np.ndarray:
        return np.diff(self.episode_ends_E, prepend=0)

    def episode(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(obs_TD, actions_TA) of episode i (views, not copies)."""
        if not -self.num_episodes <= i < self.num_episodes:
            raise IndexError(f"episode {i} out of range: the dataset has {self.num_episodes} episodes")
        i %= self.num_episodes
        start = int(self.episode_ends_E[i - 1]) if i > 0 else 0
        end = int(self.episode_ends_E[i])
        return self.obs_ND[start:end], self.actions_NA[start:end]


def _problems(obs: np.ndarray, act: np.ndarray, ends: np.ndarray, meta: Any) -> list[str]:
    """Everything wrong with a dataset, so one error can name all of it."""
    problems = []
    if obs.ndim != 2:
        problems.append(f"obs_ND must be 2-D [steps, obs_dim], got shape {obs.shape}")
    if act.ndim != 2:
        problems.append(f"actions_NA must be 2-D [steps, action_dim], got shape {act.shape}")
    if obs.ndim >= 1 and act.ndim >= 1 and obs.shape[0] != act.shape[0]:
        problems.append(f"obs_ND has {obs.shape[0]} steps but actions_NA has {act.shape[0]}")
    if ends.ndim != 1 or not np.issubdtype(ends.dtype, np.integer):
        problems.append(f"episode_ends_E must be a 1-D integer array, got {ends.dtype} shape {ends.shape}")
    elif ends.size:
        if ends[0] <= 0 or np.any(np.diff(ends) <= 0):
            problems.append("episode_ends_E must be strictly increasing and positive (no empty episodes)")
        if obs.ndim >= 1 and ends[-1] != obs.shape[0]:
            problems.append(f"episode_ends_E[-1] = {ends[-1]} must equal the number of steps {obs.shape[0]}")
    elif obs.ndim >= 1 and obs.shape[0] != 0:
        problems.append(f"{obs.shape[0]} steps but no episode ends")
    if not isinstance(meta, dict):
        problems.append(f"meta must be a dict, got {type(meta).__name__}")
    else:
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as e:
            problems.append(f"meta must be JSON-serializable ({e})")
    return problems


def from_episodes(episodes: Iterable[tuple[np.ndarray, np.ndarray]], meta: dict[str, Any] | None = None) -> Demos:
    """Concatenate [(obs_TD, actions_TA), ...] into one dataset."""
    episodes = list(episodes)
    for i, (obs, act) in enumerate(episodes):
        if len(obs) != len(act) or len(obs) == 0:
            raise ValueError(
                f"episode {i}: {len(obs)} observations and {len(act)} actions; need equal, non-zero counts"
            )
    if not episodes:
        raise ValueError("from_episodes needs at least one episode")
    lengths = [len(obs) for obs, _ in episodes]
    return Demos(
        obs_ND=np.concatenate([np.asarray(o, np.float32) for o, _ in episodes]),
        actions_NA=np.concatenate([np.asarray(a, np.float32) for _, a in episodes]),
        episode_ends_E=np.cumsum(lengths, dtype=np.int64),
        meta=dict(meta or {}),
    )


def take(demos: Demos, num_episodes: int) -> Demos:
    """The first `num_episodes` episodes (a smaller training set from one file)."""
    if not 1 <= num_episodes <= demos.num_episodes:
        source = demos.meta.get("task") or demos.meta.get("source") or "this dataset"
        raise ValueError(
            f"asked for {num_episodes} demo episodes but {source} has {demos.num_episodes}; "
            f"generate more demos or ask for 1..{demos.num_episodes}"
        )
    end = int(demos.episode_ends_E[num_episodes - 1])
    meta = {**demos.meta, "taken": {"num_episodes": num_episodes, "of": demos.num_episodes}}
    return Demos(demos.obs_ND[:end], demos.actions_NA[:end], demos.episode_ends_E[:num_episodes], meta)


def save_demos(path: str | os.PathLike, demos: Demos) -> Path:
    """Write `demos` to `path` (".npz" appended if missing), atomically; returns the path."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_name(path.name + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                format=np.array(FORMAT),
                format_version=np.array(FORMAT_VERSION),
                obs_ND=demos.obs_ND,
                actions_NA=demos.actions_NA,
                episode_ends_E=demos.episode_ends_E,
                meta_json=np.array(json.dumps(demos.meta, sort_keys=True)),
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_demos(path: str | os.PathLike) -> Demos:
    """Read a dataset written by `save_demos`, with one clear error if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no demo dataset at {path} (generate one first, e.g. atoll.envs.metaworld.demos_cached)"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in _KEYS if k not in npz.files]
            if missing or str(npz["format"]) != FORMAT:
                raise ValueError(f"missing {missing}" if missing else f"format is {str(npz['format'])!r}")
            version = int(npz["format_version"])
            if version > FORMAT_VERSION:
                raise ValueError(f"format version {version} is newer than this atoll's ({FORMAT_VERSION})")
            arrays = {k: npz[k] for k in ("obs_ND", "actions_NA", "episode_ends_E")}
            meta = json.loads(str(npz["meta_json"]))
        return Demos(**arrays, meta=meta)
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable atoll demo dataset ({e}); delete it and generate it again") from e


def window_indices(
    episode_ends_E: np.ndarray | Sequence[int], obs_horizon: int, action_horizon: int
) -> tuple[np.ndarray, np.ndarray]:
    """Index windows for one training sample per step t of every episode.

    obs_idx_NT[t] = t-T_o+1 .. t, clamped below to the episode's first step
    (repeats the first observation); act_idx_NH[t] = t .. t+H-1, clamped above
    to the episode's last step (repeats the last action). Diffusion Policy's
    padding; a window never crosses into another episode. Returns int32 arrays
    indexing rows of obs_ND / actions_NA.
    """
    if obs_horizon < 1 or action_horizon < 1:
        raise ValueError(f"obs_horizon and action_horizon must be >= 1, got {obs_horizon} and {action_horizon}")
    ends_E = np.asarray(episode_ends_E, dtype=np.int64)
    lengths_E = np.diff(ends_E, prepend=0)
    starts_E = ends_E - lengths_E
    if np.any(lengths_E <= 0):
        raise ValueError("episode_ends_E must be strictly increasing and positive")
    first_N = np.repeat(starts_E, lengths_E)[:, None]
    last_N = np.repeat(ends_E - 1, lengths_E)[:, None]
    t_N = np.arange(int(ends_E[-1]) if ends_E.size else 0)[:, None]
    obs_idx_NT = np.maximum(t_N + np.arange(1 - obs_horizon, 1)[None], first_N)
    act_idx_NH = np.minimum(t_N + np.arange(action_horizon)[None], last_N)
    return obs_idx_NT.astype(np.int32), act_idx_NH.astype(np.int32)


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """Installed versions of `names` (for a dataset's provenance)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def utc_now() -> str:
    """A timestamp for `meta["created"]`."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
