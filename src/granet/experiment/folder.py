"""A run folder: its layout, its marker (``run.json``: granet made it, with the hash of the
settings), and opening it for one run under its lock, which ``granet train`` and every run of
``granet sweep`` share; the settings a run may and may not change when resumed.

Layout of ``RUN_DIR``::

    run.json             granet made this folder: run id, granet version, settings hash
    run.lock             locked by the one process that writes the run, while it runs (removed
                         at its end; one left by a killed process blocks nothing)
    config.yaml          the resolved settings (``granet train --config`` reads it back)
    metrics.jsonl        one JSON line per finished epoch
    checkpoints/last.pt  everything needed to resume exactly (also written on Ctrl-C/SIGTERM)
    checkpoints/best.pt  the weights and masks of the best epoch by validation accuracy
    report.json, report.md, *.png

Every file in it is written as :mod:`granet.experiment.files` writes; checkpoints as
:mod:`granet.experiment.checkpoints` does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import granet
from granet.algorithm import OPTIONS
from granet.experiment.checkpoints import CHECKPOINT_DIR, checkpoint_path
from granet.experiment.files import (
    _TMP_SUFFIX,
    LOCK_FILE,
    FolderLock,
    fcntl,
    refuse_link,
    write_atomic,
)

MARKER_FILE = "run.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
MARKER_KIND = "granet run"
# Where and how fast a run trains and where its scalars are also logged, not what it computes:
# these may change between a run and its resumption; every other setting must stay as it began.
PLACEMENT = ("device", "data_root", "workers", "log", "parallel")
# How a run's step is computed, not what (``Option.affects_result`` False): a run keeps its own
# value when resumed, and a run made with another one still belongs to a sweep or study.
HOW = tuple(o.name for o in OPTIONS if not o.affects_result)
# Settings added after runs were first saved, with the value a run saved without one was
# trained with (``compute`` came with dense kernels as the only ones, and as the default;
# ``communication`` with DDP's own all-reduce, ``pattern`` unstructured).
SETTINGS_ADDED: dict[str, Any] = {"compute": "dense", "communication": "dense", "pattern": None}


# ---------------------------------------------------------------------------------- settings
def settings_of(config: Any) -> dict[str, Any]:
    """What a run computes: its settings but for :data:`PLACEMENT`."""
    return {k: v for k, v in config.to_dict().items() if k not in PLACEMENT}


def settings_hash(config: Any) -> str:
    """A short hash of :func:`settings_of`, recorded in ``run.json``."""
    return _hash(settings_of(config))


def _hash(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _legacy_hash(config: Any) -> str:
    """The hash a granet from before :data:`SETTINGS_ADDED` recorded for ``config``."""
    settings = settings_of(config)
    for k, v in SETTINGS_ADDED.items():
        if settings.get(k) == v:
            del settings[k]
    return _hash(settings)


def with_added(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Recorded settings with the :data:`SETTINGS_ADDED` they lack (a run of an older granet)."""
    return {**SETTINGS_ADDED, **settings}


def without_how(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` without :data:`HOW`: what a run computes."""
    return {k: v for k, v in settings.items() if k not in HOW}


def differing_settings(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``key: recorded -> now`` for every setting (placement aside) that differs; nested
    settings as ``key.inner: ...``."""
    diffs = []
    for k in dict.fromkeys([*recorded, *now]):
        a, b = recorded.get(k), now.get(k)
        if k in PLACEMENT or a == b:
            continue
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            diffs += [f"{k}.{d}" for d in differing_settings(a, b)]
        else:
            diffs.append(f"{k}: {a!r} -> {b!r}")
    return diffs


# ---------------------------------------------------------------------------------- markers
def read_marker_file(path: Path, kind: str, what: str) -> dict[str, Any] | None:
    """The JSON marker at ``path`` of a folder granet made (a run's, a study's), or None when
    there is none; one of another ``kind`` is refused as not ``what``."""
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(marker, dict) or marker.get("kind") != kind:
        raise ValueError(f"{path} is not {what}")
    return marker


def write_marker_file(path: Path, kind: str, **fields: Any) -> dict[str, Any]:
    """Write the JSON marker ``path``: its ``kind``, ``fields``, this granet's version and the
    time."""
    marker = {
        "kind": kind,
        **fields,
        "granet": granet.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_atomic(path, json.dumps(marker, indent=2) + "\n")
    return marker


def read_marker(run_dir: str | Path) -> dict[str, Any] | None:
    """The run folder's ``run.json``, or None when there is none."""
    return read_marker_file(Path(run_dir) / MARKER_FILE, MARKER_KIND, "a granet run marker")


def write_marker(run_dir: Path, settings: str | None, run_id: str | None = None) -> dict:
    """Write ``run.json``: a new run id unless given, this granet's version, the settings hash
    (None until the settings are known)."""
    return write_marker_file(
        run_dir / MARKER_FILE,
        MARKER_KIND,
        run_id=run_id or uuid.uuid4().hex,
        settings_hash=settings,
    )


def is_run_dir(path: str | Path) -> bool:
    """Whether granet made the folder ``path`` (it holds ``run.json``)."""
    return (Path(path) / MARKER_FILE).is_file()


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files a killed writer left (only the lock holder calls this)."""
    for folder in (run_dir, run_dir / CHECKPOINT_DIR):
        if folder.is_dir():
            for p in folder.glob(f".*{_TMP_SUFFIX}"):
                p.unlink(missing_ok=True)


def clear_folder(run_dir: Path, keep: tuple[str, ...] = (LOCK_FILE,)) -> None:
    """Remove everything in ``run_dir`` but the names in ``keep``."""
    for p in run_dir.iterdir():
        if p.name in keep:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


# ------------------------------------------------------------------------------ life-cycle
@dataclass
class RunFolder:
    """A run folder open for writing by this process, which holds its lock."""

    path: Path
    marker: dict[str, Any]
    new: bool  # a new run: removed again if it fails before its first checkpoint

    def record_settings(self, config: Any) -> None:
        """Write ``config.yaml`` and its hash into ``run.json`` (a new run, once resolved)."""
        write_atomic(self.path / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
        self.marker = write_marker(self.path, settings_hash(config), self.marker["run_id"])

    def check_settings(self, config: Any, checkpoint: Mapping[str, Any] | None) -> None:
        """Refuse to resume with settings other than the run's: those of its checkpoint when
        there is one, else the hash ``run.json`` recorded."""
        if checkpoint is not None:
            recorded = checkpoint.get("settings")
            if not isinstance(recorded, dict):
                raise ValueError(f"{checkpoint_path(self.path)} does not record its settings")
            differ = differing_settings(with_added(recorded), config.to_dict())
            if differ:
                raise ValueError(
                    f"{self.path / CONFIG_FILE} differs from the settings the run was trained "
                    f"with ({'; '.join(differ)}); put them back, or start a new run"
                )
        elif self.marker.get("settings_hash") not in (
            None,
            settings_hash(config),
            _legacy_hash(config),
        ):
            raise ValueError(
                f"{self.path / CONFIG_FILE} was edited after the run started (its settings hash "
                f"is {settings_hash(config)}, {MARKER_FILE} records "
                f"{self.marker['settings_hash']}); put it back, or start a new run"
            )


def _unused(run_dir: Path, marker: dict | None) -> bool:
    """Nothing in the folder but possibly its lock and a marker without settings (a run that
    was stopped during start-up)."""
    names = {p.name for p in run_dir.iterdir()} - {LOCK_FILE}
    if marker is not None and not marker.get("settings_hash"):
        names -= {MARKER_FILE}
    return not names


def _refuse_existing(run_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that holds anything but an unused run; ``overwrite`` passes only a
    folder granet marked."""
    marker = read_marker(run_dir)
    if _unused(run_dir, marker):
        return
    if not overwrite:
        raise FileExistsError(
            f"run folder {run_dir} already exists: use --resume {run_dir} to continue it "
            "or --overwrite to start it again"
        )
    if marker is None:
        raise FileExistsError(
            f"{run_dir} is not a granet run folder (no {MARKER_FILE}, which granet writes into "
            "every run folder it makes); refusing to delete it for --overwrite"
        )


@contextmanager
def open_run(
    run_dir: str | Path, *, resume: bool = False, overwrite: bool = False
) -> Iterator[RunFolder]:
    """Open a run folder for one run, holding its lock until the block ends.

    A new run (``resume=False``) gets a new folder, or an empty one, or with ``overwrite`` one
    granet marked (only its contents go, and only once the lock is held); if it fails before it
    has a checkpoint (no data, a setting refused, Ctrl-C during start-up), what it made is removed.
    ``resume`` needs a folder granet marked. A folder another process holds is refused, naming
    the process.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"{run_dir} is a file, not a run folder")
    if resume:
        if not run_dir.is_dir():
            raise FileNotFoundError(f"no run folder at {run_dir}")
        if not is_run_dir(run_dir):
            older = (run_dir / CONFIG_FILE).is_file()
            raise ValueError(
                f"{run_dir} is not a granet run folder (no {MARKER_FILE}); "
                + (
                    "a run of an older granet, which this one cannot resume"
                    if older
                    else "nothing to resume"
                )
            )
    elif run_dir.is_dir():
        _refuse_existing(run_dir, overwrite)  # before this process adds anything to it
    made = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FolderLock(run_dir, "run folder")
    try:
        lock.acquire()
    except BaseException:
        if made:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    ours = not resume  # what a new run may remove if it fails
    try:
        _remove_stale_temporaries(run_dir)
        if resume:
            _refuse_links(run_dir)
            folder = RunFolder(run_dir, read_marker(run_dir), new=False)
        else:
            try:
                _refuse_existing(run_dir, overwrite)  # again, now that no one else can write
            except FileExistsError:
                ours = False
                raise
            if not _unused(run_dir, read_marker(run_dir)):
                clear_folder(run_dir)
            folder = RunFolder(run_dir, write_marker(run_dir, None), new=True)
        yield folder
    except BaseException:
        # not once the folder was replaced: what is there now is another run's
        if ours and (lock.held() or fcntl is None) and not checkpoint_path(run_dir).is_file():
            _discard(run_dir, made)
        raise
    finally:
        lock.release()


def _refuse_links(run_dir: Path) -> None:
    """Refuse a run folder with a symbolic link among its files or checkpoints, before
    anything is written through it."""
    for folder in (run_dir, run_dir / CHECKPOINT_DIR):
        if folder.is_dir() and not folder.is_symlink():
            for p in folder.iterdir():
                refuse_link(p)
        else:
            refuse_link(folder)


def _discard(run_dir: Path, made: bool) -> None:
    """Remove a new run that never reached a checkpoint: the folder if this run made it, else
    its contents."""
    if made:
        shutil.rmtree(run_dir, ignore_errors=True)
    elif run_dir.is_dir():
        clear_folder(run_dir, keep=())


def run_name(config: Any) -> str:
    """``<dataset>-<model>-<method>[-s<sparsity>]-seed<seed>``: what a run's folder is named by."""
    sparsity = "" if config.method == "dense" else f"-s{config.sparsity:g}"
    return f"{config.dataset}-{config.model}-{config.method}{sparsity}-seed{config.seed}"


def default_run_dir(config: Any, root: str | Path = "runs") -> Path:
    """``runs/<date>-<time>-`` and :func:`run_name`, unused."""
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{run_name(config)}"
    path, n = Path(root) / name, 1
    while path.exists():
        n += 1
        path = Path(root) / f"{name}-{n}"
    return path
