"""Random but learnable images, made from a seed: for tests and quick runs."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from granet.experiment.datasets.images import DataBundle, ImageTensorDataset, split


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
    """Each class has a fixed random mean image, a smooth pattern (7x7 Gaussian noise of
    standard deviation 0.5, upsampled bilinearly, so that convolutional networks can pick it up
    too), and an example is its class mean plus standard normal noise per pixel. Classes are
    balanced; everything is determined by ``seed``. MNIST-shaped by default."""
    generator = torch.Generator().manual_seed(seed)
    shape = (in_channels, image_size, image_size)
    coarse = 0.5 * torch.randn(num_classes, in_channels, 7, 7, generator=generator)
    means = F.interpolate(coarse, size=image_size, mode="bilinear", align_corners=False)

    def draw(n: int) -> ImageTensorDataset:
        labels = torch.randperm(n, generator=generator) % num_classes
        images = means[labels] + torch.randn(n, *shape, generator=generator)
        return ImageTensorDataset(images, labels, (0.0,) * in_channels, (1.0,) * in_channels)

    full_train, test = draw(num_train), draw(num_test)
    train, val = split(full_train, val_size, seed, augment)
    source = f"synthetic (seed {seed}): {num_train} train / {num_test} test"
    return DataBundle(train, val, test, num_classes, in_channels, image_size, source)


def load(
    root: str | os.PathLike | None,
    val_size: float | int,
    seed: int,
    augment: bool,
    download: bool = False,
) -> DataBundle:
    """The default :func:`synthetic` set (``root`` and ``download`` are ignored)."""
    return synthetic(val_size=val_size, seed=seed, augment=augment)
