"""Run configuration: built-in defaults, overridden by a YAML file, overridden by flags.

One dataclass holds every setting of a training run; :func:`resolve_config` merges the three
sources and validates the result in one place, so a bad value from a file or from a flag gets the
same error naming the setting and the allowed values.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

import granet
from granet.algorithm import OPTIONS
from granet.criteria import GROWTH
from granet.experiment.data import DATASETS
from granet.experiment.models import MODELS
from granet.sparsifier import PRUNING

METHOD_CHOICES = (*granet.METHODS, "dense")
# the settings whose default is each method's own
METHOD_OWN = tuple(o.name for o in OPTIONS if o.method)
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")
AMP_CHOICES = ("none", "bf16", "fp16")
DEFAULT_LR = {"sgd": 0.05, "adamw": 1e-3}
# ``update_every: null`` means about this many topology updates per run (the paper's CIFAR
# setup has 62 560 steps and updates every 1000: about 60).
AUTO_UPDATES_PER_RUN = 60


@dataclass(frozen=True)
class Config:
    """Every setting of one training run (see ``granet train --help`` for each one)."""

    # what to train
    method: str = "granet"
    sparsity: float = 0.9
    init_sparsity: float | None = None  # None: the method's own (GraNet 0.5, GMP 0, others s_f)
    model: str = "mlp"
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    val_size: float = 0.1
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
    # sparse training
    update_every: int | None = None  # None: about AUTO_UPDATES_PER_RUN updates per run
    regrow_fraction: float | None = None  # None: the method's own (0.5; 0 for gmp, static)
    prune_start: float = 0.0
    prune_end: float = 0.5
    distribution: str = "erk"
    pruning: str = "global"
    growth: str | None = None  # None: the method's own (gradient; set random, snfs momentum)
    scale_init: bool = False
    exclude: list[str] = field(default_factory=list)
    # where and how
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    workers: int = 0

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
        own = method.resolve(sparsity=self.sparsity, **{k: values[k] for k in METHOD_OWN})
        values.update({k: getattr(own, k) for k in METHOD_OWN})
        return values

    def resolved(self, total_steps: int) -> Config:
        """This config with the run-length-dependent ``null`` values made concrete."""
        every = self.update_every or max(1, round(total_steps / AUTO_UPDATES_PER_RUN))
        return replace(self, update_every=every)


KEYS = tuple(f.name for f in fields(Config))
_HINTS = typing.get_type_hints(Config)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise ValueError(f"{name} must be a number; got {value!r}")
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

    _choice("method", c.method, METHOD_CHOICES)
    _choice("model", c.model, MODELS)
    _choice("dataset", c.dataset, DATASETS)
    _choice("optimizer", c.optimizer, OPTIMIZERS)
    _choice("schedule", c.schedule, SCHEDULES)
    _choice("amp", c.amp, AMP_CHOICES)
    _choice("distribution", c.distribution, tuple(granet.DISTRIBUTIONS))
    _choice("pruning", c.pruning, PRUNING)
    if c.growth is not None:
        _choice("growth", c.growth, GROWTH)
    need(0.0 <= c.sparsity < 1.0, "sparsity", "in [0, 1)")
    if c.init_sparsity is not None:
        need(0.0 <= c.init_sparsity <= c.sparsity, "init_sparsity", f"in [0, {c.sparsity}]")
    need(0.0 <= c.val_size < 1.0, "val_size", "in [0, 1)")
    need(c.epochs >= 1, "epochs", ">= 1")
    need(c.batch_size >= 1, "batch_size", ">= 1")
    need(c.lr is not None and c.lr > 0, "lr", "> 0")
    need(0.0 <= c.momentum < 1.0, "momentum", "in [0, 1)")
    need(c.weight_decay >= 0, "weight_decay", ">= 0")
    need(
        all(0 < m < 1 for m in c.lr_milestones) and c.lr_milestones == sorted(c.lr_milestones),
        "lr_milestones",
        "increasing fractions of training in (0, 1)",
    )
    need(0 <= c.warmup_epochs < c.epochs, "warmup_epochs", f"in [0, epochs={c.epochs})")
    need(0.0 <= c.label_smoothing < 1.0, "label_smoothing", "in [0, 1)")
    if c.update_every is not None:
        need(c.update_every >= 1, "update_every", ">= 1 (or null for automatic)")
    if c.regrow_fraction is not None:
        need(0.0 <= c.regrow_fraction <= 1.0, "regrow_fraction", "in [0, 1]")
    need(0.0 <= c.prune_start < 1.0, "prune_start", "a fraction of training in [0, 1)")
    need(
        c.prune_start < c.prune_end <= 1.0,
        "prune_end",
        f"a fraction of training in (prune_start={c.prune_start}, 1]",
    )
    need(c.workers >= 0, "workers", ">= 0")


def _typed_values(values: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    return {k: _typed(k, v) for k, v in values.items()}


def make_config(values: dict[str, Any]) -> Config:
    """A validated :class:`Config` from a mapping of settings (unknown keys are an error)."""
    config = Config(**_typed_values(values))
    if config.lr is None:
        config = replace(config, lr=DEFAULT_LR.get(config.optimizer))
    _check_ranges(config)
    return config


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings mapping of a YAML config file, with errors that name the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings")
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
    """Write ``config`` as YAML that :func:`resolve_config` reads back to the same config."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
