"""The methods: each is the one sparsifier with its own defaults.

GraNet = gradual magnitude pruning (cubic schedule) + zero-cost drop-and-regrow by gradient.
GMP = GraNet without regrowth, from dense. RigL (ITOP flavour) = GraNet that starts at the final
sparsity. SET = RigL growing at random, SNFS = RigL growing by gradient momentum. Static = fixed
ERK masks, no updates. A subclass states only the defaults that differ from its parent's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from granet import checks
from granet.sparsifier import Sparsifier


class GraNet(Sparsifier):
    """Gradual pruning from ``init_sparsity`` (default 0.5) with neuroregeneration by gradient."""

    defaults = {"init_sparsity": 0.5}


class GMP(GraNet):
    """Gradual magnitude pruning (Zhu & Gupta) from dense, no regrowth."""

    defaults = {"init_sparsity": 0.0, "regrow_fraction": 0.0}


class RigL(Sparsifier):
    """Sparse from the start at the final sparsity; drop by magnitude, regrow by |gradient|."""


class SET(RigL):
    """RigL's rounds with random regrowth."""

    defaults = {"growth": "random"}


class SNFS(RigL):
    """RigL's rounds with regrowth by gradient momentum."""

    defaults = {"growth": "momentum"}


class Static(RigL):
    """Static sparse training: masks drawn once from the distribution, never updated."""

    defaults = {"regrow_fraction": 0.0}


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
    key = method.lower() if isinstance(method, str) else method
    return checks.choice("method", key, METHODS)(model, optimizer, **kwargs)
