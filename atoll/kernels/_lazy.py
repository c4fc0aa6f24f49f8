"""Deferred loading of the Mosaic GPU kernels: importing Pallas' Mosaic GPU
backend costs ~0.4 s, which every process that imports atoll would pay otherwise."""

from __future__ import annotations

import importlib
from typing import Callable


def module_getattr(package: str, submodule: str, names: tuple[str, ...]) -> Callable[[str], object]:
    """A module-level `__getattr__` for `package` that loads `names` from
    `package.submodule` on first access."""
    def __getattr__(name: str):
        if name in names:
            return getattr(importlib.import_module(f"{package}.{submodule}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def forwarder(module: str, name: str) -> Callable:
    """`module.name`, imported on the first call (its docstring is there)."""
    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"`{module}.{name}`, loaded on the first call."
    return call
