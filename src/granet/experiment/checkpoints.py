"""A run's checkpoints: their paths, their format with a SHA-256 of their contents (checked on
every load), the RNG state a run saves in them to resume to the bit, what its ``best.pt`` and
``last.pt`` hold (written, read back and checked here), and :class:`StartFrom`, a state to start
a run from."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from granet.checksum import state_digest
from granet.experiment.files import check_writable, write_atomic
from granet.shards import distribute_like, gather
from granet.sparsifier import Sparsifier
from granet.trees import tree_map

CHECKPOINT_DIR = "checkpoints"
CHECKPOINTS = ("best", "last")
CHECKPOINT_FORMAT = 3  # 3: the settings and a SHA-256 of the contents


def checkpoint_path(run_dir: str | Path, which: str = "last") -> Path:
    """Path of the ``which`` checkpoint (``"best"`` or ``"last"``) of a run."""
    if which not in CHECKPOINTS:
        raise ValueError(f"which must be one of {', '.join(CHECKPOINTS)}; got {which!r}")
    return Path(run_dir) / CHECKPOINT_DIR / f"{which}.pt"


def _to_cpu(value: Any) -> Any:
    return value.detach().cpu() if torch.is_tensor(value) else value


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """Write ``state`` with its format and checksum, atomically: a kill during the write leaves
    the previous checkpoint intact."""
    path = Path(path)
    check_writable(path)  # before mkdir, which would re-create a deleted run folder
    path.parent.mkdir(parents=True, exist_ok=True)
    body = tree_map(_to_cpu, {k: v for k, v in state.items() if k not in ("format", "sha256")})
    full = {"format": CHECKPOINT_FORMAT, **body}
    full["sha256"] = state_digest(full)
    write_atomic(path, lambda f: torch.save(full, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors on the CPU unless
    ``map_location``), after checking its checksum; errors name the file. Checkpoints of granet
    versions before checksums (format 2 and older) load unchecked; one of format 3 without its
    checksum is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ValueError(f"cannot read checkpoint {path} (corrupt, or not one): {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a granet checkpoint")
    stored = state.pop("sha256", None)
    fmt = state.get("format", 0)  # checkpoints before format 1 had no format
    if stored is None and not (type(fmt) is int and fmt < CHECKPOINT_FORMAT):
        raise ValueError(
            f"checkpoint {path} is corrupt: it has no SHA-256 of its contents, which every "
            f"checkpoint of format {CHECKPOINT_FORMAT} has (a damaged or edited file)"
        )
    if stored is not None and stored != state_digest(state):
        raise ValueError(
            f"checkpoint {path} is corrupt: its contents do not match their SHA-256 (a damaged "
            "or edited file)"
        )
    if map_location not in ("cpu", torch.device("cpu")):
        state = tree_map(lambda v: v.to(map_location) if torch.is_tensor(v) else v, state)
    return state


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every global RNG state a run draws from: Python, NumPy, torch, and the CUDA state of the
    run's own GPU only (asking every GPU would open a CUDA context on each, from each process)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# ------------------------------------------------------------------ a run's best and last
def is_best(
    best: Mapping[str, Any] | None, val_accuracy: float | None, at_target: bool, last: bool
) -> bool:
    """Whether an epoch is the run's best so far, the one ``best.pt`` keeps and the test set is
    evaluated on, once, at the end. Model selection never looks at the test set: the best is
    the epoch of the best validation accuracy (``val_accuracy``) among those at the final
    sparsity (``at_target``; for gradual methods the epochs before pruning ends are denser than
    asked and are not eligible; the ``last`` epoch always is). Without a validation split
    (``val_accuracy`` None) it is the last epoch, as the papers report. ``best`` is the record
    of the best epoch so far, None before the first."""
    if val_accuracy is None:
        return last
    if not (at_target or last):
        return False
    return best is None or val_accuracy > best["val_accuracy"]


def weights_state(
    model: nn.Module,
    sparsifier: Sparsifier | None,
    optimizer: torch.optim.Optimizer | None = None,
    sharded: bool = False,
) -> dict[str, Any]:
    """The model's, the sparsifier's and (if given) the optimizer's states, whole: of a model
    sharded by FSDP2 (``sharded``) gathered from every process's shards, so every process must
    call this then; a checkpoint is the same on any number of processes."""
    state = {
        "model": model.state_dict(),
        "sparsifier": None if sparsifier is None else sparsifier.state_dict(),
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    return gather(state) if sharded else state


def save_best(
    run_dir: Path,
    weights: Mapping[str, Any],
    data_shape: Mapping[str, int],
    best: Mapping[str, Any],
) -> None:
    """Write the run's ``best.pt``: the weights and masks of the best epoch so far
    (:func:`weights_state`), the data shape its model is built for, and ``best`` (that epoch
    and its validation accuracy)."""
    save_checkpoint({**weights, "data_shape": data_shape, **best}, checkpoint_path(run_dir, "best"))


def _load_model(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a whole model state; of a sharded model each process cuts its shards out of it."""
    placed = model.state_dict()
    model.load_state_dict({k: distribute_like(v, placed.get(k, v)) for k, v in state.items()})


def _load_optimizer(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Load a whole optimizer state; each tensor shaped as its parameter is then cut to the
    parameter's shards, as the optimizer makes them for a sharded model."""
    optimizer.load_state_dict(state)
    for p, values in optimizer.state.items():
        for k, v in values.items():
            if torch.is_tensor(v) and v.shape == p.shape:
                values[k] = distribute_like(v, p)


def load_best(run_dir: Path, model: nn.Module, sparsifier: Sparsifier | None) -> dict[str, Any]:
    """Load the run's ``best.pt`` into ``model`` and ``sparsifier``; returns the checkpoint."""
    path = checkpoint_path(run_dir, "best")
    best = load_checkpoint(path)
    try:
        _load_model(model, best["model"])
        if sparsifier is not None:
            sparsifier.load_state_dict(best["sparsifier"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} does not hold a state of this run: {e}") from None
    return best


@dataclass(frozen=True)
class Position:
    """Where a checkpoint of a run (``Trainer.state_dict``) stands, read back and checked:
    epochs, batches of the current epoch and steps done, the epochs done before the run (started
    from a state), its seconds of training, the current epoch's running sums and the best
    epoch's record."""

    epoch: int
    batch: int
    step: int
    first_epoch: int
    train_seconds: float
    sums: dict[str, Any]
    best: dict[str, Any] | None


def read_position(
    state: Mapping[str, Any], sums: Mapping[str, Any], first_epoch: int, source: str | Path
) -> Position:
    """The position of ``state``, a run's checkpoint, checked: its format, a position of no
    negative count, running sums laid out as this run's ``sums``, a best-epoch record as the
    trainer writes it. ``first_epoch`` stands in for checkpoints of granets that did not save
    it; ``source`` names the checkpoint in errors."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{source} has checkpoint format {state.get('format')!r}; this granet reads "
            f"format {CHECKPOINT_FORMAT}"
        )
    try:
        pos = state["position"]
        epoch, batch, step = int(pos["epoch"]), int(pos["batch"]), int(pos["step"])
        if min(epoch, batch, step) < 0:
            raise ValueError(f"its position {dict(pos)} is negative")
        saved, best = state["sums"], state["best"]
        if not _same_layout(saved, sums):
            raise ValueError("its epoch's running sums are not this run's (keys, shapes)")
        if best is not None and not _best_record(best):
            raise ValueError(f"its best-checkpoint record {best!r} is malformed")
        seconds = float(state["train_seconds"])
        first_epoch = int(state.get("first_epoch", first_epoch))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{source} does not hold a state of this run: {e}") from None
    return Position(epoch, batch, step, first_epoch, seconds, saved, best)


def restore(
    state: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sparsifier: Sparsifier | None,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    source: str | Path,
) -> None:
    """Load the model, optimizer, sparsifier, grad-scaler and RNG states of ``state``, a run's
    checkpoint (:func:`read_position` reads where it stands); errors name ``source``."""
    try:
        _load_model(model, state["model"])
        _load_optimizer(optimizer, state["optimizer"])
        if sparsifier is not None:
            sparsifier.load_state_dict(state["sparsifier"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], device)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise ValueError(f"{source} does not hold a state of this run: {e}") from None


def _same_layout(saved: Any, fresh: Mapping[str, Any]) -> bool:
    """Whether ``saved`` has ``fresh``'s keys, each a tensor of the same shape and dtype or a
    value of the same type: a checkpoint's running sums that this run can add to."""
    if not isinstance(saved, dict) or set(saved) != set(fresh):
        return False
    for key, value in fresh.items():
        if torch.is_tensor(value):
            other = saved[key]
            if not torch.is_tensor(other) or (other.shape, other.dtype) != (
                value.shape,
                value.dtype,
            ):
                return False
        elif type(saved[key]) is not type(value):
            return False
    return True


def _best_record(best: Any) -> bool:
    """Whether ``best`` is what the trainer saves of the best epoch."""
    return (
        isinstance(best, dict)
        and set(best) == {"epoch", "val_accuracy"}
        and type(best["epoch"]) is int
        and best["epoch"] >= 1
        and type(best["val_accuracy"]) in (int, float, type(None))  # None: no validation split
    )


@dataclass
class StartFrom:
    """A state to start a run from instead of a freshly initialised model.

    ``model`` is a model state dict (of the config's architecture). ``optimizer`` and
    ``sparsifier`` are state dicts, or None for fresh ones. Without a sparsifier state the
    model is loaded before the sparsifier is built, so that ``init: existing`` takes its zeros
    as the masks (weights pruned one-shot by the caller; ``init: random`` would mask it afresh,
    ``scale_init`` rescale it); with one, the weights and masks are exactly those given.
    ``epoch`` is the number of epochs already trained: the run goes on from epoch
    ``epoch + 1`` at the learning rate of that point of the schedule; a fresh sparsifier then
    schedules over the remaining steps only. ``masks`` (instead of a sparsifier state) are the
    masks to go on with, e.g. pruned or regrown one-shot by the caller: the sparsifier takes
    them at the step of ``epoch`` (:meth:`granet.Sparsifier.set_masks`) and keeps the whole
    run's schedule, as if it had trained from the start.
    """

    model: Mapping[str, torch.Tensor]
    optimizer: Mapping[str, Any] | None = None
    sparsifier: Mapping[str, Any] | None = None
    epoch: int = 0
    masks: Mapping[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.sparsifier is not None and self.masks is not None:
            raise ValueError("StartFrom takes a sparsifier state or masks, not both")

    @classmethod
    def checkpoint(
        cls, path: str | Path, *, optimizer: bool = True, sparsifier: bool = True
    ) -> StartFrom:
        """From a checkpoint taken at the end of an epoch (``Trainer.save`` in an epoch-end
        hook, or a finished run's ``last.pt``): its model, optimizer and sparsifier states
        (each unless turned off) and its epoch."""
        state = load_checkpoint(path)
        position = state.get("position") or {}
        if position.get("batch"):
            raise ValueError(f"{path} was taken in the middle of an epoch: resume that run instead")
        return cls(
            state["model"],
            state.get("optimizer") if optimizer else None,
            state.get("sparsifier") if sparsifier else None,
            int(position.get("epoch", 0)),
        )

    def load_into(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sparsifier: Sparsifier | None,
        step: int = 0,
    ) -> None:
        """Load the optimizer's and the sparsifier's states (or set the masks, at ``step``) once
        the run has built them (the model's, loaded before the sparsifier was built, again
        after the sparsifier's)."""
        if sparsifier is not None and (self.sparsifier is not None or self.masks is not None):
            if self.sparsifier is not None:
                sparsifier.load_state_dict(self.sparsifier)
            else:
                sparsifier.set_masks(dict(self.masks), step=step)
            # building the sparsifier applied its own first masks: the weights again
            model.load_state_dict(self.model)
        if self.optimizer is not None:
            optimizer.load_state_dict(self.optimizer)
