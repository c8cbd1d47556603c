"""One training run: data, model, optimizer and sparsifier, the loop, checkpoints, the report.

Reproducible and resumable to the bit (on the same device and software): the shuffling order of
epoch ``e`` comes from a generator seeded from ``(seed, e)``, and ``checkpoints/last.pt`` holds
the model, optimizer, sparsifier and grad-scaler states, the position in the epoch and every RNG
state. Ctrl-C or SIGTERM stops the loop at the next step boundary and writes that checkpoint;
:func:`train` with ``resume=True`` continues from it, replaying the rest of the same epoch.

Model selection never looks at the test set: ``checkpoints/best.pt`` is the epoch with the best
validation accuracy among the epochs at the final sparsity (for gradual methods, the epochs
before pruning ends are sparser than asked and are not eligible; the last epoch always is). The
test set is evaluated once, at the end, on that checkpoint. With ``val_size: 0`` there is no
validation split: the model trains on the whole training set and the last epoch is tested, as the
papers report.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import granet
from granet.experiment import flops as flop_count
from granet.experiment import parallel
from granet.experiment.config import Config, save_config
from granet.experiment.data import DataBundle, load_dataset
from granet.experiment.models import build_model
from granet.experiment.report import percent, write_report
from granet.experiment.runs import (
    METRICS_FILE,
    REPORT_JSON,
    checkpoint_path,
    load_checkpoint,
    read_metrics,
    read_report,
    save_checkpoint,
)
from granet.selection import select_parameters

AMP_DTYPES = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_FORMAT = 2  # 2: the CUDA RNG state of the run's own GPU only
STOP_CHECK_EVERY = 10  # steps between the processes' shared stop decisions (multi-process runs)
TEST_CHECKPOINT_RULE = (
    "best validation accuracy among the epochs at the final sparsity (the last epoch always "
    "counts; without a validation split, the last epoch); test set evaluated once, on this "
    "checkpoint"
)


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C / SIGTERM once the resumable checkpoint is on disk."""

    def __init__(self, run_dir: Path, step: int, signum: int) -> None:
        self.run_dir, self.step, self.signum = run_dir, step, signum
        name = signal.Signals(signum).name
        super().__init__(
            f"{name}: stopped at step {step}; checkpoint saved. "
            f"Continue with: granet train --resume {run_dir}"
        )


# ---------------------------------------------------------------------------- building blocks
def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; anything else must be a torch device.
    Under torchrun with several processes, each process's GPU is ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    ranks = parallel.current()
    if device.type == "cuda" and ranks.world > 1:
        if device.index is not None:
            raise ValueError(
                f"under torchrun each process uses cuda:LOCAL_RANK; use --device cuda or auto, "
                f"not {name!r}"
            )
        device = torch.device("cuda", ranks.local)
    return device


def make_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (the paper's), or AdamW."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, config: Config) -> float:
    """Multiplier of the base LR for optimizer step ``step`` (0-based).

    Linear warmup over ``warmup_epochs``, then either x0.1 at each of ``lr_milestones``
    (fractions of training; the paper's 1/2 and 3/4 by default) or a cosine decay to zero.
    """
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 0.1 ** sum(step >= round(m * total_steps) for m in config.lr_milestones)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that shuffles epoch ``epoch``: a function of ``(seed, epoch)`` only."""
    (state,) = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The sample indices of every batch of epoch ``epoch``, in order."""
    order = torch.randperm(n, generator=epoch_generator(seed, epoch)).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def _loader(dataset: Dataset, batch_sampler: Any, config: Config, device: torch.device, gen):
    # ``generator`` keeps the loader from drawing its worker base seed from the global RNG.
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=config.workers,
        pin_memory=device.type == "cuda",
        generator=gen,
    )


def eval_loader(
    dataset: Dataset, config: Config, device: torch.device, ranks: parallel.Ranks = parallel.SINGLE
) -> DataLoader:
    """In order, in batches of ``batch_size``; with several processes, each evaluates its share."""
    mine, size = range(ranks.rank, len(dataset), ranks.world), config.batch_size
    batches = [list(mine[i : i + size]) for i in range(0, len(mine), size)]
    return _loader(dataset, batches, config, device, torch.Generator().manual_seed(0))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: str = "none",
    ranks: parallel.Ranks = parallel.SINGLE,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``loader`` (over every process's
    loader when ``ranks`` has several)."""
    model.eval()
    # loss sum, correct, seen: float64 counts are exact far beyond any data set's size
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=amp != "none"):
            out = model(x)
        sums[0] += F.cross_entropy(out.float(), y, reduction="sum")
        sums[1] += (out.argmax(1) == y).sum()
        sums[2] += len(y)
    loss, correct, seen = parallel.sum_across(sums, ranks).tolist()
    return loss / seen, correct / seen


def layer_summary(model: nn.Module, sp: granet.Sparsifier | None) -> dict[str, dict[str, Any]]:
    """Per sparse tensor: shape, numel, nnz, density (for dense: all conv/linear weights)."""
    if sp is not None:
        return sp.stats()["layers"]
    return {
        name: {"density": 1.0, "nnz": p.numel(), "numel": p.numel(), "shape": list(p.shape)}
        for name, p in select_parameters(model)
    }


def _at_final_sparsity(sp: granet.Sparsifier | None, target: float) -> bool:
    if sp is None:
        return True
    masks = list(sp.masks.values())
    slack = len(masks) / sum(m.numel() for m in masks)  # per-layer rounding of the counts
    return sp.sparsity() >= target - slack


def hardware(device: torch.device, processes: int = 1) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{os.cpu_count()}-core CPU ({platform.machine()})"
    return name if processes == 1 else f"{processes} processes x {name}"


# ------------------------------------------------------------------------------ RNG and signals
def _rng_state(device: torch.device) -> dict[str, Any]:
    # Only the run's own GPU: asking every GPU for its state would open a CUDA context on each
    # GPU from each process of a multi-GPU run.
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _StopRequest:
    signum: int | None = None


@contextmanager
def _stop_on_signals() -> Iterator[_StopRequest]:
    """Turn the first SIGINT/SIGTERM into a stop request (a second one aborts at once)."""
    request = _StopRequest()

    def handler(signum: int, frame: Any) -> None:
        if request.signum is not None:
            raise KeyboardInterrupt
        request.signum = signum

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, handler)
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _log(message: str) -> None:
    if parallel.current().main:
        tqdm.write(message, file=sys.stderr)


# ---------------------------------------------------------------------------------- the run
class _Run:
    """The state of one run between steps; ``checkpoint()`` is everything ``resume`` needs.

    With several processes, ``model`` is this process's replica and ``trained`` its DDP wrapper
    (used for the training forward pass only); every process holds the same state, so the
    checkpoint process 0 writes resumes on any number of processes.
    """

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        data: DataBundle,
        device: torch.device,
        sparsifier_options: Mapping[str, Any],
    ):
        self.config, self.run_dir, self.data, self.device = config, run_dir, data, device
        self.ranks = parallel.current()
        self.steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        self.data_shape = {
            "num_classes": data.num_classes,
            "in_channels": data.in_channels,
            "image_size": data.image_size,
        }
        self.model = build_model(config.model, **self.data_shape).to(device)
        self.trained: nn.Module = self.model
        if self.ranks.world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.trained = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = make_optimizer(self.model, config)
        self.sp = None
        if config.method != "dense":
            self.sp = granet.sparsify(
                self.trained,
                self.optimizer,
                config.method,
                total_steps=self.total_steps,
                exclude=tuple(config.exclude),
                **{**config.sparsifier_options(), **sparsifier_options},
            )
        self.scaler = torch.amp.GradScaler(
            device.type, enabled=config.amp == "fp16" and device.type == "cuda"
        )
        self.sparse_names = list(layer_summary(self.model, self.sp))
        self.epoch = self.batch = self.step = 0
        self.train_seconds = 0.0
        self.best: dict[str, Any] | None = None
        self._reset_sums()

    def _reset_sums(self) -> None:
        zeros = torch.zeros((), dtype=torch.float64, device=self.device)
        self.sums = {
            "loss": zeros.clone(),
            "correct": zeros.clone(),
            "seen": 0,
            "density": torch.zeros(len(self.sparse_names), dtype=torch.float64, device=self.device),
            "seconds": 0.0,
        }

    def checkpoint(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "sparsifier": None if self.sp is None else self.sp.state_dict(),
            "scaler": self.scaler.state_dict(),
            "position": {"epoch": self.epoch, "batch": self.batch, "step": self.step},
            "sums": self._sums_across(),
            "train_seconds": self.train_seconds,
            "best": self.best,
            "rng": _rng_state(self.device),
            "data_shape": self.data_shape,
            "data_source": self.data.source,
        }

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{checkpoint_path(self.run_dir, 'last')} has checkpoint format "
                f"{state.get('format')!r}; this granet reads format {CHECKPOINT_FORMAT}"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.sp is not None:
            self.sp.load_state_dict(state["sparsifier"])
        self.scaler.load_state_dict(state["scaler"])
        if state["data_source"] != self.data.source:
            _log(
                f"warning: this run was trained on {state['data_source']}; resuming it on "
                f"{self.data.source}"
            )
        pos = state["position"]
        self.epoch, self.batch, self.step = pos["epoch"], pos["batch"], pos["step"]
        if self.ranks.main:  # the saved sums are over all processes: count them once
            self.sums = state["sums"]
        self.train_seconds = state["train_seconds"]
        self.best = state["best"]
        _set_rng_state(state["rng"], self.device)

    def _sums_across(self) -> dict[str, Any]:
        """The epoch's running sums over all processes (the densities are the same on all)."""
        s = self.sums
        if self.ranks.world == 1:
            return s
        seen = torch.tensor(float(s["seen"]), dtype=torch.float64, device=self.device)
        totals = parallel.sum_across(torch.stack([s["loss"], s["correct"], seen]), self.ranks)
        return {**s, "loss": totals[0], "correct": totals[1], "seen": int(totals[2].item())}

    def save_last(self) -> None:
        """Write ``last.pt`` (process 0; every process must call this, at the same step)."""
        state = self.checkpoint()
        if self.ranks.main:
            save_checkpoint(state, checkpoint_path(self.run_dir, "last"))

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
        if self.sp is not None:
            s["density"] += torch.stack([m.sum() / m.numel() for m in self.sp.masks.values()])
        else:
            s["density"] += 1.0
        return loss.detach() / len(y)

    def end_epoch(self) -> dict[str, Any]:
        """Validate, log the epoch to metrics.jsonl, keep the best checkpoint, save the last."""
        started = time.perf_counter()
        c, s = self.config, self._sums_across()
        last = self.epoch + 1 == c.epochs
        if self.val_loader is None:  # no validation split: the last epoch is the one tested
            val_loss = val_acc = None
            is_best = last
        else:
            val_loss, val_acc = evaluate(
                self.model, self.val_loader, self.device, c.amp, self.ranks
            )
            eligible = _at_final_sparsity(self.sp, c.sparsity) or last
            is_best = eligible and (self.best is None or val_acc > self.best["val_accuracy"])
        steps = self.batch
        stats = self.sp.stats() if self.sp is not None else None
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
        if self.ranks.main:
            with open(self.run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
        if is_best:
            self.best = {"epoch": self.epoch + 1, "val_accuracy": val_acc}
        if is_best and self.ranks.main:
            save_checkpoint(
                {
                    "model": self.model.state_dict(),
                    "sparsifier": None if self.sp is None else self.sp.state_dict(),
                    "data_shape": self.data_shape,
                    **self.best,
                },
                checkpoint_path(self.run_dir, "best"),
            )
        self.train_seconds += time.perf_counter() - started
        self.epoch += 1
        self.batch = 0
        self._reset_sums()
        self.save_last()
        return record

    # ------------------------------------------------------------------------- the loop
    def fit(self, progress: bool, on_step: Callable[[int], None] | None) -> None:
        c = self.config
        self.val_loader = (
            eval_loader(self.data.val, c, self.device, self.ranks) if len(self.data.val) else None
        )
        with _stop_on_signals() as stop:
            while self.epoch < c.epochs:
                if self._stop(stop):  # arrived during the previous epoch's validation
                    self._interrupt(stop)
                n = len(self.data.train)
                batches = epoch_batches(n, c.batch_size, c.seed, self.epoch)[self.batch :]
                loader = _loader(
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
                    disable=not progress,
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
                    if progress and time.monotonic() - shown > 0.5:
                        shown = time.monotonic()
                        bar.set_postfix(
                            loss=f"{loss.item():.3f}",
                            acc=f"{self.sums['correct'].item() / self.sums['seen']:.3f}",
                            sparsity=f"{self.sp.sparsity() if self.sp else 0.0:.3f}",
                            refresh=False,
                        )
                    if on_step is not None:
                        on_step(self.step)
                    stopping = self._stop(stop, self.step)
                    if stopping:
                        break
                bar.close()
                elapsed = time.perf_counter() - started
                self.sums["seconds"] += elapsed
                self.train_seconds += elapsed
                if stopping:
                    self._interrupt(stop)
                _log(_epoch_line(self.end_epoch(), c.epochs))
            if self._stop(stop):
                self._interrupt(stop)

    def _stop(self, stop: _StopRequest, step: int | None = None) -> bool:
        """Whether to stop here for a Ctrl-C / SIGTERM. With several processes, a decision all
        share, taken between epochs and every ``STOP_CHECK_EVERY`` steps: a signal reaches
        each process at its own moment, and they must all stop after the same step."""
        if self.ranks.world == 1:
            return stop.signum is not None
        if step is not None and step % STOP_CHECK_EVERY:
            return False
        return parallel.any_across(stop.signum is not None, self.ranks, self.device)

    def _interrupt(self, stop: _StopRequest) -> None:
        self.save_last()
        signum = stop.signum or signal.SIGTERM  # a process the signal has not reached yet
        raise TrainingInterrupted(self.run_dir, self.step, signum)

    # ----------------------------------------------------------------------- the report
    def finish(self) -> dict[str, Any]:
        """Test the best checkpoint once and write report.json, report.md and the plots."""
        c = self.config
        best = load_checkpoint(checkpoint_path(self.run_dir, "best"), self.device)
        self.model.load_state_dict(best["model"])
        if self.sp is not None:
            self.sp.load_state_dict(best["sparsifier"])
        test_loss, test_acc = evaluate(
            self.model, eval_loader(self.data.test, c, self.device), self.device, c.amp
        )
        stats = self.sp.stats() if self.sp is not None else None
        layers = layer_summary(self.model, self.sp)
        counts = flop_count.count_flops(
            lambda: build_model(c.model, **self.data_shape),
            (self.data.in_channels, self.data.image_size, self.data.image_size),
            self.sparse_names,
        )
        metrics = read_metrics(self.run_dir)
        total_params = sum(p.numel() for p in self.model.parameters())
        pruned = sum(v["numel"] - v["nnz"] for v in layers.values())
        report = {
            "run_dir": str(self.run_dir),
            "method": c.method,
            "model": c.model,
            "dataset": c.dataset,
            "seed": c.seed,
            "test_accuracy": test_acc,
            "test_loss": test_loss,
            "checkpoint": {
                "which": "best",
                "epoch": best["epoch"],
                "val_accuracy": best["val_accuracy"],
                "rule": TEST_CHECKPOINT_RULE,
            },
            "last_epoch_val_accuracy": metrics[-1]["val_accuracy"],
            "sparsity": stats["sparsity"] if stats else 0.0,
            "target_sparsity": 0.0 if self.sp is None else c.sparsity,
            "itop_rate": stats["itop_rate"] if stats else None,
            "train_seconds": self.train_seconds,
            "epochs": c.epochs,
            "steps": self.step,
            "steps_per_epoch": self.steps_per_epoch,
            "parameters": {"total": total_params, "nonzero": total_params - pruned},
            "layers": layers,
            "flops": {
                "inference_per_sample": flop_count.inference_flops(
                    counts, {n: v["density"] for n, v in layers.items()}
                ),
                "training_total": flop_count.training_flops(
                    counts, [(m["samples"], m["layer_density"]) for m in metrics]
                ),
                "counted": flop_count.NOTE,
            },
            "data": {
                "dataset": c.dataset,
                "source": self.data.source,
                "train": len(self.data.train),
                "val": len(self.data.val),
                "test": len(self.data.test),
            },
            "environment": {
                "device": str(self.device),
                "hardware": hardware(self.device, self.ranks.world),
                "processes": self.ranks.world,
                "torch": torch.__version__,
                "python": platform.python_version(),
                "granet": granet.__version__,
            },
            "config": c.to_dict(),
        }
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


def _truncate_metrics(run_dir: Path, epochs_done: int) -> None:
    """Drop metrics lines of epochs the checkpoint does not include (killed mid-save)."""
    path = run_dir / METRICS_FILE
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln)["epoch"] <= epochs_done]
        path.write_text("".join(ln + "\n" for ln in kept))


def _check_shares(examples: int, batch_size: int, processes: int) -> None:
    """Every process must get at least one example of every global batch."""
    last = examples % batch_size or batch_size
    if min(batch_size, last) < processes:
        raise ValueError(
            f"batch_size {batch_size} (the global batch) leaves a batch of "
            f"{min(batch_size, last)} example(s) for {processes} processes: every process needs "
            "at least one; change batch_size (or val_size)"
        )


def _seen_by_all(path: Path, ranks: parallel.Ranks, device: torch.device) -> bool:
    """Whether ``path`` exists, on every process's filesystem; an error if only on some."""
    seen = torch.tensor([float(path.is_file())], device=device)
    count = int(parallel.sum_across(seen, ranks).item())
    if 0 < count < ranks.world:
        raise FileNotFoundError(
            f"{path} is there for {count} of the {ranks.world} processes: resuming a run on "
            "several machines needs its folder on a filesystem all of them see"
        )
    return count > 0


def train(
    config: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool | None = None,
    on_step: Callable[[int], None] | None = None,
    sparsifier_options: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Train one run into ``run_dir`` (which must exist) and return its report.

    ``resume`` continues from ``checkpoints/last.pt`` when there is one. ``progress`` shows a
    tqdm bar (default: when stderr is a terminal); otherwise one log line per epoch. ``on_step``
    is called with the global step after every optimizer step. ``sparsifier_options`` go to the
    sparsifier on top of the config's: the options a file cannot hold (a score or schedule given
    as a Python callable). Raises
    :class:`TrainingInterrupted` after saving a checkpoint on Ctrl-C / SIGTERM.

    Inside a torchrun process group (see :mod:`granet.experiment.parallel`) every process calls
    this; process 0 logs, writes ``run_dir`` and returns the report, the others return None.
    """
    run_dir = Path(run_dir)
    ranks = parallel.current()
    if progress is None:
        progress = sys.stderr.isatty()
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(config.seed)
    data = parallel.staged(
        lambda: load_dataset(
            config.dataset,
            config.data_root,
            val_size=config.val_size,
            seed=config.seed,
            augment=config.augment,
        ),
        ranks,
    )
    _log(
        f"data: {data.source}; {len(data.train)} train, {len(data.val)} validation, "
        f"{len(data.test)} test"
    )
    _check_shares(len(data.train), config.batch_size, ranks.world)
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    config = config.resolved(config.epochs * steps_per_epoch)
    run = _Run(config, run_dir, data, device, sparsifier_options or {})
    last = checkpoint_path(run_dir, "last")
    if resume and _seen_by_all(last, ranks, device):
        run.restore(load_checkpoint(last, device))
        if ranks.main:
            _truncate_metrics(run_dir, run.epoch)
        finished = parallel.broadcast((run_dir / REPORT_JSON).is_file(), ranks)
        if run.epoch == config.epochs and finished:
            _log(f"{run_dir} has already finished")
            return read_report(run_dir) if ranks.main else None
        _log(f"resuming {run_dir} at epoch {run.epoch + 1}, step {run.step}")
    elif ranks.main:
        save_config(config, run_dir / "config.yaml")
        _truncate_metrics(run_dir, 0)
    _log(
        f"training {config.method} ({'dense' if run.sp is None else f'sparsity {config.sparsity}'})"
        f" {config.model} on {device} ({hardware(device, ranks.world)}): {config.epochs} epochs x "
        f"{run.steps_per_epoch} steps, into {run_dir}"
    )
    run.fit(progress and ranks.main, on_step)
    if not ranks.main:
        return None
    report = run.finish()
    chosen = "best by validation" if report["data"]["val"] else "the last epoch"
    _log(
        f"test accuracy {percent(report['test_accuracy'])} (checkpoint {chosen}, "
        f"epoch {report['checkpoint']['epoch']}); report in {run_dir}"
    )
    return report
