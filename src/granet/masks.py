"""Boolean masks on parameters: applied in place with fused ops, saved one bit per weight, and
counted: :func:`density_of` and :func:`sparsity_of` are the one way granet turns a count of
non-zeros into a fraction (the sparsifier, one-shot pruning, the sparse file, the runs)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

_SHIFTS = torch.arange(8, dtype=torch.uint8)
CPU_TOPK_LIMIT = 2**24  # entries above which top_mask selects by k-th value on CPU


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor into uint8, 8 entries per byte (logical row-major order, entry ``8j+i``
    in bit ``i`` of byte ``j``), on the mask's device."""
    flat = mask.reshape(-1)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.numpy(), bitorder="little"))
    flat = flat.view(torch.uint8)  # bool is one byte holding 0 or 1
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _SHIFTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a contiguous bool tensor of ``shape``."""
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
        raise ValueError(
            f"packed mask has {packed.numel()} bytes of {packed.dtype}, "
            f"expected {(numel + 7) // 8} uint8 bytes for shape {tuple(shape)}"
        )
    if packed.device.type == "cpu":
        bits = np.unpackbits(packed.numpy(), count=numel, bitorder="little")
        return torch.from_numpy(bits).view(torch.bool).view(tuple(shape))
    bits = (packed.view(-1, 1) >> _SHIFTS.to(packed.device)) & 1
    return bits.view(-1)[:numel].view(torch.bool).view(tuple(shape))


def _rows(shape: Sequence[int]) -> tuple[int, int]:
    return (shape[0], math.prod(shape[1:])) if len(shape) else (1, 1)


def pack_rows(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor row by row (along its first dimension) into uint8 ``[rows,
    ceil(row_size / 8)]``: a slice of rows packs to the same slice of the packed rows, so packed
    masks shard and reshard like their weights (FSDP2's ``Shard(0)``)."""
    rows, size = _rows(mask.shape)
    flat = mask.reshape(rows, size)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.numpy(), axis=1, bitorder="little"))
    flat = flat.view(torch.uint8)
    pad = (-size) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(rows, pad)], dim=1)
    return (flat.view(rows, -1, 8) << _SHIFTS.to(flat.device)).sum(dim=2, dtype=torch.uint8)


def unpack_rows(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: a contiguous bool tensor of ``shape``."""
    rows, size = _rows(shape)
    if packed.dtype != torch.uint8 or tuple(packed.shape) != (rows, (size + 7) // 8):
        raise ValueError(
            f"row-packed mask is {packed.dtype} of shape {tuple(packed.shape)}, expected uint8 "
            f"of shape ({rows}, {(size + 7) // 8}) for shape {tuple(shape)}"
        )
    if packed.device.type == "cpu":
        bits = np.unpackbits(packed.numpy(), axis=1, count=size, bitorder="little")
        return torch.from_numpy(bits).view(torch.bool).view(tuple(shape))
    bits = (packed.unsqueeze(2) >> _SHIFTS.to(packed.device)) & 1
    return bits.view(rows, -1)[:, :size].contiguous().view(torch.bool).view(tuple(shape))


def random_mask(shape: torch.Size, nnz: int, generator: torch.Generator) -> torch.Tensor:
    """A CPU bool mask with exactly ``nnz`` True entries at uniformly random positions."""
    numel = shape.numel()
    mask = torch.zeros(numel, dtype=torch.bool)
    if nnz >= numel:
        mask.fill_(True)
    elif nnz > 0:
        mask[torch.randperm(numel, generator=generator)[:nnz]] = True
    return mask.view(shape)


def top_mask(scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """A flat bool mask selecting the ``k`` largest entries of ``scores`` (exact count); ties
    at the k-th value go to the lowest indices, so the selection depends on the scores alone.

    ``k`` may be a 0-d tensor that only the device knows (a per-layer count after global
    pruning): the entries are then ranked by a stable sort, so the host never waits to read it.
    """
    flat = scores.reshape(-1)
    if torch.is_tensor(k):
        order = torch.argsort(flat, descending=True, stable=True)
        by_rank = torch.arange(flat.numel(), device=flat.device) < k
        return torch.empty_like(by_rank).scatter_(0, order, by_rank)
    n = flat.numel()
    if k <= 0 or k >= n:
        return torch.full((n,), k > 0, dtype=torch.bool, device=flat.device)
    if flat.is_floating_point():  # NaN ranks above everything, as in topk, and NaNs tie
        flat = flat.nan_to_num(math.inf, math.inf, -math.inf)
    if flat.device.type == "cpu" and n > CPU_TOPK_LIMIT:
        # CPU topk grows faster than linearly beyond about 2^24 entries; a k-th value select
        # stays linear
        threshold = torch.kthvalue(flat, n - k + 1).values
    else:
        threshold = torch.topk(flat, k, sorted=False).values.min()
    mask = flat > threshold
    ties = flat == threshold
    return mask | (ties & (ties.cumsum(0) <= k - mask.sum()))


def apply_masks(tensors: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """Zero ``tensors`` where ``masks`` is False, in one fused multi-tensor multiply."""
    if tensors:
        with torch.no_grad():
            torch._foreach_mul_(tensors, masks)


def nonzeros(tensors: Iterable[torch.Tensor]) -> tuple[int, int]:
    """How many entries of ``tensors`` are non-zero (of bool masks: active), and how many
    entries they have."""
    tensors = list(tensors)
    return sum(int(t.count_nonzero()) for t in tensors), sum(t.numel() for t in tensors)


def density_of(nonzero: int | torch.Tensor, numel: int) -> float | torch.Tensor:
    """The fraction of ``numel`` entries that are non-zero when ``nonzero`` are (1.0 for no
    entries); ``nonzero`` may be a count still on the device, which stays there."""
    return nonzero / numel if numel else 1.0


def sparsity_of(nonzero: int, numel: int) -> float:
    """The fraction of ``numel`` entries that are zero when ``nonzero`` are not (0.0 for no
    entries): sparsity is ``1 - density``."""
    return 1.0 - density_of(nonzero, numel)
