"""N:M sparsity: at most N active weights in every group of M consecutive weights along a
layer's input dimension (2:4 is what NVIDIA GPUs since Ampere run faster).

A group is M consecutive entries of a weight's input dimension for one output: ``weight[o,
j*M:(j+1)*M]`` of an ``nn.Linear``; for a convolution, M consecutive entries of the flattened
``in_channels x kh x kw`` of one output channel (``weight.reshape(out, -1)``, the order
``unfold``/im2col reads them in); for a Hugging Face ``Conv1D``, stored ``(in, out)``, M
consecutive rows of one column. A tensor whose input size M does not divide stays unstructured
(at the pattern's density, pruned and regrown within the whole tensor), with a warning naming
it: the first convolution of most CNNs (3 x 3 x 3 inputs) is such a layer.

Every function here works on one tensor through its :class:`Groups`: the tensor seen as a
``(groups, size)`` matrix, each row one group (the whole tensor for an unstructured one).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from granet.masks import top_mask

_SYNTAX = re.compile(r"(\d+):(\d+)")


@dataclass(frozen=True)
class Pattern:
    """``n`` of every ``m``."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse(value: Any, name: str = "pattern") -> Pattern:
    """``"N:M"`` as a :class:`Pattern`; a one-line ValueError naming ``name`` otherwise."""
    match = _SYNTAX.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        hint = ' (quote it in YAML: "2:4")' if isinstance(value, int) else ""
        raise ValueError(f'{name} must be a string "N:M" such as "2:4"; got {value!r}{hint}')
    n, m = int(match[1]), int(match[2])
    if not 1 <= n < m:
        raise ValueError(f"{name} must have 1 <= N < M; got {value!r}")
    return Pattern(n, m)


def check(name: str, value: Any) -> str | None:
    """The option's check: None (unstructured) or a valid ``"N:M"``, returned as given."""
    if value is not None:
        parse(value, name)
    return value


@dataclass(frozen=True)
class Groups:
    """How one tensor splits into groups: rows of ``size`` entries, of which ``keep`` remain
    at the pattern's density. ``transposed``: the input dimension is dim 0 (``Conv1D``)."""

    shape: tuple[int, ...]
    size: int
    keep: int
    transposed: bool = False

    @property
    def structured(self) -> bool:
        return self.size != math.prod(self.shape)

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (of the tensor's shape) as ``(groups, size)``; a copy when transposed."""
        if self.transposed:
            t = t.t()
        return t.reshape(-1, self.size)

    def unview(self, rows: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`view`."""
        if self.transposed:
            return rows.reshape(self.shape[1], self.shape[0]).t()
        return rows.reshape(self.shape)

    def count(self, sparsity: float) -> int:
        """Active entries per group at ``sparsity``: about ``size * (1 - sparsity)``, never
        below ``keep`` (the pattern's N) nor above ``size``."""
        return min(self.size, max(self.keep, round(self.size * (1.0 - sparsity))))


def _is_conv1d(module: nn.Module | None) -> bool:
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return isinstance(conv1d, type) and isinstance(module, conv1d)


def input_dim_first(model: nn.Module, names: Sequence[str]) -> list[bool]:
    """For each named parameter of ``model``: whether its input dimension is dim 0 (the
    weight of a Hugging Face ``Conv1D``, stored ``(in, out)``)."""
    return [_is_conv1d(model.get_submodule(name.rpartition(".")[0])) for name in names]


def layer_groups(
    names: Sequence[str],
    params: Sequence[torch.Tensor],
    pattern: Pattern,
    transposed: Sequence[bool] | None = None,
) -> tuple[list[Groups], list[str]]:
    """Each tensor's :class:`Groups` under ``pattern``, and the names of those left
    unstructured (a 1-D tensor, or an input size that ``pattern.m`` does not divide).
    ``transposed`` (default: none) marks tensors whose input dimension is dim 0."""
    groups, unstructured = [], []
    for i, (name, p) in enumerate(zip(names, params)):
        flip = bool(transposed and transposed[i]) and p.dim() == 2
        inputs = p.shape[0] if flip else (math.prod(tuple(p.shape[1:])) if p.dim() > 1 else 0)
        shape = tuple(p.shape)
        if inputs and inputs % pattern.m == 0:
            groups.append(Groups(shape, pattern.m, pattern.n, flip))
        else:
            numel = math.prod(shape)
            groups.append(Groups(shape, numel, round(numel * pattern.n / pattern.m)))
            unstructured.append(name)
    return groups, unstructured


def top_in_groups(rows: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """A bool ``(groups, size)`` mask of the ``k`` highest scores of every row (``k`` an int
    or one count per row); ties go to the lower index."""
    order = torch.argsort(rows, dim=1, descending=True, stable=True)
    ranks = torch.arange(rows.shape[1], device=rows.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    return rank < (k.unsqueeze(1) if torch.is_tensor(k) else k)


def initial_mask(
    groups: Groups, scores: torch.Tensor, count: int, active: torch.Tensor | None = None
) -> torch.Tensor:
    """The ``count`` highest ``scores`` of every group (of its ``active`` entries, if given)."""
    rows = groups.view(scores.float())
    if active is not None:
        rows = torch.where(groups.view(active), rows, -torch.inf)
    mask = top_in_groups(rows, count)
    if active is not None:
        mask &= groups.view(active)
    return groups.unview(mask)


def prune(groups: Groups, mask: torch.Tensor, importance: torch.Tensor, count: int) -> torch.Tensor:
    """``mask`` with every group cut to its ``count`` most important active entries
    (``importance`` is -inf at inactive entries)."""
    return mask & groups.unview(top_in_groups(groups.view(importance), count))


def drop_and_regrow(
    groups: Groups,
    mask: torch.Tensor,
    k: int | torch.Tensor,
    importance: torch.Tensor,
    growth: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move up to ``k`` active entries within their groups: the ``k`` lowest-importance
    active entries of the tensor are dropped, counting in each group only as many of its
    lowest as it has inactive entries to regrow into; every group then regrows as many as it
    dropped at its highest-growth inactive entries (the dropped ones included: a weight
    dropped and regrown at once never left). Returns the new mask and the number dropped."""
    active = groups.view(mask)
    imp = groups.view(importance)
    free = groups.size - active.sum(dim=1, keepdim=True)
    lowest_first = torch.where(active, imp, torch.inf)
    order = torch.argsort(lowest_first, dim=1, stable=True)
    ranks = torch.arange(groups.size, device=mask.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, ranks)
    eligible = active & (rank < free)
    chosen = top_mask(torch.where(eligible, -imp, -torch.inf), k).view_as(eligible)
    dropped = eligible & chosen
    per_group = dropped.sum(dim=1)
    kept = active & ~dropped
    grow = torch.where(kept, -torch.inf, groups.view(growth).float())
    new = kept | top_in_groups(grow, per_group)
    return groups.unview(new), per_group.sum()


def violations(groups: Groups, mask: torch.Tensor) -> int:
    """How many groups of ``mask`` hold more than ``groups.keep`` active entries."""
    return int((groups.view(mask).sum(dim=1) > groups.keep).sum())


def holds(mask: torch.Tensor, pattern: Pattern | str) -> bool:
    """Whether a 2-D-or-more ``mask`` (or weight: non-zeros) holds ``pattern`` along dim 1
    (flattened dims 1..), as :class:`Groups` reads an ``nn.Linear`` or convolution weight."""
    pattern = parse(pattern) if isinstance(pattern, str) else pattern
    inputs = math.prod(tuple(mask.shape[1:])) if mask.dim() > 1 else 0
    if not inputs or inputs % pattern.m:
        return False
    rows = (mask != 0).reshape(-1, pattern.m)
    return bool((rows.sum(dim=1) <= pattern.n).all())
