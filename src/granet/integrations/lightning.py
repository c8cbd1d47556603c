"""granet in Lightning: ``lightning.pytorch.Trainer(callbacks=[GraNetCallback("rigl")])``.

Needs the ``granet[lightning]`` extra. The callback builds the sparsifier when fitting starts, on
the LightningModule and its one optimizer (the sparsifier hooks the torch optimizer, so a step
that the 16-mixed GradScaler skips is not counted), with ``total_steps`` the trainer's
``estimated_stepping_batches``. Its state travels in Lightning's checkpoints (the callback's
``state_dict``) with a SHA-256 of its contents, checked when a fit resumes (a damaged state is
refused; one saved before granet had checksums loads with a warning). When fitting ends the
sparsifier lets go of the model, whose weights keep their zeros: it may be fitted again, with a
new callback. ``granet/sparsity``, ``granet/itop_rate``, ``granet/pruned``,
``granet/dropped`` and ``granet/regrown`` go to the trainer's loggers at every step.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl

from granet.checksum import checked, warn_unchecked, with_checksum
from granet.integrations.attach import SparsifierHolder

__all__ = ["GraNetCallback"]


class GraNetCallback(SparsifierHolder, pl.Callback):
    """Sparse training with ``method`` (a name of ``granet.METHODS``) in a Lightning ``Trainer``:
    ``GraNetCallback(method="granet", **sparsifier_kwargs)``.

    ``sparsifier_kwargs`` are those of the method's class (``sparsity``, ``update_every``,
    ``include`` ...; ``total_steps`` defaults to ``trainer.estimated_stepping_batches``). The
    sparsifier is ``self.sparsifier`` once fitting has started.
    """

    def __init__(self, method: str = "granet", **sparsifier_kwargs: Any) -> None:
        super().__init__(method, **sparsifier_kwargs)
        self._restored: dict[str, Any] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the sparsifier for the Trainer's one optimizer, or resume it from the state
        the checkpoint gave :meth:`load_state_dict`."""
        if len(trainer.optimizers) != 1:
            raise ValueError(
                "GraNetCallback works with one optimizer; configure_optimizers gave "
                f"{len(trainer.optimizers)}"
            )
        total = self.options.get("total_steps") or trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "GraNetCallback needs the run's length: give the Trainer max_steps or "
                "max_epochs, or the callback total_steps"
            )
        if trainer.ckpt_path is not None and self._restored is None:
            raise ValueError(
                f"ckpt_path: {trainer.ckpt_path} holds no GraNetCallback state; to start sparse "
                "training from its weights, load them and fit without ckpt_path"
            )
        where = trainer.ckpt_path
        saved = None if self._restored is None else _sparsifier_state(self._restored, where)
        self._attach(pl_module, trainer.optimizers[0], int(total), saved, where)
        self._restored = None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Detach the sparsifier when fitting ends (the model keeps its zeros), so that the
        model may be fitted again, with a new callback."""
        if stage == "fit":
            self._detach()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Log the ``granet/`` scalars at every step."""
        if self._scalars is not None:
            pl_module.log_dict(self._scalars(), on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        """The sparsifier's state and its SHA-256, for Lightning's checkpoint."""
        if self.sparsifier is not None:
            return with_checksum({"sparsifier": self.sparsifier.state_dict()})
        return self._restored if self._restored is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's sparsifier state until fitting starts, checks it and builds the
        sparsifier."""
        self._restored = None if isinstance(state_dict, dict) and not state_dict else state_dict


def _sparsifier_state(saved: Any, where: object) -> dict[str, Any]:
    """The sparsifier state of a checkpoint's callback state, checksum verified."""
    what = "GraNetCallback state"
    if isinstance(saved, dict) and "masks" in saved and "sha256" not in saved:
        # saved before checksums: the sparsifier state itself
        warn_unchecked(str(where), what)
        return saved
    state = checked(saved, str(where), ("sparsifier",), what)["sparsifier"]
    if not isinstance(state, dict):
        raise ValueError(f"{where}: its GraNetCallback state holds no sparsifier state dict")
    return state
