"""The pruning-plasticity study of docs/plasticity.md: Fashion-MNIST, MLP and LeNet-5, a dense
base and a 50% sparse (RigL) base, seeds 0 and 1, each a ``granet plasticity`` run.

    python benchmarks/plasticity.py run [--streams 2]     # the 8 studies, 2 at a time (~1 h)
    python benchmarks/plasticity.py run --studies lenet5-dense-seed0 ...   # some of them
    python benchmarks/plasticity.py run --studies mlp-dense-seed0-once ...  # one-shot regrowth
    python benchmarks/plasticity.py summary               # the tables and figures of the docs

``run`` starts the studies as separate ``granet plasticity`` processes (one thread each), logs
each to ``OUT/<study>.log`` and its wall-clock time to ``OUT/times.jsonl``; run it again to
resume stopped studies. ``summary`` reads every study's ``plasticity.csv`` and prints, per model
and base, the mean over seeds (and the spread) of each cell, the two findings of the paper as
numbers, the ``<study>-once`` studies (``prune+regrow-once``) against ``prune``, and draws
``docs/img/plasticity_<model>_<base>.png``.
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
# the paper's one-shot regrowth, its own studies (their base runs are those above, trained again)
ONCE = {
    f"{name}-once": [*flags, "--variants", "prune+regrow-once"] for name, flags in STUDIES.items()
}
STUDIES |= ONCE
MAIN = [name for name in STUDIES if name not in ONCE]


def run(out: Path, streams: int, studies: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    pending, running = list(studies), {}
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
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _study(rows: list[dict[str, str]]) -> dict[tuple, list[float]]:
    """(variant, rate, epoch, column) -> the values over seeds."""
    cells: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        for column in ("plasticity", "t_pre", "t_after_prune", "t_continue", "final_gap"):
            key = (r["variant"], float(r["rate"]), int(r["prune_epoch"]), column)
            cells[key].append(float(r[column]))
    return cells


def summary(out: Path, figures: Path) -> None:
    """Print the docs' tables and findings; draw the figures."""
    sys.path.insert(0, str(ROOT / "src"))
    from granet.experiment.plots import plot_plasticity

    for model in MODELS:
        for base in BASES:
            rows = _rows(out, model, base)
            if not rows:
                continue
            seeds = sorted({r["seed"] for r in rows})
            finals = {r["seed"]: float(r["t_final"]) for r in rows}
            cells = _study(rows)
            variants = [v for v in ("prune", "prune+regrow") if any(k[0] == v for k in cells)]
            rates = sorted({k[1] for k in cells})
            epochs = sorted({k[2] for k in cells})
            lr = {int(r["prune_epoch"]): float(r["lr_at_prune"]) for r in rows}
            t_final = _mean(list(finals.values()))
            print(f"\n### {model}, {base} base (seeds {', '.join(seeds)})\n")
            print(f"t_final {100 * t_final[0]:.2f} ± {100 * t_final[1]:.2f}%\n")
            head = "| epoch | lr after | t_pre (%) |"
            head += "".join(f" {v} {r:g} |" for r in rates for v in variants)
            print(head + "\n|" + "---|" * (3 + len(rates) * len(variants)))
            means = []
            for e in epochs:
                t_pre = _mean(cells[(variants[0], rates[0], e, "t_pre")])
                line = f"| {e} | {lr[e]:.3g} | {100 * t_pre[0]:.1f} |"
                for r in rates:
                    for v in variants:
                        p = _mean(cells[(v, r, e, "plasticity")])
                        line += f" {p[0]:.3f} ± {p[1]:.3f} |"
                        means.append(
                            {"variant": v, "rate": r, "prune_epoch": e, "plasticity": p[0]}
                        )
                print(line)
            print("\nAccuracy right after the prune (%), mean over seeds:")
            for r in rates:
                after = [_mean(cells[("prune", r, e, "t_after_prune")])[0] for e in epochs]
                print(
                    f"- rate {r:g}: "
                    + ", ".join(f"e{e} {100 * a:.1f}" for e, a in zip(epochs, after))
                )
            print("\nRegeneration gain (prune+regrow minus prune plasticity, mean over seeds):")
            wins = total = 0
            for r in rates:
                gains = []
                for e in epochs:
                    a, b = (cells[(v, r, e, "plasticity")] for v in ("prune+regrow", "prune"))
                    gains.append(statistics.fmean(a) - statistics.fmean(b))
                    wins += sum(x > y for x, y in zip(a, b))
                    total += len(a)
                print(
                    f"- rate {r:g}: " + ", ".join(f"e{e} {g:+.3f}" for e, g in zip(epochs, gains))
                )
            print(f"- prune+regrow above prune in {wins} of {total} (epoch, rate, seed) cells")
            print("\nFinal gap t_continue - t_final (points), mean over seeds:")
            for v in variants:
                for r in rates:
                    gaps = [_mean(cells[(v, r, e, "final_gap")])[0] for e in epochs]
                    text = ", ".join(f"e{e} {100 * g:+.2f}" for e, g in zip(epochs, gaps))
                    print(f"- {v}, rate {r:g}: {text}")
            title = f"{model} on Fashion-MNIST, {base} base, mean of seeds {', '.join(seeds)}"
            path = figures / f"plasticity_{model}_{base}.png"
            plot_plasticity(means, path, variants, [5.0, 7.5], title)
            print(f"\n![plasticity, {model}, {base} base]({os.path.relpath(path, ROOT / 'docs')})")
    for model in MODELS:
        for base in BASES:
            once_summary(out, model, base)
    times = out / "times.jsonl"
    if times.is_file():
        print("\nWall-clock times:")
        for line in times.read_text().splitlines():
            t = json.loads(line)
            print(f"- {t['study']}: {t['seconds'] / 60:.0f} min (exit {t['exit']})")


def once_summary(out: Path, model: str, base: str) -> None:
    """The one-shot regrowth against the fixed prune, cell by cell, over the seeds both have."""
    pairs: dict[tuple[float, int], list[tuple[float, float]]] = defaultdict(list)
    seeds, same = [], True
    for seed in SEEDS:
        name = f"{model}-{base}-seed{seed}"
        once_csv, main_csv = out / f"{name}-once" / "plasticity.csv", out / name / "plasticity.csv"
        if not (once_csv.is_file() and main_csv.is_file()):
            continue
        seeds.append(seed)
        with once_csv.open() as f:
            once = {(float(r["rate"]), int(r["prune_epoch"])): r for r in csv.DictReader(f)}
        with main_csv.open() as f:
            pruned = {
                (float(r["rate"]), int(r["prune_epoch"])): r
                for r in csv.DictReader(f)
                if r["variant"] == "prune"
            }
        for key, r in once.items():
            pairs[key].append((float(pruned[key]["plasticity"]), float(r["plasticity"])))
            same &= pruned[key]["t_final"] == r["t_final"]
    if not pairs:
        return
    rates = sorted({rate for rate, _ in pairs})
    print(f"\n### {model}, {base} base: prune+regrow-once against prune (seeds {seeds})\n")
    print("| epoch |" + "".join(f" prune {r:g} | once {r:g} |" for r in rates))
    print("|" + "---|" * (1 + 2 * len(rates)))
    for e in sorted({e for _, e in pairs}):
        line = f"| {e} |"
        for r in rates:
            prune_p, once_p = zip(*pairs[(r, e)])
            line += f" {statistics.fmean(prune_p):.3f} | {statistics.fmean(once_p):.3f} |"
        print(line)
    for r in rates:
        cells = [c for (rate, _), cs in pairs.items() if rate == r for c in cs]
        wins = sum(o > p for p, o in cells)
        gain = statistics.fmean(o - p for p, o in cells)
        print(f"- rate {r:g}: once above prune in {wins} of {len(cells)} cells, mean {gain:+.3f}")
    print(f"(base runs trained twice, identical final accuracy: {same})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("run", "summary"))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "plasticity")
    parser.add_argument("--streams", type=int, default=2, help="studies at a time")
    parser.add_argument("--figures", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument(
        "--studies", nargs="+", choices=list(STUDIES), default=MAIN, help="(default: the 8)"
    )
    args = parser.parse_args()
    if args.what == "run":
        run(args.out, args.streams, args.studies)
    else:
        summary(args.out, args.figures)


if __name__ == "__main__":
    main()
