"""Our Fashion-MNIST MLP accuracies beside the reference code's, run for run.

The reference figures were measured for this project with the reference GraNet code on one H100,
seed 1, with the recipe of ``mlp.yaml``. A gap is flagged when it is larger than the seed-to-seed
spread (the sample standard deviation of our seeds; only where we ran more than one).

    python benchmarks/accuracy/reference.py runs/accuracy/mlp runs/accuracy/mlp-granet-s0
"""

from __future__ import annotations

import argparse

from granet.experiment.records import read_report
from granet.experiment.comparison import find_runs, summarize

# test accuracy (%) at 90 / 95 / 98% sparsity; the dense run has no sparsity
REFERENCE: dict[str, tuple[float, float, float]] = {
    "dense": (90.27, 90.27, 90.27),
    "granet (s_i=0)": (89.98, 89.98, 90.02),
    "granet (s_i=0.5)": (89.79, 89.76, 89.66),
    "gmp": (90.34, 90.12, 90.42),
    "rigl": (89.08, 88.48, 87.43),
    "static": (88.90, 87.74, 84.68),
}
SPARSITIES = (0.9, 0.95, 0.98)


def table(rows: list[dict]) -> str:
    """Markdown: one line per method and sparsity, ours (mean ± std, range) beside the reference."""
    by_key = {(r["method"], r["sparsity"]): r for r in rows}
    lines = [
        "| method | sparsity | ours: mean ± std | ours: range | seeds | reference | ours − ref |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    for method, reference in REFERENCE.items():
        for sparsity, ref in zip(SPARSITIES, reference):
            row = by_key.get((method, 0.0 if method == "dense" else sparsity))
            if row is None:
                lines.append(f"| {method} | {sparsity:.0%} | not run | | | {ref:.2f} | |")
                continue
            mean, low, high = (100 * row[f"test_accuracy_{k}"] for k in ("mean", "min", "max"))
            std = row["test_accuracy_std"]
            spread = "" if std is None else f" ± {100 * std:.2f}"
            beyond = std is not None and abs(mean - ref) > 100 * std
            gap = f"{mean - ref:+.2f}" + (" **> std**" if beyond else "")
            lines.append(
                f"| {method} | {sparsity:.0%} | {mean:.2f}{spread} | {low:.2f}–{high:.2f} "
                f"| {row['seeds']} | {ref:.2f} | {gap} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders or sweep folders of MLP runs")
    args = ap.parse_args(argv)
    reports = [read_report(p) for p in find_runs(args.runs)]
    mlp = [r for r in reports if r["model"] == "mlp" and r["dataset"] == "fashion-mnist"]
    text = table(summarize(mlp))
    print(text)
    return text


if __name__ == "__main__":
    main()
