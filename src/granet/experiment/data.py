"""Datasets for the experiments: Fashion-MNIST, CIFAR-10/100, ImageNet folders, synthetic data.

``load_dataset(name)`` returns a :class:`DataBundle`: a training split, a validation split held
out of the training set (deterministic by ``seed``), the separate test set, and the input shape.

Where files are looked for, in order (:func:`data_dirs`): the ``root`` argument, ``$GRANET_DATA``,
the user cache (``$XDG_CACHE_HOME/granet``, by default ``~/.cache/granet``) and
:data:`SYSTEM_DATA_DIRS` (``/usr/share/datasets``, where Debian's ``dataset-fashion-mnist`` puts
its files). In each place a dataset may sit in its own folder (``fashion-mnist/``,
``cifar-10-batches-py/``, ``cifar-100-python/``, ``imagenet/``) or directly in it. Fashion-MNIST
and CIFAR files are checked against the MD5 of the official files before use (a corrupt file is
an error naming it); a missing one is downloaded from its official source (into ``root``, else
``$GRANET_DATA``, else the cache) when ``download`` is true, and checked the same way.

Fashion-MNIST falls back to a real subset that ships with the package (2,000 training and 1,000
test images, see ``experiment/data/README.md``) when the full set is nowhere and cannot be
downloaded; :attr:`DataBundle.source` says which was used.
"""

from __future__ import annotations

import codecs
import copy
import gzip
import hashlib
import logging
import os
import pickle
import shutil
import struct
import tarfile
import urllib.request
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("fashion-mnist", "cifar10", "cifar100", "imagenet", "synthetic")

SYSTEM_DATA_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets"),)
BUNDLED_DIR = Path(__file__).with_name("data")

FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
# The normalisation of the GraNet reference code (Liu et al. 2021) for CIFAR.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

CROP_PADDING = 4


class ChecksumError(ValueError):
    """A data file whose MD5 is not the published one: corrupt, truncated or another version."""

    def __init__(self, path: Path, expected: str, actual: str, detail: str = "") -> None:
        self.path, self.expected, self.actual = path, expected, actual
        super().__init__(
            f"{path}: checksum mismatch, expected md5 {expected}, got {actual}"
            + (f" ({detail})" if detail else "")
            + "; the file is corrupt, truncated or not the official one: delete or replace it"
        )


@dataclass
class DataBundle:
    """The three splits of a dataset and what a model needs to know about its inputs."""

    train: Dataset  # training split (validation held out of it)
    val: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    source: str  # human-readable: which files / which variant was used


class ImageTensorDataset(Dataset):
    """Images held in memory as an (N, C, H, W) tensor, normalised per channel when fetched.

    ``uint8`` images are scaled to [0, 1] first. With ``augment`` each fetch applies the CIFAR
    recipe: a random crop of the image zero-padded by 4 pixels, and a horizontal flip with
    probability 1/2 (torch's global RNG). Batches fetched by a ``DataLoader`` are processed as one
    tensor (``__getitems__``), which keeps CPU training fast.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool = False,
    ) -> None:
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(
                f"images must be (N, C, H, W) with one label each, got images {tuple(images.shape)}"
                f" and {len(labels)} labels"
            )
        self.images, self.labels = images, labels.long()
        self.mean, self.std, self.augment = mean, std, augment
        self._mean = torch.tensor(mean).view(1, -1, 1, 1)
        self._std = torch.tensor(std).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        index = torch.as_tensor(indices, dtype=torch.long)
        images = self.images[index]
        if self.augment:
            images = random_crop_flip(images, CROP_PADDING)
        if images.dtype == torch.uint8:
            images = images.float().div_(255)
        images = (images - self._mean) / self._std
        return list(zip(images, self.labels[index]))

    def split(self, indices: torch.Tensor, augment: bool) -> ImageTensorDataset:
        """The dataset restricted to ``indices``, with its own augmentation setting."""
        return ImageTensorDataset(
            self.images[indices], self.labels[indices], self.mean, self.std, augment
        )


def random_crop_flip(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Per image: a random crop of the zero-padded image at its original size, flipped
    horizontally with probability 1/2. Works on a whole (N, C, H, W) batch at once."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    rows = torch.randint(0, 2 * padding + 1, (n, 1)) + torch.arange(h)
    cols = torch.randint(0, 2 * padding + 1, (n, 1)) + torch.arange(w)
    cols = torch.where(torch.rand(n, 1) < 0.5, cols.flip(1), cols)
    return padded[
        torch.arange(n).view(n, 1, 1, 1),
        torch.arange(c).view(1, c, 1, 1),
        rows.view(n, 1, h, 1),
        cols.view(n, 1, 1, w),
    ]


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    val_size: float | int = 0.1,
    seed: int = 0,
    augment: bool = False,
    download: bool = True,
) -> DataBundle:
    """Load dataset ``name`` (one of :data:`DATASETS`) with a validation split held out of its
    training set: ``val_size`` is a fraction of it (float) or a number of examples (int), drawn
    at random with ``seed``. ``augment`` turns on random-crop and flip augmentation of the
    training split (for ImageNet: random resized crops and flips)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from: {', '.join(DATASETS)}")
    if name == "fashion-mnist":
        return _fashion_mnist(root, val_size, seed, augment, download)
    if name in CIFAR:
        return _cifar(CIFAR[name], root, val_size, seed, augment, download)
    if name == "imagenet":
        return _imagenet(root, val_size, seed, augment)
    return synthetic(val_size=val_size, seed=seed, augment=augment)


def synthetic(
    num_train: int = 1000,
    num_test: int = 500,
    *,
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    val_size: float | int = 0.1,
    seed: int = 0,
    augment: bool = False,
) -> DataBundle:
    """Random but learnable data: each class has a fixed random mean image, a smooth pattern
    (7x7 Gaussian noise of standard deviation 0.5, upsampled bilinearly, so that convolutional
    networks can pick it up too), and an example is its class mean plus standard normal noise
    per pixel. Classes are balanced; everything is determined by ``seed``. MNIST-shaped by
    default."""
    generator = torch.Generator().manual_seed(seed)
    shape = (in_channels, image_size, image_size)
    coarse = 0.5 * torch.randn(num_classes, in_channels, 7, 7, generator=generator)
    means = F.interpolate(coarse, size=image_size, mode="bilinear", align_corners=False)

    def draw(n: int) -> ImageTensorDataset:
        labels = torch.randperm(n, generator=generator) % num_classes
        images = means[labels] + torch.randn(n, *shape, generator=generator)
        return ImageTensorDataset(images, labels, (0.0,) * in_channels, (1.0,) * in_channels)

    full_train, test = draw(num_train), draw(num_test)
    train, val = _split(full_train, val_size, seed, augment)
    source = f"synthetic (seed {seed}): {num_train} train / {num_test} test"
    return DataBundle(train, val, test, num_classes, in_channels, image_size, source)


def _split(
    dataset: ImageTensorDataset, val_size: float | int, seed: int, augment: bool
) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    train_idx, val_idx = split_indices(len(dataset), val_size, seed)
    return dataset.split(train_idx, augment), dataset.split(val_idx, augment=False)


def split_indices(n: int, val_size: float | int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (train, val) indices of a random split of ``range(n)``; ``val_size`` is a fraction
    (float in [0, 1)) or a count (int), and the split depends only on ``n``, it and ``seed``."""
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ValueError(f"val_size must be a float fraction or an int count, got {val_size!r}")
    if isinstance(val_size, float) and not 0.0 <= val_size < 1.0:
        raise ValueError(f"val_size as a fraction must be in [0, 1), got {val_size}")
    n_val = round(val_size * n) if isinstance(val_size, float) else val_size
    if not 0 <= n_val < n:
        raise ValueError(f"val_size={val_size!r} leaves no training data out of {n} examples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val:].sort().values, order[:n_val].sort().values


# ---------------------------------------------------------------------------------------------
# Where data lives, checksums and downloads


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


def _download_dir(root: str | os.PathLike | None) -> Path:
    return data_dirs(root)[0]


def _candidates(root: str | os.PathLike | None, folder: str) -> list[Path]:
    return [place for d in data_dirs(root) for place in (d / folder, d)]


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _check_file(path: Path, md5: str) -> None:
    actual = _file_md5(path)
    if actual != md5:
        raise ChecksumError(path, md5, actual)


def _fetch(urls: tuple[str, ...], dest: Path, md5: str) -> None:
    """Download ``dest`` from the first of ``urls`` that serves a file with the right MD5.
    The file only takes its final name once checked."""
    if dest.exists() and _file_md5(dest) == md5:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = []
    for url in urls:
        log.info("downloading %s to %s", url, dest)
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
                shutil.copyfileobj(response, out)
            _check_file(part, md5)
        except (OSError, ChecksumError) as err:
            failures.append(f"{url}: {err}")
            part.unlink(missing_ok=True)
            continue
        part.replace(dest)
        return
    raise OSError(f"could not download {dest.name}: " + "; ".join(failures))


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (idx files)


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
    if md5 is not None and (problem or _md5(data) != md5):
        raise ChecksumError(path, md5, _md5(data), problem)
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


def _load_idx_split(folder: Path, files: tuple[IdxFile, IdxFile]) -> tuple[torch.Tensor, ...]:
    images, labels = (read_idx(_idx_path(folder, f), f.md5) for f in files)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{folder}: shapes {tuple(images.shape)} and {tuple(labels.shape)}")
    return images.unsqueeze(1), labels


def _has_all(folder: Path, files: dict[str, tuple[IdxFile, IdxFile]]) -> bool:
    return all(_idx_path(folder, f) for pair in files.values() for f in pair)


def _fashion_mnist(
    root: str | os.PathLike | None, val_size: float | int, seed: int, augment: bool, download: bool
) -> DataBundle:
    files = FASHION_MNIST_FILES
    folder = next((p for p in _candidates(root, "fashion-mnist") if _has_all(p, files)), None)
    reason = "download disabled"
    if folder is None and download:
        target = _download_dir(root) / "fashion-mnist"
        try:
            for f in (f for pair in files.values() for f in pair):
                urls = tuple(base + f"{f.name}.gz" for base in FASHION_MNIST_URLS)
                _fetch(urls, target / f"{f.name}.gz", f.archive_md5)
            folder = target
        except OSError as err:
            warnings.warn(f"Fashion-MNIST download failed: {err}", stacklevel=3)
            reason = "download failed"
    if folder is None:
        folder, files = BUNDLED_DIR, FASHION_MNIST_SUBSET_FILES
    (train_x, train_y), (test_x, test_y) = (_load_idx_split(folder, files[s]) for s in files)
    counts = f"{len(train_y)} train / {len(test_y)} test"
    if folder == BUNDLED_DIR:
        source = f"bundled subset ({counts}); full Fashion-MNIST not found, {reason}"
        warnings.warn(
            f"using the bundled Fashion-MNIST subset ({counts}): the full set is not in"
            f" {', '.join(map(str, data_dirs(root)))} ({reason})",
            stacklevel=3,
        )
    else:
        source = f"Fashion-MNIST ({counts}) from {folder}"
    full = ImageTensorDataset(train_x, train_y, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    test = ImageTensorDataset(test_x, test_y, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    train, val = _split(full, val_size, seed, augment)
    return DataBundle(train, val, test, 10, 1, 28, source)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle batches)


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
# writes at protocol 2; nothing else (a pickle can run arbitrary code otherwise).
# ``__reduce__`` names numpy's array rebuilder, wherever it lives.
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


def _load_cifar_batches(
    folder: Path, files: tuple[tuple[str, str], ...], label_key: str
) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for name, md5 in files:
        path = folder / name
        _check_file(path, md5)
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(batch[label_key]) != len(data):
            raise ValueError(f"{path}: expected N x 3072 images and N labels, got {data.shape}")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32)))
        labels.append(torch.as_tensor(batch[label_key], dtype=torch.long))
    return torch.cat(images), torch.cat(labels)


def _cifar(
    spec: CifarSpec,
    root: str | os.PathLike | None,
    val_size: float | int,
    seed: int,
    augment: bool,
    download: bool,
) -> DataBundle:
    names = [name for name, _ in spec.train + spec.test]
    candidates = _candidates(root, spec.folder)
    folder = next((p for p in candidates if all((p / n).is_file() for n in names)), None)
    if folder is None:
        where = ", ".join(map(str, candidates))
        if not download:
            raise FileNotFoundError(f"{spec.folder} not found in {where}; download is disabled")
        target = _download_dir(root)
        try:
            _fetch((spec.url,), target / spec.archive, spec.archive_md5)
        except OSError as err:
            raise FileNotFoundError(f"{spec.folder} not found in {where}; {err}") from err
        with tarfile.open(target / spec.archive) as tar:
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(target, **safe)
        folder = target / spec.folder
    train_x, train_y = _load_cifar_batches(folder, spec.train, spec.label_key)
    test_x, test_y = _load_cifar_batches(folder, spec.test, spec.label_key)
    full = ImageTensorDataset(train_x, train_y, spec.mean, spec.std)
    train, val = _split(full, val_size, seed, augment)
    test = ImageTensorDataset(test_x, test_y, spec.mean, spec.std)
    source = f"{spec.folder} ({len(train_y)} train / {len(test_y)} test) from {folder}"
    return DataBundle(train, val, test, spec.num_classes, 3, 32, source)


# ---------------------------------------------------------------------------------------------
# ImageNet (class-per-folder images, through torchvision)


def _imagenet(
    root: str | os.PathLike | None, val_size: float | int, seed: int, augment: bool
) -> DataBundle:
    candidates = _candidates(root, "imagenet")
    folder = next((p for p in candidates if (p / "train").is_dir() and (p / "val").is_dir()), None)
    if folder is None:
        raise FileNotFoundError(
            "ImageNet not found: no folder with train/<class>/ and val/<class>/ image folders in "
            f"{', '.join(map(str, candidates))}. It cannot be downloaded automatically: get it "
            "from https://image-net.org and pass its folder as root or put it in $GRANET_DATA."
        )
    try:
        from torchvision import datasets, transforms
    except (ImportError, RuntimeError) as err:  # RuntimeError: built for another torch
        raise ImportError(
            "the imagenet dataset needs torchvision, in the build that matches torch "
            f"{torch.__version__} (pip install torchvision): {err}"
        ) from err
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    evaluation = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalize]
    )
    training = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    full = datasets.ImageFolder(folder / "train", training if augment else evaluation)
    # The held-out part of the training folder is evaluated like the test set: a second view of
    # the same file list with the evaluation transform.
    unaugmented = copy.copy(full)
    unaugmented.transform = evaluation
    test = datasets.ImageFolder(folder / "val", evaluation)
    if test.classes != full.classes:
        raise ValueError(f"{folder}: train/ and val/ do not have the same class folders")
    train_idx, val_idx = split_indices(len(full), val_size, seed)
    source = f"ImageNet folders ({len(full)} train / {len(test)} val images) from {folder}"
    return DataBundle(
        Subset(full, train_idx.tolist()),
        Subset(unaugmented, val_idx.tolist()),
        test,
        len(full.classes),
        3,
        224,
        source,
    )
