"""Start N local processes of one command, as one jax.distributed cluster.

    python -m atoll.experiments.launch --num_processes=2 -- \\
        python -m atoll.experiments.train_lm --config=atoll/configs/lm.py:tiny --workdir=runs/mp

Each child gets ATOLL_COORDINATOR (loopback, a free port), ATOLL_NUM_PROCESSES
and ATOLL_PROCESS_ID, which `atoll.parallel.distributed.initialize` reads; on
a CPU-only machine `--devices_per_process` host devices each. Their output is
forwarded line by line with a `[pI]` prefix. If any child fails, the others
are stopped (SIGTERM, then SIGKILL after `--grace_s`) and the launcher exits
with that child's status, naming it. On a real cluster, start the same
training command once per host instead (README: multi-host).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from absl import app, flags

from atoll.parallel import runtime

_NUM = flags.DEFINE_integer("num_processes", 2, "How many processes to start.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 0,
                                "CPU host devices per process (0: leave XLA's default); ignored on GPU.")
_GRACE = flags.DEFINE_float("grace_s", 5.0, "After a failure: seconds between SIGTERM and SIGKILL (JAX's "
                             "preemption notifier catches SIGTERM, so SIGKILL usually ends it).")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: a free one).")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: dict, *, process_id: int, num_processes: int, port: int, devices: int) -> dict:
    env = dict(base, ATOLL_COORDINATOR=f"127.0.0.1:{port}", ATOLL_NUM_PROCESSES=str(num_processes),
               ATOLL_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1")
    if devices > 0:
        env["XLA_FLAGS"] = runtime.xla_flags_overriding(
            env.get("XLA_FLAGS", ""), {"xla_force_host_platform_device_count": str(devices)})
        env["JAX_NUM_CPU_DEVICES"] = str(devices)
    return env


def _forward(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(prefix + line)
        out.flush()
    stream.close()


def launch(command: Sequence[str], num_processes: int, *, devices_per_process: int = 0, port: int = 0,
           grace_s: float = 5.0, out=None, poll_s: float = 0.1) -> int:
    """Runs `command` as `num_processes` processes; returns the exit status
    (0 if every child succeeded, else the first failure's)."""
    if num_processes < 1:
        raise ValueError(f"--num_processes must be >= 1, got {num_processes}")
    if not command:
        raise ValueError("no command to launch: put it after `--`")
    out = out or sys.stdout
    port = port or free_port()
    procs, threads = [], []
    for i in range(num_processes):
        env = child_env(os.environ, process_id=i, num_processes=num_processes, port=port,
                        devices=devices_per_process)
        p = subprocess.Popen(list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # its own group: stopping it stops its children too
        t = threading.Thread(target=_forward, args=(p.stdout, f"[p{i}] ", out), daemon=True)
        t.start()
        procs.append(p)
        threads.append(t)

    failed = None
    while failed is None and any(p.poll() is None for p in procs):
        failed = next((i for i, p in enumerate(procs) if p.poll() not in (None, 0)), None)
        time.sleep(poll_s)
    if failed is None:
        failed = next((i for i, p in enumerate(procs) if p.returncode != 0), None)
    if failed is not None:
        _stop(procs, grace_s)
    for t in threads:
        t.join(timeout=5)
    if failed is None:
        return 0
    code = procs[failed].returncode
    how = f"signal {-code}" if code < 0 else f"exit status {code}"
    out.write(f"launch: process {failed} of {num_processes} failed ({how}); stopped the others\n")
    out.flush()
    return code if code > 0 else 128 - code


def _stop(procs, grace_s: float) -> None:
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in alive):
        time.sleep(0.05)
    for p in alive:
        if p.poll() is None:
            _signal_group(p, signal.SIGKILL)
        p.wait()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def main(argv: list[str]) -> None:
    command = argv[1:]
    if not command:
        raise app.UsageError("give the command after `--`, e.g. launch --num_processes=2 -- python -m ...")
    sys.exit(launch(command, _NUM.value, devices_per_process=_DEVICES.value, port=_PORT.value,
                    grace_s=_GRACE.value))


if __name__ == "__main__":
    app.run(main)
