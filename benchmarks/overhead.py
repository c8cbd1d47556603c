"""Per-step overhead and topology-update cost of a granet sparsifier.

Three copies of one model train side by side in one process, in interleaved rounds so that machine
noise hits them alike: ``dense`` (a plain optimizer step), ``floor`` (the step followed by one fused
multiply of bool masks: the least any masking method can do) and ``granet`` (the step with a GraNet
sparsifier attached, no topology update due). Reported: median step times and their ratios, and
the time of one full GraNet round (global gradual pruning + per-layer drop-and-regrow)
mid-schedule. Memory is measured by ``memory.py``.

    python benchmarks/overhead.py --model small-cnn            # CPU, 28x28 inputs
    python benchmarks/overhead.py --model resnet50 --device cuda --amp bf16 --channels-last
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import granet
from granet.masks import apply_masks


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def resnet50() -> nn.Module:
    from granet.experiment.models import build_model

    return build_model("resnet50-imagenet", num_classes=1000, in_channels=3, image_size=224)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "small-cnn": (small_cnn, (1, 28, 28), 10),
    "resnet50": (resnet50, (3, 224, 224), 1000),
}


def emit(result: dict, path: str | None) -> None:
    """Print ``result`` as JSON, and write it to ``path`` when given."""
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def describe(device: torch.device) -> str:
    """The device in words: the GPU's name, or the CPU and its torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=MODELS, default="small-cnn")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="default: 64 (resnet50), 128")
    ap.add_argument("--steps", type=int, default=60, help="timed steps per variant (median)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--amp", choices=["none", "bf16"], default="none")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the models")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--update-reps", type=int, default=10, help="timed topology rounds (median)")
    ap.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.update_reps = 3, 1, 2

    device = torch.device(args.device)
    build, shape, classes = MODELS[args.model]
    batch = args.batch_size or (64 if args.model == "resnet50" else 128)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    base = build().to(device, memory_format=fmt)
    x = torch.randn(batch, *shape, device=device).to(memory_format=fmt)
    y = torch.randint(0, classes, (batch,), device=device)
    total, every = 100_000, 1000
    if args.warmup + args.steps >= every:
        ap.error(f"--warmup + --steps must stay below {every} (no update during timing)")

    variants = {}
    for name in ("dense", "floor", "granet"):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        sp = None
        if name == "granet":
            # no update is due during the timed steps (checked above): plain GraNet steps
            sp = granet.GraNet(
                model, opt, sparsity=args.sparsity, total_steps=total, update_every=every
            )
        variants[name] = [model, opt, sp, torch.compile(model) if args.compile else model]
    sparse = variants["granet"][2]
    masks = list(sparse.masks.values())
    floor_params = [dict(variants["floor"][0].named_parameters())[n] for n in sparse.names]
    apply_masks(floor_params, masks)

    def step(name: str) -> None:
        model, opt, _, run = variants[name]
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp == "bf16"):
            loss = nn.functional.cross_entropy(run(x), y)
        loss.backward()
        opt.step()
        if name == "floor":
            apply_masks(floor_params, masks)

    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.warmup + args.steps):
        for name in variants:
            sync(device)
            t0 = time.perf_counter()
            step(name)
            sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}

    # One full round mid-schedule: gradual pruning + drop-and-regrow, masks restored each rep.
    sp = sparse
    sp.step = total // 4  # inside the gradual phase (prune_end = total / 2)
    assert sp.sparsity_schedule.prunes_at(sp.step) and sp.regrow_schedule(sp.step) > 0
    snapshot = sp.state_dict()
    round_times = []
    for _ in range(args.update_reps):
        sp.load_state_dict(snapshot)
        sync(device)
        t0 = time.perf_counter()
        sp.update_topology()
        sync(device)
        round_times.append(time.perf_counter() - t0)

    result = {
        "model": args.model,
        "device": describe(device),
        "torch": torch.__version__,
        "batch_size": batch,
        "amp": args.amp,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "steps": args.steps,
        "median_step_ms": {k: 1000 * v for k, v in med.items()},
        "granet_vs_dense": med["granet"] / med["dense"],
        "granet_vs_floor": med["granet"] / med["floor"],
        "update_round_ms": 1000 * statistics.median(round_times),
        "sparse_weights": sum(p.numel() for p in sp.params),
    }
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
