"""What a run leaves in its workdir: config.json, metrics.jsonl, tb/,
summary.json and plots. Only process 0 writes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def is_writer() -> bool:
    return jax.process_index() == 0


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors
    scalars to TensorBoard (tb/)."""

    def __init__(self, workdir: Path):
        self.path = workdir / "metrics.jsonl"
        self._tb = None
        self.enabled = is_writer()
        if self.enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tb"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(workdir: Path, after_step: int, drop_at: tuple[str, ...] = ()) -> None:
    """Drops rows logged after `after_step` (a resumed run recomputes them), and
    rows at `after_step` holding any of the `drop_at` fields (ones it recomputes there too)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists() or not is_writer():
        return
    rows = [r for r in read_metrics(workdir)
            if r["step"] < after_step or (r["step"] == after_step and not any(k in r for k in drop_at))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_json(path: Path, obj: Any) -> None:
    if is_writer():
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        tmp.replace(path)


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None,
             **kw: Any) -> tuple[Figure, Any]:
    """(figure, axes) as `plt.subplots` gives them, without pyplot: a bare
    Figure, which `savefig` writes with no backend set, so plotting from a
    notebook leaves its backend (inline display) alone. Nothing to close: it
    goes with its last reference. `kw` goes to Figure.subplots (sharex,
    squeeze, ...)."""
    import matplotlib.figure

    fig = matplotlib.figure.Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kw)


def plot_loss(workdir: Path, *, unit: str, scale: float, bar: float | None, bar_label: str) -> Path | None:
    """Train and validation loss curves (in `unit`, i.e. nats × scale) as loss.png."""
    if not is_writer():
        return None
    rows = read_metrics(workdir)
    train = [(r["step"], r["loss"] * scale) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"] * scale) for r in rows if "val_loss" in r]
    fig, ax = subplots(figsize=(6.4, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5)
    if bar is not None:
        ax.axhline(bar, color="gray", ls="--", lw=1, label=bar_label)
    ax.set_xlabel("step")
    ax.set_ylabel(unit)
    ax.set_title(workdir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = workdir / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def routing_trajectory(rows: list[dict], field: str) -> dict[str, list[tuple[int, float]]]:
    """{"block3": [(step, value), ...], ...} for a train_lm MoE metric (moe/block<i>/<field>)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for k, val in r.items():
            parts = k.split("/")
            if len(parts) == 3 and parts[0] == "moe" and parts[2] == field:
                out.setdefault(parts[1], []).append((r["step"], float(val)))
    return dict(sorted(out.items(), key=lambda kv: int(kv[0].removeprefix("block"))))


def plot_routing(workdir: Path) -> Path | None:
    """The balance trajectory of an MoE run as routing.png: per MoE layer, the
    busiest expert's load over the mean (1 = balanced), the drop rate and the
    router entropy, against the step."""
    if not is_writer():
        return None
    rows = read_metrics(workdir)
    panels = [("max_over_mean_load", "max / mean expert load"), ("drop_rate", "drop rate"),
              ("router_entropy", "router entropy (nats)")]
    series = {field: routing_trajectory(rows, field) for field, _ in panels}
    if not any(series.values()):
        return None
    fig, axes = subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (field, label) in zip(axes, panels):
        for layer, points in series[field].items():
            ax.plot(*zip(*points), lw=1, label=layer)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].axhline(1.0, color="gray", ls="--", lw=1)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{workdir.name}: routing balance per MoE layer")
    out = workdir / "routing.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
