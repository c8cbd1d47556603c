"""The guards of a training loop: where it stops for Ctrl-C / SIGTERM (a step all processes
agree on), and a training loss that became non-finite, which ends the run; the errors each
raises, saying where the run stands.
"""

from __future__ import annotations

import signal
from pathlib import Path

import torch

from granet.experiment import parallel
from granet.experiment.errors import RunFailed
from granet.experiment.signals import Interrupted, StopRequest
from granet.readback import HostCopy

CHECK_EVERY = 10  # steps between the checks for a stop request (several processes) or a NaN loss


class StepGuard:
    """Checks, between steps, for a stop request and for a non-finite loss."""

    def __init__(self, device: torch.device, ranks: parallel.Ranks) -> None:
        self.device, self.ranks = device, ranks
        self._finite_check: HostCopy | None = None

    def stop_here(
        self, stop: StopRequest, loss_sum: torch.Tensor, step: int | None = None
    ) -> tuple[bool, bool]:
        """Whether to stop here for a Ctrl-C / SIGTERM, and whether the loss (``loss_sum``,
        the sum so far) is known to be non-finite.

        With several processes a decision all share, taken between epochs (``step`` None) and
        every ``CHECK_EVERY`` steps: a signal reaches each process at its own moment, and they
        must all stop after the same step. The loss is checked every ``CHECK_EVERY`` steps; on
        one GPU through a copy read at the next check, so the host never waits for the device.
        """
        check = step is None or step % CHECK_EVERY == 0
        if self.ranks.world == 1:
            return stop.asked, check and not self._finite(loss_sum)
        if not check:
            return False, False
        asked = torch.tensor(float(stop.asked), dtype=torch.float64, device=self.device)
        flags = torch.stack([asked, (~torch.isfinite(loss_sum)).double()])
        signal_seen, diverged = parallel.max_across(flags, self.ranks).tolist()
        return bool(signal_seen), bool(diverged)

    def _finite(self, loss_sum: torch.Tensor) -> bool:
        latest = HostCopy([torch.isfinite(loss_sum)])
        if self.device.type == "cuda":  # read the previous check's copy, long arrived
            pending, self._finite_check = self._finite_check, latest
        else:
            pending = latest
        return pending is None or bool(pending.result()[0])


def non_finite_loss(run_dir: Path | None, epoch: int, step: int, lr: float) -> RunFailed:
    """The error that ends a run whose loss became non-finite by ``step`` (``epoch`` epochs
    done), naming its last checkpoint."""
    where = run_dir if run_dir is not None else "the run"
    kept = (
        f"; {where}'s last checkpoint is from epoch {epoch}"
        if run_dir is not None and epoch
        else ""
    )
    return RunFailed(
        f"the training loss became non-finite (inf or nan) by step {step}, epoch "
        f"{epoch + 1}: training stopped{kept}. Lower lr (now {lr:g}) or check the data"
    )


def interrupted(stop: StopRequest, run_dir: Path | None, step: int) -> Interrupted:
    """The exception of a run stopped at ``step`` for a signal, its last checkpoint saved."""
    signum = stop.signum or signal.SIGTERM  # a process the signal has not reached yet
    return Interrupted(
        signum,
        f"stopped at step {step}"
        + (
            f"; checkpoint saved. Continue with: granet train --resume {run_dir}"
            if run_dir is not None
            else ""
        ),
        run_dir,
        step,
    )
