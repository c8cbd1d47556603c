"""Initial masks: where the active weights are when sparse training starts.

Each function takes the sparse tensors, their active counts (from the layer-wise distribution)
and the sparsifier's CPU generator, and returns one bool mask per tensor on its device. Keyword
context: the ``model``, the tensors' ``names``, the sparsifier's ``calibration`` batches (read
only by ``wanda``) and the ``space`` where the tensors lie (:mod:`granet.shards`: under FSDP2 a
mask is this rank's part, and equals that part of the mask one process would draw).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from granet.masks import random_mask
from granet.oneshot import as_rows, output_major, row_mask, wanda_scores
from granet.shards import Whole

Init = Callable[..., list[torch.Tensor]]


def random_init(
    params: Sequence[torch.Tensor],
    counts: Sequence[int],
    generator: torch.Generator,
    *,
    space: Whole | None = None,
    **context: Any,
) -> list[torch.Tensor]:
    """Uniformly random positions at each layer's count (the papers' ERK draw). Each rank of a
    sharded model draws every layer whole, so that all draw alike, and keeps its part."""
    space = space or Whole(params)
    masks = []
    for i, (p, n) in enumerate(zip(params, counts)):
        mask = space.part(random_mask(p.shape, n, generator), i)
        # a shard's rows are copied out, so that the whole layer's draw is freed
        masks.append((mask.clone() if space.sharded else mask).to(space.local(p).device))
    return masks


def magnitude_init(
    params: Sequence[torch.Tensor],
    counts: Sequence[int],
    generator: torch.Generator,
    *,
    space: Whole | None = None,
    **context: Any,
) -> list[torch.Tensor]:
    """The largest-magnitude weights of each layer: a trained model keeps what matters most."""
    space = space or Whole(params)
    return space.top([space.local(p).detach().abs().float() for p in params], counts)


def existing_init(
    params: Sequence[torch.Tensor],
    counts: Sequence[int],
    generator: torch.Generator,
    *,
    space: Whole | None = None,
    **context: Any,
) -> list[torch.Tensor]:
    """The weights' own non-zeros: an already-pruned checkpoint keeps its exact pattern."""
    space = space or Whole(params)
    return [space.local(p).detach() != 0 for p in params]


def wanda_init(
    params: Sequence[torch.Tensor],
    counts: Sequence[int],
    generator: torch.Generator,
    *,
    model: nn.Module,
    names: Sequence[str],
    calibration: Iterable[Any] | None,
    **context: Any,
) -> list[torch.Tensor]:
    """Wanda (Sun et al. 2024): in each output row, the weights of largest ``|W_ij| *
    ||X_j||_2`` over the ``calibration`` tokens; a layer's count shared evenly among its rows
    (the first ``count % rows`` rows keep one more)."""
    masks = []
    for name, n, s in zip(names, counts, wanda_scores(model, names, calibration)):
        major = output_major(model, name)
        rows = as_rows(s, major)
        keep = torch.full((len(rows),), n // len(rows), dtype=torch.long)
        keep[: n % len(rows)] += 1
        masks.append(as_rows(row_mask(rows, keep), major).contiguous())
    return masks


def check_calibration(init: str, calibration: Any) -> None:
    """Refuse ``init="wanda"`` without calibration batches, and calibration batches that no
    other ``init`` reads."""
    if init == "wanda" and calibration is None:
        raise ValueError(
            "calibration: init='wanda' needs calibration batches (model inputs, from Python)"
        )
    if init != "wanda" and calibration is not None:
        raise ValueError(f"calibration is read only by init='wanda'; init is {init!r}")


INIT: dict[str, Init] = {
    "random": random_init,
    "magnitude": magnitude_init,
    "existing": existing_init,
    "wanda": wanda_init,
}
