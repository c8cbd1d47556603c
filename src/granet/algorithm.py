"""The algorithm as a value: every option of a sparsifier, declared once.

:class:`Algorithm` holds what a sparsifier does (sparsity schedule, update cadence, regrowth
decay, layer distribution, initial masks, importance and growth scores); the methods in
``methods.py`` differ only in the defaults they give it. Each field carries its help text and
check in its metadata, so the experiment config, the command line and the docs derive from this
one declaration: an option added here reaches ``granet train`` without editing the CLI.

Options marked ``method=True`` default to ``None``, meaning "the method's own" (see
``Sparsifier.defaults``); :meth:`Sparsifier.resolve` fills them in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from granet import checks, patterns
from granet.comm import AUTO_MAX_FRACTION, COMMUNICATION
from granet.compute import AUTO_MAX_DENSITY, AUTO_MIN_NUMEL, COMPUTE
from granet.criteria import GROWTH, IMPORTANCE
from granet.distributions import DISTRIBUTIONS
from granet.initial import INIT
from granet.pruning import PRUNING


@dataclass(frozen=True)
class Option:
    """One field's declaration: its help text, type for files and flags, and check."""

    name: str
    default: Any
    help: str
    kind: type  # float, int, str or bool: what a config file or a flag gives
    check: Callable[[str, Any], Any]
    choices: tuple[str, ...] | None = None
    method: bool = False  # None means the method's own default
    cli: bool = True  # settable from a config file and a flag (callables are not)
    # False: how the step is computed, not what; a saved state with another value still loads
    affects_result: bool = True


def _option(
    default: Any, help: str, kind: type, check: Callable[[str, Any], Any], **kw: Any
) -> Any:
    return field(default=default, metadata={"help": help, "kind": kind, "check": check, **kw})


def _fraction(lo_open: bool = False, hi_open: bool = False) -> Callable[[str, Any], float]:
    rule = f"in {'(' if lo_open else '['}0, 1{')' if hi_open else ']'}"

    def check(name: str, value: Any) -> float:
        return checks.number(
            name,
            value,
            lambda v: (v > 0 if lo_open else v >= 0) and (v < 1 if hi_open else v <= 1),
            rule,
        )

    return check


def _window_point(name: str, value: Any) -> float | int:
    """A float fraction of total_steps in [0, 1], or an int step >= 0."""
    if isinstance(value, float):
        return checks.number(
            name, value, lambda v: 0 <= v <= 1, "in [0, 1] as a fraction of total_steps"
        )
    if isinstance(value, int) and not isinstance(value, bool):
        return checks.integer(name, value, 0)
    raise ValueError(
        f"{name} must be a float fraction of total_steps or an int step; got {value!r}"
    )


def _one_of(registry: dict[str, Any]) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        checks.choice(name, value, registry)
        return value

    return check


def _registered(registry: dict[str, Any]) -> Callable[[str, Any], Any]:
    return lambda name, value: checks.name_or_callable(name, value, registry)


def _callable(name: str, value: Any) -> Any:
    if not callable(value):
        raise ValueError(f"{name} must be a callable fn(step) -> float; got {value!r}")
    return value


def _optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda name, value: None if value is None else check(name, value)


@dataclass(frozen=True)
class Algorithm:
    """What a sparsifier does. Floats for ``prune_start``/``prune_end`` are fractions of
    ``total_steps``, ints are steps."""

    sparsity: float = _option(
        0.9, "final fraction of zeros in the sparse layers", float, _fraction(hi_open=True)
    )
    init_sparsity: float | None = _option(
        None,
        "sparsity at the start (0: a dense start)",
        float,
        _optional(_fraction(hi_open=True)),
        method=True,
    )
    total_steps: int | None = _option(
        None,
        "optimizer steps in the whole run",
        int,
        _optional(lambda n, v: checks.integer(n, v, 1)),
        cli=False,
    )
    prune_start: float | int = _option(
        0.0, "when gradual pruning starts, as a fraction of training", float, _window_point
    )
    prune_end: float | int = _option(
        0.5,
        "when gradual pruning reaches the final sparsity, as a fraction of training",
        float,
        _window_point,
    )
    update_every: int = _option(
        1000,
        "optimizer steps between topology rounds",
        int,
        lambda n, v: checks.integer(n, v, 1),
    )
    regrow_fraction: float | None = _option(
        None,
        "initial fraction of each layer's active weights dropped and regrown per round, "
        "cosine-decayed to 0.005",
        float,
        _optional(_fraction()),
        method=True,
    )
    distribution: str = _option(
        "erk",
        "initial layer-wise densities",
        str,
        _one_of(DISTRIBUTIONS),
        choices=tuple(DISTRIBUTIONS),
    )
    pattern: str | None = _option(
        None,
        'N:M sparsity ("2:4", "4:8", any "N:M"): at most N active weights in every group of M '
        "consecutive ones along each layer's input dimension, from the start (static, RigL, "
        "SET, SNFS) or at the end of the gradual phase (GraNet, GMP); sets sparsity to 1 - N/M "
        "and replaces the distribution (docs/design.md); none: unstructured",
        str,
        patterns.check,
    )
    pruning: str = _option(
        "global",
        "gradual pruning: one global threshold, or every layer to the target sparsity of its "
        "own size",
        str,
        _one_of(PRUNING),
        choices=tuple(PRUNING),
    )
    importance: str | Callable[..., Any] = _option(
        "magnitude",
        "score of active weights: the lowest are pruned and dropped; from Python also any "
        "callable (docs/extending.md)",
        str,
        _registered(IMPORTANCE),
        choices=tuple(IMPORTANCE),
    )
    growth: str | Callable[..., Any] | None = _option(
        None,
        "score of inactive positions: the highest regrow (gradient magnitude, gradient "
        "momentum, random); from Python also any callable (docs/extending.md)",
        str,
        _optional(_registered(GROWTH)),
        choices=tuple(GROWTH),
        method=True,
    )
    sparsity_schedule: Callable[[int], float] | None = _option(
        None,
        "fn(step) -> target sparsity, in place of the cubic schedule",
        object,
        _optional(_callable),
        cli=False,
    )
    regrow_schedule: Callable[[int], float] | None = _option(
        None,
        "fn(step) -> drop-and-regrow fraction, in place of the cosine decay",
        object,
        _optional(_callable),
        cli=False,
    )
    init: str = _option(
        "random",
        "initial masks: random positions at the distribution's densities, the largest "
        "weights (magnitude), the weights' own zeros (existing), or in each output row the "
        "largest magnitude times input activation norm (wanda; from Python, with calibration=)",
        str,
        _one_of(INIT),
        choices=tuple(INIT),
    )
    scale_init: bool = _option(
        False,
        "scale each sparse layer's initial weights by sqrt(1 / density), for the sparse fan-in",
        bool,
        checks.boolean,
    )
    seed: int = _option(
        0, "seeds the sparsifier's own generators", int, lambda n, v: checks.integer(n, v)
    )
    compute: str = _option(
        "auto",
        "kernels of the training step: dense on masked weights, sparse (CSR kernels for every "
        "selected nn.Linear on CPU; other layers dense, with a warning), or auto (CSR kernels "
        f"for the CPU nn.Linear layers of at least {AUTO_MIN_NUMEL:,} weights at a density of "
        f"at most {AUTO_MAX_DENSITY:.0%}, decided again after every topology round; dense on "
        "GPUs)",
        str,
        _one_of(COMPUTE),
        choices=tuple(COMPUTE),
        affects_result=False,
    )
    communication: str = _option(
        "auto",
        "gradient exchange under DistributedDataParallel: compact (a communication hook that "
        "all-reduces only the active entries, dense on the steps before topology rounds), auto "
        f"(compact for the DDP buckets where at most {AUTO_MAX_FRACTION:.0%} of the entries are "
        "exchanged), or dense (DDP's own all-reduce); docs/distributed.md",
        str,
        _one_of(COMMUNICATION),
        choices=tuple(COMMUNICATION),
        affects_result=False,
    )

    def __post_init__(self) -> None:
        for option in OPTIONS:
            option.check(option.name, getattr(self, option.name))
        if self.init_sparsity is not None and self.init_sparsity > self.sparsity:
            raise ValueError(
                f"init_sparsity must be in [0, sparsity={self.sparsity}]; got {self.init_sparsity}"
            )
        if self.pattern is not None:
            self._check_pattern(patterns.parse(self.pattern))
        fractions = isinstance(self.prune_start, float) and isinstance(self.prune_end, float)
        if fractions and self.prune_end <= self.prune_start:
            raise ValueError(
                f"prune_end ({self.prune_end}) must come after prune_start ({self.prune_start})"
            )
        if self.total_steps is not None:
            start, end = self.window()
            if end > self.total_steps:
                raise ValueError(
                    f"prune_end ({self.prune_end}) lies beyond total_steps ({self.total_steps})"
                )
            if end <= start and fractions:
                raise ValueError(
                    f"the run has only {self.total_steps} optimizer step(s): prune_start "
                    f"({self.prune_start}) and prune_end ({self.prune_end}) both fall on step "
                    f"{start}, leaving no gradual phase; give it more steps (more epochs or "
                    "smaller batches)"
                )
            if end <= start:
                raise ValueError(
                    f"prune_end ({self.prune_end}) must come after prune_start ({self.prune_start})"
                )

    def _check_pattern(self, pattern: patterns.Pattern) -> None:
        """A pattern fixes every layer's density: a sparsity or distribution that says
        otherwise is a contradiction."""
        if abs(self.sparsity - pattern.sparsity) > 1e-9:
            raise ValueError(
                f"sparsity={self.sparsity:g} contradicts pattern={self.pattern!r}, whose "
                f"sparsity is 1 - {pattern.n}/{pattern.m} = {pattern.sparsity:g}; leave sparsity "
                "out or give that"
            )
        if self.distribution != OPTION["distribution"].default:
            raise ValueError(
                f"distribution={self.distribution!r} does not apply with pattern={self.pattern!r}"
                " (the pattern sets every layer's density); leave distribution out"
            )

    def window(self) -> tuple[int, int]:
        """The gradual phase ``(prune_start, prune_end)`` in optimizer steps."""
        return _steps(self.prune_start, self.total_steps), _steps(self.prune_end, self.total_steps)

    def record(self) -> dict[str, Any]:
        """The settings as plain values (a callable by its qualified name), for checkpoints."""
        return {o.name: _plain(getattr(self, o.name)) for o in OPTIONS}


def _steps(value: float | int, total: int | None) -> int:
    if isinstance(value, float):
        return round(value * total)
    return value


def _plain(value: Any) -> Any:
    if callable(value):
        name = getattr(value, "__qualname__", type(value).__qualname__)
        return f"{getattr(value, '__module__', '?')}.{name}"
    return value


OPTIONS: tuple[Option, ...] = tuple(
    Option(name=f.name, default=f.default, **f.metadata) for f in fields(Algorithm)
)
OPTION: dict[str, Option] = {o.name: o for o in OPTIONS}


def cli_options() -> Iterator[Option]:
    """The options a config file or a command-line flag can set."""
    return (o for o in OPTIONS if o.cli)
