"""The training loop of one run: :class:`Trainer` builds the data, model, optimizer and
sparsifier from a :class:`Config`, trains epoch by epoch, validates, keeps the best and last
checkpoints (:mod:`~granet.experiment.checkpoints` writes them and says which epoch is the best),
and tests the best one once.

Reproducible and resumable to the bit (on the same device and software): the shuffling order of
epoch ``e`` comes from a generator seeded from ``(seed, e)``, and :meth:`Trainer.state_dict`
holds the model, optimizer, sparsifier and grad-scaler states, the position in the epoch and
every RNG state. Ctrl-C or SIGTERM stops the loop at the next step boundary, writes
``checkpoints/last.pt`` and raises :class:`~granet.experiment.signals.Interrupted`.

Experiments hook into the loop through :class:`Callbacks` (after every step, after every
topology round, at the end of every epoch) and can start a run from a given state
(:class:`~granet.experiment.checkpoints.StartFrom`: another run's checkpoint, weights pruned by
the caller).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from granet.experiment import blocks, checkpoints, parallel
from granet.experiment.checkpoints import StartFrom
from granet.experiment.config import Config
from granet.experiment.datasets import DataBundle
from granet.experiment.guards import StepGuard, interrupted, non_finite_loss
from granet.experiment.models import build_model
from granet.experiment.progress import EpochBar, epoch_line
from granet.experiment.records import append_metrics, read_metrics
from granet.experiment.report import RunRecord, layer_summary, run_report, write_report
from granet.experiment.signals import StopRequest, stop_on_signals
from granet.experiment.sums import EpochSums

__all__ = ["Callbacks", "StartFrom", "Trainer"]  # StartFrom: from checkpoints, where it is defined


# ------------------------------------------------------------------------------- extension
class Callbacks:
    """Hooks into :meth:`Trainer.fit`; subclass and override the ones you need.

    Each is called on every process of a multi-process run, at the same point; anything that
    calls a collective (:meth:`Trainer.save`, :meth:`Trainer.evaluate`) must run on all.
    """

    def on_step(self, trainer: Trainer) -> None:
        """After every optimizer step (``trainer.step`` is the number of steps done)."""

    def on_round(self, trainer: Trainer) -> None:
        """After a step that ran a topology round (``trainer.sparsifier.last_round``)."""

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """After an epoch's validation, metrics line and checkpoints (``record`` is its
        ``metrics.jsonl`` line; ``trainer.epoch`` the number of epochs done)."""


# ---------------------------------------------------------------------------------- trainer
class Trainer:
    """One run: data, model, optimizer, sparsifier, and the loop that trains them.

    ``run_dir`` is where the run's files go (``metrics.jsonl``, checkpoints, the report); None
    keeps everything in memory. The trainer writes there as told: the run folder's marker, lock
    and resume checks are :func:`granet.experiment.train.train`'s. ``data`` is the data set
    (default: the config's); ``device`` the torch device (default: the config's).
    ``sparsifier_options`` go to the sparsifier on top of the config's (the options a file
    cannot hold: a score or schedule given as a callable). ``start`` starts from a given state;
    ``progress`` shows a tqdm bar.

    With several processes (torchrun), every process builds the same trainer; ``model`` is its
    replica and DDP averages the gradients; process 0 alone writes files. Every process holds
    the same state, so a checkpoint resumes on any number of processes.
    """

    def __init__(
        self,
        config: Config,
        run_dir: str | Path | None = None,
        *,
        data: DataBundle | None = None,
        device: torch.device | str | None = None,
        callbacks: Sequence[Callbacks] = (),
        sparsifier_options: Mapping[str, Any] | None = None,
        start: StartFrom | None = None,
        progress: bool = False,
    ) -> None:
        self.ranks = parallel.current()
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.device = (
            blocks.resolve_device(config.device) if device is None else torch.device(device)
        )
        self.callbacks = list(callbacks)
        self.progress = progress and self.ranks.main
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        checkpoints.seed_everything(config.seed)
        if data is None:
            data = blocks.load_data(config, self.ranks)
            blocks.log(
                f"data: {data.source}; {len(data.train)} train, {len(data.val)} validation, "
                f"{len(data.test)} test"
            )
        self.data = data
        blocks.check_shares(len(self.data.train), config.batch_size, self.ranks.world)
        self.steps_per_epoch = math.ceil(len(self.data.train) / config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.config = config.resolved(self.total_steps)
        self.data_shape = {
            "num_classes": self.data.num_classes,
            "in_channels": self.data.in_channels,
            "image_size": self.data.image_size,
        }
        self.model = build_model(config.model, **self.data_shape).to(self.device)
        if start is not None:
            self.model.load_state_dict(start.model)
        # what the training forward pass runs; FSDP2 shards the model itself
        self.trained: nn.Module = parallel.wrap(
            self.model, config.parallel, self.ranks, self.device
        )
        self.sharded = self.ranks.world > 1 and config.parallel == "fsdp"
        self.optimizer = blocks.make_optimizer(self.model, self.config)
        first = 0 if start is None else start.epoch * self.steps_per_epoch
        # a given sparsifier state goes on with its own schedule, given masks with the whole
        # run's; a fresh one gets the rest
        fresh = start is None or (start.sparsifier is None and start.masks is None)
        steps = self.total_steps - first if fresh else self.total_steps
        self.sparsifier = blocks.make_sparsifier(
            self.trained, self.optimizer, self.config, steps, sparsifier_options
        )
        if start is not None:
            start.load_into(self.model, self.optimizer, self.sparsifier, first)
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.config.amp == "fp16" and self.device.type == "cuda"
        )
        self.sparse_names = list(layer_summary(self.model, self.sparsifier))
        self.epoch = 0 if start is None else start.epoch  # epochs done
        self.first_epoch = self.epoch  # epochs done before this run (started from a state)
        self.batch = 0  # batches of the current epoch done
        self.step = first  # optimizer steps done
        self.train_seconds = 0.0
        self.best: dict[str, Any] | None = None
        self._val_loader = (
            blocks.eval_loader(self.data.val, self.config, self.device, self.ranks)
            if len(self.data.val)
            else None
        )
        self._next_round = self._upcoming_round()
        self._guard = StepGuard(self.device, self.ranks)
        self.sums = EpochSums(self.sparse_names, self.device, self.ranks)

    def _upcoming_round(self) -> int | None:
        return None if self.sparsifier is None else self.sparsifier.next_update()

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything that resumes the run exactly, and the settings it was made with. Every
        process must call this at the same point (it sums the epoch's counts across them)."""
        return {
            "format": checkpoints.CHECKPOINT_FORMAT,
            "settings": self.config.to_dict(),
            **checkpoints.weights_state(self.model, self.sparsifier, self.optimizer, self.sharded),
            "scaler": self.scaler.state_dict(),
            "position": {"epoch": self.epoch, "batch": self.batch, "step": self.step},
            "first_epoch": self.first_epoch,
            "sums": self.sums.across(),
            "train_seconds": self.train_seconds,
            "best": self.best,
            "rng": checkpoints.rng_state(self.device),
            "data_shape": self.data_shape,
            "data_source": self.data.source,
        }

    def load_state_dict(self, state: Mapping[str, Any], source: str | Path = "checkpoint") -> None:
        """Continue exactly where :meth:`state_dict` was taken; ``source`` names it in errors."""
        at = checkpoints.read_position(state, self.sums.values, self.first_epoch, source)
        checkpoints.restore(
            state, self.model, self.optimizer, self.sparsifier, self.scaler, self.device, source
        )
        if state.get("data_source") != self.data.source:
            blocks.log(
                f"warning: this run was trained on {state.get('data_source')}; resuming it on "
                f"{self.data.source}"
            )
        self.epoch, self.batch, self.step = at.epoch, at.batch, at.step
        self.first_epoch = at.first_epoch
        self.sums.load(at.sums)
        self.train_seconds, self.best = at.train_seconds, at.best
        self._next_round = self._upcoming_round()

    def save(self, path: str | Path) -> None:
        """Write :meth:`state_dict` to ``path`` (process 0; every process must call this)."""
        state = self.state_dict()
        if self.ranks.main:
            checkpoints.save_checkpoint(state, path)

    # ---------------------------------------------------------------- one step, one epoch
    def train_step(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
        """One optimizer step on this process's share ``x, y`` of a global batch of
        ``batch_size`` examples; returns the share's mean loss."""
        c = self.config
        lr = c.lr * blocks.lr_factor(self.step, self.total_steps, self.steps_per_epoch, c)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with torch.autocast(
            self.device.type, dtype=blocks.AMP_DTYPES[c.amp], enabled=c.amp != "none"
        ):
            out = self.trained(x)
            loss = F.cross_entropy(
                out.float(), y, label_smoothing=c.label_smoothing, reduction="sum"
            )
        self.optimizer.zero_grad(set_to_none=True)
        # DDP averages the processes' gradients: scaled so, they are those of the global mean
        self.scaler.scale(loss * (self.ranks.world / batch_size)).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        self.batch += 1
        self.sums.add(loss, out, y, self.sparsifier)
        return loss.detach() / len(y)

    def evaluate(self, split: str = "test") -> tuple[float, float]:
        """Mean loss and accuracy of the model as it stands on ``split`` (``"val"`` or
        ``"test"``). The validation split is evaluated by all processes, each its share; the
        test set by this process alone."""
        if split == "val":
            if self._val_loader is None:
                raise ValueError("this run has no validation split (val_size: 0)")
            return blocks.evaluate(
                self.model, self._val_loader, self.device, self.config.amp, self.ranks
            )
        if split != "test":
            raise ValueError(f"split must be 'val' or 'test'; got {split!r}")
        loader = blocks.eval_loader(self.data.test, self.config, self.device)
        return blocks.evaluate(self.model, loader, self.device, self.config.amp)

    def end_epoch(self) -> dict[str, Any]:
        """Validate, log the epoch to metrics.jsonl, keep the best checkpoint, save the last."""
        started = time.perf_counter()
        c, s = self.config, self.sums.across()
        if not math.isfinite(s["loss"].item()):
            raise non_finite_loss(self.run_dir, self.epoch, self.step, self.config.lr)
        val_loss, val_acc = (None, None) if self._val_loader is None else self.evaluate("val")
        at_target = blocks.reached_target(self.sparsifier, c.sparsity)
        chosen = checkpoints.is_best(self.best, val_acc, at_target, last=self.epoch + 1 == c.epochs)
        steps = self.batch
        stats = self.sparsifier.stats() if self.sparsifier is not None else None
        seconds = s["seconds"] + time.perf_counter() - started
        record = {
            "epoch": self.epoch + 1,
            "step": self.step,
            "train_loss": s["loss"].item() / s["seen"],
            "train_accuracy": s["correct"].item() / s["seen"],
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "sparsity": stats["sparsity"] if stats else 0.0,
            "itop_rate": stats["itop_rate"] if stats else None,
            "regrow_fraction": stats["regrow_fraction"] if stats else None,
            "lr": self.optimizer.param_groups[0]["lr"],
            "seconds": seconds,
            "samples": s["seen"],
            "best": chosen,
            "layer_density": dict(zip(self.sparse_names, (s["density"] / steps).tolist())),
        }
        writes = self.run_dir is not None and self.ranks.main
        if writes:
            append_metrics(self.run_dir, record)
        if chosen:
            self.best = {"epoch": self.epoch + 1, "val_accuracy": val_acc}
            # under FSDP2 every process sends its shards of the best weights
            if writes or self.sharded:
                best = checkpoints.weights_state(self.model, self.sparsifier, None, self.sharded)
            if writes:
                checkpoints.save_best(self.run_dir, best, self.data_shape, self.best)
        self.train_seconds += time.perf_counter() - started
        self.epoch += 1
        self.batch = 0
        self.sums.reset()
        self._save_last()
        for cb in self.callbacks:
            cb.on_epoch_end(self, record)
        return record

    def _save_last(self) -> None:
        if self.run_dir is not None:
            self.save(checkpoints.checkpoint_path(self.run_dir, "last"))

    # ------------------------------------------------------------------------- the loop
    def fit(self, epochs: int | None = None) -> None:
        """Train until ``epochs`` epochs are done (default: the config's, the whole schedule).

        Raises :class:`~granet.experiment.signals.Interrupted` on Ctrl-C / SIGTERM once the
        run's ``last.pt`` is written (with no ``run_dir``: at once), and
        :class:`~granet.experiment.errors.RunFailed` if the loss becomes non-finite.
        """
        c = self.config
        until = c.epochs if epochs is None else epochs
        if not self.epoch <= until <= c.epochs:
            raise ValueError(f"epochs must be in [{self.epoch}, {c.epochs}]; got {until}")
        with stop_on_signals() as stop:
            while self.epoch < until:
                if self._stop(stop):  # arrived during the previous epoch's validation
                    self._interrupt(stop)
                record = self._epoch(stop)
                if record is None:
                    self._interrupt(stop)
                blocks.log(epoch_line(record, c.epochs))
            if self._stop(stop):
                self._interrupt(stop)

    def _epoch(self, stop: StopRequest) -> dict[str, Any] | None:
        """Train the rest of the current epoch and end it: its metrics record, or None when
        stopped for a signal."""
        c = self.config
        batches = blocks.epoch_batches(len(self.data.train), c.batch_size, c.seed, self.epoch)
        batches = batches[self.batch :]
        loader = blocks.batch_loader(
            self.data.train,
            parallel.shard(batches, self.ranks),
            c,
            self.device,
            blocks.epoch_generator(c.seed, self.epoch),
        )
        self.model.train()
        bar = EpochBar(self.epoch + 1, c.epochs, self.steps_per_epoch, self.batch, self.progress)
        started = time.perf_counter()
        stopping = False
        for (x, y), batch in zip(loader, batches):
            loss = self.train_step(x, y, len(batch))
            bar.step(loss, self.sums.values, self.sparsifier)
            self._hooks()
            stopping = self._stop(stop, self.step)
            if stopping:
                break
        bar.close()
        elapsed = time.perf_counter() - started
        self.sums.values["seconds"] += elapsed
        self.train_seconds += elapsed
        return None if stopping else self.end_epoch()

    def _hooks(self) -> None:
        for cb in self.callbacks:
            cb.on_step(self)
        sp = self.sparsifier
        if sp is not None and self._next_round is not None and sp.step >= self._next_round:
            self._next_round = sp.next_update()
            for cb in self.callbacks:
                cb.on_round(self)

    def _stop(self, stop: StopRequest, step: int | None = None) -> bool:
        """Whether to stop here for a Ctrl-C / SIGTERM (:meth:`StepGuard.stop_here`); a
        non-finite loss raises :class:`~granet.experiment.errors.RunFailed`."""
        asked, diverged = self._guard.stop_here(stop, self.sums.values["loss"], step)
        if diverged:
            raise non_finite_loss(self.run_dir, self.epoch, self.step, self.config.lr)
        return asked

    def _interrupt(self, stop: StopRequest) -> None:
        self._save_last()
        raise interrupted(stop, self.run_dir, self.step)

    def close(self) -> None:
        """Let go of the process group and the parameters: drop the DDP wrapper and detach the
        sparsifier (the weights keep their zeros). The trainer cannot train afterwards; call
        it at the end of a multi-process run, before the group is destroyed."""
        if self.sparsifier is not None:
            self.sparsifier.remove()
        self.sparsifier = None
        self.trained = self.model

    # ----------------------------------------------------------------------- the report
    def record(self) -> RunRecord:
        """The run as its report reads it: the model and sparsifier as they stand now."""
        c, sp, data = self.config, self.sparsifier, self.data
        stats = sp.stats() if sp is not None else None
        return RunRecord(
            run_dir=self.run_dir,
            config=c,
            data_shape=dict(self.data_shape),
            data_source=data.source,
            split_sizes={"train": len(data.train), "val": len(data.val), "test": len(data.test)},
            sparse_names=list(self.sparse_names),
            layers=layer_summary(self.model, sp),
            sparse=sp is not None,
            sparsity=stats["sparsity"] if stats else 0.0,
            itop_rate=stats["itop_rate"] if stats else None,
            target_reached=blocks.reached_target(sp, c.sparsity),
            parameters=sum(p.numel() for p in self.model.parameters()),
            train_seconds=self.train_seconds,
            steps=self.step,
            steps_per_epoch=self.steps_per_epoch,
            device=self.device,
            processes=self.ranks.world,
        )

    def finish(self) -> dict[str, Any]:
        """Test the best checkpoint once and write report.json, report.md and the plots
        (process 0 only; under FSDP2 every process, as the model is sharded, and process 0
        writes; needs ``run_dir``)."""
        if self.run_dir is None:
            raise ValueError("finish() writes the run's report: the trainer needs a run_dir")
        best = checkpoints.load_best(self.run_dir, self.model, self.sparsifier)
        test_loss, test_acc = self.evaluate("test")
        metrics = read_metrics(self.run_dir)
        report = run_report(self.record(), best, test_loss, test_acc, metrics)
        if self.ranks.main:
            write_report(self.run_dir, report, metrics)
        return report
