"""A plasticity study's results: one row per cell (:data:`COLUMNS`) read from the finished
runs of its folder, and the files made of them: ``plasticity.csv``, ``plasticity.md`` (a table
per variant) and ``plasticity.png``."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from granet.experiment.files import write_atomic
from granet.experiment.plasticity.folder import (
    BASE_DIR,
    CELL_FILE,
    CSV_FILE,
    MD_FILE,
    PNG_FILE,
    cell_dir,
    prune_point,
)
from granet.experiment.plasticity.settings import VARIANTS, Study
from granet.experiment.plots import plot_plasticity
from granet.experiment.records import read_report
from granet.experiment.tables import counted, csv_row, markdown_table, percent

COLUMNS = (
    "prune_epoch",
    "rate",
    "variant",
    "t_pre",
    "t_after_prune",
    "t_continue",
    "plasticity",
    "final_gap",
    "t_final",
    "sparsity_before",
    "sparsity_after_prune",
    "sparsity",
    "lr_at_prune",
    "continue_epochs",
    "seed",
    "cell",
)


def plasticity_rows(study: Study, out: Path) -> list[dict[str, Any]]:
    """One row per cell (:data:`COLUMNS`), from the finished runs of the study folder."""
    t_final = read_report(out / BASE_DIR)["test_accuracy"]
    points = {
        e: json.loads(prune_point(out, e, ".json").read_text()) for e in sorted(study.prune_epochs)
    }
    rows = []
    for cell in study.cells:
        run_dir = cell_dir(out, cell)
        report = read_report(run_dir)
        info = json.loads((run_dir / CELL_FILE).read_text())
        t_pre, t_continue = points[cell.prune_epoch]["t_pre"], report["test_accuracy"]
        rows.append(
            {
                "prune_epoch": cell.prune_epoch,
                "rate": cell.rate,
                "variant": cell.variant,
                "t_pre": t_pre,
                "t_after_prune": info["t_after_prune"],
                "t_continue": t_continue,
                "plasticity": t_continue / t_pre,
                "final_gap": t_continue - t_final,
                "t_final": t_final,
                "sparsity_before": info["sparsity_before"],
                "sparsity_after_prune": info["sparsity_after_prune"],
                "sparsity": report["sparsity"],
                "lr_at_prune": points[cell.prune_epoch]["lr"],
                "continue_epochs": study.continue_epochs
                if study.continuation == "rewind"
                else study.base.epochs - cell.prune_epoch,
                "seed": study.base.seed,
                "cell": cell.name,
            }
        )
    return rows


def plasticity_markdown(study: Study, rows: Sequence[Mapping[str, Any]]) -> str:
    """``plasticity.md``: the settings, then per variant a table of plasticity (and the
    accuracy after continuing) by pruning epoch and rate."""
    b = study.base
    base = study.base_label()
    decays = ", ".join(f"{d:g}" for d in study.lr_decays()) or "none (cosine schedule)"
    how = (
        "the rest of the base schedule"
        if study.continuation == "schedule"
        else f"{counted(study.continue_epochs, 'epoch')} at the rewound learning rate"
    )
    lines = [
        f"# Pruning plasticity: {b.model} on {b.dataset}, {base} base, seed {b.seed}",
        "",
        f"Base run: {counted(b.epochs, 'epoch')}, lr {b.lr:g} ({b.schedule}), learning-rate "
        f"decays after epoch {decays}; final test accuracy t_final = "
        f"{percent(rows[0]['t_final'])}.",
        f"One-shot {study.pruning} magnitude pruning of the remaining weights, then {how}.",
        "Each cell: plasticity = t_continue / t_pre (in brackets: t_after_prune -> "
        "t_continue, %; the final gap t_continue - t_final, points).",
    ]
    for variant in study.variants:
        lines += ["", f"## {variant}: {VARIANTS[variant].summary}", ""]
        header = ["epoch", "lr", "t_pre", *(f"rate {r:g}" for r in study.rates)]
        table = []
        for epoch in study.prune_epochs:
            mine = {
                r["rate"]: r for r in rows if r["variant"] == variant and r["prune_epoch"] == epoch
            }
            first = next(iter(mine.values()))
            cells = [
                f"{mine[r]['plasticity']:.3f} ({100 * mine[r]['t_after_prune']:.1f} -> "
                f"{100 * mine[r]['t_continue']:.1f}; {100 * mine[r]['final_gap']:+.1f})"
                for r in study.rates
            ]
            table.append(
                [str(epoch), f"{first['lr_at_prune']:.3g}", percent(first["t_pre"]), *cells]
            )
        lines += markdown_table(header, table)
    return "\n".join(lines) + "\n"


def write_results(study: Study, out: Path, rows: Sequence[Mapping[str, Any]]) -> list[Path]:
    """``plasticity.csv``, ``plasticity.md`` and ``plasticity.png`` into the study folder."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(map(csv_row, rows))
    table = out / CSV_FILE
    write_atomic(table, text.getvalue())
    md = out / MD_FILE
    write_atomic(md, plasticity_markdown(study, rows))
    b = study.base
    title = f"{b.model} on {b.dataset}, {study.base_label()} base"
    figure = plot_plasticity(rows, out / PNG_FILE, study.variants, study.lr_decays(), title)
    return [table, md, figure]
