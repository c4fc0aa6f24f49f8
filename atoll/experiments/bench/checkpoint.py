"""What checkpointing costs the training loop, per save mode, in one run.

    python -m atoll.experiments.bench.checkpoint --config=atoll/configs/lm.py:small --save_every=10

Runs atoll's LM train loop (jitted step, buffer donation, one
`block_until_ready` per step as train_lm does on CPU) in blocks of
`save_every` steps, one block per mode per round: no checkpointing, sync,
orbax async and lazy saves. In a block the save comes right after its first
step, so the other steps run alongside the save's background work; whatever
of it is still running when the block ends is waited for and counted in the
block's time. The modes take turns (the order rotates every round), so a
machine that speeds up or slows down over the run moves every mode alike.

For each mode it prints a JSON line with the per-save stall (seconds the loop
spent inside `save`), the loop's throughput, the throughput relative to not
saving (all rounds together) and each round's ratio to that round's
no-saving block (their spread is the measurement's noise). The last line is
the summary:

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
_SAVES = flags.DEFINE_integer("saves", 5, "Rounds: saves timed per mode (one block of --save_every steps each).")
_SAVE_EVERY = flags.DEFINE_integer("save_every", 10, "Steps between saves.")
_DIR = flags.DEFINE_string("dir", None, "Where the checkpoints go (default: a temporary directory, removed after).")

MODES = ("none",) + checkpoint.SAVE_MODES


def state_bytes(state) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))


def run_block(step, state, batches, ckpt, save_step: int, length: int):
    """`length` train steps with one save (at `save_step`) after the first;
    returns (seconds, stall, state). The block ends when the save has finished."""
    t0, stall = time.perf_counter(), None
    for i in range(length):
        state, out = step(state, batches[i % len(batches)])
        jax.block_until_ready(out)
        if ckpt is not None:
            ckpt.check()
            if i == 0:
                stall = ckpt.save(save_step, state, {"step": save_step})
    if ckpt is not None:
        ckpt.wait()
    return time.perf_counter() - t0, stall, state


def run_rounds(step, state, batches, directory: Path, rounds: int, save_every: int):
    """Every mode once per round, in an order that rotates; returns ({mode: row}, state)."""
    ckpts = {m: checkpoint.Checkpointer(directory / m, keep=2, mode=m) for m in MODES if m != "none"}
    for ckpt in ckpts.values():  # the first save of each mode sets up orbax; it is not timed
        ckpt.save(0, state, {"step": 0})
        ckpt.wait()
    times = {m: [] for m in MODES}
    stalls = {m: [] for m in MODES}
    for r in range(rounds):
        for mode in MODES[r % len(MODES):] + MODES[:r % len(MODES)]:
            seconds, stall, state = run_block(step, state, batches, ckpts.get(mode), r + 1, save_every)
            times[mode].append(seconds)
            if stall is not None:
                stalls[mode].append(stall)
    for ckpt in ckpts.values():
        ckpt.close()
    return {m: mode_row(m, times[m], stalls[m], times["none"], save_every) for m in MODES}, state


def mode_row(mode: str, times: list[float], stalls: list[float], none_times: list[float], save_every: int) -> dict:
    loop_s = sum(times)
    return {"mode": mode, "steps": save_every * len(times), "saves": len(stalls), "loop_s": loop_s,
            "steps_per_sec": save_every * len(times) / loop_s,
            "throughput_vs_none": sum(none_times) / loop_s,
            "throughput_vs_none_per_round": [n / t for n, t in zip(none_times, times)],
            "stall_median_s": statistics.median(stalls) if stalls else 0.0,
            "stall_max_s": max(stalls) if stalls else 0.0, "stalls_s": stalls}


def summary(rows: dict[str, dict], save_every: int) -> dict:
    sync = rows["sync"]["stall_median_s"]
    out = {f"throughput_ratio_{m}": rows[m]["throughput_vs_none"] for m in checkpoint.SAVE_MODES}
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
    with tempfile.TemporaryDirectory(dir=_DIR.value) as tmp:
        rows, state = run_rounds(step, state, batches, Path(tmp), _SAVES.value, _SAVE_EVERY.value)
    for mode in MODES:
        print(json.dumps({**common, **rows[mode]}), flush=True)
    print(json.dumps({**common, **summary(rows, _SAVE_EVERY.value)}), flush=True)


if __name__ == "__main__":
    app.run(main)
