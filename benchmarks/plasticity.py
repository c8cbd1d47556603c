"""The pruning-plasticity study of docs/plasticity.md: Fashion-MNIST, MLP and LeNet-5, a dense
base and a 50% sparse (RigL) base, seeds 0 and 1, each a ``granet plasticity`` run.

    python benchmarks/plasticity.py run [--streams 2]     # the 8 studies, 2 at a time (hours)
    python benchmarks/plasticity.py summary               # the tables and figures of the docs

``run`` starts the studies as separate ``granet plasticity`` processes (one thread each), logs
each to ``OUT/<study>.log`` and its wall-clock time to ``OUT/times.jsonl``; run it again to
resume stopped studies. ``summary`` reads every study's ``plasticity.csv`` and prints, per model
and base, the mean over seeds (and the spread) of each cell, the two findings of the paper as
numbers, and draws ``docs/img/plasticity_<model>_<base>.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = [
    *("--dataset", "fashion-mnist", "--epochs", "10", "--train-size", "6000"),
    *("--prune-epochs", "2", "4", "6", "8", "9", "--rates", "0.2", "0.5", "0.9"),
]
BASES = {"dense": [], "rigl50": ["--method", "rigl", "--sparsity", "0.5"]}
MODELS = ("mlp", "lenet5")
SEEDS = (0, 1)
STUDIES = {
    f"{model}-{base}-seed{seed}": [*COMMON, "--model", model, *flags, "--seed", str(seed)]
    for seed in SEEDS
    for model in MODELS
    for base, flags in BASES.items()
}


def run(out: Path, streams: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    pending, running = list(STUDIES), {}
    while pending or running:
        while pending and len(running) < streams:
            name = pending.pop(0)
            cmd = [sys.executable, "-m", "granet", "plasticity", *STUDIES[name]]
            cmd += ["--out", str(out / name)]
            with (out / f"{name}.log").open("a") as log:
                running[name] = (
                    subprocess.Popen(cmd, stdout=log, stderr=log, env=env),
                    time.time(),
                )
            print(f"[plasticity] started {name}", flush=True)
        for name, (proc, started) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                record = {"study": name, "exit": proc.returncode, "seconds": time.time() - started}
                with (out / "times.jsonl").open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"[plasticity] {name}: exit {proc.returncode}", flush=True)
        time.sleep(5)


def _rows(out: Path, model: str, base: str) -> list[dict[str, str]]:
    rows = []
    for seed in SEEDS:
        path = out / f"{model}-{base}-seed{seed}" / "plasticity.csv"
        if path.is_file():
            with path.open() as f:
                rows += list(csv.DictReader(f))
    return rows


def _mean(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary(out: Path, figures: Path) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from granet.experiment.plots import plot_plasticity

    for model in MODELS:
        for base in BASES:
            rows = _rows(out, model, base)
            if not rows:
                continue
            seeds = sorted({r["seed"] for r in rows})
            cells: dict[tuple, list[dict[str, str]]] = defaultdict(list)
            for r in rows:
                cells[(r["variant"], float(r["rate"]), int(r["prune_epoch"]))].append(r)
            t_final = _mean(
                [float(r["t_final"]) for r in rows if r["cell"].startswith("e2-r0.2-prune")]
            )
            print(f"\n### {model}, {base} base (seeds {', '.join(seeds)})\n")
            print(
                f"Unpruned run's final test accuracy: {100 * t_final[0]:.2f} ± {100 * t_final[1]:.2f}%\n"
            )
            variants = sorted(
                {k[0] for k in cells}, key=["prune", "prune+regrow", "prune+regrow-once"].index
            )
            rates = sorted({k[1] for k in cells})
            epochs = sorted({k[2] for k in cells})
            head = "| epoch | lr | t_pre |" + "".join(
                f" {v} {r:g} |" for r in rates for v in variants
            )
            print(head)
            print("|" + "---|" * (3 + len(rates) * len(variants)))
            means = []
            for e in epochs:
                some = cells[(variants[0], rates[0], e)]
                t_pre = _mean([float(r["t_pre"]) for r in some])
                line = f"| {e} | {float(some[0]['lr_at_prune']):.3g} | {100 * t_pre[0]:.1f} |"
                for r in rates:
                    for v in variants:
                        group = cells[(v, r, e)]
                        p = _mean([float(x["plasticity"]) for x in group])
                        line += f" {p[0]:.3f} ± {p[1]:.3f} |"
                        means.append(
                            {"variant": v, "rate": r, "prune_epoch": e, "plasticity": p[0]}
                        )
                print(line)
            print("\nRegeneration (prune+regrow minus prune plasticity, mean over seeds):\n")
            for r in rates:
                diffs = []
                for e in epochs:
                    a = _mean([float(x["plasticity"]) for x in cells[("prune+regrow", r, e)]])[0]
                    b = _mean([float(x["plasticity"]) for x in cells[("prune", r, e)]])[0]
                    diffs.append(f"e{e} {a - b:+.3f}")
                print(f"- rate {r:g}: " + ", ".join(diffs))
            decays = [5.0, 7.5]
            title = f"{model} on Fashion-MNIST, {base} base, mean of seeds {', '.join(seeds)}"
            path = figures / f"plasticity_{model}_{base}.png"
            plot_plasticity(means, path, variants, decays, title)
            print(f"\n![plasticity]({path.relative_to(ROOT / 'docs')})")
    times = out / "times.jsonl"
    if times.is_file():
        print("\nWall-clock times:\n")
        for line in times.read_text().splitlines():
            t = json.loads(line)
            print(f"- {t['study']}: {t['seconds'] / 60:.0f} min (exit {t['exit']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("run", "summary"))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "plasticity")
    parser.add_argument("--streams", type=int, default=2, help="studies at a time")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "img")
    args = parser.parse_args()
    if args.what == "run":
        run(args.out, args.streams)
    else:
        summary(args.out, args.figures)


if __name__ == "__main__":
    main()
