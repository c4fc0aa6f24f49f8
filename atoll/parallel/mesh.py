"""Device meshes built from config axes.

Every atoll mesh has the same axis names, in this order (outermost first):
island, data, fsdp, expert, context, tensor. Axes a run does not use have size
1, so sharding rules and collectives can always name them. `tensor` is
innermost so that its devices are the closest ones (NVLink on one host).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np

AXES = ("island", "data", "fsdp", "expert", "context", "tensor")


class MeshError(ValueError):
    """A mesh shape that cannot be built on the available devices."""


def resolve_axis_sizes(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fills in the one axis given as -1 and checks that the product is `num_devices`."""
    unknown = sorted(set(sizes) - set(AXES))
    if unknown:
        raise MeshError(f"unknown mesh axes {unknown}; atoll's axes are {list(AXES)}")
    resolved = {a: int(sizes.get(a, 1)) for a in AXES}
    bad = {a: s for a, s in resolved.items() if s == 0 or s < -1}
    if bad:
        raise MeshError(f"mesh axis sizes must be positive (or -1 for 'the rest'): {bad}")
    free = [a for a, s in resolved.items() if s == -1]
    if len(free) > 1:
        raise MeshError(f"only one mesh axis may be -1; got {free}")
    fixed = math.prod(s for s in resolved.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise MeshError(
                f"mesh {_describe(resolved)} cannot fill {num_devices} devices: the fixed "
                f"axes multiply to {fixed}, which does not divide {num_devices}"
            )
        resolved[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(
            f"mesh {_describe(resolved)} needs {fixed} devices but {num_devices} are "
            f"available; choose axis sizes whose product is {num_devices} (or set one "
            "axis to -1 to take the rest)"
        )
    return resolved


def make_mesh(
    sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all) with atoll's axis names and Auto axis types."""
    devices = list(jax.devices() if devices is None else devices)
    resolved = resolve_axis_sizes(sizes, len(devices))
    shape = tuple(resolved[a] for a in AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(AXES)
    if len(devices) == len(jax.devices()):
        # jax.make_mesh orders devices for the physical topology (ICI/NVLink rings).
        return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
    return jax.sharding.Mesh(np.array(devices).reshape(shape), AXES, axis_types=auto)


def mesh_sizes(mesh: jax.sharding.Mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.devices.shape))


def _describe(sizes: Mapping[str, int]) -> str:
    used = {a: s for a, s in sizes.items() if s != 1} or {"data": 1}
    return "(" + ", ".join(f"{a}={s}" for a, s in used.items()) + ")"
