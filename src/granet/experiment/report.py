"""One run's report: its numbers as a dict, report.json, report.md and its figures (the
comparisons over many runs: :mod:`granet.experiment.comparison`).

Everything but :func:`run_report` (built from a :class:`RunRecord`, plain values of the trained
run) is redrawn from files in the run folders (report.json, metrics.jsonl), so ``granet report``
can regenerate it long after the runs ended.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import granet
from granet.experiment import flops as flop_count
from granet.experiment.config import Config
from granet.experiment.files import to_json, write_atomic
from granet.experiment.folder import REPORT_JSON, REPORT_MD, read_marker
from granet.experiment.models import build_model
from granet.experiment.plots import (
    ITOP_PNG,
    LAYER_DENSITY_PNG,
    TRAINING_PNG,
    plot_run,
)
from granet.experiment.records import read_metrics, read_report
from granet.experiment.tables import markdown_table, percent, si
from granet.selection import select_parameters

TEST_CHECKPOINT_RULE = (
    "best validation accuracy among the epochs at the final sparsity (the last epoch always "
    "counts; without a validation split, the last epoch); test set evaluated once, on this "
    "checkpoint"
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
                    f"{si(inf['dense'])} dense, {si(inf['sparse'])} sparse ({inf['ratio']:.3f}x)",
                ],
                [
                    "training FLOPs, whole run",
                    f"{si(tr['dense'])} dense, {si(tr['sparse'])} sparse ({tr['ratio']:.3f}x)",
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
