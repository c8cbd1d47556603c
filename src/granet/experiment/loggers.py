"""Experiment loggers: a run's scalars in TensorBoard, beside ``metrics.jsonl``.

``metrics.jsonl`` stays the source of truth (reports and plots read it); a logger is a view for
watching runs. A logger has ``log(scalars, step)`` and ``close()`` and is built from the run
folder; :data:`LOGGERS` maps a name to its class. :class:`RunLoggers` feeds the chosen ones from
what the trainer already has: each epoch's metrics record (:func:`epoch_scalars`) and the
sparsifier's ``stats()`` after a topology round (:func:`round_scalars`), both on the axis of
optimizer steps.

Weights & Biases and MLflow have no logger here: neither can be installed and exercised offline
where granet is developed, and a logger nobody ran is not shipped. Adding one is a class with
``log`` and ``close`` in :data:`LOGGERS`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from granet import checks
from granet.experiment.files import check_writable

__all__ = ["LOGGERS", "Logger", "RunLoggers", "TensorBoardLogger", "epoch_scalars", "round_scalars"]


class Logger(Protocol):
    """Where scalars go: ``log`` a set of them at an optimizer step, ``close`` at the end."""

    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardLogger:
    """TensorBoard event files in ``run_dir/tensorboard`` (``tensorboard --logdir runs``).

    ``resume_step``: a resumed run's first step; TensorBoard then drops what an earlier process
    logged from that step on (it ran past the checkpoint before it stopped).
    """

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ImportError(
                "the tensorboard logger needs the tensorboard package: "
                "pip install 'granet[tensorboard]'"
            ) from e
        self.log_dir = Path(run_dir) / "tensorboard"
        check_writable(self.log_dir)  # its event files are new names, in no linked folder
        self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=resume_step)

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


# name -> class, built as cls(run_dir, resume_step)
LOGGERS: dict[str, Callable[[str | os.PathLike, int | None], Logger]] = {
    "tensorboard": TensorBoardLogger,
}


def _numbers(prefix: str, value: Any) -> dict[str, float]:
    """The finite numbers in ``value`` (nested dicts as ``prefix/key``), booleans left out."""
    if isinstance(value, dict):
        out: dict[str, float] = {}
        for key, item in value.items():
            out.update(_numbers(f"{prefix}/{key}", item))
        return out
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return {prefix: float(value)}
    return {}


def epoch_scalars(record: dict[str, Any]) -> dict[str, float]:
    """An epoch's ``metrics.jsonl`` record as scalars under ``epoch/``: every number in it
    (``epoch/train_loss``, ``epoch/val_accuracy``, ``epoch/lr``, ``epoch/sparsity``,
    ``epoch/itop_rate``, ``epoch/layer_density/<layer>`` ...) but the ``epoch`` and ``step``
    counters; values that are ``None`` (no validation split) are left out."""
    numbers = {k: v for k, v in record.items() if k not in ("epoch", "step")}
    return _numbers("epoch", numbers)


def round_scalars(stats: dict[str, Any]) -> dict[str, float]:
    """``Sparsifier.stats()`` after a topology round as scalars under ``round/``: sparsity,
    target sparsity, ITOP rate, regrow fraction, the round's pruned / dropped / regrown counts
    and each layer's density (``round/density/<layer>``)."""
    keys = ("sparsity", "target_sparsity", "itop_rate", "regrow_fraction")
    return {
        **_numbers("round", {k: stats[k] for k in keys}),
        **_numbers("round", stats["last_round"]),
        **_numbers("round/density", {n: layer["density"] for n, layer in stats["layers"].items()}),
    }


class RunLoggers:
    """The loggers called ``names`` (keys of :data:`LOGGERS`) for the run in ``run_dir``.

    Only the process that writes the run folder (rank 0) should make one. Usable as a context
    manager that closes them.
    """

    def __init__(
        self, names: Sequence[str], run_dir: str | os.PathLike, resume_step: int | None = None
    ) -> None:
        classes = [checks.choice("log", name, LOGGERS) for name in names]
        self.loggers: list[Logger] = [cls(run_dir, resume_step) for cls in classes]

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Log an epoch's metrics record (as written to ``metrics.jsonl``) at its step."""
        self._log(epoch_scalars(record), record["step"])

    def log_round(self, stats: dict[str, Any]) -> None:
        """Log ``Sparsifier.stats()`` taken after a topology round, at its step."""
        self._log(round_scalars(stats), stats["step"])

    def _log(self, scalars: dict[str, float], step: int) -> None:
        for logger in self.loggers:
            logger.log(scalars, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()

    def __enter__(self) -> RunLoggers:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()
