"""CIFAR-10/100 from pickle batches written here: checked, downloaded, never running code."""

from __future__ import annotations

import dataclasses
import io
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from granet.experiment.datasets import ChecksumError, cifar, files, load_dataset


def write_cifar(name: str, root: Path, monkeypatch, per_batch: int = 4) -> dict[str, dict]:
    """Pickle batches in the layout of the official archive, registered as the official ones."""
    spec = cifar.CIFAR[name]
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
        batches[file], checksums[file] = batch, files.md5(raw)
    monkeypatch.setattr(
        cifar,
        "CIFAR",
        {
            **cifar.CIFAR,
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
    spec = cifar.CIFAR[name]
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
    spec = cifar.CIFAR["cifar10"]
    spec = dataclasses.replace(spec, test=(("test_batch", files.md5(path.read_bytes())),))
    monkeypatch.setattr(cifar, "CIFAR", {**cifar.CIFAR, "cifar10": spec})
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
    spec = dataclasses.replace(cifar.CIFAR["cifar10"], archive_md5=files.md5(archive.getvalue()))
    monkeypatch.setattr(cifar, "CIFAR", {**cifar.CIFAR, "cifar10": spec})
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout: io.BytesIO(archive.getvalue())
    )
    bundle = load_dataset("cifar10", val_size=2, augment=True)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (8, 2, 2)
    assert (nowhere / "cifar-10-python.tar.gz").is_file()
    assert bundle.train.augment and not bundle.val.augment and not bundle.test.augment
