"""Data-parallel gradient exchange: granet's compact DDP hook against the dense all-reduce.

``WORLD`` gloo processes on this machine's CPU train copies of one model side by side, one step
each in turn (interleaved, so a slower stretch of a shared machine hits every variant alike), each
under its own ``DistributedDataParallel`` and a ``granet.Static`` sparsifier at fixed masks (no
topology round: every step is an ordinary step):

- ``ddp``: DDP's own all-reduce (``communication="dense"``, no hook; its bytes are not counted,
  since DDP sends them from C++: they are those of ``dense-hook``);
- ``dense-hook``: a Python hook that all-reduces every bucket whole (what DDP's default hook does);
- ``compact``: ``communication="compact"``, granet's hook, every bucket packed;
- ``auto``: ``communication="auto"``, packed where at most a fifth of a bucket is exchanged.

Bytes are counted exactly: ``torch.distributed.all_reduce`` is wrapped and every tensor it is
given is counted (numel x element size) for each step. Step time: wall clock of forward,
backward (with the exchange) and optimizer step, from a barrier, on rank 0, and the CPU time of
rank 0's process over the same stretch (all its threads, gloo's included; other jobs on the same
cores do not inflate it, waiting for the other ranks does not count); medians over the steps.
SGD with momentum 0.9, one torch thread a process, each process its share of the global batch.

    python benchmarks/ddp_comm.py --world 2 4 --models mlp --steps 10
    python benchmarks/ddp_comm.py --world 2 4 --models mlp --steps 10 --compute sparse
    python benchmarks/ddp_comm.py --world 2 4 --models resnet --steps 10 --batch 32
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


def build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """The model and its input shape: the 784-1000-1000-1000-10 MLP, or a ResNet with one
    BasicBlock per stage (64-128-256-512 planes, 4.9M weights) on 3 x 8 x 8 images."""
    if name == "mlp":
        return mlp(784, 10), (784,)
    return ResNet(BasicBlock, (1, 1, 1, 1), 10, 3), (3, 8, 8)


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


def variant(name: str, model_name: str, sparsity: float, compute: str) -> dict:
    torch.manual_seed(0)
    net, shape = build(model_name)
    comm = {"ddp": "dense", "dense-hook": "dense"}.get(name, name)
    model = DDP(net)
    if name == "dense-hook":
        model.register_comm_hook(dist.group.WORLD, dense_hook)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    sp = granet.Static(
        model, opt, sparsity=sparsity, total_steps=10**6, communication=comm, compute=compute
    )
    active = sum(int(m.sum()) for m in sp.masks.values())
    dense = sum(p.numel() for n, p in net.named_parameters() if n not in sp.masks)
    return {"model": model, "opt": opt, "sp": sp, "shape": shape, "active": active, "dense": dense}


def step(v: dict, world: int, i: int, counter: Counter) -> tuple[float, float, int]:
    g = torch.Generator().manual_seed(i)
    x = torch.randn(v["batch"] // world, *v["shape"], generator=g)
    y = torch.randint(0, 10, (v["batch"] // world,), generator=g)
    dist.barrier()
    counter.bytes = 0
    start, cpu = time.perf_counter(), time.process_time()
    v["opt"].zero_grad()
    nn.functional.cross_entropy(v["model"](x), y).backward()
    v["opt"].step()
    return time.perf_counter() - start, time.process_time() - cpu, counter.bytes


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    counter = Counter()
    dist.all_reduce = counter
    rows = []
    for model_name in args.models:
        for sparsity in args.sparsities:
            runs = {name: variant(name, model_name, sparsity, args.compute) for name in VARIANTS}
            for v in runs.values():
                v["batch"] = args.batch
            times = {name: [] for name in VARIANTS}
            cpus = {name: [] for name in VARIANTS}
            sent = {name: set() for name in VARIANTS}
            for i in range(args.warmup + args.steps):
                for name, v in runs.items():
                    seconds, cpu, nbytes = step(v, world, i, counter)
                    if i >= args.warmup:
                        times[name].append(seconds)
                        cpus[name].append(cpu)
                        sent[name].add(nbytes)
            v = runs["compact"]
            element = 4
            row = {
                "model": model_name,
                "world": world,
                "sparsity": sparsity,
                "compute": args.compute,
                "batch": args.batch,
                "weights": sum(p.numel() for p in v["model"].parameters()),
                "active_plus_dense": v["active"] + v["dense"],
            }
            for name in VARIANTS:
                row[f"{name}_ms"] = 1000 * statistics.median(times[name])
                row[f"{name}_cpu_ms"] = 1000 * statistics.median(cpus[name])
                row[f"{name}_bytes"] = sorted(sent[name])
            row["bound_bytes"] = row["active_plus_dense"] * element
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
            del runs
    if rank == 0:
        (out / f"ddp_comm-world{world}-{args.compute}.json").write_text(json.dumps(rows, indent=1))
        print(table(rows), flush=True)
    dist.destroy_process_group()


def table(rows: list[dict]) -> str:
    """The rows as the markdown table of docs/benchmarks.md."""
    lines = [
        "| model | procs | sparsity | compute | MB sent: dense / compact | compact / bound "
        "| ms wall: ddp / dense-hook / compact / auto | ms CPU: same | dense-hook / compact "
        "| ddp / auto |",
        "|---|--:|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        wall = " / ".join(f"{r[f'{v}_ms']:.0f}" for v in VARIANTS)
        cpu = " / ".join(f"{r[f'{v}_cpu_ms']:.0f}" for v in VARIANTS)
        dense, compact = max(r["dense-hook_bytes"]), max(r["compact_bytes"])
        lines.append(
            f"| {r['model']} | {r['world']} | {r['sparsity']:.0%} | {r['compute']} "
            f"| {dense / 1e6:.2f} / {compact / 1e6:.3f} | {compact / r['bound_bytes']:.3f} "
            f"| {wall} | {cpu} | {r['dense-hook_ms'] / r['compact_ms']:.2f}x "
            f"| {r['ddp_ms'] / r['auto_ms']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--models", nargs="+", default=["mlp", "resnet"])
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--compute", default="dense", choices=["dense", "sparse"])
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
