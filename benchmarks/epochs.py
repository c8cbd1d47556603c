"""Whole epochs with GraNet, topology rounds included, against dense: the end-to-end cost.

The reference code's figure (issue 4): on an H100, two epochs of a small Fashion-MNIST CNN took
4.2 s against 3.7 s dense (+13%), with its topology updates every 100 steps. Here the small CNN
of ``overhead.py`` trains twice from the same start, dense and with ``granet.GraNet`` (update
every 100 steps, gradual phase over the first half), on random tensors shaped like Fashion-MNIST's
training set (60,000 x 1 x 28 x 28, batch 128: 469 steps an epoch) held on the device, so that
only the training step and the sparsifier are timed. The two variants take turns every 20 steps
(``--chunk``; who goes first alternates), so that machine noise hits them alike.

    python benchmarks/epochs.py --device cuda
    OMP_NUM_THREADS=1 python benchmarks/epochs.py --steps-per-epoch 200   # CPU: a shorter epoch
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from overhead import describe, emit, small_cnn, sync
from torch import nn

import granet


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps-per-epoch", type=int, default=469, help="469: all of Fashion-MNIST")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--update-every", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps per variant first")
    ap.add_argument("--chunk", type=int, default=20, help="steps per variant in turn")
    ap.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.steps_per_epoch, args.update_every, args.warmup, args.chunk = (
            1,
            6,
            2,
            1,
            3,
        )

    device = torch.device(args.device)
    torch.manual_seed(0)
    n = args.steps_per_epoch * args.batch_size
    images = torch.randn(n, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (n,), device=device)
    batches = list(zip(images.split(args.batch_size), labels.split(args.batch_size)))
    total = args.epochs * len(batches)

    base = small_cnn().to(device)
    variants = {}
    for name in ("dense", "granet"):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        warm = copy.deepcopy(model), copy.deepcopy(opt.state_dict())
        variants[name] = (model, opt, warm)

    def train(name: str, steps: list) -> None:
        model, opt, _ = variants[name]
        for x, y in steps:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    # Warm up (kernel selection, allocator) on throwaway steps, then restore the start.
    for name in variants:
        train(name, batches[: args.warmup])
        model, opt, (start, opt_start) = variants[name]
        model.load_state_dict(start.state_dict())
        opt.load_state_dict(opt_start)
    sp = granet.GraNet(
        variants["granet"][0],
        variants["granet"][1],
        sparsity=0.9,
        total_steps=total,
        update_every=args.update_every,
    )

    seconds = {name: 0.0 for name in variants}
    chunks = [batches[i : i + args.chunk] for i in range(0, len(batches), args.chunk)]
    for c, steps in enumerate(chunks * args.epochs):
        for name in ("dense", "granet") if c % 2 == 0 else ("granet", "dense"):
            sync(device)
            t0 = time.perf_counter()
            train(name, steps)
            sync(device)
            seconds[name] += time.perf_counter() - t0

    result = {
        "benchmark": "epochs",
        "device": describe(device),
        "torch": torch.__version__,
        "epochs": args.epochs,
        "steps_per_epoch": len(batches),
        "update_every": args.update_every,
        "rounds": (total - 1) // args.update_every,
        "seconds": seconds,
        "granet_vs_dense": seconds["granet"] / seconds["dense"],
        "final_sparsity": sp.sparsity(),
    }
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
