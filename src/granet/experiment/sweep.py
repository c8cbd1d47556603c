"""Sweeps: a grid of methods x sparsities x seeds over one base config, and its comparison table.

A sweep file (YAML)::

    base: fashion-mnist.yaml     # optional: a config file, relative to this file
    config: {epochs: 5}          # optional: settings on top of ``base``
    methods: [granet, rigl, gmp]
    sparsities: [0.9, 0.95]
    seeds: [0, 1, 2]
    out: runs/my-sweep           # optional: default runs/<sweep file name>
    workers: 1                   # optional: runs at a time (processes sharing the machine)

Each grid point trains into ``OUT/<method>-s<sparsity>-seed<seed>`` (``dense-seed<seed>`` for
the dense baseline, which ignores the sparsities); a grid point given twice is refused. Before
anything trains, every grid point's schedule is checked to reach its target sparsity. Running
the same sweep again skips finished runs and resumes interrupted ones, so a sweep is resumed by
starting it again. One sweep at a time writes ``OUT`` (``OUT/sweep.lock``), and each run holds
its own run folder's lock.
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from granet.experiment.blocks import check_schedule, load_data
from granet.experiment.comparison import summarize, write_comparison
from granet.experiment.config import METHOD_OWN, make_config, read_config_file
from granet.experiment.files import FolderLock
from granet.experiment.folder import (
    CONFIG_FILE,
    HOW,
    MARKER_FILE,
    PLACEMENT,
    REPORT_JSON,
    is_run_dir,
)
from granet.experiment.processes import STOPPED, Job, resumed_config, run_processes
from granet.experiment.records import read_report, read_run_config
from granet.experiment.signals import stopped_as
from granet.experiment.train import train

SWEEP_KEYS = ("base", "config", "methods", "sparsities", "seeds", "out", "workers")
SWEEP_LOCK = "sweep.lock"
# settings a sweep resolves per run (``update_every: null`` becomes a number in config.yaml)
_RESOLVED_LATER = ("update_every",)


@dataclass(frozen=True)
class Sweep:
    jobs: list[Job]
    out: Path
    workers: int


def _list(spec: dict[str, Any], key: str, path: Path, default: list | None = None) -> list:
    value = spec.get(key, default)
    if value is None:
        raise ValueError(f"sweep file {path}: {key} is required")
    return value if isinstance(value, list) else [value]


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file; every grid point is checked before anything runs."""
    path = Path(path)
    spec = read_config_file(path, "sweep file")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ValueError(
            f"sweep file {path}: unknown key(s) {', '.join(unknown)}; "
            f"known: {', '.join(SWEEP_KEYS)}"
        )
    for key, kind, what in (
        ("base", str, "a config file's path"),
        ("config", dict, "a mapping of settings"),
        ("out", str, "a folder's path"),
    ):
        if spec.get(key) is not None and (not isinstance(spec[key], kind) or spec[key] == ""):
            raise ValueError(f"sweep file {path}: {key} must be {what}; got {spec[key]!r}")
    base: dict[str, Any] = {}
    if spec.get("base") is not None:
        base.update(read_config_file(path.parent / spec["base"]))
    base.update(spec.get("config") or {})
    methods = _list(spec, "methods", path)
    sparse = [m for m in methods if m != "dense"]
    if len(set(sparse)) > 1:
        pinned = [k for k in METHOD_OWN if base.get(k) is not None]
        if pinned:
            raise ValueError(
                f"sweep file {path}: {', '.join(pinned)} is set for every method, which would "
                f"override what makes the methods differ ({', '.join(sorted(set(sparse)))}); "
                "leave it null (each method's own) or sweep one method per file"
            )
    sparsities = _list(spec, "sparsities", path, None if sparse else [])
    seeds = _list(spec, "seeds", path, [0])
    for key, values in (("methods", methods), ("sparsities", sparsities), ("seeds", seeds)):
        if not values and (key != "sparsities" or sparse):
            raise ValueError(f"sweep file {path}: {key} is empty; the grid would have no run")
    out = Path(spec.get("out") or Path("runs") / path.stem)
    workers = spec.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"sweep file {path}: workers must be an integer >= 1; got {workers!r}")
    jobs: list[Job] = []
    for method in methods:
        for sparsity in sparsities if method != "dense" else [None]:
            for seed in seeds:
                values = {**base, "method": method, "seed": seed}
                if sparsity is not None:
                    values["sparsity"] = sparsity
                try:
                    config = make_config(values)
                except ValueError as e:
                    raise ValueError(f"sweep file {path}: {e}") from None
                level = "" if sparsity is None else f"-s{config.sparsity:g}"
                name = f"{method}{level}-seed{seed}"
                jobs.append(Job(name, config, out / name))
    twice = [name for name, n in Counter(job.name for job in jobs).items() if n > 1]
    if twice:
        raise ValueError(
            f"sweep file {path}: grid point(s) given more than once: {', '.join(twice)} "
            "(each would count as a separate seed); list each method, sparsity and seed once"
        )
    return Sweep(jobs, out, workers)


def check_schedules(sweep: Sweep) -> None:
    """Refuse the sweep, before anything trains, if a grid point's schedule cannot reach its
    target sparsity (the training-set size decides the run's steps: each data set is loaded
    once here)."""
    sizes: dict[tuple, int] = {}
    for job in sweep.jobs:
        c = job.config
        key = (c.dataset, c.data_root, c.val_size, c.train_size)
        if key not in sizes:
            sizes[key] = len(load_data(c).train)
        try:
            check_schedule(c, sizes[key])
        except ValueError as e:
            raise ValueError(f"sweep run {job.name}: {e}") from None


def _state(job: Job, overwrite: bool) -> str:
    """``"done"``, ``"resume"`` or ``"new"``; an existing run made with other settings is an
    error (its numbers would not belong in this sweep's table). A finished run of a granet
    before run folders had a marker is kept; an unfinished one cannot be resumed."""
    if overwrite or not (job.run_dir / CONFIG_FILE).is_file():
        return "new"  # no folder, or one stopped during start-up before it had settings
    try:
        stored = make_config(read_run_config(job.run_dir)).effective()
    except ValueError as e:
        raise ValueError(f"{job.run_dir} has settings this version cannot read: {e}") from None
    wanted = job.config.effective()
    differ = [
        k
        for k, v in wanted.items()
        if k not in (*PLACEMENT, *HOW)
        and stored.get(k) != v
        and not (k in _RESOLVED_LATER and v is None)
    ]
    if differ:
        raise ValueError(
            f"{job.run_dir} was trained with other settings ({', '.join(differ)}); "
            "run the sweep with --overwrite to redo it, or change its out folder"
        )
    if (job.run_dir / REPORT_JSON).is_file():
        return "done"
    if not is_run_dir(job.run_dir):
        raise ValueError(
            f"{job.run_dir} is an unfinished run of an older granet (no {MARKER_FILE}): this "
            "one cannot resume it; delete it to train it again"
        )
    return "resume"


def run_sweep(
    sweep: Sweep, *, workers: int | None = None, overwrite: bool = False
) -> tuple[list[dict[str, Any]], list[Path]]:
    """Train every unfinished run, then write the comparison into the sweep folder.

    Returns the comparison rows and the files written. With ``workers > 1`` the runs go to
    that many ``granet train`` processes at once (each logging to ``OUT/<name>.log``).
    """
    workers = workers or sweep.workers
    if (sweep.out / MARKER_FILE).is_file() or (sweep.out / CONFIG_FILE).is_file():
        raise FileExistsError(
            f"{sweep.out} is a granet run folder, not a sweep's out folder; give the sweep "
            "another out"
        )
    sweep.out.mkdir(parents=True, exist_ok=True)
    with FolderLock(sweep.out, "sweep folder", SWEEP_LOCK):
        todo = []
        for job in sweep.jobs:
            state = _state(job, overwrite)
            if state == "done":
                print(f"[sweep] {job.name}: finished earlier, kept", file=sys.stderr)
            else:
                todo.append((job, state == "resume"))
        check_schedules(Sweep([job for job, _ in todo], sweep.out, workers))
        if workers == 1:
            _run_here(todo, overwrite)
        else:
            run_processes(todo, workers, overwrite, sweep.out)
        rows = summarize(read_report(job.run_dir) for job in sweep.jobs)
        return rows, write_comparison(rows, sweep.out)


def _run_here(todo: list[tuple[Job, bool]], overwrite: bool) -> None:
    for i, (job, resume) in enumerate(todo, 1):
        print(f"[sweep] run {i}/{len(todo)}: {job.name}", file=sys.stderr)
        with stopped_as(STOPPED):
            if resume:
                train(resumed_config(job.run_dir, job.config), job.run_dir, resume=True)
            else:
                train(job.config, job.run_dir, overwrite=overwrite)
