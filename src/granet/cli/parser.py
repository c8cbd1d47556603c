"""The grammar of the ``granet`` command: :func:`build_parser` (every command and its flags; the
run's settings and sparsifier options from ``flags``) and :func:`parse_args`, which refuses an
unknown flag with the closest known one."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from typing import Any

import granet
from granet.cli.flags import choices_metavar, setting_flags, sparsifier_flags

DEBUG_ENV = "GRANET_DEBUG"


def _path(text: str) -> str:
    """A file or folder argument: an empty one (an unset shell variable, ``--out "$RUN"``) is
    refused, not taken for the flag left out (a new run in the default folder)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path; give a file or folder")
    return text


class _Parser(argparse.ArgumentParser):
    """A command's parser: flags are never abbreviated."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})


def _add(group: Any, flags: list[tuple[str, dict[str, Any]]]) -> None:
    """Settings flags: one left out sets nothing (the config file's value or the default stays)."""
    for flag, kwargs in flags:
        group.add_argument(flag, default=argparse.SUPPRESS, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="granet",
        allow_abbrev=False,
        description="Sparse training during training: GraNet, GMP, RigL, SET, SNFS, static.",
    )
    parser.add_argument("--version", action="version", version=f"granet {granet.__version__}")
    debug = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help=f"show the traceback of an error (also: {DEBUG_ENV}=1)",
    )
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    # A flag is given whole: a prefix (``--epoch`` for ``--epochs``) is an unknown flag.
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    train = sub.add_parser(
        "train",
        parents=[debug],
        help="train one run (no arguments: GraNet, 90%% sparsity, Fashion-MNIST)",
        description="Train one run and print its report. Settings: defaults, then --config, "
        "then these flags.",
    )
    train.add_argument(
        "--config", type=_path, metavar="FILE.yaml", help="settings file (flags win)"
    )
    train.add_argument(
        "--out",
        type=_path,
        metavar="RUN_DIR",
        help="run folder (default: runs/<date>-<time>-<dataset>-<model>-...)",
    )
    train.add_argument(
        "--resume",
        type=_path,
        metavar="RUN_DIR",
        help="continue an interrupted run with its own settings (only --device, --data-root, "
        "--workers and --log may change)",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run at --out and start again (only a folder granet marked as a run, "
        "with its run.json)",
    )
    _add(train.add_argument_group("settings (override --config)"), setting_flags())
    _add(train.add_argument_group("sparse training (override --config)"), sparsifier_flags())

    sweep = sub.add_parser(
        "sweep",
        parents=[debug],
        help="run a grid of methods x sparsities x seeds and tabulate it",
        description="Run every unfinished run of a sweep file, then write comparison.md, "
        "comparison.csv and accuracy_vs_sparsity.png into its out folder. Running it again "
        "skips finished runs and resumes interrupted ones.",
    )
    sweep.add_argument("sweep_file", metavar="SWEEP.yaml")
    sweep.add_argument("--workers", type=int, help="runs at a time (default: the file's, or 1)")
    sweep.add_argument("--overwrite", action="store_true", help="redo runs that already exist")

    report = sub.add_parser(
        "report",
        parents=[debug],
        help="redraw reports, tables and plots from finished runs",
        description="Redraw report.md and the figures of each run; with several runs, also "
        "the comparison table (markdown, CSV) and accuracy-vs-sparsity plot.",
    )
    report.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folders, or folders of runs (a sweep's out folder)",
    )
    report.add_argument(
        "--out",
        type=_path,
        metavar="DIR",
        help="where the comparison goes (default: the runs' common parent)",
    )

    _plasticity_parser(sub, debug)

    export = sub.add_parser("export", parents=[debug], help="export a run's trained sparse model")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--out", type=_path, metavar="FILE", required=True, help="file to write")

    bench = sub.add_parser(
        "bench-inference", parents=[debug], help="time a run's model, dense vs sparse"
    )
    bench.add_argument("run_dir", metavar="RUN_DIR")
    bench.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[1, 128], metavar="N", help="(default: 1 128)"
    )
    return parser


def _plasticity_parser(sub: Any, debug: argparse.ArgumentParser) -> None:
    from granet.experiment.plasticity import BASE_DEFAULTS, CONTINUATIONS, VARIANTS

    p = sub.add_parser(
        "plasticity",
        parents=[debug],
        help="pruning plasticity: prune one-shot at several epochs and rates, continue, tabulate",
        description="Train a base run (dense by default), prune its checkpoint after each "
        "--prune-epochs epoch one-shot by magnitude at each --rates, continue training each "
        "pruned network (--variants), and write plasticity.csv, plasticity.md and "
        "plasticity.png: plasticity = t_continue / t_pre. Running the same command again "
        "resumes the study. The base run's settings: the defaults below, then --config, then "
        "the flags.",
    )
    p.add_argument(
        "--config", type=_path, metavar="FILE.yaml", help="the base run's settings (flags win)"
    )
    p.add_argument(
        "--out",
        type=_path,
        metavar="DIR",
        help="study folder (default: runs/plasticity-<dataset>-<model>-<method>"
        "[-s<sparsity>]-seed<seed>)",
    )
    p.add_argument(
        "--prune-epochs",
        type=int,
        nargs="+",
        metavar="EPOCH",
        help="prune after these epochs of the base run, increasing (default: every 10%% of "
        "training)",
    )
    p.add_argument(
        "--rates",
        type=float,
        nargs="+",
        metavar="RATE",
        help="fractions of the remaining weights pruned (default: 0.2 0.5 0.9)",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        metavar="VARIANT",
        help="after the prune: "
        + "; ".join(f"{name}: {v.summary}" for name, v in VARIANTS.items())
        + " (default: prune prune+regrow)",
    )
    p.add_argument(
        "--pruning",
        metavar="{global,uniform}",
        help="one-shot magnitude pruning: one threshold over all layers, or every layer by "
        "the rate (default: global)",
    )
    p.add_argument(
        "--continue",
        dest="continuation",
        metavar=choices_metavar(CONTINUATIONS),
        help="schedule: train the rest of the base schedule; rewind: --continue-epochs epochs "
        "with a fresh optimizer and the schedule rewound to its start (default: schedule)",
    )
    p.add_argument(
        "--continue-epochs", type=int, metavar="N", help="the budget of --continue rewind"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="continuations trained at a time, each in its own process (default: 1)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="delete the study at --out and start again"
    )
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep the continuations' checkpoints (default: removed once each has finished)",
    )
    # here --workers is the continuations at a time (data loaders from --config), and --pruning
    # the one-shot pruning (the base's gradual pruning option from --config)
    _add(
        p.add_argument_group("the base run (override --config)"),
        setting_flags(BASE_DEFAULTS, skip=("workers",)),
    )
    _add(
        p.add_argument_group(
            "the base run's sparse training, for a sparse base (override --config; the base's "
            "gradual pruning option from --config)"
        ),
        sparsifier_flags(skip=("pruning",)),
    )


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """``parser.parse_args``, but an unknown flag is refused by its command's parser (its usage,
    not the top level's) with the closest known flag suggested."""
    args, unknown = parser.parse_known_args(argv)
    if not unknown:
        return args
    command = _subparsers(parser)[args.command]
    known = [o[2:] for action in command._actions for o in action.option_strings if o[:2] == "--"]
    hints = []
    for flag in (arg.split("=", 1)[0] for arg in unknown if arg.startswith("--")):
        close = difflib.get_close_matches(flag[2:], known, n=1)
        hints += [f"{flag}: did you mean --{close[0]}?"] if close else []
    command.error(f"unrecognized arguments: {' '.join(unknown)}" + "".join(f"; {h}" for h in hints))


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}
