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

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from granet.experiment.config import (
    METHOD_OWN,
    Config,
    make_config,
    read_config_file,
    save_config,
)
from granet.experiment.errors import RunFailed
from granet.experiment.files import FolderLock, open_append
from granet.experiment.folder import (
    CONFIG_FILE,
    HOW,
    MARKER_FILE,
    PLACEMENT,
    REPORT_JSON,
    is_run_dir,
)
from granet.experiment.records import read_report, read_run_config
from granet.experiment.report import summarize, write_comparison
from granet.experiment.signals import PARENT_ENV, Interrupted, stop_on_signals, stopped_as
from granet.experiment.train import train
from granet.experiment.trainer import check_schedule, load_data

SWEEP_KEYS = ("base", "config", "methods", "sparsities", "seeds", "out", "workers")
SWEEP_LOCK = "sweep.lock"
# settings a sweep resolves per run (``update_every: null`` becomes a number in config.yaml)
_RESOLVED_LATER = ("update_every",)
_STOPPED = (
    "sweep stopped, the runs in progress saved checkpoints; run the same command again to resume it"
)


@dataclass(frozen=True)
class Job:
    """One run of a sweep: its name, settings and folder."""

    name: str
    config: Config
    run_dir: Path


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
        if spec.get(key) is not None and not isinstance(spec[key], kind):
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
        with stopped_as(_STOPPED):
            if resume:
                train(resumed_config(job.run_dir, job.config), job.run_dir, resume=True)
            else:
                train(job.config, job.run_dir, overwrite=overwrite)


def resumed_config(run_dir: Path, placed: Config) -> Config:
    """The settings ``run_dir`` was trained with, but placed as ``placed`` is (the
    :data:`PLACEMENT` settings: device, data root, loader workers, loggers)."""
    return make_config({**read_run_config(run_dir), **{k: getattr(placed, k) for k in PLACEMENT}})


def resume_command(run_dir: Path, placed: Config) -> list[str]:
    """``granet train --resume run_dir`` with ``placed``'s :data:`PLACEMENT` flags."""
    cmd = [sys.executable, "-m", "granet", "train", "--resume", str(run_dir)]
    for key in PLACEMENT:
        value = getattr(placed, key)
        if value is not None and value != []:
            flag = "--" + key.replace("_", "-")
            cmd += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return cmd


def _command(job: Job, resume: bool, overwrite: bool, out: Path) -> list[str]:
    if resume:
        return resume_command(job.run_dir, job.config)
    cmd = [sys.executable, "-m", "granet", "train"]
    config_file = out / ".configs" / f"{job.name}.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    save_config(job.config, config_file)
    cmd += ["--config", str(config_file), "--out", str(job.run_dir)]
    return [*cmd, "--overwrite"] if overwrite else cmd


def run_processes(
    todo: list[tuple[Job, bool]],
    workers: int,
    overwrite: bool,
    out: Path,
    command: Callable[[Job, bool, bool, Path], list[str]] = _command,
) -> None:
    """At most ``workers`` training processes at a time, each logging to ``OUT/<name>.log``.
    Ctrl-C / SIGTERM is passed on to the running ones as SIGTERM (they checkpoint and stop; a
    second one makes them stop at once); nothing new starts. If this process dies, even by
    SIGKILL, each gets one SIGTERM (:func:`~granet.experiment.signals.stop_with_parent`), so a
    rerun finds their folders free and resumes them. ``command(job, resume, overwrite,
    out)`` is a job's command line (default: ``granet train`` new or ``--resume``), called
    just before the job starts."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
    env[PARENT_ENV] = str(os.getpid())  # each one stops when this process dies, however
    pending = list(todo)
    running: dict[subprocess.Popen, Job] = {}
    failed: list[str] = []

    def pass_on(signum: int) -> None:
        for proc in running:
            proc.send_signal(signal.SIGTERM)

    with stop_on_signals(pass_on) as stop:
        try:
            while running or (pending and not stop.asked):
                while pending and len(running) < workers and not stop.asked:
                    job, resume = pending.pop(0)
                    cmd = command(job, resume, overwrite, out)  # may take a while (a prune)
                    if stop.asked:  # asked meanwhile: nothing new starts
                        break
                    with open_append(out / f"{job.name}.log") as log:
                        print(f"[sweep] started {job.name} (log: {log.name})", file=sys.stderr)
                        proc = subprocess.Popen(
                            cmd,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            env=env,
                            start_new_session=True,  # a terminal's Ctrl-C reaches us only
                        )
                    running[proc] = job
                for proc in [p for p in running if p.poll() is not None]:
                    job = running.pop(proc)
                    ok = proc.returncode == 0
                    said = "finished" if ok else "stopped"
                    print(f"[sweep] {said} {job.name}", file=sys.stderr)
                    if not ok and not stop.asked:
                        failed.append(
                            f"{job.name} (exit {proc.returncode}, see {out / job.name}.log)"
                        )
                time.sleep(0.2)
        finally:  # an error here: the running ones checkpoint and stop rather than run on
            for proc in running:
                proc.send_signal(signal.SIGTERM)
            for proc in running:
                proc.wait()
    if stop.asked:
        raise Interrupted(stop.signum, _STOPPED)
    if failed:
        raise RunFailed("some runs failed: " + "; ".join(failed))
