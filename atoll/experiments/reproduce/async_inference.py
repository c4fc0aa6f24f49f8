"""Chunk policies under inference delay: every execution strategy at d in {0, 1, 2, 4(, 8)}
control steps (issue 10, item 5), next to the Kinetix figures of RTC, VLASH and REMAC.

    python -m atoll.experiments.reproduce.async_inference --preset=ci --out=runs/async
    python -m atoll.experiments.reproduce.async_inference --preset=full --out=runs/async-full \
        [--envs=intercept] [--strategies=naive_async,rtc]

The study, per environment of the JAX suite:
  policies    five flow policies trained on the same expert demos, one per
              training the strategies need (policy.conditioning): none (sync,
              naive_async, temporal_ensemble, rtc, fused), prefix (training-time
              RTC: clean prefixes of d ~ U{0..d_max} from the demo itself),
              remac (the same, with REMAC's self-conditioning: over the first
              half of training the prefixes blend into the stale plans of the
              frozen `none` policy, the plans a running chunk holds at run
              time), vlash (robot state offset by δ ~ U{0..d_max}) and faster
              (prefixes + per-action clocks). Same architecture, steps, data
              and seed.
  execution   H actions predicted, s = max(s_min, d) executed per chunk
              (asynchronous execution keeps one inference in flight, so it
              needs d <= s <= H - d), and d = 0 at every s in use as well, the
              delay-free baseline of the same execution (`executions`); d is
              the inference delay in control steps (atoll.envs.latency:
              asynchronous strategies keep the old chunk running, sync pauses
              robot and world and pays in time). On tasks that punish
              open-loop execution, a fixed s = d_max would lower every
              baseline before any delay: the full preset's plain intercept
              policy succeeds 93.5% at s = 4 and 55.5% at s = 8 at d = 0.
              Policies train for s_min (remac's stale plans lag by s_min), so
              the cells at a larger s run remac beyond its training lag.
  evaluation  the final EMA policy of each, on the same `episodes` episodes of
              eval seed 2000 for every strategy and delay (paired comparisons),
              reporting success (95% Wilson interval), episode time in seconds
              (sync counts its waits) and the mean jerk of the commanded action.

Writes DIR/results.json ({"runs": [{"env", "strategy", "d", "s", "success",
"episode_time", "jerk", ...}], ...}), DIR/results.md (success and time per
strategy and delay, the acceptance checks, the Kinetix figures beside ours)
and DIR/success_vs_delay.png, DIR/time_and_jerk.png. Policies live in
DIR/policies/<env>-<conditioning>/ (train_policy workdirs) and evaluations in
DIR/evals/; both are reused by a rerun with the same --out, so an interrupted
study resumes. The outputs are rewritten after every environment (results.md
names the environments still to come).

Presets: `ci` is intercept with H = 8, s = 4, d in {0, 1, 2, 4}, a DiT of width
64 and depth 2, 1500 steps, 1000 evaluation episodes: a 2-core CPU job of
about half an hour. `full` adds waypoints, H = 16, s_min = 4, d up to 8 (so
s = 8 at d = 8, with its own d = 0 baseline; ci's DiT, 2000 steps of batch
128), and Meta-World reach and push
("metaworld:<task>": policy.py:metaworld at the CPU size of
docs/REPRODUCTIONS.md, 50 episodes per cell, MuJoCo stepping on the CPU;
VLASH rolls the hand position forward by the actions' offsets): about 4 h
of process time on a 2-core CPU (2026-11-30, partly shared), most of it the
JAX-suite evaluations. Any Meta-World task joins with --envs=metaworld:<task>.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags

from atoll.core import chunking
from atoll.experiments.reproduce import cli, runs

EVAL_SEED = 2000

PRESETS: dict[str, dict[str, Any]] = {
    "ci": {"envs": ("intercept",), "delays": (0, 1, 2, 4), "horizon": 8, "execute_steps": 4, "episodes": 1000,
           "model": {"dim": 64, "depth": 2, "heads": 2},
           "train": {"steps": 1500, "batch_size": 128, "lr": 2e-3, "warmup_steps": 100, "log_every": 100,
                     "checkpoint_every": 500},
           "eval": {"every": 1500, "final_episodes": 256}},
    # CPU-sized (the intercept variant's DiT, 4000 steps of batch 256 and 2048 episodes a cell would take
    # 5-6 h here): ci's DiT and training at twice the chunk, 1000 episodes a cell
    "full": {"envs": ("intercept", "waypoints", "metaworld:reach-v3", "metaworld:push-v3"), "delays": (0, 1, 2, 4, 8),
             "horizon": 16, "execute_steps": 4, "episodes": 1000,  # s_min: s = 8 only at d = 8
             "model": {"dim": 64, "depth": 2, "heads": 2},
             "train": {"steps": 2000, "batch_size": 128, "lr": 2e-3, "warmup_steps": 100, "log_every": 100,
                       "checkpoint_every": 500},
             "eval": {"every": 2000, "final_episodes": 256},
             # Meta-World: the CPU-sized policy of docs/REPRODUCTIONS.md (reach 96%, push 94% at d = 0)
             "metaworld": {"episodes": 50, "model": {"dim": 64, "depth": 2, "heads": 2},
                           "train": {"steps": 3000, "batch_size": 64, "lr": 1e-3, "warmup_steps": 200,
                                     "checkpoint_every": 1000},
                           "eval": {"every": 3000, "final_episodes": 50}}},
}
METAWORLD = "metaworld:"
CONDITIONINGS = ("none", "prefix", "remac", "vlash", "faster")  # none first: remac's frozen source
ACCEPTANCE_DELAY = 4
RECOVERING = ("rtc", "vlash", "prefix", "remac")  # remac: prefix conditioning, self-conditioned

# Kinetix (12 levels, H = 8, flow MLP-Mixer, d = 0..4): success at d = 0 / 4 as
# reported (research/robot_policies.md, Table 2; numbers are comparable only
# within one paper).
KINETIX = [
    {"source": "REMAC (2601.20130)", "method": "naive async", "by_d": [0.828, 0.702, 0.639, 0.525, 0.451]},
    {"source": "REMAC (2601.20130)", "method": "REMAC (prefix training)", "by_d": [0.888, 0.879, 0.859, 0.817, 0.779]},
    {"source": "REMAC (2601.20130)", "method": "RTC (re-run)", "by_d": [None, None, None, None, 0.588]},
    {"source": "VLASH (2512.01031)", "method": "naive async", "by_d": [None, None, None, None, 0.512]},
    {"source": "VLASH (2512.01031)", "method": "VLASH", "by_d": [None, None, None, None, 0.817]},
]

_ENVS = flags.DEFINE_list("envs", None, "Only these envs: JAX-suite tasks or metaworld:<task> (default: the "
                                        "preset's).")
_STRATEGIES = flags.DEFINE_list("strategies", None, f"Only these strategies (of {', '.join(chunking.STRATEGIES)}).")


class ReproductionError(ValueError):
    """An --out folder, env or strategy list this study cannot use as it is."""


# ------------------------------------------------------------------- planning


def resolve(names: Sequence[str] | None, known: Sequence[str], what: str) -> list[str]:
    if names is None:
        return list(known)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ReproductionError(f"unknown {what} {unknown or '(none given)'}; choose from {', '.join(known)}")
    return [n for n in known if n in names]


def resolve_envs(names: Sequence[str]) -> list[str]:
    """JAX-suite task names, or "metaworld:<any v3 task>" (canonicalized)."""
    from atoll.envs import jax_tasks

    out = []
    for name in names:
        if name.startswith(METAWORLD):
            from atoll.envs import metaworld

            try:
                out.append(METAWORLD + metaworld.canonical_name(name[len(METAWORLD):]))
            except ValueError as e:
                raise ReproductionError(f"unknown env {name!r}: {e}") from None
        elif name in jax_tasks.TASKS:
            out.append(name)
        else:
            raise ReproductionError(f"unknown env {name!r}; choose from {', '.join(sorted(jax_tasks.TASKS))} or "
                                    "metaworld:<task>")
    return list(dict.fromkeys(out))  # "reach" and "reach-v3" are one env


def executions(delays: Sequence[int], s_min: int) -> list[tuple[int, int]]:
    """The study's (d, s) cells, ordered by s then d: s = max(s_min, d) at every
    d, and d = 0 at every larger s in use, the delay-free baseline of that
    execution."""
    cells = {(d, max(s_min, d)) for d in delays}
    cells |= {(0, s) for _, s in cells if s != s_min}
    return sorted(cells, key=lambda ds: (ds[1], ds[0]))


def policy_config(preset: dict, env: str, conditioning: str, frozen_policy: str = ""):
    """policy.py's variant for one (env, conditioning): the JAX suite's, or
    metaworld's with the preset's "metaworld" sizes for "metaworld:<task>";
    frozen_policy: remac's source (the env's `none` policy workdir)."""
    from atoll.configs import policy

    if env.startswith(METAWORLD):
        c = policy.get_config("metaworld")
        c.env.task = env[len(METAWORLD):]
        sizes = preset["metaworld"]
    else:
        c = policy.get_config("waypoints" if env == "waypoints" else "intercept")
        c.env.task = env
        sizes = preset
    c.policy.update(action_horizon=preset["horizon"], execute_steps=preset["execute_steps"],
                    conditioning=conditioning, max_delay=max(preset["delays"]) if conditioning != "none" else 0,
                    frozen_policy=frozen_policy)
    c.model.update(**sizes["model"])
    c.train.update(**sizes["train"])
    c.eval.update(**sizes["eval"])
    c.data.num_demos = sizes.get("num_demos", c.data.num_demos)
    c.mesh.data = 1  # a small model: splitting its batch over CPU devices only adds collectives
    policy.validate(c)
    return c


def check_reusable(workdir: Path, config) -> None:
    saved = workdir / "config.json"
    if not saved.exists():
        return
    from atoll.experiments.reproduce.metaworld_policy import config_differences

    from atoll.configs import policy

    differ = [k for k in config_differences(policy.with_added_defaults(json.loads(saved.read_text())),
                                            json.loads(config.to_json_best_effort()))
              if k != "policy.frozen_policy"]  # an absolute path: it moves with --out (frozen.json checks it)
    if differ:
        raise ReproductionError(f"{workdir} holds a policy with a different {', '.join(differ[:4])} (another "
                                "preset?); use another --out or delete that folder (nothing was changed)")


def train_policy_or_reuse(workdir: Path, config, progress: bool) -> dict:
    check_reusable(workdir, config)
    summary = workdir / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    from atoll.experiments.train_policy import train

    return train(config, workdir, progress=progress)


def evaluate_or_reuse(path: Path, workdir: Path, env: str, strategy: str, d: int, s: int, episodes: int) -> dict:
    """One (env, strategy, d, s) cell: success, time and jerk over `episodes` episodes."""
    if path.exists():
        return json.loads(path.read_text())
    from absl import logging

    from atoll.experiments import eval_policy, outputs

    logging.set_verbosity(logging.ERROR)  # orbax warns about checkpoint metadata a read does not need
    config, policy, weights, _ = eval_policy.load_policy(workdir)
    t0 = time.perf_counter()
    if env.startswith(METAWORLD):
        out = eval_policy.evaluate_metaworld_strategy(env[len(METAWORLD):], policy, chunking.Strategy(strategy),
                                                      weights, episodes=episodes, seed=EVAL_SEED, execute_steps=s,
                                                      delay=d, max_steps=config.env.max_steps or 500)
    else:
        task = eval_policy.jax_task(env, config.env.max_steps)
        out = eval_policy.evaluate_jax_strategy(task, policy, chunking.Strategy(strategy), weights,
                                                episodes=episodes, seed=EVAL_SEED, execute_steps=s, delay=d)._asdict()
    summary = eval_policy.summarize(out["success"], out["length"])
    row = {"env": env, "strategy": strategy, "d": int(d), "s": int(s), "success": summary["success"],
           "episode_time": float(np.mean(out["time"])), "jerk": float(np.mean(out["jerk"])),
           "success_ci95": summary["success_ci95"], "episodes": summary["episodes"],
           "mean_length": summary["mean_length"], "horizon": policy.action_horizon,
           "conditioning": config.policy.conditioning, "eval_seed": EVAL_SEED,
           "seconds": time.perf_counter() - t0}
    path.parent.mkdir(parents=True, exist_ok=True)
    outputs.write_json(path, row)
    return row


# ---------------------------------------------------------------- statistics


def acceptance(rows: Sequence[dict], env: str, d: int = ACCEPTANCE_DELAY) -> dict | None:
    """The issue's ci checks on one env at delay d: naive loses >= 10 points
    against d = 0 (at the same s); some of rtc / vlash / prefix / remac is within
    5 points of d = 0 and finishes episodes faster than sync at d."""
    s = next((r["s"] for r in rows if r["env"] == env and r["strategy"] == "naive_async" and r["d"] == d), None)
    cell = {(r["strategy"], r["d"]): r for r in rows if r["env"] == env and r["s"] == s}
    base = cell.get(("naive_async", 0))
    naive, sync = cell.get(("naive_async", d)), cell.get(("sync", d))
    if base is None or naive is None:
        return None
    recovered = []
    for name in RECOVERING:
        r = cell.get((name, d))
        if r is None:
            continue
        recovered.append({"strategy": name, "success": r["success"], "gap": base["success"] - r["success"],
                          "within_5": base["success"] - r["success"] <= 0.05,
                          "faster_than_sync": sync is not None and r["episode_time"] < sync["episode_time"]})
    return {"env": env, "d": d, "s": s, "d0_success": base["success"], "naive_success": naive["success"],
            "naive_loss": base["success"] - naive["success"],
            "naive_loses_10": base["success"] - naive["success"] >= 0.10,
            "sync_time": None if sync is None else sync["episode_time"], "recovering": recovered,
            "holds": base["success"] - naive["success"] >= 0.10 and any(
                r["within_5"] and r["faster_than_sync"] for r in recovered)}


# ------------------------------------------------------------------ outputs


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def results_markdown(results: dict) -> str:
    rows, setting = results["runs"], results["setting"]
    s_min = setting["execute_steps"]
    lines = [f"# Chunk policies under inference delay, preset `{results['preset']}`", "",
             f"Flow DiT policies trained on scripted-expert demos; H = {setting['horizon']} predicted, "
             f"s = max({s_min}, d) executed per chunk (columns at a larger s name it and have their own d = 0); "
             f"the same episodes of eval seed {EVAL_SEED} for every strategy and delay of an environment. d: "
             "inference delay in control steps. Cells: success (mean episode time in s). Sync pauses robot and "
             "world while it infers, so its success is d = 0's at the same s and its time grows with d.", ""]
    planned = results.get("planned_envs", results["envs"])
    if len(results["envs"]) < len(planned):
        lines += [f"**Partial: {len(results['envs'])} of {len(planned)} environments done** (still to come: "
                  f"{', '.join(planned[len(results['envs']):])}; the same command continues the study).", ""]
    for env in results["envs"]:
        cell = {(r["strategy"], r["d"], r["s"]): r for r in rows if r["env"] == env}
        columns = sorted({(r["d"], r["s"]) for r in rows if r["env"] == env}, key=lambda ds: (ds[1], ds[0]))
        head = [f"d = {d}" if s == s_min else f"d = {d}, s = {s}" for d, s in columns]
        episodes = sorted({r["episodes"] for r in rows if r["env"] == env})
        lines += [f"## {env}", "", f"{', '.join(map(str, episodes))} episodes per cell.", "",
                  "| strategy | " + " | ".join(head) + f" | jerk at {head[-1]} |", "|---|" + "---|" * (len(columns) + 1)]
        for name in results["strategies"]:
            cells = [f"{_pct(cell[(name, *ds)]['success'])} ({cell[(name, *ds)]['episode_time']:.2f})"
                     if (name, *ds) in cell else "–" for ds in columns]
            last = cell.get((name, *columns[-1]))
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {'–' if last is None else format(last['jerk'], '.0f')} |")
        lines.append("")
        acc = acceptance(rows, env)
        if acc:
            lines += acceptance_lines(acc)
    lines += kinetix_lines()
    return "\n".join(lines) + "\n"


def acceptance_lines(acc: dict) -> list[str]:
    out = [f"Acceptance (the issue's `ci` checks at d = {acc['d']}, s = {acc['s']}): naive asynchronous execution "
           "succeeds "
           f"{_pct(acc['naive_success'])} against {_pct(acc['d0_success'])} at d = 0, a loss of "
           f"{100 * acc['naive_loss']:.1f} points ({'≥' if acc['naive_loses_10'] else '<'} 10)."]
    for r in acc["recovering"]:
        side = "below" if r["gap"] >= 0 else "above"
        out.append(f"- {r['strategy']}: {_pct(r['success'])}, {100 * abs(r['gap']):.1f} points {side} d = 0 "
                   f"({'within' if r['within_5'] else 'not within'} 5), "
                   f"{'faster' if r['faster_than_sync'] else 'not faster'} than sync per episode.")
    out += [f"The criterion {'holds' if acc['holds'] else 'does NOT hold'} in this measurement.", ""]
    return out


def kinetix_lines() -> list[str]:
    out = ["Kinetix, as reported (12 levels, H = 8, flow MLP-Mixer, 1024–2048 rollouts per point; numbers compare "
           "only within one paper):", "", "| source | method | d = 0 | 1 | 2 | 3 | 4 |", "|---|---|---|---|---|---|---|"]
    for k in KINETIX:
        out.append(f"| {k['source']} | {k['method']} | " + " | ".join(_pct(x) for x in k["by_d"]) + " |")
    out += ["", "Our tasks are not Kinetix. In the JAX suite a point mass chases a target that re-steers at random "
                "times (intercept) or tracks a goal gliding through random waypoints (waypoints), so a stale plan "
                "misses by construction; Meta-World's goals hold still while the arm moves. Compare directions "
                "(how much each strategy loses with d, which ones recover), not levels."]
    return out


def plot(out: Path, results: dict) -> list[Path]:
    from atoll.experiments import outputs

    rows, envs = results["runs"], results["envs"]
    fig, axes = outputs.subplots(1, len(envs), figsize=(5.5 * len(envs), 4), squeeze=False)
    fig2, axes2 = outputs.subplots(2, len(envs), figsize=(5.5 * len(envs), 6.5), squeeze=False)
    s_min = results["setting"]["execute_steps"]
    for i, env in enumerate(envs):
        for j, name in enumerate(results["strategies"]):
            color = f"C{j % 10}"
            for s in sorted({r["s"] for r in rows if r["env"] == env and r["strategy"] == name}):
                pts = sorted(((r["d"], r) for r in rows if r["env"] == env and r["strategy"] == name and r["s"] == s),
                             key=lambda p: p[0])
                ds, style = [d for d, _ in pts], "o-" if s == s_min else "s--"  # a larger s: its own d = 0
                label = name if s == s_min else f"{name}, s = {s}"
                axes[0][i].plot(ds, [r["success"] for _, r in pts], style, color=color, label=label)
                axes2[0][i].plot(ds, [r["episode_time"] for _, r in pts], style, color=color, label=label)
                axes2[1][i].plot(ds, [r["jerk"] for _, r in pts], style, color=color, label=label)
        axes[0][i].set(title=env, xlabel="inference delay d (control steps)", ylabel="success rate", ylim=(-0.02, 1.02))
        axes2[0][i].set(title=env, ylabel="mean episode time (s)")
        axes2[1][i].set(xlabel="inference delay d (control steps)", ylabel="mean jerk of the command")
        for ax in (axes[0][i], axes2[0][i], axes2[1][i]):
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    axes2[0][-1].legend(fontsize=8)
    return [runs.save_figure(fig, out / "success_vs_delay.png"), runs.save_figure(fig2, out / "time_and_jerk.png")]


# --------------------------------------------------------------------- study


def run_study(preset_name: str, out: Path, envs: Sequence[str] | None = None,
              strategies: Sequence[str] | None = None, progress: bool = True,
              preset: dict | None = None) -> dict:
    """Trains (or reuses) the policies, evaluates every cell, writes the outputs; returns results."""
    from atoll.experiments import outputs

    preset = dict(preset or PRESETS[preset_name])
    envs = resolve_envs(envs) if envs else list(preset["envs"])
    strategies = resolve(strategies, chunking.STRATEGIES, "strategy")
    H, s_min, delays = preset["horizon"], preset["execute_steps"], tuple(preset["delays"])
    cells = executions(delays, s_min)
    for name in strategies:
        for d, s in cells:
            chunking.check_horizons(name, d, s, H)
    needed = {chunking.Strategy(n).conditioning for n in strategies}
    needed = sorted(needed | ({"none"} if "remac" in needed else set()), key=CONDITIONINGS.index)
    out.mkdir(parents=True, exist_ok=True)
    rows, policies, results = [], {}, {}
    for i, env in enumerate(envs):
        for cond in needed:
            workdir = out / "policies" / f"{env.replace(':', '-')}-{cond}"
            print(f"== policy {env} / conditioning {cond}", flush=True)
            frozen = str(out.absolute() / "policies" / f"{env.replace(':', '-')}-none") if cond == "remac" else ""
            summary = train_policy_or_reuse(workdir, policy_config(preset, env, cond, frozen), progress)
            policies[(env, cond)] = {"success_d0_training_eval": summary["success"],
                                     "expert_success": summary["expert_success"], "workdir": str(workdir.relative_to(out))}
        episodes = preset["metaworld"]["episodes"] if env.startswith(METAWORLD) else preset["episodes"]
        for name in strategies:
            workdir = out / "policies" / f"{env.replace(':', '-')}-{chunking.Strategy(name).conditioning}"
            for d, s in cells:
                path = out / "evals" / f"{env.replace(':', '-')}-{name}-d{d}-s{s}.json"
                row = evaluate_or_reuse(path, workdir, env, name, d, s, episodes)
                print(f"   {env} {name:>17} d={d} s={s}: success {row['success']:.1%}, "
                      f"time {row['episode_time']:.2f} s, jerk {row['jerk']:.0f}", flush=True)
                rows.append(row)
        # after every environment: a study of hours (the full preset) has readable partial results
        done = envs[:i + 1]
        results = {"preset": preset_name, "envs": done, "planned_envs": envs, "strategies": strategies,
                   "runs": rows,
                   "setting": {"horizon": H, "execute_steps": s_min, "delays": list(delays),
                               "cells": [list(ds) for ds in cells],
                               "episodes": preset["episodes"], "eval_seed": EVAL_SEED,
                               "metaworld_episodes": preset.get("metaworld", {}).get("episodes"),
                               "train_steps": preset["train"].get("steps")},
                   "policies": [{"env": e, "conditioning": c, **v} for (e, c), v in policies.items()],
                   "acceptance": [a for a in (acceptance(rows, e) for e in done) if a]}
        outputs.write_json(out / "results.json", results)
        (out / "results.md").write_text(results_markdown(results))
        plot(out, results)
    return results


def main(argv) -> None:
    del argv
    out = cli.start_training_run(1)
    try:
        run_study(cli.PRESET.value, out, _ENVS.value, _STRATEGIES.value, progress=cli.SHOW_PROGRESS.value)
    except (ReproductionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    app.run(main)
