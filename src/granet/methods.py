"""The methods: each is the one sparsifier with its own defaults.

GraNet = gradual magnitude pruning (cubic schedule) + zero-cost drop-and-regrow by gradient.
GMP = GraNet without regrowth, from dense. RigL (ITOP flavour) = GraNet that starts at the final
sparsity. SET = RigL growing at random, SNFS = RigL growing by gradient momentum. Static = fixed
ERK masks, no updates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from granet.sparsifier import Sparsifier


class GraNet(Sparsifier):
    """Gradual pruning from ``init_sparsity`` (default 0.5) with neuroregeneration by gradient."""

    default_init_sparsity = 0.5


class GMP(GraNet):
    """Gradual magnitude pruning (Zhu & Gupta) from dense, no regrowth."""

    default_init_sparsity = 0.0
    default_regrow_fraction = 0.0


class RigL(Sparsifier):
    """Sparse from the start at the final sparsity; drop by magnitude, regrow by |gradient|."""


class SET(RigL):
    """RigL's rounds with random regrowth."""

    default_growth = "random"


class SNFS(RigL):
    """RigL's rounds with regrowth by gradient momentum."""

    default_growth = "momentum"


class Static(RigL):
    """Static sparse training: masks drawn once from the distribution, never updated."""

    default_regrow_fraction = 0.0


METHODS: dict[str, type[Sparsifier]] = {
    "granet": GraNet,
    "gmp": GMP,
    "rigl": RigL,
    "set": SET,
    "snfs": SNFS,
    "static": Static,
}


def sparsify(
    model: nn.Module, optimizer: torch.optim.Optimizer, method: str = "granet", **kwargs: Any
) -> Sparsifier:
    """Build the sparsifier called ``method`` (one of :data:`METHODS`)."""
    try:
        cls = METHODS[method.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}") from None
    return cls(model, optimizer, **kwargs)
