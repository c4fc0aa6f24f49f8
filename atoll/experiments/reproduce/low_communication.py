"""DDP vs the DiLoCo family on M = 4 islands, same tokens, embedded corpus.

    python -m atoll.experiments.reproduce.low_communication --preset=ci --out=runs/lowcomm

Trains the same LM once per method (DDP, DiLoCo H=30 and H=100, Streaming
DiLoCo with FP4 on the wire, NoLoCo, SparseLoCo, CO2), each on the same global
batches, and writes DIR/results.json, DIR/results.md and DIR/loss.png
(validation loss against tokens and against bytes exchanged). The paper row it
stands next to is Streaming DiLoCo's Table 5 at 35M params (C4, M=2):
DP 3.51, DiLoCo H=30 3.54, Streaming FP4 H=30 3.53.

Presets: `ci` is a narrower, shallower lm.py:tiny (D 64, 2 layers, 0.14M
params, seq 64, global batch 32) for 3600 steps: 18 min 45 s for all seven
runs on a 2-core CPU (docs/REPRODUCTIONS.md); `full` is lm.py:small (~25M
params, seq 512) for 6000 steps, a GPU job.
A rerun with the same --out keeps the runs that finished (their rows, wall
times included) and resumes the unfinished ones from their checkpoints;
delete DIR/runs/NAME to run NAME again.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from absl import app, flags

from atoll.experiments.reproduce import cli, runs

# Presets shared with the other island studies (see runs.py for why `ci` is this shape).
# Two layers make Streaming DiLoCo's two fragments one layer each.
PRESETS = runs.LM_PRESETS

# (run name, outer overrides). Streaming uses P = 2 fragments: one layer each
# at `ci` (with the embedding / the head), layers {0, 2, ...} and {1, 3, ...} at `full`.
RUNS = (
    ("ddp", {"method": "ddp"}),
    ("diloco_H30", {"method": "diloco", "H": 30}),
    ("diloco_H100", {"method": "diloco", "H": 100}),
    ("streaming_diloco_fp4_H30", {"method": "streaming_diloco", "H": 30, "fragments": 2, "tau": 1, "alpha": 0.5,
                                  "quantization": "fp4"}),
    ("noloco_H30", {"method": "noloco", "H": 30}),
    ("sparseloco_H30", {"method": "sparseloco", "H": 30}),
    ("co2_H30", {"method": "co2", "H": 30}),
)

PAPER_TABLE5_35M = {"ddp": 3.51, "diloco_H30": 3.54, "streaming_diloco_fp4_H30": 3.53}

_ONLY = flags.DEFINE_list("only", None, "Run only these run names (default: all).")


def result_row(name: str, overrides: dict, summary: dict, wall_s: float) -> dict:
    return {
        "name": name,
        "method": overrides["method"],
        "H": overrides.get("H", 1),
        "quantization": overrides.get("quantization", "fp32") if overrides["method"] != "sparseloco" else "topk+2bit",
        "fragments": overrides.get("fragments", 1),
        "final_val_loss": summary["val_loss"],
        "val_bits_per_byte": summary.get("val_bits_per_byte"),
        "bytes_per_island": summary["bytes_per_island"],
        "bytes_received_per_island": summary["bytes_received_per_island"],
        "ratio_to_ddp": summary["bytes_ratio_to_ddp"],
        "peak_bytes_per_step": summary["peak_bytes_per_step"],
        "tokens": summary["tokens"],
        "wall_s": wall_s,
    }


def checks(rows: list[dict]) -> dict:
    """The issue's acceptance figures, computed from this run."""
    by = {r["name"]: r for r in rows}
    out = {}
    if "ddp" in by and "diloco_H30" in by:
        gap = by["diloco_H30"]["final_val_loss"] / by["ddp"]["final_val_loss"] - 1
        out["diloco_H30_val_loss_gap_vs_ddp"] = gap
        out["diloco_H30_within_3pct"] = bool(gap <= 0.03)
        out["diloco_H30_bytes_ratio_ge_30"] = bool(by["diloco_H30"]["ratio_to_ddp"] >= 30 - 1e-9)
    s = by.get("streaming_diloco_fp4_H30")
    if s:
        out["streaming_fp4_bytes_ratio_ge_200"] = bool(s["ratio_to_ddp"] >= 200)
        if "diloco_H30" in by:
            out["streaming_peak_le_diloco_peak_over_P"] = bool(
                s["peak_bytes_per_step"] <= by["diloco_H30"]["peak_bytes_per_step"] / s["fragments"])
    return out


def _fmt_bytes(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(b) < 1000:
            return f"{b:.3g} {unit}"
        b /= 1000
    return f"{b:.3g} PB"


def results_markdown(rows: list[dict], chk: dict, preset: str) -> str:
    ddp = next((r for r in rows if r["name"] == "ddp"), None)
    lines = [
        f"# Low-communication training, preset `{preset}`",
        "",
        "| run | H | wire | final val loss | vs DDP | paper (35M, Table 5) | paper vs DP | bytes / island | "
        "fewer bytes than DDP | peak bytes / step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        rel = f"{(r['final_val_loss'] / ddp['final_val_loss'] - 1) * 100:+.2f}%" if ddp else "–"
        paper = PAPER_TABLE5_35M.get(r["name"])
        paper_rel = f"{(paper / PAPER_TABLE5_35M['ddp'] - 1) * 100:+.2f}%" if paper else "–"
        lines.append(
            f"| {r['name']} | {r['H']} | {r['quantization']} | {r['final_val_loss']:.4f} | {rel} | "
            f"{paper if paper else '–'} | {paper_rel} | {_fmt_bytes(r['bytes_per_island'])} | "
            f"{r['ratio_to_ddp']:.1f}× | {_fmt_bytes(r['peak_bytes_per_step'])} |")
    lines += ["", "Checks (from this run):", ""]
    lines += [f"- {k}: {v:+.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in chk.items()]
    if ddp and "diloco_H30_val_loss_gap_vs_ddp" in chk:
        gap = chk["diloco_H30_val_loss_gap_vs_ddp"] * 100
        paper_gap = (PAPER_TABLE5_35M["diloco_H30"] / PAPER_TABLE5_35M["ddp"] - 1) * 100
        direction = "worse than" if gap > 0 else "better than"
        lines += ["", f"Direction: DiLoCo H=30 ends {abs(gap):.2f}% {direction} DDP here; the paper's 35M row has "
                      f"it {paper_gap:.2f}% worse than DP (M=2, 700M tokens of C4; ours: M=4, "
                      f"{ddp['tokens'] / 1e6:.1f}M bytes of Python)."]
    return "\n".join(lines) + "\n"


def plot(out: Path, curves: dict[str, list[dict]]) -> Path:
    from atoll.experiments import outputs

    fig, (ax1, ax2) = outputs.subplots(1, 2, figsize=(12, 4.5))
    for name, rows in curves.items():
        pts = [r for r in rows if "val_loss" in r]
        if not pts:
            continue
        ax1.plot([p["tokens"] / 1e6 for p in pts], [p["val_loss"] for p in pts], "o-", label=name, ms=3)
        ax2.plot([max(p["comm_sent_bytes"], 1) for p in pts], [p["val_loss"] for p in pts], "o-", label=name, ms=3)
    ax1.set(xlabel="tokens (M)", ylabel="validation loss (nats)", title="loss vs tokens")
    ax2.set(xlabel="bytes sent per island (log)", ylabel="validation loss (nats)", xscale="log",
            title="loss vs bytes exchanged")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    return runs.save_figure(fig, out / "loss.png")


def reproduce(preset_name: str, out: str | Path, only=None, progress: bool = True) -> dict:
    from atoll.experiments import outputs

    preset = PRESETS[preset_name]
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    for name, overrides in RUNS:
        if only and name not in only:
            continue
        workdir = out / "runs" / name
        row = runs.train_or_reuse(name, workdir, runs.lm_run_config(preset, overrides),
                                  lambda summary, wall_s: result_row(name, overrides, summary, wall_s), progress)
        print(f"   val loss {row['final_val_loss']:.4f}, {row['bytes_per_island']:.3g} bytes/island "
              f"({row['ratio_to_ddp']:.1f}x fewer than DDP), {row['wall_s']:.0f} s", flush=True)
        rows.append(row)
        curves[name] = outputs.read_metrics(workdir)
    chk = checks(rows)
    results = {"preset": preset_name, "setting": dict(preset), "runs": rows, "checks": chk,
               "paper": {"source": "Streaming DiLoCo (arXiv 2501.18512) Table 5, 35M, C4, M=2",
                         "eval_loss": PAPER_TABLE5_35M}}
    outputs.write_json(out / "results.json", results)
    (out / "results.md").write_text(results_markdown(rows, chk, preset_name))
    plot(out, curves)
    return results


def main(argv) -> None:
    del argv
    out = cli.start_training_run(PRESETS[cli.PRESET.value]["islands"])
    if _ONLY.value and (unknown := sorted(set(_ONLY.value) - {name for name, _ in RUNS})):
        print(f"error: --only names unknown runs {unknown}; choose from {[name for name, _ in RUNS]}",
              file=sys.stderr)
        sys.exit(2)
    results = reproduce(cli.PRESET.value, out, only=_ONLY.value, progress=cli.SHOW_PROGRESS.value)
    print((out / "results.md").read_text())
    print(json.dumps(results["checks"], indent=1))
    print(f"outputs in {out.absolute()}: results.json results.md loss.png runs/")


if __name__ == "__main__":
    app.run(main)
