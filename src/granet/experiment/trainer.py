"""The training loop of one run: :class:`Trainer` builds the data, model, optimizer and
sparsifier from a :class:`Config`, trains epoch by epoch, validates, keeps the best and last
checkpoints, and tests the chosen checkpoint once.

Reproducible and resumable to the bit (on the same device and software): the shuffling order of
epoch ``e`` comes from a generator seeded from ``(seed, e)``, and :meth:`Trainer.state_dict`
holds the model, optimizer, sparsifier and grad-scaler states, the position in the epoch and
every RNG state. Ctrl-C or SIGTERM stops the loop at the next step boundary, writes
``checkpoints/last.pt`` and raises :class:`~granet.experiment.signals.Interrupted`.

Model selection never looks at the test set: ``checkpoints/best.pt`` is the epoch with the best
validation accuracy among the epochs at the final sparsity (for gradual methods, the epochs
before pruning ends are sparser than asked and are not eligible; the last epoch always is). The
test set is evaluated once, at the end, on that checkpoint. With ``val_size: 0`` there is no
validation split: the model trains on the whole training set and the last epoch is tested, as the
papers report.

Experiments hook into the loop through :class:`Callbacks` (after every step, after every
topology round, at the end of every epoch) and can start a run from a given state
(:class:`StartFrom`: another run's checkpoint, weights pruned by the caller).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import granet
from granet.experiment import parallel
from granet.experiment.blocks import (
    AMP_DTYPES,
    batch_loader,
    check_shares,
    epoch_batches,
    epoch_generator,
    eval_loader,
    evaluate,
    load_data,
    log,
    lr_factor,
    make_optimizer,
    reached_target,
    resolve_device,
)
from granet.experiment.checkpoints import (
    CHECKPOINT_FORMAT,
    checkpoint_path,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from granet.experiment.config import Config
from granet.experiment.datasets import DataBundle
from granet.experiment.guards import StepGuard, interrupted, non_finite_loss
from granet.experiment.models import build_model
from granet.experiment.records import append_metrics, read_metrics
from granet.experiment.report import (
    RunRecord,
    layer_summary,
    percent,
    run_report,
    write_report,
)
from granet.experiment.signals import StopRequest, stop_on_signals
from granet.shards import gather


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
    schedules over the remaining steps only.
    """

    model: Mapping[str, torch.Tensor]
    optimizer: Mapping[str, Any] | None = None
    sparsifier: Mapping[str, Any] | None = None
    epoch: int = 0

    @classmethod
    def checkpoint(
        cls, path: str | Path, *, optimizer: bool = True, sparsifier: bool = True
    ) -> StartFrom:
        """From a checkpoint taken at the end of an epoch (:meth:`Trainer.save` in an epoch-end
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
        self.device = resolve_device(config.device) if device is None else torch.device(device)
        self.callbacks = list(callbacks)
        self.progress = progress and self.ranks.main
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        seed_everything(config.seed)
        if data is None:
            data = load_data(config, self.ranks)
            log(
                f"data: {data.source}; {len(data.train)} train, {len(data.val)} validation, "
                f"{len(data.test)} test"
            )
        self.data = data
        check_shares(len(self.data.train), config.batch_size, self.ranks.world)
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
        self.optimizer = make_optimizer(self.model, self.config)
        first = 0 if start is None else start.epoch * self.steps_per_epoch
        # a given sparsifier state goes on with its own schedule; a fresh one gets the rest
        fresh = start is None or start.sparsifier is None
        steps = self.total_steps - first if fresh else self.total_steps
        self.sparsifier = self._sparsifier(steps, sparsifier_options or {})
        if start is not None:
            if start.sparsifier is not None and self.sparsifier is not None:
                self.sparsifier.load_state_dict(start.sparsifier)
                # building the sparsifier applied its own first masks: the weights again
                self.model.load_state_dict(start.model)
            if start.optimizer is not None:
                self.optimizer.load_state_dict(start.optimizer)
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
            eval_loader(self.data.val, self.config, self.device, self.ranks)
            if len(self.data.val)
            else None
        )
        self._next_round = self._upcoming_round()
        self._guard = StepGuard(self.device, self.ranks)
        self._reset_sums()

    def _sparsifier(self, steps: int, options: Mapping[str, Any]) -> granet.Sparsifier | None:
        c = self.config
        if c.method == "dense":
            return None
        return granet.sparsify(
            self.trained,
            self.optimizer,
            c.method,
            total_steps=steps,
            exclude=tuple(c.exclude),
            **{**c.sparsifier_options(), **options},
        )

    def _upcoming_round(self) -> int | None:
        return None if self.sparsifier is None else self.sparsifier.next_update()

    def _reset_sums(self) -> None:
        self._density_cache: tuple[list[tuple[int, int]], torch.Tensor] | None = None
        zeros = torch.zeros((), dtype=torch.float64, device=self.device)
        self.sums = {
            "loss": zeros.clone(),
            "correct": zeros.clone(),
            "seen": 0,
            "density": torch.zeros(len(self.sparse_names), dtype=torch.float64, device=self.device),
            "seconds": 0.0,
        }

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything that resumes the run exactly, and the settings it was made with. Every
        process must call this at the same point (it sums the epoch's counts across them)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "settings": self.config.to_dict(),
            **self._weights_state(optimizer=True),
            "scaler": self.scaler.state_dict(),
            "position": {"epoch": self.epoch, "batch": self.batch, "step": self.step},
            "first_epoch": self.first_epoch,
            "sums": self._sums_across(),
            "train_seconds": self.train_seconds,
            "best": self.best,
            "rng": rng_state(self.device),
            "data_shape": self.data_shape,
            "data_source": self.data.source,
        }

    def _weights_state(self, optimizer: bool = False) -> dict[str, Any]:
        """The model's, the sparsifier's and (if asked) the optimizer's states, whole: under
        FSDP2 gathered from every rank's shards (every process must call this then)."""
        sp = self.sparsifier
        state = {
            "model": self.model.state_dict(),
            "sparsifier": None if sp is None else sp.state_dict(),
            **({"optimizer": self.optimizer.state_dict()} if optimizer else {}),
        }
        return gather(state) if self.sharded else state

    def load_state_dict(self, state: Mapping[str, Any], source: str | Path = "checkpoint") -> None:
        """Continue exactly where :meth:`state_dict` was taken; ``source`` names it in errors."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{source} has checkpoint format {state.get('format')!r}; this granet reads "
                f"format {CHECKPOINT_FORMAT}"
            )
        try:
            parallel.load_model(self.model, state["model"])
            parallel.load_optimizer(self.optimizer, state["optimizer"])
            if self.sparsifier is not None:
                self.sparsifier.load_state_dict(state["sparsifier"])
            self.scaler.load_state_dict(state["scaler"])
            pos = state["position"]
            epoch, batch, step = int(pos["epoch"]), int(pos["batch"]), int(pos["step"])
            if min(epoch, batch, step) < 0:
                raise ValueError(f"its position {dict(pos)} is negative")
            sums, best = state["sums"], state["best"]
            if not _same_layout(sums, self.sums):
                raise ValueError("its epoch's running sums are not this run's (keys, shapes)")
            if best is not None and not _best_record(best):
                raise ValueError(f"its best-checkpoint record {best!r} is malformed")
            seconds = float(state["train_seconds"])
            first_epoch = int(state.get("first_epoch", self.first_epoch))
            set_rng_state(state["rng"], self.device)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise ValueError(f"{source} does not hold a state of this run: {e}") from None
        if state.get("data_source") != self.data.source:
            log(
                f"warning: this run was trained on {state.get('data_source')}; resuming it on "
                f"{self.data.source}"
            )
        self.epoch, self.batch, self.step = epoch, batch, step
        self.first_epoch = first_epoch
        if self.ranks.main:  # the saved sums are over all processes: count them once
            self.sums = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in sums.items()}
        self.train_seconds, self.best = seconds, best
        self._next_round = self._upcoming_round()
        self._density_cache = None

    def save(self, path: str | Path) -> None:
        """Write :meth:`state_dict` to ``path`` (process 0; every process must call this)."""
        state = self.state_dict()
        if self.ranks.main:
            save_checkpoint(state, path)

    def _sums_across(self) -> dict[str, Any]:
        """The epoch's running sums over all processes (the densities are the same on all)."""
        s = self.sums
        if self.ranks.world == 1:
            return s
        seen = torch.tensor(float(s["seen"]), dtype=torch.float64, device=self.device)
        totals = parallel.sum_across(torch.stack([s["loss"], s["correct"], seen]), self.ranks)
        return {**s, "loss": totals[0], "correct": totals[1], "seen": int(totals[2].item())}

    # ---------------------------------------------------------------- one step, one epoch
    def train_step(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
        """One optimizer step on this process's share ``x, y`` of a global batch of
        ``batch_size`` examples; returns the share's mean loss."""
        c = self.config
        lr = c.lr * lr_factor(self.step, self.total_steps, self.steps_per_epoch, c)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=AMP_DTYPES[c.amp], enabled=c.amp != "none"):
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
        s = self.sums
        s["loss"] += loss.detach()
        s["correct"] += (out.detach().argmax(1) == y).sum()
        s["seen"] += len(y)
        s["density"] += self._densities()
        return loss.detach() / len(y)

    def _densities(self) -> torch.Tensor | float:
        """The layers' densities now, counted again only when a mask has changed (a sum over
        every mask entry each step would cost a quarter of a 98%-sparse sparse-compute step)."""
        if self.sparsifier is None:
            return 1.0
        if self.sharded:  # the counts over all shards, as the sparsifier keeps them
            numels = [p.numel() for p in self.sparsifier.params]
            return torch.tensor(self.sparsifier.counts(), device=self.device) / torch.tensor(
                numels, device=self.device
            )
        masks = list(self.sparsifier.masks.values())
        key = [(id(m), m._version) for m in masks]
        if self._density_cache is None or self._density_cache[0] != key:
            densities = torch.stack([m.sum() / m.numel() for m in masks])
            self._density_cache = (key, densities)
        return self._density_cache[1]

    def evaluate(self, split: str = "test") -> tuple[float, float]:
        """Mean loss and accuracy of the model as it stands on ``split`` (``"val"`` or
        ``"test"``). The validation split is evaluated by all processes, each its share; the
        test set by this process alone."""
        if split == "val":
            if self._val_loader is None:
                raise ValueError("this run has no validation split (val_size: 0)")
            return evaluate(self.model, self._val_loader, self.device, self.config.amp, self.ranks)
        if split != "test":
            raise ValueError(f"split must be 'val' or 'test'; got {split!r}")
        loader = eval_loader(self.data.test, self.config, self.device)
        return evaluate(self.model, loader, self.device, self.config.amp)

    def end_epoch(self) -> dict[str, Any]:
        """Validate, log the epoch to metrics.jsonl, keep the best checkpoint, save the last."""
        started = time.perf_counter()
        c, s = self.config, self._sums_across()
        if not math.isfinite(s["loss"].item()):
            raise non_finite_loss(self.run_dir, self.epoch, self.step, self.config.lr)
        last = self.epoch + 1 == c.epochs
        if self._val_loader is None:  # no validation split: the last epoch is the one tested
            val_loss = val_acc = None
            is_best = last
        else:
            val_loss, val_acc = self.evaluate("val")
            eligible = reached_target(self.sparsifier, c.sparsity) or last
            is_best = eligible and (self.best is None or val_acc > self.best["val_accuracy"])
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
            "best": is_best,
            "layer_density": dict(zip(self.sparse_names, (s["density"] / steps).tolist())),
        }
        writes = self.run_dir is not None and self.ranks.main
        if writes:
            append_metrics(self.run_dir, record)
        if is_best:
            self.best = {"epoch": self.epoch + 1, "val_accuracy": val_acc}
        best = self._weights_state() if is_best and (writes or self.sharded) else None
        if is_best and writes:
            save_checkpoint(
                {**best, "data_shape": self.data_shape, **self.best},
                checkpoint_path(self.run_dir, "best"),
            )
        self.train_seconds += time.perf_counter() - started
        self.epoch += 1
        self.batch = 0
        self._reset_sums()
        self._save_last()
        for cb in self.callbacks:
            cb.on_epoch_end(self, record)
        return record

    def _save_last(self) -> None:
        if self.run_dir is not None:
            self.save(checkpoint_path(self.run_dir, "last"))

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
                log(_epoch_line(record, c.epochs))
            if self._stop(stop):
                self._interrupt(stop)

    def _epoch(self, stop: StopRequest) -> dict[str, Any] | None:
        """Train the rest of the current epoch and end it: its metrics record, or None when
        stopped for a signal."""
        c = self.config
        batches = epoch_batches(len(self.data.train), c.batch_size, c.seed, self.epoch)
        batches = batches[self.batch :]
        loader = batch_loader(
            self.data.train,
            parallel.shard(batches, self.ranks),
            c,
            self.device,
            epoch_generator(c.seed, self.epoch),
        )
        self.model.train()
        bar = tqdm(
            total=self.steps_per_epoch,
            initial=self.batch,
            desc=f"epoch {self.epoch + 1}/{c.epochs}",
            disable=not self.progress,
            leave=False,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        shown = 0.0
        started = time.perf_counter()
        stopping = False
        for (x, y), batch in zip(loader, batches):
            loss = self.train_step(x, y, len(batch))
            bar.update()
            if self.progress and time.monotonic() - shown > 0.5:
                shown = time.monotonic()
                bar.set_postfix(
                    loss=f"{loss.item():.3f}",
                    acc=f"{self.sums['correct'].item() / self.sums['seen']:.3f}",
                    sparsity=f"{self.sparsifier.sparsity() if self.sparsifier else 0.0:.3f}",
                    refresh=False,
                )
            self._hooks()
            stopping = self._stop(stop, self.step)
            if stopping:
                break
        bar.close()
        elapsed = time.perf_counter() - started
        self.sums["seconds"] += elapsed
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
        asked, diverged = self._guard.stop_here(stop, self.sums["loss"], step)
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
            target_reached=reached_target(sp, c.sparsity),
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
        path = checkpoint_path(self.run_dir, "best")
        best = load_checkpoint(path)
        try:
            parallel.load_model(self.model, best["model"])
            if self.sparsifier is not None:
                self.sparsifier.load_state_dict(best["sparsifier"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path} does not hold a state of this run: {e}") from None
        test_loss, test_acc = self.evaluate("test")
        metrics = read_metrics(self.run_dir)
        report = run_report(self.record(), best, test_loss, test_acc, metrics)
        if self.ranks.main:
            write_report(self.run_dir, report, metrics)
        return report


def _epoch_line(r: dict[str, Any], epochs: int) -> str:
    itop = "" if r["itop_rate"] is None else f"  itop {r['itop_rate']:.3f}"
    return (
        f"epoch {r['epoch']}/{epochs}  loss {r['train_loss']:.4f}  "
        f"train {percent(r['train_accuracy'])}  val {percent(r['val_accuracy'])}  "
        f"sparsity {r['sparsity']:.4f}{itop}  lr {r['lr']:.3g}  {r['seconds']:.1f}s"
        + ("  *best" if r["best"] else "")
    )


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
    """Whether ``best`` is what :meth:`Trainer.state_dict` saves of the best epoch."""
    return (
        isinstance(best, dict)
        and set(best) == {"epoch", "val_accuracy"}
        and type(best["epoch"]) is int
        and best["epoch"] >= 1
        and type(best["val_accuracy"]) in (int, float, type(None))  # None: no validation split
    )
