"""Dataset loaders, on small files written here (and on the real Fashion-MNIST where present)."""

from __future__ import annotations

import builtins
import dataclasses
import gzip
import hashlib
import io
import pickle
import struct
import sys
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from granet.experiment import data
from granet.experiment.data import ChecksumError, IdxFile, load_dataset

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def md5(raw: bytes) -> str:
    return hashlib.md5(raw).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No dataset anywhere: empty $GRANET_DATA and cache, no system folders, no network."""
    monkeypatch.setenv("GRANET_DATA", str(tmp_path / "granet-data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", ())

    def offline(url, timeout):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    return tmp_path / "granet-data"


def write_fashion(folder: Path, monkeypatch, gzipped: bool = True) -> dict:
    """Small Fashion-MNIST-format files in ``folder`` (50 training and 20 test images),
    registered as the official ones."""
    rng = np.random.default_rng(0)
    arrays = {
        "train": (rng.integers(0, 256, (50, 28, 28), np.uint8), np.arange(50) % 10),
        "test": (rng.integers(0, 256, (20, 28, 28), np.uint8), np.arange(20) % 10),
    }
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, (official_images, official_labels) in data.FASHION_MNIST_FILES.items():
        images, labels = arrays[split]
        entries = []
        for official, array in ((official_images, images), (official_labels, labels)):
            raw = idx_bytes(array.astype(np.uint8))
            if gzipped:
                (folder / f"{official.name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / official.name).write_bytes(raw)
            entries.append(IdxFile(official.name, md5(raw)))
        files[split] = tuple(entries)
    monkeypatch.setattr(data, "FASHION_MNIST_FILES", files)
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
    train_idx, val_idx = data.split_indices(50, 0.2, 3)
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
    expected = data.FASHION_MNIST_FILES["train"][0].md5
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
    assert not list(nowhere.rglob("*.part"))


def test_download_checks_the_published_checksum(nowhere, monkeypatch):
    served_from = nowhere.parent / "server"
    write_fashion(served_from, monkeypatch)
    archives = {p.name: p.read_bytes() for p in served_from.glob("*.gz")}
    files = {
        split: tuple(dataclasses.replace(f, archive_md5=md5(archives[f"{f.name}.gz"])) for f in fs)
        for split, fs in data.FASHION_MNIST_FILES.items()
    }
    monkeypatch.setattr(data, "FASHION_MNIST_FILES", files)
    requested = []

    def serve(url, timeout):
        requested.append(url)
        return io.BytesIO(archives[url.rsplit("/", 1)[1]])

    monkeypatch.setattr(data.urllib.request, "urlopen", serve)
    bundle = load_dataset("fashion-mnist", val_size=0)
    assert len(requested) == 4 and all(u.startswith(data.FASHION_MNIST_URLS[0]) for u in requested)
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


def test_split_is_deterministic_disjoint_and_complete():
    train, val = data.split_indices(100, 0.25, seed=7)
    assert len(val) == 25 and set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(100))
    again, _ = data.split_indices(100, 0.25, seed=7)
    other, _ = data.split_indices(100, 0.25, seed=8)
    assert torch.equal(train, again) and not torch.equal(train, other)
    assert len(data.split_indices(100, 30, seed=0)[1]) == 30
    assert len(data.split_indices(100, 0, seed=0)[1]) == 0


@pytest.mark.parametrize("val_size", [1.0, -0.1, 100, -1, True, "0.1"])
def test_bad_val_size(val_size):
    with pytest.raises(ValueError, match="val_size"):
        data.split_indices(100, val_size, seed=0)


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
    bundle = data.synthetic(60, 30, num_classes=3, in_channels=3, image_size=32, val_size=6)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (3, 3, 32)
    assert bundle.train[0][0].shape == (3, 32, 32) and len(bundle.val) == 6


def test_unknown_dataset_lists_choices():
    with pytest.raises(ValueError, match="choose from: fashion-mnist, cifar10, cifar100, imagenet"):
        load_dataset("mnist")


# --- CIFAR -----------------------------------------------------------------------------------


def write_cifar(name: str, root: Path, monkeypatch, per_batch: int = 4) -> dict[str, dict]:
    """Pickle batches in the layout of the official archive, registered as the official ones."""
    spec = data.CIFAR[name]
    rng = np.random.default_rng(1)
    folder = root / spec.folder
    folder.mkdir(parents=True)
    batches, checksums = {}, {}
    for file, _ in spec.train + spec.test:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), np.uint8),
            spec.label_key.encode(): rng.integers(0, spec.num_classes, per_batch).tolist(),
        }
        raw = pickle.dumps(batch, protocol=2)
        (folder / file).write_bytes(raw)
        batches[file], checksums[file] = batch, md5(raw)
    monkeypatch.setattr(
        data,
        "CIFAR",
        {
            **data.CIFAR,
            name: dataclasses.replace(
                spec,
                train=tuple((f, checksums[f]) for f, _ in spec.train),
                test=tuple((f, checksums[f]) for f, _ in spec.test),
            ),
        },
    )
    return batches


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_pickle_batches(nowhere, monkeypatch, name):
    batches = write_cifar(name, nowhere, monkeypatch)
    spec = data.CIFAR[name]
    bundle = load_dataset(name, val_size=0)
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (spec.num_classes, 3, 32)
    assert len(bundle.train) == 4 * len(spec.train) and len(bundle.test) == 4
    row = batches[spec.test[0][0]][b"data"][2]
    x, y = bundle.test[2]
    for channel in range(3):
        plane = torch.from_numpy(row[channel * 1024 : (channel + 1) * 1024].reshape(32, 32))
        normalised = (plane.float() / 255 - spec.mean[channel]) / spec.std[channel]
        assert torch.allclose(x[channel], normalised, atol=1e-6)
    assert int(y) == batches[spec.test[0][0]][spec.label_key.encode()][2]


def test_cifar_corrupt_batch_names_file(nowhere, monkeypatch):
    write_cifar("cifar10", nowhere, monkeypatch)
    path = nowhere / "cifar-10-batches-py" / "data_batch_3"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ChecksumError, match=f"{path}: checksum mismatch, expected md5"):
        load_dataset("cifar10")


def test_cifar_batch_may_not_run_code(nowhere, monkeypatch):
    write_cifar("cifar10", nowhere, monkeypatch)
    path = nowhere / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": print}, protocol=2))
    spec = data.CIFAR["cifar10"]
    spec = dataclasses.replace(spec, test=(("test_batch", md5(path.read_bytes())),))
    monkeypatch.setattr(data, "CIFAR", {**data.CIFAR, "cifar10": spec})
    with pytest.raises(pickle.UnpicklingError, match=r"\.print is not allowed in a CIFAR batch"):
        load_dataset("cifar10")


@pytest.mark.parametrize(("download", "why"), [(False, "download is disabled"), (True, "offline")])
def test_cifar_missing(nowhere, download, why):
    with pytest.raises(FileNotFoundError, match=f"cifar-100-python not found in {nowhere}.*{why}"):
        load_dataset("cifar100", download=download)


def test_cifar_download_extracts_the_checked_archive(nowhere, monkeypatch):
    staging = nowhere.parent / "staging"
    write_cifar("cifar10", staging, monkeypatch, per_batch=2)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    spec = dataclasses.replace(data.CIFAR["cifar10"], archive_md5=md5(archive.getvalue()))
    monkeypatch.setattr(data, "CIFAR", {**data.CIFAR, "cifar10": spec})
    monkeypatch.setattr(
        data.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(archive.getvalue())
    )
    bundle = load_dataset("cifar10", val_size=2, augment=True)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (8, 2, 2)
    assert (nowhere / "cifar-10-python.tar.gz").is_file()
    assert bundle.train.augment and not bundle.val.augment and not bundle.test.augment


def test_random_crop_flip_takes_windows_of_the_padded_image():
    torch.manual_seed(0)
    images = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = data.random_crop_flip(images, padding=4)
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    windows = [padded[:, :, i : i + 8, j : j + 8] for i in range(9) for j in range(9)]
    for n in range(16):
        assert any(torch.equal(out[n], w[n]) or torch.equal(out[n], w[n].flip(-1)) for w in windows)
    assert not torch.equal(out, images)


# --- ImageNet --------------------------------------------------------------------------------


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
