"""Fashion-MNIST from idx files: found, checked, downloaded, or the bundled subset (on small
files written here, and on the real Fashion-MNIST where present)."""

from __future__ import annotations

import dataclasses
import gzip
import io
import struct
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from granet.experiment.datasets import (
    ChecksumError,
    fashion_mnist,
    files,
    load_dataset,
    split_indices,
)
from granet.experiment.datasets.fashion_mnist import IdxFile

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_fashion(folder: Path, monkeypatch, gzipped: bool = True) -> dict:
    """Small Fashion-MNIST-format files in ``folder`` (50 training and 20 test images),
    registered as the official ones."""
    rng = np.random.default_rng(0)
    arrays = {
        "train": (rng.integers(0, 256, (50, 28, 28), np.uint8), np.arange(50) % 10),
        "test": (rng.integers(0, 256, (20, 28, 28), np.uint8), np.arange(20) % 10),
    }
    folder.mkdir(parents=True, exist_ok=True)
    registered = {}
    for split, (official_images, official_labels) in fashion_mnist.FASHION_MNIST_FILES.items():
        images, labels = arrays[split]
        entries = []
        for official, array in ((official_images, images), (official_labels, labels)):
            raw = idx_bytes(array.astype(np.uint8))
            if gzipped:
                (folder / f"{official.name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / official.name).write_bytes(raw)
            entries.append(IdxFile(official.name, files.md5(raw)))
        registered[split] = tuple(entries)
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_FILES", registered)
    return arrays


@pytest.mark.parametrize(
    ("subfolder", "gzipped"), [("fashion-mnist", True), ("", True), ("fashion-mnist", False)]
)
def test_fashion_mnist_from_granet_data(nowhere, monkeypatch, subfolder, gzipped):
    arrays = write_fashion(nowhere / subfolder, monkeypatch, gzipped)
    bundle = load_dataset("fashion-mnist", val_size=0.2, seed=3)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, 28)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (40, 10, 20)
    assert str(nowhere / subfolder).rstrip("/") in bundle.source
    train_idx, val_idx = split_indices(50, 0.2, 3)
    images, labels = arrays["train"]
    x, y = bundle.val[4]
    expected = (torch.from_numpy(images[int(val_idx[4])]).float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(x, expected.unsqueeze(0))
    assert int(y) == labels[int(val_idx[4])]
    assert torch.equal(bundle.test.labels, torch.from_numpy(arrays["test"][1]))


def test_batches_through_a_dataloader(nowhere, monkeypatch):
    write_fashion(nowhere, monkeypatch)
    bundle = load_dataset("fashion-mnist")
    x, y = next(iter(DataLoader(bundle.train, batch_size=8, shuffle=True)))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (8,) and y.dtype == torch.long


@pytest.mark.parametrize("damage", ["truncate", "flip a byte"])
def test_damaged_file_error_names_file_and_checksums(nowhere, monkeypatch, damage):
    write_fashion(nowhere, monkeypatch)
    path = nowhere / "train-images-idx3-ubyte.gz"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        raw = bytearray(gzip.decompress(path.read_bytes()))
        raw[100] ^= 0xFF
        path.write_bytes(gzip.compress(bytes(raw)))
    expected = fashion_mnist.FASHION_MNIST_FILES["train"][0].md5
    with pytest.raises(ChecksumError) as info:
        load_dataset("fashion-mnist")
    message = str(info.value)
    assert str(path) in message
    assert f"expected md5 {expected}" in message
    assert info.value.actual != expected and f"got {info.value.actual}" in message


def test_bundled_subset_when_nothing_found_and_download_disabled(nowhere):
    with pytest.warns(UserWarning, match="bundled Fashion-MNIST subset"):
        bundle = load_dataset("fashion-mnist", download=False)
    assert bundle.source.startswith("bundled subset (2000 train / 1000 test)")
    assert "download disabled" in bundle.source
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (1800, 200, 1000)
    all_train_labels = torch.cat([bundle.train.labels, bundle.val.labels])
    assert torch.bincount(all_train_labels).tolist() == [200] * 10
    assert torch.bincount(bundle.test.labels).tolist() == [100] * 10


def test_bundled_subset_when_download_fails(nowhere):
    with pytest.warns(UserWarning, match="download failed"):
        bundle = load_dataset("fashion-mnist")
    assert bundle.source.startswith("bundled subset") and "download failed" in bundle.source
    assert not nowhere.exists()  # the folders made for the download are gone with it


def test_a_failed_download_keeps_a_folder_that_was_there(nowhere):
    (nowhere / "fashion-mnist").mkdir(parents=True)
    (nowhere / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning, match="download failed"):
        load_dataset("fashion-mnist")
    assert sorted(p.name for p in nowhere.iterdir()) == ["fashion-mnist", "notes.txt"]


def test_a_data_root_without_the_data_says_where_it_came_from(nowhere, monkeypatch, tmp_path):
    write_fashion(nowhere / "fashion-mnist", monkeypatch)  # in $GRANET_DATA
    asked = tmp_path / "empty"
    asked.mkdir()
    with pytest.warns(UserWarning) as caught:
        bundle = load_dataset("fashion-mnist", asked)
    expected = f"Fashion-MNIST is not in the data root {asked}; using the copy in {nowhere}"
    assert any(str(w.message).startswith(expected) for w in caught), [
        str(w.message) for w in caught
    ]
    assert str(nowhere / "fashion-mnist") in bundle.source
    assert not list(asked.iterdir())  # nothing written there


def test_download_checks_the_published_checksum(nowhere, monkeypatch):
    served_from = nowhere.parent / "server"
    write_fashion(served_from, monkeypatch)
    archives = {p.name: p.read_bytes() for p in served_from.glob("*.gz")}
    published = {
        split: tuple(
            dataclasses.replace(f, archive_md5=files.md5(archives[f"{f.name}.gz"])) for f in fs
        )
        for split, fs in fashion_mnist.FASHION_MNIST_FILES.items()
    }
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_FILES", published)
    requested = []

    def serve(url, timeout):
        requested.append(url)
        return io.BytesIO(archives[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    bundle = load_dataset("fashion-mnist", val_size=0)
    assert len(requested) == 4 and all(
        u.startswith(fashion_mnist.FASHION_MNIST_URLS[0]) for u in requested
    )
    assert str(nowhere / "fashion-mnist") in bundle.source and len(bundle.train) == 50

    archives["t10k-labels-idx1-ubyte.gz"] = b"not the published file"
    for path in (nowhere / "fashion-mnist").iterdir():
        path.unlink()
    with (
        pytest.warns(UserWarning, match="bundled Fashion-MNIST subset"),
        pytest.warns(UserWarning, match="t10k-labels-idx1-ubyte.gz.*expected md5"),
    ):
        bundle = load_dataset("fashion-mnist")
    assert bundle.source.startswith("bundled subset")


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's Fashion-MNIST not here")
def test_real_fashion_mnist_matches_its_checksums():
    bundle = load_dataset("fashion-mnist", DEBIAN_FASHION_MNIST, val_size=0.1)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (54000, 6000, 10000)
    x, _ = bundle.train.__getitems__(list(range(2000)))[0]
    assert x.shape == (1, 28, 28)
