"""CIFAR-10 and CIFAR-100, from the official python pickle batches (checked, or downloaded).

A pickle can run arbitrary code; the batches are read by an unpickler that allows only numpy
arrays and dtypes, and every batch's MD5 is checked against the published one first.
"""

from __future__ import annotations

import codecs
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from granet.experiment.datasets import files
from granet.experiment.datasets.images import DataBundle, ImageTensorDataset, split

# The normalisation of the GraNet reference code (Liu et al. 2021).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


@dataclass(frozen=True)
class CifarSpec:
    """Where a CIFAR variant comes from and how its pickle batches are laid out."""

    folder: str
    archive: str
    archive_md5: str
    train: tuple[tuple[str, str], ...]  # (file name, md5)
    test: tuple[tuple[str, str], ...]
    label_key: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def url(self) -> str:
        return f"https://www.cs.toronto.edu/~kriz/{self.archive}"


# MD5s published with the archives (https://www.cs.toronto.edu/~kriz/cifar.html).
CIFAR: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        archive_md5="c58f30108f718f92721af3b95e74349a",
        train=(
            ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
            ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
            ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
            ("data_batch_4", "634d18415352ddfa80567beed471001a"),
            ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
        ),
        test=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
        label_key="labels",
        num_classes=10,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
    ),
    "cifar100": CifarSpec(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
        train=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
        test=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
        label_key="fine_labels",
        num_classes=100,
        mean=CIFAR100_MEAN,
        std=CIFAR100_STD,
    ),
}

# What a CIFAR batch may reference: numpy arrays and dtypes, and the bytes encoder Python 3
# writes at protocol 2; nothing else. ``__reduce__`` names numpy's array rebuilder, wherever it
# lives.
_RECONSTRUCT = np.zeros(0).__reduce__()[0]
_PICKLE_GLOBALS = {
    ("_codecs", "encode"): codecs.encode,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch")
        return _PICKLE_GLOBALS[module, name]


def _load_batches(
    folder: Path, batches: tuple[tuple[str, str], ...], label_key: str
) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name, md5 in batches:
        path = folder / name
        files.check_file(path, md5)
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch[label_key]) != len(data):
            raise ValueError(f"{path}: expected N x 3072 images and N labels, got {data.shape}")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32)))
        labels.append(torch.as_tensor(batch[label_key], dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


def load(
    name: str,
    root: str | os.PathLike | None,
    val_size: float | int,
    seed: int,
    augment: bool,
    download: bool,
) -> DataBundle:
    """CIFAR variant ``name`` (a key of :data:`CIFAR`) with ``val_size`` of its training set
    held out; the archive is downloaded and extracted when no folder holds the batches."""
    spec = CIFAR[name]
    names = [file for file, _ in spec.train + spec.test]
    places = files.candidates(root, spec.folder)
    folder = next((p for p in places if all((p / n).is_file() for n in names)), None)
    if folder is None:
        where = ", ".join(map(str, places))
        if not download:
            raise FileNotFoundError(f"{spec.folder} not found in {where}; download is disabled")
        target = files.download_dir(root)
        try:
            files.fetch((spec.url,), target / spec.archive, spec.archive_md5)
        except OSError as err:
            raise FileNotFoundError(f"{spec.folder} not found in {where}; {err}") from err
        with tarfile.open(target / spec.archive) as tar:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(target, **safe)
        folder = target / spec.folder
    files.note_source(root, folder, spec.folder)
    train_x, train_y = _load_batches(folder, spec.train, spec.label_key)
    test_x, test_y = _load_batches(folder, spec.test, spec.label_key)
    full = ImageTensorDataset(train_x, train_y, spec.mean, spec.std)
    train, val = split(full, val_size, seed, augment)
    test = ImageTensorDataset(test_x, test_y, spec.mean, spec.std)
    source = f"{spec.folder} ({len(train_y)} train / {len(test_y)} test) from {folder}"
    return DataBundle(train, val, test, spec.num_classes, 3, 32, source)
