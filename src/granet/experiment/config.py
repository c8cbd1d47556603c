"""Run configuration: built-in defaults, overridden by a YAML file, overridden by flags.

One dataclass holds every setting of a training run: the sparsifier's options, derived from
``granet.Algorithm``, and the run's own (:class:`RunSettings`), each declared once with its help
text, choices and check (``experiment/settings.py``). :func:`resolve_config` merges the three
sources and validates the result in one place, so a bad value from a file or from a flag gets the
same error naming the setting and the allowed values.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

import granet
from granet import checks, patterns
from granet.algorithm import OPTION, OPTIONS, cli_options
from granet.experiment.datasets import DATASETS
from granet.experiment.loggers import LOGGERS
from granet.experiment.models import MODELS
from granet.experiment.settings import (
    MAX_WORKERS_PER_CPU,
    SEED_RANGE,
    Setting,
    at_least_1,
    below_epochs,
    declarations,
    first_step_fits,
    fraction_below_1,
    rule,
    setting,
    worker_count,
)

METHOD_CHOICES = (*granet.METHODS, "dense")
# the settings whose default is each method's own
METHOD_OWN = tuple(o.name for o in OPTIONS if o.method)
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine")
AMP_CHOICES = ("none", "bf16", "fp16")
PARALLEL = ("ddp", "fsdp")
DEFAULT_LR = {"sgd": 0.05, "adamw": 1e-3}
# ``update_every: null`` means about this many topology updates per run (the paper's CIFAR
# setup has 62 560 steps and updates every 1000: about 60).
AUTO_UPDATES_PER_RUN = 60


@dataclass(frozen=True)
class RunSettings:
    """The settings of a run that are not the sparsifier's options, each declared once: its
    default, help text, choices and check; ``granet train``'s flags, their ``--help``, the
    settings table of docs/cli.md and :func:`make_config`'s checks derive from it."""

    # what to train
    method: str = setting(
        "granet", "sparse-training method, or dense (no sparsifier)", choices=METHOD_CHOICES
    )
    model: str = setting("mlp", "architecture (resnet50: the CIFAR stem)", choices=tuple(MODELS))
    dataset: str = setting(
        "fashion-mnist", "data set (imagenet needs torchvision)", choices=tuple(DATASETS)
    )
    data_root: str | None = setting(
        None,
        "looked at first for the data, and where a download goes (then $GRANET_DATA, the user "
        "cache, /usr/share/datasets)",
        metavar="DIR",
    )
    val_size: float = setting(
        0.1,
        "fraction of the training set held out for validation; 0: none, train on the whole "
        "training set and test the last epoch (the papers' protocol)",
        fraction_below_1,
    )
    train_size: int | None = setting(
        None,
        "train on at most N examples of the training split (after the validation hold-out), "
        "drawn with the seed: quick runs and studies on a CPU",
        rule(">= 1 (or null: all)", lambda v: v is None or v >= 1),
        null="all",
        metavar="N",
    )
    augment: bool = setting(
        False,
        "random crops and horizontal flips of the training images (ImageNet: random resized crops)",
    )
    # optimisation
    epochs: int = setting(10, "training epochs", at_least_1)
    batch_size: int = setting(
        128, "the global batch: under torchrun, split among the processes", at_least_1
    )
    optimizer: str = setting("sgd", "sgd (Nesterov momentum) or adamw", choices=OPTIMIZERS)
    lr: float | None = setting(
        None,
        "base learning rate",
        rule("> 0", lambda v: v is not None and v > 0),
        null=", ".join(f"{lr:g} for {name}" for name, lr in DEFAULT_LR.items()),
    )
    momentum: float = setting(0.9, "SGD momentum", fraction_below_1)
    weight_decay: float = setting(
        5e-4, "weight decay of the optimizer (decoupled in adamw)", first_step_fits
    )
    schedule: str = setting(
        "step",
        "LR schedule: step (x0.1 at each of --lr-milestones) or cosine (cosine decay to 0)",
        choices=SCHEDULES,
    )
    lr_milestones: list[float] = setting(
        [0.5, 0.75],
        "the step schedule's milestones as fractions of training (the paper's epochs 80 and 120 "
        "of 160)",
        rule(
            "increasing fractions of training in (0, 1)",
            lambda ms: all(0 < m < 1 for m in ms) and all(a < b for a, b in zip(ms, ms[1:])),
        ),
        metavar="FRACTION",
    )
    warmup_epochs: float = setting(0.0, "linear warmup to the base learning rate", below_epochs)
    label_smoothing: float = setting(0.0, "of the cross-entropy loss", fraction_below_1)
    # which tensors stay dense
    exclude: list[str] = setting(
        [],
        "parameter-name patterns kept dense, e.g. 'fc4.weight' or 'conv1.*'; one that matches "
        "no parameter of the model is named in a warning",
        metavar="PATTERN",
        nargs="*",
    )
    # where and how (the seed also seeds the sparsifier)
    seed: int = setting(
        0,
        "seeds the model's initialisation, the masks, the validation split and the data order",
        rule(f"in [0, {SEED_RANGE - 1}] (NumPy's seed range)", lambda v: 0 <= v < SEED_RANGE),
    )
    device: str = setting("auto", "auto (CUDA when available), cpu, cuda, cuda:N")
    parallel: str = setting(
        "ddp",
        "how torchrun's processes share the model: ddp (a whole copy on each, gradients "
        "all-reduced) or fsdp (each top-level block's weights, gradients, optimizer state and "
        "masks sharded by FSDP2's fully_shard; see docs/distributed.md)",
        choices=PARALLEL,
    )
    amp: str = setting(
        "none",
        "mixed precision via torch.autocast: bf16, or fp16 with a gradient scaler on CUDA",
        choices=AMP_CHOICES,
    )
    workers: int = setting(
        0, f"data-loading processes (at most {MAX_WORKERS_PER_CPU} per CPU)", worker_count
    )
    log: list[str] = setting(
        [],
        "also log every epoch's metrics record and every topology round's statistics (sparsity, "
        "target, ITOP rate, pruned/dropped/regrown counts, per-layer density), on the axis of "
        "optimizer steps: tensorboard (RUN_DIR/tensorboard, needs granet[tensorboard]); "
        "metrics.jsonl stays the source of truth, and a resumed run's logger drops what an "
        "interrupted process logged past its checkpoint",
        choices=tuple(LOGGERS),
    )

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


SETTINGS: tuple[Setting, ...] = declarations(RunSettings)


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
    """The run settings' declared choices, the library's checks of its options, then each run
    setting's declared check (in the order of the fields: a check may read those before it)."""
    for declared in SETTINGS:
        if declared.choices is not None:
            value = getattr(c, declared.name)
            for item in value if declared.many else (value,):
                checks.choice(declared.name, item, dict.fromkeys(declared.choices))
    granet.Algorithm(**c.sparsifier_options())
    for declared in SETTINGS:
        declared.check(declared.name, getattr(c, declared.name), c)


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
