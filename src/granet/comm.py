"""Data-parallel gradient exchange in proportion to density: a DDP communication hook.

DDP all-reduces whole gradient tensors, so a 98%-sparse network sends as many bytes per step as
the dense one. Every rank holds the same masks (``distributed.verify_agreement`` checks it), so
every rank knows the same active positions: the active entries of a gradient bucket can be
packed into one vector, all-reduced and scattered back, with no exchange of indices and no loss.
The inactive entries come back as zeros; the sparsifier multiplies weights and optimizer state
at those positions by zero after every step, so what the optimizer would have written there with
the dense average is discarded anyway.

The full dense average is needed, and sent, on the steps whose gradient a score reads at
inactive positions: the step before a topology round (gradient growth), and every step when a
score keeps state from every step's gradient (SNFS's momentum). The sparsifier says which steps
those are through :attr:`CompactAllReduce.dense`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

COMMUNICATION: dict[str, str] = {
    "auto": "compact for the buckets that gain from it",
    "compact": "only the active entries, but on the steps that need the dense average",
    "dense": "DDP's own all-reduce of whole tensors",
}
# auto sends a bucket compact when at most this fraction of its entries is exchanged (active
# sparse entries plus dense parameters). Measured on CPU/gloo (docs/benchmarks.md, section 7):
# over loopback, packing and sending break even near a fifth; over a network sending costs more.
AUTO_MAX_FRACTION = 0.2


def existing_hook(ddp: nn.parallel.DistributedDataParallel) -> str | None:
    """The name of a communication hook registered on ``ddp`` that is in use, or None (none, or
    granet's own left by a removed sparsifier)."""
    hooks = getattr(ddp, "_comm_hooks", [])
    if hooks:
        state = hooks[0][1]
        if isinstance(state, CompactAllReduce):
            return "granet's, of another live sparsifier" if state.attached else None
        return getattr(hooks[0][0], "__qualname__", repr(hooks[0][0]))
    logged = ddp._get_ddp_logging_data().get("comm_hook")  # builtin hooks are only logged
    return logged or None


def refuse_other_hook(mode: str, ddp: nn.parallel.DistributedDataParallel) -> str | None:
    """Raise ValueError if ``mode`` is ``"compact"`` and another hook is in use on ``ddp``;
    return that hook's name (None if there is none)."""
    other = existing_hook(ddp)
    if other is not None and mode == "compact":
        raise ValueError(
            f"communication='compact' needs DDP's communication hook, but {other!r} is already "
            "registered (DDP takes one); register none, or pass communication='dense' to keep it"
        )
    return other


class CompactAllReduce:
    """The state of granet's DDP communication hook for one sparsifier's masks.

    Per bucket, a flat index of the entries exchanged (the active entries of sparse tensors, every
    entry of the others) is built at the bucket's first use and again after every mask change
    (:meth:`refresh`). The bucket layout is checked by parameter identity on every call, since
    DDP rebuilds its buckets after the first iteration.
    """

    def __init__(
        self,
        mode: str,
        ddp: nn.parallel.DistributedDataParallel,
        params: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
    ) -> None:
        self.mode = mode
        self.group = ddp.process_group
        self.world = dist.get_world_size(self.group)
        self.dense = True  # the next step needs the full dense average
        self.attached = False
        self._sparse: dict[int, int] = {}
        self._masks: Sequence[torch.Tensor] = ()
        self._plans: dict[int, tuple[tuple[int, ...], torch.Tensor | None]] = {}
        self.attach(params, masks)

    @classmethod
    def install(
        cls,
        mode: str,
        ddp: nn.parallel.DistributedDataParallel,
        params: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
    ) -> CompactAllReduce | None:
        """Register the hook on ``ddp`` (or take over granet's own, left by a removed sparsifier).

        A hook the user registered stays: ``mode="compact"`` is refused with a ValueError,
        ``"auto"`` warns and leaves the exchange to that hook.
        """
        other = refuse_other_hook(mode, ddp)
        if other is not None:
            warnings.warn(
                f"granet: the DDP communication hook {other!r} is kept, so gradients are "
                "all-reduced dense; communication='dense' silences this",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        for _, state in getattr(ddp, "_comm_hooks", []):
            if isinstance(state, CompactAllReduce):  # a removed sparsifier's: DDP takes one hook
                state.mode = mode
                state.attach(params, masks)
                return state
        state = cls(mode, ddp, params, masks)
        ddp.register_comm_hook(state, _hook)
        return state

    def attach(self, params: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
        """Follow these sparse tensors and their masks."""
        self._sparse = {id(p): i for i, p in enumerate(params)}
        self.attached = True
        self.refresh(masks)

    def detach(self) -> None:
        """Send every bucket dense from now on (DDP cannot unregister a hook)."""
        self._sparse, self._masks, self._plans = {}, (), {}
        self.attached, self.dense = False, True

    def refresh(self, masks: Sequence[torch.Tensor]) -> None:
        """The masks changed: rebuild every bucket's index at its next use."""
        self._masks = masks
        self._plans.clear()

    def reduce(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """All-reduce ``bucket`` (averaged over the ranks, as DDP does); compact unless the
        step needs the dense average or the bucket gains nothing from packing."""
        buffer = bucket.buffer()
        index = None if self.dense else self._index(bucket)
        if index is None:
            buffer.div_(self.world)
            work = dist.all_reduce(buffer, group=self.group, async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])
        values = buffer.index_select(0, index).div_(self.world)
        work = dist.all_reduce(values, group=self.group, async_op=True)

        def scatter(fut: torch.futures.Future) -> torch.Tensor:
            buffer.zero_()
            return buffer.index_copy_(0, index, fut.value()[0])

        return work.get_future().then(scatter)

    def _index(self, bucket: dist.GradBucket) -> torch.Tensor | None:
        """The flat positions of ``bucket`` exchanged compact, or None to send it whole."""
        params = bucket.parameters()
        key = tuple(id(p) for p in params)
        plan = self._plans.get(bucket.index())
        if plan is None or plan[0] != key:
            plan = (key, self._build(params, bucket.buffer()))
            self._plans[bucket.index()] = plan
        return plan[1]

    def _build(self, params: Sequence[torch.Tensor], buffer: torch.Tensor) -> torch.Tensor | None:
        pieces, offset, sparse = [], 0, False
        for p in params:
            n, i = p.numel(), self._sparse.get(id(p))
            if i is None:
                pieces.append(torch.arange(offset, offset + n, device=buffer.device))
            else:
                sparse = True
                active = self._masks[i].reshape(-1).nonzero().squeeze(1)
                pieces.append(active.to(buffer.device) + offset)
            offset += n
        if not sparse or offset != buffer.numel():  # nothing to gain, or an unknown layout
            return None
        index = torch.cat(pieces)
        if self.mode == "auto" and index.numel() > AUTO_MAX_FRACTION * buffer.numel():
            return None
        return index


def _hook(state, bucket):  # noqa: ANN001, ANN202 - DDP refuses string annotations here
    return state.reduce(bucket)
