"""Islands of different speeds: wait for the slowest, or let each island take
the steps it has time for (FedCompass / A-EDiT style).

    python -m atoll.experiments.reproduce.heterogeneous_islands --preset=ci --out=runs/hetero

M = 4 DiLoCo islands (H = 30) with relative speeds 1, 1, 0.5, 0.25, trained
for the same number of ticks (inner steps of the fastest island):

  wait_for_slowest   every island takes H steps a round; a round lasts as long
                     as the slowest island needs (4·H step-times).
  heterogeneous      a round lasts H step-times of the fastest island; island i
                     takes floor(H·s_i) steps (30, 30, 15, 7) and the outer mean
                     weights the pseudo-gradients by tokens processed.
  heterogeneous_stale  (extra row, mode "heterogeneous") the slowest island must
                     take at least 8 steps, so it spans two rounds (15 steps)
                     and its pseudo-gradient, one round stale, is discounted by
                     (1 + staleness)^−1.

Simulated wall-clock comes from the network simulator
(`netsim.island_round_seconds`): the last island to finish its steps, then a
blocking fp32 ring all-reduce over a `bandwidth_gbit_s` link with
`latency_ms` per hop; the speed-1 island takes `step_seconds` per step (a
nominal unit: the compute part of every time scales with it). The target
loss is the worst final validation loss among the runs, so every run reaches
it; `sim_seconds_to_target` is the simulated time of the first evaluation at
or below it. Writes DIR/results.json ({"runs": [{"mode", "final_val_loss",
"sim_seconds_to_target", ...}]}), DIR/results.md and DIR/loss_vs_time.png.

Presets: `ci` is the low_communication ci model (D 64, 2 layers, 0.14M
params, seq 64, global batch 32) for 3600 ticks (120 rounds): 8 min for the
three runs on a 2-core CPU (docs/REPRODUCTIONS.md); `full` is lm.py:small
(~25M params) for 6000 ticks, a GPU job.
A rerun with the same --out keeps finished runs (delete DIR/runs/NAME to redo one).
"""

from __future__ import annotations

from pathlib import Path

from absl import app

from atoll.experiments.reproduce import cli, runs

SPEEDS = (1.0, 1.0, 0.5, 0.25)
H = 30

PRESETS = {
    "ci": {**runs.LM_PRESETS["ci"], "eval_every": 150,
           "step_seconds": 1.0, "bandwidth_gbit_s": 1.0, "latency_ms": 50.0},
    "full": {**runs.LM_PRESETS["full"], "eval_every": 300,
             "step_seconds": 1.0, "bandwidth_gbit_s": 1.0, "latency_ms": 50.0},
}

# (run name, mode, outer overrides)
RUNS = (
    ("wait_for_slowest", "wait_for_slowest", {"heterogeneity": "wait_for_slowest"}),
    ("heterogeneous", "heterogeneous", {"heterogeneity": "heterogeneous"}),
    ("heterogeneous_stale", "heterogeneous", {"heterogeneity": "heterogeneous", "min_inner_steps": 8,
                                              "staleness_power": 1.0}),
)


def outer_overrides(preset: dict, extra: dict) -> dict:
    if preset["eval_every"] % H:
        raise ValueError(f"eval_every = {preset['eval_every']} must be a multiple of H = {H} "
                         "(evaluations on round boundaries carry whole-round simulated times)")
    return {"method": "diloco", "H": H, "speeds": SPEEDS, **extra}


def round_seconds(config, preset: dict, num_params: int) -> float:
    """Simulated seconds of one outer round for this run's schedule."""
    from atoll.configs import lm
    from atoll.parallel import netsim

    schedule = lm.island_schedule(config)  # the plan the trainer followed
    return netsim.island_round_seconds(list(SPEEDS), schedule, step_time_s=preset["step_seconds"],
                                       payload_bytes=4.0 * num_params,
                                       bandwidth_bit_s=preset["bandwidth_gbit_s"] * 1e9,
                                       latency_s=preset["latency_ms"] / 1e3)


def val_curve(metrics: list[dict], round_s: float) -> list[dict]:
    """(tick, tokens, simulated seconds, val loss) at every evaluation."""
    return [{"step": r["step"], "tokens": r.get("tokens"), "sim_seconds": r["step"] / H * round_s,
             "val_loss": r["val_loss"]} for r in metrics if "val_loss" in r]


def seconds_to_target(curve: list[dict], target: float) -> float | None:
    return next((p["sim_seconds"] for p in curve if p["val_loss"] <= target + 1e-12), None)


def results_markdown(rows: list[dict], target: float, preset_name: str, preset: dict) -> str:
    wait = next((r for r in rows if r["name"] == "wait_for_slowest"), None)
    lines = [
        f"# Heterogeneous islands (speeds {', '.join(f'{s:g}' for s in SPEEDS)}), preset `{preset_name}`",
        "",
        f"DiLoCo, M = {len(SPEEDS)}, H = {H}; every run takes the same number of ticks. Simulated time: the "
        f"speed-1 island takes {preset['step_seconds']:g} s per step, {preset['bandwidth_gbit_s']:g} Gbit/s "
        f"links, {preset['latency_ms']:g} ms per hop. Target loss = the worst final loss here = {target:.4f}.",
        "",
        "| run | mode | steps per period | rounds per period | tokens | final val loss | round (sim s) | "
        "to target (sim s) | speed-up to target vs waiting |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = (f"{wait['sim_seconds_to_target'] / r['sim_seconds_to_target']:.2f}×"
                   if wait and r["sim_seconds_to_target"] else "–")
        lines.append(
            f"| {r['name']} | {r['mode']} | {r['steps_per_period']} | {r['rounds_per_period']} | "
            f"{r['tokens'] / 1e6:.2f}M | {r['final_val_loss']:.4f} | {r['round_seconds']:.1f} | "
            f"{r['sim_seconds_to_target']:.0f} | {speedup} |")
    het = next((r for r in rows if r["name"] == "heterogeneous"), None)
    if wait and het:
        gap = (het["final_val_loss"] / wait["final_val_loss"] - 1) * 100
        faster = wait["sim_seconds_to_target"] / het["sim_seconds_to_target"]
        lines += ["", f"Direction: after the same ticks, heterogeneous steps end {abs(gap):.2f}% "
                      f"{'worse' if gap > 0 else 'better'} in loss than waiting for the slowest "
                      f"({het['tokens'] / wait['tokens'] * 100:.0f}% of its tokens) and reach the target "
                      f"{faster:.2f}× {'sooner' if faster >= 1 else 'later'} in simulated wall-clock."]
    return "\n".join(lines) + "\n"


def plot(out: Path, curves: dict[str, list[dict]], target: float) -> Path:
    from atoll.experiments import outputs

    fig, (ax1, ax2) = outputs.subplots(1, 2, figsize=(12, 4.5))
    for name, pts in curves.items():
        ax1.plot([p["sim_seconds"] / 3600 for p in pts], [p["val_loss"] for p in pts], "o-", label=name, ms=3)
        ax2.plot([p["tokens"] / 1e6 for p in pts], [p["val_loss"] for p in pts], "o-", label=name, ms=3)
    for ax in (ax1, ax2):
        ax.axhline(target, color="gray", ls="--", lw=1, label="target")
        ax.grid(alpha=0.3)
    ax1.set(xlabel="simulated wall-clock (hours)", ylabel="validation loss (nats)", xscale="log",
            title="loss vs simulated time")
    ax2.set(xlabel="tokens trained on (M)", ylabel="validation loss (nats)", title="loss vs tokens")
    ax1.legend(fontsize=8)
    return runs.save_figure(fig, out / "loss_vs_time.png")


def reproduce(preset_name: str, out: str | Path, progress: bool = True) -> dict:
    from atoll.experiments import outputs

    preset = PRESETS[preset_name]
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    for name, mode, extra in RUNS:
        config = runs.lm_run_config(preset, outer_overrides(preset, extra))
        workdir = out / "runs" / name

        def row_of(summary: dict, wall_s: float, name=name, mode=mode, config=config) -> dict:
            sched = summary["island_schedule"]
            return {"name": name, "mode": mode, "final_val_loss": summary["val_loss"],
                    "round_seconds": round_seconds(config, preset, summary["params"]),
                    "steps_per_period": sched["steps_per_period"], "rounds_per_period": sched["rounds_per_period"],
                    "staleness_power": config.outer.staleness_power, "tokens": summary["tokens"],
                    "ticks": summary["step"], "params": summary["params"], "wall_s": wall_s}

        row = runs.train_or_reuse(name, workdir, config, row_of, progress)
        curves[name] = val_curve(outputs.read_metrics(workdir), row["round_seconds"])
        print(f"   val loss {row['final_val_loss']:.4f}, round {row['round_seconds']:.1f} sim s, "
              f"{row['wall_s']:.0f} s", flush=True)
        rows.append(row)
    target = max(r["final_val_loss"] for r in rows)
    for r in rows:
        r["sim_seconds_to_target"] = seconds_to_target(curves[r["name"]], target)
        r["sim_seconds_total"] = r["ticks"] / H * r["round_seconds"]
    results = {"preset": preset_name, "setting": {**preset, "speeds": SPEEDS, "H": H}, "target_val_loss": target,
               "runs": rows, "curves": curves}
    outputs.write_json(out / "results.json", results)
    (out / "results.md").write_text(results_markdown(rows, target, preset_name, preset))
    plot(out, curves, target)
    return results


def main(argv) -> None:
    del argv
    out = cli.start_training_run(PRESETS[cli.PRESET.value]["islands"])
    reproduce(cli.PRESET.value, out, progress=cli.SHOW_PROGRESS.value)
    print((out / "results.md").read_text())
    print(f"outputs in {out.absolute()}: results.json results.md loss_vs_time.png runs/")


if __name__ == "__main__":
    app.run(main)
