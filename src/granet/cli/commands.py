"""What each ``granet`` command does once its flags are parsed: ``cmd_<command>(args)`` turns the
parsed flags into calls of ``granet.experiment`` and prints the result; :data:`COMMANDS` names
them."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from granet.experiment.tables import markdown_table

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
    from granet.experiment.comparison import comparison_markdown
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
    from granet.experiment.comparison import (
        comparison_markdown,
        find_runs,
        summarize,
        write_comparison,
    )
    from granet.experiment.records import read_report
    from granet.experiment.report import redraw

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
