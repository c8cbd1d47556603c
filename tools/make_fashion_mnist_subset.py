"""Write the Fashion-MNIST subset that ships in src/granet/experiment/data.

The subset is the first 200 training images of each class and the first 100 test images of each
class, in the order of the official files (so 2,000 training and 1,000 test images, balanced).
The output is byte-for-byte reproducible (gzip with no name and mtime 0) and its checksums are
printed for granet.experiment.datasets.fashion_mnist.FASHION_MNIST_SUBSET_FILES.

    python tools/make_fashion_mnist_subset.py [/usr/share/datasets/fashion-mnist]
"""

from __future__ import annotations

import gzip
import hashlib
import struct
import sys
from pathlib import Path

import torch

from granet.experiment.datasets.fashion_mnist import BUNDLED_DIR, FASHION_MNIST_FILES, read_idx

PER_CLASS = {"train": 200, "test": 100}


def first_per_class(labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """Indices of the first ``per_class`` examples of each class, in file order."""
    per_class_indices = [torch.nonzero(labels == c).flatten()[:per_class] for c in labels.unique()]
    return torch.cat(per_class_indices).sort().values


def idx_bytes(array: torch.Tensor) -> bytes:
    """The idx encoding of a uint8 tensor."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.numpy().tobytes()


def main(source: Path) -> None:
    for split, (images_file, labels_file) in FASHION_MNIST_FILES.items():
        images = read_idx(source / f"{images_file.name}.gz", images_file.md5)
        labels = read_idx(source / f"{labels_file.name}.gz", labels_file.md5)
        keep = first_per_class(labels, PER_CLASS[split])
        for file, array in ((images_file, images[keep]), (labels_file, labels[keep])):
            data = idx_bytes(array)
            out = BUNDLED_DIR / f"fashion-mnist-subset-{file.name}.gz"
            with open(out, "wb") as raw, gzip.GzipFile("", "wb", 9, raw, mtime=0) as f:
                f.write(data)
            md5 = hashlib.md5(data).hexdigest()
            print(f"{out.name}: {len(keep)} examples, md5 of its idx bytes {md5}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/usr/share/datasets/fashion-mnist"))
