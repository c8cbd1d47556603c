"""What every dataset returns: a :class:`DataBundle` of in-memory image splits, the held-out
validation split, and the CIFAR crop-and-flip augmentation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

CROP_PADDING = 4


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


def split(
    dataset: ImageTensorDataset, val_size: float | int, seed: int, augment: bool
) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """(train, validation) of ``dataset``; only the training split is augmented."""
    train_idx, val_idx = split_indices(len(dataset), val_size, seed)
    return dataset.split(train_idx, augment), dataset.split(val_idx, augment=False)
