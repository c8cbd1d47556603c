"""2:4 sparsity on a GPU: inference through ``granet.sparse_inference`` (the layers on
``torch.sparse.to_sparse_semi_structured``) against dense, and a training step with a 2:4
sparsifier attached (masks on dense kernels) against a plain dense step.

    PYTHONPATH=src python benchmarks/nm_gpu.py [--width 4096] [--layers 4] [--json OUT]

Prints one table; needs CUDA (compute capability 8.0+ for the 2:4 kernel) and says so, measuring
nothing, where there is none.
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from functools import partial

import torch
from torch import nn

import granet
from granet import oneshot
from granet.inference import interleaved_times, nm_plan


def mlp(width: int, layers: int) -> nn.Sequential:
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))


def step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> None:
    opt.zero_grad()
    model(x).square().mean().backward()
    opt.step()


def median_ratio(times: list[list[float]]) -> float:
    """Median of the paired ratios of the second function's samples over the first's."""
    return statistics.median(b / a for a, b in zip(times[0], times[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("CUDA not available: nothing measured")
        return
    device = torch.device("cuda")
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        torch.manual_seed(0)
        model = mlp(args.width, args.layers).to(device, dtype).eval()
        oneshot.prune(model, 0.5, pattern="2:4")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fast = granet.sparse_inference(model, probe=False)
        plan = nm_plan(model)
        for batch in (32, 128, 1024):
            x = torch.randn(batch, args.width, device=device, dtype=dtype)
            with torch.inference_mode():
                times = interleaved_times([partial(model, x), partial(fast, x)], device=device)
            rows.append(
                {
                    "what": "inference",
                    "dtype": str(dtype).removeprefix("torch."),
                    "batch": batch,
                    "dense_ms": statistics.median(times[0]) * 1e3,
                    "sparse_ms": statistics.median(times[1]) * 1e3,
                    "speedup": 1 / median_ratio(times),
                    "plan": sorted(set(plan.values())),
                    "warnings": [str(w.message) for w in caught],
                }
            )
    for pattern in (None, "2:4"):
        torch.manual_seed(0)
        dense, sparse = mlp(args.width, args.layers).to(device), mlp(args.width, args.layers)
        sparse = sparse.to(device)
        opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (dense, sparse)]
        kw = {"pattern": pattern} if pattern else {"sparsity": 0.5}
        granet.RigL(sparse, opts[1], total_steps=10**6, update_every=10**5, **kw)
        x = torch.randn(256, args.width, device=device)
        times = interleaved_times(
            [partial(step, dense, opts[0], x), partial(step, sparse, opts[1], x)], device=device
        )
        rows.append(
            {
                "what": f"training step, RigL {pattern or 'unstructured 50%'} (fp32)",
                "batch": 256,
                "dense_ms": statistics.median(times[0]) * 1e3,
                "sparse_ms": statistics.median(times[1]) * 1e3,
                "speedup": 1 / median_ratio(times),
            }
        )
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| what | dtype | batch | dense ms | 2:4 / sparsifier ms | dense / that |")
    print("|---|---|--:|--:|--:|--:|")
    for r in rows:
        print(
            f"| {r['what']} | {r.get('dtype', 'float32')} | {r['batch']} | {r['dense_ms']:.3f} | "
            f"{r['sparse_ms']:.3f} | {r['speedup']:.2f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
