"""What checkpointing costs the training loop, per save mode, in one run.

    python -m atoll.experiments.bench.checkpoint --config=atoll/configs/lm.py:small --save_every=10

Runs the same LM train loop (atoll's jitted step, buffer donation, one
`block_until_ready` per step as train_lm does on CPU) once per mode: no
checkpointing, then sync, orbax async and lazy saves every `save_every`
steps. For each it prints a JSON line with the per-save stall (seconds the
loop spent inside `save`, which includes waiting for the previous save when
saves come faster than the disk), the loop's throughput, and the throughput
relative to not saving. The last line is the summary:

  {"stall_ratio_async_vs_sync", "stall_ratio_lazy_vs_sync",
   "throughput_ratio_save_every_10" (lazy, atoll's default mode), ..., "device"}

`throughput_ratio_save_every_10` is measured at --save_every (10 unless
changed; the key keeps its name so results compare across runs).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from atoll.core.transformer import count_params
from atoll.experiments.bench.lm_setup import lm_train_setup
from atoll.parallel import checkpoint, runtime

_CONFIG = config_flags.DEFINE_config_file("config", "atoll/configs/lm.py:small", "LM config file[:variant].")
_SAVES = flags.DEFINE_integer("saves", 5, "Saves timed per mode.")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 10, "Steps between saves.")
_DIR = flags.DEFINE_string("dir", None, "Where the checkpoints go (default: a temporary directory, removed after).")

MODES = ("none",) + checkpoint.SAVE_MODES


def state_bytes(state) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))


def run_mode(mode: str, step, state, batches, directory: Path, saves: int, save_every: int):
    """Times `saves * save_every` steps with a save every `save_every` (none for
    mode "none"); returns (row, state). Saves land on steps save_every, 2·save_every, ..."""
    ckpt = None if mode == "none" else checkpoint.Checkpointer(directory / mode, keep=2, mode=mode)
    stalls, t_loop = [], time.perf_counter()
    n = saves * save_every
    for i in range(1, n + 1):
        state, out = step(state, batches[i % len(batches)])
        jax.block_until_ready(out)
        if ckpt is not None:
            ckpt.check()
            if i % save_every == 0:
                stalls.append(ckpt.save(i, state, {"step": i}))
    loop_s = time.perf_counter() - t_loop
    t_drain = time.perf_counter()
    if ckpt is not None:
        ckpt.close()
    row = {"mode": mode, "steps": n, "saves": len(stalls), "loop_s": loop_s, "steps_per_sec": n / loop_s,
           "stall_median_s": statistics.median(stalls) if stalls else 0.0,
           "stall_max_s": max(stalls) if stalls else 0.0, "stalls_s": stalls,
           "drain_after_loop_s": time.perf_counter() - t_drain}
    return row, state


def summary(rows: dict[str, dict], save_every: int) -> dict:
    base = rows["none"]["steps_per_sec"]
    sync = rows["sync"]["stall_median_s"]
    out = {f"throughput_ratio_{m}": rows[m]["steps_per_sec"] / base for m in checkpoint.SAVE_MODES}
    out.update({
        "stall_ratio_async_vs_sync": rows["async"]["stall_median_s"] / sync,
        "stall_ratio_lazy_vs_sync": rows["lazy"]["stall_median_s"] / sync,
        "throughput_ratio_save_every_10": out["throughput_ratio_lazy"],
        "save_every": save_every,
        "device": jax.devices()[0].device_kind,
    })
    return out


def main(argv) -> None:
    del argv
    runtime.apply_xla_defaults()
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    state, step, batches, _ = lm_train_setup(config)
    for i in range(3):  # compile and warm up
        state, out = step(state, batches[i % 2])
    jax.block_until_ready(out)
    common = {"config": config.name, "params": count_params(state["params"]), "state_bytes": state_bytes(state),
              "device": jax.devices()[0].device_kind, "devices": jax.device_count(), "jax": jax.__version__}
    rows = {}
    with tempfile.TemporaryDirectory(dir=_DIR.value) as tmp:
        for mode in MODES:
            rows[mode], state = run_mode(mode, step, state, batches, Path(tmp), _SAVES.value, _SAVE_EVERY.value)
            print(json.dumps({**common, **rows[mode],
                              "throughput_vs_none": rows[mode]["steps_per_sec"] / rows["none"]["steps_per_sec"]}),
                  flush=True)
    print(json.dumps({**common, **summary(rows, _SAVE_EVERY.value)}), flush=True)


if __name__ == "__main__":
    app.run(main)
