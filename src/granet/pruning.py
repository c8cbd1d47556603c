"""Gradual pruning: keep the highest-importance active weights at a round's target sparsity.

Each function takes per-layer importance scores (``-inf`` at inactive positions), the per-layer
active counts and the target sparsity, and returns the new masks and their per-layer counts (a
device tensor when only the device knows them, so that the host never waits), or None when the
target removes no weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from granet.masks import top_mask

Pruning = Callable[
    [Sequence[torch.Tensor], Sequence[int], float],
    "tuple[list[torch.Tensor], list[int] | torch.Tensor] | None",
]


def global_pruning(
    scores: Sequence[torch.Tensor], nnz: Sequence[int], target: float
) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """One threshold across all layers: the ``round((1 - target) * N)`` best weights survive."""
    sizes = [s.numel() for s in scores]
    keep = round((1.0 - target) * sum(sizes))
    if keep >= sum(nnz):
        return None
    flat = top_mask(torch.cat([s.reshape(-1) for s in scores]), keep)
    masks = [m.view(s.shape) for m, s in zip(flat.split(sizes), scores)]
    return masks, torch.stack([m.count_nonzero() for m in masks])


def uniform_pruning(
    scores: Sequence[torch.Tensor], nnz: Sequence[int], target: float
) -> tuple[list[torch.Tensor], list[int]] | None:
    """Every layer to the target sparsity of its own size (the reference's ``GraNet_uniform``):
    a layer already sparser than the target keeps what it has."""
    counts = [min(n, s.numel() - math.floor(target * s.numel())) for s, n in zip(scores, nnz)]
    if counts == list(nnz):
        return None
    return [top_mask(s, k).view(s.shape) for s, k in zip(scores, counts)], counts


PRUNING: dict[str, Pruning] = {"global": global_pruning, "uniform": uniform_pruning}
