"""One-shot pruning and regrowth: the operations of the pruning-plasticity study (Liu et al.,
NeurIPS 2021, section 3), outside any training loop.

:func:`prune` removes a fraction of the remaining weights of a model's sparse tensors by
magnitude, with one global threshold or tensor by tensor, and zeroes them (and their optimizer
state). :func:`regrow` is the paper's one-shot neuroregeneration: in each tensor, as many
connections as were pruned come back where the gradient is largest, at zero, so that the
network computes exactly what the pruned one computes until it trains again.

The tensors are chosen as a sparsifier chooses them (conv and linear weights by default, see
:func:`granet.selection.select_parameters`); "remaining" weights are those a given mask marks
active, or else the non-zero ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from granet import checks, patterns
from granet.masks import apply_masks, top_mask
from granet.pruning import PRUNING, global_pruning
from granet.selection import Rule, select_parameters


def _rate(rate: float) -> float:
    return checks.number("rate", rate, lambda r: 0.0 < r < 1.0, "in (0, 1)")


def prune_masks(
    weights: Sequence[torch.Tensor],
    rate: float,
    pruning: str = "global",
    masks: Sequence[torch.Tensor] | None = None,
    pattern: str | None = None,
    groups: Sequence[patterns.Groups] | None = None,
) -> list[torch.Tensor]:
    """The masks that remain when ``round(rate * n)`` of the ``n`` active weights, those of
    smallest magnitude, are removed: ``n`` counted over all tensors with ``pruning="global"``
    (one threshold), or in each tensor with ``"uniform"``. ``masks`` says which weights are
    active (default: the non-zero ones); an inactive weight stays inactive.

    With an N:M ``pattern`` (``rate`` must then be ``1 - N/M``), every group of M along a
    weight's input dimension keeps its N largest active weights (the ASP / SR-STE rule), and
    ``pruning`` does not apply; ``groups`` (from :func:`granet.patterns.layer_groups`) says
    how each weight splits, by default along dim 1 (``nn.Linear``, convolutions)."""
    rate = _rate(rate)
    checks.choice("pruning", pruning, PRUNING)
    if masks is None:
        masks = [w.detach() != 0 for w in weights]
    if len(masks) != len(weights):
        raise ValueError(
            f"masks must hold one mask per weight; got {len(masks)} for {len(weights)}"
        )
    if pattern is not None:
        nm = patterns.parse(pattern)
        if abs(rate - nm.sparsity) > 1e-9:
            raise ValueError(
                f"rate={rate:g} contradicts pattern={pattern!r}, which prunes 1 - {nm.n}/{nm.m}"
                f" = {nm.sparsity:g} of every group"
            )
        if groups is None:
            groups = patterns.layer_groups([str(i) for i in range(len(weights))], weights, nm)[0]
        return [
            patterns.initial_mask(g, w.detach().abs(), g.keep, m).contiguous()
            for g, w, m in zip(groups, weights, masks)
        ]
    scores = [torch.where(m, w.detach().abs().float(), -torch.inf) for w, m in zip(weights, masks)]
    nnz = [int(m.count_nonzero()) for m in masks]
    if pruning == "uniform":
        return [top_mask(s, n - round(rate * n)).view(s.shape) for s, n in zip(scores, nnz)]
    # global_pruning keeps round((1 - target) * N) weights: the target that keeps ``keep``
    keep, total = sum(nnz) - round(rate * sum(nnz)), sum(s.numel() for s in scores)
    pruned = global_pruning(scores, nnz, 1.0 - keep / total)
    return [m.clone() for m in masks] if pruned is None else pruned[0]  # None: rate x n < 1/2


def regrow_masks(
    masks: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], counts: Sequence[int]
) -> list[torch.Tensor]:
    """``masks`` with, in each tensor, ``counts[i]`` more active positions: the inactive ones
    where ``|grads[i]|`` is largest."""
    grown = []
    for m, g, k in zip(masks, grads, counts, strict=True):
        inactive = m.numel() - int(m.count_nonzero())
        if not 0 <= k <= inactive:
            raise ValueError(f"cannot regrow {k} connections where {inactive} are inactive")
        score = torch.where(m, -torch.inf, g.detach().abs().float())
        grown.append(m | top_mask(score, k).view(m.shape))
    return grown


@dataclass(frozen=True)
class Pruned:
    """The result of :func:`prune`: each sparse tensor's mask (True: active) and how many of
    its weights were removed."""

    masks: dict[str, torch.Tensor]
    removed: dict[str, int]

    def sparsity(self) -> float:
        """Fraction of the sparse tensors' weights that are inactive."""
        return sparsity(self.masks.values())


def sparsity(masks: Iterable[torch.Tensor]) -> float:
    """Fraction of the entries of ``masks`` that are inactive (False)."""
    masks = list(masks)
    return 1.0 - sum(int(m.count_nonzero()) for m in masks) / sum(m.numel() for m in masks)


def _zero(
    params: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer | None,
) -> None:
    """Zero the weights outside ``masks``, and every optimizer-state tensor shaped like them."""
    tensors, multipliers = [], []
    for p, m in zip(params, masks):
        state = optimizer.state.get(p, {}) if optimizer is not None else {}
        for t in [p, *(v for v in state.values() if torch.is_tensor(v) and v.shape == p.shape)]:
            tensors.append(t)
            multipliers.append(m.to(t.device, t.dtype))
    apply_masks(tensors, multipliers)


def prune(
    model: nn.Module,
    rate: float,
    *,
    pruning: str = "global",
    masks: Mapping[str, torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    include: Sequence[Rule] | None = None,
    exclude: Sequence[Rule] = (),
    pattern: str | None = None,
) -> Pruned:
    """Prune ``rate`` of the remaining weights of ``model``'s sparse tensors by magnitude, in
    place (see :func:`prune_masks`): the removed weights, and their ``optimizer`` state
    (momentum, Adam's moments), become zero.

    ``masks`` (parameter name -> bool mask, e.g. a sparsifier's ``masks``) says which weights
    remain; by default the non-zero ones. ``include`` / ``exclude`` choose the tensors as for a
    sparsifier. ``pattern="2:4"`` (any ``"N:M"``, with ``rate`` ``1 - N/M``) keeps the N
    largest of every M consecutive weights along each tensor's input dimension; a tensor whose
    input size M does not divide keeps its largest ``N/M`` of its weights instead, with a
    warning naming it.
    """
    chosen = select_parameters(model, include, exclude)
    if not chosen:
        raise ValueError("no sparse tensors selected: include/exclude matched no parameter")
    names, params = [n for n, _ in chosen], [p for _, p in chosen]
    if masks is not None:
        missing = [n for n in names if n not in masks]
        if missing:
            raise ValueError(f"masks has no mask for {', '.join(missing)}")
        before = [masks[n].to(p.device).bool() for n, p in zip(names, params)]
    else:
        before = [p.detach() != 0 for p in params]
    groups = None
    if pattern is not None:
        groups, loose = patterns.layer_groups(
            names, params, patterns.parse(pattern), patterns.input_dim_first(model, names)
        )
        if loose:
            warnings.warn(
                f"granet: pattern {pattern}: the input size of {', '.join(loose)} is not a "
                "multiple of its M; these are pruned unstructured to the pattern's density",
                RuntimeWarning,
                stacklevel=2,
            )
    after = prune_masks(params, rate, pruning, before, pattern, groups)
    with torch.no_grad():
        _zero(params, after, optimizer)
    removed = {
        n: int(b.count_nonzero()) - int(a.count_nonzero()) for n, b, a in zip(names, before, after)
    }
    return Pruned(dict(zip(names, after)), removed)


def regrow(pruned: Pruned, grads: Mapping[str, torch.Tensor]) -> Pruned:
    """One-shot neuroregeneration after :func:`prune`: in each tensor, as many connections as
    were pruned regrow at the inactive positions with the largest ``|grads[name]|`` (the dense
    gradient of the pruned network). The weights there are zero, so the network's output does
    not change; the density goes back to what it was before pruning. Returns the new masks
    (``removed``: 0)."""
    names = list(pruned.masks)
    missing = [n for n in names if n not in grads or grads[n] is None]
    if missing:
        raise ValueError(f"grads has no gradient for {', '.join(missing)}")
    grown = regrow_masks(
        [pruned.masks[n] for n in names],
        [grads[n].to(pruned.masks[n].device) for n in names],
        [pruned.removed[n] for n in names],
    )
    return Pruned(dict(zip(names, grown)), dict.fromkeys(names, 0))
