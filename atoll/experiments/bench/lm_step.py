"""Times atoll's LM train step and, in the same run, a plain-Flax LM of the
same shape; prints JSON lines, the last one atoll's:

  {"config", "step_time_s", "tokens_per_sec", "mfu", "device", ...}

    python -m atoll.experiments.bench.lm_step --config=atoll/configs/lm.py:gpu_350m

With --impl=both (default) the baseline is timed twice: in a subprocess with
JAX's stock XLA flags (what a plain script gets: `plain_flax`), and in this
process with atoll's default XLA flags (`plain_flax_atoll_flags`), so the
gain from atoll's model code and from its flags can be told apart.

Steps are timed after compilation and warm-up, each with block_until_ready;
the median is reported. MFU = model FLOPs/s over the device's dense bf16 peak
(None where no peak is known, e.g. CPU); FLOPs are counted by
atoll.core.flops (honest: causal attention counted at half, the input
embedding gather not counted). `mfu_baseline_convention` uses the counting of
shared/research/h100_baseline.md (6·N_all + 12·Y·D·T) for comparison.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from atoll.configs import lm as lm_config
from atoll.core import flops
from atoll.core.transformer import TransformerConfig, count_params
from atoll.experiments.bench.lm_setup import lm_train_setup, random_batches
from atoll.experiments.bench.plain_lm import make_plain_step
from atoll.parallel import runtime

_CONFIG = config_flags.DEFINE_config_file("config", "atoll/configs/lm.py:tiny", "LM config file[:variant].")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_IMPL = flags.DEFINE_enum("impl", "both", ["both", "atoll", "plain"], "What to time.")
_XLA_DEFAULTS = flags.DEFINE_bool("xla_defaults", True, "Apply atoll's default XLA flags (parallel/runtime.py).")
_LABEL = flags.DEFINE_string("label", "", "Free-form tag copied into every JSON line (e.g. the XLA flags).")


def time_steps(step, state, batches, warmup: int, steps: int) -> tuple[list[float], object]:
    """Median-able per-step wall times; `step` returns (state, metric)."""
    for i in range(warmup):
        state, out = step(state, batches[i % len(batches)])
    jax.block_until_ready(out)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, out = step(state, batches[i % len(batches)])
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return times, state


def _row_factory(config):
    c, t = TransformerConfig.from_dict(config.model), config.train
    seq_len, batch = config.data.seq_len, t.batch_size
    device = jax.devices()[0].device_kind
    peak = flops.device_peak_flops(device) if jax.default_backend() == "gpu" else None
    fpt = flops.train_flops_per_token(c, seq_len)
    fpt_base = flops.baseline_convention_flops_per_token(c, seq_len)
    tokens = batch * seq_len

    def row(name: str, times: list[float], compile_s: float) -> dict:
        dt = statistics.median(times)
        return {
            "config": config.name, "impl": name, "step_time_s": dt, "tokens_per_sec": tokens / dt,
            "mfu": fpt * tokens / dt / peak if peak else None,
            "mfu_baseline_convention": fpt_base * tokens / dt / peak if peak else None,
            "model_tflops_per_sec": fpt * tokens / dt / 1e12, "device": device,
            "devices": jax.device_count(), "batch": batch, "seq_len": seq_len,
            "params": flops.total_params(c), "flops_per_token": fpt, "jax": jax.__version__,
            "compile_s": compile_s, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        }

    return row


def _compile_and_time(step, state, batches, warmup: int, steps: int):
    t0 = time.perf_counter()
    state, out = step(state, batches[0])
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - t0
    times, state = time_steps(step, state, batches, warmup, steps)
    return times, compile_s


def measure_plain(config, steps: int, warmup: int, name: str = "plain_flax") -> dict:
    """The plain-Flax baseline, on one device as a plain script would run."""
    lm_config.validate(config)
    c = TransformerConfig.from_dict(config.model)
    state, step = make_plain_step(c, config.data.seq_len, lr=config.train.lr)
    batches = random_batches(2, config.train.batch_size, config.data.seq_len, c.vocab_size)
    times, compile_s = _compile_and_time(step, state, batches, warmup, steps)
    return _row_factory(config)(name, times, compile_s)


def measure_atoll(config, steps: int, warmup: int) -> dict:
    """atoll's train step, built exactly as train_lm builds it."""
    state, step, batches, c = lm_train_setup(config)
    if count_params(state["params"]) != flops.total_params(c):
        raise AssertionError("atoll.core.flops disagrees with the model's parameter count")
    times, compile_s = _compile_and_time(step, state, batches, warmup, steps)
    return _row_factory(config)("atoll", times, compile_s)


def _plain_in_subprocess(stock_xla_flags: str) -> dict:
    """Re-runs this benchmark as --impl=plain with JAX's stock XLA flags."""
    args = [a for a in sys.argv[1:] if not a.startswith(("--impl", "--xla_defaults", "--noxla_defaults"))]
    env = dict(os.environ, XLA_FLAGS=stock_xla_flags, ATOLL_XLA_DEFAULTS="0")
    out = subprocess.run(
        [sys.executable, "-m", "atoll.experiments.bench.lm_step", *args, "--impl=plain", "--noxla_defaults"],
        env=env, capture_output=True, text=True, check=False,
    )
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not rows:
        raise RuntimeError(f"plain-Flax baseline subprocess failed:\n{out.stderr[-3000:]}")
    rows[-1].pop("label", None)
    return rows[-1]


def main(argv) -> None:
    del argv
    stock_flags = os.environ.get("XLA_FLAGS", "")
    if _XLA_DEFAULTS.value:
        runtime.apply_xla_defaults()
    config, steps, warmup = _CONFIG.value, _STEPS.value, _WARMUP.value
    rows = []
    if _IMPL.value == "both":
        rows.append(_plain_in_subprocess(stock_flags))
        if os.environ.get("XLA_FLAGS", "") != stock_flags:
            rows.append(measure_plain(config, steps, warmup, name="plain_flax_atoll_flags"))
    if _IMPL.value == "plain":
        rows.append(measure_plain(config, steps, warmup))
    else:
        atoll_row = measure_atoll(config, steps, warmup)
        for r in rows:
            atoll_row[f"speedup_vs_{r['impl']}"] = r["step_time_s"] / atoll_row["step_time_s"]
        rows.append(atoll_row)
    for r in rows:
        print(json.dumps({"label": _LABEL.value, **r} if _LABEL.value else r), flush=True)


if __name__ == "__main__":
    app.run(main)
