"""Which tensors of a model are sparse: by module type and by parameter-name pattern.

The default selects the weight matrices of the layers that hold most of a network's weights:
convolutions, ``nn.Linear`` (attention's ``out_proj`` included), ``nn.MultiheadAttention``'s
packed ``in_proj_weight`` and Hugging Face's GPT-2-style ``Conv1D``. It leaves out every
parameter an ``nn.Embedding`` holds, also where an output head shares it (GPT-2 ties ``lm_head``
to ``wte``), and biases and norms. Embeddings, heads or anything else come in by pattern.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

Rule = type[nn.Module] | str
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.MultiheadAttention,
)
# The tensors a module-type rule selects where they are not called ``weight``: attention packs
# its query, key and value projections into one tensor, or keeps three when their sizes differ.
_WEIGHTS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.MultiheadAttention: ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
}


def default_include() -> tuple[Rule, ...]:
    """The rules ``include=None`` stands for: :data:`DEFAULT_TYPES` and, once transformers is
    imported, its ``Conv1D`` (a model cannot hold one before; transformers is never imported
    here). ``[*default_include(), nn.Embedding]`` adds the embeddings."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return DEFAULT_TYPES + ((conv1d,) if isinstance(conv1d, type) else ())


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers, else the model."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers that hold one at ``.optimizer`` (accelerate's
    ``AcceleratedOptimizer``; Lightning's ``LightningOptimizer``, which poses as its inner
    optimizer's class and shares its hooks), else ``optimizer``."""
    while hasattr(optimizer, "optimizer") and (
        not isinstance(optimizer, torch.optim.Optimizer)
        or isinstance(optimizer.optimizer, torch.optim.Optimizer)
    ):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            "optimizer must be a torch.optim.Optimizer or a wrapper holding one at .optimizer; "
            f"got {type(optimizer).__name__}"
        )
    return optimizer


def _weights(module: nn.Module) -> tuple[str, ...]:
    for kind, names in _WEIGHTS.items():
        if isinstance(module, kind):
            return names
    return ("weight",)


def _matches(rules: Sequence[Rule], holders: Sequence[tuple[nn.Module, str, str]]) -> bool:
    """Whether a rule matches any of the (module, local name, full name) holding a tensor."""
    for module, local, name in holders:
        for rule in rules:
            if isinstance(rule, str):
                if fnmatchcase(name, rule):
                    return True
            elif isinstance(module, rule) and local in _weights(module):
                return True
    return False


def check_rules(include: Sequence[Rule] | None, exclude: Sequence[Rule]) -> None:
    """Refuse rules :func:`select_parameters` cannot read, naming them (before any model)."""
    for name, rules in (("include", include), ("exclude", exclude)):
        if isinstance(rules, (str, type)):
            raise ValueError(f"{name} must be a list of rules; got the single rule {rules!r}")
        for rule in rules or ():
            if not isinstance(rule, str) and not (
                isinstance(rule, type) and issubclass(rule, nn.Module)
            ):
                raise ValueError(
                    f"include/exclude rules must be nn.Module subclasses or name patterns; "
                    f"got {rule!r}"
                )


def unmatched_patterns(model: nn.Module, rules: Sequence[Rule] | None) -> list[str]:
    """The name patterns among ``rules`` that match no parameter name of ``model`` (a typo
    there silently selects nothing, or excludes nothing)."""
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    return [
        rule
        for rule in rules or ()
        if isinstance(rule, str) and not any(fnmatchcase(name, rule) for name in names)
    ]


def select_parameters(
    model: nn.Module,
    include: Sequence[Rule] | None = None,
    exclude: Sequence[Rule] = (),
) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs to sparsify, in the model's order.

    A rule is a module type (selects that module's ``weight``; ``nn.MultiheadAttention``'s
    ``in_proj_weight``, or its ``q/k/v_proj_weight``) or an fnmatch pattern on the full parameter
    name (``"features.0.weight"``, ``"classifier.*"``). ``include`` defaults to
    :func:`default_include`, and that default also excludes every parameter an ``nn.Embedding``
    holds. A parameter shared by several modules is listed once, under its first name; it is
    selected when a rule of ``include`` matches one of its holders and no rule of ``exclude``
    matches any (``exclude`` wins).
    """
    check_rules(include, exclude)
    default = include is None
    include = default_include() if default else tuple(include)
    exclude = (*exclude, nn.Embedding) if default else tuple(exclude)
    holders: dict[int, list[tuple[nn.Module, str, str]]] = {}
    params: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for local, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{local}" if module_name else local
            holders.setdefault(id(param), []).append((module, local, name))
            params[id(param)] = param
    return [
        (held[0][2], params[key])
        for key, held in holders.items()
        if params[key].requires_grad and _matches(include, held) and not _matches(exclude, held)
    ]
