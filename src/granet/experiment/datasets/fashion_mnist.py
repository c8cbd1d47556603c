"""Fashion-MNIST, from idx files: found, downloaded, or the subset that ships in the package.

The idx files are checked against the MD5 of the official files before use (a corrupt file is
an error naming it); a missing set is downloaded from its official source when ``download`` is
true. When the full set is nowhere and cannot be downloaded, the real subset in
``experiment/data/`` (2,000 training and 1,000 test images, see its README) is used, with a
warning; :attr:`DataBundle.source` says which was used.
"""

from __future__ import annotations

import gzip
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from granet.experiment.datasets import files
from granet.experiment.datasets.files import BUNDLED_DIR, ChecksumError
from granet.experiment.datasets.images import DataBundle, ImageTensorDataset, split

MEAN, STD = (0.2860,), (0.3530,)


@dataclass(frozen=True)
class IdxFile:
    """An idx file: its name without ``.gz`` and the MD5 of its (decompressed) idx bytes, which
    is the same for the published ``.gz`` and for recompressed copies such as Debian's; plus
    the MD5 of the published ``.gz`` itself, which downloads are checked against."""

    name: str
    md5: str
    archive_md5: str = ""


FASHION_MNIST_URLS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
# split -> (images, labels). MD5s of the decompressed official files (Debian's recompressed
# copies hold the same bytes) and of the archives, as Zalando publishes them.
FASHION_MNIST_FILES: dict[str, tuple[IdxFile, IdxFile]] = {
    "train": (
        IdxFile(
            "train-images-idx3-ubyte",
            "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        ),
        IdxFile(
            "train-labels-idx1-ubyte",
            "9018921c3c673c538a1fc5bad174d6f9",
            "25c81989df183df01b3e8a0aad5dffbe",
        ),
    ),
    "test": (
        IdxFile(
            "t10k-images-idx3-ubyte",
            "8181f5470baa50b63fa0f6fddb340f0a",
            "bef4ecab320f06d8554ea6380940ec79",
        ),
        IdxFile(
            "t10k-labels-idx1-ubyte",
            "15d484375f8d13e6eb1aabb0c3f46965",
            "bb300cfdad3c16e7a12a480ee83cd310",
        ),
    ),
}
# The subset shipped in experiment/data (made by tools/make_fashion_mnist_subset.py).
FASHION_MNIST_SUBSET_FILES: dict[str, tuple[IdxFile, IdxFile]] = {
    "train": (
        IdxFile("fashion-mnist-subset-train-images-idx3-ubyte", "fc2dd2cd627f464cd717afe5a3ddc438"),
        IdxFile("fashion-mnist-subset-train-labels-idx1-ubyte", "f2751a24eee86e9a35eee15ce0688f0d"),
    ),
    "test": (
        IdxFile("fashion-mnist-subset-t10k-images-idx3-ubyte", "c5442ce2f064c32bf3ec2983a505322f"),
        IdxFile("fashion-mnist-subset-t10k-labels-idx1-ubyte", "a00963b89d54a5ab6dc42b2b2c57c0e7"),
    ),
}


def read_idx(path: str | os.PathLike, md5: str | None = None) -> torch.Tensor:
    """The ``uint8`` array stored in idx file ``path`` (gzipped when its name ends in ``.gz``),
    after checking the MD5 of its idx bytes when ``md5`` is given."""
    path = Path(path)
    problem = ""
    if path.suffix == ".gz":
        chunks = []
        with gzip.open(path) as f:
            try:
                while chunk := f.read(1 << 22):
                    chunks.append(chunk)
            except (EOFError, OSError, zlib.error) as err:
                problem = f"gzip: {err}"
        data = b"".join(chunks)
    else:
        data = path.read_bytes()
    if md5 is not None and (problem or files.md5(data) != md5):
        raise ChecksumError(path, md5, files.md5(data), problem)
    if problem:
        raise ValueError(f"{path}: {problem}")
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    offset = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", data[4:offset])
    if len(data) != offset + int(np.prod(dims)):
        raise ValueError(f"{path}: idx header says shape {dims}, file has {len(data)} bytes")
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=offset).reshape(dims).copy())


def _idx_path(folder: Path, file: IdxFile) -> Path | None:
    for path in (folder / f"{file.name}.gz", folder / file.name):
        if path.is_file():
            return path
    return None


def _load_split(folder: Path, pair: tuple[IdxFile, IdxFile]) -> tuple[torch.Tensor, ...]:
    images, labels = (read_idx(_idx_path(folder, f), f.md5) for f in pair)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{folder}: shapes {tuple(images.shape)} and {tuple(labels.shape)}")
    return images.unsqueeze(1), labels


def _has_all(folder: Path, wanted: dict[str, tuple[IdxFile, IdxFile]]) -> bool:
    return all(_idx_path(folder, f) for pair in wanted.values() for f in pair)


def load(
    root: str | os.PathLike | None, val_size: float | int, seed: int, augment: bool, download: bool
) -> DataBundle:
    """Fashion-MNIST with ``val_size`` of its training set held out (see the module)."""
    wanted = FASHION_MNIST_FILES
    found = (p for p in files.candidates(root, "fashion-mnist") if _has_all(p, wanted))
    folder = next(found, None)
    reason = "download disabled"
    if folder is None and download:
        target = files.download_dir(root) / "fashion-mnist"
        try:
            for f in (f for pair in wanted.values() for f in pair):
                urls = tuple(base + f"{f.name}.gz" for base in FASHION_MNIST_URLS)
                files.fetch(urls, target / f"{f.name}.gz", f.archive_md5)
            folder = target
        except OSError as err:
            warnings.warn(f"Fashion-MNIST download failed: {err}", stacklevel=3)
            reason = "download failed"
    if folder is None:
        folder, wanted = BUNDLED_DIR, FASHION_MNIST_SUBSET_FILES
    (train_x, train_y), (test_x, test_y) = (_load_split(folder, wanted[s]) for s in wanted)
    counts = f"{len(train_y)} train / {len(test_y)} test"
    if folder == BUNDLED_DIR:
        source = f"bundled subset ({counts}); full Fashion-MNIST not found, {reason}"
        warnings.warn(
            f"using the bundled Fashion-MNIST subset ({counts}): the full set is not in"
            f" {', '.join(map(str, files.data_dirs(root)))} ({reason})",
            stacklevel=3,
        )
    else:
        source = f"Fashion-MNIST ({counts}) from {folder}"
        files.note_source(root, folder, "Fashion-MNIST")
    full = ImageTensorDataset(train_x, train_y, MEAN, STD)
    test = ImageTensorDataset(test_x, test_y, MEAN, STD)
    train, val = split(full, val_size, seed, augment)
    return DataBundle(train, val, test, 10, 1, 28, source)
