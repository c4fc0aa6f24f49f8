"""Train a diffusion / flow-matching action-chunk policy on scripted demos.

    python -m atoll.experiments.train_policy --config=atoll/configs/policy.py:metaworld \
        --config.env.task=push --workdir=runs/push
    python -m atoll.experiments.train_policy --config=atoll/configs/policy.py:intercept --workdir=runs/icpt

Demos: the task's scripted expert, successful episodes only (Meta-World: cached
as .npz with the expert's measured success rate and package versions; the
JAX suite: generated in one vmapped rollout). Training: data-parallel over
mesh.data (params replicated, the batch split), AdamW with warmup + cosine,
Diffusion Policy's warmup EMA. Every eval.every steps, and at the end, the
EMA policy runs receding-horizon episodes (predict H, execute s, replan) on
seeds disjoint from the demos' and reports its success rate next to the
expert's.

Writes into --workdir: config.json, demos.json (the dataset's provenance),
metrics.jsonl, tb/, checkpoints/ (params, EMA, optimizer state, normalizers),
summary.json, loss.png and success.png. Rerunning resumes from the newest
checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm.auto import tqdm

from atoll.configs import policy as policy_config
from atoll.configs.validation import ConfigError
from atoll.core import chunk_policy, policy as policy_nets
from atoll.data import demos as demos_lib
from atoll.envs import jax_tasks
from atoll.experiments import eval_policy, outputs
from atoll.parallel import checkpoint, mesh as mesh_lib, runtime, sharding

# Fields that fix the saved state's shapes or meaning: a workdir only resumes with the same ones.
_STATE_FIELDS = ("env", "data", "policy", "model", "objective", "normalizer")
_PLAN_STREAM = 0x5E1F  # folded into the seed for the frozen policy's sampling, apart from the training steps' keys


class DataError(ValueError):
    """Demos that cannot be made or read."""


# ------------------------------------------------------------------------ data


def default_cache_dir() -> Path:
    root = os.environ.get("ATOLL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "atoll")
    return Path(root) / "demos"


def jax_expert_demos(task: jax_tasks.Task, num_demos: int, seed: int) -> demos_lib.Demos:
    """num_demos successful expert episodes of a JAX-suite task (first ones of key(seed))."""
    tried = num_demos + num_demos // 4 + 8
    kept, rate = jax_tasks.expert_demos(task, jax.random.key(seed), tried)
    if len(kept) < num_demos:
        raise DataError(f"the {type(task).__name__} expert succeeded in {len(kept)} of {tried} episodes "
                        f"({rate:.0%}); {num_demos} demos need more episodes than that")
    meta = {"source": "jax_tasks expert", "task": type(task).__name__, "seed": seed, "max_steps": task.max_steps,
            "expert_success_rate": rate, "expert_episodes": tried, "expert_successes": len(kept),
            "versions": demos_lib.package_versions(["jax", "numpy"])}
    return demos_lib.from_episodes(kept[:num_demos], meta)


def load_demos(config, progress: bool = True) -> demos_lib.Demos:
    if config.data.path:
        return demos_lib.load_demos(config.data.path)
    if config.env.suite == "jax":
        return jax_expert_demos(eval_policy.jax_task(config.env.task, config.env.max_steps), config.data.num_demos,
                                config.data.seed)
    from atoll.envs import metaworld

    cache = Path(config.data.cache_dir) if config.data.cache_dir else default_cache_dir()
    try:
        return metaworld.demos_cached(metaworld.canonical_name(config.env.task), config.data.num_demos,
                                      config.data.seed, cache, max_steps=config.env.max_steps or 500,
                                      progress=progress)
    except RuntimeError as e:  # the expert ran out of episodes: its measured rate is in the message
        raise DataError(str(e)) from e


def robot_state(suite: str) -> slice:
    """The robot's own state in a suite's observation: what VLASH rolls forward at
    run time (each suite's `roll_forward`), so what its training offsets shift:
    position and velocity in the JAX suite, the hand position in Meta-World."""
    if suite == "metaworld":
        from atoll.envs import metaworld

        return metaworld.ROBOT_STATE
    return jax_tasks.ROBOT_STATE


def windows(demos: demos_lib.Demos, obs_norm, act_norm, obs_horizon: int, action_horizon: int, offsets: int = 0,
            robot_state_rows: slice = jax_tasks.ROBOT_STATE):
    """Normalized training windows: (obs_NTO, actions_NHA) numpy arrays, one per demo step.

    offsets > 0 adds VLASH's augmentation: for every δ in 1..offsets another
    window per step whose newest observation carries the robot state
    (robot_state_rows) of step t + δ and whose actions start there (clamped at
    the episode's end), while the rest of the observation stays at step t, as
    at run time, where the robot state is rolled forward through the actions
    that run during inference."""
    obs_idx_NT, act_idx_NH = demos_lib.window_indices(demos.episode_ends_E, obs_horizon, action_horizon)
    obs_ND = np.asarray(obs_norm.normalize(demos.obs_ND), np.float32)
    act_NA = np.asarray(act_norm.normalize(demos.actions_NA), np.float32)
    obs_NTO, act_NHA = [obs_ND[obs_idx_NT]], [act_NA[act_idx_NH]]
    ends_E = np.asarray(demos.episode_ends_E)
    last_N = np.repeat(ends_E - 1, np.diff(ends_E, prepend=0))
    for delta in range(1, offsets + 1):
        later_N = np.minimum(np.arange(last_N.size) + delta, last_N)
        shifted = obs_ND[obs_idx_NT].copy()
        shifted[:, -1, robot_state_rows] = obs_ND[later_N, robot_state_rows]
        obs_NTO.append(shifted)
        act_NHA.append(act_NA[act_idx_NH[later_N]])
    return np.concatenate(obs_NTO), np.concatenate(act_NHA)


def stale_steps(episode_ends_E, lag: int) -> np.ndarray:
    """[N]: for every demo step t, the step t - lag, clamped to its episode's first step
    (the oldest frame of a window of lag + 1 observations)."""
    return demos_lib.window_indices(episode_ends_E, lag + 1, 1)[0][:, 0]


def frozen_plans(demos: demos_lib.Demos, frozen: chunk_policy.ChunkPolicy, frozen_weights, act_norm,
                 execute_steps: int, action_horizon: int, seed: int, batch: int = 4096) -> np.ndarray:
    """REMAC's self-conditioning source, normalized in this run's units [N, H, A]:
    for every demo step t, the plan the frozen policy made from the history
    ending s = execute_steps steps earlier (at run time the chunk still running
    when the observation of step t is taken), shifted so that row i is its
    action for step t + i (the tail repeats its last row)."""
    obs_idx_NT, _ = demos_lib.window_indices(demos.episode_ends_E, frozen.obs_horizon, frozen.action_horizon)
    stale_N = stale_steps(demos.episode_ends_E, execute_steps)
    # Row i of the shifted plan: row (t - stale) + i of the frozen chunk, clamped to its last row.
    row_NH = np.minimum((np.arange(stale_N.size) - stale_N)[:, None] + np.arange(action_horizon),
                        frozen.action_horizon - 1)
    act = eval_policy.jitted_act(frozen)
    plans = []
    for start in range(0, stale_N.size, batch):
        ids = stale_N[start:start + batch]
        obs_BTO = demos.obs_ND[obs_idx_NT[ids]].astype(np.float32)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _PLAN_STREAM), start)  # not a step's key
        chunk_BHA = np.asarray(act(frozen_weights, obs_BTO, key))
        plans.append(np.take_along_axis(chunk_BHA, row_NH[start:start + batch, :, None], axis=1))
    return np.asarray(act_norm.normalize(np.concatenate(plans)), np.float32)


def load_frozen(config, demos: demos_lib.Demos, workdir: Path):
    """(ChunkPolicy, weights) of config.policy.frozen_policy: a finished run, not
    this one, with this run's data sizes, and (on a resume) the very weights the
    run started with (workdir/frozen.json)."""
    path = Path(config.policy.frozen_policy).absolute()
    if path.name == "checkpoints":
        path = path.parent
    if path == workdir:
        raise ConfigError("config.policy.frozen_policy is this run's own workdir; point it at a finished run")
    if (path / "config.json").exists() and not (path / "summary.json").exists():
        raise ConfigError(f"config.policy.frozen_policy {path} has not finished training (no summary.json): its "
                          "newest checkpoint would change under this run")
    try:
        frozen_config, frozen, weights, step = eval_policy.load_policy(path)
    except eval_policy.EvalError as e:
        raise ConfigError(f"config.policy.frozen_policy: {e}") from None
    obs_dim = int(np.shape(weights["obs_norm"]["offset_D"])[-1])
    if (frozen.action_dim, obs_dim) != (demos.action_dim, demos.obs_dim):
        raise ConfigError(f"config.policy.frozen_policy {config.policy.frozen_policy} was trained on "
                          f"{frozen_config.env.task!r} ({obs_dim}-D observations, {frozen.action_dim}-D actions); "
                          f"this run's data has {demos.obs_dim}-D observations and {demos.action_dim}-D actions")
    reach = config.policy.execute_steps + config.policy.max_delay
    if frozen.action_horizon < reach:
        raise ConfigError(f"config.policy.frozen_policy plans {frozen.action_horizon} actions; a prefix of up to "
                          f"max_delay = {config.policy.max_delay} rows after s = {config.policy.execute_steps} "
                          f"executed needs {reach}")
    record = {"path": str(path), "step": int(step), "weights_fingerprints": checkpoint.fingerprints(weights)}
    saved = workdir / "frozen.json"
    if saved.exists():
        before = json.loads(saved.read_text())
        if (before["step"], before["weights_fingerprints"]) != (record["step"], record["weights_fingerprints"]):
            raise ConfigError(f"config.policy.frozen_policy {path} (step {step}) is not the policy this run started "
                              f"from ({before['path']}, step {before['step']}); resume with that one or use a new "
                              "--workdir (nothing was changed)")
    return frozen, weights, record


# ----------------------------------------------------------------------- state


def make_optimizer(config) -> optax.GradientTransformation:
    t = config.train
    schedule = optax.warmup_cosine_decay_schedule(0.0, t.lr, max(t.warmup_steps, 1), max(t.steps, t.warmup_steps + 1),
                                                  end_value=t.lr * 0.01)
    chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip else []
    return optax.chain(*chain, optax.adamw(schedule, b1=0.95, b2=0.999, weight_decay=t.weight_decay))


def init_state(policy: chunk_policy.ChunkPolicy, tx, obs_norm, act_norm, obs_dim: int, seed: int) -> dict:
    x = jnp.zeros((1, policy.action_horizon, policy.action_dim))
    params = policy.model.init(jax.random.key(seed), x, jnp.zeros((1, policy.action_horizon)),
                               jnp.zeros((1, policy.obs_horizon, obs_dim)))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "ema": jax.tree.map(jnp.copy, params), "opt": tx.init(params),
            "obs_norm": chunk_policy.normalizer_tree(obs_norm), "act_norm": chunk_policy.normalizer_tree(act_norm)}


def weights_of(state: dict, use_ema: bool) -> dict:
    return {"params": state["ema"] if use_ema else state["params"], "obs_norm": state["obs_norm"],
            "act_norm": state["act_norm"]}


def make_train_step(policy: chunk_policy.ChunkPolicy, tx, batch_size: int, ema_power: float, seed: int,
                    batch_shardings, conditioning: str = "none", max_delay: int = 0, self_condition_steps: int = 1):
    """step(state, obs_NTO, act_NHA[, source_NHA]) -> (state, metrics); source_NHA:
    the frozen policy's plans with conditioning "remac", whose weight rises
    linearly from 0 to 1 over the first self_condition_steps steps."""
    def train_step(state, obs_NTO, act_NHA, source_NHA=None):
        step = state["step"]
        key = jax.random.fold_in(jax.random.key(seed), step)
        idx_key, loss_key = jax.random.split(key)
        idx_B = jax.random.randint(idx_key, (batch_size,), 0, obs_NTO.shape[0])
        obs_BTO = jax.lax.with_sharding_constraint(obs_NTO[idx_B], batch_shardings[0])
        act_BHA = jax.lax.with_sharding_constraint(act_NHA[idx_B], batch_shardings[1])
        source = {}
        if source_NHA is not None:
            source = {"source_BHA": jax.lax.with_sharding_constraint(source_NHA[idx_B], batch_shardings[1]),
                      "source_weight": jnp.minimum(step / max(self_condition_steps, 1), 1.0)}

        def loss_fn(params):
            apply = lambda x, t, o: policy.model.apply(params, x, t, o)  # noqa: E731
            return chunk_policy.training_loss(apply, policy.objective, act_BHA, obs_BTO, loss_key,
                                              conditioning=conditioning, max_delay=max_delay, **source)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        decay = policy_nets.ema_decay(step + 1, power=ema_power)
        ema = policy_nets.ema_update(state["ema"], params, decay)
        new = dict(state, step=step + 1, params=params, ema=ema, opt=opt)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return train_step


# ---------------------------------------------------------------------- checks


def _check_workdir_config(workdir: Path, config) -> None:
    saved_path = workdir / "config.json"
    if not saved_path.exists():
        return
    saved = policy_config.with_added_defaults(json.loads(saved_path.read_text()))
    now = json.loads(config.to_json_best_effort())
    # policy.frozen_policy is a path that moves with its folder: frozen.json fingerprints what it held
    differ = [f"{f}.{k}" for f in _STATE_FIELDS for k in set(saved.get(f, {})) | set(now.get(f, {}))
              if isinstance(now.get(f), dict) and saved.get(f, {}).get(k) != now[f].get(k)
              and (f, k) != ("policy", "frozen_policy")]
    differ += [f for f in _STATE_FIELDS if not isinstance(now.get(f), dict) and saved.get(f) != now.get(f)]
    if differ:
        raise ConfigError(f"{workdir} holds a run with a different {', '.join(sorted(differ)[:4])}; "
                          "use a new --workdir (nothing there was changed)")


def _check_batch(config, mesh) -> None:
    data = mesh_lib.mesh_sizes(mesh)["data"]
    if config.train.batch_size % data:
        raise ConfigError(f"config.train.batch_size = {config.train.batch_size} must be divisible by the "
                          f"{data} devices of mesh.data (each takes an equal share)")


# ------------------------------------------------------------------------ eval


def _evaluator(config, policy):
    act = eval_policy.jitted_act(policy)
    s, T_o = config.policy.execute_steps, config.policy.obs_horizon
    if config.env.suite == "jax":
        task = eval_policy.jax_task(config.env.task, config.env.max_steps)

        def run(weights, episodes):
            return eval_policy.evaluate_jax(task, act, weights, episodes=episodes, seed=config.eval.seed,
                                            obs_horizon=T_o, execute_steps=s)
    else:
        from atoll.envs import metaworld

        name = metaworld.canonical_name(config.env.task)

        def run(weights, episodes):
            return eval_policy.evaluate_metaworld(name, act, weights, episodes=episodes, seed=config.eval.seed,
                                                  obs_horizon=T_o, execute_steps=s,
                                                  max_steps=config.env.max_steps or 500)
    return run


def plot_success(workdir: Path, expert: float | None) -> Path | None:
    rows = [r for r in outputs.read_metrics(workdir) if "success" in r]
    if not rows or not outputs.is_writer():
        return None
    fig, ax = outputs.subplots(figsize=(6.4, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["success"] for r in rows], "o-", label="policy (EMA)")
    ax.fill_between(steps, [r["success_lo"] for r in rows], [r["success_hi"] for r in rows], alpha=0.2,
                    label="95% Wilson interval")
    if expert is not None:
        ax.axhline(expert, color="gray", ls="--", lw=1, label=f"scripted expert ({expert:.0%})")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("success rate")
    ax.set_title(workdir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = workdir / "success.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


# ----------------------------------------------------------------------- train


def train(config: ml_collections.ConfigDict, workdir: str | Path, *, progress: bool = True,
          stop_at_step: int | None = None) -> dict[str, Any]:
    """Trains (or resumes) the policy in `workdir`; returns the summary. With
    stop_at_step it saves there and returns {"step", "finished": False} (the
    same call later resumes exactly: same params as an uninterrupted run)."""
    policy_config.validate(config)
    workdir = Path(workdir).absolute()
    _check_workdir_config(workdir, config)
    data = int(config.mesh.data)
    if data > len(jax.devices()):
        raise mesh_lib.MeshError(f"config.mesh.data = {data} but only {len(jax.devices())} devices are available")
    mesh = mesh_lib.make_mesh(dict(config.mesh), jax.devices()[:data] if data > 0 else None)
    _check_batch(config, mesh)

    demos = load_demos(config, progress)
    obs_norm = policy_nets.fit_normalizer(demos.obs_ND, config.normalizer)
    act_norm = policy_nets.fit_normalizer(demos.actions_NA, config.normalizer)
    conditioning, max_delay = config.policy.conditioning, config.policy.max_delay
    obs_NTO, act_NHA = windows(demos, obs_norm, act_norm, config.policy.obs_horizon, config.policy.action_horizon,
                               offsets=max_delay if conditioning == "vlash" else 0,
                               robot_state_rows=robot_state(config.env.suite))
    arrays, frozen_record = (obs_NTO, act_NHA), None
    if conditioning == "remac":  # before anything is written: a bad frozen_policy leaves the workdir as it was
        frozen, frozen_weights, frozen_record = load_frozen(config, demos, workdir)
        arrays += (frozen_plans(demos, frozen, frozen_weights, act_norm, config.policy.execute_steps,
                                config.policy.action_horizon, config.seed),)
    workdir.mkdir(parents=True, exist_ok=True)
    if frozen_record is not None:
        outputs.write_json(workdir / "frozen.json", frozen_record)
    policy = eval_policy.policy_from_config(config, demos.action_dim)
    tx = make_optimizer(config)
    outputs.write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
    outputs.write_json(workdir / "demos.json", {**demos.meta, "episodes": demos.num_episodes,
                                               "steps": int(demos.obs_ND.shape[0])})

    replicated = sharding.replicated(mesh)
    batch_shardings = (sharding.batch_sharding(mesh, 3), sharding.batch_sharding(mesh, 3))
    init = jax.jit(lambda: init_state(policy, tx, obs_norm, act_norm, demos.obs_dim, config.seed),
                   out_shardings=replicated)
    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", keep=2, mode="async")
    resumed = ckpt.latest_step()
    if resumed is not None:  # only the shapes of a fresh state: nothing to compile or run
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                                jax.eval_shape(init))
        state, _ = ckpt.restore(resumed, abstract)
        outputs.truncate_metrics(workdir, resumed, drop_at=("success",))  # evals at `resumed` run again
    else:
        state = init()
    data = jax.device_put(arrays, replicated)
    anneal = config.policy.self_condition_steps or max(config.train.steps // 2, 1)
    step_fn = jax.jit(make_train_step(policy, tx, config.train.batch_size, config.train.ema_power, config.seed,
                                      batch_shardings, conditioning, max_delay, anneal), donate_argnums=(0,))
    evaluate = _evaluator(config, policy)
    expert = demos.meta.get("expert_success_rate")
    metrics = outputs.MetricsWriter(workdir)
    extra = {"config": json.loads(config.to_json_best_effort()), "demos": demos.meta}

    def eval_now(step: int, episodes: int) -> dict:
        # On one device: the rollout is not split over the mesh, and replicated weights would run it on all.
        # Through the host, as eval_policy.load_policy places a checkpoint's weights: the same input
        # types, so eval_policy in this process reuses the compiled rollout.
        weights = jax.device_put(jax.device_get(weights_of(state, config.train.ema)))
        succ, length = evaluate(weights, episodes)
        s = eval_policy.summarize(succ, length)
        row = {"success": s["success"], "success_lo": s["success_ci95"][0], "success_hi": s["success_ci95"][1],
               "eval_episodes": s["episodes"], "mean_length": s["mean_length"]}
        metrics.write(step, row)
        return s

    t0, start = time.perf_counter(), int(state["step"])
    bar = tqdm(total=config.train.steps, initial=start, desc="train_policy", disable=not progress, unit="step")
    end = min(config.train.steps, stop_at_step) if stop_at_step else config.train.steps
    for step in range(start + 1, end + 1):
        state, m = step_fn(state, *data)
        bar.update(1)
        if step % config.train.log_every == 0 or step == config.train.steps:
            m = jax.device_get(m)
            metrics.write(step, {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"])})
            bar.set_postfix(loss=f"{float(m['loss']):.4f}")
        if step % config.eval.every == 0 and step != config.train.steps:
            bar.set_postfix(success=f"{eval_now(step, config.eval.episodes)['success']:.0%}")
        if step % config.train.checkpoint_every == 0 or step in (config.train.steps, stop_at_step):
            ckpt.save(step, state, extra)
    bar.close()
    if end < config.train.steps:
        ckpt.close()
        metrics.close()
        return {"step": end, "finished": False}
    train_seconds = time.perf_counter() - t0
    final = eval_now(config.train.steps, config.eval.final_episodes)
    ckpt.close()
    metrics.close()
    summary = {
        "suite": config.env.suite, "task": config.env.task, "objective": config.objective.kind,
        "network": config.model.net, "step": config.train.steps, "demos": demos.num_episodes,
        "expert_success": expert, "success": final["success"], "success_ci95": final["success_ci95"],
        "eval_episodes": final["episodes"], "eval_seed": config.eval.seed, "mean_length": final["mean_length"],
        "ratio_to_expert": final["success"] / expert if expert else None,
        "train_seconds": train_seconds, "resumed_from": resumed, "finished": True,
        "network_evaluations_per_chunk": policy.objective.network_evaluations,
        "devices": int(mesh.devices.size), "jax": jax.__version__,
    }
    outputs.write_json(workdir / "summary.json", summary)
    outputs.plot_loss(workdir, unit="loss", scale=1.0, bar=None, bar_label="")
    plot_success(workdir, expert)
    return summary


def report(summary: dict, workdir: Path) -> str:
    lo, hi = summary["success_ci95"]
    expert = summary["expert_success"]
    return (f"finished at step {summary['step']}: success {summary['success']:.1%} [{lo:.1%}, {hi:.1%}] over "
            f"{summary['eval_episodes']} episodes" + (f" vs the scripted expert's {expert:.1%}" if expert else "")
            + f"\noutputs in {workdir}: config.json demos.json metrics.jsonl summary.json loss.png success.png "
            "tb/ checkpoints/")


def define_flags() -> None:
    """The CLI's flags, defined only when run as a program (train_lm defines the same names)."""
    config_flags.DEFINE_config_file("config", "atoll/configs/policy.py:tiny", "Policy config file[:variant].")
    flags.DEFINE_string("workdir", None, "Directory for outputs and checkpoints.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.DEFINE_integer("stop_at_step", None, "Save and stop at this step (the run resumes later).")


def main(argv) -> None:
    del argv
    F = flags.FLAGS
    runtime.apply_xla_defaults()
    logging.set_verbosity(logging.WARNING)
    if not F.workdir:
        sys.exit("error: --workdir is required")
    data = int(F.config.mesh.data)
    runtime.request_host_devices(data if data > 0 else 1)
    try:
        summary = train(F.config, F.workdir, progress=F.progress, stop_at_step=F.stop_at_step)
    except (ConfigError, DataError, mesh_lib.MeshError, checkpoint.CheckpointError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not summary["finished"]:
        print(f"stopped at step {summary['step']} (rerun the same command to resume)")
        return
    print(report(summary, Path(F.workdir).absolute()))


if __name__ == "__main__":
    define_flags()
    app.run(main)
