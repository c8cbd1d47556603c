"""Initial masks: where the active weights are when sparse training starts.

Each function takes the sparse tensors, their active counts (from the layer-wise distribution)
and the sparsifier's CPU generator, and returns one bool mask per tensor on its device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from granet.masks import random_mask, top_mask

Init = Callable[[Sequence[torch.Tensor], Sequence[int], torch.Generator], list[torch.Tensor]]


def random_init(
    params: Sequence[torch.Tensor], counts: Sequence[int], generator: torch.Generator
) -> list[torch.Tensor]:
    """Uniformly random positions at each layer's count (the papers' ERK draw)."""
    return [random_mask(p.shape, n, generator).to(p.device) for p, n in zip(params, counts)]


def magnitude_init(
    params: Sequence[torch.Tensor], counts: Sequence[int], generator: torch.Generator
) -> list[torch.Tensor]:
    """The largest-magnitude weights of each layer: a trained model keeps what matters most."""
    return [top_mask(p.detach().abs().float(), n).view(p.shape) for p, n in zip(params, counts)]


def existing_init(
    params: Sequence[torch.Tensor], counts: Sequence[int], generator: torch.Generator
) -> list[torch.Tensor]:
    """The weights' own non-zeros: an already-pruned checkpoint keeps its exact pattern."""
    return [p.detach() != 0 for p in params]


INIT: dict[str, Init] = {
    "random": random_init,
    "magnitude": magnitude_init,
    "existing": existing_init,
}
