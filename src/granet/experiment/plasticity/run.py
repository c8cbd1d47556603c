"""Run a plasticity study from start, or from where it stopped, to its results: the data
loaded once, the folder checked and locked, the base run, the cells, the results."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from granet import checks
from granet.experiment.blocks import check_schedule, load_data, log
from granet.experiment.files import FolderLock
from granet.experiment.plasticity.base import train_base
from granet.experiment.plasticity.cells import run_cells
from granet.experiment.plasticity.folder import (
    STUDY_LOCK,
    drop_checkpoints,
    open_study,
    refuse_foreign,
)
from granet.experiment.plasticity.results import plasticity_rows, write_results
from granet.experiment.plasticity.settings import Study
from granet.experiment.trainer import Callbacks


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

    ``workers > 1`` prunes the continuations here, then trains that many at once, each in a
    ``granet train`` process. ``overwrite`` empties a study folder first. Each continuation's
    checkpoints are removed once it has finished, unless ``keep_checkpoints``; the base run's
    are kept.
    ``callbacks`` hook into every run trained in this process (the base run, and the
    continuations when ``workers`` is 1). Raises
    :class:`~granet.experiment.signals.Interrupted` on Ctrl-C / SIGTERM after the runs in
    progress saved checkpoints.
    """
    checks.integer("workers", workers, 1)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a study folder")
    refuse_foreign(out)
    # loaded once for every run trained here; missing data or an unreachable schedule: no
    # folder written
    data = load_data(study.base)
    check_schedule(study.base, len(data.train))
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, "plasticity study", STUDY_LOCK):
        open_study(study, out, overwrite)
        log(
            f"[plasticity] {out}: {len(study.cells)} continuations; data: {data.source}; "
            f"{len(data.train)} train, {len(data.val)} validation, {len(data.test)} test"
        )
        train_base(study, out, data, callbacks, progress)
        run_cells(study, out, data, workers, callbacks, progress)
        rows = plasticity_rows(study, out)
        write_results(study, out, rows)
        if not keep_checkpoints:
            drop_checkpoints(study, out)
    return rows
