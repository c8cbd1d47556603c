"""Criteria: which active weights to drop, which inactive positions to regrow.

Drop scores are low-is-dropped; growth scores are high-is-grown. A growth criterion may keep state
between steps (SNFS's gradient momentum) and may have no signal yet, in which case the round is
skipped rather than regrowing blindly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def magnitude(param: torch.Tensor) -> torch.Tensor:
    """Drop score: |w|, so the smallest-magnitude active weights go first."""
    return param.detach().abs()


class Growth:
    """Scores positions for regrowth. Subclasses override :meth:`scores`."""

    def after_step(self, params: Sequence[torch.Tensor]) -> None:
        """Called after every optimizer step that really happened."""

    def missing(self, params: Sequence[torch.Tensor], names: Sequence[str]) -> str | None:
        """Why no scores can be computed now (the round is then skipped), or None."""
        return None

    def scores(self, index: int, param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


class GradientGrowth(Growth):
    """RigL: regrow where the dense gradient is largest in magnitude."""

    def missing(self, params: Sequence[torch.Tensor], names: Sequence[str]) -> str | None:
        absent = [n for p, n in zip(params, names) if p.grad is None]
        return f"no gradient for {', '.join(absent)}" if absent else None

    def scores(self, index: int, param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return param.grad.detach().abs()


class RandomGrowth(Growth):
    """SET: regrow at uniformly random inactive positions (from the sparsifier's generator)."""

    def scores(self, index: int, param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.rand(param.shape, generator=generator, device=param.device)


class MomentumGrowth(Growth):
    """SNFS: regrow where an exponential moving average of the dense gradient is largest.

    The optimizer's own momentum is zero at inactive positions (masks hold the optimizer state
    too), so this criterion keeps its own average of the gradients.
    """

    def __init__(self, beta: float = 0.9) -> None:
        self.beta = beta
        self.buffers: list[torch.Tensor] | None = None

    def after_step(self, params: Sequence[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            return
        if self.buffers is None:
            self.buffers = [torch.zeros_like(g, memory_format=torch.preserve_format) for g in grads]
        torch._foreach_lerp_(self.buffers, grads, 1.0 - self.beta)

    def missing(self, params: Sequence[torch.Tensor], names: Sequence[str]) -> str | None:
        return "no gradient momentum yet" if self.buffers is None else None

    def scores(self, index: int, param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.buffers[index].abs()

    def state_dict(self) -> dict:
        return {"beta": self.beta, "buffers": self.buffers}

    def load_state_dict(self, state: dict) -> None:
        self.beta = state["beta"]
        self.buffers = state["buffers"]


def optimizer_momentum(optimizer: torch.optim.Optimizer, default: float = 0.9) -> float:
    """The momentum coefficient an optimizer uses (SGD ``momentum``, Adam ``betas[0]``)."""
    group = optimizer.param_groups[0]
    beta = group.get("momentum") or (group.get("betas") or (None,))[0]
    return float(beta) if beta else default


GROWTH = ("gradient", "momentum", "random")


def make_growth(name: str, optimizer: torch.optim.Optimizer) -> Growth:
    """The growth criterion called ``name`` (one of :data:`GROWTH`)."""
    if name == "gradient":
        return GradientGrowth()
    if name == "momentum":
        return MomentumGrowth(optimizer_momentum(optimizer))
    if name == "random":
        return RandomGrowth()
    raise ValueError(f"growth must be one of {', '.join(GROWTH)}; got {name!r}")
