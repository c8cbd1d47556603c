"""Where each rank's part of a sparse tensor lies, and exact top-k selections over the parts.

A topology round ranks scores and keeps the k best: per layer (drop and regrow, uniform pruning)
or over all layers at once (global pruning). :class:`Whole` does this for tensors that one process
holds whole (one process, or DDP replicas); :class:`Shards` for weights that FSDP2
(``fully_shard``) splits by rows across the ranks of a mesh dimension, each rank holding the masks
of its own shards only. Both select the same entries: the k largest scores, ties at the k-th value
going to the earliest positions (layer order, then row-major index). A sharded round therefore
makes exactly the masks that one process makes from the same scores.

The sharded selection never gathers scores. It finds the k-th largest value by radix selection on
the scores' bit patterns: in each pass every rank counts its remaining candidates in 256 bins of
the next 8 bits, and one all-reduce of a ``[selections, 256]`` table adds the counts up (4 passes
for float32 scores, 8 for float64). The ties at that value are then shared out in position order
by one all-gather of a count per rank and layer.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from granet.masks import top_mask
from granet.trees import tree_map

_DIGIT = 8  # bits per radix pass
_BINS = 1 << _DIGIT
_SIGN = -(2**63)  # int64's sign bit


class Whole:
    """Tensors that this process holds whole: local parts are the tensors themselves."""

    sharded = False

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.numels = [p.numel() for p in params]

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's part of a parameter, gradient or optimizer-state tensor."""
        return tensor

    def part(self, tensor: torch.Tensor, index: int) -> torch.Tensor:
        """This rank's part of a score or mask of sparse tensor ``index``, given whole or as
        its part."""
        return tensor

    def view(self, mask: torch.Tensor, index: int) -> torch.Tensor:
        """The local mask of sparse tensor ``index`` shaped as its weight is (whole here)."""
        return mask

    def total(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks that split the tensors (no-op here)."""
        return values

    def everywhere(self, flags: torch.Tensor) -> torch.Tensor:
        """``flags`` that hold on every rank that splits the tensors (no-op here)."""
        return flags

    def top(
        self, scores: Sequence[torch.Tensor], ks: Sequence[int] | torch.Tensor
    ) -> list[torch.Tensor]:
        """For each tensor, a bool mask of its ``ks[i]`` largest scores."""
        return [top_mask(s, k).view(s.shape) for s, k in zip(scores, ks)]

    def top_joint(self, scores: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
        """Bool masks of the ``k`` largest scores over all tensors together."""
        flat = top_mask(torch.cat([s.reshape(-1) for s in scores]), k)
        return [m.view(s.shape) for m, s in zip(flat.split([s.numel() for s in scores]), scores)]


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter that FSDP2 shards, for one). Looked up
    among the modules already imported: no tensor can be a DTensor before its module is, and
    importing it only to look would cost a second."""
    module = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(module, "DTensor", None)
    return dtensor is not None and isinstance(tensor, dtensor)


class Shards(Whole):
    """Weights sharded by rows over one dimension of a device mesh (FSDP2's ``Shard(0)``),
    replicated over any other (HSDP). All sparse tensors must share the mesh and placements."""

    sharded = True

    def __init__(self, names: Sequence[str], params: Sequence[torch.Tensor]) -> None:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        first = params[0]
        mesh, placements = first.device_mesh, tuple(first.placements)
        for name, p in zip(names, params):
            if not is_dtensor(p) or p.device_mesh != mesh or tuple(p.placements) != placements:
                raise ValueError(
                    f"granet needs every sparse tensor sharded alike by fully_shard: "
                    f"{name!r} is {_describe(p)}, {names[0]!r} is {_describe(first)}; apply "
                    "fully_shard to the model (and its blocks) before building the optimizer "
                    "and the sparsifier"
                )
        shard_dims = [d for d, pl in enumerate(placements) if pl.is_shard()]
        others = [pl for pl in placements if not (pl.is_shard() or pl.is_replicate())]
        if len(shard_dims) != 1 or others or placements[shard_dims[0]].dim != 0:
            raise ValueError(
                f"granet supports weights sharded by rows over one mesh dimension (FSDP2's "
                f"Shard(0), optionally replicated: HSDP); {names[0]!r} has placements "
                f"{placements} (tensor parallelism and other layouts are not supported)"
            )
        replicate_dims = [d for d, pl in enumerate(placements) if pl.is_replicate()]
        if len(replicate_dims) > 1:
            raise ValueError(
                f"granet supports at most one replicated mesh dimension; {names[0]!r} has "
                f"placements {placements}"
            )
        self.mesh, self.placements = mesh, placements
        self.group = mesh.get_group(shard_dims[0])
        self.replicas = mesh.get_group(replicate_dims[0]) if replicate_dims else None
        self.numels = [p.numel() for p in params]
        self.shapes = [tuple(p.shape) for p in params]
        self.local_shapes, starts = [], []
        for p in params:
            shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
            self.local_shapes.append(tuple(shape))
            starts.append(offset[0] * math.prod(p.shape[1:]) if p.dim() else 0)
        self.starts = starts
        # every rank's start of every tensor, to share ties out in position order: [ranks,
        # tensors], True where that rank's part lies before ours (on the weights' device, where
        # the group reduces: the CPU for gloo, the GPU for NCCL)
        mine = torch.tensor(starts, dtype=torch.int64, device=self.local(first).device)
        self._earlier = self._gather(mine) < mine

    def _gather(self, row: torch.Tensor) -> torch.Tensor:
        """Every rank's ``row`` (of this rank's shard group), as ``[ranks, len(row)]``."""
        out = row.new_empty(dist.get_world_size(self.group) * row.numel())
        dist.all_gather_single(out, row, group=self.group)
        return out.view(-1, row.numel())

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        if is_dtensor(tensor):
            with torch.no_grad():  # then the very local tensor, not a differentiable view
                return tensor.to_local()
        return tensor

    def part(self, tensor: torch.Tensor, index: int) -> torch.Tensor:
        if is_dtensor(tensor):
            return self.local(tensor)
        shape = self.local_shapes[index]
        if tuple(tensor.shape) == shape:
            return tensor
        start = self.starts[index]
        return tensor.reshape(-1)[start : start + math.prod(shape)].view(shape)

    def view(self, mask: torch.Tensor, index: int) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        shape = self.shapes[index]
        stride = tuple(math.prod(shape[d + 1 :]) for d in range(len(shape)))
        return DTensor.from_local(
            mask, self.mesh, self.placements, run_check=False, shape=shape, stride=stride
        )

    def total(self, values: torch.Tensor) -> torch.Tensor:
        values = values.clone()
        dist.all_reduce(values, group=self.group)
        return values

    def everywhere(self, flags: torch.Tensor) -> torch.Tensor:
        low = flags.to(torch.int32)
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.group)
        return low.bool()

    def top(
        self, scores: Sequence[torch.Tensor], ks: Sequence[int] | torch.Tensor
    ) -> list[torch.Tensor]:
        return self._select(scores, [[i] for i in range(len(scores))], ks)

    def top_joint(self, scores: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
        return self._select(scores, [list(range(len(scores)))], [k])

    def _select(
        self,
        scores: Sequence[torch.Tensor],
        pools: list[list[int]],
        ks: Sequence[int] | torch.Tensor,
    ) -> list[torch.Tensor]:
        """In each pool of tensors, the ``ks[pool]`` largest scores over all ranks' parts."""
        device = scores[0].device
        wide = any(s.dtype == torch.float64 for s in scores)
        bits = 64 if wide else 32
        keys = [_ordered_keys(s.reshape(-1), wide) for s in scores]
        pool_of = {i: p for p, members in enumerate(pools) for i in members}
        sizes = torch.tensor(
            [sum(self.numels[i] for i in members) for members in pools], device=device
        )
        k = torch.as_tensor(ks, dtype=torch.int64, device=device).clamp(min=0)
        k = torch.minimum(k, sizes)
        wanted = k.clamp(min=1)  # rank to find in each pool; empty selections fixed at the end
        chosen = torch.zeros(len(pools), dtype=torch.int64, device=device)
        for shift in range(bits - _DIGIT, -1, -_DIGIT):
            counts = torch.zeros(len(pools), _BINS, dtype=torch.int64, device=device)
            for i, key in enumerate(keys):
                p = pool_of[i]
                digit = (key >> shift) & (_BINS - 1)
                if shift + _DIGIT < bits:  # only keys that share the digits chosen so far
                    live = (key >> (shift + _DIGIT)) == (chosen[p] >> (shift + _DIGIT))
                else:
                    live = torch.ones_like(digit, dtype=torch.bool)
                counts[p].scatter_add_(0, digit, live.long())
            dist.all_reduce(counts, group=self.group)
            at_least = counts.flip(1).cumsum(1).flip(1)  # [pool, b]: live keys with digit >= b
            digit = (at_least >= wanted[:, None]).sum(1) - 1
            above = (
                at_least.gather(1, digit[:, None])[:, 0] - counts.gather(1, digit[:, None])[:, 0]
            )
            wanted = wanted - above
            chosen = chosen | (digit << shift)
        # ``chosen`` is the k-th largest key; ``wanted`` of the keys equal to it are taken,
        # earliest first: earlier tensors of the pool, then earlier ranks, then local order
        ties = [key == chosen[pool_of[i]] for i, key in enumerate(keys)]
        flip = _SIGN if wide else 0  # back to signed order for comparisons
        threshold = chosen ^ flip
        mine = torch.stack([t.sum() for t in ties])
        every = self._gather(mine)
        before_rank = (every * self._earlier).sum(0)  # per tensor: ties on earlier ranks
        per_tensor = every.sum(0)
        masks, pool_ties = [], torch.zeros(len(pools), dtype=torch.int64, device=device)
        for i, (key, tie) in enumerate(zip(keys, ties)):
            p = pool_of[i]
            take = wanted[p] - pool_ties[p] - before_rank[i]
            pool_ties[p] += per_tensor[i]
            mask = ((key ^ flip) > threshold[p]) | (tie & (tie.cumsum(0) <= take))
            mask = torch.where(k[p] == 0, False, torch.where(k[p] >= sizes[p], True, mask))
            masks.append(mask.view(scores[i].shape))
        return masks


def _ordered_keys(scores: torch.Tensor, wide: bool) -> torch.Tensor:
    """int64 keys whose unsigned order (of their low 32 or all 64 bits) is the scores' order;
    -0.0 and +0.0 get the same key, as they compare equal, and NaN ranks as +inf, as in
    :func:`~granet.masks.top_mask`."""
    scores = scores.nan_to_num(math.inf, math.inf, -math.inf)
    if wide:
        bits = (scores.double() + 0.0).view(torch.int64)
        signed = torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
        return signed ^ _SIGN  # the sign bit flipped: unsigned order
    bits = (scores.float() + 0.0).view(torch.int32).long()
    signed = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return signed + 0x80000000


def _describe(p: torch.Tensor) -> str:
    if not is_dtensor(p):
        return "a plain tensor"
    return f"a DTensor with placements {tuple(p.placements)} on mesh {p.device_mesh}"


def gather(tree: Any) -> Any:
    """``tree`` (dicts, lists, tuples of tensors and values) with every DTensor replaced by the
    whole tensor on the CPU; a collective: every rank of the DTensors' mesh must call it."""
    return tree_map(lambda v: v.full_tensor().cpu() if is_dtensor(v) else v, tree)


def distribute_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole ``tensor`` placed as ``like`` is: this rank's part of it as a DTensor when
    ``like`` is one (each rank cuts its own part; nothing is sent), else ``tensor`` itself."""
    if not is_dtensor(like) or is_dtensor(tensor):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    local = like.to_local()
    return distribute_tensor(
        tensor.to(local.device, local.dtype),
        like.device_mesh,
        like.placements,
        src_data_rank=None,
    )
