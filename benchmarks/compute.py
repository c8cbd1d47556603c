"""Sparse kernels in the training step: ``compute="sparse"`` / ``"auto"`` against dense compute.

``step``: copies of one model train side by side in one process, one step each in turn, with a
sparsifier at fixed masks (``granet.Static``: no topology round, so only the step is timed):
``dense`` (today's path: dense kernels on masked weights, the dense SGD step, the mask multiply)
and ``sparse`` (``compute="sparse"``: CSR kernels for the Linear layers, the SGD update on the
active entries). SGD with Nesterov momentum 0.9 and weight decay 5e-4, as the reference recipe.
Reported: median step times (wall clock, and the process's CPU time, which another process
on the same cores does not inflate), their ratios, the bytes the training state keeps (weights, gradients,
optimizer state, the sparsifier's masks and multipliers, the CSR positions) and, with
``--profile``, the top operators of one sparse step.

``run``: whole ``granet train`` runs of the reference recipe (GraNet 50% -> 98%, MLP,
Fashion-MNIST, 20 epochs), ``--compute dense`` and ``auto`` in turn (dense, auto, auto, dense
with ``--repeats 2``), each in its own process: wall clock, training seconds, test accuracy and
peak resident memory (``ru_maxrss`` of that process).

    python benchmarks/compute.py step --threads 1
    python benchmarks/compute.py run --out runs/compute
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from overhead import describe, emit
from torch import nn

import granet
from granet.experiment.models import build_model

ROOT = Path(__file__).resolve().parents[1]
RECIPE = [
    "--config", str(ROOT / "configs" / "fashion-mnist.yaml"),
    "--model", "mlp", "--epochs", "20", "--lr", "0.05", "--update-every", "100",
    "--prune-start", "0.0", "--prune-end", "0.5", "--method", "granet", "--sparsity", "0.98",
]  # fmt: skip


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer, sp: granet.Sparsifier) -> int:
    """Bytes of the tensors a training step keeps between steps (each tensor counted once)."""
    kept = {}
    for p in model.parameters():
        kept[id(p)] = p
        if p.grad is not None:
            kept[id(p.grad)] = p.grad
        kept.update({id(v): v for v in opt.state[p].values() if torch.is_tensor(v)})
    _, multipliers = sp._targets()
    kept.update({id(t): t for t in [*sp._masks, *multipliers]})
    if sp._compute is not None:
        for layer in sp._compute.layers:
            if layer._positions is not None:
                pos = vars(layer._positions)
                kept.update({id(t): t for t in pos.values() if torch.is_tensor(t)})
    return sum(t.numel() * t.element_size() for t in kept.values())


def step_benchmark(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for model_name in args.models:
        for batch in args.batch_sizes:
            for sparsity in args.sparsities:
                results.append(time_steps(model_name, batch, sparsity, args))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return {
        "benchmark": "compute-step",
        "device": describe(torch.device("cpu")),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_before": args.load_before,
        "load_after": os.getloadavg(),
        "results": results,
    }


def time_steps(model_name: str, batch: int, sparsity: float, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    base = build_model(model_name)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    variants = {}
    for compute in ("dense", "sparse"):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(
            model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
        sp = granet.Static(model, opt, sparsity=sparsity, total_steps=10**6, compute=compute)
        variants[compute] = (model, opt, sp)

    def step(compute: str) -> None:
        model, opt, _ = variants[compute]
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.warmup + args.steps):
        for name in variants if i % 2 == 0 else reversed(variants):
            t0, c0 = time.perf_counter(), time.process_time()
            step(name)
            if i >= args.warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    med = {name: statistics.median(t) for name, t in wall.items()}
    med_cpu = {name: statistics.median(t) for name, t in cpu.items()}
    sp = variants["sparse"][2]
    result = {
        "model": model_name,
        "batch_size": batch,
        "sparsity": sparsity,
        "steps": args.steps,
        "median_step_ms": {k: 1000 * v for k, v in med.items()},
        "speedup": med["dense"] / med["sparse"],
        "median_step_cpu_ms": {k: 1000 * v for k, v in med_cpu.items()},
        "cpu_speedup": med_cpu["dense"] / med_cpu["sparse"],
        "sparse_layers": sp._compute.sparse_layers(),
        "state_bytes": {k: state_bytes(*v) for k, v in variants.items()},
    }
    if args.profile:
        result["profile"] = profile(lambda: step("sparse"))
    return result


def profile(step: callable, rows: int = 15) -> str:
    """The top operators of one step by self CPU time (torch.profiler's table)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def run_benchmark(args: argparse.Namespace) -> dict:
    """Whole training runs, one process each, in the order dense, auto (, auto, dense ...)."""
    order = []
    for r in range(args.repeats):
        order += ["dense", "auto"] if r % 2 == 0 else ["auto", "dense"]
    runs = []
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for i, compute in enumerate(order):
        out = args.out / f"{compute}-{i}"
        cmd = [sys.executable, "-m", "granet", "train", *RECIPE, *args.recipe]
        cmd += ["--seed", str(args.seed), "--compute", compute, "--out", str(out)]
        load = os.getloadavg()
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t0
        if status != 0:
            raise SystemExit(f"{' '.join(cmd)} failed (status {status})")
        report = json.loads((out / "report.json").read_text())
        runs.append(
            {
                "compute": compute,
                "command": " ".join(cmd[1:]),
                "wall_s": wall,
                "train_s": report["train_seconds"],
                "test_accuracy": report["test_accuracy"],
                "peak_rss_mib": usage.ru_maxrss / 1024,
                "load_before": load,
                "load_after": os.getloadavg(),
            }
        )
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    by = {c: [r for r in runs if r["compute"] == c] for c in ("dense", "auto")}
    med = {c: statistics.median(r["wall_s"] for r in rs) for c, rs in by.items()}
    return {
        "benchmark": "compute-run",
        "device": describe(torch.device("cpu")),
        "torch": torch.__version__,
        "runs": runs,
        "median_wall_s": med,
        "speedup": med["dense"] / med["auto"],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["step", "run"], nargs="?", default="step")
    ap.add_argument("--models", nargs="+", default=["mlp", "lenet5"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 32])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.8, 0.9, 0.95, 0.98])
    ap.add_argument("--steps", type=int, default=40, help="timed steps per variant (median)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--profile", action="store_true", help="profile one sparse step of each")
    ap.add_argument("--out", type=Path, default=Path("runs/compute"), help="run: run folders")
    ap.add_argument("--repeats", type=int, default=1, help="run: pairs of runs")
    ap.add_argument("--seed", type=int, default=1, help="run: the runs' seed")
    ap.add_argument("--recipe", nargs=argparse.REMAINDER, default=[], help="run: extra flags")
    ap.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    args.load_before = os.getloadavg()
    if args.quick:
        args.models, args.batch_sizes, args.sparsities = ["mlp", "lenet5"], [32], [0.95]
        args.steps, args.warmup = 2, 1
        args.recipe = ["--epochs", "1", "--dataset", "synthetic", "--update-every", "2"]
    result = step_benchmark(args) if args.what == "step" else run_benchmark(args)
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
