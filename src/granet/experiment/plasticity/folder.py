"""A plasticity study's folder: its layout (the base run, the prune points, one run folder per
cell, the results), its marker ``plasticity.json`` and lock, and what a rerun may find there.

The layout (``OUT``)::

    plasticity.json   the study's settings: a folder made with other settings is refused
    plasticity.lock   held by the one process running the study
    base/             the base run (a granet run folder); base/checkpoints/epoch-<e>.pt and
                      epoch-<e>.json (its t_pre) at every pruning epoch: the prune points
    cells/<cell>/     each continuation, a granet run folder (cells/<cell>.log with workers)
    plasticity.csv, plasticity.md, plasticity.png
"""

from __future__ import annotations

import shutil
from pathlib import Path

from granet.experiment.checkpoints import CHECKPOINT_DIR, checkpoint_path
from granet.experiment.folder import (
    MARKER_FILE,
    REPORT_JSON,
    clear_folder,
    differing_settings,
    read_marker_file,
    without_how,
    write_marker_file,
)
from granet.experiment.plasticity.settings import Cell, Study

STUDY_FILE = "plasticity.json"
STUDY_LOCK = "plasticity.lock"
STUDY_KIND = "granet plasticity study"
BASE_DIR = "base"
CELLS_DIR = "cells"
CELL_FILE = "oneshot.json"
CSV_FILE, MD_FILE, PNG_FILE = "plasticity.csv", "plasticity.md", "plasticity.png"
STOPPED = "plasticity study stopped; run the same command again to resume it"
# settings a study may gain values of on a rerun: its base run and other cells stay valid
GROWABLE = ("rates", "variants")


def prune_point(out: Path, epoch: int, suffix: str = ".pt") -> Path:
    """The base run's checkpoint after ``epoch`` (``.json``: its test accuracy ``t_pre``)."""
    return out / BASE_DIR / CHECKPOINT_DIR / f"epoch-{epoch}{suffix}"


def cell_dir(out: Path, cell: Cell) -> Path:
    """The run folder of ``cell``'s continuation."""
    return out / CELLS_DIR / cell.name


def prepared(run_dir: Path) -> bool:
    """Whether a cell's run folder holds its first checkpoint (the pruned state): written
    last when the cell is prepared."""
    return checkpoint_path(run_dir).is_file() and (run_dir / CELL_FILE).is_file()


def refuse_foreign(out: Path) -> None:
    """Refuse a folder that holds anything but a plasticity study (before locking it)."""
    foreign = out.is_dir() and not (out / STUDY_FILE).is_file()
    if foreign and any(p.name != STUDY_LOCK for p in out.iterdir()):
        what = "a granet run folder" if (out / MARKER_FILE).is_file() else "a folder"
        raise FileExistsError(
            f"{out} is {what}, not a plasticity study (no {STUDY_FILE}); use another --out"
        )


def open_study(study: Study, out: Path, overwrite: bool) -> None:
    """Check that ``out`` is this study's folder (other rates or variants are fine: the cells
    it lacks are added), a new one or an empty one (with ``overwrite``: any plasticity study's,
    emptied); the caller holds the lock."""
    refuse_foreign(out)
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


def drop_checkpoints(study: Study, out: Path) -> None:
    """Remove the checkpoints of every finished continuation (the base run's stay)."""
    for cell in study.cells:
        folder = cell_dir(out, cell) / CHECKPOINT_DIR
        if (folder.parent / REPORT_JSON).is_file() and folder.is_dir():
            shutil.rmtree(folder)
