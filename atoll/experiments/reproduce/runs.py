"""What the LM reproductions share: a preset's train config, and training
each named run once (a rerun with the same --out keeps finished runs).

A preset is a dict: variant (lm.py), islands, steps, batch_size, seq_len,
eval_every, eval_batches, warmup_steps, model (overrides of config.model).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

# The low-communication studies' settings. `ci` shrinks lm.py:tiny (D 64, 2
# layers, 0.14M params, seq 64) so that H = 30 gives 120 outer rounds in a CPU
# budget: DiLoCo's gap to DDP closes with the number of outer rounds (20
# rounds of the full tiny model: 19 %; 80 rounds at batch 16: 5.1 %; 120
# rounds at batch 32: 1.6 %), so rounds matter more here than model size.
# `full` is lm.py:small (~25M params, seq 512), a GPU job.
LM_PRESETS = {
    "ci": {"variant": "tiny", "islands": 4, "steps": 3600, "batch_size": 32, "seq_len": 64, "eval_every": 600,
           "eval_batches": 4, "warmup_steps": 100,
           "model": {"d_model": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2, "head_dim": 32,
                     "mlp_dim": 192}},
    "full": {"variant": "small", "islands": 4, "steps": 6000, "batch_size": 64, "seq_len": 512, "eval_every": 500,
             "eval_batches": 8, "warmup_steps": 250, "model": {}},
}


def lm_run_config(preset: dict, outer_overrides: dict):
    """lm.py:<variant> shaped by the preset, with `outer_overrides` on config.outer."""
    from atoll.configs import lm

    c = lm.get_config(preset["variant"])
    c.model.update(**preset["model"])
    c.data.seq_len = preset["seq_len"]
    c.train.update(steps=preset["steps"], batch_size=preset["batch_size"], eval_every=preset["eval_every"],
                   eval_batches=preset["eval_batches"], warmup_steps=preset["warmup_steps"],
                   checkpoint_every=preset["steps"], log_every=max(preset["eval_every"] // 5, 1))
    c.mesh.update(island=preset["islands"], data=-1)
    c.outer.update(**outer_overrides)
    return c


def train_or_reuse(name: str, workdir: Path, config, row_of: Callable[[dict, float], dict],
                   progress: bool = True) -> dict:
    """Trains `config` in `workdir` and returns row_of(summary, wall seconds),
    or returns the row saved there by an earlier invocation that finished.
    An unfinished run resumes from its checkpoint."""
    from atoll.experiments import outputs
    from atoll.experiments.train_lm import train

    row_path = workdir / "reproduce_row.json"
    if row_path.exists():
        row = json.loads(row_path.read_text())
        print(f"== {name}: done earlier, val loss {row['final_val_loss']:.4f}", flush=True)
        return row
    from atoll.configs import lm

    defaults = lm.outer_config()
    print(f"== {name}: {({k: v for k, v in config.outer.items() if v != defaults[k]})}", flush=True)
    t0 = time.perf_counter()
    summary = train(config, workdir, progress=progress).summary
    row = row_of(summary, time.perf_counter() - t0)
    outputs.write_json(row_path, row)
    return row


def save_figure(fig, path: Path) -> Path:
    """Lays out and writes a figure from outputs.subplots (a bare Figure, not
    pyplot's: nothing to close, and the caller's backend is left alone)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
