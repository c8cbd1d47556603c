"""Scores: which active weights matter least (importance), which inactive positions to regrow
(growth).

A score is any callable ``fn(weight, grad, **context) -> Tensor`` shaped like the weight, or
``None`` when it has no signal yet (the round then prunes but does not regrow). ``context`` holds
``name`` (the parameter's name), ``index`` (its position among the sparse tensors), ``mask`` (its
bool mask, True = active), ``state`` (its optimizer state), ``generator`` (the sparsifier's own,
for reproducible randomness) and ``step`` (optimizer steps so far). Importance: the lowest-scored
active weights are pruned and dropped. Growth: the highest-scored inactive positions regrow.

A score may also keep state: if it has ``observe(params)``, it is called after every optimizer
step that really happened; ``state_dict()`` / ``load_state_dict()`` are saved with the sparsifier.
The built-in scores below use exactly this interface; the registries map a name to a factory
``factory(optimizer) -> score``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from granet.shards import distribute_like

Score = Callable[..., "torch.Tensor | None"]


def magnitude(weight: torch.Tensor, grad: torch.Tensor | None, **context: Any) -> torch.Tensor:
    """Importance |w|: the smallest-magnitude active weights go first."""
    return weight.detach().abs()


def gradient(
    weight: torch.Tensor, grad: torch.Tensor | None, **context: Any
) -> torch.Tensor | None:
    """RigL's growth: |dense gradient| (None before the first backward pass)."""
    return None if grad is None else grad.detach().abs()


def random(
    weight: torch.Tensor, grad: torch.Tensor | None, *, generator: torch.Generator, **context: Any
) -> torch.Tensor:
    """SET's growth: uniformly random scores from the sparsifier's generator."""
    return torch.rand(weight.shape, generator=generator, device=weight.device)


class Momentum:
    """SNFS's growth: |exponential moving average of the dense gradient|.

    The optimizer's own momentum is zero at inactive positions (masks hold the optimizer state
    too), so this score keeps its own average of the gradients, updated after every step. Its
    buffers exist from :meth:`start` on (zeros, shaped and placed like the weights), so that a
    state template taken before the first step (``torch.distributed.checkpoint``) has them.
    """

    def __init__(self, beta: float = 0.9) -> None:
        self.beta = beta
        self.buffers: list[torch.Tensor] | None = None
        self.seen = False  # whether a gradient has been averaged in

    def start(self, params: Sequence[torch.Tensor]) -> None:
        if self.buffers is None:
            self.buffers = [torch.zeros_like(p) for p in params]

    def observe(self, params: Sequence[torch.Tensor]) -> None:
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            return
        if self.buffers is None or any(b.dtype != g.dtype for b, g in zip(self.buffers, grads)):
            # not started, or the model changed precision mid-run (``model.half()``)
            old = self.buffers or [None] * len(grads)
            self.buffers = [
                torch.zeros_like(g) if b is None else b.to(g.dtype) for b, g in zip(old, grads)
            ]
        torch._foreach_lerp_(self.buffers, grads, 1.0 - self.beta)
        self.seen = True

    def __call__(
        self, weight: torch.Tensor, grad: torch.Tensor | None, *, index: int, **context: Any
    ) -> torch.Tensor | None:
        return self.buffers[index].abs() if self.seen else None

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta, "buffers": self.buffers, "seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = state["beta"]
        buffers, mine = state["buffers"], self.buffers
        if buffers is not None and mine is not None:  # whole ones are sharded as ours are
            buffers = [distribute_like(b, m) for b, m in zip(buffers, mine)]
        self.buffers = buffers
        self.seen = state.get("seen", self.buffers is not None)  # states before "seen"


def optimizer_momentum(optimizer: torch.optim.Optimizer, default: float = 0.9) -> float:
    """The momentum coefficient an optimizer uses (SGD ``momentum``, Adam ``betas[0]``)."""
    group = optimizer.param_groups[0]
    beta = group.get("momentum") or (group.get("betas") or (None,))[0]
    return float(beta) if beta else default


IMPORTANCE: dict[str, Callable[[torch.optim.Optimizer], Score]] = {
    "magnitude": lambda optimizer: magnitude,
}
GROWTH: dict[str, Callable[[torch.optim.Optimizer], Score]] = {
    "gradient": lambda optimizer: gradient,
    "momentum": lambda optimizer: Momentum(optimizer_momentum(optimizer)),
    "random": lambda optimizer: random,
}
