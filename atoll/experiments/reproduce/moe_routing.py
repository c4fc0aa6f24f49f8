"""MoE routing on the embedded corpus: dense vs MoE at equal active
parameters, token choice vs expert choice, with and without balancing.

    python -m atoll.experiments.reproduce.moe_routing --preset=ci --out=runs/moe_routing

Runs (every block's FFN is MoE; E = 8 experts of width F/2, two per token, so
a token passes through the dense model's FFN width F; the router adds D·E):

  dense            the dense baseline (FFN width F)
  topk_balanced    token choice (top-2, softmax over the chosen), capacity
                   factor 1.25, Switch loss 0.01 + router z-loss 1e-3
  topk_unbalanced  the same with no balance or z-loss (weight 0)
  topk_bias        the same with DeepSeek-V3's aux-loss-free bias (rate 1e-3)
                   and no balance loss
  expert_choice    each expert takes S·K/E tokens of each sequence (capacity
                   factor 1: K experts per token on average; balanced by
                   construction; note: non-causal routing)

What it reports: final validation loss, max / mean expert load and drop rate
(the last logged values, averaged over MoE layers), the balance trajectory
over training (the "surge, stabilization, relaxation" phases of routing),
and the inter-layer expert affinity of the balanced run's final params on
validation windows (ExFlow: P(expert j at layer l+1 | expert i at layer l)).

Writes DIR/results.json ({"runs": [{"name", "moe", "router", "active_params",
"final_val_loss", "max_over_mean_load", "drop_rate", ...}], ...}),
DIR/results.md, DIR/loss.png, DIR/balance.png and DIR/affinity.png.
`ci` runs on one CPU device in minutes (docs/REPRODUCTIONS.md has the
figures); `full` is lm.py:small-sized, a GPU job. A rerun with the same
--out keeps finished runs (delete DIR/runs/NAME to redo one).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from absl import app

from atoll.experiments.reproduce import cli, runs

EXPERTS, TOP_K = 8, 2

PRESETS = {
    "ci": {"variant": "tiny", "islands": 1, "steps": 1200, "batch_size": 16, "seq_len": 64, "eval_every": 200,
           "eval_batches": 4, "warmup_steps": 60, "affinity_windows": 64,
           "model": {"d_model": 64, "num_layers": 4, "num_heads": 2, "num_kv_heads": 2, "head_dim": 32,
                     "mlp_dim": 256}},
    "full": {"variant": "small", "islands": 1, "steps": 5000, "batch_size": 64, "seq_len": 512, "eval_every": 500,
             "eval_batches": 8, "warmup_steps": 250, "affinity_windows": 256, "model": {}},
}

_TOKEN_CHOICE = {"num_experts": EXPERTS, "top_k": TOP_K, "router": "topk_softmax", "dispatch": "capacity",
                 "capacity_factor": 1.25}
# (name, config.model.moe overrides; None = dense)
RUNS = (
    ("dense", None),
    ("topk_balanced", {**_TOKEN_CHOICE, "load_balance_weight": 0.01, "z_loss_weight": 1e-3}),
    ("topk_unbalanced", {**_TOKEN_CHOICE, "load_balance_weight": 0.0, "z_loss_weight": 0.0}),
    ("topk_bias", {**_TOKEN_CHOICE, "load_balance_weight": 0.0, "z_loss_weight": 1e-3, "bias_rate": 1e-3}),
    # capacity factor 1: C = S·K/E, so tokens get K experts on average, the others' active compute
    ("expert_choice", {**_TOKEN_CHOICE, "router": "expert_choice", "capacity_factor": 1.0,
                       "load_balance_weight": 0.0, "z_loss_weight": 1e-3}),
)
AFFINITY_RUN = "topk_balanced"


def run_config(preset: dict, moe_overrides: dict | None):
    c = runs.lm_run_config(preset, {"method": "none"})
    c.mesh.update(island=1, data=-1)
    c.train.log_every = max(preset["eval_every"] // 10, 1)
    if moe_overrides is not None:
        c.model.moe.update(**moe_overrides)
        c.model.moe.expert_mlp_dim = c.model.mlp_dim // TOP_K  # k experts per token = one dense FFN's width
    return c


def final_routing(metrics: list[dict]) -> dict:
    """Last logged max/mean load and drop rate, averaged over the MoE layers."""
    from atoll.experiments.outputs import routing_trajectory

    out = {}
    for field in ("max_over_mean_load", "drop_rate", "router_entropy"):
        layers = routing_trajectory(metrics, field)
        out[field] = float(np.mean([pts[-1][1] for pts in layers.values()])) if layers else None
    return out


def balance_trajectory(metrics: list[dict]) -> list[tuple[int, float]]:
    """(step, max/mean load averaged over MoE layers) at every logged step."""
    from atoll.experiments.outputs import routing_trajectory

    layers = list(routing_trajectory(metrics, "max_over_mean_load").values())
    return [(pts[0][0], float(np.mean([p[1] for p in pts]))) for pts in zip(*layers)] if layers else []


def results_markdown(rows: list[dict], preset_name: str, affinity_summary: dict | None) -> str:
    dense = next(r for r in rows if not r["moe"])
    lines = [
        f"# MoE routing, preset `{preset_name}`",
        "",
        f"E = {EXPERTS} experts of width F/{TOP_K}, top-{TOP_K} (expert choice: {TOP_K} per token on average), "
        "every block MoE; the dense baseline has FFN width F. Equal active parameters up to the router.",
        "",
        "| run | router | active params | total params | final val loss | vs dense | max/mean load | "
        "drop rate | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fmt = lambda x, spec: "–" if x is None else format(x, spec)
        vs = (r["final_val_loss"] / dense["final_val_loss"] - 1) * 100
        lines.append(f"| {r['name']} | {r['router']} | {r['active_params']:,} | {r['params']:,} | "
                     f"{r['final_val_loss']:.4f} | {vs:+.2f}% | {fmt(r['max_over_mean_load'], '.2f')} | "
                     f"{fmt(r['drop_rate'], '.3f')} | {r['wall_s']:.0f} |")
    moe_rows = [r for r in rows if r["moe"]]
    best = min(moe_rows, key=lambda r: r["final_val_loss"])
    gap = (best["final_val_loss"] / dense["final_val_loss"] - 1) * 100
    lines += ["", f"Direction: the best MoE run ({best['name']}) ends {abs(gap):.2f}% "
                  f"{'below' if gap < 0 else 'above'} the dense baseline's validation loss at equal active "
                  "parameters and equal steps."]
    bal = {r["name"]: r for r in moe_rows}
    if "topk_balanced" in bal and "topk_unbalanced" in bal:
        b, u = bal["topk_balanced"], bal["topk_unbalanced"]
        lines.append(f"Balance loss: max/mean load {u['max_over_mean_load']:.2f} without it, "
                     f"{b['max_over_mean_load']:.2f} with it; drop rate {u['drop_rate']:.3f} → "
                     f"{b['drop_rate']:.3f}; val loss {u['final_val_loss']:.4f} → {b['final_val_loss']:.4f}.")
    if affinity_summary:
        m = affinity_summary["mean"]
        lines.append(
            f"Inter-layer affinity ({AFFINITY_RUN}, {affinity_summary['tokens']:,} validation tokens, mean over "
            f"adjacent layer pairs): from a token's first choice at layer l, its first choice at l+1 is the "
            f"likeliest expert with probability {m.get('first_choice_mean_max_prob', m['mean_max_prob']):.2f} "
            f"(independent routing with these loads: "
            f"{m.get('first_choice_independent_max_prob', m['independent_max_prob']):.2f}, uniform: "
            f"{affinity_summary['uniform_prob']:.2f}); mutual information {m['mutual_information_bits']:.3f} bits "
            f"(shuffled tokens: {m['shuffled_mutual_information_bits']:.3f}).")
    return "\n".join(lines) + "\n"


def plot_losses(out: Path, curves: dict[str, list[tuple[int, float]]]) -> Path:
    from atoll.experiments import outputs

    fig, ax = outputs.subplots(figsize=(6.4, 4.2))
    for name, pts in curves.items():
        ax.plot(*zip(*pts), "o-" if name == "dense" else ".-", label=name, ms=3, lw=1.2)
    ax.set(xlabel="step", ylabel="validation loss (nats)", title="dense vs MoE at equal active parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return runs.save_figure(fig, out / "loss.png")


def plot_balance(out: Path, trajectories: dict[str, list[tuple[int, float]]]) -> Path:
    from atoll.experiments import outputs

    fig, ax = outputs.subplots(figsize=(6.4, 4.2))
    for name, pts in trajectories.items():
        if pts:
            ax.plot(*zip(*pts), lw=1.2, label=name)
    ax.axhline(1.0, color="gray", ls="--", lw=1, label="uniform")
    ax.set(xlabel="step", ylabel="busiest expert's load / mean (avg over layers)",
           title="balance trajectory (surge, stabilization, relaxation)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return runs.save_figure(fig, out / "balance.png")


def reproduce(preset_name: str, out: str | Path, progress: bool = True) -> dict:
    from atoll.core import flops
    from atoll.core.transformer import TransformerConfig
    from atoll.experiments import moe_affinity, outputs

    preset = PRESETS[preset_name]
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    rows, curves, trajectories = [], {}, {}
    for name, moe_overrides in RUNS:
        config = run_config(preset, moe_overrides)
        workdir = out / "runs" / name

        def row_of(summary: dict, wall_s: float, name=name, config=config) -> dict:
            tc = TransformerConfig.from_dict(config.model)
            return {"name": name, "moe": tc.moe.enabled, "router": tc.moe.router if tc.moe.enabled else "dense",
                    "active_params": flops.active_params(tc), "params": summary["params"],
                    "final_val_loss": summary["val_loss"], **final_routing(outputs.read_metrics(workdir)),
                    "moe_config": dict(config.model.moe) if tc.moe.enabled else None, "wall_s": wall_s}

        row = runs.train_or_reuse(name, workdir, config, row_of, progress)
        metrics = outputs.read_metrics(workdir)
        curves[name] = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
        trajectories[name] = balance_trajectory(metrics)
        print(f"   val loss {row['final_val_loss']:.4f}, max/mean load {row['max_over_mean_load']}, "
              f"{row['wall_s']:.0f} s", flush=True)
        rows.append(row)
    # the affinity tool on the balanced run's last checkpoint: RUN/analysis/affinity.{json,png}
    affinity_summary = moe_affinity.run(out / "runs" / AFFINITY_RUN, windows=preset["affinity_windows"],
                                        progress=False)
    affinity = affinity_summary.pop("affinity")
    shutil.copy(out / "runs" / AFFINITY_RUN / "analysis" / "affinity.png", out / "affinity.png")
    results = {"preset": preset_name, "setting": {**preset, "experts": EXPERTS, "top_k": TOP_K}, "runs": rows,
               "val_curves": curves, "balance_trajectories": trajectories,
               "affinity": {"run": AFFINITY_RUN, "matrices": np.asarray(affinity).tolist(), **affinity_summary}}
    outputs.write_json(out / "results.json", results)
    (out / "results.md").write_text(results_markdown(rows, preset_name, affinity_summary))
    plot_losses(out, curves)
    plot_balance(out, trajectories)
    return results


def main(argv) -> None:
    del argv
    out = cli.start_training_run(1)
    reproduce(cli.PRESET.value, out, progress=cli.SHOW_PROGRESS.value)
    print((out / "results.md").read_text())
    print(f"outputs in {out.absolute()}: results.json results.md loss.png balance.png affinity.png runs/")


if __name__ == "__main__":
    app.run(main)
