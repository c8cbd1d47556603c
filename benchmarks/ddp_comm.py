"""Data-parallel gradient exchange: granet's compact DDP hook against the dense all-reduce.

``WORLD`` gloo processes on this machine's CPU train copies of one model side by side, one step
each in turn (interleaved, so a slower stretch of a shared machine hits every variant alike), each
under its own ``DistributedDataParallel`` and a ``granet.Static`` sparsifier at fixed masks (no
topology round: every step is an ordinary step):

- ``ddp``: DDP's own all-reduce (``communication="dense"``, no hook; its bytes are not counted,
  since DDP sends them from C++: they are those of ``dense-hook``);
- ``dense-hook``: a Python hook that all-reduces every bucket whole (what DDP's default hook does);
- ``compact``: ``communication="compact"``, granet's hook, every bucket packed;
- ``auto``: ``communication="auto"``, packed where at most half a bucket is exchanged.

Bytes are counted exactly: ``torch.distributed.all_reduce`` is wrapped and every tensor it is
given is counted (numel x element size) for each step. Step time: wall clock of forward,
backward (with the exchange) and optimizer step, from a barrier, on rank 0; the median over the
steps. SGD with momentum 0.9, global batch 128 (each process its share), one torch thread a
process.

    python benchmarks/ddp_comm.py --world 2 --models mlp resnet --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import granet
from granet.experiment.models import BasicBlock, ResNet, mlp

VARIANTS = ("ddp", "dense-hook", "compact", "auto")
SPARSITIES = (0.0, 0.9, 0.95, 0.98)
GLOBAL_BATCH = 128


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The model and its input shape: the 784-1000-1000-1000-10 MLP, or a ResNet with one
    BasicBlock per stage (64-128-256-512 planes, 4.9M weights) on 3 x 16 x 16 images."""
    if name == "mlp":
        return mlp(784, 10), (784,)
    return ResNet(BasicBlock, (1, 1, 1, 1), 10, 3), (3, 16, 16)


def dense_hook(group, bucket):  # noqa: ANN001, ANN201 - DDP refuses string annotations here
    buffer = bucket.buffer().div_(dist.get_world_size(group))
    work = dist.all_reduce(buffer, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class Counter:
    def __init__(self) -> None:
        self.bytes = 0
        self.original = dist.all_reduce

    def __call__(self, tensor: torch.Tensor, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        self.bytes += tensor.numel() * tensor.element_size()
        return self.original(tensor, *args, **kwargs)


def variant(name: str, model_name: str, sparsity: float, steps: int) -> dict:
    torch.manual_seed(0)
    net, shape = build(model_name)
    comm = {"ddp": "dense", "dense-hook": "dense"}.get(name, name)
    model = DDP(net)
    if name == "dense-hook":
        model.register_comm_hook(dist.group.WORLD, dense_hook)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    sp = granet.Static(
        model, opt, sparsity=sparsity, total_steps=10**6, communication=comm, verify_ranks=False
    )
    active = sum(int(m.sum()) for m in sp.masks.values())
    dense = sum(p.numel() for n, p in net.named_parameters() if n not in sp.masks)
    return {"model": model, "opt": opt, "sp": sp, "shape": shape, "active": active, "dense": dense}


def step(v: dict, world: int, i: int, counter: Counter) -> tuple[float, int]:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(GLOBAL_BATCH // world, *v["shape"], generator=g)
    y = torch.randint(0, 10, (GLOBAL_BATCH // world,), generator=g)
    dist.barrier()
    counter.bytes = 0
    start = time.perf_counter()
    v["opt"].zero_grad()
    nn.functional.cross_entropy(v["model"](x), y).backward()
    v["opt"].step()
    return time.perf_counter() - start, counter.bytes


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    counter = Counter()
    dist.all_reduce = counter
    rows = []
    for model_name in args.models:
        for sparsity in args.sparsities:
            runs = {name: variant(name, model_name, sparsity, args.steps) for name in VARIANTS}
            times = {name: [] for name in VARIANTS}
            sent = {name: set() for name in VARIANTS}
            for i in range(args.warmup + args.steps):
                for name, v in runs.items():
                    seconds, nbytes = step(v, world, i, counter)
                    if i >= args.warmup:
                        times[name].append(seconds)
                        sent[name].add(nbytes)
            v = runs["compact"]
            element = 4
            row = {
                "model": model_name,
                "world": world,
                "sparsity": sparsity,
                "weights": sum(p.numel() for p in v["model"].parameters()),
                "active_plus_dense": v["active"] + v["dense"],
            }
            for name in VARIANTS:
                row[f"{name}_ms"] = 1000 * statistics.median(times[name])
                row[f"{name}_bytes"] = sorted(sent[name])
            row["bound_bytes"] = row["active_plus_dense"] * element
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
            del runs
    if rank == 0:
        (out / f"ddp_comm-world{world}.json").write_text(json.dumps(rows, indent=1))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--models", nargs="+", default=["mlp", "resnet"])
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs", file=sys.stderr)
    for world in args.world:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(world, port, args, args.out), nprocs=world, join=True)


if __name__ == "__main__":
    main()
