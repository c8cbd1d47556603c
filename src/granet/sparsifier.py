"""The sparsifier: owns the masks, hooks ``optimizer.step`` and runs topology rounds.

The mechanics live here (masks, the step hook, device read-back, ITOP bits, state); what a round
does is the :class:`~granet.algorithm.Algorithm` value, whose defaults each method sets (see
``methods.py``). A round reads like the algorithm in ``docs/design.md``: gradual pruning to the
schedule's target by importance, then per-layer drop-and-regrow at the decayed rate, then the
masks are applied to the weights and to their optimizer state.
"""

from __future__ import annotations

import gc
import json
import math
import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn

from granet import checks, patterns
from granet.algorithm import OPTION, Algorithm
from granet.comm import CompactAllReduce, refuse_other_hook
from granet.compute import SparseCompute
from granet.criteria import GROWTH, IMPORTANCE
from granet.distributed import (
    data_parallel_group,
    refuse_sharded,
    verify_agreement,
    verify_shared,
)
from granet.distributions import DISTRIBUTIONS
from granet.initial import INIT, check_calibration
from granet.masks import (
    apply_masks,
    density_of,
    pack_bits,
    pack_rows,
    sparsity_of,
    unpack_bits,
    unpack_rows,
)
from granet.oneshot import wanda_scores
from granet.pruning import PRUNING
from granet.readback import HostCopy
from granet.schedules import MIN_REGROW_FRACTION, CosineDecay, CubicSparsity, UpdateCadence
from granet.selection import (
    Rule,
    check_rules,
    select_parameters,
    unmatched_patterns,
    unwrap,
    unwrap_optimizer,
)
from granet.shards import Shards, Whole, is_dtensor

# id(parameter) -> (the parameter, the sparsifier holding it), both weakly
_HELD: dict[int, tuple[weakref.ref, weakref.ref]] = {}


class Sparsifier:
    """Sparse training attached to an unchanged training loop.

    ``defaults`` gives each method its own values for options (at least those that are
    ``None`` in :class:`Algorithm`); a subclass states only what differs from its parent. An
    ``init_sparsity`` of ``None`` means "start at the final sparsity" (no gradual phase).
    """

    defaults: ClassVar[dict[str, Any]] = {
        "init_sparsity": None,
        "regrow_fraction": 0.5,
        "growth": "gradient",
    }

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.defaults = {**cls.__mro__[1].defaults, **cls.__dict__.get("defaults", {})}

    @classmethod
    def resolve(cls, algorithm: Algorithm | None = None, **options: Any) -> Algorithm:
        """``algorithm`` (or the defaults) with ``options`` on top and this method's defaults
        filled in where they are ``None``."""
        if algorithm is not None and not isinstance(algorithm, Algorithm):
            raise ValueError(f"algorithm must be a granet.Algorithm; got {algorithm!r}")
        unknown = sorted(set(options) - set(OPTION))
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTION)}")
        pattern = options.get("pattern", algorithm.pattern if algorithm else None)
        if pattern is not None:  # the pattern sets the sparsity and the layers' densities
            if "distribution" in options:
                raise ValueError(
                    f"distribution={options['distribution']!r} does not apply with "
                    f"pattern={pattern!r} (the pattern sets every layer's density); leave "
                    "distribution out"
                )
            if algorithm is None and options.get("sparsity") is None:
                options = {**options, "sparsity": patterns.parse(pattern).sparsity}
        given = replace(algorithm or Algorithm(), **options)
        if algorithm is None:  # every option not passed takes the method's default
            own = {k: v for k, v in cls.defaults.items() if options.get(k) is None}
        else:  # an Algorithm value is taken as given, but for its None fields
            own = {k: v for k, v in cls.defaults.items() if getattr(given, k) is None}
        if "init_sparsity" in own:
            default = own["init_sparsity"]
            own["init_sparsity"] = (
                given.sparsity if default is None else min(default, given.sparsity)
            )
        return replace(given, **own)

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        algorithm: Algorithm | None = None,
        *,
        include: Sequence[Rule] | None = None,
        exclude: Sequence[Rule] = (),
        verify_ranks: bool = True,
        calibration: Iterable[Any] | None = None,
        **options: Any,
    ) -> None:
        """Select the sparse tensors of ``model``, draw their masks and hook ``optimizer``.

        ``options`` are the fields of :class:`Algorithm` (``sparsity``, ``total_steps``, ...);
        ``total_steps`` is required. ``optimizer`` may be a wrapper holding the torch optimizer
        (accelerate's, Lightning's): the sparsifier hooks the optimizer inside.
        ``calibration`` (model inputs, e.g. a few batches of token ids) is what
        ``init="wanda"`` reads; data, not a setting, so it is no field of the algorithm.
        """
        optimizer = unwrap_optimizer(optimizer)
        check_rules(include, exclude)
        refuse_sharded(model, optimizer)
        self.model = unwrap(model)
        self.optimizer = optimizer
        self.verify_ranks = checks.boolean("verify_ranks", verify_ranks)
        self._group = data_parallel_group(model)
        chosen = select_parameters(self.model, include, exclude)
        example = next(iter(dict(self.model.named_parameters())), "?")
        unmatched = [
            f"{what} pattern(s) {', '.join(map(repr, names))} match no parameter of the model"
            for what, rules in (("include", include), ("exclude", exclude))
            if (names := unmatched_patterns(self.model, rules))
        ]
        if not chosen:
            raise ValueError(
                "no sparse tensors selected: include/exclude matched no parameter of the model"
                + "".join(f"; {u}" for u in unmatched)
                + (f" (a pattern matches a full name, such as {example!r})" if unmatched else "")
            )
        for text in unmatched:
            warnings.warn(
                f"{text} and are ignored (a pattern matches a full name, such as {example!r})",
                stacklevel=2,
            )
        meta = [name for name, p in chosen if p.is_meta]
        if meta:
            raise ValueError(
                f"the model's weights are on the meta device (no values yet: {meta[0]}"
                f"{' and others' if len(meta) > 1 else ''}); materialize the model first "
                "(model.to_empty(device=...) and initialize it, or load its weights)"
            )
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        orphans = [name for name, p in chosen if id(p) not in held]
        if orphans:
            raise ValueError(f"the optimizer does not hold these sparse parameters: {orphans}")
        self.names = [name for name, _ in chosen]
        self.params = [p for _, p in chosen]
        self._numel = sum(p.numel() for p in self.params)  # a DTensor's is the whole tensor's
        # where each rank's part of the tensors lies: whole here, or FSDP2 shards
        sharded = any(is_dtensor(p) for p in self.params)
        self._space = Shards(self.names, self.params) if sharded else Whole(self.params)
        if sharded:
            self._group = self._space.replicas  # only replicas of a shard must agree

        if algorithm is not None and not isinstance(algorithm, Algorithm):
            raise ValueError(f"algorithm must be a granet.Algorithm; got {algorithm!r}")
        pattern = options.get("pattern", algorithm and algorithm.pattern)
        if options.get("init", algorithm and algorithm.init) == "existing" and pattern is None:
            options = self._existing_sparsity(options, algorithm)
        elif options.get("init", algorithm and algorithm.init) == "existing":
            # a pattern fixes the sparsity; the weights are checked to hold it below
            own = {"sparsity": patterns.parse(pattern).sparsity} if algorithm is None else {}
            options = {**own, **options}
            options["init_sparsity"] = options.get("sparsity", algorithm and algorithm.sparsity)
        alg = self.resolve(algorithm, **options)
        if alg.total_steps is None:
            raise ValueError("total_steps must be an integer >= 1; got None")
        if sharded:
            self._check_sharded(alg)
        check_calibration(alg.init, calibration)
        self.algorithm = alg
        ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        if ddp and alg.communication == "compact":
            refuse_other_hook(alg.communication, model)  # before anything changes
        # under an N:M pattern, how each tensor splits into groups (None: unstructured)
        self._groups: list[patterns.Groups] | None = None
        if alg.pattern is not None:
            self._groups, loose = patterns.layer_groups(
                self.names,
                self.params,
                patterns.parse(alg.pattern),
                patterns.input_dim_first(self.model, self.names),
            )
            if loose:
                self._warn(
                    f"pattern {alg.pattern}: the input size of {', '.join(loose)} is not a "
                    "multiple of its M; these stay unstructured at the pattern's density"
                )
        start, end = alg.window()
        self.cadence = UpdateCadence(alg.update_every, alg.total_steps)
        self.sparsity_schedule = alg.sparsity_schedule or CubicSparsity(
            alg.init_sparsity, alg.sparsity, start, end, alg.update_every
        )
        self.regrow_schedule = alg.regrow_schedule or CosineDecay(
            alg.regrow_fraction, min(alg.regrow_fraction, MIN_REGROW_FRACTION), alg.total_steps
        )
        self.importance = _score(alg.importance, IMPORTANCE, optimizer)
        self.growth = _score(alg.growth, GROWTH, optimizer)
        self._observers = [
            s.observe for s in (self.importance, self.growth) if hasattr(s, "observe")
        ]
        for s in (self.importance, self.growth):
            if hasattr(s, "start"):
                s.start(self.params)
        gradual = alg.init_sparsity < alg.sparsity or alg.sparsity_schedule is not None
        self.dynamic = gradual or alg.regrow_fraction > 0 or alg.regrow_schedule is not None
        self._first_round = start if alg.init_sparsity < alg.sparsity else 0
        self._check_reachable(gradual)

        self.step = 0
        self._last_round = {"pruned": 0, "dropped": 0, "regrown": 0}
        self._generators: dict[str, torch.Generator] = {}
        self._target_cache: tuple[Any, ...] | None = None
        self._claim()

        if self._groups is None:
            densities = DISTRIBUTIONS[alg.distribution](self.params, 1.0 - alg.init_sparsity)
            counts = [min(round(d * p.numel()), p.numel()) for p, d in zip(self.params, densities)]
            self._masks = INIT[alg.init](
                self.params,
                counts,
                self._generator(torch.device("cpu")),
                model=self.model,
                names=self.names,
                calibration=calibration,
                space=self._space,
            )
        else:
            self._masks = self._pattern_masks(calibration)
        self._nnz = self._counts(self._masks).tolist()  # per layer, as last read
        self._warn_empty(self._nnz, "start")
        if alg.scale_init:
            # Evci et al. (2022): the dense initialisation scaled for the sparse fan-in keeps
            # each layer's output variance; unscaled, a very sparse deep net can start with a
            # signal too small to learn from.
            with torch.no_grad():
                gains = [math.sqrt(p.numel() / max(n, 1)) for p, n in zip(self.params, self._nnz)]
                torch._foreach_mul_(self._locals(), gains)
        # Weights active at least once, one bit each over all sparse layers in order; in host
        # memory, so that on a GPU the device holds only the bool masks.
        self._ever_active = self._packed_masks().cpu()
        # Where reading device values back costs the host nothing, a round's results are taken
        # in at once; elsewhere at the next round or report (see ``_settle``).
        self._reads_free = all(m.device.type == "cpu" for m in self._masks)
        self._pending: tuple[int, HostCopy] | None = None
        self._compute = None
        self._apply()
        self._verify()
        if alg.compute != "dense" and not sharded:  # installed once nothing can fail
            self._compute = SparseCompute(
                alg.compute, self.model, self.names, self.params, self._masks, optimizer, self._warn
            )
            self._compute.dense_grad = self._dense_grad_due()
        self._comm = None
        if alg.communication != "dense" and ddp:
            self._comm = CompactAllReduce.install(
                alg.communication, model, self.params, self._masks
            )
            if self._comm:
                self._comm.dense = self._dense_grad_due()
        self._hook = optimizer.register_step_post_hook(self._on_step)

    def _check_sharded(self, alg: Algorithm) -> None:
        """Refuse what sharded (FSDP2) weights do not support; say once that they compute
        dense."""
        if alg.pattern is not None:
            raise ValueError(
                f"pattern={alg.pattern!r} is not supported on weights sharded by fully_shard "
                "(FSDP2); train the N:M pattern without FSDP2 (one process or DDP)"
            )
        if alg.init == "wanda":
            raise ValueError(
                "init='wanda' is not supported on weights sharded by fully_shard (FSDP2); "
                "prune with granet.oneshot before sharding and start from init='existing'"
            )
        if alg.compute == "sparse":
            self._warn("compute='sparse' runs layers sharded by fully_shard (FSDP2) dense")
        if alg.communication == "compact":
            self._warn(
                "communication='compact' is DDP's; FSDP2 reduce-scatters the dense gradients"
            )

    def _locals(self) -> list[torch.Tensor]:
        """This rank's part of every sparse tensor (the tensors themselves unless sharded)."""
        return [self._space.local(p) for p in self.params]

    def _counts(self, masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Active entries per sparse tensor, over all ranks' parts."""
        return self._space.total(torch.stack([m.count_nonzero() for m in masks]))

    def _pattern_masks(self, calibration: Any = None) -> list[torch.Tensor]:
        """Initial masks under the pattern: in every group its count at ``init_sparsity``,
        at random, by magnitude or Wanda score, or the weights' own non-zeros (which must hold
        the pattern)."""
        alg, masks = self.algorithm, []
        generator = self._generator(torch.device("cpu"))
        wanda = None
        if alg.init == "wanda":
            wanda = wanda_scores(self.model, self.names, calibration)
        for i, (name, p, g) in enumerate(zip(self.names, self.params, self._groups)):
            w = p.detach()
            if alg.init == "existing":
                mask = w != 0
                if patterns.violations(g, mask):
                    raise ValueError(
                        f"init='existing' with pattern={alg.pattern!r}: {name} has more than "
                        f"{g.keep} non-zeros in {patterns.violations(g, mask)} of its groups "
                        f"of {g.size}"
                    )
            elif alg.init in ("magnitude", "wanda"):
                scores = w.abs() if wanda is None else wanda[i]
                mask = patterns.initial_mask(g, scores, g.count(alg.init_sparsity))
            else:
                # ranks of a random permutation: uniform draws (torch.rand) from a generator
                # seeded like the global RNG that initialised the weights would repeat the
                # weights' own uniform draws, and keep each group's largest initial weights
                scores = torch.randperm(p.numel(), generator=generator).view(p.shape)
                mask = patterns.initial_mask(g, scores.to(p.device), g.count(alg.init_sparsity))
            masks.append(mask.contiguous())
        return masks

    def _existing_sparsity(
        self, options: dict[str, Any], algorithm: Algorithm | None
    ) -> dict[str, Any]:
        """With ``init="existing"``, the model's own sparsity starts the run and, unless
        given, is also the final one."""
        nnz = int(self._counts([self._space.local(p) for p in self.params]).sum())
        existing = sparsity_of(nnz, self._numel)
        given = options.get("init_sparsity", algorithm and algorithm.init_sparsity)
        if given is not None and abs(given - existing) > 1.0 / self._numel:
            raise ValueError(
                f"init_sparsity={given} contradicts init='existing': the weights are at "
                f"sparsity {existing:.6f}"
            )
        sparsity = options.get("sparsity", algorithm.sparsity if algorithm else existing)
        if sparsity < existing:
            raise ValueError(
                f"sparsity={sparsity} is below the model's existing sparsity {existing:.6f} "
                "(init='existing' never makes the network denser)"
            )
        return {**options, "sparsity": sparsity, "init_sparsity": existing}

    def _check_reachable(self, gradual: bool) -> None:
        """Refuse a schedule whose last topology round comes before it reaches the target."""
        alg = self.algorithm
        if not gradual:
            return
        last = self.cadence.last_update()
        if alg.sparsity_schedule is None:
            start, end = alg.window()
            every = alg.update_every
            needed = every * max(end // every, start // every + 1)
            if last is None or needed > last:
                raise ValueError(
                    f"the schedule never reaches sparsity={alg.sparsity}: its last pruning "
                    f"round would be step {needed}, but the last topology round is "
                    f"{'none' if last is None else f'step {last}'} of total_steps="
                    f"{alg.total_steps}; lower update_every ({every}) or prune_end "
                    f"({alg.prune_end})"
                )
        elif last is None or self.sparsity_schedule(last) < alg.sparsity - 1e-9:
            reached = alg.init_sparsity if last is None else self.sparsity_schedule(last)
            raise ValueError(
                f"sparsity_schedule reaches only {reached:g} by the last topology round, "
                f"not sparsity={alg.sparsity}"
            )

    def _claim(self) -> None:
        """Refuse tensors another live sparsifier holds, then hold ours."""
        for key in [k for k, (p, s) in _HELD.items() if p() is None or s() is None]:
            del _HELD[key]
        for _ in range(2):
            clash = [
                n
                for n, p in zip(self.names, self.params)
                if (e := _HELD.get(id(p))) and e[0]() is p and e[1]() not in (None, self)
            ]
            if not clash:
                break
            gc.collect()  # a dropped sparsifier may only await the cycle collector
        else:
            raise ValueError(
                f"another sparsifier already holds {', '.join(clash)}; call its remove() first"
            )
        me = weakref.ref(self)
        for p in self.params:
            _HELD[id(p)] = (weakref.ref(p), me)

    # ----------------------------------------------------------------- per step
    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # A fused optimizer under GradScaler is called even when the step is skipped for inf
        # gradients; it then sees ``found_inf``. Non-fused optimizers are simply not called.
        found_inf = getattr(optimizer, "found_inf", None)
        stepped = (found_inf is None or not bool(found_inf)) and not self._filler_step(optimizer)
        # tensors whose sparse-compute update touched only active entries need no mask multiply
        updated = self._compute.finish_step(stepped) if self._compute else set()
        if not stepped:
            return
        self.step += 1
        if self.step == 1 or self.cadence.is_update(self.step):
            self._check_current()
        for observe in self._observers:
            observe(self.params)
        if self.dynamic and self.step >= self._first_round and self.cadence.is_update(self.step):
            self.update_topology()
        else:
            self._apply(skip=updated)
        due = self._dense_grad_due()
        if self._compute:
            self._compute.dense_grad = due
        if self._comm:
            self._comm.dense = due

    def _filler_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether this step only made the optimizer's state: at learning rate 0 with gradients
        all zero, as ``torch.distributed.checkpoint.state_dict`` steps an optimizer that has no
        state yet; it moves nothing and is not counted (a real step has gradients)."""
        for group in optimizer.param_groups:
            lr = group.get("lr", 1.0)
            # torch's filler sets a float or a CPU tensor; a device tensor is not read (a sync)
            if (torch.is_tensor(lr) and lr.device.type != "cpu") or float(lr) != 0:
                return False
        grads = [p.grad for p in self.params]
        return all(g is None or not self._space.local(g).any() for g in grads)

    def _check_current(self) -> None:
        """Refuse to go on when the model's parameters are no longer the ones selected (the
        model was sharded by fully_shard after the sparsifier was built): the masks would be
        applied to tensors that no longer train."""
        now = {id(p) for p in self.model.parameters()}  # by identity: a wrapper may rename
        stale = [n for n, p in zip(self.names, self.params) if id(p) not in now]
        if stale:
            raise ValueError(
                f"the model's parameter {stale[0]!r} was replaced after the sparsifier was built "
                "(fully_shard applied later?); apply fully_shard first, then build the optimizer "
                "and the sparsifier"
            )

    def _dense_grad_due(self) -> bool:
        """Whether the next step needs the full dense gradient of every sparse tensor: a
        topology round follows it, or a score observes every step's gradients."""
        return bool(self._observers) or self.next_update() == self.step + 1

    def _targets(
        self, skip: set[int] = frozenset()
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Parameters and every optimizer-state tensor shaped like them, with their multipliers;
        none of the sparse tensors numbered in ``skip``.

        Rebuilt only when the masks change or the optimizer holds other state tensors (lazy
        state creation, ``optimizer.load_state_dict``, a tensor replaced in place of another) or
        the parameters change dtype. On CPU, where mixed-dtype multiplies are about 10x slower
        than same-dtype ones, the multipliers are copies of the masks in the tensor's dtype;
        elsewhere the bool masks.
        """
        state, local = self.optimizer.state, self._space.local
        key = (
            tuple(
                id(local(v))
                for p in self.params
                for v in (p, *state.get(p, {}).values())
                if torch.is_tensor(v)
            )
            + tuple(p.dtype for p in self.params)
            + tuple(sorted(skip))
        )
        cache = self._target_cache
        if cache is None or cache[0] != key:
            tensors, multipliers, copies = [], [], {}
            for i, (p, m) in enumerate(zip(self.params, self._masks)):
                if i in skip:
                    continue
                shaped = [v for v in state.get(p, {}).values() if torch.is_tensor(v)]
                for t in [p, *(v for v in shaped if v.shape == p.shape)]:
                    t = local(t)
                    if t.device.type == "cpu":
                        m_t = copies.setdefault((i, t.dtype), m.to(t.dtype))
                    else:
                        m_t = m
                    tensors.append(t)
                    multipliers.append(m_t)
            # the key's ids stay valid while the cache holds the tensors they name
            held = [local(v) for p in self.params for v in (p, *state.get(p, {}).values())]
            self._target_cache = (key, (tensors, multipliers), held)
        return self._target_cache[1]

    def _apply(self, skip: set[int] = frozenset()) -> None:
        apply_masks(*self._targets(skip))

    # ------------------------------------------------------------ update round
    def update_topology(self) -> None:
        """One round now, then check that every data-parallel rank holds the same masks."""
        self._round()
        self._verify()

    def _round(self) -> None:
        """(1) prune to the schedule's target, (2) drop and regrow, (3) apply the masks.

        The host never waits for the device here: counts only the device knows select by rank
        (:func:`top_mask`), the NaN guard takes effect on the device, and what the host needs
        (counts, ITOP bits, warnings) comes back asynchronously and is taken in by ``_settle``.
        """
        self._apply()
        self._settle()
        alg, step = self.algorithm, self.step
        local = self._locals()
        finite = torch.ones(len(local), dtype=torch.bool, device=self._masks[0].device)
        held = [i for i, t in enumerate(local) if t.numel()]  # a rank's shard may be empty
        if held:
            norms = torch._foreach_norm([local[i] for i in held], math.inf)
            finite[held] = torch.isfinite(torch.stack(norms)).to(finite.device)
        finite = self._space.everywhere(finite)
        ok = finite.all()  # a round on non-finite weights leaves the masks as they were
        masks = [m.clone() for m in self._masks]
        importance = [
            torch.where(m, s.float(), -math.inf)
            for m, s in zip(masks, self._scores(self.importance, masks))
        ]
        counts: list[int] | torch.Tensor = self._nnz
        # (1) gradual pruning; the pruned weights are zeroed at once (as in the reference), so
        # one that regrows in this same round restarts at zero with zero optimizer state
        target = self.sparsity_schedule(step)
        pruned_masks = None
        if target > alg.init_sparsity and self._groups is not None:
            new = [
                patterns.prune(g, m, imp, g.count(target))
                for g, m, imp in zip(self._groups, masks, importance)
            ]
            pruned_masks = new, torch.stack([m.count_nonzero() for m in new])
        elif target > alg.init_sparsity:
            pruned_masks = PRUNING[alg.pruning](importance, self._nnz, target, self._space)
        if pruned_masks is not None:
            new, counts = pruned_masks
            for m, n in zip(masks, new):
                m.copy_(n)
            self._commit(masks, ok)
        pruned = sum(self._nnz) - (counts.sum() if torch.is_tensor(counts) else sum(counts))
        if torch.is_tensor(counts) and self._reads_free:
            counts = counts.tolist()
        # (2) drop and regrow in each layer, keeping its count
        fraction = self.regrow_schedule(step)
        dropped: int | torch.Tensor = 0
        if fraction > 0:
            grow = self._scores(self.growth, masks)
            silent = [n for n, g in zip(self.names, grow) if g is None]
            if silent:
                self._warn(
                    f"skipped the regrowth at step {step}: the growth score gave no "
                    f"scores for {', '.join(silent)} (no gradient yet?)"
                )
            else:
                dropped = self._drop_and_regrow(masks, counts, fraction, importance, grow)
        # (3) apply
        self._commit(masks, ok)
        self._pending = (step, HostCopy([finite, counts, pruned, dropped, self._packed_masks()]))
        if self._reads_free:
            self._settle()

    def _scores(self, score: Any, masks: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """``score`` for every sparse tensor, with the documented context."""
        state, space = self.optimizer.state, self._space
        scores = [
            score(
                p.detach(),
                None if p.grad is None else p.grad.detach(),
                name=name,
                index=i,
                mask=space.view(m, i),
                state=state.get(p, {}),
                generator=self._generator(m.device),
                step=self.step,
            )
            for i, (name, p, m) in enumerate(zip(self.names, self.params, masks))
        ]
        # a score is this rank's part, or the whole tensor's (random draws, the same on every
        # rank) of which the part is taken
        return [None if s is None else space.part(s, i) for i, s in enumerate(scores)]

    def _commit(self, masks: Sequence[torch.Tensor], ok: torch.Tensor) -> None:
        """Make ``masks`` the sparsifier's (unless ``ok`` is False) and apply them."""
        for m, new in zip(self._masks, masks):
            m.copy_(torch.where(ok, new, m))
        self._target_cache = None
        if self._compute:
            self._compute.refresh(self._masks)
        if self._comm:
            self._comm.refresh(self._masks)
        self._apply()

    def _drop_and_regrow(
        self,
        masks: list[torch.Tensor],
        counts: list[int] | torch.Tensor,
        fraction: float,
        importance: Sequence[torch.Tensor],
        grow: Sequence[torch.Tensor],
    ) -> int | torch.Tensor:
        """In each layer, drop the ``ceil(fraction * count)`` lowest-importance active weights
        and regrow as many inactive positions with the highest growth score. Returns the number
        dropped. A weight dropped and regrown at once never left: it keeps value and state.
        Under a pattern the weights move within their groups
        (:func:`granet.patterns.drop_and_regrow`)."""
        if torch.is_tensor(counts):
            ks = (counts.double() * fraction).ceil().long()  # as math.ceil in double precision
            total = ks.sum()
        else:
            ks = [math.ceil(fraction * n) for n in counts]
            total = sum(ks)
        if self._groups is not None:
            dropped = []
            for m, k, imp, g, groups in zip(masks, ks, importance, grow, self._groups):
                new, n = patterns.drop_and_regrow(groups, m, k, imp, g)
                m.copy_(new)
                dropped.append(n)
            return torch.stack(dropped).sum()
        space = self._space
        drop = space.top([torch.where(m, -imp, -math.inf) for m, imp in zip(masks, importance)], ks)
        for m, d in zip(masks, drop):
            m &= ~d
        regrow = space.top([torch.where(m, -math.inf, g.float()) for m, g in zip(masks, grow)], ks)
        for m, r in zip(masks, regrow):
            m |= r
        return total

    def _settle(self) -> None:
        """Take in the last round's results: per-layer counts, statistics, ITOP bits."""
        if self._pending is None:
            return
        step, results = self._pending
        self._pending = None
        finite, counts, pruned, dropped, bits = results.result()
        if not finite.all():
            bad = [n for n, ok in zip(self.names, finite.tolist()) if not ok]
            self._warn(
                f"skipped the topology update at step {step}: non-finite weights in "
                f"{', '.join(bad)}"
            )
            return
        counts = counts.tolist() if torch.is_tensor(counts) else list(counts)
        self._warn_empty(
            [0 if old == 0 else n for old, n in zip(self._nnz, counts)], f"round at step {step}"
        )
        self._nnz = counts
        self._last_round = {"pruned": int(pruned), "dropped": int(dropped), "regrown": int(dropped)}
        self._ever_active.bitwise_or_(bits)

    def _warn(self, message: str) -> None:
        warnings.warn(f"granet: {message}", RuntimeWarning, stacklevel=5)

    def _warn_empty(self, counts: Sequence[int], when: str) -> None:
        empty = [n for n, c in zip(self.names, counts) if c == 0]
        if empty:
            self._warn(f"the {when} leaves no active weights in {', '.join(empty)}")

    def _verify(self) -> None:
        """Under torch.distributed, raise if the ranks' masks differ (see ``distributed.py``);
        ranks holding other shards must agree on the step, the settings and the random state
        that draws every rank's part alike."""
        if not self.verify_ranks:
            return
        if self._space.sharded:
            record = json.dumps(self.algorithm.record(), sort_keys=True, default=str)
            states = [g.get_state() for _, g in sorted(self._generators.items())]
            shared = {"step": self.step, "settings": record, "generators": states}
            verify_shared(shared, self._space.group, self._masks[0].device)
        if not (self._space.sharded and self._group is None):
            verify_agreement(self.names, self._masks, self._group)

    def _packed_masks(self) -> torch.Tensor:
        """All masks as one bit-packed array, on the masks' device."""
        return pack_bits(torch.cat([m.reshape(-1) for m in self._masks]))

    def _generator(self, device: torch.device) -> torch.Generator:
        if device.type not in self._generators:
            seed = self.algorithm.seed
            self._generators[device.type] = torch.Generator(device=device).manual_seed(seed)
        return self._generators[device.type]

    # ------------------------------------------------------------- reporting
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Parameter name -> bool mask (True = active); under FSDP2 a DTensor placed as its
        weight, of which this rank holds its shards' part."""
        return {n: self._space.view(m, i) for i, (n, m) in enumerate(zip(self.names, self._masks))}

    @property
    def last_round(self) -> dict[str, int]:
        """Weights pruned, dropped and regrown by the last topology round."""
        self._settle()
        return dict(self._last_round)

    def counts(self) -> list[int]:
        """Active weights per sparse tensor (over all ranks' shards), as last counted."""
        self._settle()
        return list(self._nnz)

    def sparsity(self) -> float:
        """Current global sparsity of the sparse layers (fraction of masked-out weights); refused
        when the tensors were replaced (it would not be true: :meth:`stats` asks it too)."""
        self._check_current()
        self._settle()
        return sparsity_of(sum(self._nnz), self._numel)

    def itop_rate(self) -> float:
        """Fraction of all sparse-layer weights that have been active at least once."""
        self._settle()
        ever = self._ever_bits().count_nonzero()
        return int(self._space.total(ever)) / self._numel

    def _ever_bits(self) -> torch.Tensor:
        return unpack_bits(self._ever_active, (sum(m.numel() for m in self._masks),))

    def next_update(self) -> int | None:
        """The step of the next topology round, or None when none is left."""
        if not self.dynamic:
            return None
        if self.step < self._first_round:
            first = self._first_round
            return first if self.cadence.is_update(first) else self.cadence.next_update(first)
        return self.cadence.next_update(self.step)

    def stats(self) -> dict[str, Any]:
        """A snapshot for logging: step, schedule, sparsity, ITOP rate, per-layer density and
        kernels."""
        self._settle()
        sparse = set(self._compute.sparse_layers()) if self._compute else set()
        return {
            "step": self.step,
            "next_update": self.next_update(),
            "sparsity": self.sparsity(),
            "target_sparsity": self.sparsity_schedule(self.step),
            "regrow_fraction": self.regrow_schedule(self.step),
            "itop_rate": self.itop_rate(),
            "last_round": self.last_round,
            "layers": {
                name: {
                    "density": density_of(n, p.numel()),
                    "nnz": n,
                    "numel": p.numel(),
                    "shape": list(p.shape),
                    "compute": "sparse" if name in sparse else "dense",
                }
                for name, p, n in zip(self.names, self.params, self._nnz)
            },
        }

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly, and what it belongs to (method, settings);
        masks are bit-packed (1 bit per weight). Loads with ``torch.load(weights_only=True)``."""
        self._settle()
        ever = self._ever_bits().split([m.numel() for m in self._masks])
        if self._space.sharded:  # each rank its shards' rows, which reshard as the weights do
            packed = {
                "masks": {
                    n: self._space.view(pack_rows(m), i)
                    for i, (n, m) in enumerate(zip(self.names, self._masks))
                },
                "ever_active": {
                    n: self._space.view(pack_rows(e.view(m.shape)), i)
                    for i, (n, e, m) in enumerate(zip(self.names, ever, self._masks))
                },
                "packing": "rows",
            }
        else:
            packed = {
                "masks": {n: pack_bits(m) for n, m in zip(self.names, self._masks)},
                "ever_active": {n: pack_bits(e) for n, e in zip(self.names, ever)},
            }
        return {
            "method": type(self).__name__,
            "settings": self.algorithm.record(),
            "step": self.step,
            **packed,
            "shapes": {n: list(p.shape) for n, p in zip(self.names, self.params)},
            "generators": {d: g.get_state() for d, g in self._generators.items()},
            "scores": {
                role: s.state_dict()
                for role, s in (("importance", self.importance), ("growth", self.growth))
                if hasattr(s, "state_dict")
            },
            "last_round": self.last_round,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. A state of another method or other settings, or with a
        missing or misshaped tensor, is refused with the difference named, and changes nothing.
        """
        _check_state(state, self.names)
        self._check_belongs(state)
        for name, p in zip(self.names, self.params):
            if name not in state["masks"]:
                raise ValueError(f"sparsifier state has no mask for {name!r}")
            saved = tuple(state["shapes"][name])
            if saved != tuple(p.shape):
                raise ValueError(
                    f"sparsifier state for {name!r} has shape {saved}, "
                    f"the model's is {tuple(p.shape)}"
                )
        extra = sorted(set(state["masks"]) - set(self.names))
        if extra:
            raise ValueError(f"sparsifier state has masks for unknown tensors: {extra}")
        rows = state.get("packing") == "rows"
        masks = [
            self._unpack(state["masks"][n], i, rows).to(m.device)
            for i, (n, m) in enumerate(zip(self.names, self._masks))
        ]
        ever = [
            self._unpack(state["ever_active"][n], i, rows).cpu().reshape(-1)
            for i, n in enumerate(self.names)
        ]
        # nothing below can fail on a well-formed state: only now does anything change
        self._masks = [m.clone() for m in masks]
        self._ever_active = pack_bits(torch.cat(ever))
        self._nnz = self._counts(self._masks).tolist()
        self._pending = None
        self.step = int(state["step"])
        self._last_round = dict(state["last_round"])
        here = {"cpu"} | {p.device.type for p in self.params}
        for device, gen_state in state["generators"].items():
            if device in here:  # a GPU run's generator is moot when resuming on CPU
                self._generator(torch.device(device)).set_state(gen_state)
        scores = state.get("scores", {"growth": state.get("growth", {})})
        for role, s in (("importance", self.importance), ("growth", self.growth)):
            if hasattr(s, "load_state_dict") and scores.get(role):
                s.load_state_dict(scores[role])
        self._masks_changed()

    def _masks_changed(self) -> None:
        """After masks set from outside a round: the kernels and the communication follow
        them, and the weights and optimizer state get them."""
        self._target_cache = None
        due = self._dense_grad_due()
        if self._compute:
            self._compute.refresh(self._masks)
            self._compute.dense_grad = due
        if self._comm:
            self._comm.refresh(self._masks)
            self._comm.dense = due
        self._apply()

    def _unpack(self, packed: torch.Tensor, index: int, rows: bool) -> torch.Tensor:
        """This rank's part of a saved mask: packed by rows (a sharded state, as DTensor or
        whole) or as one bit string (a state saved whole)."""
        space, shape = self._space, self.params[index].shape
        if rows and is_dtensor(packed):  # loaded by torch.distributed.checkpoint
            local = space.local(packed)
            return unpack_rows(local.cpu(), (local.shape[0], *shape[1:]))
        whole = unpack_rows(packed.cpu(), shape) if rows else unpack_bits(packed.cpu(), shape)
        return space.part(whole, index).contiguous()

    def _check_belongs(self, state: dict[str, Any]) -> None:
        """Raise if ``state`` was saved by another method or with other settings (states that
        predate the record are taken as they are)."""
        if "settings" not in state:
            return
        mine = {"method": type(self).__name__, **self.algorithm.record()}
        theirs = {"method": state.get("method"), **state["settings"]}
        differ = [
            f"{k}={theirs.get(k)!r} (here {mine.get(k)!r})"
            for k in mine
            if theirs.get(k) != mine[k] and (k not in OPTION or OPTION[k].affects_result)
        ]
        if differ:
            raise ValueError("sparsifier state belongs to another run: it has " + ", ".join(differ))

    def set_masks(self, masks: dict[str, torch.Tensor], *, step: int | None = None) -> None:
        """Make ``masks`` (name -> bool tensor, one per sparse tensor) the masks, e.g. those
        :mod:`granet.oneshot` pruned or regrew, and apply them to the weights and their
        optimizer state; the positions they hold count as explored (ITOP). With ``step`` the
        sparsifier starts over at that step from these masks, as a run continued from another's
        pruned checkpoint: they become its whole ITOP record. Bad input changes nothing. Every
        data-parallel rank must call it (the ranks' masks are checked to agree)."""
        if not isinstance(masks, dict) or set(masks) != set(self.names):
            given = sorted(masks) if isinstance(masks, dict) else type(masks).__name__
            raise ValueError(f"set_masks needs a mask for each of {self.names}; got {given}")
        for i, (name, p) in enumerate(zip(self.names, self.params)):
            m = masks[name]
            if not torch.is_tensor(m) or m.dtype != torch.bool or m.shape != p.shape:
                got = f"{m.dtype} {tuple(m.shape)}" if torch.is_tensor(m) else type(m).__name__
                raise ValueError(f"the mask for {name!r} must be bool {tuple(p.shape)}; got {got}")
            if self._groups is not None and patterns.violations(self._groups[i], m.to(p.device)):
                g = self._groups[i]
                raise ValueError(
                    f"the mask for {name!r} breaks pattern={self.algorithm.pattern!r}: more "
                    f"than {g.keep} active in some of its groups of {g.size}"
                )
        if step is not None:
            checks.integer("step", step, minimum=0)
        self._settle()
        for i, (m, name) in enumerate(zip(self._masks, self.names)):
            m.copy_(self._space.part(masks[name], i))  # under FSDP2 this rank's rows
        self._nnz = self._counts(self._masks).tolist()
        if step is None:
            self._ever_active.bitwise_or_(self._packed_masks().cpu())
        else:
            self.step, self._ever_active = step, self._packed_masks().cpu()
            self._last_round = {"pruned": 0, "dropped": 0, "regrown": 0}
        self._masks_changed()
        self._verify()

    def remove(self) -> None:
        """Detach from the optimizer and release the tensors; the weights keep their zeros."""
        self._hook.remove()
        if self._compute:
            self._compute.remove()
        if self._comm:
            self._comm.detach()
        for p in self.params:
            entry = _HELD.get(id(p))
            if entry is not None and entry[1]() is self:
                del _HELD[id(p)]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sparsity={self.sparsity():.4f}, step={self.step}, "
            f"layers={len(self.params)})"
        )


_STATE_DICTS = ("masks", "ever_active", "shapes", "generators", "last_round")


def _check_state(state: Any, names: Sequence[str]) -> None:
    """Refuse a :meth:`Sparsifier.state_dict` of the wrong form in one line (a ``ValueError``,
    not the ``KeyError`` or ``TypeError`` that reading it would meet), before anything
    changes: its parts' kinds, a step >= 0, and each sparse tensor's entries."""
    if not isinstance(state, dict):
        raise ValueError(f"sparsifier state must be a dict; got a {type(state).__name__}")
    missing = [k for k in ("step", *_STATE_DICTS) if k not in state]
    if missing:
        raise ValueError(f"sparsifier state has no {', '.join(missing)}")
    checks.integer("sparsifier state step", state["step"], minimum=0)
    for key in (*_STATE_DICTS, "settings"):
        if key in state and not isinstance(state[key], dict):
            raise ValueError(
                f"sparsifier state's {key} is a {type(state[key]).__name__}, not a dict"
            )
    if not all(torch.is_tensor(g) for g in state["generators"].values()):
        raise ValueError("sparsifier state's generators are not all tensors")
    for name in names:
        if name in state["masks"] and not (
            torch.is_tensor(state["masks"][name])
            and torch.is_tensor(state["ever_active"].get(name))
            and isinstance(state["shapes"].get(name), (list, tuple))
        ):
            raise ValueError(f"sparsifier state for {name!r} is incomplete or of the wrong kind")


def _score(spec: Any, registry: dict[str, Any], optimizer: torch.optim.Optimizer) -> Any:
    """A score given by name (built from ``registry``) or as a callable (used as is)."""
    return registry[spec](optimizer) if isinstance(spec, str) else spec
