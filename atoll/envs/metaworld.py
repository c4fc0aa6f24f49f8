"""Meta-World v3 tasks with state observations, their scripted experts, and
demo generation (Meta-World 3.1.1, MuJoCo 3.3.0; `pip install -e '.[robot]'`).

Observations are Meta-World's 39-D goal-observable state (hand xyz, gripper
opening, two objects' pose, the same 18 values from the previous step, goal
xyz), as float32; actions are 4-D (hand xyz delta, gripper effort), clipped to
[-1, 1]. An episode ends at its first success (Meta-World's
`info["success"]`) or after `max_steps` steps (500, as DP3 and Meta-World's
own expert test use).

Determinism: an episode's variation (object and goal positions) is drawn from
the env's own `np_random`, which `reset(episode)` re-seeds with
`SeedSequence([seed, episode])` before every reset (Meta-World's
`seeded_rand_vec` mode; its rejection loops that keep goal and object apart
draw from that same generator). MuJoCo itself is deterministic and the scripted
experts are pure functions of the observation, so (task, seed, episode) fixes
the whole expert episode, on any machine with the same package versions, and
no global RNG is touched. (Meta-World's `MT1(task, seed)` benchmark is not used:
it holds only 50 goals per task, so episode 50 would repeat episode 0.)

Seeds: datasets are generated from episodes 0, 1, 2, ... of `DEMO_SEED` (0);
evaluate on another seed, e.g. `EVAL_SEED` (1000) and up. Different seeds give
independent streams of continuous variations, so evaluation episodes are
(almost surely) not the ones the policy was trained on. The trainer chooses;
dataset `meta` records the seed and the episodes kept.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from atoll.data import demos as demos_lib

DEMO_SEED = 0
EVAL_SEED = 1000
DEFAULT_MAX_STEPS = 500

# Meta-World's MT10, in its own order (metaworld.env_dict.MT10_V3).
MT10_TASKS = (
    "reach-v3",
    "push-v3",
    "pick-place-v3",
    "door-open-v3",
    "drawer-open-v3",
    "drawer-close-v3",
    "button-press-topdown-v3",
    "peg-insert-side-v3",
    "window-open-v3",
    "window-close-v3",
)

_VERSIONED = ("metaworld", "mujoco", "gymnasium", "numpy")
_INSTALL_HINT = (
    "Meta-World is not installed (or MuJoCo cannot load); install the robot extra: pip install -e '.[robot]'"
)


def _metaworld() -> tuple[Any, Any]:
    """(goal-observable env classes, expert policy classes), imported on first use
    so `import atoll.envs.metaworld` works without the extra."""
    try:
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE
        from metaworld.policies import ENV_POLICY_MAP
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e})") from e
    return ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE, ENV_POLICY_MAP


def task_names() -> list[str]:
    """All v3 tasks that have both an environment and a scripted expert."""
    envs, policies = _metaworld()
    return sorted(name for name in policies if f"{name}-goal-observable" in envs)


def canonical_name(name: str) -> str:
    """"reach" or "reach-v3" -> "reach-v3"; unknown names -> ValueError with close matches."""
    name = name.strip().lower().replace("_", "-")
    full = name if name.endswith("-v3") else f"{name}-v3"
    names = task_names()
    if full in names:
        return full
    close = difflib.get_close_matches(full, names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known tasks: {', '.join(names)}"
    raise ValueError(f"unknown Meta-World task {name!r}{hint}")


def episode_seed(seed: int, episode: int) -> int:
    """The env seed for one (seed, episode): independent streams, no collisions in practice."""
    if seed < 0 or episode < 0:
        raise ValueError(f"seed and episode must be >= 0, got seed={seed}, episode={episode}")
    return int(np.random.SeedSequence([seed, episode]).generate_state(1)[0])


class MetaWorldEnv:
    """One Meta-World v3 task; `reset(episode)` is a deterministic function of (seed, episode)."""

    def __init__(self, task: str, seed: int = DEMO_SEED, max_steps: int = DEFAULT_MAX_STEPS):
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        episode_seed(seed, 0)  # validates the seed
        envs, policies = _metaworld()
        self.task = canonical_name(task)
        self.seed = seed
        self.max_steps = max_steps
        # Passing a seed makes construction restore numpy's global RNG after its one reset.
        self._env = envs[f"{self.task}-goal-observable"](seed=seed)
        self._env._freeze_rand_vec = False
        self._env.seeded_rand_vec = True  # variations come from env.np_random, which reset() seeds
        self._env.max_path_length = max_steps  # Meta-World refuses to step past it; ours is the limit
        self._expert = policies[self.task]()
        self.obs_dim = int(self._env.observation_space.shape[0])
        self.action_dim = int(self._env.action_space.shape[0])
        self.episode: int | None = None
        self.num_steps = 0
        self.done = True

    def reset(self, episode: int) -> np.ndarray:
        """Start episode `episode` of this env's seed; returns obs_D."""
        self._env.seed(episode_seed(self.seed, episode))
        obs_D, _ = self._env.reset()
        self.episode, self.num_steps, self.done = episode, 0, False
        return obs_D.astype(np.float32)

    def step(self, action_A: np.ndarray) -> tuple[np.ndarray, bool, bool]:
        """Apply one action; returns (obs_D, success, done), done = success or out of steps."""
        if self.done:
            raise RuntimeError("the episode is over (or never started): call reset(episode) first")
        action_A = np.asarray(action_A, dtype=np.float32).reshape(-1)
        if action_A.shape != (self.action_dim,):
            raise ValueError(f"expected an action of shape ({self.action_dim},), got {action_A.shape}")
        if not np.all(np.isfinite(action_A)):
            raise ValueError(f"non-finite action {action_A}")
        obs_D, _reward, _terminated, _truncated, info = self._env.step(np.clip(action_A, -1.0, 1.0))
        self.num_steps += 1
        success = bool(info["success"])
        self.done = success or self.num_steps >= self.max_steps
        return obs_D.astype(np.float32), success, self.done

    @property
    def dt(self) -> float:
        """Seconds per step (MuJoCo's timestep × frame skip)."""
        return float(self._env.dt)

    def expert_action(self, obs_D: np.ndarray) -> np.ndarray:
        """Meta-World's scripted expert for this task: action_A (float32, in [-1, 1])."""
        with warnings.catch_warnings():
            # Its P-controllers warn whenever they saturate, which is often and harmless.
            warnings.simplefilter("ignore")
            action_A = self._expert.get_action(np.asarray(obs_D, dtype=np.float64))
        return np.clip(np.asarray(action_A, dtype=np.float32), -1.0, 1.0)

    def close(self) -> None:
        self._env.close()

    def __enter__(self) -> MetaWorldEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EnvBatch:
    """`num_envs` envs of one task in lockstep, for batched policy inference.

    `reset(episodes)` starts len(episodes) <= num_envs episodes (B of them, on
    the first B envs); `step` then takes actions_BA. An env whose episode is
    done is not stepped again: its obs stays frozen and its success latched.
    """

    def __init__(self, task: str, seed: int, num_envs: int, max_steps: int = DEFAULT_MAX_STEPS):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.envs = [MetaWorldEnv(task, seed, max_steps) for _ in range(num_envs)]
        self.task, self.seed, self.max_steps = self.envs[0].task, seed, max_steps
        self.obs_dim, self.action_dim = self.envs[0].obs_dim, self.envs[0].action_dim
        self._obs_BD = np.zeros((0, self.obs_dim), np.float32)
        self._success_B = np.zeros((0,), bool)
        self._done_B = np.zeros((0,), bool)

    @property
    def num_envs(self) -> int:
        return len(self.envs)

    @property
    def steps_B(self) -> np.ndarray:
        """Steps taken so far in each running episode (its length once done)."""
        return np.array([env.num_steps for env in self.envs[: len(self._done_B)]], np.int64)

    def reset(self, episodes: Sequence[int]) -> np.ndarray:
        episodes = list(episodes)
        if not 1 <= len(episodes) <= self.num_envs:
            raise ValueError(f"reset needs 1..{self.num_envs} episodes, got {len(episodes)}")
        self._obs_BD = np.stack([env.reset(ep) for env, ep in zip(self.envs, episodes)])
        self._success_B = np.zeros(len(episodes), bool)
        self._done_B = np.zeros(len(episodes), bool)
        return self._obs_BD.copy()

    def step(self, actions_BA: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Step every env not yet done; returns (obs_BD, success_B, done_B)."""
        actions_BA = np.asarray(actions_BA, np.float32)
        batch = len(self._done_B)
        if actions_BA.shape != (batch, self.action_dim):
            raise ValueError(f"expected actions of shape ({batch}, {self.action_dim}), got {actions_BA.shape}")
        for i in np.flatnonzero(~self._done_B):
            self._obs_BD[i], self._success_B[i], self._done_B[i] = self.envs[i].step(actions_BA[i])
        return self._obs_BD.copy(), self._success_B.copy(), self._done_B.copy()

    def expert_actions(self, obs_BD: np.ndarray) -> np.ndarray:
        return np.stack([env.expert_action(obs_D) for env, obs_D in zip(self.envs, obs_BD)])

    def close(self) -> None:
        for env in self.envs:
            env.close()

    def __enter__(self) -> EnvBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Sawyer's action: xyz moves the hand's mocap target by action · ACTION_SCALE metres
# (clipped to [-1, 1] first); the fourth entry drives the gripper.
ACTION_SCALE = 1.0 / 100
# The hand position, what `roll_forward` advances (VLASH's offsets in training shift the same
# rows); the gripper opening follows its effort command with dynamics no action sum predicts.
ROBOT_STATE = slice(0, 3)


def roll_forward(obs_D: np.ndarray, actions_KA: np.ndarray, n: int) -> np.ndarray:
    """VLASH's rolled-forward state for Meta-World: the hand position
    (obs[ROBOT_STATE]) moved by the first n actions' xyz offsets (the mocap
    target the hand follows; its lag and the workspace clip are ignored), the
    rest, the gripper opening included, as observed."""
    out = np.array(obs_D, np.float32, copy=True)
    out[ROBOT_STATE] += ACTION_SCALE * np.clip(np.asarray(actions_KA)[:n, :3], -1, 1).sum(0)
    return out


def action_jerk(a2_A: np.ndarray, a1_A: np.ndarray, a0_A: np.ndarray, dt: float) -> float:
    """Jerk of the commanded hand path, m/s³: xyz actions are position offsets
    per step, so jerk is their second difference · ACTION_SCALE / dt³ (a2 the
    oldest of three consecutive actions)."""
    clip = lambda a: np.clip(np.asarray(a, np.float64)[..., :3], -1, 1)  # noqa: E731
    return float(np.linalg.norm(clip(a0_A) - 2 * clip(a1_A) + clip(a2_A)) * ACTION_SCALE / dt**3)


def _expert_episode(env: MetaWorldEnv, episode: int, record: bool) -> dict[str, Any]:
    """Roll out the scripted expert for one episode (ends at its first success)."""
    obs_D = env.reset(episode)
    obs, actions = [], []
    success = done = False
    while not done:
        action_A = env.expert_action(obs_D)
        if record:
            obs.append(obs_D)
            actions.append(action_A)
        obs_D, success, done = env.step(action_A)
    result: dict[str, Any] = {"episode": episode, "success": success, "length": env.num_steps}
    if record:
        result["obs_TD"], result["actions_TA"] = np.stack(obs), np.stack(actions)
    return result


def run_expert(
    task: str,
    episodes: int | Sequence[int],
    seed: int = DEMO_SEED,
    max_steps: int = DEFAULT_MAX_STEPS,
    progress: bool = False,
    record: bool = False,
) -> list[dict[str, Any]]:
    """The scripted expert on `episodes` (a count means 0..n-1): per episode a dict
    with episode, success, length and, with `record`, obs_TD / actions_TA."""
    episodes = range(episodes) if isinstance(episodes, int) else list(episodes)
    with MetaWorldEnv(task, seed, max_steps) as env:
        return [_expert_episode(env, ep, record) for ep in tqdm(episodes, desc=env.task, disable=not progress)]


def generate_demos(
    task: str,
    num_demos: int,
    seed: int = DEMO_SEED,
    max_steps: int = DEFAULT_MAX_STEPS,
    max_episodes: int | None = None,
    progress: bool = True,
) -> demos_lib.Demos:
    """`num_demos` successful expert episodes (episodes 0, 1, 2, ... of `seed`,
    failures skipped), each truncated at its first success (inclusive).

    Raises RuntimeError, stating the measured success rate, if `max_episodes`
    (default 5 * num_demos + 10) run out first.
    """
    if num_demos < 1:
        raise ValueError(f"num_demos must be >= 1, got {num_demos}")
    max_episodes = 5 * num_demos + 10 if max_episodes is None else max_episodes
    kept: list[dict[str, Any]] = []
    tried = 0
    with MetaWorldEnv(task, seed, max_steps) as env, tqdm(
        total=num_demos, desc=f"{env.task} demos", disable=not progress
    ) as bar:
        while len(kept) < num_demos and tried < max_episodes:
            result = _expert_episode(env, tried, record=True)
            tried += 1
            if result["success"]:
                kept.append(result)
                bar.update(1)
            bar.set_postfix(expert_success=f"{len(kept)}/{tried}")
        task = env.task
    if len(kept) < num_demos:
        raise RuntimeError(
            f"the scripted {task} expert succeeded on {len(kept)} of {tried} episodes "
            f"({len(kept) / tried:.0%}) within {max_steps} steps, short of the {num_demos} demos asked for; "
            "raise max_episodes or max_steps, or choose another task"
        )
    meta = {
        "source": "metaworld scripted expert (metaworld.policies.ENV_POLICY_MAP)",
        "task": task,
        "seed": seed,
        "max_steps": max_steps,
        "num_demos": num_demos,
        "episodes": [r["episode"] for r in kept],
        "expert_episodes": tried,
        "expert_successes": len(kept),
        "expert_success_rate": len(kept) / tried,
        "observation": "39-D goal-observable state, float32",
        "action": "4-D: hand xyz delta, gripper effort; clipped to [-1, 1]",
        "reset": "env.np_random seeded with SeedSequence([seed, episode]) before each reset",
        "versions": demos_lib.package_versions(_VERSIONED),
        "created": demos_lib.utc_now(),
    }
    return demos_lib.from_episodes([(r["obs_TD"], r["actions_TA"]) for r in kept], meta)


def demos_cached(
    task: str,
    num_demos: int,
    seed: int = DEMO_SEED,
    cache_dir: str | Path = ".",
    max_steps: int = DEFAULT_MAX_STEPS,
    progress: bool = True,
) -> demos_lib.Demos:
    """Load `cache_dir/<task>-s<seed>-n<num_demos>.npz` if present, else generate and save it."""
    task = canonical_name(task)
    suffix = "" if max_steps == DEFAULT_MAX_STEPS else f"-m{max_steps}"
    path = Path(cache_dir) / f"{task}-s{seed}-n{num_demos}{suffix}.npz"
    if path.exists():
        demos = demos_lib.load_demos(path)
        found = (demos.meta.get("task"), demos.meta.get("seed"), demos.num_episodes, demos.meta.get("max_steps"))
        if found != (task, seed, num_demos, max_steps):
            raise ValueError(
                f"{path} holds (task, seed, episodes, max_steps) = {found}, not "
                f"{(task, seed, num_demos, max_steps)}; move it away to regenerate"
            )
        return demos
    demos = generate_demos(task, num_demos, seed=seed, max_steps=max_steps, progress=progress)
    demos_lib.save_demos(path, demos)
    return demos
