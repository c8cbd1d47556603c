"""Run configuration: built-in defaults, overridden by a YAML file, overridden by flags.

One dataclass holds every setting of a training run; :func:`resolve_config` merges the three
sources and validates the result in one place, so a bad value from a file or from a flag gets the
same error naming the setting and the allowed values.
"""

from __future__ import annotations

import math
import os
import types
import typing
from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

import granet
from granet import checks, patterns
from granet.algorithm import OPTION, OPTIONS, cli_options
from granet.experiment.datasets import DATASETS
from granet.experiment.loggers import LOGGERS
from granet.experiment.models import MODELS

METHOD_CHOICES = (*granet.METHODS, "dense")
# the settings whose default is each method's own
METHOD_OWN = tuple(o.name for o in OPTIONS if o.method)
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")
AMP_CHOICES = ("none", "bf16", "fp16")
DEFAULT_LR = {"sgd": 0.05, "adamw": 1e-3}
# The optimizers step float32 weights with scalars made of lr and weight_decay, and a scalar a
# float32 cannot hold fails the first step; AdamW's first step size is lr / (1 - beta1) = 10 lr.
FLOAT32_MAX = float(np.finfo(np.float32).max)
ADAMW_STEP_FACTOR = 1 / (1 - 0.9)
SEED_RANGE = 2**32  # NumPy's global generator takes seeds in [0, 2**32 - 1]
MAX_WORKERS_PER_CPU = 4
# ``update_every: null`` means about this many topology updates per run (the paper's CIFAR
# setup has 62 560 steps and updates every 1000: about 60).
AUTO_UPDATES_PER_RUN = 60


@dataclass(frozen=True)
class RunSettings:
    """The settings of a run that are not the sparsifier's options."""

    # what to train
    method: str = "granet"
    model: str = "mlp"
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    val_size: float = 0.1
    train_size: int | None = None  # at most this many training examples; None: all
    augment: bool = False
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float | None = None  # None: 0.05 for sgd, 1e-3 for adamw
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    lr_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    # which tensors stay dense
    exclude: list[str] = field(default_factory=list)
    # where and how (the seed also seeds the sparsifier)
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    workers: int = 0
    # where the run's scalars also go, beside metrics.jsonl (keys of loggers.LOGGERS)
    log: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def effective(self) -> dict[str, Any]:
        """The settings with each method's own defaults written out, so that two configs that
        train the same run compare equal (``null`` vs the default's value; dense ignores them)."""
        values = self.to_dict()
        method = granet.METHODS.get(self.method)
        if method is None:
            values.update(dict.fromkeys(METHOD_OWN))
            return values
        own = method.resolve(sparsity=values["sparsity"], **{k: values[k] for k in METHOD_OWN})
        values.update({k: getattr(own, k) for k in METHOD_OWN})
        return values

    def resolved(self, total_steps: int) -> Config:
        """This config with the run-length-dependent ``null`` values made concrete."""
        every = self.update_every or max(1, round(total_steps / AUTO_UPDATES_PER_RUN))
        return replace(self, update_every=every)

    def sparsifier_options(self) -> dict[str, Any]:
        """The sparsifier's options as this run sets them (unset ones: the method's own)."""
        values = {k: getattr(self, k) for k in SPARSIFIER_KEYS}
        if self.pattern is not None and values["distribution"] == OPTION["distribution"].default:
            del values["distribution"]  # the pattern sets the layers' densities
        return {k: v for k, v in values.items() if v is not None}


# Sparsifier options whose experiment default differs from the library's, with the reason shown
# in ``--help``: the library's ``update_every`` is a step count, a run's defaults to its length.
EXPERIMENT_DEFAULTS: dict[str, tuple[Any, str]] = {
    "update_every": (None, f"about {AUTO_UPDATES_PER_RUN} rounds per run"),
}


def _sparsifier_fields() -> list[tuple[str, Any, Any]]:
    """The config fields of the sparsifier's options, derived from their one declaration."""
    own = {f.name for f in fields(RunSettings)}
    result = []
    for option in cli_options():
        if option.name in own:
            continue
        default = EXPERIMENT_DEFAULTS.get(option.name, (option.default,))[0]
        kind = option.kind | None if default is None else option.kind
        result.append((option.name, kind, field(default=default)))
    return result


Config = make_dataclass(
    "Config",
    _sparsifier_fields(),
    bases=(RunSettings,),
    frozen=True,
    namespace={"__doc__": "Every setting of one training run (see ``granet train --help``)."},
)
Config.__module__ = __name__
SPARSIFIER_KEYS = (
    *(name for name, _, _ in _sparsifier_fields()),
    *(o.name for o in cli_options() if o.name in {f.name for f in fields(RunSettings)}),
)


KEYS = tuple(f.name for f in fields(Config))
_HINTS = typing.get_type_hints(Config)


def _typed(name: str, value: Any) -> Any:
    """``value`` checked against the field's annotation (ints are accepted as floats)."""
    hint = _HINTS[name]
    if typing.get_origin(hint) in (types.UnionType, typing.Union):  # ``X | None``
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    elif value is None:
        raise ValueError(f"{name} must not be null")
    if typing.get_origin(hint) is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list; got {value!r}")
        return [_scalar(name, v, typing.get_args(hint)[0]) for v in value]
    return _scalar(name, value, hint)


def _scalar(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false; got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number; got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number; got {value!r}")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer; got {value!r}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string; got {value!r}")
    return value


def _check_ranges(c: Config) -> None:
    def need(ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"{name} must be {rule}; got {getattr(c, name)!r}")

    for name, registry in (
        ("method", METHOD_CHOICES),
        ("model", MODELS),
        ("dataset", DATASETS),
        ("optimizer", OPTIMIZERS),
        ("schedule", SCHEDULES),
        ("amp", AMP_CHOICES),
    ):
        checks.choice(name, getattr(c, name), dict.fromkeys(registry))
    granet.Algorithm(**c.sparsifier_options())  # the library's own checks of its options
    need(0.0 <= c.val_size < 1.0, "val_size", "in [0, 1)")
    need(c.train_size is None or c.train_size >= 1, "train_size", ">= 1 (or null: all)")
    need(c.epochs >= 1, "epochs", ">= 1")
    need(c.batch_size >= 1, "batch_size", ">= 1")
    need(c.lr is not None and c.lr > 0, "lr", "> 0")
    need(0.0 <= c.momentum < 1.0, "momentum", "in [0, 1)")
    need(c.weight_decay >= 0, "weight_decay", ">= 0")
    _check_float32_step(c)
    need(
        all(0 < m < 1 for m in c.lr_milestones)
        and all(a < b for a, b in zip(c.lr_milestones, c.lr_milestones[1:])),
        "lr_milestones",
        "increasing fractions of training in (0, 1)",
    )
    need(0 <= c.warmup_epochs < c.epochs, "warmup_epochs", f"in [0, epochs={c.epochs})")
    need(0.0 <= c.label_smoothing < 1.0, "label_smoothing", "in [0, 1)")
    # each data-loading worker is a process holding a copy of the data set: past a few per core
    # they only exhaust memory (100,000 of them took the machine down)
    most = MAX_WORKERS_PER_CPU * (os.cpu_count() or 1)
    need(0 <= c.workers <= most, "workers", f"in [0, {most}] ({MAX_WORKERS_PER_CPU} per CPU here)")
    need(0 <= c.seed < SEED_RANGE, "seed", f"in [0, {SEED_RANGE - 1}] (NumPy's seed range)")
    for name in c.log:
        checks.choice("log", name, LOGGERS)


def _check_float32_step(c: Config) -> None:
    """Refuse an lr or weight_decay that would make the optimizer's first step fail: its
    scalars must fit a float32 (at most :data:`FLOAT32_MAX`)."""
    top = f"{FLOAT32_MAX:.4g}"
    if c.lr > FLOAT32_MAX:
        raise ValueError(f"lr must be at most {top} (a float32 must hold it); got {c.lr!r}")
    if c.weight_decay > FLOAT32_MAX:
        raise ValueError(
            f"weight_decay must be at most {top} (a float32 must hold it); got {c.weight_decay!r}"
        )
    if c.optimizer == "adamw":
        if c.lr * ADAMW_STEP_FACTOR > FLOAT32_MAX:
            raise ValueError(
                f"lr must be at most {FLOAT32_MAX / ADAMW_STEP_FACTOR:.4g} with adamw (its first "
                f"step size, lr / (1 - beta1) = 10 x lr, must fit a float32); got {c.lr!r}"
            )
        if c.lr * c.weight_decay > FLOAT32_MAX:
            raise ValueError(
                f"lr x weight_decay must be at most {top} with adamw (a float32 must hold it); "
                f"got {c.lr!r} x {c.weight_decay!r}"
            )


def _typed_values(values: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    if values.get("pattern") is not None:  # YAML reads an unquoted 2:4 as the number 124
        patterns.parse(values["pattern"])
    return {k: _typed(k, v) for k, v in values.items()}


def make_config(values: dict[str, Any]) -> Config:
    """A validated :class:`Config` from a mapping of settings (unknown keys are an error)."""
    typed = _typed_values(values)
    if typed.get("pattern") is not None and typed.get("sparsity") is None:
        typed["sparsity"] = patterns.parse(typed["pattern"]).sparsity
    config = Config(**typed)
    if config.lr is None:
        config = replace(config, lr=DEFAULT_LR.get(config.optimizer))
    _check_ranges(config)
    return config


def read_config_file(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The settings mapping of a YAML config file, with errors that name the file (``what``:
    what it is, as the errors say)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{what} {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"
        ) from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{what} {path} is not valid YAML: {e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{what} {path} must hold a mapping of settings")
    return values


def resolve_config(
    file: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> Config:
    """Defaults, then the YAML ``file``, then ``overrides`` (command-line flags) on top."""
    values: dict[str, Any] = {}
    if file is not None:
        values.update(read_config_file(file))
        try:
            _typed_values(values)
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None
    values.update(overrides or {})
    return make_config(values)


def save_config(config: Config, path: str | Path) -> None:
    """Write ``config`` as YAML that :func:`resolve_config` reads back to the same config
    (atomically, never through a symbolic link)."""
    from granet.experiment.files import write_atomic

    write_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
