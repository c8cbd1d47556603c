"""The ``granet`` command: train, sweep, plasticity, report, export, bench-inference.

``granet train`` with no arguments trains GraNet at 90% sparsity on Fashion-MNIST and prints the
report. Settings come from the built-in defaults, then ``--config FILE.yaml``, then the flags.

Every expected failure ends in one line, ``granet <command>: error: ...``, and a non-zero exit
status; ``--debug`` (or ``GRANET_DEBUG=1``) shows the traceback instead.

This module runs a command: :func:`main` (the launch environment checked, warnings and errors
as one line, the exit status). The grammar is in ``parser``, the flags derived from the settings'
declarations in ``flags``, what each command does in ``commands``.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from granet.cli.commands import (
    COMMANDS,
    cmd_bench_inference,
    cmd_export,
    cmd_plasticity,
    cmd_report,
    cmd_sweep,
    cmd_train,
)
from granet.cli.flags import (
    method_defaults,
    option_flag,
    options_table,
    setting_flag,
    settings_table,
)
from granet.cli.parser import DEBUG_ENV, build_parser, parse_args

__all__ = [
    "COMMANDS",
    "DEBUG_ENV",
    "EXPECTED",
    "build_parser",
    "cmd_bench_inference",
    "cmd_export",
    "cmd_plasticity",
    "cmd_report",
    "cmd_sweep",
    "cmd_train",
    "error_line",
    "launch_env",
    "main",
    "method_defaults",
    "option_flag",
    "options_table",
    "parse_args",
    "setting_flag",
    "settings_table",
]


def _show_warning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    """Warnings as one plain line (no source location: they are about data and runs)."""
    print(f"warning: {message}", file=sys.stderr)


# Failures a user can meet and act on: bad input, files, the environment. Exit status 2.
EXPECTED = (ValueError, OSError, ImportError, pickle.UnpicklingError)


def error_line(error: BaseException, ours: bool = True) -> str:
    """One line saying what went wrong: an OS error names its file; an error not ``ours``
    (not one granet raises for its users) also names its type."""
    if isinstance(error, OSError) and error.strerror:
        where = "" if error.filename is None else f"{error.filename}: "
        if error.filename2 is not None:
            where = f"{error.filename} -> {error.filename2}: "
        text = f"{where}{error.strerror}"
    else:
        text = str(error) if ours else f"{type(error).__name__}: {error}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:1]) + (" ..." if len(lines) > 1 else "")


def launch_env(name: str, default: int, least: int = 0) -> int:
    """An integer that torchrun sets in the environment (``WORLD_SIZE``, ``RANK``), checked to
    be at least ``least``."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = least - 1
    if number < least:
        raise ValueError(
            f"the environment variable {name} must be an integer >= {least} (torchrun sets "
            f"it); got {value!r}"
        )
    return number


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``granet`` command line; returns the exit status."""
    from granet.experiment.errors import RunFailed
    from granet.experiment.signals import Interrupted, stop_with_parent

    stop_with_parent()  # a sweep's or study's training process stops with it
    parser = build_parser()
    args = parse_args(parser, argv)
    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        world, rank = launch_env("WORLD_SIZE", 1, least=1), launch_env("RANK", 0)
        launch_env("LOCAL_RANK", 0)
    except ValueError as e:
        print(f"granet {args.command}: error: {e}", file=sys.stderr)
        return 2
    prefix = f"granet {args.command}" + (f" (process {rank})" if world > 1 and rank else "")
    try:
        if args.command != "train" and world > 1:
            raise ValueError(
                "only granet train runs under torchrun with several processes; "
                f"run granet {args.command} as one process"
            )
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return COMMANDS[args.command](args)
    except Interrupted as e:
        print(f"granet: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as e:
        if debug:
            raise
        ours = isinstance(e, (*EXPECTED, RunFailed))
        hint = "" if ours else f" (--debug or {DEBUG_ENV}=1 shows where)"
        print(f"{prefix}: error: {error_line(e, ours)}{hint}", file=sys.stderr)
        return 2 if isinstance(e, EXPECTED) else 1
