"""Data-parallel runs under ``torchrun``: the process group, each process's share of the data,
sums across processes, and which process writes.

``torchrun --nproc_per_node N -m granet train ...`` starts N copies of ``granet train`` with
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` set. Every process builds the same run; each trains
on its share of every global batch (``batch_size`` is the global batch, so a run's optimizer
steps and schedules do not depend on N), DDP averages the gradients (or FSDP2 shards the model,
``parallel: fsdp``), and process 0 alone writes the run folder. Without torchrun (or with N = 1)
nothing here does anything.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ``world`` processes of a run."""

    rank: int = 0
    world: int = 1
    local: int = 0  # rank among the processes of this machine: its GPU

    @property
    def main(self) -> bool:
        """The process that logs and writes the run folder."""
        return self.rank == 0


SINGLE = Ranks()


def current() -> Ranks:
    """The ranks of this process: from the process group when one is running, else single."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def _launched() -> Ranks:
    env = os.environ
    return Ranks(
        int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    )


def _uses_cuda(device: str) -> bool:
    """Whether the ``--device`` setting means a GPU here (a bad one is refused later, clearly)."""
    return (device == "auto" or device.startswith("cuda")) and torch.cuda.is_available()


@contextmanager
def process_group(device: str) -> Iterator[Ranks]:
    """Join the run's process group when started by torchrun with several processes (NCCL for
    GPUs, each process on ``cuda:LOCAL_RANK``; gloo for the CPU), and leave it afterwards.

    Leaving is ordered: after a block that ended normally, every process waits for the others
    (process 0 may still be writing the report); then whatever still holds the group (a DDP
    wrapper or a sparsifier in a reference cycle) is collected while the interpreter is whole,
    and only then is the group destroyed. Left to the interpreter's exit, the group's threads
    outlive it and the process aborts ("terminate called without an active exception").
    """
    launched = _launched()
    if launched.world == 1 or dist.is_initialized():
        yield current()
        return
    cuda = _uses_cuda(device)
    if cuda:
        torch.cuda.set_device(launched.local)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield current()
        dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()


def shard(batches: Sequence[Sequence[int]], ranks: Ranks) -> list[list[int]]:
    """This process's share of each global batch: every ``world``-th example from its rank on,
    so shares differ in size by at most one."""
    return [list(b[ranks.rank :: ranks.world]) for b in batches]


def sum_across(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """``values`` summed over all processes (in place; returned for convenience)."""
    if ranks.world > 1:
        dist.all_reduce(values)
    return values


def max_across(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The element-wise maximum of ``values`` over all processes (in place): a flag set on any
    one process is set on all, for decisions all must share."""
    if ranks.world > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def broadcast(value: T, ranks: Ranks) -> T:
    """Process 0's ``value`` (any picklable object), on every process."""
    if ranks.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(action: Callable[[], T], ranks: Ranks) -> T:
    """``action()`` on process 0 only; what it returned, or the error it raised, on every
    process (so that all fail together rather than wait for a process that is gone)."""
    outcome: tuple[T | None, Exception | None] = (None, None)
    if ranks.main:
        try:
            outcome = (action(), None)
        except Exception as error:
            outcome = (None, error)
    result, error = broadcast(outcome, ranks)
    if error is not None:
        raise error
    return result


def staged(load: Callable[[], T], ranks: Ranks) -> T:
    """``load()`` on process 0 first, then on the first process of each other machine, then on
    the rest: a download into a cache, shared by the machines or not, happens once, never twice
    at the same time."""
    if ranks.world == 1:
        return load()
    result: T | None = None
    for turn in (ranks.rank == 0, ranks.local == 0 and ranks.rank != 0, ranks.local != 0):
        if turn:
            result = load()
        dist.barrier()
    return result


def wrap(model: nn.Module, how: str, ranks: Ranks, device: torch.device) -> nn.Module:
    """What the training forward pass runs: ``model`` itself for one process; under torchrun a
    DDP wrapper (``how="ddp"``), or ``model`` with each top-level block that holds parameters
    and then the whole sharded in place by FSDP2's ``fully_shard`` (``how="fsdp"``)."""
    if ranks.world == 1:
        return model
    if how == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (ranks.world,))
    for block in model.children():
        if any(True for _ in block.parameters()):
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
