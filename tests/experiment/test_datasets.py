"""The datasets package: the registry, the validation split, synthetic data, augmentation."""

from __future__ import annotations

import pytest
import torch

from granet.experiment.datasets import load_dataset, split_indices
from granet.experiment.datasets.images import random_crop_flip
from granet.experiment.datasets.synthetic import synthetic


def test_split_is_deterministic_disjoint_and_complete():
    train, val = split_indices(100, 0.25, seed=7)
    assert len(val) == 25 and set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    again, _ = split_indices(100, 0.25, seed=7)
    other, _ = split_indices(100, 0.25, seed=8)
    assert torch.equal(train, again) and not torch.equal(train, other)
    assert len(split_indices(100, 30, seed=0)[1]) == 30
    assert len(split_indices(100, 0, seed=0)[1]) == 0


@pytest.mark.parametrize("val_size", [1.0, -0.1, 100, -1, True, "0.1"])
def test_bad_val_size(val_size):
    with pytest.raises(ValueError, match="val_size"):
        split_indices(100, val_size, seed=0)


def test_synthetic_is_deterministic_learnable_and_split():
    bundle = load_dataset("synthetic", seed=1)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (900, 100, 500)
    assert bundle.train.images.shape[1:] == (1, 28, 28)
    train_rows = {row.numpy().tobytes() for row in bundle.train.images}
    assert not any(row.numpy().tobytes() in train_rows for row in bundle.val.images)
    assert torch.equal(bundle.test.images, load_dataset("synthetic", seed=1).test.images)
    assert not torch.equal(bundle.test.images, load_dataset("synthetic", seed=2).test.images)
    # A nearest-class-mean classifier fitted on the training split classifies the test set.
    images, labels = bundle.train.images.flatten(1), bundle.train.labels
    means = torch.stack([images[labels == c].mean(0) for c in range(10)])
    predicted = torch.cdist(bundle.test.images.flatten(1), means).argmin(1)
    assert (predicted == bundle.test.labels).float().mean() > 0.9


def test_synthetic_other_shapes():
    bundle = synthetic(60, 30, num_classes=3, in_channels=3, image_size=32, val_size=6)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (3, 3, 32)
    assert bundle.train[0][0].shape == (3, 32, 32) and len(bundle.val) == 6


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="choose from: fashion-mnist, cifar10, cifar100, imagenet"):
        load_dataset("mnist")


def test_random_crop_flip_takes_windows_of_the_padded_image():
    torch.manual_seed(0)
    images = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = random_crop_flip(images, padding=4)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    windows = [padded[:, :, i : i + 8, j : j + 8] for i in range(9) for j in range(9)]
    for n in range(16):
        assert any(torch.equal(out[n], w[n]) or torch.equal(out[n], w[n].flip(-1)) for w in windows)
    assert not torch.equal(out, images)


def test_train_size_draws_a_seeded_subset_of_the_training_split():
    from granet.experiment.blocks import load_data
    from granet.experiment.config import make_config

    def train_rows(**settings):
        data = load_data(make_config({"dataset": "synthetic", **settings}))
        return data, {tuple(x.flatten().tolist()[:8]) for x, _ in data.train}

    full, all_rows = train_rows()
    part, rows = train_rows(train_size=100)
    assert len(part.train) == 100 and rows <= all_rows
    assert "training on 100 of its 900 training examples" in part.source
    assert train_rows(train_size=100)[1] == rows  # the same draw again
    assert len(train_rows(train_size=5000)[0].train) == 900  # at most: all there is
    with pytest.raises(ValueError, match="train_size must be >= 1"):
        make_config({"train_size": 0})
