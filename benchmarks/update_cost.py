"""How the time of one GraNet topology round grows with the number of sparse weights.

Synthetic models of square Linear layers (4096 x 4096 = 16.8M weights each, 1024 x 1024 for the
small sizes) from about 1M weights up to ``--max-weights``; for each, the median time of a full
round mid-schedule (global gradual pruning + per-layer drop-and-regrow by gradient), masks restored
between repetitions. Writes a JSON list and, with ``--plot``, a log-log PNG.

    python benchmarks/update_cost.py --max-weights 1e8 --plot docs/update_cost_cpu.png
    python benchmarks/update_cost.py --device cuda --max-weights 1e9
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from overhead import describe
from torch import nn

import granet


def synthetic(weights: int, device: torch.device) -> nn.Module:
    """Square Linear layers holding about ``weights`` weights in total."""
    width = 4096 if weights >= 4096**2 else 1024
    layers = max(1, round(weights / width**2))
    return nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)]).to(device)


def time_round(weights: int, device: torch.device, reps: int) -> dict:
    torch.manual_seed(0)
    model = synthetic(weights, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sp = granet.GraNet(model, opt, sparsity=0.9, init_sparsity=0.5, total_steps=100_000)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    sp.step = 25_000  # mid gradual phase: the round prunes and regrows
    assert sp.sparsity_schedule.prunes_at(sp.step) and sp.regrow_schedule(sp.step) > 0
    snapshot = sp.state_dict()
    times = []
    for _ in range(reps):
        sp.load_state_dict(snapshot)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        sp.update_topology()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    n = sum(p.numel() for p in sp.params)
    return {"weights": n, "layers": len(sp.params), "round_ms": 1000 * statistics.median(times)}


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--max-weights", type=float, default=None, help="default: 1.1e9 on CUDA, 1e8 elsewhere"
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="two small sizes, one rep (smoke test)")
    ap.add_argument("--json", help="write the results to this file")
    ap.add_argument("--plot", help="write a log-log plot of round time vs weights to this PNG")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    args.max_weights = args.max_weights or (1.1e9 if device.type == "cuda" else 1e8)
    sizes = [s for s in (1e6, 4e6, 1.6e7, 6.7e7, 2.7e8, 1.07e9) if s <= args.max_weights]
    if args.quick:
        sizes, args.reps = [2**20, 2**21], 1
    results = []
    for size in sizes:
        results.append(time_round(int(size), device, args.reps))
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": describe(device), "torch": torch.__version__, "results": results}, f
            )
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        xs = [r["weights"] for r in results]
        ys = [r["round_ms"] for r in results]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.loglog(xs, ys, "o-", label="GraNet round")
        ax.loglog(xs, [ys[0] * x / xs[0] for x in xs], "--", color="gray", label="linear")
        ax.set_xlabel("sparse weights")
        ax.set_ylabel("round time (ms)")
        ax.set_title(f"Topology update cost ({device.type}, torch {torch.__version__})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
    return results


if __name__ == "__main__":
    main()
