"""How many mask positions flip between a float32 run on one process and the same run sharded
by FSDP2 over N gloo processes (docs/benchmarks.md, FSDP2 section).

The rounds select exactly across shards (tests/lib/test_fsdp.py: in float64 the masks are
bit-equal), but in float32 the N processes sum their gradients in another order than one process,
so weights differ by a few roundings and a weight whose score lies within that of a round's
threshold can land on the other side. This counts those positions, per method, after a run of
several rounds, with each process training on its share of the same global batches.

    PYTHONPATH=src python benchmarks/fsdp_float32.py --world 2 4 --steps 40
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import granet

METHODS = ("granet", "gmp", "rigl", "set", "snfs")
GLOBAL_BATCH = 64


def build(method: str, steps: int, mesh=None):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
    )
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in model[::2]:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    kw = dict(sparsity=0.9, total_steps=steps, update_every=4, prune_end=0.75, seed=1)
    return model, opt, granet.sparsify(model, opt, method, **kw)


def train(model, opt, steps: int, rank: int = 0, world: int = 1) -> None:
    share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        x = torch.randn(GLOBAL_BATCH, 64, generator=g)
        y = torch.randint(0, 10, (GLOBAL_BATCH,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[share]), y[share]).backward()
        opt.step()


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def worker(rank: int, world: int, steps: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=120),
    )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    result = {}
    for method in METHODS:
        model, opt, sp = build(method, steps, mesh)
        train(model, opt, steps, rank, world)
        masks = {n: whole(m) for n, m in sp.masks.items()}
        weights = {n: whole(p.detach()) for n, p in model.named_parameters()}
        result[method] = {"masks": masks, "weights": weights}
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    single = {}
    for method in METHODS:
        model, opt, sp = build(method, args.steps)
        train(model, opt, args.steps)
        single[method] = (
            {n: m.clone() for n, m in sp.masks.items()},
            {n: p.detach().clone() for n, p in model.named_parameters()},
        )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.world:
            out = f"{tmp}/world{world}.pt"
            mp.spawn(worker, args=(world, args.steps, f"{tmp}/store{world}", out), nprocs=world)
            sharded = torch.load(out, weights_only=False)
            for method in METHODS:
                masks, weights = single[method]
                run = sharded[method]
                flips = sum(int((run["masks"][n] != m).sum()) for n, m in masks.items())
                active = sum(int(m.sum()) for m in masks.values())
                gap = max((run["weights"][n] - w).abs().max().item() for n, w in weights.items())
                rows.append(
                    {
                        "world": world,
                        "method": method,
                        "flipped": flips,
                        "active": active,
                        "max_weight_gap": gap,
                    }
                )
    print("| ranks | method | positions that differ | of active | max weight gap |")
    print("|--:|---|--:|--:|--:|")
    for r in rows:
        print(
            f"| {r['world']} | {r['method']} | {r['flipped']} | {r['active']} | "
            f"{r['max_weight_gap']:.2e} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
