"""A plasticity study's settings: what it computes (:class:`Study`), its variants and cells,
the base run's config and each continuation's. Nothing here trains or writes a file."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from granet import checks
from granet.experiment.config import Config, make_config, read_config_file
from granet.experiment.folder import run_name, settings_of
from granet.pruning import PRUNING


@dataclass(frozen=True)
class Variant:
    """What happens after the one-shot prune: the continuation's method (``static``: masks
    fixed; ``rigl``: drop-and-regrow rounds) and whether connections regrow at once."""

    method: str
    regrow_once: bool
    summary: str


VARIANTS: dict[str, Variant] = {
    "prune": Variant("static", False, "the pruned masks stay fixed"),
    "prune+regrow": Variant(
        "rigl",
        False,
        "GraNet's drop-and-regrow rounds every update_every steps at the pruned sparsity",
    ),
    "prune+regrow-once": Variant(
        "static",
        True,
        "as many connections as pruned regrow at once where the gradient is largest, at zero; "
        "the masks then stay fixed",
    ),
}
CONTINUATIONS = ("schedule", "rewind")
DEFAULT_RATES = (0.2, 0.5, 0.9)
DEFAULT_VARIANTS = ("prune", "prune+regrow")
# The base run's defaults where a study's differ from granet train's: a dense network, a
# convolutional one as in the paper's study (LeNet-5), the papers' protocol (no validation
# split, the last epoch tested), and a training set small enough that the default study (54
# continuations) finishes in well under half an hour on a 2-core CPU.
BASE_DEFAULTS: dict[str, Any] = {
    "method": "dense",
    "model": "lenet5",
    "val_size": 0.0,
    "train_size": 6000,
}


@dataclass(frozen=True)
class Cell:
    """One continuation: pruned after epoch ``prune_epoch`` at ``rate``, then ``variant``."""

    prune_epoch: int
    rate: float
    variant: str

    @property
    def name(self) -> str:
        """The cell's folder name under ``cells/``."""
        return f"e{self.prune_epoch}-r{self.rate:g}-{self.variant}"


def every_tenth(epochs: int, last: int) -> list[int]:
    """The epochs at every 10% of training, within ``[1, last]``."""
    return sorted({e for k in range(1, 10) if 1 <= (e := round(epochs * k / 10)) <= last})


@dataclass(frozen=True)
class Study:
    """The settings of a plasticity study (see the module). ``base`` is the base run's config;
    ``prune_epochs`` are epochs of training done when pruning (default: every 10% of
    training), ``rates`` fractions of the remaining weights, ``pruning`` ``global`` (one
    threshold) or ``uniform`` (each layer by the rate); ``continue_epochs`` is the budget of
    ``continuation="rewind"``."""

    base: Config
    prune_epochs: tuple[int, ...] | None = None
    rates: tuple[float, ...] = DEFAULT_RATES
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    pruning: str = "global"
    continuation: str = "schedule"
    continue_epochs: int | None = None

    def __post_init__(self) -> None:
        checks.choice("pruning", self.pruning, PRUNING)
        checks.choice("continue", self.continuation, dict.fromkeys(CONTINUATIONS))
        rewind = self.continuation == "rewind"
        if rewind:
            if self.continue_epochs is None:
                raise ValueError("continue=rewind needs continue_epochs (--continue-epochs N)")
            checks.integer("continue_epochs", self.continue_epochs, 1)
        elif self.continue_epochs is not None:
            raise ValueError(
                f"continue_epochs is for continue=rewind; continue=schedule trains the rest of "
                f"the schedule (got continue_epochs={self.continue_epochs})"
            )
        epochs = self.base.epochs
        last = epochs if rewind else epochs - 1  # schedule: at least one epoch after pruning
        prune_epochs = self.prune_epochs
        if prune_epochs is None:
            prune_epochs = every_tenth(epochs, last)
            if not prune_epochs:
                raise ValueError(f"epochs={epochs} leaves no epoch to prune after")
        prune_epochs = tuple(prune_epochs)
        ok = all(
            not isinstance(e, bool) and isinstance(e, int) and 1 <= e <= last for e in prune_epochs
        )
        if not prune_epochs or not ok or list(prune_epochs) != sorted(set(prune_epochs)):
            why = "" if rewind else "; continue=schedule trains at least one epoch after pruning"
            raise ValueError(
                f"prune_epochs must be increasing epochs in [1, {last}] (epochs={epochs}{why}); "
                f"got {' '.join(map(str, prune_epochs))}"
            )
        rates = tuple(self.rates)
        for r in rates:
            checks.number("rates", r, lambda v: 0.0 < v < 1.0, "in (0, 1)")
        if not rates or len(set(rates)) != len(rates):
            raise ValueError(f"rates must be distinct fractions in (0, 1); got {list(rates)}")
        variants = tuple(self.variants)
        for v in variants:
            checks.choice("variants", v, VARIANTS)
        if not variants or len(set(variants)) != len(variants):
            raise ValueError(f"variants must name each variant once; got {list(variants)}")
        rates = tuple(float(r) for r in rates)
        if len({f"{r:g}" for r in rates}) != len(rates):
            raise ValueError(f"rates must differ in their first 6 digits; got {list(rates)}")
        for name, value in (
            ("prune_epochs", prune_epochs),
            ("rates", rates),
            ("variants", variants),
        ):
            object.__setattr__(self, name, value)
        for variant in variants:  # the continuations' settings are valid: refused now if not
            continuation_config(self, Cell(prune_epochs[0], rates[0], variant), 0.5, 1)

    @property
    def cells(self) -> list[Cell]:
        """Every pruning epoch x rate x variant, in that order."""
        return [Cell(e, r, v) for e in self.prune_epochs for r in self.rates for v in self.variants]

    def settings(self) -> dict[str, Any]:
        """What identifies the study (``plasticity.json``): where and how fast it runs aside."""
        return {
            "base": settings_of(self.base),
            "prune_epochs": list(self.prune_epochs),
            "rates": list(self.rates),
            "variants": list(self.variants),
            "pruning": self.pruning,
            "continue": self.continuation,
            "continue_epochs": self.continue_epochs,
        }

    def base_label(self) -> str:
        """``dense``, or the base run's method and sparsity (``rigl at sparsity 0.5``)."""
        b = self.base
        return "dense" if b.method == "dense" else f"{b.method} at sparsity {b.sparsity:g}"

    def lr_decays(self) -> list[float]:
        """The epochs (fractional) where the base run's step schedule divides the LR by 10."""
        if self.base.schedule != "step":
            return []
        return [m * self.base.epochs for m in self.base.lr_milestones]


def base_config(file: str | Path | None = None, flags: Mapping[str, Any] | None = None) -> Config:
    """The base run's config: :data:`BASE_DEFAULTS`, then a YAML ``file``, then ``flags``."""
    values = dict(BASE_DEFAULTS)
    if file is not None:
        values.update(read_config_file(file))
    values.update(flags or {})
    try:
        return make_config(values)
    except ValueError as e:
        raise ValueError(f"{file}: {e}" if file is not None else str(e)) from None


def default_out(config: Config, root: str | Path = "runs") -> Path:
    """``runs/plasticity-<dataset>-<model>-<method>[-s<sparsity>]-seed<seed>``: the same
    command finds its study again."""
    return Path(root) / f"plasticity-{run_name(config)}"


def continuation_config(study: Study, cell: Cell, sparsity: float, update_every: int) -> Config:
    """The settings of ``cell``'s continuation: the base run's, with the variant's method at the
    pruned ``sparsity`` and the base run's topology cadence. Its masks are the pruned ones
    (``StartFrom(masks=...)``); ``init`` and ``distribution`` only say how the sparsifier draws
    the masks that these then replace (for ``prune`` on a dense base with ``global`` pruning,
    the very same masks)."""
    base, variant = study.base, VARIANTS[cell.variant]
    regrow = base.regrow_fraction if variant.method == "rigl" else 0.0
    values = {
        **base.to_dict(),
        "method": variant.method,
        "sparsity": sparsity,
        "init_sparsity": sparsity,
        "init": "magnitude",
        "distribution": study.pruning,
        "scale_init": False,
        "regrow_fraction": regrow,
        "update_every": update_every,
    }
    if study.continuation == "rewind":
        values["epochs"] = study.continue_epochs
    return make_config(values)
