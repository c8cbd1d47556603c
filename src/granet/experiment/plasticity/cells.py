"""A plasticity study's cells: each prunes its prune point one-shot (and regrows, for
``prune+regrow-once``), writes that state as the first checkpoint of its own run folder, and
trains on from there like a run resumed with ``granet train --resume``: in this process, or
``workers`` at a time in a pool of ``granet train`` processes."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from granet import oneshot
from granet.experiment.blocks import epoch_batches, log, make_optimizer, resolve_device
from granet.experiment.checkpoints import checkpoint_path, load_checkpoint
from granet.experiment.config import Config, make_config
from granet.experiment.datasets import DataBundle
from granet.experiment.files import to_json, write_atomic
from granet.experiment.folder import REPORT_JSON, open_run
from granet.experiment.models import build_model
from granet.experiment.plasticity.folder import (
    BASE_DIR,
    CELL_FILE,
    CELLS_DIR,
    STOPPED,
    cell_dir,
    prepared,
    prune_point,
)
from granet.experiment.plasticity.settings import VARIANTS, Cell, Study, continuation_config
from granet.experiment.processes import Job, resumed_config, run_processes
from granet.experiment.records import read_run_config
from granet.experiment.signals import Interrupted, StopRequest, stop_on_signals, stopped_as
from granet.experiment.tables import percent
from granet.experiment.train import train
from granet.experiment.trainer import Callbacks, StartFrom, Trainer
from granet.masks import unpack_bits


def regrowth_gradients(
    model: torch.nn.Module, config: Config, data: DataBundle, epoch: int, names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The dense gradient of the mean training loss on the first batch of (0-based) epoch
    ``epoch``, the batch the continuation trains on first, at ``model``'s weights (a copy is
    used, so batch-norm statistics do not move): what ``prune+regrow-once`` regrows by."""
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


def prepare_cell(study: Study, out: Path, cell: Cell, data: DataBundle) -> dict[str, Any]:
    """Prune the base checkpoint of ``cell`` one-shot and write the continuation's first
    checkpoint (and ``oneshot.json``: what the prune did, ``t_after_prune``) into its run
    folder; a folder left by an earlier attempt that never got that far is replaced."""
    point_path = prune_point(out, cell.prune_epoch)
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
        grads = regrowth_gradients(model, base, data, start_epoch, list(pruned.masks))
        pruned = oneshot.regrow(pruned, grads)
    config = continuation_config(study, cell, pruned.sparsity(), base.update_every)
    # the continuation's sparsifier takes the pruned masks at the prune point's step and keeps
    # the whole schedule (its regrowth decays as the base run's would have)
    start = StartFrom(
        model.state_dict(),
        optimizer.state_dict() if schedule else None,
        epoch=start_epoch,
        masks=pruned.masks,
    )
    run_dir = cell_dir(out, cell)
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


def _prepare(study: Study, out: Path, cell: Cell, data: DataBundle, stop: StopRequest) -> None:
    """Prepare ``cell`` unless an earlier attempt did; then stop if a signal came meanwhile."""
    if not prepared(cell_dir(out, cell)):
        prepare_cell(study, out, cell, data)
    if stop.asked:
        raise Interrupted(stop.signum, STOPPED)


def run_cells(
    study: Study,
    out: Path,
    data: DataBundle,
    workers: int,
    callbacks: Sequence[Callbacks],
    progress: Any,
) -> None:
    """Prepare and train every cell without a report yet. With one worker each is pruned and
    trained here in turn, on ``data``; with more, all are pruned here first, then trained by a
    pool of ``granet train --resume`` processes. A signal stops after the prune or run in
    progress (:class:`~granet.experiment.signals.Interrupted`)."""
    todo = [c for c in study.cells if not (cell_dir(out, c) / REPORT_JSON).is_file()]
    log(
        f"[plasticity] {len(study.cells) - len(todo)} of {len(study.cells)} continuations "
        f"finished earlier; {len(todo)} to train"
    )
    if workers > 1 and len(todo) > 1:
        with stop_on_signals() as stop:
            for cell in todo:
                _prepare(study, out, cell, data, stop)
        # a job's config is the base run's: the pool resumes each cell's own from its folder
        jobs = [(Job(c.name, study.base, cell_dir(out, c)), True) for c in todo]
        (out / CELLS_DIR).mkdir(exist_ok=True)
        with stopped_as(STOPPED):
            run_processes(jobs, workers, False, out / CELLS_DIR)
        return
    with stop_on_signals() as stop:  # a signal between two cells stops after the current
        for i, cell in enumerate(todo, 1):
            log(f"[plasticity] continuation {i}/{len(todo)}: {cell.name}")
            _prepare(study, out, cell, data, stop)
            run_dir = cell_dir(out, cell)
            with stopped_as(STOPPED):
                train(
                    resumed_config(run_dir, study.base),
                    run_dir,
                    resume=True,
                    callbacks=callbacks,
                    progress=progress,
                    data=data,
                )
