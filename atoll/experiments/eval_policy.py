"""Success rate of a trained chunk policy (or of the scripted expert).

    python -m atoll.experiments.eval_policy --checkpoint=runs/push --episodes=50 --seeds=1000,1001,1002
    python -m atoll.experiments.eval_policy --policy=expert --task=hand-insert --episodes=50

--checkpoint is a train_policy workdir (or its checkpoints/ folder; the newest
step, or --step). Execution is receding-horizon: the policy predicts H actions
from the last T_o observations, s = --execute_steps of them run (default: the
run's config), then it replans. Each seed is its own block of episodes
(Meta-World: goal/object variations 0..N-1 of MT1(task, seed); JAX suite: the
episodes `rollout` draws from key(seed)); the sampler's noise comes from the
seed as well, so a fixed seed gives the same numbers on the same machine.
--task evaluates on another task of the same suite (any Meta-World v3 name).

Writes JSON (--out, default <workdir>/eval.json): success rate with a 95%
Wilson interval per seed and pooled, episode lengths, and the run's settings.
"""

from __future__ import annotations

import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from atoll.core import chunk_policy, chunking
from atoll.envs import jax_tasks, latency
from atoll.parallel import checkpoint

class EvalError(ValueError):
    """A checkpoint, task or flag that cannot be evaluated."""


# ----------------------------------------------------------------- statistics


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate (sensible at 0% and 100%, unlike ±1.96·SE)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(success_E, length_E) -> dict[str, Any]:
    """Success rate, its 95% interval and episode lengths (steps; an episode that
    never succeeds counts max_steps)."""
    success_E, length_E = np.asarray(success_E, bool), np.asarray(length_E)
    n, k = int(success_E.size), int(success_E.sum())
    lo, hi = wilson_interval(k, n)
    return {
        "episodes": n, "successes": k, "success": k / n if n else float("nan"), "success_ci95": [lo, hi],
        "mean_length": float(length_E.mean()) if n else float("nan"),
        "mean_length_success": float(length_E[success_E].mean()) if k else None,
    }


# -------------------------------------------------------------------- loading


def policy_from_config(config, action_dim: int) -> chunk_policy.ChunkPolicy:
    """The run's ChunkPolicy (the network reads the observation size from its input)."""
    objective = chunk_policy.Objective(
        kind=config.objective.kind, prediction=config.objective.prediction, schedule=config.objective.schedule,
        diffusion_steps=config.objective.diffusion_steps, sampler=config.objective.sampler,
        sample_steps=config.objective.sample_steps)
    m = config.model
    sizes = ({"dim": m.dim, "depth": m.depth, "heads": m.heads} if m.net == "dit" else
             {"channels": tuple(m.channels), "cond_dim": m.cond_dim, "kernel": m.kernel, "groups": m.groups})
    model = chunk_policy.make_denoiser(m.net, action_dim, objective, **sizes)
    return chunk_policy.ChunkPolicy(model, objective, config.policy.obs_horizon, config.policy.action_horizon,
                                    action_dim)


def load_policy(path: str | Path, step: int | None = None):
    """(config, ChunkPolicy, weights, step) from a train_policy workdir; the EMA
    weights when the run kept them."""
    import ml_collections

    path = Path(path).absolute()
    workdir = path.parent if path.name == "checkpoints" else path
    ckpts = workdir / "checkpoints"
    if not (workdir / "config.json").exists() or not ckpts.is_dir():
        raise EvalError(f"{workdir} is not a train_policy workdir (it needs config.json and checkpoints/)")
    steps = sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit())
    if not steps:
        raise EvalError(f"{ckpts} holds no finished checkpoint yet")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise EvalError(f"{ckpts} has no step {step}; it has {steps}")
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    state = checkpoint.read_on_host(ckpts, step)
    params = state["ema"] if config.train.ema else state["params"]
    weights = {"params": params, "obs_norm": state["obs_norm"], "act_norm": state["act_norm"]}
    action_dim = int(np.asarray(state["act_norm"]["offset_D"]).shape[-1])
    # device_put, not jnp.asarray: the latter compiles a small program per leaf shape.
    return config, policy_from_config(config, action_dim), jax.device_put(weights), step


# ------------------------------------------------------------------ evaluation


def jax_task(name: str, max_steps: int = 0) -> jax_tasks.Task:
    return jax_tasks.make_task(name, **({"max_steps": int(max_steps)} if max_steps else {}))


def evaluate_jax(task: jax_tasks.Task, act_fn, weights, *, episodes: int, seed: int, obs_horizon: int,
                 execute_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(success_E, length_E) of a chunk policy act_fn(weights, obs_ETO, key) on the JAX suite."""
    out = jax_tasks.chunked_rollout(task, act_fn, jax.random.key(seed), episodes, weights=weights,
                                    obs_horizon=obs_horizon, execute_steps=execute_steps)
    return np.asarray(out.success), np.asarray(out.length)


def evaluate_jax_strategy(task: jax_tasks.Task, policy: chunk_policy.ChunkPolicy, strategy: chunking.Strategy,
                          weights, *, episodes: int, seed: int, execute_steps: int,
                          delay: int | tuple[float, ...]) -> latency.LatencyEpisodes:
    """The policy on the JAX suite under an execution strategy at a simulated
    inference delay (atoll.envs.latency): success, length, time and jerk per episode."""
    act = latency.policy_act_fn(policy, strategy, execute_steps)
    out = latency.async_rollout(task, strategy, act, jax.random.key(seed), episodes, weights=weights,
                                obs_horizon=policy.obs_horizon, horizon=policy.action_horizon,
                                execute_steps=execute_steps, delay=delay,
                                sample_steps=policy.objective.sample_steps)
    return jax.device_get(out)


def evaluate_metaworld_strategy(task: str, policy: chunk_policy.ChunkPolicy, strategy: chunking.Strategy, weights,
                                *, episodes: int, seed: int, execute_steps: int, delay: int | tuple[float, ...],
                                max_steps: int = 500, progress: bool = False) -> dict[str, np.ndarray]:
    """The policy in Meta-World under an execution strategy at a simulated delay."""
    act = _jitted_async_act(policy, strategy, execute_steps)
    return latency.metaworld_async_episodes(task, strategy, act, weights, episodes=episodes, seed=seed,
                                            obs_horizon=policy.obs_horizon, horizon=policy.action_horizon,
                                            execute_steps=execute_steps, delay=delay,
                                            sample_steps=policy.objective.sample_steps, max_steps=max_steps,
                                            progress=progress)


@functools.lru_cache(maxsize=16)
def _jitted_async_act(policy, strategy, execute_steps):
    return jax.jit(latency.policy_act_fn(policy, strategy, execute_steps))


def parse_delay(text: str) -> int | tuple[float, ...]:
    """--delay: "4" (always 4 steps) or probabilities over 0, 1, ... ("0,0.5,0.5")."""
    parts = [p for p in str(text).split(",") if p.strip()]
    try:
        if len(parts) == 1:
            return int(parts[0])
        return latency.delay_probs(tuple(float(p) for p in parts))
    except ValueError as e:
        raise EvalError(f"--delay {text!r}: an int number of steps or probabilities over d = 0, 1, ... ({e})") \
            from None


def evaluate_jax_expert(task: jax_tasks.Task, *, episodes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    out = jax_tasks.rollout(task, jax_tasks.expert_policy(task), jax.random.key(seed), episodes)
    return np.asarray(out.success), np.asarray(out.length)


def evaluate_metaworld(task: str, act_fn, weights, *, episodes: int, seed: int, obs_horizon: int,
                       execute_steps: int, max_steps: int = 500, batch: int = 25,
                       progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(success_E, length_E) on Meta-World, `batch` environments stepped in lockstep
    so that one sampler call serves all of them at each replan."""
    from tqdm.auto import tqdm

    from atoll.envs import metaworld

    success, length = np.zeros(episodes, bool), np.full(episodes, max_steps, np.int64)
    key = jax.random.key(seed)
    bar = tqdm(total=episodes, desc=f"eval {task}", unit="ep", disable=not progress, leave=False)
    with metaworld.EnvBatch(task, seed, min(batch, episodes), max_steps) as envs:  # envs are slow to build: reuse
        for start in range(0, episodes, batch):
            ids = np.arange(start, min(start + batch, episodes))
            obs_BO = np.asarray(envs.reset(list(ids)), np.float32)
            hist_BTO = chunk_policy.history_init(obs_BO, obs_horizon)
            done_B, t = np.zeros(len(ids), bool), 0
            while t < max_steps and not done_B.all():
                chunk_key = jax.random.fold_in(jax.random.fold_in(key, start), t)
                chunk_BHA = np.asarray(act_fn(weights, jnp.asarray(hist_BTO), chunk_key))
                for j in range(min(execute_steps, max_steps - t)):
                    obs_BO, succ_B, done_B = envs.step(chunk_BHA[:, j])
                    t += 1
                    newly = np.asarray(succ_B, bool) & ~success[ids]
                    length[ids[newly]] = t
                    success[ids] |= np.asarray(succ_B, bool)
                    hist_BTO = chunk_policy.history_push(hist_BTO, np.asarray(obs_BO, np.float32))
                    if np.asarray(done_B).all():
                        break
            bar.update(len(ids))
    bar.close()
    return success, length


def evaluate_metaworld_expert(task: str, *, episodes: int, seed: int, max_steps: int = 500,
                              progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    from atoll.envs import metaworld

    runs = metaworld.run_expert(task, range(episodes), seed, max_steps=max_steps, progress=progress)
    return np.array([r["success"] for r in runs], bool), np.array([r["length"] for r in runs])


@functools.lru_cache(maxsize=16)
def jitted_act(policy: chunk_policy.ChunkPolicy):
    """act_fn(weights, obs_BTO, key) -> actions_BHA, one object per (equal) policy, so
    rollouts, the Meta-World loop and later runs of the same model reuse the compiled sampler."""
    return jax.jit(policy.act)


# ------------------------------------------------------------------------ CLI


def define_flags() -> None:
    """The CLI's flags (defined only when run as a program, so the trainer can import this module)."""
    flags.DEFINE_string("checkpoint", None, "A train_policy workdir (or its checkpoints/ folder).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_enum("policy", "checkpoint", ["checkpoint", "expert"],
                      "checkpoint: the trained policy; expert: the task's scripted expert (a baseline).")
    flags.DEFINE_string("task", None, "Task to evaluate on (default: the one the policy was trained on).")
    flags.DEFINE_enum("suite", None, ["metaworld", "jax"], "With --policy=expert: the task's suite.")
    flags.DEFINE_integer("episodes", 50, "Episodes per seed.")
    flags.DEFINE_list("seeds", ["1000"], "Evaluation seeds (disjoint from the demo seed).")
    flags.DEFINE_integer("execute_steps", None, "Actions executed per chunk (default: the run's).")
    flags.DEFINE_integer("max_steps", None, "Episode limit (default: the run's / the task's).")
    flags.DEFINE_enum("strategy", None, list(chunking.STRATEGIES),
                      "Real-time execution strategy under a simulated inference delay (atoll.core.chunking). "
                      "Default: plain receding horizon, no delay.")
    flags.DEFINE_string("delay", "0", "With --strategy: inference delay in control steps, or probabilities "
                        "over d = 0, 1, ... (e.g. 0,0,0.5,0.5).")
    flags.DEFINE_string("out", None, "JSON output path (default: <workdir>/eval.json).")
    flags.DEFINE_bool("progress", True, "Show a progress bar (Meta-World).")


def run(*, checkpoint_path: str | None, step: int | None, policy_kind: str, task: str | None, suite: str | None,
        episodes: int, seeds: list[int], execute_steps: int | None, max_steps: int | None,
        progress: bool, strategy: str | None = None, delay: int | tuple[float, ...] = 0) -> dict[str, Any]:
    if episodes < 1:
        raise EvalError(f"--episodes = {episodes} must be at least 1")
    if not seeds:
        raise EvalError("--seeds is empty")
    result: dict[str, Any] = {"policy": policy_kind, "seeds": seeds, "episodes_per_seed": episodes}
    if policy_kind == "checkpoint":
        if not checkpoint_path:
            raise EvalError("--checkpoint is required (or --policy=expert)")
        config, policy, weights, step = load_policy(checkpoint_path, step)
        suite = config.env.suite
        task = task or config.env.task
        s = execute_steps or config.policy.execute_steps
        if not 1 <= s <= policy.action_horizon:
            raise EvalError(f"--execute_steps = {s} must lie in [1, {policy.action_horizon}] (the chunk length)")
        max_steps = max_steps or config.env.max_steps
        act = jitted_act(policy)
        if strategy is not None:
            strat = chunking.Strategy(strategy)
            try:
                chunking.check_conditioning(strat, config.policy.get("conditioning", "none"), config.objective.kind)
                chunking.check_horizons(strategy, len(latency.delay_probs(delay)) - 1, s, policy.action_horizon)
            except ValueError as e:
                raise EvalError(str(e)) from None
            result.update(strategy=strategy, delay=delay)
        result.update(checkpoint=str(Path(checkpoint_path).absolute()), step=step, execute_steps=s,
                      action_horizon=policy.action_horizon, obs_horizon=policy.obs_horizon,
                      objective=config.objective.kind, network_evaluations=policy.objective.network_evaluations)
    else:
        if not task or not suite:
            raise EvalError("--policy=expert needs --task and --suite")
    per_seed, extra = [], {}
    t0 = time.perf_counter()
    for seed in seeds:
        if suite == "jax":
            jt = jax_task(task, max_steps or 0)
            if policy_kind == "expert":
                succ, length = evaluate_jax_expert(jt, episodes=episodes, seed=seed)
            elif strategy is not None:
                out = evaluate_jax_strategy(jt, policy, strat, weights, episodes=episodes, seed=seed,
                                            execute_steps=s, delay=delay)
                succ, length = np.asarray(out.success), np.asarray(out.length)
                extra = {"mean_time": float(np.mean(out.time)), "mean_jerk": float(np.mean(out.jerk))}
            else:
                succ, length = evaluate_jax(jt, act, weights, episodes=episodes, seed=seed,
                                            obs_horizon=policy.obs_horizon, execute_steps=s)
        else:
            from atoll.envs import metaworld

            task = metaworld.canonical_name(task)
            ms = max_steps or 500
            if policy_kind == "expert":
                succ, length = evaluate_metaworld_expert(task, episodes=episodes, seed=seed, max_steps=ms,
                                                         progress=progress)
            elif strategy is not None:
                out = evaluate_metaworld_strategy(task, policy, strat, weights, episodes=episodes, seed=seed,
                                                  execute_steps=s, delay=delay, max_steps=ms, progress=progress)
                succ, length = out["success"], out["length"]
                extra = {"mean_time": float(np.mean(out["time"])), "mean_jerk": float(np.mean(out["jerk"]))}
            else:
                succ, length = evaluate_metaworld(task, act, weights, episodes=episodes, seed=seed,
                                                  obs_horizon=policy.obs_horizon, execute_steps=s, max_steps=ms,
                                                  progress=progress)
        per_seed.append({"seed": seed, **summarize(succ, length), **(extra if strategy else {}), "_succ": succ,
                         "_len": length})
    pooled = summarize(np.concatenate([p.pop("_succ") for p in per_seed]),
                       np.concatenate([p.pop("_len") for p in per_seed]))
    result.update(suite=suite, task=task, per_seed=per_seed, **pooled, seconds=time.perf_counter() - t0)
    return result


def main(argv) -> None:
    del argv
    F = flags.FLAGS
    logging.set_verbosity(logging.ERROR)  # orbax warns about metadata it does not need here
    try:
        seeds = [int(s) for s in F.seeds]
    except ValueError:
        sys.exit(f"error: --seeds must be integers, got {F.seeds}")
    try:
        result = run(checkpoint_path=F.checkpoint, step=F.step, policy_kind=F.policy,
                     task=F.task, suite=F.suite, episodes=F.episodes, seeds=seeds,
                     execute_steps=F.execute_steps, max_steps=F.max_steps, progress=F.progress,
                     strategy=F.strategy, delay=parse_delay(F.delay))
    except (EvalError, ValueError, checkpoint.CheckpointError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    out = F.out
    if out is None and F.checkpoint:
        p = Path(F.checkpoint).absolute()
        out = str((p.parent if p.name == "checkpoints" else p) / "eval.json")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    lo, hi = result["success_ci95"]
    print(f"{result['task']} ({result['policy']}): success {result['success']:.1%} "
          f"[{lo:.1%}, {hi:.1%}] over {result['episodes']} episodes; mean length {result['mean_length']:.0f} steps"
          + (f"\nwritten to {out}" if out else ""))


if __name__ == "__main__":
    define_flags()
    app.run(main)
