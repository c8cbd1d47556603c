"""A run folder: its files, its identity, its lock, its checkpoints, and the life-cycle of a run
in it, which ``granet train`` and every run of ``granet sweep`` share.

Layout of ``RUN_DIR``::

    run.json             granet made this folder: run id, granet version, settings hash
    run.lock             locked by the one process that writes the run, while it runs (removed
                         at its end; one left by a killed process blocks nothing)
    config.yaml          the resolved settings (``granet train --config`` reads it back)
    metrics.jsonl        one JSON line per finished epoch
    checkpoints/last.pt  everything needed to resume exactly (also written on Ctrl-C/SIGTERM)
    checkpoints/best.pt  the weights and masks of the best epoch by validation accuracy
    report.json, report.md, *.png

Every file is written under a temporary name unique to its writer and renamed into place, so a
kill during a write leaves the previous version intact; checkpoints carry a SHA-256 of their
contents, checked on every load. Nothing is written through a symbolic link (or into a hard
link) in a folder granet writes, and a process writes into a folder it locked only while the
folder is still the one it locked.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import shutil
import stat
import time
import uuid
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import yaml
from torch import nn

import granet
from granet.algorithm import OPTIONS
from granet.checksum import state_digest

try:
    import fcntl
except ImportError:  # not a POSIX system: runs are not locked there
    fcntl = None

MARKER_FILE = "run.json"
LOCK_FILE = "run.lock"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINTS = ("best", "last")
CHECKPOINT_FORMAT = 3  # 3: the settings and a SHA-256 of the contents
MARKER_KIND = "granet run"
# Where and how fast a run trains and where its scalars are also logged, not what it computes:
# these may change between a run and its resumption; every other setting must stay as it began.
PLACEMENT = ("device", "data_root", "workers", "log")
# How a run's step is computed, not what (``Option.affects_result`` False): a run keeps its own
# value when resumed, and a run made with another one still belongs to a sweep or study.
HOW = tuple(o.name for o in OPTIONS if not o.affects_result)
# Settings added after runs were first saved, with the value a run saved without one was
# trained with (``compute`` came with dense kernels as the only ones, and as the default;
# ``communication`` with DDP's own all-reduce, ``pattern`` unstructured).
SETTINGS_ADDED: dict[str, Any] = {"compute": "dense", "communication": "dense", "pattern": None}
_TMP_SUFFIX = ".tmp"


class RunFailed(RuntimeError):
    """A run stopped because it cannot go on (its loss became non-finite), or some runs of a
    sweep did; the message says which and where."""


class FolderLost(RunFailed):
    """The folder a process locked was deleted or replaced (say by a new run in a folder of the
    same name) while the process wrote it: it stops rather than write into the new one."""


# ----------------------------------------------------------------------------- writing files
LINK_REFUSED = "a symbolic link, which granet does not write through (remove it)"
# O_NOFOLLOW and O_CLOEXEC where the system has them (POSIX), O_BINARY where it has that (Windows)
_OPEN_FLAGS = sum(getattr(os, f, 0) for f in ("O_NOFOLLOW", "O_CLOEXEC", "O_BINARY"))


def refuse_link(path: str | Path) -> None:
    """Refuse to write ``path`` when it is a symbolic link, dangling or not: in a folder of
    granet's, writing through one would change a file elsewhere."""
    if os.path.islink(path):
        raise OSError(errno.ELOOP, LINK_REFUSED, str(path))


def _open_own(path: Path, flags: int, mode: int = 0o666) -> int:
    """``os.open`` of a plain file that is ``path`` alone: never through a symbolic link, never
    a file with other names (a hard link), whose contents belong elsewhere too."""
    refuse_link(path)  # where there is no O_NOFOLLOW
    try:
        fd = os.open(path, flags | _OPEN_FLAGS, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, LINK_REFUSED, str(path)) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        raise OSError(
            errno.EMLINK,
            "not a plain file of its own (a hard link or a device), which granet does not "
            "write into (remove it)",
            str(path),
        )
    return fd


class _KeptErrors:
    """A file whose write errors are kept: ``torch.save`` reports a failed write (a full disk)
    as a RuntimeError of its own, which the kept OSError replaces."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def write_atomic(path: str | Path, data: bytes | str | Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a temporary file of this writer's own (process id and a random
    part in its name), renamed over ``path`` when complete and removed on every other exit.
    A symbolic link at ``path`` is refused (see :func:`check_writable`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{_TMP_SUFFIX}")
    try:
        check_writable(path)
        with open(_open_own(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as f:
            if callable(data):
                sink = _KeptErrors(f)
                try:
                    data(sink)  # type: ignore[arg-type]
                except Exception:
                    if sink.error is not None:
                        raise sink.error from None
                    raise
            else:
                f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except OSError as e:  # named by the file meant, not the temporary one
        _verify_held(path)  # a folder deleted meanwhile is the reason to give
        raise OSError(e.errno, f"cannot write it: {e.strerror}", str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)


def open_append(path: str | Path) -> IO[str]:
    """``path`` opened to append text, created if missing (never through a symbolic link, see
    :func:`check_writable`)."""
    path = Path(path)
    try:
        check_writable(path)
        return open(_open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a")
    except OSError as e:
        _verify_held(path)
        raise OSError(e.errno, f"cannot write it: {e.strerror}", str(path)) from None


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def to_json(value: Any, indent: int | None = None) -> str:
    """Strict JSON: a non-finite float (which ``json`` would write as bare ``NaN``) is null."""
    return json.dumps(_finite(value), indent=indent, allow_nan=False)


# ------------------------------------------------------------------------------- checkpoints
def checkpoint_path(run_dir: str | Path, which: str = "last") -> Path:
    """Path of the ``which`` checkpoint (``"best"`` or ``"last"``) of a run."""
    if which not in CHECKPOINTS:
        raise ValueError(f"which must be one of {', '.join(CHECKPOINTS)}; got {which!r}")
    return Path(run_dir) / CHECKPOINT_DIR / f"{which}.pt"


def _to_cpu(value: Any) -> Any:
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> None:
    """Write ``state`` with its format and checksum, atomically: a kill during the write leaves
    the previous checkpoint intact."""
    path = Path(path)
    check_writable(path)  # before mkdir, which would re-create a deleted run folder
    path.parent.mkdir(parents=True, exist_ok=True)
    body = _to_cpu({k: v for k, v in state.items() if k not in ("format", "sha256")})
    full = {"format": CHECKPOINT_FORMAT, **body}
    full["sha256"] = state_digest(full)
    write_atomic(path, lambda f: torch.save(full, f))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors on the CPU unless
    ``map_location``), after checking its checksum; errors name the file. Checkpoints of granet
    versions before checksums (format 2 and older) load unchecked; one of format 3 without its
    checksum is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise ValueError(f"cannot read checkpoint {path} (corrupt, or not one): {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a granet checkpoint")
    stored = state.pop("sha256", None)
    fmt = state.get("format", 0)  # checkpoints before format 1 had no format
    if stored is None and not (type(fmt) is int and fmt < CHECKPOINT_FORMAT):
        raise ValueError(
            f"checkpoint {path} is corrupt: it has no SHA-256 of its contents, which every "
            f"checkpoint of format {CHECKPOINT_FORMAT} has (a damaged or edited file)"
        )
    if stored is not None and stored != state_digest(state):
        raise ValueError(
            f"checkpoint {path} is corrupt: its contents do not match their SHA-256 (a damaged "
            "or edited file)"
        )
    if map_location not in ("cpu", torch.device("cpu")):
        state = {k: _to(v, map_location) for k, v in state.items()}
    return state


def _to(value: Any, device: str | torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------- RNG state
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every global RNG state a run draws from: Python, NumPy, torch, and the CUDA state of the
    run's own GPU only (asking every GPU would open a CUDA context on each, from each process)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


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


# ------------------------------------------------------------------------- marker and lock
def read_marker(run_dir: str | Path) -> dict[str, Any] | None:
    """The run folder's ``run.json``, or None when there is none."""
    path = Path(run_dir) / MARKER_FILE
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(marker, dict) or marker.get("kind") != MARKER_KIND:
        raise ValueError(f"{path} is not a granet run marker")
    return marker


def write_marker(run_dir: Path, settings: str | None, run_id: str | None = None) -> dict:
    """Write ``run.json``: a new run id unless given, this granet's version, the settings hash
    (None until the settings are known)."""
    marker = {
        "kind": MARKER_KIND,
        "run_id": run_id or uuid.uuid4().hex,
        "granet": granet.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings_hash": settings,
    }
    write_atomic(run_dir / MARKER_FILE, json.dumps(marker, indent=2) + "\n")
    return marker


def is_run_dir(path: str | Path) -> bool:
    """Whether granet made the folder ``path`` (it holds ``run.json``)."""
    return (Path(path) / MARKER_FILE).is_file()


_HELD: dict[str, FolderLock] = {}  # absolute folder path -> this process's lock on it


def check_writable(path: str | Path) -> None:
    """Before writing ``path``: it is no symbolic link; and where it lies in a folder this
    process locked (a run, sweep or study folder), that folder is still the one it locked
    (:class:`FolderLost` if not) and no folder between it and ``path`` is a symbolic link."""
    target = os.path.abspath(path)
    for folder in _verify_held(path):
        inner = folder
        for name in Path(target[len(folder) + 1 :]).parts[:-1]:
            inner = os.path.join(inner, name)
            refuse_link(inner)
    refuse_link(path)


def _verify_held(path: str | Path) -> list[str]:
    """The folders this process locked that hold ``path``, each checked to be still the one it
    locked (:class:`FolderLost` if not)."""
    target = os.path.abspath(path)
    folders = [f for f in _HELD if target.startswith(f + os.sep)]
    for folder in folders:
        _HELD[folder].verify()
    return folders


class FolderLock:
    """An exclusive ``flock`` on ``folder/name``, held by one process at a time; the file holds
    the holder's process id, which a refused process names, and is removed on release. While
    held, every granet write into the folder first checks (:func:`check_writable`) that the
    folder is still the one locked: the lock file there is the same file. Not available without
    ``fcntl`` (Windows): there nothing is locked."""

    def __init__(self, folder: Path, what: str, name: str = LOCK_FILE) -> None:
        self.path, self.what, self._fd = folder / name, what, None
        self._id: tuple[int, int] | None = None

    def acquire(self) -> FolderLock:
        """Take the lock, or refuse naming the process that holds it."""
        if fcntl is None:
            return self
        for _ in range(100):  # a holder that lets go removes the file: lock the new one then
            fd = _open_own(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise FileExistsError(
                    f"{self.what} {self.path.parent} is in use by process {holder} (it holds "
                    f"{self.path}); wait for it to finish or stop it"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            info = os.fstat(fd)
            self._id = (info.st_dev, info.st_ino)
            if self._same():
                break
            os.close(fd)
        else:
            raise FileExistsError(
                f"{self.what} {self.path.parent}: its lock file {self.path} keeps being replaced "
                "by other processes"
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        _HELD[os.path.abspath(self.path.parent)] = self
        return self

    def _same(self) -> bool:
        """Whether ``self.path`` is still the file this process locked."""
        try:
            info = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (info.st_dev, info.st_ino) == self._id

    def verify(self) -> None:
        """Raise :class:`FolderLost` unless the folder is still the one this process locked."""
        if self._fd is not None and not self._same():
            raise FolderLost(
                f"{self.what} {self.path.parent} was deleted or replaced while this process "
                f"wrote it ({self.path} is no longer the lock it took): stopped, leaving what "
                "is there now alone"
            )

    def held(self) -> bool:
        """Whether this process holds the lock on the folder as it is now."""
        return self._fd is not None and self._same()

    def release(self) -> None:
        """Let the lock go: remove its file (if it is still this lock's), then close it."""
        if self._fd is not None:
            if _HELD.get(os.path.abspath(self.path.parent)) is self:
                del _HELD[os.path.abspath(self.path.parent)]
            if self._same():
                self.path.unlink(missing_ok=True)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


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


# ------------------------------------------------------------------------ reading the files
def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The settings a run was trained with (its ``config.yaml``; those of
    :data:`SETTINGS_ADDED` that an older granet did not write, at the value it trained with)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        if is_run_dir(run_dir):
            raise FileNotFoundError(
                f"{run_dir} has no {CONFIG_FILE}: the run was stopped during its start-up, "
                "before it had settings; start it again with --overwrite"
            )
        raise FileNotFoundError(f"{run_dir} is not a granet run folder: no {CONFIG_FILE}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of settings")
    return with_added(values)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of ``metrics.jsonl`` (empty before the first epoch ends). A last
    line cut short (the writer was killed mid-line) is dropped with a warning; a bad line
    elsewhere is an error naming the file and line."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = [(i, ln) for i, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip()]
    records = []
    for n, (i, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError as e:  # a complete line is always valid JSON: one cut short is not
            if n == len(lines) - 1:
                warnings.warn(
                    f"{path}: dropped its last line, cut short (the run was stopped while "
                    "writing it)",
                    stacklevel=2,
                )
                break
            raise ValueError(f"{path}, line {i}: {e}") from None
        wrong = wrong_fields(record, METRICS_FIELDS, required=("epoch",))
        if wrong:
            raise ValueError(f"{path}, line {i}: not an epoch record ({wrong})")
        records.append(record)
    return records


def append_metrics(run_dir: Path, record: Mapping[str, Any]) -> None:
    """Add one epoch's record to ``metrics.jsonl`` as one line."""
    path = run_dir / METRICS_FILE
    with open_append(path) as f:
        try:
            f.write(to_json(record) + "\n")
            f.flush()
        except OSError as e:
            raise OSError(e.errno, f"cannot write it: {e.strerror}", str(path)) from None


def truncate_metrics(run_dir: Path, epochs_done: int) -> None:
    """Keep the metrics of the epochs a checkpoint includes (a kill between the metrics line
    and the checkpoint, or mid-line, leaves more)."""
    if (run_dir / METRICS_FILE).is_file():
        kept = [r for r in read_metrics(run_dir) if r["epoch"] <= epochs_done]
        write_atomic(run_dir / METRICS_FILE, "".join(to_json(r) + "\n" for r in kept))


REPORT_KEYS = ("method", "model", "dataset", "seed", "test_accuracy", "sparsity", "flops")
_NUMBER, _MAYBE = (int, float), (int, float, type(None))
# the fields that granet report and the comparison read back (dotted: nested), and their types
REPORT_FIELDS: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("method", "model", "dataset"), (str,)),
    "seed": (int,),
    **dict.fromkeys(("test_accuracy", "sparsity", "target_sparsity", "train_seconds"), _NUMBER),
    "itop_rate": _MAYBE,
    "flops": (dict,),
    "flops.inference_per_sample.ratio": _NUMBER,
    "flops.training_total.ratio": _NUMBER,
    "target_reached": (bool,),
    "config": (dict,),
}
# a metrics.jsonl record's fields and their types
METRICS_FIELDS: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("epoch", "step", "samples"), (int,)),
    **dict.fromkeys(("train_loss", "train_accuracy", "sparsity", "lr", "seconds"), _NUMBER),
    **dict.fromkeys(("val_loss", "val_accuracy", "itop_rate", "regrow_fraction"), _MAYBE),
    "best": (bool,),
    "layer_density": (dict,),
}


_KIND_NAMES = {
    int: "an integer",
    float: "a float",
    str: "a string",
    bool: "true or false",
    dict: "an object",
    type(None): "null",
}


def wrong_fields(
    record: Any, fields: Mapping[str, tuple[type, ...]], required: Collection[str] = ()
) -> str | None:
    """What is wrong with the fields of ``record`` (a JSON object read back), or ``None``: a
    ``required`` one missing, or one of another type than ``fields`` gives (a bool is no
    number)."""
    if not isinstance(record, dict):
        return f"a {type(record).__name__}, not an object"
    for name, kinds in fields.items():
        value: Any = record
        for part in name.split("."):
            if not isinstance(value, dict) or part not in value:
                if name in required:
                    return f"no {name}"
                break
            value = value[part]
        else:
            if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
                kind = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
                return (
                    f"{name} is {value!r}, not {kind.replace('an integer or a float', 'a number')}"
                )
    return None


def read_report(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / REPORT_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no {REPORT_JSON}: the run has not finished")
    try:
        report = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    missing = [k for k in REPORT_KEYS if not isinstance(report, dict) or k not in report]
    if missing:
        raise ValueError(f"{path} is not a granet report (no {', '.join(missing)})")
    required = [k for k in REPORT_FIELDS if k not in ("target_reached", "config")]
    wrong = wrong_fields(report, REPORT_FIELDS, required)
    if wrong:
        raise ValueError(f"{path} is not a granet report ({wrong})")
    return report


def load_run_model(run_dir: str | Path, which: str = "best") -> tuple[nn.Module, dict[str, Any]]:
    """The trained model of a run (in eval mode, on the CPU) and its settings.

    The architecture is the one named in ``config.yaml``, built for the data shape recorded in
    the checkpoint; the weights are those of the ``which`` checkpoint (masked weights are zero).
    The dict is ``config.yaml``'s settings plus ``data_shape`` (``num_classes``,
    ``in_channels``, ``image_size``), which says what input the model takes.
    """
    from granet.experiment.models import build_model

    config = read_run_config(run_dir)
    path = checkpoint_path(run_dir, which)
    state = load_checkpoint(path)
    try:
        model = build_model(config["model"], **state["data_shape"])
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise ValueError(f"{path} does not hold a model for {run_dir / CONFIG_FILE}: {e}") from None
    return model.eval(), {**config, "data_shape": dict(state["data_shape"])}
