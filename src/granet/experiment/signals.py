"""Ctrl-C and SIGTERM: a stop request that a training loop or a sweep honours at a safe point,
and the one exception that says it stopped.

The first SIGINT or SIGTERM only records the request; the loop saves what resumes it and raises
:class:`Interrupted`. A second signal aborts at once (``KeyboardInterrupt``), unless the caller
passes it on (a sweep passes every signal to its training processes).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Ctrl-C / SIGTERM stopped a run or a sweep after what resumes it was saved.

    ``signum`` is the signal (the exit status is ``128 + signum``); ``run_dir`` and ``step`` say
    where a single run stopped (None for a sweep).
    """

    def __init__(
        self, signum: int, message: str, run_dir: Path | None = None, step: int | None = None
    ) -> None:
        self.signum, self.run_dir, self.step = signum, run_dir, step
        super().__init__(f"{signal.Signals(signum).name}: {message}")


class StopRequest:
    """The first signal received, if any."""

    signum: int | None = None

    @property
    def asked(self) -> bool:
        """Whether a stop was asked for (a signal arrived)."""
        return self.signum is not None


@contextmanager
def stopped_as(message: str) -> Iterator[None]:
    """Re-raise an :class:`Interrupted` from inside the block with ``message`` (what stopped,
    and how to go on) in place of the inner one's."""
    try:
        yield
    except Interrupted as e:
        raise Interrupted(e.signum, message) from e


@contextmanager
def stop_on_signals(pass_on: Callable[[int], None] | None = None) -> Iterator[StopRequest]:
    """Turn SIGINT/SIGTERM into a :class:`StopRequest` while the block runs (the previous
    handlers come back afterwards). With ``pass_on``, every signal is also handed to it, and a
    second one does not abort. Outside the main thread signals cannot be caught: no effect."""
    request = StopRequest()

    def handler(signum: int, frame: Any) -> None:
        first = request.signum is None
        if first:
            request.signum = signum
        if pass_on is not None:
            pass_on(signum)
        elif not first:
            raise KeyboardInterrupt

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            previous[s] = signal.signal(s, handler)
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
