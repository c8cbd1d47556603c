"""Writing files in the folders granet writes (runs, sweeps, studies), so that a kill or a
second process cannot damage them.

Every file is written under a temporary name unique to its writer and renamed into place, so a
kill during a write leaves the previous version intact. Nothing is written through a symbolic
link (or into a hard link). A folder is locked (:class:`FolderLock`) by the one process that
writes it, and that process writes into it only while the folder is still the one it locked.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from granet.experiment.errors import FolderLost
from granet.trees import tree_map

try:
    import fcntl
except ImportError:  # not a POSIX system: folders are not locked there
    fcntl = None

LOCK_FILE = "run.lock"
_TMP_SUFFIX = ".tmp"

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
    return None if isinstance(value, float) and not math.isfinite(value) else value


def to_json(value: Any, indent: int | None = None) -> str:
    """Strict JSON: a non-finite float (which ``json`` would write as bare ``NaN``) is null."""
    return json.dumps(tree_map(_finite, value), indent=indent, allow_nan=False)


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
