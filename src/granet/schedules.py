"""Schedules as pure functions of the optimizer step: when to update, how sparse, how much
to regrow.

Being pure, they need no state of their own: a resumed run recomputes them from the step count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_REGROW_FRACTION = 0.005  # where the cosine decay of the regrowth fraction ends


@dataclass(frozen=True)
class UpdateCadence:
    """Topology updates at every ``every``-th optimizer step strictly inside ``(0, total)``."""

    every: int
    total: int

    def is_update(self, step: int) -> bool:
        return 0 < step < self.total and step % self.every == 0

    def next_update(self, step: int) -> int | None:
        """The first update step after ``step``, or None when there is none left."""
        nxt = (step // self.every + 1) * self.every
        return nxt if nxt < self.total else None

    def last_update(self) -> int | None:
        """The last update step of the run, or None when the run has none."""
        last = (self.total - 1) // self.every * self.every
        return last if last > 0 else None


@dataclass(frozen=True)
class CubicSparsity:
    """Zhu & Gupta's gradual schedule, evaluated on whole update rounds ``k = step // every``:
    ``s = final + (init - final) * (1 - (k - k0) / (k_end - k0)) ** 3`` for ``k0 < k <= k_end``,
    ``init`` before and ``final`` after. The last round reaches ``final`` exactly; a window shorter
    than one round jumps to ``final`` at the first round after ``start``.
    """

    init: float
    final: float
    start: int
    end: int
    every: int

    def _rounds(self, step: int) -> tuple[int, int, int]:
        return step // self.every, self.start // self.every, self.end // self.every

    def __call__(self, step: int) -> float:
        k, k0, k_end = self._rounds(step)
        if k <= k0:
            return self.init
        if k >= k_end:
            return self.final
        return self.final + (self.init - self.final) * (1.0 - (k - k0) / (k_end - k0)) ** 3

    def prunes_at(self, step: int) -> bool:
        """Whether the update round at ``step`` belongs to the gradual phase."""
        k, k0, k_end = self._rounds(step)
        return self.init < self.final and k0 < k <= max(k_end, k0 + 1)


@dataclass(frozen=True)
class CosineDecay:
    """``end + (start - end) * (1 + cos(pi * step / total)) / 2``; ``end`` after ``total``."""

    start: float
    end: float
    total: int

    def __call__(self, step: int) -> float:
        t = min(step, self.total) / self.total
        return self.end + (self.start - self.end) * (1.0 + math.cos(math.pi * t)) / 2.0
