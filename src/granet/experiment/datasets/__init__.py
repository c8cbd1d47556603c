"""Datasets for the experiments: Fashion-MNIST, CIFAR-10/100, ImageNet folders, synthetic data.

``load_dataset(name)`` returns a :class:`DataBundle`: a training split, a validation split held
out of the training set (deterministic by ``seed``), the separate test set, and the input shape.
One module per dataset; :mod:`.files` finds, checks and downloads files, :mod:`.images` holds
what they share. The files that ship with the package are in ``experiment/data/``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial

from granet.experiment.datasets import cifar, fashion_mnist, imagenet, synthetic
from granet.experiment.datasets.files import ChecksumError, data_dirs
from granet.experiment.datasets.images import DataBundle, ImageTensorDataset, split_indices

# name -> loader(root, val_size, seed, augment, download)
LOADERS: dict[str, Callable[..., DataBundle]] = {
    "fashion-mnist": fashion_mnist.load,
    "cifar10": partial(cifar.load, "cifar10"),
    "cifar100": partial(cifar.load, "cifar100"),
    "imagenet": imagenet.load,
    "synthetic": synthetic.load,
}
DATASETS: tuple[str, ...] = tuple(LOADERS)

__all__ = [
    "DATASETS",
    "ChecksumError",
    "DataBundle",
    "ImageTensorDataset",
    "data_dirs",
    "load_dataset",
    "split_indices",
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
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose from: {', '.join(DATASETS)}")
    return LOADERS[name](root, val_size, seed, augment, download)
