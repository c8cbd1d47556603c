"""How a run setting is declared: the :class:`Setting` record, the field helper that attaches
one to a dataclass field, and the checks the run's fields use.

``config.RunSettings`` declares each field with :func:`setting`; :func:`declarations` reads them
back, so the command line (flags, ``--help``, the table of docs/cli.md) and the config checks
derive from the one declaration, as ``granet.algorithm`` does for the sparsifier's options.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import numpy as np

# The optimizers step float32 weights with scalars made of lr and weight_decay, and a scalar a
# float32 cannot hold fails the first step; AdamW's first step size is lr / (1 - beta1) = 10 lr.
FLOAT32_MAX = float(np.finfo(np.float32).max)
ADAMW_STEP_FACTOR = 1 / (1 - 0.9)
SEED_RANGE = 2**32  # NumPy's global generator takes seeds in [0, 2**32 - 1]
MAX_WORKERS_PER_CPU = 4


Check = Callable[[str, Any, Any], None]  # (name, value, the settings) -> None or ValueError


@dataclass(frozen=True)
class Setting:
    """One run setting's declaration: its help text, kind for files and flags, and check."""

    name: str
    default: Any
    help: str
    kind: type  # float, int, str or bool: what a config file or a flag gives (of each item: many)
    check: Check  # run after the value's type and its choices are checked
    many: bool = False  # a list of ``kind``
    choices: tuple[str, ...] | None = None
    null: str = "none"  # what ``None`` means, as ``--help`` and docs/cli.md show a None default
    metavar: str | None = None  # the flag's placeholder, where it is not the choices
    nargs: str = "+"  # of a list's flag: "*" where the flag alone gives the empty list


def rule(text: str, ok: Callable[[Any], bool]) -> Check:
    """A check refusing a value for which ``ok`` is false with ``{name} must be {text}``."""

    def check(name: str, value: Any, settings: Any) -> None:
        if not ok(value):
            raise ValueError(f"{name} must be {text}; got {value!r}")

    return check


def anything(name: str, value: Any, settings: Any) -> None:
    """The value's type, checked for every setting, is all there is to check."""


fraction_below_1 = rule("in [0, 1)", lambda v: 0.0 <= v < 1.0)
at_least_1 = rule(">= 1", lambda v: v >= 1)


def below_epochs(name: str, value: Any, settings: Any) -> None:
    """In ``[0, epochs)``: a part of the run (the warmup)."""
    epochs = settings.epochs
    rule(f"in [0, epochs={epochs})", lambda v: 0 <= v < epochs)(name, value, settings)


def worker_count(name: str, value: Any, settings: Any) -> None:
    """In ``[0, MAX_WORKERS_PER_CPU x the CPUs here]``: each data-loading worker is a process
    holding a copy of the data set; past a few per core they only exhaust memory (100,000 of
    them took the machine down)."""
    most = MAX_WORKERS_PER_CPU * (os.cpu_count() or 1)
    text = f"in [0, {most}] ({MAX_WORKERS_PER_CPU} per CPU here)"
    rule(text, lambda v: 0 <= v <= most)(name, value, settings)


def first_step_fits(name: str, value: Any, settings: Any) -> None:
    """Of weight_decay: ``>= 0``, and with the lr (declared before it) every scalar of the
    optimizer's first step fits a float32 (at most :data:`FLOAT32_MAX`): a scalar a float32
    cannot hold fails that step."""
    rule(">= 0", lambda v: v >= 0)(name, value, settings)
    lr, top = settings.lr, f"{FLOAT32_MAX:.4g}"
    if lr > FLOAT32_MAX:
        raise ValueError(f"lr must be at most {top} (a float32 must hold it); got {lr!r}")
    if value > FLOAT32_MAX:
        raise ValueError(f"{name} must be at most {top} (a float32 must hold it); got {value!r}")
    if settings.optimizer == "adamw":
        if lr * ADAMW_STEP_FACTOR > FLOAT32_MAX:
            raise ValueError(
                f"lr must be at most {FLOAT32_MAX / ADAMW_STEP_FACTOR:.4g} with adamw (its first "
                f"step size, lr / (1 - beta1) = 10 x lr, must fit a float32); got {lr!r}"
            )
        if lr * value > FLOAT32_MAX:
            raise ValueError(
                f"lr x {name} must be at most {top} with adamw (a float32 must hold it); "
                f"got {lr!r} x {value!r}"
            )


def setting(default: Any, help: str, check: Check = anything, **kw: Any) -> Any:
    """A :class:`RunSettings` field with its declaration (a list default is copied per config)."""
    metadata = {"help": help, "check": check, **kw}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def declarations(cls: type) -> tuple[Setting, ...]:
    """The :class:`Setting` of each field of ``cls``, its kind read from the annotation."""
    hints = typing.get_type_hints(cls)
    result = []
    for f in fields(cls):
        kind = hints[f.name]
        if typing.get_origin(kind) in (types.UnionType, typing.Union):  # ``X | None``
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        many = typing.get_origin(kind) is list
        if many:
            kind = typing.get_args(kind)[0]
        default = f.default_factory() if f.default is MISSING else f.default
        result.append(Setting(f.name, default, kind=kind, many=many, **f.metadata))
    return tuple(result)
