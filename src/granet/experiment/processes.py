"""The process pool that trains runs in ``granet train`` processes of their own, a few at a
time (``granet sweep --workers``, and a plasticity study's cells): their command lines, new or
resumed, their logs, and stopping them with this process, however it dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from granet.experiment.config import Config, make_config, save_config
from granet.experiment.errors import RunFailed
from granet.experiment.files import open_append
from granet.experiment.folder import PLACEMENT
from granet.experiment.records import read_run_config
from granet.experiment.signals import PARENT_ENV, Interrupted, stop_on_signals

STOPPED = (
    "sweep stopped, the runs in progress saved checkpoints; run the same command again to resume it"
)


@dataclass(frozen=True)
class Job:
    """One run to train (of a sweep, or a study's cell): its name, settings and folder."""

    name: str
    config: Config
    run_dir: Path


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
) -> None:
    """At most ``workers`` training processes at a time, each logging to ``OUT/<name>.log``.
    Ctrl-C / SIGTERM is passed on to the running ones as SIGTERM (they checkpoint and stop; a
    second one makes them stop at once); nothing new starts. If this process dies, even by
    SIGKILL, each gets one SIGTERM (:func:`~granet.experiment.signals.stop_with_parent`), so a
    rerun finds their folders free and resumes them. Each job of ``todo`` is a :class:`Job`
    and whether to resume it (``granet train --resume``) or start it (``granet train``, with
    ``overwrite``: emptying its folder first)."""
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
                    cmd = _command(job, resume, overwrite, out)
                    if stop.asked:  # asked meanwhile: nothing new starts
                        break
                    log_path = out / f"{job.name}.log"
                    with open_append(log_path) as log:
                        print(f"[sweep] started {job.name} (log: {log_path})", file=sys.stderr)
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
        raise Interrupted(stop.signum, STOPPED)
    if failed:
        raise RunFailed("some runs failed: " + "; ".join(failed))
