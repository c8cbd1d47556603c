"""Comparisons over many finished runs: the paper-style accuracy tables (comparison.md,
comparison.csv) and the accuracy-vs-sparsity figures, drawn from the runs' report.json files, so
that ``granet report`` and ``granet sweep`` can regenerate them at any time."""

from __future__ import annotations

import csv
import io
import statistics
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import granet
from granet.experiment.config import METHOD_CHOICES
from granet.experiment.files import write_atomic
from granet.experiment.folder import REPORT_JSON
from granet.experiment.plots import plot_accuracy_vs_sparsity
from granet.experiment.tables import csv_row, markdown_table

# A run whose sparsity is this far below its target missed it (the per-layer rounding of the
# weight counts keeps a run that reached it within 1e-4 on any model granet has).
TARGET_TOLERANCE = 1e-3

COMPARISON_MD = "comparison.md"
COMPARISON_CSV = "comparison.csv"
CSV_FIELDS = (
    "dataset",
    "model",
    "method",
    "base_method",
    "sparsity",
    "target_sparsity",
    "target_reached",
    "runs",
    "seeds",
    "test_accuracy_mean",
    "test_accuracy_std",
    "test_accuracy_min",
    "test_accuracy_max",
    "itop_rate_mean",
    "inference_flops_ratio",
    "training_flops_ratio",
    "train_seconds_mean",
)


def _init_sparsity(r: Mapping[str, Any]) -> float | None:
    """The run's initial sparsity if it differs from its method's own default, else None."""
    init = r.get("config", {}).get("init_sparsity")
    method = granet.METHODS.get(r["method"])
    if init is None or method is None:
        return None
    return None if init == method.resolve(sparsity=r["target_sparsity"]).init_sparsity else init


def target_reached(r: Mapping[str, Any]) -> bool:
    """Whether a run's report says it reached its target sparsity (reports written before
    granet recorded it: its sparsity within :data:`TARGET_TOLERANCE` of the target)."""
    if "target_reached" in r:
        return bool(r["target_reached"])
    return r["sparsity"] >= r["target_sparsity"] - TARGET_TOLERANCE


def _once(reports: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Each run once: a report seen again (the same run id, e.g. a copied run folder) is left
    out with a warning."""
    seen: dict[str, str] = {}
    kept = []
    for r in reports:
        run_id = r.get("run_id")
        if run_id is not None and run_id in seen:
            warnings.warn(
                f"{r.get('run_dir')} is the run {seen[run_id]} again (run id {run_id}): "
                "counted once",
                stacklevel=3,
            )
            continue
        if run_id is not None:
            seen[run_id] = str(r.get("run_dir"))
        kept.append(r)
    return kept


def summarize(reports: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, model, method, sparsity reached): mean and std over seeds.

    A run counts in the column of the sparsity it reached: a run that reached its target in
    the target's, one that missed it (a schedule too short to prune to the end) in a row of its
    own, labelled ``method (missed target T)``, at the sparsity it ended at; it is never averaged
    with the runs that reached T. Runs of one method with different initial sparsities (GraNet
    from dense and from 50%) get their own rows, labelled ``method (s_i=...)``. Each run counts
    once.
    """
    reports = _once(reports)
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in reports:
        reached = target_reached(r)
        level = r["target_sparsity"] if reached else round(r["sparsity"], 3)
        target = None if reached else r["target_sparsity"]
        key = (r["dataset"], r["model"], r["method"], _init_sparsity(r), target, level)
        groups.setdefault(key, []).append(r)
    variants: dict[str, set] = {}
    for _, _, method, init, _, _ in groups:
        variants.setdefault(method, set()).add(init)
    rows = []
    for (dataset, model, method, init, missed, sparsity), runs in groups.items():
        label = method
        if len(variants[method]) > 1:
            default = granet.METHODS[method].defaults["init_sparsity"]
            shown = init if init is not None else default
            label = f"{method} (s_i={'s_f' if shown is None else f'{shown:g}'})"
        if missed is not None:
            label = f"{label} (missed target {100 * missed:g}%)"
        acc = [r["test_accuracy"] for r in runs]
        itop = [r["itop_rate"] for r in runs if r["itop_rate"] is not None]
        rows.append(
            {
                "dataset": dataset,
                "model": model,
                "method": label,
                "base_method": method,
                "sparsity": sparsity,
                "target_sparsity": sparsity if missed is None else missed,
                "target_reached": missed is None,
                "runs": len(runs),
                "seeds": " ".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"])),
                "test_accuracy_mean": statistics.fmean(acc),
                "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else None,
                "test_accuracy_min": min(acc),
                "test_accuracy_max": max(acc),
                "itop_rate_mean": statistics.fmean(itop) if itop else None,
                "inference_flops_ratio": statistics.fmean(
                    r["flops"]["inference_per_sample"]["ratio"] for r in runs
                ),
                "training_flops_ratio": statistics.fmean(
                    r["flops"]["training_total"]["ratio"] for r in runs
                ),
                "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in runs),
            }
        )
    order = {m: i for i, m in enumerate(("dense", *METHOD_CHOICES))}
    rows.sort(
        key=lambda r: (
            r["dataset"],
            r["model"],
            order.get(r["base_method"], len(order)),
            not r["target_reached"],
            r["method"],
            r["sparsity"],
        )
    )
    return rows


def _cell(row: Mapping[str, Any]) -> str:
    mean, std = 100 * row["test_accuracy_mean"], row["test_accuracy_std"]
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {100 * std:.2f}"


def comparison_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """Paper-style tables: test accuracy (%) mean ± std over seeds, methods x sparsities, one
    table per dataset and model. The dense baseline is repeated in every column."""
    out = []
    for (dataset, model), group in _by_setup(rows).items():
        levels = sorted({r["sparsity"] for r in group if r["method"] != "dense"})
        dense = next((r for r in group if r["method"] == "dense"), None)
        header = [f"{100 * s:g}%" for s in levels] or ["dense"]
        table = [] if dense is None else [["dense", *[_cell(dense)] * len(header)]]
        for method in dict.fromkeys(r["method"] for r in group if r["method"] != "dense"):
            cells = {r["sparsity"]: _cell(r) for r in group if r["method"] == method}
            table.append([method, *(cells.get(s, "—") for s in levels)])
        out += [f"### {dataset} · {model}: test accuracy (%), mean ± std over seeds", ""]
        out += markdown_table(["method", *header], table, align="l" + "r" * len(header))
        seeds = sorted({n for r in group for n in r["seeds"].split()}, key=int)
        out += [
            "",
            f"Seeds: {', '.join(seeds)}. Runs per cell: "
            f"{', '.join(sorted({str(r['runs']) for r in group}))}.",
        ]
        if any(not r["target_reached"] for r in group):
            out.append(
                "A row marked *missed target* holds runs that ended below their target "
                "sparsity (their schedule did not reach it); they sit in the column of the "
                "sparsity they reached."
            )
        out.append("")
    return "\n".join(out)


def _by_setup(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    setups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        setups.setdefault((r["dataset"], r["model"]), []).append(r)
    return setups


def write_comparison(rows: Sequence[Mapping[str, Any]], out_dir: str | Path) -> list[Path]:
    """comparison.md, comparison.csv and one accuracy-vs-sparsity figure per dataset/model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / COMPARISON_MD
    write_atomic(md, comparison_markdown(rows))
    table = out_dir / COMPARISON_CSV
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(map(csv_row, rows))
    write_atomic(table, text.getvalue())
    paths = [md, table]
    setups = _by_setup(rows)
    for (dataset, model), group in setups.items():
        name = (
            "accuracy_vs_sparsity.png"
            if len(setups) == 1
            else f"accuracy_vs_sparsity-{dataset}-{model}.png"
        )
        paths.append(plot_accuracy_vs_sparsity(group, out_dir / name, f"{dataset} · {model}"))
    return paths


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Finished run folders among ``paths``, each once; a folder that is not a run itself (a
    sweep folder) contributes the finished runs directly inside it."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / REPORT_JSON).is_file():
            found.append(p)
        elif p.is_dir():
            inside = sorted(q for q in p.iterdir() if (q / REPORT_JSON).is_file())
            if not inside:
                raise FileNotFoundError(f"{p} is neither a finished run nor a folder of them")
            found += inside
        else:
            raise FileNotFoundError(f"no run folder at {p}")
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())
