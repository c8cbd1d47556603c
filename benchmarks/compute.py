"""Sparse kernels in the training step: ``compute="sparse"`` / ``"auto"`` against dense compute.

``step``: copies of one model train side by side in one process, one step each in turn, with a
sparsifier at fixed masks (``granet.Static``: no topology round, so only the step is timed):
``dense`` (today's path: dense kernels on masked weights, the dense SGD step, the mask multiply)
and ``sparse`` (``compute="sparse"``: CSR kernels for the Linear layers, the SGD update on the
active entries). SGD with Nesterov momentum 0.9 and weight decay 5e-4, as the reference recipe.
Reported: median step times (wall clock, and the process's CPU time, which another process on
the same cores does not inflate), their ratios, the bytes the training state keeps (weights,
gradients, optimizer state, the sparsifier's masks and multipliers, the CSR positions) and,
with ``--profile``, the top operators of ten sparse steps.

``layers``: one ``nn.Linear`` alone at several shapes and densities, the measurements behind
``auto``'s rule. ``conv``: ``unfold`` (what a CSR convolution needs first) against a dense
convolution's forward and backward.

``run``: whole ``granet train`` runs of the reference recipe (GraNet 50% -> 98%, MLP,
Fashion-MNIST, 20 epochs), ``--compute dense`` and ``auto`` in turn (dense, auto, auto, dense
with ``--repeats 2``), each in its own process: wall clock, CPU time, training seconds, test
accuracy and peak resident memory (``ru_maxrss`` and ``ru_utime + ru_stime`` of that process).

    python benchmarks/compute.py step --threads 1 --profile
    python benchmarks/compute.py layers --threads 1
    python benchmarks/compute.py conv --threads 1 --batch-sizes 128
    python benchmarks/compute.py run --threads 1 --repeats 2 --out runs/compute
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
from collections.abc import Callable
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
    """Bytes of the tensors a training step keeps between steps (each tensor counted once):
    weights, gradients, optimizer state, masks, the multipliers the last mask multiply used,
    the CSR positions and the kept active entries of sparse-compute layers."""
    kept = {}
    for p in model.parameters():
        kept[id(p)] = p
        if p.grad is not None:
            kept[id(p.grad)] = p.grad
        kept.update({id(v): v for v in opt.state[p].values() if torch.is_tensor(v)})
    multipliers = sp._target_cache[1][1] if sp._target_cache else []
    kept.update({id(t): t for t in [*sp._masks, *multipliers]})
    for layer in sp._compute.layers if sp._compute else []:
        if layer._positions is not None:
            patterns = layer._positions._patterns.values()  # CSR: their values are new memory
            tensors = [*vars(layer._positions).values(), *(p.values() for p in patterns)]
            kept.update({id(t): t for t in tensors if torch.is_tensor(t)})
        kept.update({id(entry[3]): entry[3] for entry in layer._kept.values()})
    return sum(t.numel() * t.element_size() for t in kept.values())


def envelope(name: str, args: argparse.Namespace, **fields: object) -> dict:
    """A result: what was measured, where, under which load, then ``fields``."""
    return {
        "benchmark": name,
        "device": describe(torch.device("cpu")),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_before": args.load_before,
        "load_after": os.getloadavg(),
        **fields,
    }


def step_benchmark(args: argparse.Namespace) -> dict:
    results = []
    for model_name in args.models:
        for batch in args.batch_sizes:
            for sparsity in args.sparsities:
                results.append(time_steps(model_name, batch, sparsity, args))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return envelope("compute-step", args, results=results)


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


def profile(step: Callable[[], None], steps: int = 10, rows: int = 15) -> str:
    """The top operators of ``steps`` steps by self CPU time (torch.profiler's table); several
    steps, so that a moment the process waits for a core does not dominate."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


LAYER_SHAPES = [(1000, 1000), (1000, 784), (256, 3136), (512, 512), (300, 300), (120, 400)]
LAYER_DENSITIES = [0.2, 0.15, 0.1, 0.07, 0.05, 0.02]


def layer_benchmark(args: argparse.Namespace) -> dict:
    """One ``nn.Linear`` trained alone (the input gradient included), dense against sparse
    compute, SGD as above: the measurements behind ``auto``'s rule (median of the per-step
    ratios of CPU time, the two variants in turn)."""
    results = []
    for shape in args.shapes:
        for batch in args.batch_sizes:
            for density in args.densities:
                speedup = layer_speedup(shape, batch, density, args)
                results.append(
                    {
                        "shape": list(shape),
                        "batch_size": batch,
                        "density": density,
                        "speedup": speedup,
                    }
                )
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return envelope("compute-layers", args, results=results)


def layer_speedup(
    shape: tuple[int, int], batch: int, density: float, args: argparse.Namespace
) -> float:
    torch.manual_seed(0)
    base = nn.Linear(shape[1], shape[0])
    x = torch.randn(batch, shape[1], requires_grad=True)
    gy = torch.randn(batch, shape[0])
    variants = {}
    for compute in ("dense", "sparse"):
        layer = copy.deepcopy(base)
        opt = torch.optim.SGD(
            layer.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4
        )
        granet.Static(
            layer, opt, sparsity=1 - density, distribution="uniform", total_steps=10**6,
            compute=compute,
        )  # fmt: skip
        variants[compute] = (layer, opt)

    def step(compute: str) -> float:
        layer, opt = variants[compute]
        c0 = time.process_time()
        opt.zero_grad()
        x.grad = None
        (layer(x) * gy).sum().backward()
        opt.step()
        return time.process_time() - c0

    ratios = []
    for i in range(args.warmup + args.steps):
        order = ("dense", "sparse") if i % 2 == 0 else ("sparse", "dense")
        t = {compute: step(compute) for compute in order}
        if i >= args.warmup:
            ratios.append(t["dense"] / t["sparse"])
    return statistics.median(ratios)


CONVS = {  # name: (in, out, kernel, padding, input side, input gradient)
    "lenet5.conv1": (1, 6, 5, 2, 28, False),
    "lenet5.conv2": (6, 16, 5, 0, 14, True),
    "small-cnn.conv1": (1, 32, 3, 1, 28, False),
    "small-cnn.conv2": (32, 64, 3, 1, 14, True),
}


def conv_benchmark(args: argparse.Namespace) -> dict:
    """Why ``nn.Conv2d`` has no sparse training route: a CSR product needs the input unfolded
    (im2col), and ``unfold`` alone is timed against the dense forward and backward."""
    results = []
    for name, spec in CONVS.items():
        med = conv_times(spec, args.batch_sizes[0], args)
        results.append({"layer": name, "batch_size": args.batch_sizes[0], "cpu_ms": med})
        print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    return envelope("compute-conv", args, results=results)


def conv_times(spec: tuple[int, ...], batch: int, args: argparse.Namespace) -> dict:
    cin, cout, k, pad, side, input_grad = spec
    x = torch.randn(batch, cin, side, side, requires_grad=input_grad)
    w = torch.randn(cout, cin, k, k, requires_grad=True)

    def dense() -> None:
        nn.functional.conv2d(x, w, padding=pad).sum().backward()

    def unfold() -> None:  # into the (in * k * k, batch * positions) block a CSR product reads
        cols = nn.functional.unfold(x.detach(), k, padding=pad)
        cols.transpose(0, 1).reshape(cols.shape[1], -1).contiguous()

    times: dict[str, list[float]] = {"dense": [], "unfold": []}
    for i in range(args.warmup + args.steps):
        for key, fn in (("dense", dense), ("unfold", unfold)):
            c0 = time.process_time()
            fn()
            if i >= args.warmup:
                times[key].append(time.process_time() - c0)
    return {key: 1000 * statistics.median(v) for key, v in times.items()}


def run_benchmark(args: argparse.Namespace) -> dict:
    """Whole training runs, one process each, in the order dense, auto (, auto, dense ...)."""
    order = []
    for r in range(args.repeats):
        order += ["dense", "auto"] if r % 2 == 0 else ["auto", "dense"]
    runs = []
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
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
                "cpu_s": usage.ru_utime + usage.ru_stime,
                "test_accuracy": report["test_accuracy"],
                "peak_rss_mib": usage.ru_maxrss / 1024,
                "load_before": load,
                "load_after": os.getloadavg(),
            }
        )
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    by = {c: [r for r in runs if r["compute"] == c] for c in ("dense", "auto")}
    med = {c: statistics.median(r["wall_s"] for r in rs) for c, rs in by.items()}
    med_cpu = {c: statistics.median(r["cpu_s"] for r in rs) for c, rs in by.items()}
    return envelope(
        "compute-run",
        args,
        runs=runs,
        median_wall_s=med,
        speedup=med["dense"] / med["auto"],
        median_cpu_s=med_cpu,
        cpu_speedup=med_cpu["dense"] / med_cpu["auto"],
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=list(WHAT), nargs="?", default="step")
    ap.add_argument("--models", nargs="+", default=["mlp", "lenet5"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 32])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.8, 0.9, 0.95, 0.98])
    ap.add_argument("--shapes", nargs="+", type=_shape, default=LAYER_SHAPES, help="layers: OUTxIN")
    ap.add_argument("--densities", nargs="+", type=float, default=LAYER_DENSITIES, help="layers")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per variant (median)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads, of the runs too (0: the default)"
    )
    ap.add_argument("--profile", action="store_true", help="profile ten sparse steps of each")
    ap.add_argument("--out", type=Path, default=Path("runs/compute"), help="run: run folders")
    ap.add_argument("--repeats", type=int, default=1, help="run: pairs of runs")
    ap.add_argument("--seed", type=int, default=1, help="run: the runs' seed")
    ap.add_argument("--recipe", nargs=argparse.REMAINDER, default=[], help="run: extra flags")
    ap.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    args.load_before = os.getloadavg()
    if args.threads:  # here, and for the runs through OMP_NUM_THREADS
        torch.set_num_threads(args.threads)
    if args.quick:
        args.models, args.batch_sizes, args.sparsities = ["mlp", "lenet5"], [32], [0.95]
        args.steps, args.warmup, args.profile = 2, 1, True
        args.shapes, args.densities = [(64, 48)], [0.1]
        args.recipe = ["--epochs", "1", "--dataset", "synthetic", "--model", "lenet5"]
        args.recipe += ["--update-every", "2"]
    result = WHAT[args.what](args)
    emit(result, args.json)
    return result


def _shape(text: str) -> tuple[int, int]:
    out_f, in_f = text.lower().split("x")
    return int(out_f), int(in_f)


WHAT = {
    "step": step_benchmark,
    "layers": layer_benchmark,
    "conv": conv_benchmark,
    "run": run_benchmark,
}


if __name__ == "__main__":
    main()
