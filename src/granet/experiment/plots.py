"""Figures of a run and of a comparison, drawn with matplotlib's object API (no pyplot state,
no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from granet.experiment.files import write_atomic

TRAINING_PNG = "training.png"
LAYER_DENSITY_PNG = "layer_density.png"
ITOP_PNG = "itop_rate.png"


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fmt = Path(path).suffix[1:] or "png"
    write_atomic(path, lambda f: fig.savefig(f, format=fmt, dpi=120))  # never through a link
    return path


def plot_training(metrics: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Train and validation accuracy, and sparsity, per epoch."""
    epochs = [m["epoch"] for m in metrics]
    fig = Figure(figsize=(9, 3.6))
    acc, sp = fig.subplots(1, 2)
    acc.plot(epochs, [100 * m["train_accuracy"] for m in metrics], marker=".", label="train")
    validated = [m for m in metrics if m["val_accuracy"] is not None]
    acc.plot(
        [m["epoch"] for m in validated],
        [100 * m["val_accuracy"] for m in validated],
        marker=".",
        label="validation",
    )
    best = [m for m in validated if m.get("best")]
    if best:
        acc.scatter(
            [m["epoch"] for m in best],
            [100 * m["val_accuracy"] for m in best],
            marker="*",
            s=80,
            color="C3",
            zorder=3,
            label="new best (eligible)",
        )
    acc.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    acc.legend()
    acc.grid(alpha=0.3)
    sp.plot(epochs, [100 * m["sparsity"] for m in metrics], marker=".", color="C2")
    sp.set(
        xlabel="epoch", ylabel="sparsity (%)", title="Sparsity of the sparse layers", ylim=(0, 100)
    )
    sp.grid(alpha=0.3)
    return _save(fig, path)


def plot_layer_density(layers: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """Density of each sparse tensor, in model order."""
    names = list(layers)
    fig = Figure(figsize=(7, 1.2 + 0.25 * len(names)))
    ax = fig.subplots()
    ax.barh(range(len(names)), [layers[n]["density"] for n in names], color="C0")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="density (fraction of weights active)", xlim=(0, 1), title="Per-layer density")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_itop(metrics: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """In-time over-parameterization rate: fraction of weights ever active, per epoch."""
    fig = Figure(figsize=(5, 3.6))
    ax = fig.subplots()
    ax.plot(
        [m["epoch"] for m in metrics], [m["itop_rate"] for m in metrics], marker=".", color="C4"
    )
    ax.set(
        xlabel="epoch", ylabel="ITOP rate", ylim=(0, 1.02), title="Weights ever active (ITOP rate)"
    )
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_run(
    run_dir: Path, metrics: Sequence[Mapping[str, Any]], report: Mapping[str, Any]
) -> list[Path]:
    """All figures of one run, into its folder; ITOP only for sparse methods."""
    paths = [
        plot_training(metrics, run_dir / TRAINING_PNG),
        plot_layer_density(report["layers"], run_dir / LAYER_DENSITY_PNG),
    ]
    if report["itop_rate"] is not None:
        paths.append(plot_itop(metrics, run_dir / ITOP_PNG))
    return paths


def plot_accuracy_vs_sparsity(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Mean test accuracy (error bars: std over seeds) against sparsity, one line per method;
    the dense baseline as a horizontal band."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, method in enumerate(methods):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["sparsity"])
        means = [100 * r["test_accuracy_mean"] for r in mine]
        stds = [100 * (r["test_accuracy_std"] or 0.0) for r in mine]
        if method == "dense":
            ax.axhline(means[0], color="k", linestyle="--", label="dense")
            ax.axhspan(means[0] - stds[0], means[0] + stds[0], color="k", alpha=0.08)
        else:
            ax.errorbar(
                [100 * r["sparsity"] for r in mine],
                means,
                yerr=stds,
                marker="o",
                capsize=3,
                label=method,
                color=f"C{i}",
            )
    ax.set(xlabel="sparsity (%)", ylabel="test accuracy (%)", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_plasticity(
    rows: Sequence[Mapping[str, Any]],
    path: Path,
    variants: Sequence[str],
    decays: Sequence[float],
    title: str,
) -> Path:
    """Pruning plasticity against the pruning epoch, one line per pruning rate, one panel per
    variant (the paper's figure); the epochs where the learning rate decays as dotted lines."""
    fig = Figure(figsize=(1.0 + 4.2 * len(variants), 3.8))
    axes = fig.subplots(1, len(variants), sharey=True, squeeze=False)[0]
    rates = sorted({r["rate"] for r in rows})
    for ax, variant in zip(axes, variants):
        for i, rate in enumerate(rates):
            mine = sorted(
                (r for r in rows if r["variant"] == variant and r["rate"] == rate),
                key=lambda r: r["prune_epoch"],
            )
            ax.plot(
                [r["prune_epoch"] for r in mine],
                [r["plasticity"] for r in mine],
                marker="o",
                color=f"C{i}",
                label=f"rate {rate:g}",
            )
        for j, epoch in enumerate(decays):
            ax.axvline(epoch, color="k", linestyle=":", label="LR decay" if j == 0 else None)
        ax.axhline(1.0, color="0.6", linewidth=0.8)
        ax.set(xlabel="pruning epoch", title=variant)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("plasticity (t_continue / t_pre)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)
