"""What the framework callbacks share: the options checked when a callback is made
(:class:`SparsifierHolder`), building the sparsifier on the framework's model and optimizer,
resuming it without disturbing what the framework restored, and its scalars for logs.

A framework restores the model (and, for the Hugging Face Trainer, the optimizer) from its
checkpoint before a callback can build the sparsifier, and building one applies freshly drawn
masks. :func:`attach` therefore keeps a copy of the sparse tensors and their optimizer state,
builds, loads the saved sparsifier state and puts the copies back: the run continues exactly
where the checkpoint left it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from granet import checks, patterns
from granet.initial import check_calibration
from granet.methods import METHODS
from granet.selection import check_rules, select_parameters, unwrap, unwrap_optimizer
from granet.shards import is_dtensor
from granet.sparsifier import Sparsifier
from granet.trees import tree_map_with_path

# the key of a split state (:func:`split_sharded`) that lists the tensors saved apart
SHARDED = "sharded"

# Sparsifier keywords that are not fields of granet.Algorithm
_BUILD_ONLY = ("algorithm", "include", "exclude", "verify_ranks", "calibration")


def method_class(method: str, options: dict[str, Any]) -> type[Sparsifier]:
    """The sparsifier class called ``method``, with ``options`` checked now, so that a bad option
    fails where the callback is made rather than when training starts."""
    cls = checks.choice("method", method.lower() if isinstance(method, str) else method, METHODS)
    fields = {k: v for k, v in options.items() if k not in _BUILD_ONLY}
    check_calibration(
        cls.resolve(options.get("algorithm"), **fields).init, options.get("calibration")
    )
    check_rules(options.get("include"), options.get("exclude", ()))
    checks.boolean("verify_ranks", options.get("verify_ranks", True))
    return cls


def attach(
    cls: type[Sparsifier],
    model: nn.Module,
    optimizer: Any,
    total_steps: int,
    options: dict[str, Any],
    state: dict[str, Any] | None = None,
    load_sharded: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> Sparsifier:
    """A ``cls`` sparsifier on ``model`` and ``optimizer`` (a wrapper is fine), for a run of
    ``total_steps`` optimizer steps unless ``options`` names its own; with ``state`` (a
    :meth:`Sparsifier.state_dict`), resumed from it with the current weights and optimizer state
    left exactly as they are. A ``state`` split by :func:`split_sharded` gets its sharded tensors
    from ``load_sharded``, which fills the new sparsifier's own (placed as its weights are now,
    so that ``torch.distributed.checkpoint`` reshards them) in place."""
    options = {"total_steps": total_steps, **options}
    if state is None:
        return cls(model, optimizer, **options)
    chosen = select_parameters(unwrap(model), options.get("include"), options.get("exclude", ()))
    params = [p for _, p in chosen]
    opt_state = unwrap_optimizer(optimizer).state
    tensors = [
        t
        for p in params
        for t in (p, *opt_state.get(p, {}).values())
        if torch.is_tensor(t) and t.shape == p.shape
    ]
    restored_ids = [id(t) for t in tensors]
    # under FSDP2 each rank copies (and checks) its own shards
    tensors = [t.to_local() if is_dtensor(t) else t for t in tensors]
    copies = [t.detach().to("cpu", copy=True) for t in tensors]
    restored = dict(zip(restored_ids, copies))
    sparsifier = None
    try:
        algorithm = options.get("algorithm")
        pattern = options.get("pattern", algorithm.pattern if algorithm else None)
        if options.get("init", algorithm.init if algorithm else None) == "existing":
            # the run started from the zeros of weights that are gone now: rebuild their count,
            # so that the settings the state was saved with come out again (under a pattern,
            # which sets them, weights that hold it)
            if pattern is None:
                _set_sparsity(params, state["settings"]["init_sparsity"])
            else:
                _set_pattern(unwrap(model), chosen, pattern)
        sparsifier = cls(model, optimizer, **options)
        if SHARDED in state:
            state = _join_sharded(state, sparsifier, load_sharded)
        sparsifier.load_state_dict(state)
        _check_zeros(sparsifier, [restored[id(p)] for p in sparsifier.params])
    except BaseException:
        if sparsifier is not None:
            sparsifier.remove()
        raise
    finally:
        with torch.no_grad():
            for t, copy in zip(tensors, copies):
                t.copy_(copy)
    return sparsifier


def _check_zeros(sparsifier: Sparsifier, weights: Sequence[torch.Tensor]) -> None:
    """Refuse restored ``weights`` that are not zero where the resumed ``sparsifier``'s masks
    are: the checkpoint's weights and its sparsifier state do not belong together."""
    for name, weight, mask in zip(sparsifier.names, weights, sparsifier.masks.values()):
        sharded = is_dtensor(mask)
        if sharded:  # each rank its shard, the count over all (so that every rank raises)
            mask = mask.to_local()
        count = weight[~mask.to(weight.device)].count_nonzero().reshape(1).to(mask.device)
        if sharded:
            torch.distributed.all_reduce(count)
        wrong = int(count)
        if wrong:
            raise ValueError(
                f"resume: the checkpoint's {name} has {wrong} non-zero weights where its saved "
                "sparsifier masks are zero; its weights and sparsifier state do not belong together"
            )


def split_sharded(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A :meth:`Sparsifier.state_dict` split in two: what every rank holds alike (its DTensors
    replaced by ``None``, their paths listed under ``"sharded"``), which one rank saves with a
    checksum, and its DTensors by path (``"masks/fc.weight"``, ``"scores/growth/buffers/0"``),
    which each rank saves its shards of with ``torch.distributed.checkpoint``. A state without
    DTensors (no FSDP2) comes back whole, with no tensors."""
    found: dict[str, torch.Tensor] = {}

    def take(path: str, value: Any) -> Any:
        if is_dtensor(value):
            found[path] = value
            return None
        return value

    rest = tree_map_with_path(take, state)
    if found:
        rest[SHARDED] = sorted(found)
    return rest, found


def _join_sharded(
    state: dict[str, Any],
    sparsifier: Sparsifier,
    load: Callable[[dict[str, torch.Tensor]], None] | None,
) -> dict[str, Any]:
    """``state`` (split by :func:`split_sharded`) with its sharded tensors, read by ``load`` into
    ``sparsifier``'s own."""
    _, template = split_sharded(sparsifier.state_dict())
    if load is None or sorted(template) != list(state[SHARDED]):
        raise ValueError(
            "the sparsifier state was saved with tensors sharded by fully_shard (FSDP2) "
            f"({len(state[SHARDED])} of them); resume it under FSDP2, with the same method, "
            "settings and sparse layers"
        )
    load(template)
    joined = {k: v for k, v in state.items() if k != SHARDED}
    for path, tensor in template.items():
        *parents, leaf = path.split("/")
        node: Any = joined
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(leaf)] = tensor
        else:
            node[leaf] = tensor
    return joined


class SparsifierHolder:
    """What a framework callback holds: ``method`` and its options, checked when it is made,
    and from the start of training ``self.sparsifier``, built (or resumed) by :meth:`_attach`."""

    def __init__(self, method: str = "granet", **sparsifier_kwargs: Any) -> None:
        self._cls = method_class(method, sparsifier_kwargs)
        self.method = method
        self.options = sparsifier_kwargs
        self.sparsifier: Sparsifier | None = None
        self._scalars: Scalars | None = None

    def _attach(
        self,
        model: nn.Module,
        optimizer: Any,
        total_steps: int,
        state: dict[str, Any] | None,
        source: object = None,
        load_sharded: Callable[[dict[str, torch.Tensor]], None] | None = None,
    ) -> None:
        """Build the sparsifier, or resume it from ``state``, read from the file ``source``
        (which a refused state's error names), its sharded tensors by ``load_sharded``."""
        if self.sparsifier is not None:  # an earlier training run of the same callback
            self.sparsifier.remove()
        try:
            self.sparsifier = attach(
                self._cls, model, optimizer, total_steps, self.options, state, load_sharded
            )
        except ValueError as e:
            if state is None:
                raise
            raise ValueError(f"{source}: {e}") from None
        self._scalars = Scalars(self.sparsifier)

    def _detach(self) -> None:
        """Release the model and optimizer when training ends, so that another callback (or
        sparsifier) may train them; the weights keep their zeros, ``self.sparsifier`` its
        state."""
        if self.sparsifier is not None:
            self.sparsifier.remove()


def _set_sparsity(params: Sequence[torch.Tensor], sparsity: float) -> None:
    """Overwrite ``params`` with ones and zeros, ``sparsity`` of them zeros over all, spread
    evenly over the tensors."""
    numel = sum(p.numel() for p in params)
    ones = round((1.0 - sparsity) * numel)
    shares = [ones * p.numel() // numel for p in params]
    for i in range(ones - sum(shares)):
        shares[i] += 1
    with torch.no_grad():
        for p, n in zip(params, shares):
            p.zero_().view(-1)[:n] = 1


def _set_pattern(model: nn.Module, chosen: list[tuple[str, torch.Tensor]], pattern: str) -> None:
    """Overwrite the ``chosen`` tensors with ones and zeros that hold ``pattern``."""
    names, params = [n for n, _ in chosen], [p for _, p in chosen]
    nm = patterns.parse(pattern)
    groups, _ = patterns.layer_groups(names, params, nm, patterns.input_dim_first(model, names))
    with torch.no_grad():
        for p, g in zip(params, groups):
            p.copy_(patterns.initial_mask(g, torch.ones(p.shape), g.keep))


class Scalars:
    """The sparsifier's numbers for a framework's logs, under ``granet/``: sparsity, ITOP rate
    and the last round's pruned, dropped and regrown counts. Recomputed only after a topology
    round (reading the ITOP bits costs a pass over one bit per sparse weight)."""

    def __init__(self, sparsifier: Sparsifier) -> None:
        self.sparsifier = sparsifier
        self._key: Any = ()  # the next round's step when last computed
        self._values: dict[str, float] = {}

    def __call__(self) -> dict[str, float]:
        sp = self.sparsifier
        key = sp.next_update()
        if key != self._key:
            self._values = {
                "granet/sparsity": sp.sparsity(),
                "granet/itop_rate": sp.itop_rate(),
                **{f"granet/{k}": float(v) for k, v in sp.last_round.items()},
            }
            self._key = key
        return dict(self._values)
