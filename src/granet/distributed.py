"""Data-parallel training: masks that agree on every rank, and the wrappers we refuse.

Under DistributedDataParallel every rank must hold the same masks after every topology update,
or the ranks silently train different networks. The sparsifier makes agreement the expected
outcome without relying on the ranks' global RNG: initial masks and random growth come from its
own generators, seeded with ``seed`` on every rank, and gradient or momentum growth reads the
gradients in an optimizer-step hook, after DDP's all-reduce. :func:`verify_agreement` checks the
outcome with one small all-reduce, so a divergence stops the run at the round that caused it.

FSDP2 (``fully_shard``) gives each rank only some rows of every weight; the sparsifier then keeps
the masks of those rows and runs its rounds across the shards (:mod:`granet.shards`), and only
ranks holding the same shard (HSDP replicas) are checked for agreement. FSDP1's flat parameters
and DeepSpeed's partitions hide the weights' shapes, so those wrappers are refused.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

_MIX = 0x45D9F3B  # a well-known 32-bit integer-hash multiplier
_LOW32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A non-linear 32-bit hash of int64 values (xor-shift-multiply, twice). Products stay below
    2**59 and results below 2**32, so sums over up to 2**31 positions fit in int64."""
    x = x & _LOW32
    x = ((x >> 16) ^ x) * _MIX & _LOW32
    x = ((x >> 16) ^ x) * _MIX & _LOW32
    return (x >> 16) ^ x


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def mask_checksums(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-mask ``(count, sum of active positions, sum of hashed active positions)``, int64 [L, 3].

    Integer sums are exact whatever the reduction order, so equal masks give equal checksums on
    any device. The hash is non-linear: it catches moves that keep the plain position sum
    (i -> i-1, j -> j+1) and its low powers.
    """
    device = masks[0].device
    rows = []
    for mask in masks:
        positions = mask.reshape(-1).nonzero().squeeze(1)
        rows.append(torch.stack([mask.sum(), positions.sum(), _mix32(positions).sum()]).to(device))
    return torch.stack(rows)


def verify_agreement(
    names: Sequence[str],
    masks: Sequence[torch.Tensor],
    group: torch.distributed.ProcessGroup | None = None,
) -> None:
    """Raise RuntimeError on every rank, naming the first mask that differs between ranks.

    A no-op unless torch.distributed is initialized and ``group`` (default: the world) has more
    than one rank. One all-reduce of ``6 * len(masks)`` integers: the maximum of the checksums
    and of their negations gives each checksum's maximum and minimum over the ranks.
    """
    if not _distributed() or torch.distributed.get_world_size(group) < 2:
        return
    sums = mask_checksums(masks)
    both = torch.cat([sums, -sums])
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX, group=group)
    high, low = both[: len(masks)], -both[len(masks) :]
    differs = (high != low).any(dim=1).tolist()
    for name, bad, lo, hi in zip(names, differs, low.tolist(), high.tolist()):
        if bad:
            raise RuntimeError(
                f"granet: the mask of {name!r} differs between ranks "
                f"(active count ranges over {lo[0]}..{hi[0]}, position sums over "
                f"{lo[1]}..{hi[1]}); the ranks would train different networks. Every rank must "
                "build the sparsifier with the same seed and arguments, load the same checkpoint "
                "and call optimizer.step() the same number of times."
            )


def verify_shared(
    values: dict[str, Any], group: torch.distributed.ProcessGroup, device: torch.device
) -> None:
    """Raise RuntimeError on every rank of ``group`` if the ranks' ``values`` (name -> int, str
    or tensor) differ, naming the first that does: ranks that hold other shards of the same
    tensors must still be at the same step with the same settings and random state. One
    all-reduce of two integers per value."""
    if not _distributed() or torch.distributed.get_world_size(group) < 2:
        return
    digests = []
    for value in values.values():
        data = value.cpu().numpy().tobytes() if torch.is_tensor(value) else repr(value).encode()
        if isinstance(value, list):
            data = b"".join(v.cpu().numpy().tobytes() for v in value)
        digests.append(int.from_bytes(hashlib.sha256(data).digest()[:7], "little"))
    mine = torch.tensor(digests, dtype=torch.int64, device=device)  # where the group reduces
    both = torch.cat([mine, -mine])
    torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX, group=group)
    high, low = both[: len(mine)], -both[len(mine) :]
    for name, differs in zip(values, (high != low).tolist()):
        if differs:
            raise RuntimeError(
                f"granet: ranks holding other shards of the same weights disagree on the "
                f"sparsifier's {name}; every rank must build the sparsifier with the same seed "
                "and arguments, load the same checkpoint and call optimizer.step() the same "
                "number of times"
            )


def data_parallel_group(model: nn.Module) -> torch.distributed.ProcessGroup | None:
    """The process group of a DistributedDataParallel wrapper; None (the world) otherwise."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.process_group
    return None


def _from_deepspeed(obj: object) -> bool:
    # Engines and ZeRO optimizers live in deepspeed.runtime; deepspeed.ops optimizers such as
    # FusedAdam are ordinary torch optimizers and work like any other.
    return any(cls.__module__.startswith("deepspeed.runtime") for cls in type(obj).__mro__)


# FSDP1 by (module, class); its import costs over a second, so only an imported one is looked for
_FSDP1 = (("torch.distributed.fsdp", "FullyShardedDataParallel"),)
_USE = (
    "use torch DistributedDataParallel, or FSDP2: torch.distributed.fsdp.fully_shard on the "
    "model's blocks and the model, then the optimizer, then the sparsifier (see "
    "docs/distributed.md)"
)


def _loaded(names: tuple[tuple[str, str], ...]) -> tuple[type, ...]:
    """The classes among ``names`` whose modules are already imported: a model cannot hold an
    instance of a class never imported."""
    found = (getattr(sys.modules.get(module), attr, None) for module, attr in names)
    return tuple(t for t in found if isinstance(t, type))


def refuse_sharded(model: nn.Module, optimizer: object) -> None:
    """Raise ValueError if weights or optimizer state are sharded in a way granet cannot read:
    FSDP1 (``FullyShardedDataParallel``) or DeepSpeed. FSDP2 (``fully_shard``) is supported."""
    if _from_deepspeed(model) or _from_deepspeed(optimizer):
        raise ValueError(
            "granet does not support DeepSpeed engines or ZeRO optimizers (they shard weights "
            f"and optimizer state across ranks); {_USE}"
        )
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        raise ValueError(
            f"granet does not support parameters partitioned by DeepSpeed ZeRO-3; {_USE}"
        )
    fsdp1 = _loaded(_FSDP1)
    wrapped = [n or "the model itself" for n, m in model.named_modules() if isinstance(m, fsdp1)]
    if wrapped:
        raise ValueError(
            f"granet does not support FSDP1 (FullyShardedDataParallel, at {wrapped[0]!r}); {_USE}"
        )
