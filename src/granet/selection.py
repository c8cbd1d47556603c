"""Which tensors of a model are sparse: by module type and by parameter-name pattern."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

Rule = type[nn.Module] | str
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper, else the model."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def _matches(rules: Sequence[Rule], module: nn.Module, name: str, local: str) -> bool:
    for rule in rules:
        if isinstance(rule, str):
            if fnmatchcase(name, rule):
                return True
        elif isinstance(module, rule) and local == "weight":
            return True
    return False


def select_parameters(
    model: nn.Module,
    include: Sequence[Rule] | None = None,
    exclude: Sequence[Rule] = (),
) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs to sparsify.

    A rule is a module type (selects that module's ``weight``) or an fnmatch pattern on the full
    parameter name (``"features.0.weight"``, ``"classifier.*"``). ``include`` defaults to the
    weights of Conv1d/2d/3d and Linear; ``exclude`` wins over ``include``. A parameter shared by
    several modules is listed once.
    """
    include = DEFAULT_TYPES if include is None else tuple(include)
    for rule in (*include, *exclude):
        if not isinstance(rule, str) and not (
            isinstance(rule, type) and issubclass(rule, nn.Module)
        ):
            raise ValueError(
                f"include/exclude rules must be nn.Module subclasses or name patterns; got {rule!r}"
            )
    chosen, seen = [], set()
    for module_name, module in model.named_modules():
        for local, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{local}" if module_name else local
            if id(param) in seen or not param.requires_grad:
                continue
            if _matches(include, module, name, local) and not _matches(
                exclude, module, name, local
            ):
                chosen.append((name, param))
                seen.add(id(param))
    return chosen
