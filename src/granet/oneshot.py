"""One-shot pruning and regrowth: the operations of the pruning-plasticity study (Liu et al.,
NeurIPS 2021, section 3), and one-shot starts for a pretrained model, outside any training loop.

:func:`prune` removes a fraction of the remaining weights of a model's sparse tensors, with one
global threshold, tensor by tensor or output row by output row, and zeroes them (and their
optimizer state). The score is the magnitude ``|W_ij|``, or Wanda's ``|W_ij| * ||X_j||_2``
(Sun et al., ICLR 2024, arXiv 2306.11695): the magnitude times the norm of input feature ``j``
over the tokens of a few calibration batches, compared within each output row. :func:`regrow`
is the paper's one-shot neuroregeneration: in each tensor, as many connections as were pruned
come back where the gradient is largest, at zero, so that the network computes exactly what the
pruned one computes until it trains again.

The tensors are chosen as a sparsifier chooses them (conv and linear weights by default, see
:func:`granet.selection.select_parameters`); "remaining" weights are those a given mask marks
active, or else the non-zero ones.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from granet import checks, patterns
from granet.masks import apply_masks, nonzeros, sparsity_of, top_mask
from granet.pruning import PRUNING, global_pruning
from granet.selection import Rule, select_parameters

# what prune compares: every weight's score, and which weights compete for the kept places
SCORES = dict.fromkeys(("magnitude", "wanda"))
GROUPS = dict.fromkeys((*PRUNING, "row"))


def _rate(rate: float) -> float:
    return checks.number("rate", rate, lambda r: 0.0 < r < 1.0, "in (0, 1)")


def prune_masks(
    weights: Sequence[torch.Tensor],
    rate: float,
    pruning: str = "global",
    masks: Sequence[torch.Tensor] | None = None,
    scores: Sequence[torch.Tensor] | None = None,
    pattern: str | None = None,
    groups: Sequence[patterns.Groups] | None = None,
) -> list[torch.Tensor]:
    """The masks that remain when ``round(rate * n)`` of the ``n`` active weights, those of
    lowest score, are removed: ``n`` counted over all tensors with ``pruning="global"`` (one
    threshold), in each tensor with ``"uniform"``, or in each row (the first dimension: an
    output unit of an ``(out, in)`` weight) with ``"row"``. ``scores`` defaults to the
    magnitudes. ``masks`` says which weights are active (default: the non-zero ones); an
    inactive weight stays inactive.

    With an N:M ``pattern`` (``rate`` must then be ``1 - N/M``), every group of M along a
    weight's input dimension keeps its N active weights of highest score (with magnitudes: the
    ASP / SR-STE rule), and ``pruning`` does not apply; ``groups`` (from
    :func:`granet.patterns.layer_groups`) says how each weight splits, by default along dim 1
    (``nn.Linear``, convolutions)."""
    rate = _rate(rate)
    checks.choice("pruning", pruning, GROUPS)
    if masks is None:
        masks = [w.detach() != 0 for w in weights]
    if scores is None:
        scores = [w.detach().abs() for w in weights]
    for name, given in (("masks", masks), ("scores", scores)):
        if len(given) != len(weights):
            raise ValueError(
                f"{name} must hold one {name[:-1]} per weight; got {len(given)} for {len(weights)}"
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
            patterns.initial_mask(g, s.detach(), g.keep, m).contiguous()
            for g, s, m in zip(groups, scores, masks)
        ]
    scores = [torch.where(m, s.detach().float(), -torch.inf) for s, m in zip(scores, masks)]
    if pruning == "row":
        kept = []
        for s, m in zip(scores, masks):
            nnz = m.reshape(len(m), -1).sum(1)
            kept.append(row_mask(s, nnz - (nnz.double() * rate).round().long()))
        return kept
    nnz = [int(m.count_nonzero()) for m in masks]
    if pruning == "uniform":
        return [top_mask(s, n - round(rate * n)).view(s.shape) for s, n in zip(scores, nnz)]
    # global_pruning keeps round((1 - target) * N) weights: the target that keeps ``keep``
    keep, total = sum(nnz) - round(rate * sum(nnz)), sum(s.numel() for s in scores)
    pruned = global_pruning(scores, nnz, 1.0 - keep / total)
    return [m.clone() for m in masks] if pruned is None else pruned[0]  # None: rate x n < 1/2


def row_mask(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The mask of the ``keep[i]`` highest ``scores`` in each row ``i`` (the first dimension);
    ties go to the earlier position."""
    flat = scores.reshape(len(scores), -1)
    order = flat.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(
        1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order)
    )
    return (ranks < keep.to(flat.device)[:, None]).view(scores.shape)


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
    return sparsity_of(*nonzeros(masks))


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
    score: str = "magnitude",
    calibration: Iterable[Any] | None = None,
    pruning: str | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    include: Sequence[Rule] | None = None,
    exclude: Sequence[Rule] = (),
    pattern: str | None = None,
) -> Pruned:
    """Prune ``rate`` of the remaining weights of ``model``'s sparse tensors, in place (see
    :func:`prune_masks`): the removed weights, and their ``optimizer`` state (momentum, Adam's
    moments), become zero.

    ``score="magnitude"`` ranks weights by ``|W_ij|``, by default with one global threshold;
    ``score="wanda"`` by ``|W_ij| * ||X_j||_2``, the norm of input feature ``j`` over every
    token of the ``calibration`` batches (model inputs: a tensor, a tuple of positional
    arguments or a dict of keyword arguments, e.g. ``{"input_ids": ...}``), by default within
    each output row, so every row of every layer loses ``rate`` of its weights (Sun et al.
    2024). Wanda reads the inputs of ``nn.Linear`` and Hugging Face ``Conv1D`` layers. Any
    ``pruning`` (``"global"``, ``"uniform"``, ``"row"``) goes with either score.

    ``masks`` (parameter name -> bool mask, e.g. a sparsifier's ``masks``) says which weights
    remain; by default the non-zero ones. ``include`` / ``exclude`` choose the tensors as for a
    sparsifier. ``pattern="2:4"`` (any ``"N:M"``, with ``rate`` ``1 - N/M``) keeps the N
    largest of every M consecutive weights along each tensor's input dimension; a tensor whose
    input size M does not divide keeps its largest ``N/M`` of its weights instead, with a
    warning naming it.
    """
    checks.choice("score", score, SCORES)
    if pruning is None:
        pruning = "row" if score == "wanda" else "global"
    checks.choice("pruning", pruning, GROUPS)
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
    if score == "wanda":
        scores = wanda_scores(model, names, calibration)
    else:
        if calibration is not None:
            raise ValueError("calibration is read only by score='wanda'")
        scores = [p.detach().abs() for p in params]
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
        after = prune_masks(params, rate, pruning, before, scores, pattern, groups)
    else:
        # an output row is the first dimension of every weight but a Conv1D's, which is (in, out)
        rows = [output_major(model, n) for n in names]
        after = prune_masks(
            [as_rows(p, r) for p, r in zip(params, rows)],
            rate,
            pruning,
            [as_rows(m, r) for m, r in zip(before, rows)],
            [as_rows(s, r) for s, r in zip(scores, rows)],
        )
        after = [as_rows(a, r).contiguous() for a, r in zip(after, rows)]
    with torch.no_grad():
        _zero(params, after, optimizer)
    removed = {
        n: int(b.count_nonzero()) - int(a.count_nonzero()) for n, b, a in zip(names, before, after)
    }
    return Pruned(dict(zip(names, after)), removed)


def _conv1d() -> tuple[type, ...]:
    """Hugging Face's ``Conv1D``, once transformers is imported (never imported here)."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return (conv1d,) if isinstance(conv1d, type) else ()


def output_major(model: nn.Module, name: str) -> bool:
    """False where the tensor ``name`` keeps its outputs in its second dimension (a Conv1D)."""
    owner = name.rpartition(".")[0]
    return not isinstance(model.get_submodule(owner), _conv1d())


def as_rows(t: torch.Tensor, major: bool) -> torch.Tensor:
    """``t`` with the output units first (a Conv1D's weight transposed); its own inverse."""
    return t if major else t.t()


def input_norms(
    model: nn.Module, names: Sequence[str], calibration: Iterable[Any] | None
) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` for the layers holding the weights ``names`` (``nn.Linear``, ``Conv1D``):
    the norm of each input feature ``j`` over every token the ``calibration`` batches bring to
    the layer, collected by forward hooks in one pass without gradients, in eval mode."""
    if calibration is None:
        raise ValueError(
            "calibration: score='wanda' needs calibration batches (an iterable of model inputs)"
        )
    layers = {}
    for name in names:
        owner, _, local = name.rpartition(".")
        module = model.get_submodule(owner)
        if local != "weight" or not isinstance(module, (nn.Linear, *_conv1d())):
            raise ValueError(
                f"score='wanda' reads the inputs of nn.Linear and Conv1D layers; {name} is a "
                f"{type(module).__name__}'s {local} (exclude it)"
            )
        layers[name] = module
    squares: dict[str, torch.Tensor] = {}

    def collect(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            features = module.weight.shape[1 if isinstance(module, nn.Linear) else 0]
            if x.shape[-1] != features:
                raise ValueError(
                    f"{name} takes {features} input features, the batch brings it {x.shape[-1]}"
                )
            total = x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)
            squares[name] = squares[name] + total if name in squares else total

        return hook

    hooks = [m.register_forward_pre_hook(collect(n)) for n, m in layers.items()]
    device = next(model.parameters()).device
    training = model.training
    batches = 0
    try:
        model.eval()
        with torch.no_grad():
            for i, batch in enumerate(calibration):
                batches += 1
                try:
                    _call(model, _to(batch, device))
                except (RuntimeError, IndexError, TypeError, ValueError) as e:
                    first = (str(e).splitlines() or [type(e).__name__])[0]
                    raise ValueError(
                        f"calibration: batch {i} ({_describe(batch)}) does not fit the model: "
                        f"{first}"
                    ) from None
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    if batches == 0:
        raise ValueError("calibration: holds no batch")
    unreached = [n for n in names if n not in squares]
    if unreached:
        raise ValueError(f"calibration: no batch reached {', '.join(unreached)}")
    return {n: squares[n].sqrt().float() for n in names}


def wanda_scores(
    model: nn.Module, names: Sequence[str], calibration: Iterable[Any] | None
) -> list[torch.Tensor]:
    """Wanda's ``|W_ij| * ||X_j||_2`` for each of the weights ``names``, shaped like them."""
    norms = input_norms(model, names, calibration)
    scores = []
    for name in names:
        weight = model.get_parameter(name).detach()
        norm = norms[name].to(weight.device)
        # a Linear's weight is (out, in), a Conv1D's (in, out)
        scores.append(weight.abs().float() * (norm if output_major(model, name) else norm[:, None]))
    return scores


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _to(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _describe(batch: Any) -> str:
    if torch.is_tensor(batch):
        return f"a tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in batch) + ")"
    return type(batch).__name__


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
