"""Process start-up: XLA flags atoll sets by default.

Call `apply_xla_defaults()` at the top of an entry point, before JAX touches
a device (XLA reads XLA_FLAGS when the backend starts). A flag the user
already set in XLA_FLAGS wins; ATOLL_XLA_DEFAULTS=0 turns the defaults off.
"""

from __future__ import annotations

import os

# Measured on one H100 (docs/BENCHMARKS.md): cuBLAS beats XLA's Triton GEMM
# emitter on the LM step's bf16 matmuls. CPU builds accept and ignore them.
DEFAULT_XLA_FLAGS = {
    "xla_gpu_enable_triton_gemm": "false",
}


def xla_flags_with_defaults(current: str, defaults: dict[str, str] = DEFAULT_XLA_FLAGS) -> str:
    """`current` XLA_FLAGS plus every default whose flag it does not set."""
    present = {tok.lstrip("-").split("=", 1)[0] for tok in current.split()}
    added = [f"--{k}={v}" for k, v in defaults.items() if k not in present]
    return " ".join([current.strip(), *added]).strip()


def xla_flags_overriding(current: str, overrides: dict[str, str]) -> str:
    """`current` XLA_FLAGS with every flag in `overrides` set to its value there."""
    kept = [tok for tok in current.split() if tok.lstrip("-").split("=", 1)[0] not in overrides]
    return " ".join(kept + [f"--{k}={v}" for k, v in overrides.items()])


def apply_xla_defaults() -> str:
    """Adds atoll's default XLA flags to the environment; returns the result."""
    if os.environ.get("ATOLL_XLA_DEFAULTS", "1") == "0":
        return os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = xla_flags_with_defaults(os.environ.get("XLA_FLAGS", ""))
    return os.environ["XLA_FLAGS"]


def request_host_devices(count: int) -> str:
    """Asks XLA for `count` CPU devices (unless XLA_FLAGS already says how many),
    so a mesh with islands or data axes runs on a CPU-only machine. Accelerator
    platforms are unaffected: the flag only shapes the host platform."""
    if count > 1:
        os.environ["XLA_FLAGS"] = xla_flags_with_defaults(
            os.environ.get("XLA_FLAGS", ""), {"xla_force_host_platform_device_count": str(count)})
    return os.environ.get("XLA_FLAGS", "")
