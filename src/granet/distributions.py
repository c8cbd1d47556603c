"""Layer-wise density distributions: from the sparse layers and a global density, one density each.

Every function has the signature ``f(weights, density) -> list[float]`` and keeps the total number
of non-zeros at ``density * sum(numel)`` (up to rounding), with no layer above density 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from granet.masks import top_mask

Distribution = Callable[[Sequence[torch.Tensor], float], list[float]]


def uniform(weights: Sequence[torch.Tensor], density: float) -> list[float]:
    """The same density in every layer."""
    return [density] * len(weights)


def _scaled(raw: Sequence[float], sizes: Sequence[int], density: float) -> list[float]:
    """Densities ``eps * raw[l]`` with ``eps`` solved for the total budget; layers that would
    exceed density 1 are made dense and ``eps`` re-solved over the rest."""
    budget = density * sum(sizes)
    dense: set[int] = set()
    while True:
        rest = [i for i in range(len(sizes)) if i not in dense]
        left = budget - sum(sizes[i] for i in dense)
        weight = sum(raw[i] * sizes[i] for i in rest)
        eps = left / weight if weight > 0 else 0.0
        over = {i for i in rest if eps * raw[i] > 1.0}
        if not over:
            return [1.0 if i in dense else eps * raw[i] for i in range(len(sizes))]
        dense |= over


def erk(weights: Sequence[torch.Tensor], density: float) -> list[float]:
    """Erdős–Rényi–Kernel: density proportional to ``sum(shape) / prod(shape)``.

    Each tensor is one layer as stored: a Hugging Face ``Conv1D`` weight, kept (in, out), gets
    the density of the ``nn.Linear`` weight (out, in) of the same map; an attention's packed
    ``in_proj_weight`` (3E, E), like GPT-2's ``c_attn``, is one E -> 3E map (query, key and
    value kept as three (E, E) weights get more: ``2/E`` against ``4/(3E)`` before scaling).
    """
    shapes = [w.shape for w in weights]
    raw = [sum(s) / math.prod(s) for s in shapes]
    return _scaled(raw, [math.prod(s) for s in shapes], density)


def er(weights: Sequence[torch.Tensor], density: float) -> list[float]:
    """Erdős–Rényi: like ERK but on the (out, in) dimensions only, ignoring the kernel."""
    shapes = [w.shape for w in weights]
    raw = [(s[0] + s[1]) / (s[0] * s[1]) if len(s) > 1 else 1.0 for s in shapes]
    return _scaled(raw, [math.prod(s) for s in shapes], density)


def global_magnitude(weights: Sequence[torch.Tensor], density: float) -> list[float]:
    """The densities a single magnitude threshold across all layers would leave."""
    sizes = [w.numel() for w in weights]
    scores = torch.cat([w.detach().abs().reshape(-1).float().cpu() for w in weights])
    selected = top_mask(scores, min(round(density * sum(sizes)), len(scores)))
    return [int(c.sum()) / n for c, n in zip(selected.split(sizes), sizes)]


DISTRIBUTIONS: dict[str, Distribution] = {
    "uniform": uniform,
    "er": er,
    "erk": erk,
    "global": global_magnitude,
}
