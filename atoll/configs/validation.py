"""Config checks that fail with one message naming the field and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A config field with a value atoll cannot run."""


def get(config, dotted: str) -> Any:
    node = config
    for part in dotted.split("."):
        if part not in node:
            raise ConfigError(f"config.{dotted} is missing")
        node = node[part]
    return node


def choice(config, dotted: str, allowed: Iterable[Any]) -> None:
    allowed = list(allowed)
    value = get(config, dotted)
    if value not in allowed:
        raise ConfigError(f"config.{dotted} = {value!r} is not allowed; choose one of {allowed}")


def positive(config, *dotted: str) -> None:
    for name in dotted:
        value = get(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"config.{name} = {value!r} must be a positive number")


def non_negative(config, *dotted: str) -> None:
    for name in dotted:
        value = get(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"config.{name} = {value!r} must be >= 0")


def in_range(config, dotted: str, low: float, high: float) -> None:
    value = get(config, dotted)
    if not (isinstance(value, (int, float)) and low <= value <= high):
        raise ConfigError(f"config.{dotted} = {value!r} must lie in [{low}, {high}]")


def divides(config, divisor_field: str, dividend_field: str, why: str = "") -> None:
    d, n = get(config, divisor_field), get(config, dividend_field)
    if d <= 0 or n % d:
        raise ConfigError(
            f"config.{divisor_field} = {d} must divide config.{dividend_field} = {n}" + (f" ({why})" if why else "")
        )
