"""Multi-process runs: the launcher, jax.distributed start-up, islands spanning
processes, and what happens when a process dies (real subprocesses on loopback)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from atoll.experiments import launch
from atoll.parallel import checkpoint, distributed, runtime

ROOT = Path(__file__).resolve().parents[2]
TINY_DILOCO = [
    "--config=atoll/configs/lm.py:tiny", "--config.model.d_model=32", "--config.model.num_layers=1",
    "--config.model.num_heads=2", "--config.model.num_kv_heads=2", "--config.model.head_dim=16",
    "--config.model.mlp_dim=64", "--config.data.seq_len=32", "--config.train.batch_size=8",
    "--config.train.warmup_steps=2", "--config.train.log_every=2", "--config.train.eval_batches=1",
    "--config.mesh.island=4", "--config.mesh.data=-1", "--config.outer.method=diloco", "--config.outer.H=4",
]


def _env(devices: int | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    for k in ("ATOLL_COORDINATOR", "ATOLL_NUM_PROCESSES", "ATOLL_PROCESS_ID"):
        env.pop(k, None)
    if devices:
        env["XLA_FLAGS"] = runtime.xla_flags_overriding(env.get("XLA_FLAGS", ""),
                                                        {"xla_force_host_platform_device_count": str(devices)})
        env["JAX_NUM_CPU_DEVICES"] = str(devices)
    return env


def _launch(args: list[str], *, processes: int = 2, devices: int = 2, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "atoll.experiments.launch", f"--num_processes={processes}",
           f"--devices_per_process={devices}", "--grace_s=2", "--", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kw)


def _train_args(workdir: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "atoll.experiments.train_lm", *TINY_DILOCO, f"--config.train.steps={steps}",
            f"--workdir={workdir}", *extra]


def _losses(workdir: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("comm_sent_bytes")) for r in rows]


# ------------------------------------------------------------------ start-up

def test_process_spec_comes_from_atoll_then_jax_variables_else_single_process():
    assert distributed.spec_from_env({}) is None
    s = distributed.spec_from_env({"ATOLL_COORDINATOR": "10.0.0.1:1234", "ATOLL_NUM_PROCESSES": "4",
                                   "ATOLL_PROCESS_ID": "3", "JAX_PROCESS_ID": "0"})
    assert (s.coordinator, s.num_processes, s.process_id) == ("10.0.0.1:1234", 4, 3) and s.complete
    s = distributed.spec_from_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2",
                                   "JAX_PROCESS_ID": "1"})
    assert (s.num_processes, s.process_id) == (2, 1)
    # a SLURM job of several tasks: JAX's own cluster detection fills in everything
    s = distributed.spec_from_env({"SLURM_NTASKS": "8"})
    assert s is not None and not s.complete
    assert distributed.spec_from_env({"SLURM_NTASKS": "1"}) is None
    with pytest.raises(distributed.DistributedError, match="outside 0..1"):
        distributed.spec_from_env({"ATOLL_COORDINATOR": "h:1", "ATOLL_NUM_PROCESSES": "2", "ATOLL_PROCESS_ID": "2"})
    with pytest.raises(distributed.DistributedError, match="not an integer"):
        distributed.spec_from_env({"ATOLL_NUM_PROCESSES": "two"})
    with pytest.raises(distributed.DistributedError, match="host:port"):
        distributed.spec_from_env({"ATOLL_COORDINATOR": "localhost", "ATOLL_NUM_PROCESSES": "2"})


def test_child_env_names_the_process_and_its_devices():
    env = launch.child_env({"XLA_FLAGS": "--foo=1 --xla_force_host_platform_device_count=8"}, process_id=1,
                           num_processes=3, port=4242, devices=2)
    assert env["ATOLL_COORDINATOR"] == "127.0.0.1:4242" and env["ATOLL_PROCESS_ID"] == "1"
    assert env["ATOLL_NUM_PROCESSES"] == "3"
    assert env["XLA_FLAGS"].split() == ["--foo=1", "--xla_force_host_platform_device_count=2"]


def test_launcher_prefixes_output_and_stops_everyone_when_one_fails():
    script = ("import os, sys, time; i = int(os.environ['ATOLL_PROCESS_ID']); print('hello', i, flush=True); "
              "sys.exit(3) if i == 1 else time.sleep(120)")
    t0 = time.monotonic()
    p = _launch([sys.executable, "-c", script], processes=3, devices=0)
    out, _ = p.communicate(timeout=90)
    assert p.returncode == 3, out
    assert time.monotonic() - t0 < 30  # the sleepers were stopped, not waited for
    assert "[p0] hello 0" in out and "[p1] hello 1" in out and "[p2] hello 2" in out
    assert "process 1 of 3 failed (exit status 3)" in out


# ------------------------------------------------------- islands over processes

def test_a_killed_process_stops_the_launch_the_rerun_resumes_and_matches_one_process(tmp_path):
    """4 islands on 2 processes × 2 CPU devices, one process killed mid-run and the launch
    rerun (it resumes from the last complete checkpoint) = the same run straight on
    1 process × 4 devices: the same logged losses, evaluations and bytes, the same params."""
    workdir, ckpts = tmp_path / "two", tmp_path / "two" / "checkpoints"
    args = _train_args(workdir, 48, "--config.train.eval_every=12", "--config.train.checkpoint_every=4",
                       "--noprogress")
    p = _launch(args)
    one_log = open(tmp_path / "one.log", "w+")  # a file, not a pipe: nobody reads it until the end
    one = subprocess.Popen(_train_args(tmp_path / "one", 48, "--config.train.eval_every=12", "--noprogress"),
                           cwd=ROOT, env=_env(devices=4), stdout=one_log, stderr=subprocess.STDOUT)
    try:
        out = _kill_and_rerun(p, args, workdir, one)
    finally:
        if one.poll() is None:
            one.kill()
        one_log.close()
    assert one.returncode == 0, (tmp_path / "one.log").read_text()[-3000:]

    two_rows, one_rows = _losses(workdir), _losses(tmp_path / "one")
    steps = [r[0] for r in two_rows]
    assert steps == sorted(set(steps)) and steps[-1] == 48  # no step logged twice, none lost
    assert steps == [r[0] for r in one_rows] and len(one_rows) >= 6
    for a, b in zip(two_rows, one_rows):
        for x, y in zip(a[1:], b[1:]):
            assert (x is None) == (y is None) and (x is None or x == pytest.approx(y, rel=1e-4)), (a, b)
    # and the same params: islands, inner optimizer and outer state, saved collectively by both processes
    two = checkpoint.read_on_host(ckpts, 48)
    one = checkpoint.read_on_host(tmp_path / "one" / "checkpoints", 48)
    assert jax.tree.structure(two) == jax.tree.structure(one)
    for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # process 0 alone writes: one row per logged step, one summary, and only [p0] reports
    assert "[p0] finished at step 48" in out and "[p1] finished" not in out
    assert json.loads((workdir / "summary.json").read_text())["step"] == 48


def _kill_and_rerun(p: subprocess.Popen, args: list[str], workdir: Path, one: subprocess.Popen) -> str:
    """Kills process 1 of launch `p` once a checkpoint at step >= 8 is complete, checks that the
    launch stops, reruns it (it must resume and finish), waits for `one`; the rerun's output."""
    ckpts = workdir / "checkpoints"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not any(d.name.isdigit() and int(d.name) >= 8
                                                  for d in (ckpts.iterdir() if ckpts.exists() else [])):
        assert p.poll() is None, p.communicate()[0]
        time.sleep(0.2)
    os.kill(_child_pid(workdir, process_id=1), signal.SIGKILL)
    t0 = time.monotonic()
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0
    assert time.monotonic() - t0 < 60
    assert "process 1 of 2 failed (signal 9)" in out
    saved = max(int(d.name) for d in ckpts.iterdir() if d.name.isdigit())  # orbax shows only complete ones
    assert 8 <= saved < 48, out

    # the same command again: resumes from the last complete checkpoint and finishes
    rerun = _launch(args)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out
    assert f"[p0] resuming two from its checkpoint at step {saved}" in out, out
    one.wait(timeout=300)
    return out


def _child_pid(workdir: Path, process_id: int) -> int:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"--workdir={workdir}".encode() in cmd and f"ATOLL_PROCESS_ID={process_id}".encode() in env:
            return int(pid)
    raise AssertionError(f"no process {process_id} running for {workdir}")
