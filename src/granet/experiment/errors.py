"""The errors a run stops with, besides bad input (a ``ValueError``) and a stop asked for
(:class:`~granet.experiment.signals.Interrupted`)."""

from __future__ import annotations


class RunFailed(RuntimeError):
    """A run stopped because it cannot go on (its loss became non-finite), or some runs of a
    sweep did; the message says which and where."""


class FolderLost(RunFailed):
    """The folder a process locked was deleted or replaced (say by a new run in a folder of the
    same name) while the process wrote it: it stops rather than write into the new one."""
