"""The building blocks of a run, each a function of its settings: the device, the optimizer, the
sparsifier, the learning-rate factor of a step, each epoch's batches, the data set, evaluation,
and the check that a schedule reaches its target sparsity. The trainer, the sweep and the
plasticity study build from them.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

import granet
from granet.experiment import parallel
from granet.experiment.config import Config
from granet.experiment.datasets import DataBundle, load_dataset

AMP_DTYPES = {"none": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_TYPES = ("cpu", "cuda", "mps")


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU; otherwise ``cpu``, ``cuda``, ``cuda:N``
    (a GPU this machine has) or ``mps``. Under torchrun with several processes, each process's
    GPU is ``cuda:LOCAL_RANK``. Anything else is a ``ValueError`` naming the setting."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps; got {name!r}")
    if device.type == "cpu" and device.index not in (None, 0):
        raise ValueError(f"device {name!r}: the CPU has no device {device.index}; use cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available here")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device {name!r} asked for, but this machine has {count} CUDA device(s): "
                f"cuda:0 to cuda:{count - 1}"
            )
    ranks = parallel.current()
    if device.type == "cuda" and ranks.world > 1:
        if device.index is not None:
            raise ValueError(
                f"under torchrun each process uses cuda:LOCAL_RANK; use --device cuda or auto, "
                f"not {name!r}"
            )
        device = torch.device("cuda", ranks.local)
    return device


def make_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum (the paper's), or AdamW."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def make_sparsifier(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Config,
    total_steps: int,
    options: Mapping[str, Any] | None = None,
) -> granet.Sparsifier | None:
    """The config's sparsifier on ``model`` over ``total_steps`` steps (None for ``dense``);
    ``options`` go on top of the config's (those a file cannot hold: a callable score)."""
    if config.method == "dense":
        return None
    return granet.sparsify(
        model,
        optimizer,
        config.method,
        total_steps=total_steps,
        exclude=tuple(config.exclude),
        **{**config.sparsifier_options(), **(options or {})},
    )


def lr_factor(step: int, total_steps: int, steps_per_epoch: int, config: Config) -> float:
    """Multiplier of the base LR for optimizer step ``step`` (0-based).

    Linear warmup over ``warmup_epochs``, then either x0.1 at each of ``lr_milestones``
    (fractions of training; the paper's 1/2 and 3/4 by default) or a cosine decay to zero.
    """
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "cosine":
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 0.1 ** sum(step >= round(m * total_steps) for m in config.lr_milestones)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that shuffles epoch ``epoch``: a function of ``(seed, epoch)`` only."""
    (state,) = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The sample indices of every batch of epoch ``epoch``, in order."""
    order = torch.randperm(n, generator=epoch_generator(seed, epoch)).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def batch_loader(
    dataset: Dataset, batch_sampler: Any, config: Config, device: torch.device, gen: torch.Generator
) -> DataLoader:
    """A loader of ``batch_sampler``'s batches of ``dataset`` with the run's workers."""
    # ``generator`` keeps the loader from drawing its worker base seed from the global RNG.
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=config.workers,
        pin_memory=device.type == "cuda",
        generator=gen,
    )


def eval_loader(
    dataset: Dataset, config: Config, device: torch.device, ranks: parallel.Ranks = parallel.SINGLE
) -> DataLoader:
    """In order, in batches of ``batch_size``; with several processes, each evaluates its share."""
    mine, size = range(ranks.rank, len(dataset), ranks.world), config.batch_size
    batches = [list(mine[i : i + size]) for i in range(0, len(mine), size)]
    return batch_loader(dataset, batches, config, device, torch.Generator().manual_seed(0))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    amp: str = "none",
    ranks: parallel.Ranks = parallel.SINGLE,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``loader`` (over every process's
    loader when ``ranks`` has several)."""
    model.eval()
    # loss sum, correct, seen: float64 counts are exact far beyond any data set's size
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=AMP_DTYPES[amp], enabled=amp != "none"):
            out = model(x)
        sums[0] += F.cross_entropy(out.float(), y, reduction="sum")
        sums[1] += (out.argmax(1) == y).sum()
        sums[2] += len(y)
    loss, correct, seen = parallel.sum_across(sums, ranks).tolist()
    return loss / seen, correct / seen


def check_shares(examples: int, batch_size: int, processes: int) -> None:
    """Every process must get at least one example of every global batch."""
    last = examples % batch_size or batch_size
    if min(batch_size, last) < processes:
        raise ValueError(
            f"batch_size {batch_size} (the global batch) leaves a batch of "
            f"{min(batch_size, last)} example(s) for {processes} processes: every process needs "
            "at least one; change batch_size (or val_size)"
        )


def check_schedule(config: Config, train_size: int) -> None:
    """Refuse a config whose sparsity schedule cannot reach its target on a training set of
    ``train_size`` examples, without building its model: the library's own check, run by a
    sparsifier on a stand-in layer (the check depends on the schedule only)."""
    if config.method == "dense":
        return
    total = config.epochs * math.ceil(train_size / config.batch_size)
    c = config.resolved(total)
    stand_in = nn.Linear(32, 32)
    optimizer = torch.optim.SGD(stand_in.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # about the stand-in's layer, not the run's
        granet.sparsify(
            stand_in, optimizer, c.method, total_steps=total, **c.sparsifier_options()
        ).remove()


def reached_target(sp: granet.Sparsifier | None, target: float) -> bool:
    """Whether the sparsifier stands at ``target`` (up to the per-layer rounding of counts):
    until it does, an epoch is not eligible as the best one."""
    if sp is None:
        return True
    masks = list(sp.masks.values())
    slack = len(masks) / sum(m.numel() for m in masks)
    return sp.sparsity() >= target - slack


def load_data(config: Config, ranks: parallel.Ranks = parallel.SINGLE) -> DataBundle:
    """The run's data set (on several processes, loaded by one per cache at a time); with
    ``train_size``, at most that many examples of the training split, drawn with the seed."""
    data = parallel.staged(
        lambda: load_dataset(
            config.dataset,
            config.data_root,
            val_size=config.val_size,
            seed=config.seed,
            augment=config.augment,
        ),
        ranks,
    )
    if config.train_size is not None and config.train_size < len(data.train):
        order = torch.randperm(
            len(data.train), generator=torch.Generator().manual_seed(config.seed)
        )
        data.train = Subset(data.train, order[: config.train_size].sort().values.tolist())
        data.source += f"; training on {config.train_size} of its {len(order)} training examples"
    return data


def log(message: str) -> None:
    """A log line on stderr, from process 0 only (above a progress bar, if one is shown)."""
    if parallel.current().main:
        tqdm.write(message, file=sys.stderr)
