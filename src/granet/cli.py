"""The ``granet`` command: train, sweep, plasticity, report, export, bench-inference.

``granet train`` with no arguments trains GraNet at 90% sparsity on Fashion-MNIST and prints the
report. Settings come from the built-in defaults, then ``--config FILE.yaml``, then the flags.

Every expected failure ends in one line, ``granet <command>: error: ...``, and a non-zero exit
status; ``--debug`` (or ``GRANET_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import pickle
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import granet
from granet.algorithm import OPTION, Option
from granet.experiment.config import (
    AMP_CHOICES,
    EXPERIMENT_DEFAULTS,
    METHOD_CHOICES,
    OPTIMIZERS,
    SCHEDULES,
    SPARSIFIER_KEYS,
    Config,
)
from granet.experiment.datasets import DATASETS
from granet.experiment.loggers import LOGGERS
from granet.experiment.models import MODELS
from granet.experiment.tables import markdown_table

_D = Config()


def _path(text: str) -> str:
    """A file or folder argument: an empty one (an unset shell variable, ``--out "$RUN"``) is
    refused, not taken for the flag left out (a new run in the default folder)."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path; give a file or folder")
    return text


def _choices(values: Sequence[str]) -> str:
    return "{" + ",".join(values) + "}"


# (flag, config key, argparse keywords); the defaults shown come from Config.
_TRAIN_FLAGS: list[tuple[str, dict[str, Any]]] = [
    (
        "--method",
        dict(
            metavar=_choices(METHOD_CHOICES),
            help=f"sparse-training method, or dense (default: {_D.method})",
        ),
    ),
    ("--model", dict(metavar=_choices(MODELS), help=f"architecture (default: {_D.model})")),
    ("--dataset", dict(metavar=_choices(DATASETS), help=f"data set (default: {_D.dataset})")),
    (
        "--data-root",
        dict(
            metavar="DIR",
            help="looked at first for the data, and where a download goes (then "
            "$GRANET_DATA, the user cache, /usr/share/datasets)",
        ),
    ),
    (
        "--val-size",
        dict(
            type=float,
            help="fraction of the training set held out for validation; 0: none, train on all "
            f"of it and test the last epoch (default: {_D.val_size})",
        ),
    ),
    (
        "--train-size",
        dict(
            type=int,
            metavar="N",
            help="train on at most N examples of the training split, drawn with the seed "
            "(default: all)",
        ),
    ),
    (
        "--augment",
        dict(
            action=argparse.BooleanOptionalAction,
            help="random crops and horizontal flips of the training images (ImageNet: random "
            "resized crops) (default: off)",
        ),
    ),
    ("--epochs", dict(type=int, help=f"training epochs (default: {_D.epochs})")),
    (
        "--batch-size",
        dict(
            type=int,
            help="the global batch: under torchrun, split among the processes "
            f"(default: {_D.batch_size})",
        ),
    ),
    (
        "--optimizer",
        dict(metavar=_choices(OPTIMIZERS), help="sgd (Nesterov momentum) or adamw (default: sgd)"),
    ),
    ("--lr", dict(type=float, help="base learning rate (default: 0.05 for sgd, 1e-3 for adamw)")),
    ("--momentum", dict(type=float, help=f"SGD momentum (default: {_D.momentum})")),
    ("--weight-decay", dict(type=float, help=f"(default: {_D.weight_decay})")),
    (
        "--schedule",
        dict(
            metavar=_choices(SCHEDULES),
            help=f"LR schedule: step (x0.1 at each milestone) or cosine (default: {_D.schedule})",
        ),
    ),
    (
        "--lr-milestones",
        dict(
            type=float,
            nargs="+",
            metavar="FRACTION",
            help="step schedule milestones as fractions of training (default: 0.5 0.75)",
        ),
    ),
    ("--warmup-epochs", dict(type=float, help="linear LR warmup (default: 0)")),
    ("--label-smoothing", dict(type=float, help="(default: 0)")),
    (
        "--exclude",
        dict(
            nargs="*",
            metavar="PATTERN",
            help="parameter-name patterns kept dense, e.g. 'fc3.*' (default: none)",
        ),
    ),
    ("--seed", dict(type=int, help=f"(default: {_D.seed})")),
    ("--device", dict(help="auto (CUDA when available), cpu, cuda, cuda:N (default: auto)")),
    (
        "--amp",
        dict(
            metavar=_choices(AMP_CHOICES),
            help="mixed precision: bf16, or fp16 with a grad scaler on CUDA (default: none)",
        ),
    ),
    ("--workers", dict(type=int, help="data-loading processes (default: 0)")),
    (
        "--log",
        dict(
            nargs="+",
            metavar=_choices(LOGGERS),
            help="also log the scalars of every epoch and topology round there, beside "
            "metrics.jsonl (default: none)",
        ),
    ),
]


def method_defaults(name: str) -> str:
    """Each method's own default for option ``name``, e.g. ``granet 0.5, gmp 0, rigl/set/snfs/
    static the final sparsity``."""
    by_value: dict[Any, list[str]] = {}
    for method, cls in granet.METHODS.items():
        value = cls.defaults[name]
        by_value.setdefault(value, []).append(method)
    shown = (
        "the final sparsity"
        if v is None and name == "init_sparsity"
        else f"{v:g}"
        if isinstance(v, float)
        else str(v)
        for v in by_value
    )
    return ", ".join(f"{'/'.join(ms)} {v}" for ms, v in zip(by_value.values(), shown))


def _default_text(option: Option) -> str:
    if option.name in EXPERIMENT_DEFAULTS:
        return EXPERIMENT_DEFAULTS[option.name][1]
    if option.method:
        return "the method's own: " + method_defaults(option.name)
    if option.kind is bool:
        return "on" if option.default else "off"
    if option.default is None:
        return "none"
    return f"{option.default}"


def option_flag(option: Option) -> tuple[str, dict[str, Any]]:
    """The ``granet train`` flag of a sparsifier option, from its declaration."""
    text = f"{option.help} (default: {_default_text(option)})"
    kwargs: dict[str, Any] = {"help": text.replace("%", "%%")}  # argparse formats help with %
    if option.kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif option.choices:
        kwargs["metavar"] = _choices(option.choices)
    else:
        kwargs["type"] = option.kind
    return "--" + option.name.replace("_", "-"), kwargs


def options_table() -> str:
    """The markdown table of the sparse-training flags, as ``docs/cli.md`` shows it."""
    rows = []
    for key in SPARSIFIER_KEYS:
        if key == "seed":
            continue
        option = OPTION[key]
        flag, _ = option_flag(option)
        flags = f"`{flag}` / `--no-{flag[2:]}`" if option.kind is bool else f"`{flag}`"
        choices = f" (`{'`, `'.join(option.choices)}`)" if option.choices else ""
        rows.append([flags, _default_text(option), f"{option.help}{choices}"])
    return "\n".join(markdown_table(["flag", "default", "meaning"], rows))


def _sparsifier_flags() -> list[tuple[str, dict[str, Any]]]:
    return [option_flag(OPTION[k]) for k in SPARSIFIER_KEYS if k != "seed"]


DEBUG_ENV = "GRANET_DEBUG"


class _Parser(argparse.ArgumentParser):
    """A command's parser: flags are never abbreviated."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})


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
    settings = train.add_argument_group("settings (override --config)")
    for flag, kwargs in _TRAIN_FLAGS:
        settings.add_argument(flag, default=argparse.SUPPRESS, **kwargs)
    sparse = train.add_argument_group("sparse training (override --config)")
    for flag, kwargs in _sparsifier_flags():
        sparse.add_argument(flag, default=argparse.SUPPRESS, **kwargs)

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
        metavar=_choices(CONTINUATIONS),
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
    own = {
        "--method": f"the base run's method, or dense (default: {BASE_DEFAULTS['method']})",
        "--model": f"architecture (default: {BASE_DEFAULTS['model']})",
        "--val-size": "fraction of the training set held out for validation (default: 0: none, "
        "the last epoch is tested)",
        "--train-size": "train on at most N examples of the training split, drawn with the "
        f"seed (default: {BASE_DEFAULTS['train_size']})",
    }
    base = p.add_argument_group("the base run (override --config)")
    for flag, kwargs in _TRAIN_FLAGS:
        if flag != "--workers":  # here: continuations at a time; data loaders from --config
            base.add_argument(flag, default=argparse.SUPPRESS, **{**kwargs, **_help(own, flag)})
    sparse = p.add_argument_group(
        "the base run's sparse training, for a sparse base (override --config; the base's "
        "gradual pruning option from --config)"
    )
    for flag, kwargs in _sparsifier_flags():
        if flag != "--pruning":
            sparse.add_argument(flag, default=argparse.SUPPRESS, **kwargs)


def _help(texts: dict[str, str], flag: str) -> dict[str, str]:
    return {"help": texts[flag]} if flag in texts else {}


# ------------------------------------------------------------------------------- commands
_NOT_SETTINGS = ("command", "config", "out", "resume", "overwrite", "debug")


def cmd_train(args: argparse.Namespace) -> int:
    from granet.experiment import parallel
    from granet.experiment.blocks import resolve_device
    from granet.experiment.config import make_config, resolve_config
    from granet.experiment.folder import CONFIG_FILE, PLACEMENT, REPORT_MD, default_run_dir
    from granet.experiment.records import read_run_config
    from granet.experiment.train import train

    flags = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    if args.resume:
        others = [k for k in flags if k not in PLACEMENT] + [
            k for k in ("config", "out", "overwrite") if getattr(args, k)
        ]
        if others:
            raise ValueError(
                "--resume continues a run with its own settings; drop "
                + ", ".join("--" + k.replace("_", "-") for k in others)
            )
        run_dir = Path(args.resume)
        try:
            config = make_config({**read_run_config(run_dir), **flags})
        except ValueError as e:
            raise ValueError(f"{run_dir / CONFIG_FILE}: {e}") from None
    else:
        config = resolve_config(args.config, flags)
    resolve_device(config.device)  # refused here, before anything starts
    # Under torchrun every process runs this; process 0 names, makes and locks the run folder.
    with parallel.process_group(config.device) as ranks:
        if not args.resume:
            run_dir = parallel.on_main(
                lambda: Path(args.out) if args.out else default_run_dir(config), ranks
            )
        train(config, run_dir, resume=bool(args.resume), overwrite=args.overwrite)
    if ranks.main:
        print((run_dir / REPORT_MD).read_text())
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from granet.experiment.report import comparison_markdown
    from granet.experiment.sweep import load_sweep, run_sweep

    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1; got {args.workers}")
    rows, paths = run_sweep(
        load_sweep(args.sweep_file), workers=args.workers, overwrite=args.overwrite
    )
    print(comparison_markdown(rows))
    print("written: " + ", ".join(map(str, paths)))
    return 0


_STUDY_ARGS = ("prune_epochs", "rates", "variants", "pruning", "continuation", "continue_epochs")
_STUDY_RUN = ("workers", "overwrite", "keep_checkpoints")


def cmd_plasticity(args: argparse.Namespace) -> int:
    """``granet plasticity``: build the study from the flags, run or resume it, print its table."""
    from granet.experiment.blocks import resolve_device
    from granet.experiment.plasticity import MD_FILE, Study, base_config, default_out, run_study

    skip = {*_NOT_SETTINGS, *_STUDY_ARGS, *_STUDY_RUN}
    flags = {k: v for k, v in vars(args).items() if k not in skip}
    config = base_config(args.config, flags)
    resolve_device(config.device)
    given = {k: getattr(args, k) for k in _STUDY_ARGS if getattr(args, k) is not None}
    study = Study(config, **{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    out = Path(args.out) if args.out else default_out(config)
    run_study(
        study,
        out,
        workers=args.workers,
        overwrite=args.overwrite,
        keep_checkpoints=args.keep_checkpoints,
    )
    print((out / MD_FILE).read_text())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from granet.experiment.records import read_report
    from granet.experiment.report import (
        comparison_markdown,
        find_runs,
        redraw,
        summarize,
        write_comparison,
    )

    runs = find_runs(args.runs)
    markdown = [redraw(run) for run in runs]
    if len(runs) == 1 and args.out is None:
        print(markdown[0])
        return 0
    rows = summarize(read_report(run) for run in runs)
    out = (
        Path(args.out) if args.out else Path(os.path.commonpath([r.resolve().parent for r in runs]))
    )
    paths = write_comparison(rows, out)
    print(comparison_markdown(rows))
    print(f"redrew {len(runs)} run reports; written: " + ", ".join(map(str, paths)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from granet.experiment.serving import export_run

    if Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a folder; give the file to write")
    written = export_run(args.run_dir, args.out)
    print(json.dumps(written, indent=2, default=str))
    return 0


def cmd_bench_inference(args: argparse.Namespace) -> int:
    from granet.experiment.serving import bench_inference
    from granet.inference import RULE

    bad = [n for n in args.batch_sizes if n < 1]
    if bad:
        raise ValueError(f"--batch-sizes must be >= 1; got {' '.join(map(str, bad))}")

    try:
        rows = bench_inference(args.run_dir, batch_sizes=tuple(args.batch_sizes))
    except (MemoryError, RuntimeError) as e:
        # torch's CPU allocator says so in a RuntimeError; CUDA's is an OutOfMemoryError
        if not isinstance(e, MemoryError) and "allocate" not in str(e):
            raise
        raise ValueError(
            f"--batch-sizes {max(args.batch_sizes)}: a batch that large does not fit in memory"
        ) from None
    if all(row["sparse_ms"] is None for row in rows):
        print(f"no layer runs sparse; nothing to compare (the rule: {RULE})")
        return 0
    if rows:
        keys = list(rows[0])
        print("\n".join(markdown_table(keys, [[_fmt(row.get(k)) for k in keys] for row in rows])))
    return 0


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


COMMANDS = {
    "train": cmd_train,
    "sweep": cmd_sweep,
    "plasticity": cmd_plasticity,
    "report": cmd_report,
    "export": cmd_export,
    "bench-inference": cmd_bench_inference,
}


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
