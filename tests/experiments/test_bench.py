import json
import os
import re
import subprocess
import sys

from atoll.parallel.runtime import xla_flags_with_defaults


def _one_device_env() -> dict:
    """The suite's environment with one CPU device instead of 8: the benches' contract
    does not depend on the device count, and on 2 cores each fake device costs time."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]),
                JAX_NUM_CPU_DEVICES="1",
                XLA_FLAGS=re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                 os.environ.get("XLA_FLAGS", "")).strip())


def test_lm_step_prints_the_contract_and_the_baseline_ratio():
    env = _one_device_env()
    out = subprocess.run(
        [sys.executable, "-m", "atoll.experiments.bench.lm_step", "--config=atoll/configs/lm.py:tiny",
         "--steps=2", "--warmup=1", "--config.train.batch_size=8", "--config.model.num_layers=1",
         "--config.data.seq_len=32"],
        env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["impl"] for r in rows] == ["plain_flax", "plain_flax_atoll_flags", "atoll"]
    last = rows[-1]
    assert {"config", "step_time_s", "tokens_per_sec", "mfu", "device"} <= set(last)
    assert last["config"] == "lm:tiny" and last["mfu"] is None  # no known peak on CPU
    assert last["step_time_s"] > 0
    assert abs(last["tokens_per_sec"] - 8 * 32 / last["step_time_s"]) < 1e-6 * last["tokens_per_sec"]
    ratio = rows[0]["step_time_s"] / last["step_time_s"]
    assert abs(last["speedup_vs_plain_flax"] - ratio) < 1e-9
    assert "xla_gpu_enable_triton_gemm=false" in last["xla_flags"]
    assert "xla_gpu_enable_triton_gemm" not in rows[0]["xla_flags"]


def test_xla_defaults_never_override_the_user():
    assert xla_flags_with_defaults("", {"a": "1"}) == "--a=1"
    assert xla_flags_with_defaults("--a=0 --b=2", {"a": "1", "c": "3"}) == "--a=0 --b=2 --c=3"


def test_checkpoint_bench_prints_every_mode_and_the_summary(tmp_path):
    env = _one_device_env()
    out = subprocess.run(
        [sys.executable, "-m", "atoll.experiments.bench.checkpoint", "--config=atoll/configs/lm.py:tiny",
         "--saves=2", "--save_every=2", "--config.train.batch_size=8", "--config.model.num_layers=1",
         "--config.data.seq_len=32", f"--dir={tmp_path}"],
        env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r.get("mode") for r in rows[:4]] == ["none", "sync", "async", "lazy"]
    by = {r["mode"]: r for r in rows[:4]}
    assert by["none"]["saves"] == 0 and all(by[m]["saves"] == 2 for m in ("sync", "async", "lazy"))
    assert all(by[m]["steps"] == 4 and len(by[m]["throughput_vs_none_per_round"]) == 2 for m in by)
    assert by["sync"]["throughput_vs_none"] == by["none"]["loop_s"] / by["sync"]["loop_s"]
    last = rows[-1]
    assert {"stall_ratio_async_vs_sync", "stall_ratio_lazy_vs_sync", "throughput_ratio_save_every_10",
            "device"} <= set(last)
    assert last["stall_ratio_lazy_vs_sync"] == by["lazy"]["stall_median_s"] / by["sync"]["stall_median_s"]
    assert last["throughput_ratio_save_every_10"] == by["lazy"]["throughput_vs_none"]
    assert not any(tmp_path.iterdir())  # the checkpoints were removed
