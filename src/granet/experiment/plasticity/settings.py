"""Pruning plasticity (Liu et al., NeurIPS 2021, section 3): how well a network recovers from
one-shot pruning, as a function of when in training it is pruned, how much, and whether
connections regenerate.

A study trains one run (the *base*: dense, or sparse with any method) and keeps a checkpoint
at each pruning epoch ``e`` with its test accuracy ``t_pre``. For every epoch x rate x variant
it prunes that checkpoint one-shot by magnitude (:func:`granet.oneshot.prune`), measures
``t_after_prune``, continues training (a *continuation*) and records its final test accuracy
``t_continue``. ``plasticity = t_continue / t_pre``; ``final_gap = t_continue - t_final``, the
base run's final test accuracy.

Variants (:data:`VARIANTS`), each continuing from the same pruned checkpoint:

* ``prune``: the pruned masks stay fixed (static sparse training).
* ``prune+regrow``: GraNet's zero-cost neuroregeneration for the rest of training: every
  ``update_every`` steps each layer drops its ``ceil(r_t * nnz)`` smallest weights and regrows
  as many where the dense gradient is largest (RigL's round at the pruned sparsity), ``r_t``
  following GraNet's cosine decay over the whole schedule (with ``--continue rewind``: over
  the continuation).
* ``prune+regrow-once``: the paper's one-shot regrowth (:func:`granet.oneshot.regrow`): right
  after the prune, each layer regrows as many connections as it lost where the gradient of one
  training batch is largest, at zero; the masks then stay fixed. The network is back at its
  pre-prune density (a dense base: every pruned position comes back, at zero).

Continuations (``continuation``): ``schedule`` trains the rest of the base run's schedule
(epochs ``e + 1`` to the end, at the learning rate the base run had there, its optimizer
state included); ``rewind`` trains ``continue_epochs`` epochs from the pruned weights with a
fresh optimizer and the base schedule laid over those epochs (the learning rate rewound to its
start), the same budget for every pruning epoch.

The study folder (``OUT``)::

    plasticity.json   the study's settings: a folder made with other settings is refused
    plasticity.lock   held by the one process running the study
    base/             the base run (a granet run folder); base/checkpoints/epoch-<e>.pt and
                      epoch-<e>.json (its t_pre) at every pruning epoch
    cells/<cell>/     each continuation, a granet run folder (cells/<cell>.log with workers)
    plasticity.csv, plasticity.md, plasticity.png

A continuation is a run of its own: it starts as a checkpoint written here (the pruned
weights, their masks, the base run's optimizer state) and trains like a run resumed with
``granet train --resume``, so a study stopped anywhere picks up where it stopped when the same
command runs again, and ``workers`` continuations train at once in their own processes. With
the same settings the study computes the same numbers (the base run's seed seeds everything).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from granet import checks, oneshot
from granet.experiment.blocks import (
    check_schedule,
    epoch_batches,
    load_data,
    log,
    lr_factor,
    make_optimizer,
    resolve_device,
)
from granet.experiment.checkpoints import CHECKPOINT_DIR, checkpoint_path, load_checkpoint
from granet.experiment.config import Config, make_config, read_config_file
from granet.experiment.datasets import DataBundle
from granet.experiment.files import FolderLock, to_json, write_atomic
from granet.experiment.folder import (
    MARKER_FILE,
    REPORT_JSON,
    clear_folder,
    differing_settings,
    open_run,
    read_marker_file,
    run_name,
    settings_of,
    without_how,
    write_marker_file,
)
from granet.experiment.models import build_model
from granet.experiment.plots import plot_plasticity
from granet.experiment.processes import Job, resume_command, resumed_config, run_processes
from granet.experiment.records import read_report, read_run_config
from granet.experiment.report import counted, csv_row, percent
from granet.experiment.signals import Interrupted, stop_on_signals, stopped_as
from granet.experiment.tables import markdown_table
from granet.experiment.train import train
from granet.experiment.trainer import Callbacks, StartFrom, Trainer
from granet.masks import pack_bits, unpack_bits
from granet.pruning import PRUNING


@dataclass(frozen=True)
class Variant:
    """What happens after the one-shot prune: the continuation's method (``static``: masks
    fixed; ``rigl``: drop-and-regrow rounds) and whether connections regrow at once."""

    method: str
    regrow_once: bool
    summary: str


VARIANTS: dict[str, Variant] = {
    "prune": Variant("static", False, "the pruned masks stay fixed"),
    "prune+regrow": Variant(
        "rigl",
        False,
        "GraNet's drop-and-regrow rounds every update_every steps at the pruned sparsity",
    ),
    "prune+regrow-once": Variant(
        "static",
        True,
        "as many connections as pruned regrow at once where the gradient is largest, at zero; "
        "the masks then stay fixed",
    ),
}
CONTINUATIONS = ("schedule", "rewind")
DEFAULT_RATES = (0.2, 0.5, 0.9)
DEFAULT_VARIANTS = ("prune", "prune+regrow")
# The base run's defaults where a study's differ from granet train's: a dense network, a
# convolutional one as in the paper's study (LeNet-5), the papers' protocol (no validation
# split, the last epoch tested), and a training set small enough that the default study (54
# continuations) finishes in well under half an hour on a 2-core CPU.
BASE_DEFAULTS: dict[str, Any] = {
    "method": "dense",
    "model": "lenet5",
    "val_size": 0.0,
    "train_size": 6000,
}

STUDY_FILE = "plasticity.json"
STUDY_LOCK = "plasticity.lock"
STUDY_KIND = "granet plasticity study"
BASE_DIR = "base"
CELLS_DIR = "cells"
CELL_FILE = "oneshot.json"
CSV_FILE, MD_FILE, PNG_FILE = "plasticity.csv", "plasticity.md", "plasticity.png"
COLUMNS = (
    "prune_epoch",
    "rate",
    "variant",
    "t_pre",
    "t_after_prune",
    "t_continue",
    "plasticity",
    "final_gap",
    "t_final",
    "sparsity_before",
    "sparsity_after_prune",
    "sparsity",
    "lr_at_prune",
    "continue_epochs",
    "seed",
    "cell",
)
_STOPPED = "plasticity study stopped; run the same command again to resume it"


# ------------------------------------------------------------------------------ the study
@dataclass(frozen=True)
class Cell:
    """One continuation: pruned after epoch ``prune_epoch`` at ``rate``, then ``variant``."""

    prune_epoch: int
    rate: float
    variant: str

    @property
    def name(self) -> str:
        """The cell's folder name under ``cells/``."""
        return f"e{self.prune_epoch}-r{self.rate:g}-{self.variant}"


def every_tenth(epochs: int, last: int) -> list[int]:
    """The epochs at every 10% of training, within ``[1, last]``."""
    return sorted({e for k in range(1, 10) if 1 <= (e := round(epochs * k / 10)) <= last})


@dataclass(frozen=True)
class Study:
    """The settings of a plasticity study (see the module). ``base`` is the base run's config;
    ``prune_epochs`` are epochs of training done when pruning (default: every 10% of
    training), ``rates`` fractions of the remaining weights, ``pruning`` ``global`` (one
    threshold) or ``uniform`` (each layer by the rate); ``continue_epochs`` is the budget of
    ``continuation="rewind"``."""

    base: Config
    prune_epochs: tuple[int, ...] | None = None
    rates: tuple[float, ...] = DEFAULT_RATES
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    pruning: str = "global"
    continuation: str = "schedule"
    continue_epochs: int | None = None

    def __post_init__(self) -> None:
        checks.choice("pruning", self.pruning, PRUNING)
        checks.choice("continue", self.continuation, dict.fromkeys(CONTINUATIONS))
        rewind = self.continuation == "rewind"
        if rewind:
            if self.continue_epochs is None:
                raise ValueError("continue=rewind needs continue_epochs (--continue-epochs N)")
            checks.integer("continue_epochs", self.continue_epochs, 1)
        elif self.continue_epochs is not None:
            raise ValueError(
                f"continue_epochs is for continue=rewind; continue=schedule trains the rest of "
                f"the schedule (got continue_epochs={self.continue_epochs})"
            )
        epochs = self.base.epochs
        last = epochs if rewind else epochs - 1  # schedule: at least one epoch after pruning
        prune_epochs = self.prune_epochs
        if prune_epochs is None:
            prune_epochs = every_tenth(epochs, last)
            if not prune_epochs:
                raise ValueError(f"epochs={epochs} leaves no epoch to prune after")
        prune_epochs = tuple(prune_epochs)
        ok = all(
            not isinstance(e, bool) and isinstance(e, int) and 1 <= e <= last for e in prune_epochs
        )
        if not prune_epochs or not ok or list(prune_epochs) != sorted(set(prune_epochs)):
            why = "" if rewind else "; continue=schedule trains at least one epoch after pruning"
            raise ValueError(
                f"prune_epochs must be increasing epochs in [1, {last}] (epochs={epochs}{why}); "
                f"got {' '.join(map(str, prune_epochs))}"
            )
        rates = tuple(self.rates)
        for r in rates:
            checks.number("rates", r, lambda v: 0.0 < v < 1.0, "in (0, 1)")
        if not rates or len(set(rates)) != len(rates):
            raise ValueError(f"rates must be distinct fractions in (0, 1); got {list(rates)}")
        variants = tuple(self.variants)
        for v in variants:
            checks.choice("variants", v, VARIANTS)
        if not variants or len(set(variants)) != len(variants):
            raise ValueError(f"variants must name each variant once; got {list(variants)}")
        rates = tuple(float(r) for r in rates)
        if len({f"{r:g}" for r in rates}) != len(rates):
            raise ValueError(f"rates must differ in their first 6 digits; got {list(rates)}")
        for name, value in (
            ("prune_epochs", prune_epochs),
            ("rates", rates),
            ("variants", variants),
        ):
            object.__setattr__(self, name, value)
        for variant in variants:  # the continuations' settings are valid: refused now if not
            continuation_config(self, Cell(prune_epochs[0], rates[0], variant), 0.5, 1)

    @property
    def cells(self) -> list[Cell]:
        """Every pruning epoch x rate x variant, in that order."""
        return [Cell(e, r, v) for e in self.prune_epochs for r in self.rates for v in self.variants]

    def settings(self) -> dict[str, Any]:
        """What identifies the study (``plasticity.json``): where and how fast it runs aside."""
        return {
            "base": settings_of(self.base),
            "prune_epochs": list(self.prune_epochs),
            "rates": list(self.rates),
            "variants": list(self.variants),
            "pruning": self.pruning,
            "continue": self.continuation,
            "continue_epochs": self.continue_epochs,
        }

    def base_label(self) -> str:
        """``dense``, or the base run's method and sparsity (``rigl at sparsity 0.5``)."""
        b = self.base
        return "dense" if b.method == "dense" else f"{b.method} at sparsity {b.sparsity:g}"

    def lr_decays(self) -> list[float]:
        """The epochs (fractional) where the base run's step schedule divides the LR by 10."""
        if self.base.schedule != "step":
            return []
        return [m * self.base.epochs for m in self.base.lr_milestones]


def base_config(file: str | Path | None = None, flags: Mapping[str, Any] | None = None) -> Config:
    """The base run's config: :data:`BASE_DEFAULTS`, then a YAML ``file``, then ``flags``."""
    values = dict(BASE_DEFAULTS)
    if file is not None:
        values.update(read_config_file(file))
    values.update(flags or {})
    try:
        return make_config(values)
    except ValueError as e:
        raise ValueError(f"{file}: {e}" if file is not None else str(e)) from None


def default_out(config: Config, root: str | Path = "runs") -> Path:
    """``runs/plasticity-<dataset>-<model>-<method>[-s<sparsity>]-seed<seed>``: the same
    command finds its study again."""
    return Path(root) / f"plasticity-{run_name(config)}"


def continuation_config(study: Study, cell: Cell, sparsity: float, update_every: int) -> Config:
    """The settings of ``cell``'s continuation: the base run's, with the variant's method at the
    pruned ``sparsity`` and the base run's topology cadence. Its masks come from the cell's
    first checkpoint; ``init`` and ``distribution`` only say how the sparsifier draws the masks
    that the checkpoint then replaces (for ``prune`` on a dense base with ``global`` pruning,
    the very same masks)."""
    base, variant = study.base, VARIANTS[cell.variant]
    regrow = base.regrow_fraction if variant.method == "rigl" else 0.0
    values = {
        **base.to_dict(),
        "method": variant.method,
        "sparsity": sparsity,
        "init_sparsity": sparsity,
        "init": "magnitude",
        "distribution": study.pruning,
        "scale_init": False,
        "regrow_fraction": regrow,
        "update_every": update_every,
    }
    if study.continuation == "rewind":
        values["epochs"] = study.continue_epochs
    return make_config(values)


# ------------------------------------------------------------------------------ its folder
def _point(out: Path, epoch: int, suffix: str = ".pt") -> Path:
    return out / BASE_DIR / CHECKPOINT_DIR / f"epoch-{epoch}{suffix}"


def _cell_dir(out: Path, cell: Cell) -> Path:
    return out / CELLS_DIR / cell.name


def _refuse_foreign(out: Path) -> None:
    """Refuse a folder that holds anything but a plasticity study (before locking it)."""
    foreign = out.is_dir() and not (out / STUDY_FILE).is_file()
    if foreign and any(p.name != STUDY_LOCK for p in out.iterdir()):
        what = "a granet run folder" if (out / MARKER_FILE).is_file() else "a folder"
        raise FileExistsError(
            f"{out} is {what}, not a plasticity study (no {STUDY_FILE}); use another --out"
        )


# settings a study may gain values of on a rerun: its base run and other cells stay valid
GROWABLE = ("rates", "variants")


def _open_study(study: Study, out: Path, overwrite: bool) -> None:
    """Check that ``out`` is this study's folder (other rates or variants are fine: the cells
    it lacks are added), a new one or an empty one (with ``overwrite``: any plasticity study's,
    emptied); the caller holds the lock."""
    _refuse_foreign(out)
    marker = out / STUDY_FILE
    recorded = read_marker_file(marker, STUDY_KIND, "a granet plasticity study's")
    if recorded is not None:
        if overwrite:
            clear_folder(out, keep=(STUDY_LOCK,))
        else:
            settings = recorded.get("settings", {})
            fixed = {k: v for k, v in study.settings().items() if k not in GROWABLE}
            had = {k: settings.get(k) for k in fixed}
            if isinstance(had["base"], dict):  # how the base trains is not what it computes
                had["base"] = without_how(had["base"])
            diffs = differing_settings(had, {**fixed, "base": without_how(fixed["base"])})
            if diffs:
                raise ValueError(
                    f"{out} holds a plasticity study with other settings ({'; '.join(diffs)}); "
                    "use another --out, or --overwrite to start it again"
                )
            if settings == study.settings():
                return
    write_marker_file(marker, STUDY_KIND, settings=study.settings())


# ------------------------------------------------------------------------------- base run
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
    trainer.save(_point(out, epoch))
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
    write_atomic(_point(out, epoch, ".json"), to_json(info, indent=2) + "\n")


def _recover_point(study: Study, out: Path, data: DataBundle) -> None:
    """A base run killed (SIGKILL) right after a pruning epoch's checkpoint but before its
    prune point was kept: its ``last.pt`` is that point."""
    last = checkpoint_path(out / BASE_DIR)
    if not last.is_file():
        return
    state = load_checkpoint(last)
    epoch, batch = state["position"]["epoch"], state["position"]["batch"]
    if batch == 0 and epoch in study.prune_epochs and not _point(out, epoch, ".json").is_file():
        trainer = Trainer(study.base, data=data)
        trainer.load_state_dict(state, last)
        save_prune_point(trainer, out)


def _train_base(
    study: Study, out: Path, data: DataBundle, callbacks: Sequence[Callbacks], progress: Any
) -> dict[str, Any]:
    base = out / BASE_DIR
    resume = (base / MARKER_FILE).is_file()
    if resume:
        _recover_point(study, out, data)
    log(f"[plasticity] base run: {base}")
    with stopped_as(_STOPPED):
        report = train(
            study.base,
            base,
            resume=resume,
            callbacks=[KeepPrunePoints(out, study.prune_epochs), *callbacks],
            progress=progress,
        )
    missing = [e for e in study.prune_epochs if not _point(out, e, ".json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"{base} has no checkpoint kept after epoch(s) {', '.join(map(str, missing))} "
            "(deleted?); start the study again with --overwrite"
        )
    return report


# --------------------------------------------------------------------------- continuations
def _gradients(
    model: torch.nn.Module, config: Config, data: DataBundle, epoch: int, names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The dense gradient of the mean training loss on the first batch of (0-based) epoch
    ``epoch``, the batch the continuation trains on first, at ``model``'s weights (a copy is
    used, so batch-norm statistics do not move)."""
    device = resolve_device(config.device)
    probe = copy.deepcopy(model).to(device).train()
    batch = epoch_batches(len(data.train), config.batch_size, config.seed, epoch)[0]
    # augmentation and dropout draw from a seeded RNG, not from whatever the process did before
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed + epoch)
        x, y = next(iter(DataLoader(data.train, batch_sampler=[batch])))
        loss = F.cross_entropy(
            probe(x.to(device)), y.to(device), label_smoothing=config.label_smoothing
        )
        loss.backward()
    params = dict(probe.named_parameters())
    return {n: params[n].grad.detach().cpu() for n in names}


def _masks_state(
    config: Config, data: DataBundle, model: Mapping[str, torch.Tensor], masks: Mapping, step: int
) -> dict[str, Any]:
    """A sparsifier state of ``config``'s continuation holding ``masks`` at ``step``: the state
    of the sparsifier a trainer of that config builds, with the masks replaced."""
    probe = Trainer(config, data=data, device="cpu", start=StartFrom(model))
    state = probe.sparsifier.state_dict()
    probe.sparsifier.remove()
    packed = {n: pack_bits(masks[n].cpu()) for n in probe.sparsifier.names}
    state.update(masks=packed, ever_active=dict(packed), step=step)
    return state


def prepare_cell(study: Study, out: Path, cell: Cell, data: DataBundle) -> dict[str, Any]:
    """Prune the base checkpoint of ``cell`` one-shot and write the continuation's first
    checkpoint (and ``oneshot.json``: what the prune did, ``t_after_prune``) into its run
    folder; a folder left by an earlier attempt that never got that far is replaced."""
    point_path = _point(out, cell.prune_epoch)
    point = load_checkpoint(point_path)
    base = make_config(read_run_config(out / BASE_DIR))  # resolved: its update_every
    model = build_model(base.model, **point["data_shape"])
    model.load_state_dict(point["model"])
    optimizer = make_optimizer(model, base)
    optimizer.load_state_dict(point["optimizer"])
    masks = None
    if point.get("sparsifier") is not None:
        sp = point["sparsifier"]
        masks = {n: unpack_bits(m, sp["shapes"][n]) for n, m in sp["masks"].items()}
    before = 0.0 if masks is None else oneshot.sparsity(masks.values())  # the base's
    pruned = oneshot.prune(
        model,
        cell.rate,
        pruning=study.pruning,
        masks=masks,
        optimizer=optimizer,
        exclude=tuple(base.exclude),
    )
    after_prune = pruned.sparsity()
    schedule = study.continuation == "schedule"
    start_epoch = cell.prune_epoch if schedule else 0
    if VARIANTS[cell.variant].regrow_once:
        grads = _gradients(model, base, data, start_epoch, list(pruned.masks))
        pruned = oneshot.regrow(pruned, grads)
    config = continuation_config(study, cell, pruned.sparsity(), base.update_every)
    weights = model.state_dict()
    steps_per_epoch = math.ceil(len(data.train) / config.batch_size)
    state = _masks_state(config, data, weights, pruned.masks, start_epoch * steps_per_epoch)
    start = StartFrom(weights, optimizer.state_dict() if schedule else None, state, start_epoch)
    run_dir = _cell_dir(out, cell)
    with open_run(run_dir, overwrite=run_dir.is_dir()) as folder:
        trainer = Trainer(config, run_dir, data=data, start=start)
        folder.record_settings(trainer.config)
        loss, accuracy = trainer.evaluate("test")
        info = {
            "prune_epoch": cell.prune_epoch,
            "rate": cell.rate,
            "variant": cell.variant,
            "pruning": study.pruning,
            "continue": study.continuation,
            "t_after_prune": accuracy,
            "test_loss_after_prune": loss,
            "sparsity_before": before,
            "sparsity_after_prune": after_prune,
            "sparsity": pruned.sparsity(),
            "base_checkpoint": str(point_path),
        }
        write_atomic(run_dir / CELL_FILE, to_json(info, indent=2) + "\n")
        trainer.save(checkpoint_path(run_dir))  # last: the cell counts as prepared
        trainer.sparsifier.remove()
    log(
        f"[plasticity] {cell.name}: sparsity {before:.4f} -> {after_prune:.4f}"
        f"{f' (regrown: {pruned.sparsity():.4f})' if pruned.sparsity() != after_prune else ''}, "
        f"test accuracy after the prune {percent(accuracy)}"
    )
    return info


def _prepared(run_dir: Path) -> bool:
    return checkpoint_path(run_dir).is_file() and (run_dir / CELL_FILE).is_file()


def _run_cells(
    study: Study,
    out: Path,
    data: DataBundle,
    workers: int,
    callbacks: Sequence[Callbacks],
    progress: Any,
) -> None:
    todo = [c for c in study.cells if not (_cell_dir(out, c) / REPORT_JSON).is_file()]
    log(
        f"[plasticity] {len(study.cells) - len(todo)} of {len(study.cells)} continuations "
        f"finished earlier; {len(todo)} to train"
    )
    if workers == 1 or len(todo) <= 1:
        with stop_on_signals() as stop:  # a signal between two runs stops after the current
            for i, cell in enumerate(todo, 1):
                run_dir = _cell_dir(out, cell)
                log(f"[plasticity] continuation {i}/{len(todo)}: {cell.name}")
                if not _prepared(run_dir):
                    prepare_cell(study, out, cell, data)
                if stop.asked:
                    raise Interrupted(stop.signum, _STOPPED)
                with stopped_as(_STOPPED):
                    train(
                        resumed_config(run_dir, study.base),
                        run_dir,
                        resume=True,
                        callbacks=callbacks,
                        progress=progress,
                    )
        return
    by_name = {c.name: c for c in todo}

    def command(job: Job, resume: bool, overwrite: bool, logs: Path) -> list[str]:
        if not _prepared(job.run_dir):
            prepare_cell(study, out, by_name[job.name], data)
        return resume_command(job.run_dir, study.base)

    # a job's config is the base run's: the continuation's own is known once it is pruned
    jobs = [(Job(c.name, study.base, _cell_dir(out, c)), True) for c in todo]
    (out / CELLS_DIR).mkdir(exist_ok=True)
    with stopped_as(_STOPPED):
        run_processes(jobs, workers, False, out / CELLS_DIR, command)


# ------------------------------------------------------------------------------- results
def plasticity_rows(study: Study, out: Path) -> list[dict[str, Any]]:
    """One row per cell (:data:`COLUMNS`), from the finished runs of the study folder."""
    t_final = read_report(out / BASE_DIR)["test_accuracy"]
    points = {
        e: json.loads(_point(out, e, ".json").read_text()) for e in sorted(study.prune_epochs)
    }
    rows = []
    for cell in study.cells:
        run_dir = _cell_dir(out, cell)
        report = read_report(run_dir)
        info = json.loads((run_dir / CELL_FILE).read_text())
        t_pre, t_continue = points[cell.prune_epoch]["t_pre"], report["test_accuracy"]
        rows.append(
            {
                "prune_epoch": cell.prune_epoch,
                "rate": cell.rate,
                "variant": cell.variant,
                "t_pre": t_pre,
                "t_after_prune": info["t_after_prune"],
                "t_continue": t_continue,
                "plasticity": t_continue / t_pre,
                "final_gap": t_continue - t_final,
                "t_final": t_final,
                "sparsity_before": info["sparsity_before"],
                "sparsity_after_prune": info["sparsity_after_prune"],
                "sparsity": report["sparsity"],
                "lr_at_prune": points[cell.prune_epoch]["lr"],
                "continue_epochs": study.continue_epochs
                if study.continuation == "rewind"
                else study.base.epochs - cell.prune_epoch,
                "seed": study.base.seed,
                "cell": cell.name,
            }
        )
    return rows


def plasticity_markdown(study: Study, rows: Sequence[Mapping[str, Any]]) -> str:
    """``plasticity.md``: the settings, then per variant a table of plasticity (and the
    accuracy after continuing) by pruning epoch and rate."""
    b = study.base
    base = study.base_label()
    decays = ", ".join(f"{d:g}" for d in study.lr_decays()) or "none (cosine schedule)"
    how = (
        "the rest of the base schedule"
        if study.continuation == "schedule"
        else f"{counted(study.continue_epochs, 'epoch')} at the rewound learning rate"
    )
    lines = [
        f"# Pruning plasticity: {b.model} on {b.dataset}, {base} base, seed {b.seed}",
        "",
        f"Base run: {counted(b.epochs, 'epoch')}, lr {b.lr:g} ({b.schedule}), learning-rate "
        f"decays after epoch {decays}; final test accuracy t_final = "
        f"{percent(rows[0]['t_final'])}.",
        f"One-shot {study.pruning} magnitude pruning of the remaining weights, then {how}.",
        "Each cell: plasticity = t_continue / t_pre (in brackets: t_after_prune -> "
        "t_continue, %; the final gap t_continue - t_final, points).",
    ]
    for variant in study.variants:
        lines += ["", f"## {variant}: {VARIANTS[variant].summary}", ""]
        header = ["epoch", "lr", "t_pre", *(f"rate {r:g}" for r in study.rates)]
        table = []
        for epoch in study.prune_epochs:
            mine = {
                r["rate"]: r for r in rows if r["variant"] == variant and r["prune_epoch"] == epoch
            }
            first = next(iter(mine.values()))
            cells = [
                f"{mine[r]['plasticity']:.3f} ({100 * mine[r]['t_after_prune']:.1f} -> "
                f"{100 * mine[r]['t_continue']:.1f}; {100 * mine[r]['final_gap']:+.1f})"
                for r in study.rates
            ]
            table.append(
                [str(epoch), f"{first['lr_at_prune']:.3g}", percent(first["t_pre"]), *cells]
            )
        lines += markdown_table(header, table)
    return "\n".join(lines) + "\n"


def write_results(study: Study, out: Path, rows: Sequence[Mapping[str, Any]]) -> list[Path]:
    """``plasticity.csv``, ``plasticity.md`` and ``plasticity.png`` into the study folder."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(map(csv_row, rows))
    table = out / CSV_FILE
    write_atomic(table, text.getvalue())
    md = out / MD_FILE
    write_atomic(md, plasticity_markdown(study, rows))
    b = study.base
    title = f"{b.model} on {b.dataset}, {study.base_label()} base"
    figure = plot_plasticity(rows, out / PNG_FILE, study.variants, study.lr_decays(), title)
    return [table, md, figure]


def _drop_checkpoints(study: Study, out: Path) -> None:
    for cell in study.cells:
        folder = _cell_dir(out, cell) / CHECKPOINT_DIR
        if (folder.parent / REPORT_JSON).is_file() and folder.is_dir():
            shutil.rmtree(folder)


def run_study(
    study: Study,
    out: str | Path,
    *,
    workers: int = 1,
    overwrite: bool = False,
    keep_checkpoints: bool = False,
    callbacks: Sequence[Callbacks] = (),
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Run (or resume) ``study`` in the folder ``out`` and write its results; returns the rows
    of ``plasticity.csv``.

    ``workers > 1`` trains that many continuations at once, each in a ``granet train``
    process. ``overwrite`` empties a study folder first. Each continuation's checkpoints are
    removed once it has finished, unless ``keep_checkpoints``; the base run's are kept.
    ``callbacks`` hook into every run trained in this process (the base run, and the
    continuations when ``workers`` is 1). Raises
    :class:`~granet.experiment.signals.Interrupted` on Ctrl-C / SIGTERM after the runs in
    progress saved checkpoints.
    """
    checks.integer("workers", workers, 1)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a study folder")
    _refuse_foreign(out)
    data = load_data(study.base)  # missing data or an unreachable schedule: no folder written
    check_schedule(study.base, len(data.train))
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, "plasticity study", STUDY_LOCK):
        _open_study(study, out, overwrite)
        log(f"[plasticity] {out}: {len(study.cells)} continuations; data: {data.source}")
        _train_base(study, out, data, callbacks, progress)
        _run_cells(study, out, data, workers, callbacks, progress)
        rows = plasticity_rows(study, out)
        write_results(study, out, rows)
        if not keep_checkpoints:
            _drop_checkpoints(study, out)
    return rows
