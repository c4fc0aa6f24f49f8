"""Multi-process start-up: `jax.distributed` is the engine, this module only
finds its arguments.

Where they come from, first match wins:
  1. explicit arguments (an entry point's flags);
  2. ATOLL_COORDINATOR / ATOLL_NUM_PROCESSES / ATOLL_PROCESS_ID, which
     `python -m atoll.experiments.launch` sets for each child;
  3. JAX's own variables (JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and
     JAX_PROCESS_ID);
  4. a cluster JAX detects itself (SLURM, Open MPI, Cloud TPU), when
     ATOLL_DISTRIBUTED=auto or the SLURM/OMPI variables say there are several tasks.
With none of these a run stays single-process and nothing is initialized.

On CPU the cross-process collectives go through gloo (set before the backend
starts). The heartbeat timeout bounds how long survivors wait for a process
that died: JAX's coordination service then stops every process with an error.
"""

from __future__ import annotations

import dataclasses
import os

import jax

HEARTBEAT_TIMEOUT_S = 20
INITIALIZATION_TIMEOUT_S = 120
SHUTDOWN_TIMEOUT_S = 30


class DistributedError(RuntimeError):
    """Start-up arguments that cannot form a cluster."""


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """Where this process sits: None fields are left to JAX's cluster detection."""
    coordinator: str | None
    num_processes: int | None
    process_id: int | None

    @property
    def complete(self) -> bool:
        return None not in (self.coordinator, self.num_processes, self.process_id)


def _int_env(env: dict, *names: str) -> int | None:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                raise DistributedError(f"{name}={value!r} is not an integer") from None
    return None


def spec_from_env(env: dict | None = None) -> ProcessSpec | None:
    """The process spec the environment describes, or None for a single process."""
    env = dict(os.environ if env is None else env)
    coordinator = env.get("ATOLL_COORDINATOR") or env.get("JAX_COORDINATOR_ADDRESS")
    num = _int_env(env, "ATOLL_NUM_PROCESSES", "JAX_NUM_PROCESSES")
    pid = _int_env(env, "ATOLL_PROCESS_ID", "JAX_PROCESS_ID")
    if coordinator or num is not None or pid is not None:
        return validate(ProcessSpec(coordinator, num, pid))
    cluster_tasks = _int_env(env, "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
    if env.get("ATOLL_DISTRIBUTED") == "auto" or (cluster_tasks or 1) > 1:
        return ProcessSpec(None, None, None)  # JAX's cluster detection fills it in
    return None


def validate(spec: ProcessSpec) -> ProcessSpec:
    if spec.num_processes is not None and spec.num_processes < 1:
        raise DistributedError(f"the number of processes must be >= 1, got {spec.num_processes}")
    if spec.process_id is not None and spec.num_processes is not None and not (
            0 <= spec.process_id < spec.num_processes):
        raise DistributedError(f"process id {spec.process_id} is outside 0..{spec.num_processes - 1}")
    if spec.coordinator is not None and ":" not in spec.coordinator:
        raise DistributedError(f"coordinator {spec.coordinator!r} must be host:port")
    return spec


def initialize(spec: ProcessSpec | None = None, *, heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> bool:
    """Starts jax.distributed for `spec` (default: from the environment).
    Returns whether this is a multi-process run. Call before JAX uses a device."""
    spec = spec_from_env() if spec is None else validate(spec)
    if spec is None or spec.num_processes == 1:
        return False
    if jax.distributed.is_initialized():
        return True
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] in ("", "cpu"):
        # Cross-process collectives on the host platform need an implementation;
        # harmless where an accelerator takes the collectives instead.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=spec.coordinator, num_processes=spec.num_processes, process_id=spec.process_id,
        initialization_timeout=INITIALIZATION_TIMEOUT_S, heartbeat_timeout_seconds=heartbeat_timeout_s,
        shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S)
    return True


def barrier(name: str) -> None:
    """Every process reaches this point before any goes on (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
