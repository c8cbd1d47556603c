"""What a run shows on the console while it trains: the progress bar of an epoch (tqdm on stderr,
process 0 only, when asked for) and the line logged when an epoch ends."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

import torch
from tqdm import tqdm

from granet.experiment.tables import percent
from granet.sparsifier import Sparsifier

REFRESH_SECONDS = 0.5  # between two updates of the bar's loss, accuracy and sparsity


class EpochBar:
    """The bar of epoch ``epoch`` (1-based) of ``epochs``: ``done`` of its ``steps`` steps done
    when it starts; shown only when ``show``."""

    def __init__(self, epoch: int, epochs: int, steps: int, done: int, show: bool) -> None:
        self.show = show
        self._shown = 0.0
        self._bar = tqdm(
            total=steps,
            initial=done,
            desc=f"epoch {epoch}/{epochs}",
            disable=not show,
            leave=False,
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def step(
        self, loss: torch.Tensor, sums: Mapping[str, Any], sparsifier: Sparsifier | None
    ) -> None:
        """One step done, with the step's mean ``loss`` and the epoch's running ``sums``; the
        numbers are read from the device at most every :data:`REFRESH_SECONDS`."""
        self._bar.update()
        if self.show and time.monotonic() - self._shown > REFRESH_SECONDS:
            self._shown = time.monotonic()
            self._bar.set_postfix(
                loss=f"{loss.item():.3f}",
                acc=f"{sums['correct'].item() / sums['seen']:.3f}",
                sparsity=f"{sparsifier.sparsity() if sparsifier else 0.0:.3f}",
                refresh=False,
            )

    def close(self) -> None:
        self._bar.close()


def epoch_line(r: Mapping[str, Any], epochs: int) -> str:
    """The log line of an epoch's record ``r`` (a ``metrics.jsonl`` line) of a run of ``epochs``."""
    itop = "" if r["itop_rate"] is None else f"  itop {r['itop_rate']:.3f}"
    return (
        f"epoch {r['epoch']}/{epochs}  loss {r['train_loss']:.4f}  "
        f"train {percent(r['train_accuracy'])}  val {percent(r['val_accuracy'])}  "
        f"sparsity {r['sparsity']:.4f}{itop}  lr {r['lr']:.3g}  {r['seconds']:.1f}s"
        + ("  *best" if r["best"] else "")
    )
