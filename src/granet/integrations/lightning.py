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

Under FSDP2 (``ModelParallelStrategy``, or any strategy whose model ``configure_model`` shards with
``fully_shard``) the sparsifier is built on the shards, and its sharded tensors (the masks' rows,
SNFS's momentum) travel in the checkpoint's ``state_dict`` under ``granet_sparsifier``, which the
strategy saves with ``torch.distributed.checkpoint``, each rank its shards; the rest is the
callback's state, checksummed as above. A resumed fit reads them back resharded to its ranks.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl

from granet.checksum import checked, warn_unchecked, with_checksum
from granet.integrations.attach import SparsifierHolder, split_sharded
from granet.shards import is_dtensor

__all__ = ["STATE_KEY", "GraNetCallback"]

STATE_KEY = "granet_sparsifier"  # the checkpoint's state_dict entry of the sharded tensors


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
        self._shards: dict[str, Any] = {}  # sharded tensors of the state being saved
        self._total = 0  # the fit's optimizer steps
        self._deferred = False  # whether the sparsifier waits for the checkpoint's restoring

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
        self._total = int(total)
        # strategies that restore a checkpoint after their setup (ModelParallelStrategy,
        # DeepSpeed) do so after this hook, and loading the optimizer state may take a step
        # (torch.distributed.checkpoint's empty-state initialisation) that a sparsifier built
        # now would take for a training step: build it once the checkpoint has been restored
        self._deferred = trainer.strategy.restore_checkpoint_after_setup
        if not self._deferred:
            self._build(trainer, pl_module)

    def on_sanity_check_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build a deferred sparsifier before the sanity check, so that it sees sparse weights."""
        if self._deferred:
            self._build(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build a deferred sparsifier (no sanity check ran)."""
        if self._deferred:
            self._build(trainer, pl_module)

    def _build(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the sparsifier, resumed from the checkpoint's state if it has been read."""
        if trainer.ckpt_path is not None and self._restored is None:
            raise ValueError(
                f"ckpt_path: {trainer.ckpt_path} holds no GraNetCallback state; to start sparse "
                "training from its weights, load them and fit without ckpt_path"
            )
        where = trainer.ckpt_path
        saved = None if self._restored is None else _sparsifier_state(self._restored, where)
        self._attach(pl_module, trainer.optimizers[0], self._total, saved, where, _reader(where))
        self._restored = None
        self._deferred = False

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
        """The sparsifier's state and its SHA-256, for Lightning's checkpoint (under FSDP2 all
        but its sharded tensors, which :meth:`on_save_checkpoint` puts with the model's)."""
        if self.sparsifier is not None:
            rest, self._shards = split_sharded(self.sparsifier.state_dict())
            return with_checksum({"sparsifier": rest})
        return self._restored if self._restored is not None else {}

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Put the sparsifier's sharded tensors (FSDP2) into the checkpoint's ``state_dict``,
        which the strategy saves with ``torch.distributed.checkpoint``."""
        shards, self._shards = self._shards, {}
        if not shards:
            return
        model = checkpoint.get("state_dict", {})
        if not any(is_dtensor(t) for t in model.values()):
            raise ValueError(
                "GraNetCallback under FSDP2 saves its masks sharded, with the model's sharded "
                "state: save distributed checkpoints (ModelParallelStrategy's default "
                "save_distributed_checkpoint=True)"
            )
        model[STATE_KEY] = shards

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's sparsifier state until fitting starts, checks it and builds the
        sparsifier."""
        self._restored = None if isinstance(state_dict, dict) and not state_dict else state_dict


def _reader(path: object) -> Any:
    """What reads the sparsifier's sharded tensors from the distributed checkpoint ``path``
    into a template."""

    def read(template: dict[str, Any]) -> None:
        import torch.distributed.checkpoint as dcp

        try:
            dcp.load({"state_dict": {STATE_KEY: template}}, checkpoint_id=path)
        except Exception as e:  # dcp raises its own errors for missing or damaged files
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"cannot read the sparsifier's shards: {reason}") from None

    return read


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
