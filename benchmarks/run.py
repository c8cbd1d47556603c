"""One entry point for the benchmark suite: runs the chosen benchmarks, keeps every output.

    python benchmarks/run.py                       # everything but the accuracy sweeps
    python benchmarks/run.py overhead update --out results/cpu
    python benchmarks/run.py compute compute-layers compute-conv compute-run   # sparse compute
    python benchmarks/run.py --quick               # seconds: the smoke test of the suite
    python benchmarks/run.py accuracy              # the Fashion-MNIST sweeps (hours on a CPU),
                                                   # then the MLP table beside the reference

Each benchmark runs in its own process; its printed output goes to ``OUT/<name>.txt`` and, where
it writes one, its JSON to ``OUT/<name>.json``. The figures in docs/benchmarks.md come from here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (script, arguments, writes --json)
BENCHMARKS: dict[str, tuple[str, list[str], bool]] = {
    "overhead": ("overhead.py", ["--model", "small-cnn"], True),
    "overhead-resnet50": ("overhead.py", ["--model", "resnet50", "--steps", "50"], True),
    "overhead-resnet50-bf16": (
        "overhead.py",
        ["--model", "resnet50", "--steps", "50", "--amp", "bf16", "--channels-last"],
        True,
    ),
    "epochs": ("epochs.py", [], True),
    "update": ("update_cost.py", ["--plot", "{out}/update_cost.png"], True),
    "memory": ("memory.py", [], True),
    "inference": ("inference.py", [], False),
    "compute": ("compute.py", ["step", "--threads", "1"], True),
    "compute-layers": ("compute.py", ["layers", "--threads", "1"], True),
    "compute-conv": ("compute.py", ["conv", "--threads", "1", "--batch-sizes", "128"], True),
    "compute-run": ("compute.py", ["run", "--threads", "1", "--out", "{out}/compute-runs"], True),
    "fsdp-memory": ("fsdp_memory.py", [], True),
    "fsdp-float32": ("fsdp_float32.py", [], True),
}
ACCURACY = [
    "accuracy/mlp.yaml",
    "accuracy/mlp-granet-s0.yaml",
    "accuracy/mlp-reference-protocol.yaml",
    "accuracy/lenet5.yaml",
    "accuracy/lenet5-granet-s0.yaml",
    "accuracy/lenet5-scale-init.yaml",
]
QUICK = ["overhead", "epochs", "update", "memory", "inference", "compute", "compute-run"]


def run(name: str, out: Path, quick: bool) -> None:
    script, args, writes_json = BENCHMARKS[name]
    cmd = [sys.executable, str(HERE / script), *(a.format(out=out) for a in args)]
    if writes_json:
        cmd += ["--json", str(out / f"{name}.json")]
    if quick:
        cmd.append("--quick")
    print(f"[bench] {name}: {' '.join(cmd[1:])}", flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    (out / f"{name}.txt").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"[bench] {name} failed (exit {result.returncode}):\n{result.stderr}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run: {', '.join(BENCHMARKS)}, accuracy (default: all but accuracy)",
    )
    ap.add_argument("--out", type=Path, default=Path("results"), help="output folder")
    ap.add_argument("--quick", action="store_true", help="tiny settings (a smoke test)")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.names) - {*BENCHMARKS, "accuracy"})
    if unknown:
        ap.error(f"unknown benchmarks {unknown}; choose from {', '.join(BENCHMARKS)}, accuracy")
    names = args.names or (QUICK if args.quick else list(BENCHMARKS))
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name == "accuracy":
            for sweep in ACCURACY:
                subprocess.run(["granet", "sweep", str(HERE / sweep), "--workers", "2"], check=True)
            mlp = ["runs/accuracy/mlp", "runs/accuracy/mlp-granet-s0"]
            table = subprocess.run(
                [sys.executable, str(HERE / "accuracy" / "reference.py"), *mlp],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            (args.out / "accuracy_vs_reference.md").write_text(table)
            print(table)
        else:
            run(name, args.out, args.quick)


if __name__ == "__main__":
    main()
