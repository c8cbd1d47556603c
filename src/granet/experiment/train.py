"""Train one run into its run folder: the life-cycle that ``granet train`` and every run of
``granet sweep`` go through.

1. Open the folder (:func:`~granet.experiment.folder.open_run`): create it, or reopen it to
   resume, and lock it for the whole run; a second writer is refused.
2. Build the :class:`~granet.experiment.trainer.Trainer` (data, model, sparsifier: a schedule
   that cannot reach the target is refused here, before any training).
3. A new run records its resolved settings (``config.yaml``, their hash in ``run.json``). A
   resumed one is checked first: a finished run is reported, not retrained; its checkpoint must
   be intact and hold the settings of ``config.yaml``; ``metrics.jsonl`` must hold every epoch
   of the checkpoint, and is cut back to it.
4. Train, test the chosen checkpoint, write the report.

A new run that fails before its first checkpoint leaves nothing behind.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from granet.experiment import parallel
from granet.experiment.blocks import log, resolve_device
from granet.experiment.checkpoints import CHECKPOINT_DIR, checkpoint_path, load_checkpoint
from granet.experiment.config import Config
from granet.experiment.datasets import DataBundle
from granet.experiment.folder import (
    CONFIG_FILE,
    HOW,
    METRICS_FILE,
    REPORT_JSON,
    RunFolder,
    differing_settings,
    open_run,
)
from granet.experiment.loggers import RunLoggers
from granet.experiment.records import read_metrics, read_report, read_run_config, truncate_metrics
from granet.experiment.report import hardware
from granet.experiment.tables import counted, percent
from granet.experiment.trainer import Callbacks, StartFrom, Trainer


@contextmanager
def _open(run_dir: Path, resume: bool, overwrite: bool, ranks: parallel.Ranks) -> Iterator[Any]:
    """:func:`open_run` on process 0, its refusal raised on every process."""
    with ExitStack() as stack:
        yield parallel.on_main(
            lambda: stack.enter_context(open_run(run_dir, resume=resume, overwrite=overwrite)),
            ranks,
        )


class _Logging(Callbacks):
    """Feeds the run's loggers (the ``log`` setting): each epoch's metrics record and each
    topology round's statistics."""

    def __init__(self, loggers: RunLoggers) -> None:
        self.loggers = loggers

    def on_round(self, trainer: Trainer) -> None:
        self.loggers.log_round(trainer.sparsifier.stats())

    def on_epoch_end(self, trainer: Trainer, record: dict[str, Any]) -> None:
        self.loggers.log_epoch(record)


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


def _finished(folder: RunFolder, config: Config) -> bool:
    """A finished run (it has its report): nothing to train. Its checkpoints may be gone. Its
    settings must still be those of ``config`` (a finished run is never trained further)."""
    if not (folder.path / REPORT_JSON).is_file():
        return False
    report = read_report(folder.path)
    recorded, steps = report.get("config"), report.get("steps_per_epoch")
    if type(steps) is int:  # settings left to the run's length are compared as it made them
        config = config.resolved(config.epochs * steps)
    differ = differing_settings(recorded, config.to_dict()) if isinstance(recorded, dict) else []
    if differ:
        raise ValueError(
            f"{folder.path} has already finished, with settings other than its {CONFIG_FILE} "
            f"now says ({'; '.join(differ)}): a finished run is not trained further. Put them "
            f"back, or train a new run (--out) that starts from this one's "
            f"{CHECKPOINT_DIR}/last.pt (StartFrom.checkpoint in Python, see docs/cli.md)"
        )
    log(f"{folder.path} has already finished")
    if not checkpoint_path(folder.path).is_file():
        warnings.warn(
            f"{checkpoint_path(folder.path)} is missing: the finished run's report stands, "
            "but the run cannot be continued from it",
            stacklevel=2,
        )
    return True


def _own_how(config: Config, run_dir: Path) -> Config:
    """``config`` with the run's own :data:`~granet.experiment.folder.HOW` settings: a resumed
    run computes its steps as it began (another ``compute`` would change the float rounding,
    and a resumed run is bit-identical to an uninterrupted one)."""
    if not (run_dir / CONFIG_FILE).is_file():
        return config
    own = read_run_config(run_dir)
    return replace(config, **{k: own[k] for k in HOW if k in own})


def _resume_checks(folder: RunFolder, config: Config) -> dict[str, Any] | None:
    """The checkpoint to resume from (process 0's copy), after checking it and the settings;
    None to start from the beginning (nothing was trained yet)."""
    last = checkpoint_path(folder.path)
    if not last.is_file():
        done = len(read_metrics(folder.path))
        if done or checkpoint_path(folder.path, "best").is_file():
            raise FileNotFoundError(
                f"{folder.path} has {done} finished epoch(s) in {METRICS_FILE} but no "
                f"{CHECKPOINT_DIR}/last.pt: it cannot be resumed; start it again with "
                "--overwrite"
            )
        folder.check_settings(config, None)
        return None
    state = load_checkpoint(last)
    folder.check_settings(config, state)
    position, first = state.get("position"), state.get("first_epoch")
    if isinstance(position, Mapping) and type(position.get("epoch")) is int and type(first) is int:
        _check_metrics(folder.path, first, position["epoch"])
    return state


def _check_metrics(run_dir: Path, first: int, epochs: int) -> None:
    """Refuse to resume a run whose ``metrics.jsonl`` lacks an epoch its checkpoint includes
    (after ``first``, those of the state it was started from): deleted, cut short, or mixed with
    another run's. The report's totals (training FLOPs, samples) are summed from it, and what
    is lost cannot be rebuilt."""
    have = [r["epoch"] for r in read_metrics(run_dir) if r["epoch"] <= epochs]
    if have != list(range(first + 1, epochs + 1)):
        held = ", ".join(map(str, have)) if have else "none"
        raise ValueError(
            f"{run_dir / METRICS_FILE} does not hold the epochs of {CHECKPOINT_DIR}/last.pt "
            f"({first + 1} to {epochs}; it has {held}): the report would leave them out. Put "
            "the file back, or start the run again with --overwrite"
        )


def train(
    config: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    callbacks: Sequence[Callbacks] = (),
    sparsifier_options: Mapping[str, Any] | None = None,
    start: StartFrom | None = None,
    data: DataBundle | None = None,
) -> dict[str, Any] | None:
    """Train one run into ``run_dir`` and return its report.

    A new run needs a folder that does not exist or is empty; ``overwrite`` empties one that
    granet made. ``resume`` continues the run in ``run_dir`` from ``checkpoints/last.pt`` (a
    finished run returns its report). ``progress`` shows a tqdm bar (default: when stderr is a
    terminal); otherwise one log line per epoch. ``callbacks`` hook into the training loop;
    ``sparsifier_options`` go to the sparsifier on top of the config's (Python-only options: a
    score or schedule given as a callable). ``start`` starts the run from a given state (see
    :class:`~granet.experiment.trainer.StartFrom`); give the same one to resume it (its
    checkpoint, once it has one, takes over). ``data`` is the config's data set, already
    loaded (:func:`~granet.experiment.blocks.load_data`; default: loaded here), so that many
    runs on the same data load it once. Raises
    :class:`~granet.experiment.signals.Interrupted` after saving a checkpoint on Ctrl-C /
    SIGTERM.

    Inside a torchrun process group (see :mod:`granet.experiment.parallel`) every process calls
    this; process 0 locks and writes ``run_dir``, logs and returns the report, the others return
    None.
    """
    run_dir = Path(run_dir)
    ranks = parallel.current()
    if progress is None:
        progress = sys.stderr.isatty()
    device = resolve_device(config.device)
    with _open(run_dir, resume, overwrite, ranks) as folder:
        if resume and parallel.on_main(lambda: _finished(folder, config), ranks):
            return read_report(run_dir) if ranks.main else None
        if resume:
            config = _own_how(config, run_dir)
        trainer = Trainer(
            config,
            run_dir,
            data=data,
            device=device,
            callbacks=callbacks,
            sparsifier_options=sparsifier_options,
            start=start,
            progress=progress,
        )
        config = trainer.config
        if resume:
            checked: dict[str, Any] = {}  # process 0's checkpoint, read by the checks

            def check() -> bool:
                checked["state"] = _resume_checks(folder, config)
                return checked["state"] is not None

            last = checkpoint_path(run_dir)
            if parallel.on_main(check, ranks) and _seen_by_all(last, ranks, device):
                state = checked.get("state") or load_checkpoint(last)
                trainer.load_state_dict(state, last)
                log(f"resuming {run_dir} at epoch {trainer.epoch + 1}, step {trainer.step}")
        if ranks.main:
            if not resume or not folder.marker.get("settings_hash"):
                folder.record_settings(config)
            truncate_metrics(run_dir, trainer.epoch)
        sparse = "dense" if trainer.sparsifier is None else f"sparsity {config.sparsity:g}"
        log(
            f"training {config.method} ({sparse}) {config.model} on {device} "
            f"({hardware(device, ranks.world)}): {counted(config.epochs, 'epoch')} x "
            f"{counted(trainer.steps_per_epoch, 'step')}, into {run_dir}"
        )
        loggers = None
        if ranks.main and config.log:  # a resumed run's loggers drop what came after its checkpoint
            loggers = RunLoggers(config.log, run_dir, trainer.step if resume else None)
            trainer.callbacks.append(_Logging(loggers))
        try:
            trainer.fit()
            # process 0 tests and reports; the others wait for it and share its outcome (a
            # sharded model tests on all)
            report = (
                trainer.finish() if trainer.sharded else parallel.on_main(trainer.finish, ranks)
            )
        finally:
            trainer.close()
            if loggers is not None:
                loggers.close()
    if not ranks.main:
        return None
    chosen = "best by validation" if report["data"]["val"] else "the last epoch"
    log(
        f"test accuracy {percent(report['test_accuracy'])} (checkpoint {chosen}, "
        f"epoch {report['checkpoint']['epoch']}); report in {run_dir}"
    )
    return report
