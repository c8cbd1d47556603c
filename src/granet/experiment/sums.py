"""The running sums of a training epoch, kept on the run's device so that a step never waits for
it: the loss, the correct predictions, the examples seen, each sparse layer's density summed over
the steps, and the seconds trained; summed across processes for the epoch's record and for a
checkpoint."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from granet.experiment import parallel
from granet.masks import density_of
from granet.shards import is_dtensor
from granet.sparsifier import Sparsifier


class EpochSums:
    """The sums of the epoch in progress (``values``: ``loss``, ``correct``, ``seen``,
    ``density`` per layer of ``names``, ``seconds``), this process's share of them."""

    def __init__(self, names: Sequence[str], device: torch.device, ranks: parallel.Ranks) -> None:
        self.names, self.device, self.ranks = list(names), device, ranks
        self.reset()

    def reset(self) -> None:
        """Start a new epoch at zero."""
        self._density_cache: tuple[list[tuple[int, int]], torch.Tensor] | None = None
        zeros = torch.zeros((), dtype=torch.float64, device=self.device)
        self.values: dict[str, Any] = {
            "loss": zeros.clone(),
            "correct": zeros.clone(),
            "seen": 0,
            "density": torch.zeros(len(self.names), dtype=torch.float64, device=self.device),
            "seconds": 0.0,
        }

    def add(
        self,
        loss: torch.Tensor,
        out: torch.Tensor,
        y: torch.Tensor,
        sparsifier: Sparsifier | None,
    ) -> None:
        """Count one step: ``loss`` summed over its examples, the outputs ``out`` for the labels
        ``y``, the layers' densities as ``sparsifier`` holds them after the step."""
        v = self.values
        v["loss"] += loss.detach()
        v["correct"] += (out.detach().argmax(1) == y).sum()
        v["seen"] += len(y)
        v["density"] += self._densities(sparsifier)

    def _densities(self, sparsifier: Sparsifier | None) -> torch.Tensor | float:
        """The layers' densities now, counted again only when a mask has changed (a sum over
        every mask entry each step would cost a quarter of a 98%-sparse sparse-compute step)."""
        if sparsifier is None:
            return 1.0
        if is_dtensor(sparsifier.params[0]):  # FSDP2: the counts over all shards, as kept
            counts = torch.tensor(sparsifier.counts(), device=self.device)
            numels = torch.tensor([p.numel() for p in sparsifier.params], device=self.device)
            return counts / numels
        masks = list(sparsifier.masks.values())
        key = [(id(m), m._version) for m in masks]
        if self._density_cache is None or self._density_cache[0] != key:
            densities = torch.stack([density_of(m.sum(), m.numel()) for m in masks])
            self._density_cache = (key, densities)
        return self._density_cache[1]

    def across(self) -> dict[str, Any]:
        """The sums over all processes (the densities are the same on all). Every process must
        call this at the same point."""
        s = self.values
        if self.ranks.world == 1:
            return s
        seen = torch.tensor(float(s["seen"]), dtype=torch.float64, device=self.device)
        totals = parallel.sum_across(torch.stack([s["loss"], s["correct"], seen]), self.ranks)
        return {**s, "loss": totals[0], "correct": totals[1], "seen": int(totals[2].item())}

    def load(self, saved: Mapping[str, Any]) -> None:
        """Go on from ``saved`` (what :meth:`across` returned, laid out as :attr:`values`):
        process 0 takes them, the others start at zero, so that they are counted once."""
        self.reset()
        if self.ranks.main:
            self.values = {
                k: v.to(self.device) if torch.is_tensor(v) else v for k, v in saved.items()
            }
