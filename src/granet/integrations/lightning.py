"""granet in Lightning: ``lightning.pytorch.Trainer(callbacks=[GraNetCallback("rigl")])``.

Needs the ``granet[lightning]`` extra. The callback builds the sparsifier when fitting starts, on
the LightningModule and its one optimizer (the sparsifier hooks the torch optimizer, so a step
that the 16-mixed GradScaler skips is not counted), with ``total_steps`` the trainer's
``estimated_stepping_batches``. Its state travels in Lightning's checkpoints (the callback's
``state_dict``), and ``granet/sparsity``, ``granet/itop_rate``, ``granet/pruned``,
``granet/dropped`` and ``granet/regrown`` go to the trainer's loggers at every step.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl

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
        self._attach(pl_module, trainer.optimizers[0], int(total), self._restored)
        self._restored = None

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
        """The sparsifier's state, for Lightning's checkpoint."""
        if self.sparsifier is not None:
            return self.sparsifier.state_dict()
        return self._restored or {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's sparsifier state until fitting starts and builds the sparsifier."""
        self._restored = state_dict or None
