"""The sparsifier: owns the masks, hooks ``optimizer.step`` and runs topology-update rounds.

A round reads like the algorithm (see DESIGN.md): gradual magnitude pruning to the cubic
schedule's target, then per-layer drop-and-regrow at the cosine-decayed rate, then the masks are
applied to the weights and to their optimizer state. Methods (GraNet, GMP, RigL, SET, SNFS,
Static) differ only in their defaults: see ``methods.py``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from granet.criteria import GROWTH, magnitude, make_growth
from granet.distributed import data_parallel_group, refuse_sharded, verify_agreement
from granet.distributions import DISTRIBUTIONS
from granet.masks import apply_masks, pack_bits, random_mask, top_mask, unpack_bits
from granet.readback import HostCopy
from granet.schedules import CosineDecay, CubicSparsity, UpdateCadence
from granet.selection import Rule, select_parameters, unwrap

PRUNING = ("global", "uniform")
MIN_REGROW_FRACTION = 0.005


def _steps(value: float | int, total: int, name: str) -> int:
    """A schedule point given as a fraction of ``total`` (float) or as a step count (int)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"{name} must be a float fraction of total_steps or an int step; got {value!r}"
        )
    if isinstance(value, float):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} as a fraction of total_steps must be in [0, 1]; got {value}")
        return round(value * total)
    if value < 0:
        raise ValueError(f"{name} as a step must be >= 0; got {value}")
    return value


class Sparsifier:
    """Sparse training attached to an unchanged training loop.

    Class attributes give each method its defaults; ``None`` for ``default_init_sparsity`` means
    "start at the final sparsity" (no gradual phase).
    """

    default_init_sparsity: float | None = None
    default_regrow_fraction: float = 0.5
    default_growth: str = "gradient"

    @classmethod
    def own_init_sparsity(cls, sparsity: float) -> float:
        """The initial sparsity this method starts from when none is given."""
        default = cls.default_init_sparsity
        return sparsity if default is None else min(default, sparsity)

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sparsity: float = 0.9,
        init_sparsity: float | None = None,
        total_steps: int | None = None,
        prune_start: float | int = 0.0,
        prune_end: float | int = 0.5,
        update_every: int = 1000,
        regrow_fraction: float | None = None,
        distribution: str = "erk",
        pruning: str = "global",
        growth: str | None = None,
        scale_init: bool = False,
        seed: int = 0,
        include: Sequence[Rule] | None = None,
        exclude: Sequence[Rule] = (),
        verify_ranks: bool = True,
    ) -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1); got {sparsity}")
        if init_sparsity is None:
            init_sparsity = self.own_init_sparsity(sparsity)
        if not 0.0 <= init_sparsity <= sparsity:
            raise ValueError(
                f"init_sparsity must be in [0, sparsity={sparsity}]; got {init_sparsity}"
            )
        if total_steps is None or isinstance(total_steps, bool) or total_steps < 1:
            raise ValueError(f"total_steps must be an int >= 1; got {total_steps!r}")
        start = _steps(prune_start, total_steps, "prune_start")
        end = _steps(prune_end, total_steps, "prune_end")
        if end <= start:
            raise ValueError(f"prune_end ({prune_end}) must come after prune_start ({prune_start})")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be an int >= 1; got {update_every!r}")
        if regrow_fraction is None:
            regrow_fraction = self.default_regrow_fraction
        if not 0.0 <= regrow_fraction <= 1.0:
            raise ValueError(f"regrow_fraction must be in [0, 1]; got {regrow_fraction}")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution must be one of {', '.join(DISTRIBUTIONS)}; got {distribution!r}"
            )
        if pruning not in PRUNING:
            raise ValueError(f"pruning must be one of {', '.join(PRUNING)}; got {pruning!r}")
        growth = self.default_growth if growth is None else growth
        if growth not in GROWTH:
            raise ValueError(f"growth must be one of {', '.join(GROWTH)}; got {growth!r}")

        refuse_sharded(model, optimizer)
        self.model = unwrap(model)
        self.verify_ranks = verify_ranks
        self._group = data_parallel_group(model)
        self.optimizer = optimizer
        chosen = select_parameters(self.model, include, exclude)
        if not chosen:
            raise ValueError(
                "no sparse tensors selected: include/exclude matched no parameter of the model"
            )
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        orphans = [name for name, p in chosen if id(p) not in held]
        if orphans:
            raise ValueError(f"the optimizer does not hold these sparse parameters: {orphans}")

        self.names = [name for name, _ in chosen]
        self.params = [p for _, p in chosen]
        self.final_sparsity = sparsity
        self.init_sparsity = init_sparsity
        self.total_steps = total_steps
        self.pruning = pruning
        self.distribution = distribution
        self.seed = seed
        self.growth = make_growth(growth, optimizer)
        self.cadence = UpdateCadence(update_every, total_steps)
        self.schedule = CubicSparsity(init_sparsity, sparsity, start, end, update_every)
        self.regrow = CosineDecay(
            regrow_fraction, min(regrow_fraction, MIN_REGROW_FRACTION), total_steps
        )
        self.dynamic = regrow_fraction > 0 or init_sparsity < sparsity
        self.step = 0
        self._last_round = {"pruned": 0, "dropped": 0, "regrown": 0}
        self._numel = sum(p.numel() for p in self.params)
        self._generators: dict[str, torch.Generator] = {}
        self._target_cache: tuple[Any, ...] | None = None

        densities = DISTRIBUTIONS[distribution](self.params, 1.0 - init_sparsity)
        counts = [min(round(d * p.numel()), p.numel()) for p, d in zip(self.params, densities)]
        cpu = self._generator(torch.device("cpu"))
        self._masks = [
            random_mask(p.shape, n, cpu).to(p.device) for p, n in zip(self.params, counts)
        ]
        self._nnz = counts  # per layer, as the host last read them
        if scale_init:
            # Evci et al. (2022): the dense initialisation scaled for the sparse fan-in keeps
            # each layer's output variance; unscaled, a very sparse deep net can start with a
            # signal too small to learn from.
            with torch.no_grad():
                gains = [math.sqrt(p.numel() / max(n, 1)) for p, n in zip(self.params, counts)]
                torch._foreach_mul_(self.params, gains)
        # Weights active at least once, one bit each over all sparse layers in order; in host
        # memory, so that on a GPU the device holds only the bool masks.
        self._ever_active = self._packed_masks().cpu()
        # Where reading device values back costs the host nothing, a round's results are taken
        # in at once; elsewhere at the next round or report (see ``_settle``).
        self._reads_free = all(p.device.type == "cpu" for p in self.params)
        self._pending: tuple[int, int, HostCopy] | None = None
        self._apply()
        self._verify()
        self._hook = optimizer.register_step_post_hook(self._on_step)

    # ----------------------------------------------------------------- per step
    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # A fused optimizer under GradScaler is called even when the step is skipped for inf
        # gradients; it then sees ``found_inf``. Non-fused optimizers are simply not called.
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            return
        self.step += 1
        self.growth.after_step(self.params)
        if self.dynamic and self.cadence.is_update(self.step):
            self.update_topology()
        else:
            self._apply()

    def _targets(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Parameters and every optimizer-state tensor shaped like them, with their multipliers.

        Rebuilt only when the masks change or the optimizer's state dict object or size changes
        (lazy state creation, ``optimizer.load_state_dict``): the per-step path does no Python
        work. On CPU, where mixed-dtype multiplies are about 10x slower than same-dtype ones,
        the multipliers are copies of the masks in the tensor's dtype; elsewhere the bool masks.
        """
        state = self.optimizer.state
        cache = self._target_cache
        if cache is None or cache[0] is not state or cache[1] != len(state):
            tensors, multipliers, copies = [], [], {}
            for i, (p, m) in enumerate(zip(self.params, self._masks)):
                shaped = [v for v in state.get(p, {}).values() if torch.is_tensor(v)]
                for t in [p, *(v for v in shaped if v.shape == p.shape)]:
                    if t.device.type == "cpu":
                        m_t = copies.setdefault((i, t.dtype), m.to(t.dtype))
                    else:
                        m_t = m
                    tensors.append(t)
                    multipliers.append(m_t)
            self._target_cache = (state, len(state), (tensors, multipliers))
        return self._target_cache[2]

    def _apply(self) -> None:
        apply_masks(*self._targets())

    # ------------------------------------------------------------ update round
    def update_topology(self) -> None:
        """One round now, then check that every data-parallel rank holds the same masks."""
        self._round()
        self._verify()

    def _round(self) -> None:
        """Prune to the schedule, drop and regrow, apply the masks.

        The host never waits for the device here: counts only the device knows select by rank
        (:func:`top_mask`), the NaN guard takes effect on the device, and what the host needs
        (counts, ITOP bits, warnings) comes back asynchronously and is taken in by ``_settle``.
        """
        self._apply()
        self._settle()
        fraction = self.regrow(self.step)
        reason = self.growth.missing(self.params, self.names) if fraction > 0 else None
        if reason is not None:
            self._warn_skipped(self.step, reason)
            return
        finite = torch.isfinite(torch.stack(torch._foreach_norm(self.params, math.inf)))
        masks = [m.clone() for m in self._masks]
        counts: list[int] | torch.Tensor = self._nnz
        pruned = 0
        if self.schedule.prunes_at(self.step):
            keep = round((1.0 - self.schedule(self.step)) * self._numel)
            if keep < sum(self._nnz):
                counts = self._prune(masks, keep)
                pruned = sum(self._nnz) - keep
        if torch.is_tensor(counts) and self._reads_free:
            counts = counts.tolist()
        dropped = self._drop_and_regrow(masks, counts, fraction) if fraction > 0 else 0
        ok = finite.all()  # a round on non-finite weights leaves the masks as they were
        for m, new in zip(self._masks, masks):
            m.copy_(torch.where(ok, new, m))
        self._target_cache = None  # the masks changed
        self._apply()
        self._pending = (
            self.step,
            pruned,
            HostCopy([finite, counts, dropped, self._packed_masks()]),
        )
        if self._reads_free:
            self._settle()

    def _settle(self) -> None:
        """Take in the last round's results: per-layer counts, statistics, ITOP bits."""
        if self._pending is None:
            return
        step, pruned, results = self._pending
        self._pending = None
        finite, counts, dropped, bits = results.result()
        if not finite.all():
            bad = [n for n, ok in zip(self.names, finite.tolist()) if not ok]
            self._warn_skipped(step, f"non-finite weights in {', '.join(bad)}")
            return
        self._nnz = counts.tolist() if torch.is_tensor(counts) else counts
        dropped = int(dropped)
        self._last_round = {"pruned": pruned, "dropped": dropped, "regrown": dropped}
        self._ever_active.bitwise_or_(bits)

    def _warn_skipped(self, step: int, reason: str) -> None:
        warnings.warn(
            f"granet: skipped the topology update at step {step}: {reason}",
            RuntimeWarning,
            stacklevel=4,
        )

    def _verify(self) -> None:
        """Under torch.distributed, raise if the ranks' masks differ (see ``distributed.py``)."""
        if self.verify_ranks:
            verify_agreement(self.names, self._masks, self._group)

    def _packed_masks(self) -> torch.Tensor:
        """All masks as one bit-packed array, on the masks' device."""
        return pack_bits(torch.cat([m.reshape(-1) for m in self._masks]))

    def _prune(self, masks: list[torch.Tensor], keep: int) -> list[int] | torch.Tensor:
        """Keep the ``keep`` largest active weights of ``masks`` (globally or per layer); the
        per-layer counts this leaves (after global pruning, on the device)."""
        scores = [torch.where(m, magnitude(p).float(), -1.0) for p, m in zip(self.params, masks)]
        if self.pruning == "global":
            flat = top_mask(torch.cat([s.reshape(-1) for s in scores]), keep)
            new = list(flat.split([p.numel() for p in self.params]))
            counts = torch.stack([n.count_nonzero() for n in new])
        else:
            counts = self._uniform_counts(keep)
            new = [top_mask(s, k) for s, k in zip(scores, counts)]
        for m, n in zip(masks, new):
            m.copy_(n.view(m.shape))
        return counts

    def _uniform_counts(self, keep: int) -> list[int]:
        """Per-layer counts at one common keep rate, summing to ``keep`` (largest remainders)."""
        rate = keep / sum(self._nnz)
        exact = [rate * n for n in self._nnz]
        counts = [math.floor(x) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda i: counts[i] - exact[i])
        for i in by_remainder[: keep - sum(counts)]:
            counts[i] += 1
        return counts

    def _drop_and_regrow(
        self, masks: list[torch.Tensor], counts: list[int] | torch.Tensor, fraction: float
    ) -> int | torch.Tensor:
        """In each layer, drop ``ceil(fraction * count)`` smallest active weights and regrow as
        many inactive positions with the highest growth score. Returns the number dropped."""
        if torch.is_tensor(counts):
            ks = (counts.double() * fraction).ceil().long()  # as math.ceil in double precision
            total = ks.sum()
        else:
            ks = [math.ceil(fraction * n) for n in counts]
            total = sum(ks)
        for i, (p, m, k) in enumerate(zip(self.params, masks, ks)):
            mask = m.view(-1)
            mask &= ~top_mask(torch.where(mask, -magnitude(p).reshape(-1).float(), -math.inf), k)
            grow = self.growth.scores(i, p, self._generator(p.device)).reshape(-1).float()
            mask |= top_mask(torch.where(mask, -math.inf, grow), k)
        return total

    def _generator(self, device: torch.device) -> torch.Generator:
        if device.type not in self._generators:
            self._generators[device.type] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device.type]

    # ------------------------------------------------------------- reporting
    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Parameter name -> bool mask (True = active)."""
        return dict(zip(self.names, self._masks))

    @property
    def last_round(self) -> dict[str, int]:
        """Weights pruned, dropped and regrown by the last topology round."""
        self._settle()
        return dict(self._last_round)

    def sparsity(self) -> float:
        """Current global sparsity of the sparse layers (fraction of masked-out weights)."""
        self._settle()
        return 1.0 - sum(self._nnz) / self._numel

    def itop_rate(self) -> float:
        """Fraction of all sparse-layer weights that have been active at least once."""
        self._settle()
        return int(self._ever_bits().count_nonzero()) / self._numel

    def _ever_bits(self) -> torch.Tensor:
        return unpack_bits(self._ever_active, (self._numel,))

    def stats(self) -> dict[str, Any]:
        """A snapshot for logging: step, schedule, sparsity, ITOP rate, per-layer density."""
        self._settle()
        nxt = self.cadence.next_update(self.step) if self.dynamic else None
        return {
            "step": self.step,
            "next_update": nxt,
            "sparsity": self.sparsity(),
            "target_sparsity": self.schedule(self.step),
            "regrow_fraction": self.regrow(self.step),
            "itop_rate": self.itop_rate(),
            "last_round": self.last_round,
            "layers": {
                name: {
                    "density": n / p.numel(),
                    "nnz": n,
                    "numel": p.numel(),
                    "shape": list(p.shape),
                }
                for name, p, n in zip(self.names, self.params, self._nnz)
            },
        }

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; masks are bit-packed (1 bit per weight)."""
        self._settle()
        ever = self._ever_bits().split([p.numel() for p in self.params])
        return {
            "step": self.step,
            "masks": {n: pack_bits(m) for n, m in zip(self.names, self._masks)},
            "ever_active": {n: pack_bits(e) for n, e in zip(self.names, ever)},
            "shapes": {n: list(p.shape) for n, p in zip(self.names, self.params)},
            "generators": {d: g.get_state() for d, g in self._generators.items()},
            "growth": self.growth.state_dict(),
            "last_round": self.last_round,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a missing or differently shaped tensor is named."""
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
        ever = []
        for i, (name, p) in enumerate(zip(self.names, self.params)):
            self._masks[i] = unpack_bits(state["masks"][name].to(p.device), p.shape)
            ever.append(unpack_bits(state["ever_active"][name].cpu(), p.shape).reshape(-1))
        self._ever_active = pack_bits(torch.cat(ever))
        self._nnz = torch.stack([m.count_nonzero() for m in self._masks]).tolist()
        self._pending = None
        self.step = int(state["step"])
        self._last_round = dict(state["last_round"])
        here = {"cpu"} | {p.device.type for p in self.params}
        for device, gen_state in state["generators"].items():
            if device in here:  # a GPU run's generator is moot when resuming on CPU
                self._generator(torch.device(device)).set_state(gen_state)
        self.growth.load_state_dict(state["growth"])
        self._target_cache = None
        self._apply()

    def remove(self) -> None:
        """Detach from the optimizer; the weights keep their zeros."""
        self._hook.remove()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(sparsity={self.sparsity():.4f}, step={self.step}, "
            f"layers={len(self.params)})"
        )
