"""ImageNet from class-per-folder images (``train/<class>/``, ``val/<class>/``), through
torchvision; it cannot be downloaded automatically."""

from __future__ import annotations

import copy
import os

import torch
from torch.utils.data import Subset

from granet.experiment.datasets import files
from granet.experiment.datasets.images import DataBundle, split_indices

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load(
    root: str | os.PathLike | None,
    val_size: float | int,
    seed: int,
    augment: bool,
    download: bool = False,
) -> DataBundle:
    """ImageNet with ``val_size`` of its training folder held out; ``augment``: random resized
    crops and flips of the training images. ``download`` is ignored: ImageNet cannot be."""
    places = files.candidates(root, "imagenet")
    folder = next((p for p in places if (p / "train").is_dir() and (p / "val").is_dir()), None)
    if folder is None:
        raise FileNotFoundError(
            "ImageNet not found: no folder with train/<class>/ and val/<class>/ image folders in "
            f"{', '.join(map(str, places))}. It cannot be downloaded automatically: get it "
            "from https://image-net.org and pass its folder as root or put it in $GRANET_DATA."
        )
    files.note_source(root, folder, "ImageNet")
    try:
        from torchvision import datasets, transforms
    except (ImportError, RuntimeError) as err:  # RuntimeError: built for another torch
        raise ImportError(
            "the imagenet dataset needs torchvision, in the build that matches torch "
            f"{torch.__version__} (pip install torchvision): {err}"
        ) from err
    normalize = transforms.Normalize(MEAN, STD)
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
