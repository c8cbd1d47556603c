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
    """A flat bool mask selecting the ``k`` largest entries of ``scores`` (exact count).

    ``k`` may be a 0-d tensor that only the device knows (a per-layer count after global
    pruning): the entries are then ranked by a stable sort, so the host never waits to read it.
    """
    flat = scores.reshape(-1)
    if torch.is_tensor(k):
        order = torch.argsort(flat, descending=True, stable=True)
        by_rank = torch.arange(flat.numel(), device=flat.device) < k
        return torch.empty_like(by_rank).scatter_(0, order, by_rank)
    n = flat.numel()
    if flat.device.type == "cpu" and n > CPU_TOPK_LIMIT and 0 < k < n:
        # CPU topk grows faster than linearly beyond about 2^24 entries; a k-th value select
        # stays linear. Ties at the threshold are filled in index order.
        threshold = torch.kthvalue(flat, n - k + 1).values
        mask = flat > threshold
        mask[(flat == threshold).nonzero().view(-1)[: k - int(mask.count_nonzero())]] = True
        return mask
    mask = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask


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
