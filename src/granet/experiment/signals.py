"""Ctrl-C and SIGTERM: a stop request that a training loop or a sweep honours at a safe point,
and the one exception that says it stopped.

The first SIGINT or SIGTERM only records the request; the loop saves what resumes it and raises
:class:`Interrupted`. A second signal aborts at once (``KeyboardInterrupt``), unless the caller
passes it on (a sweep passes every signal to its training processes).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
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


# Set by a sweep or a study in the environment of each training process it starts: its own
# process id, which the child watches (see :func:`stop_with_parent`).
PARENT_ENV = "GRANET_PARENT_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_parent_gone = threading.Event()


def stop_with_parent() -> None:
    """In a training process that a sweep or study started (:data:`PARENT_ENV` set): get one
    SIGTERM when that parent dies, even by SIGKILL, so that the run checkpoints and stops
    rather than train on unwatched, holding its folder's lock against a rerun.

    The children run in sessions of their own (a terminal's Ctrl-C reaches the parent only),
    so nothing else would stop them. On Linux the kernel signals the death
    (``prctl(PR_SET_PDEATHSIG)``, with SIGHUP: it comes again each time the orphan is handed to
    another of the dead parent's threads, and only the first becomes the SIGTERM, a second one
    of which would abort the checkpoint); elsewhere a thread watches the parent's process id.
    A parent already gone when this runs is noticed at once."""
    value = os.environ.pop(PARENT_ENV, None)  # not inherited by what this process starts
    if value is None or not value.isdigit():
        return
    parent = int(value)
    hangup = getattr(signal, "SIGHUP", None)
    handled = hangup is not None and threading.current_thread() is threading.main_thread()
    if handled:  # before the kernel is asked: an unhandled SIGHUP would end us unsaved
        signal.signal(hangup, lambda signum, frame: _stop_once())
    if not (handled and _death_signal(hangup)):
        threading.Thread(target=_watch, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the parent died before the signal was asked for
        _stop_once()


def _stop_once() -> None:
    if not _parent_gone.is_set():
        _parent_gone.set()
        os.kill(os.getpid(), signal.SIGTERM)


def _death_signal(signum: int) -> bool:
    """Ask Linux to send ``signum`` when the parent dies; whether it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int, every: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(every)
    _stop_once()
