"""Dense vs sparse CPU inference, and torch.save vs save_sparse file sizes.

Times the MLP 784-1000-1000-1000-10 and LeNet-5 of ``granet.experiment.models``, their
Linear/Conv2d weights zeroed by random masks at each sparsity (or the best model of each
``--run`` directory), against their ``sparse_inference`` copies at each batch size; prints one
markdown table.

    PYTHONPATH=src python benchmarks/inference.py                # full: 90/95/98%, batch 1, 128
    PYTHONPATH=src python benchmarks/inference.py --quick        # smoke run, a few seconds
    PYTHONPATH=src python benchmarks/inference.py --run runs/x   # a trained run instead
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import torch
from torch import nn

from granet.experiment.models import build_model
from granet.experiment.serving import bench_inference, bench_model, export_model, export_run

MODELS = ("mlp", "lenet5")  # 784-1000-1000-1000-10 and LeNet-5, for 1 x 28 x 28 images
INPUT_SHAPE = (1, 28, 28)
COLUMNS = (
    "model",
    "sparsity",
    "batch",
    "dense ms",
    "sparse ms",
    "speedup",
    "CSR layers",
    "torch.save KB",
    "save_sparse KB",
    "size ratio",
)


def masked(name: str, sparsity: float, seed: int) -> nn.Module:
    """A fresh model whose Linear/Conv2d weights keep a random ``1 - sparsity`` of entries."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=10, in_channels=1, image_size=28)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.mul_(torch.rand_like(module.weight) >= sparsity)
    return model.eval()


def table_row(name: str, sparsity: str, timing: dict, sizes: dict) -> list[str]:
    return [
        name,
        sparsity,
        str(timing["batch_size"]),
        f"{timing['dense_ms']:.3f}",
        "-" if timing["sparse_ms"] is None else f"{timing['sparse_ms']:.3f}",
        "-" if timing["speedup"] is None else f"{timing['speedup']:.2f}x",
        timing["csr_layers"],
        f"{sizes['torch_save_bytes'] / 1024:.1f}",
        f"{sizes['bytes'] / 1024:.1f}",
        f"{sizes['ratio']:.1%}",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="98%% only, batch 1 and 8, 3 repeats")
    parser.add_argument("--run", action="append", default=[], help="a run directory (repeatable)")
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sparsities, batch_sizes, repeats, min_sample_s = (
        ([0.98], [1, 8], 3, 1e-4)
        if args.quick
        else (args.sparsity, args.batch_sizes, args.repeats, 5e-3)
    )

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.gsp"
        for run in args.run:
            sizes = export_run(run, out)
            for timing in bench_inference(run, batch_sizes):
                rows.append(table_row(run, f"{sizes['weight_sparsity']:.1%}", timing, sizes))
        for name in () if args.run else MODELS:
            for sparsity in sparsities:
                model = masked(name, sparsity, args.seed)
                sizes = export_model(model, out)
                timings = bench_model(
                    model, INPUT_SHAPE, batch_sizes, repeats, min_sample_s, probe=True
                )
                rows.extend(table_row(name, f"{sparsity:.0%}", t, sizes) for t in timings)

    cpu = f"{platform.machine()}, {os.cpu_count()} CPUs"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}; fp32")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
