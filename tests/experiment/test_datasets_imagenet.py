"""ImageNet from class folders, through torchvision (folders written here)."""

from __future__ import annotations

import builtins
import sys
from pathlib import Path

import numpy as np
import pytest

from granet.experiment.datasets import load_dataset


def imagenet_folders(root: Path, images_per_class: int = 0) -> Path:
    if images_per_class:
        from PIL import Image
    for split in ("train", "val"):
        for label in ("n01", "n02"):
            folder = root / "imagenet" / split / label
            folder.mkdir(parents=True)
            for i in range(images_per_class):
                pixels = np.full((40, 48, 3), 60 * i, np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG", format="JPEG")
    return root / "imagenet"


def test_imagenet_missing_folder(nowhere):
    with pytest.raises(FileNotFoundError, match="ImageNet not found.*cannot be downloaded"):
        load_dataset("imagenet")


@pytest.mark.parametrize("torchvision", ["missing", "built for another torch"])
def test_imagenet_needs_torchvision(nowhere, monkeypatch, torchvision):
    imagenet_folders(nowhere)
    if torchvision == "missing":
        monkeypatch.setitem(sys.modules, "torchvision", None)
    else:
        real_import = builtins.__import__

        def broken_import(name, *args, **kwargs):
            if name == "torchvision":
                raise RuntimeError("operator torchvision::nms does not exist")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", broken_import)
    with pytest.raises(ImportError, match="imagenet dataset needs torchvision"):
        load_dataset("imagenet")


def test_imagenet_folders_with_torchvision(nowhere):
    pytest.importorskip("torchvision")
    folder = imagenet_folders(nowhere, images_per_class=5)
    bundle = load_dataset("imagenet", folder, val_size=2, augment=True)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (2, 3, 224)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (8, 2, 10)
    x, y = bundle.train[0]
    assert x.shape == (3, 224, 224) and y in (0, 1)
    assert bundle.val[0][0].shape == (3, 224, 224)
