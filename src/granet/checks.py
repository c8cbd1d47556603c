"""Argument checks shared by the library and the command line, each message written once."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def choice(name: str, value: Any, registry: Mapping[str, T]) -> T:
    """The registry entry called ``value``; a ValueError naming ``name`` and the choices if none."""
    if isinstance(value, str) and value in registry:
        return registry[value]
    raise ValueError(f"{name} must be one of {', '.join(registry)}; got {value!r}")


def name_or_callable(name: str, value: Any, registry: Mapping[str, Any]) -> Any:
    """A registered name (checked against ``registry``) or any callable, returned as given."""
    if callable(value) and not isinstance(value, str):
        return value
    choice(name, value, registry)
    return value


def integer(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``, else a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


def number(
    name: str, value: Any, ok: Callable[[float], bool] = math.isfinite, rule: str = ""
) -> float:
    """``value`` as a float if it is a real number (not a bool) with ``ok(value)``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number{' ' + rule if rule else ''}; got {value!r}")
    if not ok(value):
        raise ValueError(f"{name} must be {rule or 'finite'}; got {value!r}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {value!r}")
    return value
