"""Does the reference's GMP schedule explain our GMP gap on the MLP?

The reference code's GMP starts from dense masks, but its cubic schedule starts from
``1 - --init-density`` (0.5 by default), so unless that flag is 1.0 its first round prunes
straight to about 50% by magnitude. Ours follows the cubic from 0%. This reruns our GMP MLP runs
(same configs, from ``runs/accuracy/mlp``) with the schedule starting at ``--start`` while the
masks still start dense, and prints the test accuracies beside ours and the reference's.

    (from the repository root)
    python benchmarks/accuracy/gmp_schedule.py --sparsities 0.9 0.95 0.98 --seeds 1
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from granet.experiment import train as training
from granet.experiment.config import Config, make_config, read_config_file
from granet.experiment.datasets import load_dataset
from granet.schedules import CubicSparsity

REFERENCE = {0.9: 90.34, 0.95: 90.12, 0.98: 90.42}


def schedule_from(start: float, config: Config, total_steps: int) -> CubicSparsity:
    """The run's cubic schedule, starting at sparsity ``start`` instead of the masks' own."""
    return CubicSparsity(
        start,
        config.sparsity,
        round(config.prune_start * total_steps),
        round(config.prune_end * total_steps),
        config.update_every,
    )


def read_test_accuracy(run_dir: Path) -> float:
    return 100.0 * json.loads((run_dir / "report.json").read_text())["test_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/accuracy/mlp"))
    parser.add_argument("--out", type=Path, default=Path("runs/accuracy/mlp-gmp-from-half"))
    parser.add_argument("--start", type=float, default=0.5)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    args = parser.parse_args()

    print(f"| sparsity | seed | ours: cubic from 0% | from {args.start:.0%} | reference code |")
    print("|--:|--:|--:|--:|--:|")
    for sparsity in args.sparsities:
        for seed in args.seeds:
            name = f"gmp-s{sparsity:g}-seed{seed}"
            config = make_config(read_config_file(args.runs / name / "config.yaml"))
            run_dir = args.out / name
            if not (run_dir / "report.json").exists():
                data = load_dataset(config.dataset, config.data_root, val_size=config.val_size)
                total = config.epochs * math.ceil(len(data.train) / config.batch_size)
                schedule = schedule_from(args.start, config, total)
                training.train(
                    config,
                    run_dir,
                    progress=False,
                    sparsifier_options={"sparsity_schedule": schedule},
                )
            print(
                f"| {sparsity:.0%} | {seed} | {read_test_accuracy(args.runs / name):.2f} | "
                f"{read_test_accuracy(run_dir):.2f} | {REFERENCE.get(sparsity, float('nan')):.2f} |"
            )


if __name__ == "__main__":
    main()
