"""A plasticity study's base run: trained (or resumed) once into ``base/``, keeping at every
pruning epoch its checkpoint and test accuracy ``t_pre`` (a *prune point*) for the cells to
start from."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from granet.experiment.blocks import log, lr_factor
from granet.experiment.checkpoints import checkpoint_path, load_checkpoint
from granet.experiment.datasets import DataBundle
from granet.experiment.files import to_json, write_atomic
from granet.experiment.folder import MARKER_FILE
from granet.experiment.plasticity.folder import BASE_DIR, STOPPED, prune_point
from granet.experiment.plasticity.settings import Study
from granet.experiment.signals import stopped_as
from granet.experiment.train import train
from granet.experiment.trainer import Callbacks, Trainer


class KeepPrunePoints(Callbacks):
    """Keep the base run's checkpoint at each pruning epoch, with its test accuracy."""

    def __init__(self, out: Path, epochs: Sequence[int]) -> None:
        self.out, self.epochs = out, set(epochs)

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if trainer.epoch in self.epochs:
            save_prune_point(trainer, self.out)


def save_prune_point(trainer: Trainer, out: Path) -> None:
    """The trainer's state as ``base/checkpoints/epoch-<e>.pt``, its test accuracy ``t_pre``
    (and loss, learning rate, sparsity) in ``epoch-<e>.json``."""
    epoch = trainer.epoch
    loss, accuracy = trainer.evaluate("test")
    trainer.save(prune_point(out, epoch))
    sp = trainer.sparsifier
    c = trainer.config
    info = {
        "epoch": epoch,
        "step": trainer.step,
        "t_pre": accuracy,
        "test_loss": loss,
        # the learning rate of the next step: what the rest of the schedule starts with
        "lr": c.lr * lr_factor(trainer.step, trainer.total_steps, trainer.steps_per_epoch, c),
        "sparsity": 0.0 if sp is None else sp.sparsity(),
    }
    write_atomic(prune_point(out, epoch, ".json"), to_json(info, indent=2) + "\n")


def _recover_point(study: Study, out: Path, data: DataBundle) -> None:
    """A base run killed (SIGKILL) right after a pruning epoch's checkpoint but before its
    prune point was kept: its ``last.pt`` is that point."""
    last = checkpoint_path(out / BASE_DIR)
    if not last.is_file():
        return
    state = load_checkpoint(last)
    epoch, batch = state["position"]["epoch"], state["position"]["batch"]
    if (
        batch == 0
        and epoch in study.prune_epochs
        and not prune_point(out, epoch, ".json").is_file()
    ):
        trainer = Trainer(study.base, data=data)
        trainer.load_state_dict(state, last)
        save_prune_point(trainer, out)


def train_base(
    study: Study, out: Path, data: DataBundle, callbacks: Sequence[Callbacks], progress: Any
) -> dict[str, Any]:
    """Train (or resume, or find finished) the base run on ``data``; its report. Refused if a
    prune point is missing afterwards."""
    base = out / BASE_DIR
    resume = (base / MARKER_FILE).is_file()
    if resume:
        _recover_point(study, out, data)
    log(f"[plasticity] base run: {base}")
    with stopped_as(STOPPED):
        report = train(
            study.base,
            base,
            resume=resume,
            callbacks=[KeepPrunePoints(out, study.prune_epochs), *callbacks],
            progress=progress,
            data=data,
        )
    missing = [e for e in study.prune_epochs if not prune_point(out, e, ".json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{base} has no checkpoint kept after epoch(s) {', '.join(map(str, missing))} "
            "(deleted?); start the study again with --overwrite"
        )
    return report
