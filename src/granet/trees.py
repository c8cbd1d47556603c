"""One walk over nested states: dicts, lists and tuples down to their leaves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def tree_map_with_path(fn: Callable[[str, Any], Any], value: Any, path: str = "") -> Any:
    """``value`` with ``fn(path, leaf)`` applied to each leaf below its dicts, lists and tuples
    (rebuilt as the same types); a leaf's path joins its keys and indices with ``/``
    (``"masks/fc.weight"``, ``"scores/growth/buffers/0"``)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return fn(path, value)
    mapped = ((k, tree_map_with_path(fn, v, f"{path}/{k}" if path else str(k))) for k, v in items)
    return dict(mapped) if isinstance(value, dict) else type(value)(v for _, v in mapped)


def tree_map(fn: Callable[[Any], Any], value: Any) -> Any:
    """``value`` with ``fn`` applied to each leaf below its dicts, lists and tuples (rebuilt as
    the same types)."""
    return tree_map_with_path(lambda _, leaf: fn(leaf), value)
