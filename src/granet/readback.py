"""Device values read back by the host without making it wait for the device.

A topology round produces a few things the host needs later (per-layer counts, the ITOP bits,
whether the weights were finite). Reading them at once would stall the host until the device
has finished all queued work; instead CUDA tensors are copied to pinned host memory with
non-blocking copies, and the host reads them at the next round, long after they have arrived.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class HostCopy:
    """Host copies of ``values`` (tensors on any device; other values pass through).

    CUDA tensors are copied asynchronously and :meth:`result` waits only if the device has not
    yet reached the copies. Tensors of other accelerators are copied at once.
    """

    def __init__(self, values: Sequence[Any]) -> None:
        self._values: list[Any] = []
        self._events: list[torch.cuda.Event] = []
        for v in values:
            if torch.is_tensor(v) and v.device.type == "cuda":
                host = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                host.copy_(v, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(v.device))
                self._events.append(event)
                v = host
            elif torch.is_tensor(v) and v.device.type != "cpu":
                v = v.cpu()
            self._values.append(v)

    def result(self) -> list[Any]:
        """The host values, in the order given."""
        for event in self._events:
            event.synchronize()
        self._events = []
        return self._values
