"""Reports: one run's report (its numbers as a dict, report.json, report.md, plots), and
comparison tables over many runs.

Everything but :func:`run_report` (built from a :class:`RunRecord`, plain values of the trained
run) is redrawn from files in the run folders (report.json, metrics.jsonl), so ``granet report``
can regenerate it long after the runs ended.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import statistics
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import granet
from granet.experiment import flops as flop_count
from granet.experiment.config import METHOD_CHOICES, Config
from granet.experiment.files import to_json, write_atomic
from granet.experiment.folder import REPORT_JSON, REPORT_MD, read_marker
from granet.experiment.models import build_model
from granet.experiment.plots import (
    ITOP_PNG,
    LAYER_DENSITY_PNG,
    TRAINING_PNG,
    plot_accuracy_vs_sparsity,
    plot_run,
)
from granet.experiment.records import read_metrics, read_report
from granet.experiment.tables import markdown_table
from granet.selection import select_parameters

TEST_CHECKPOINT_RULE = (
    "best validation accuracy among the epochs at the final sparsity (the last epoch always "
    "counts; without a validation split, the last epoch); test set evaluated once, on this "
    "checkpoint"
)
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


# ----------------------------------------------------------------------------- one run
def layer_summary(model: nn.Module, sp: granet.Sparsifier | None) -> dict[str, dict[str, Any]]:
    """Per sparse tensor: shape, numel, nnz, density (for dense: all conv/linear weights)."""
    if sp is not None:
        return sp.stats()["layers"]
    return {
        name: {"density": 1.0, "nnz": p.numel(), "numel": p.numel(), "shape": list(p.shape)}
        for name, p in select_parameters(model)
    }


def hardware(device: torch.device, processes: int = 1) -> str:
    """The machine in words: the GPU's name, or the CPU's cores and architecture."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{os.cpu_count()}-core CPU ({platform.machine()})"
    return name if processes == 1 else f"{processes} processes x {name}"


@dataclass(frozen=True)
class RunRecord:
    """A trained run as its report reads it, in plain values: what the trainer holds once the
    tested checkpoint's weights and masks are loaded."""

    run_dir: Path
    config: Config  # resolved
    data_shape: Mapping[str, int]  # num_classes, in_channels, image_size
    data_source: str
    split_sizes: Mapping[str, int]  # train, val, test
    sparse_names: Sequence[str]
    layers: Mapping[str, Mapping[str, Any]]  # layer_summary of the tested model
    sparse: bool  # trained by a sparsifier (not the dense baseline)
    sparsity: float
    itop_rate: float | None
    target_reached: bool
    parameters: int
    train_seconds: float
    steps: int
    steps_per_epoch: int
    device: torch.device
    processes: int


def run_report(
    run: RunRecord,
    best: Mapping[str, Any],
    test_loss: float,
    test_acc: float,
    metrics: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """The numbers of a finished run (report.json): ``best`` is the tested checkpoint, whose
    weights and masks ``run`` describes."""
    c, layers, shape = run.config, run.layers, run.data_shape
    counts = flop_count.count_flops(
        lambda: build_model(c.model, **shape),
        (shape["in_channels"], shape["image_size"], shape["image_size"]),
        list(run.sparse_names),
    )
    pruned = sum(v["numel"] - v["nnz"] for v in layers.values())
    marker = read_marker(run.run_dir) or {}
    return {
        "run_dir": str(run.run_dir),
        "run_id": marker.get("run_id"),
        "method": c.method,
        "model": c.model,
        "dataset": c.dataset,
        "seed": c.seed,
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "checkpoint": {
            "which": "best",
            "epoch": best["epoch"],
            "val_accuracy": best["val_accuracy"],
            "rule": TEST_CHECKPOINT_RULE,
        },
        "last_epoch_val_accuracy": metrics[-1]["val_accuracy"],
        "sparsity": run.sparsity,
        "target_sparsity": c.sparsity if run.sparse else 0.0,
        "target_reached": run.target_reached,
        "itop_rate": run.itop_rate,
        "train_seconds": run.train_seconds,
        "epochs": c.epochs,
        "steps": run.steps,
        "steps_per_epoch": run.steps_per_epoch,
        "parameters": {"total": run.parameters, "nonzero": run.parameters - pruned},
        "layers": layers,
        "flops": {
            "inference_per_sample": flop_count.inference_flops(
                counts, {n: v["density"] for n, v in layers.items()}
            ),
            "training_total": flop_count.training_flops(
                counts, [(m["samples"], m["layer_density"]) for m in metrics]
            ),
            "counted": flop_count.NOTE,
        },
        "data": {
            "dataset": c.dataset,
            "source": run.data_source,
            **run.split_sizes,
        },
        "environment": {
            "device": str(run.device),
            "hardware": hardware(run.device, run.processes),
            "processes": run.processes,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "granet": granet.__version__,
        },
        "config": c.to_dict(),
    }


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: ``1 epoch``, ``10 epochs``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def csv_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """``row`` as a CSV shows it: floats to 12 significant digits, so that float noise
    (``0.19999999999999996`` for 1 - 0.8) reads as the number meant; the run's own files keep
    the exact values."""
    return {k: float(f"{v:.12g}") if isinstance(v, float) else v for k, v in row.items()}


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
        *markdown_table(
            ["", ""],
            [
                [
                    "test accuracy",
                    f"**{percent(r['test_accuracy'])}** (checkpoint `best`: epoch {ck['epoch']} "
                    f"of {r['epochs']}, validation accuracy {percent(ck['val_accuracy'])})",
                ],
                ["sparsity", f"{percent(r['sparsity'])} of the sparse layers' weights ({target})"],
                [
                    "non-zero parameters",
                    f"{r['parameters']['nonzero']:,} of {r['parameters']['total']:,}",
                ],
                ["ITOP rate", itop],
                [
                    "training time",
                    f"{r['train_seconds']:.1f} s, {r['steps']} steps on {env['device']} "
                    f"({env['hardware']}), torch {env['torch']}",
                ],
                [
                    "inference FLOPs per sample",
                    f"{_si(inf['dense'])} dense, {_si(inf['sparse'])} sparse ({inf['ratio']:.3f}x)",
                ],
                [
                    "training FLOPs, whole run",
                    f"{_si(tr['dense'])} dense, {_si(tr['sparse'])} sparse ({tr['ratio']:.3f}x)",
                ],
                [
                    "data",
                    f"{d['source']}; {d['train']} train, {d['val']} validation, {d['test']} test",
                ],
            ],
        ),
        "",
        f"Test accuracy: {ck['rule']}.",
        f"FLOPs: {fl['counted']}",
        "",
        f"![accuracy and sparsity]({TRAINING_PNG})",
        f"![per-layer density]({LAYER_DENSITY_PNG})",
    ]
    if r["itop_rate"] is not None:
        lines.append(f"![ITOP rate]({ITOP_PNG})")
    layers = [
        [
            f"`{name}`",
            "x".join(map(str, v["shape"])),
            f"{v['density']:.4f}",
            f"{v['nnz']:,} / {v['numel']:,}",
        ]
        for name, v in r["layers"].items()
    ]
    lines += ["", "## Layers", ""]
    lines += markdown_table(["layer", "shape", "density", "non-zeros"], layers, align="llrr")
    epochs = []
    for m in metrics:
        itop = "—" if m["itop_rate"] is None else f"{m['itop_rate']:.3f}"
        regrow = "—" if m["regrow_fraction"] is None else f"{m['regrow_fraction']:.3f}"
        star = " *" if m.get("best") else ""
        epochs.append(
            [
                f"{m['epoch']}{star}",
                f"{m['train_loss']:.4f}",
                percent(m["train_accuracy"]),
                percent(m["val_accuracy"]),
                percent(m["sparsity"]),
                itop,
                regrow,
                f"{m['lr']:.3g}",
                f"{m['seconds']:.1f}",
            ]
        )
    header = ["epoch", "train loss", "train acc", "val acc", "sparsity", "ITOP", "regrow", "lr"]
    lines += ["", "## Epochs", ""]
    lines += markdown_table([*header, "seconds"], epochs, align="r" * (len(header) + 1))
    lines += ["", "`*`: a new best checkpoint (eligible epochs only).", ""]
    return "\n".join(lines)


def write_report(
    run_dir: Path, report: Mapping[str, Any], metrics: Sequence[Mapping[str, Any]]
) -> str:
    """Write report.json, report.md and the run's figures; return the markdown."""
    run_dir = Path(run_dir)
    markdown = render_markdown(report, metrics)
    plot_run(run_dir, metrics, report)
    write_atomic(run_dir / REPORT_MD, markdown)
    write_atomic(run_dir / REPORT_JSON, to_json(report, indent=2) + "\n")  # last: "finished"
    return markdown


def redraw(run_dir: str | Path) -> str:
    """Regenerate report.md and the figures of a finished run from its files."""
    report, metrics = read_report(run_dir), read_metrics(run_dir)
    try:  # the fields read_report does not check: before anything is written
        render_markdown(report, metrics)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise ValueError(
            f"{Path(run_dir) / REPORT_JSON} is not a granet report ({type(e).__name__}: {e})"
        ) from None
    return write_report(Path(run_dir), report, metrics)


# ---------------------------------------------------------------------------- comparisons
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
