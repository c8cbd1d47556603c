"""Reports: one run's report.json / report.md / plots, and comparison tables over many runs.

Everything here is redrawn from files in the run folders (report.json, metrics.jsonl), so
``granet report`` can regenerate it long after the runs ended.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import granet
from granet.experiment.config import METHOD_CHOICES
from granet.experiment.plots import (
    ITOP_PNG,
    LAYER_DENSITY_PNG,
    TRAINING_PNG,
    plot_accuracy_vs_sparsity,
    plot_run,
)
from granet.experiment.runs import REPORT_JSON, REPORT_MD, read_metrics, read_report

COMPARISON_MD = "comparison.md"
COMPARISON_CSV = "comparison.csv"
CSV_FIELDS = (
    "dataset",
    "model",
    "method",
    "base_method",
    "sparsity",
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


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def percent(x: float | None) -> str:
    """A fraction as a percentage with two decimals; None as a dash."""
    return "—" if x is None else f"{100 * x:.2f}%"


def render_markdown(report: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]]) -> str:
    """report.md: the headline numbers, per-layer densities, the figures and the epoch table."""
    r, ck, env, fl = report, report["checkpoint"], report["environment"], report["flops"]
    inf, tr = fl["inference_per_sample"], fl["training_total"]
    target = "dense" if r["method"] == "dense" else f"target {percent(r['target_sparsity'])}"
    itop = "—" if r["itop_rate"] is None else f"{r['itop_rate']:.4f}"
    d = r["data"]
    lines = [
        f"# granet run: {r['method']} · {r['model']} · {r['dataset']} · seed {r['seed']}",
        "",
        "| | |",
        "|---|---|",
        f"| test accuracy | **{percent(r['test_accuracy'])}** (checkpoint `best`: epoch "
        f"{ck['epoch']} of {r['epochs']}, validation accuracy {percent(ck['val_accuracy'])}) |",
        f"| sparsity | {percent(r['sparsity'])} of the sparse layers' weights ({target}) |",
        f"| non-zero parameters | {r['parameters']['nonzero']:,} of {r['parameters']['total']:,} |",
        f"| ITOP rate | {itop} |",
        f"| training time | {r['train_seconds']:.1f} s, {r['steps']} steps on {env['device']} "
        f"({env['hardware']}), torch {env['torch']} |",
        f"| inference FLOPs per sample | {_si(inf['dense'])} dense, {_si(inf['sparse'])} sparse "
        f"({inf['ratio']:.3f}x) |",
        f"| training FLOPs, whole run | {_si(tr['dense'])} dense, {_si(tr['sparse'])} sparse "
        f"({tr['ratio']:.3f}x) |",
        f"| data | {d['source']}; {d['train']} train, {d['val']} validation, {d['test']} test |",
        "",
        f"Test accuracy: {ck['rule']}.",
        f"FLOPs: {fl['counted']}",
        "",
        f"![accuracy and sparsity]({TRAINING_PNG})",
        f"![per-layer density]({LAYER_DENSITY_PNG})",
    ]
    if r["itop_rate"] is not None:
        lines.append(f"![ITOP rate]({ITOP_PNG})")
    lines += ["", "## Layers", "", "| layer | shape | density | non-zeros |", "|---|---|--:|--:|"]
    for name, v in r["layers"].items():
        shape = "x".join(map(str, v["shape"]))
        lines.append(f"| `{name}` | {shape} | {v['density']:.4f} | {v['nnz']:,} / {v['numel']:,} |")
    lines += [
        "",
        "## Epochs",
        "",
        "| epoch | train loss | train acc | val acc | sparsity | ITOP | regrow | lr | seconds |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for m in metrics:
        itop = "—" if m["itop_rate"] is None else f"{m['itop_rate']:.3f}"
        regrow = "—" if m["regrow_fraction"] is None else f"{m['regrow_fraction']:.3f}"
        star = " *" if m.get("best") else ""
        lines.append(
            f"| {m['epoch']}{star} | {m['train_loss']:.4f} | {percent(m['train_accuracy'])} | "
            f"{percent(m['val_accuracy'])} | {percent(m['sparsity'])} | {itop} | {regrow} | "
            f"{m['lr']:.3g} | {m['seconds']:.1f} |"
        )
    lines += ["", "`*`: a new best checkpoint (eligible epochs only).", ""]
    return "\n".join(lines)


def write_report(
    run_dir: Path, report: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]]
) -> str:
    """Write report.json, report.md and the run's figures; return the markdown."""
    run_dir = Path(run_dir)
    (run_dir / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report, metrics)
    (run_dir / REPORT_MD).write_text(markdown)
    plot_run(run_dir, metrics, report)
    return markdown


def redraw(run_dir: str | Path) -> str:
    """Regenerate report.md and the figures of a finished run from its files."""
    return write_report(Path(run_dir), read_report(run_dir), read_metrics(run_dir))


# ---------------------------------------------------------------------------- comparisons
def _init_sparsity(r: Mapping[str, Any]) -> float | None:
    """The run's initial sparsity if it differs from its method's own default, else None."""
    init = r.get("config", {}).get("init_sparsity")
    method = granet.METHODS.get(r["method"])
    if init is None or method is None:
        return None
    return None if init == method.resolve(sparsity=r["target_sparsity"]).init_sparsity else init


def summarize(reports: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, model, method, target sparsity): mean and std over seeds.

    Runs of one method with different initial sparsities (GraNet from dense and from 50%) get
    their own rows, labelled ``method (s_i=...)``.
    """
    reports = list(reports)
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in reports:
        key = (r["dataset"], r["model"], r["method"], _init_sparsity(r), r["target_sparsity"])
        groups.setdefault(key, []).append(r)
    variants: dict[str, set] = {}
    for _, _, method, init, _ in groups:
        variants.setdefault(method, set()).add(init)
    rows = []
    for (dataset, model, method, init, sparsity), runs in groups.items():
        label = method
        if len(variants[method]) > 1:
            default = granet.METHODS[method].defaults["init_sparsity"]
            shown = init if init is not None else default
            label = f"{method} (s_i={'s_f' if shown is None else f'{shown:g}'})"
        acc = [r["test_accuracy"] for r in runs]
        itop = [r["itop_rate"] for r in runs if r["itop_rate"] is not None]
        rows.append(
            {
                "dataset": dataset,
                "model": model,
                "method": label,
                "base_method": method,
                "sparsity": sparsity,
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
            order[r["base_method"]],
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
        out += [
            f"### {dataset} · {model}: test accuracy (%), mean ± std over seeds",
            "",
            "| method | " + " | ".join(header) + " |",
            "|---|" + "--:|" * len(header),
        ]
        if dense is not None:
            out.append("| dense | " + " | ".join([_cell(dense)] * len(header)) + " |")
        for method in dict.fromkeys(r["method"] for r in group if r["method"] != "dense"):
            cells = {r["sparsity"]: _cell(r) for r in group if r["method"] == method}
            out.append(f"| {method} | " + " | ".join(cells.get(s, "—") for s in levels) + " |")
        seeds = sorted({n for r in group for n in r["seeds"].split()}, key=int)
        out += [
            "",
            f"Seeds: {', '.join(seeds)}. Runs per cell: "
            f"{', '.join(sorted({str(r['runs']) for r in group}))}.",
            "",
        ]
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
    md.write_text(comparison_markdown(rows))
    table = out_dir / COMPARISON_CSV
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
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
    """Finished run folders among ``paths``; a folder that is not a run itself (a sweep folder)
    contributes the finished runs directly inside it."""
    found = []
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
    return found
