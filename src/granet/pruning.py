"""Gradual pruning: keep the highest-importance active weights at a round's target sparsity.

Each function takes per-layer importance scores (``-inf`` at inactive positions), the per-layer
active counts, the target sparsity and where the scores lie (:mod:`granet.shards`: whole tensors,
or this rank's FSDP2 shards of them), and returns the new masks and their per-layer counts over
all ranks (a device tensor when only the device knows them, so that the host never waits), or
None when the target removes no weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from granet.shards import Whole

Pruning = Callable[
    [Sequence[torch.Tensor], Sequence[int], float, Whole],
    "tuple[list[torch.Tensor], list[int] | torch.Tensor] | None",
]


def global_pruning(
    scores: Sequence[torch.Tensor], nnz: Sequence[int], target: float, space: Whole | None = None
) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """One threshold across all layers: the ``round((1 - target) * N)`` best weights survive."""
    space = space or Whole(scores)
    keep = round((1.0 - target) * sum(space.numels))
    if keep >= sum(nnz):
        return None
    masks = space.top_joint(scores, keep)
    return masks, space.total(torch.stack([m.count_nonzero() for m in masks]))


def uniform_pruning(
    scores: Sequence[torch.Tensor], nnz: Sequence[int], target: float, space: Whole | None = None
) -> tuple[list[torch.Tensor], list[int]] | None:
    """Every layer to the target sparsity of its own size (the reference's ``GraNet_uniform``):
    a layer already sparser than the target keeps what it has."""
    space = space or Whole(scores)
    counts = [min(n, size - math.floor(target * size)) for size, n in zip(space.numels, nnz)]
    if counts == list(nnz):
        return None
    return space.top(scores, counts), counts


PRUNING: dict[str, Pruning] = {"global": global_pruning, "uniform": uniform_pruning}
