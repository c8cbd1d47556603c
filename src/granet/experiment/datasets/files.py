"""Where data files are looked for, their checksums, and downloads.

The places searched, in order (:func:`data_dirs`): a ``root`` argument, ``$GRANET_DATA``, the
user cache (``$XDG_CACHE_HOME/granet``, by default ``~/.cache/granet``) and
:data:`SYSTEM_DATA_DIRS` (``/usr/share/datasets``, where Debian's ``dataset-fashion-mnist`` puts
its files). In each place a dataset may sit in its own folder or directly in it. A download goes
to the first place and takes its final name only once its MD5 is the published one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.request
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

SYSTEM_DATA_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets"),)
# The files that ship in the package (a Fashion-MNIST subset): ``experiment/data/``.
BUNDLED_DIR = Path(__file__).parents[1] / "data"


class ChecksumError(ValueError):
    """A data file whose MD5 is not the published one: corrupt, truncated or another version."""

    def __init__(self, path: Path, expected: str, actual: str, detail: str = "") -> None:
        self.path, self.expected, self.actual = path, expected, actual
        super().__init__(
            f"{path}: checksum mismatch, expected md5 {expected}, got {actual}"
            + (f" ({detail})" if detail else "")
            + "; the file is corrupt, truncated or not the official one: delete or replace it"
        )


def cache_dir() -> Path:
    """The per-user cache folder: ``$XDG_CACHE_HOME/granet`` or ``~/.cache/granet``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "granet"


def data_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """The places searched for datasets, in order: ``root``, ``$GRANET_DATA``, the user cache
    and :data:`SYSTEM_DATA_DIRS`."""
    dirs = [Path(root).expanduser()] if root is not None else []
    if os.environ.get("GRANET_DATA"):
        dirs.append(Path(os.environ["GRANET_DATA"]).expanduser())
    return [*dirs, cache_dir(), *SYSTEM_DATA_DIRS]


def download_dir(root: str | os.PathLike | None) -> Path:
    """Where a download goes: the first of :func:`data_dirs`."""
    return data_dirs(root)[0]


def candidates(root: str | os.PathLike | None, folder: str) -> list[Path]:
    """Every place a dataset kept in ``folder`` may be: that folder in each data dir, or the
    data dir itself."""
    return [place for d in data_dirs(root) for place in (d / folder, d)]


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def check_file(path: Path, expected: str) -> None:
    """Raise :class:`ChecksumError` unless the MD5 of ``path`` is ``expected``."""
    actual = file_md5(path)
    if actual != expected:
        raise ChecksumError(path, expected, actual)


def fetch(urls: tuple[str, ...], dest: Path, expected: str) -> None:
    """Download ``dest`` from the first of ``urls`` that serves a file with MD5 ``expected``.
    The file only takes its final name once checked."""
    if dest.exists() and file_md5(dest) == expected:
        return
    made = [d for d in (dest.parent, *dest.parent.parents) if not d.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")  # one per downloading process
    failures = []
    for url in urls:
        log.info("downloading %s to %s", url, dest)
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
                shutil.copyfileobj(response, out)
            check_file(part, expected)
        except (OSError, ChecksumError) as err:
            failures.append(f"{url}: {err}")
            part.unlink(missing_ok=True)
            continue
        part.replace(dest)
        return
    for folder in made:  # innermost first; a folder something else wrote into stays
        try:
            folder.rmdir()
        except OSError:
            break
    raise OSError(f"could not download {dest.name}: " + "; ".join(failures))


def note_source(root: str | os.PathLike | None, folder: Path, what: str) -> None:
    """Warn when a ``root`` was asked for but ``what`` was found elsewhere, in ``folder``
    (another of :func:`data_dirs`), so that the run's data is never a silent surprise."""
    if root is None:
        return
    asked = Path(root).expanduser()
    if folder != asked and asked not in folder.parents:
        warnings.warn(
            f"{what} is not in the data root {asked}; using the copy in {folder} (the data root "
            "is looked at first, then $GRANET_DATA, the user cache and the system folders)",
            stacklevel=3,
        )
