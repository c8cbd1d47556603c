"""FSDP2 memory per rank: parameters, gradients, AdamW state and masks at 1, 2 and 4 ranks.

A GPT-2 built from a config (no download; 8 blocks of width 768, a 32000-token vocabulary: 81M
parameters, 57M of them in the blocks' sparse ``Conv1D`` weights) is sharded with ``fully_shard``
(every block, then the root) over ``N`` gloo processes on this machine's CPU, float32, under
``granet.GraNet`` (sparsity 0.9 from 0.5) and AdamW. ``plain`` is the same model in one process
without ``fully_shard``. After two training steps each rank counts, exactly from its tensors (local
numel x element size, not RSS):

- ``params``, ``grads``, ``optim`` (AdamW's ``exp_avg``/``exp_avg_sq``/``step``): the local shards
  (the bytes of the storages behind them, each once: a shard that is a view of a larger tensor
  counts what it keeps alive);
- ``masks``: granet's bool masks (storages, as above; ``masks_elements``: their elements, 1 byte
  per local sparse weight); ``multipliers``: on CPU the
  masks' float32 copies that the per-step multiply uses (:meth:`Sparsifier._targets`);
  ``ever_active``: the bit-packed ITOP bits; ``packed``: the local tensors of
  ``sp.state_dict()["masks"]`` (1 bit per weight, rows padded to whole bytes: the masks at rest
  in a checkpoint);

and its peak RSS (``ru_maxrss``, the process's whole life: interpreter, torch, transformers and
FSDP's unsharded blocks in forward and backward included), before the rounds and after them. The
model is built on the meta device and materialized after sharding, so no rank ever holds the whole
model.

One topology round (``sp.update_topology()`` after a step: gradual pruning, then drop and regrow in
every layer) is timed (wall clock from a barrier, the slowest rank, and each rank's CPU time;
medians of ``--rounds``), and the bytes it communicates are counted by wrapping every
``torch.distributed`` collective (each tensor given: numel x element size, as sent by this rank) and
checking with ``CommDebugMode`` (which sees c10d's and DTensor's collectives alike) that nothing
else is sent. The same round on a model of the same depth with a quarter of the width (``narrow``,
1/16 of the weights) shows whether the bytes grow with the weights or with the layers.

    python benchmarks/fsdp_memory.py --world 1 2 4 --json results/fsdp_memory.json
    python benchmarks/fsdp_memory.py --quick   # a tiny model on 2 ranks (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import granet

# the collectives granet (or anything else in a round) could call through torch.distributed
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_single",
    "all_gather_into_tensor",
    "all_to_all_single",
    "broadcast",
    "reduce",
    "reduce_scatter_tensor",
    "gather",
    "scatter",
    "all_gather_object",
    "broadcast_object_list",
)
FULL = {"layers": 8, "width": 768, "heads": 12, "vocab": 32000, "batch": 4, "seq": 64}
QUICK = {"layers": 2, "width": 64, "heads": 4, "vocab": 256, "batch": 4, "seq": 16}


class Counter:
    """Wraps the collectives of ``torch.distributed``: calls and bytes while ``on``."""

    def __init__(self) -> None:
        self.on, self.calls, self.bytes = False, {}, 0
        for name in COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, original):  # noqa: ANN001, ANN202
        def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if self.on:
                self.calls[name] = self.calls.get(name, 0) + 1
                # what this rank sends: all_reduce's first argument, a gather's second
                gathers = name.startswith(("all_gather", "reduce_scatter", "all_to_all"))
                sent = args[1] if gathers else args[0]
                self.bytes += nbytes(sent if isinstance(sent, list | tuple) else [sent])
            return original(*args, **kwargs)

        return call


def config(spec: dict, narrow: bool = False):  # noqa: ANN201
    from transformers import GPT2Config

    width = spec["width"] // 4 if narrow else spec["width"]
    return GPT2Config(
        vocab_size=spec["vocab"],
        n_positions=spec["seq"],
        n_embd=width,
        n_layer=spec["layers"],
        n_head=spec["heads"] // 4 if narrow and spec["heads"] >= 4 else spec["heads"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def nbytes(tensors) -> int:  # noqa: ANN001
    """The bytes of the tensors' (local) elements."""
    return sum(local(t).numel() * local(t).element_size() for t in tensors if torch.is_tensor(t))


def held(tensors) -> int:  # noqa: ANN001
    """The bytes of the storages behind the tensors (each counted once): what the process
    holds, a view of a larger tensor included whole."""
    storages = {}
    for t in tensors:
        if torch.is_tensor(t):
            storage = local(t).untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def build(spec: dict, mesh, narrow: bool = False, seed: int = 0):  # noqa: ANN001, ANN201
    """The GPT-2, sharded (every block, then the root) where ``mesh`` is given; built on the meta
    device and materialized shard by shard; AdamW; GraNet."""
    from torch.distributed.fsdp import fully_shard
    from transformers import GPT2LMHeadModel

    with torch.device("meta"):
        model = GPT2LMHeadModel(config(spec, narrow))
    if mesh is not None:
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives the unsharded head its own tensor; fully_shard keeps ties
    g = torch.Generator().manual_seed(seed + (dist.get_rank() if mesh is not None else 0))
    with torch.no_grad():  # GPT-2's initialization: N(0, 0.02), norms 1, biases 0
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                t = local(p)
                if isinstance(module, nn.LayerNorm):
                    t.fill_(1.0 if name == "weight" else 0.0)
                elif name == "bias":
                    t.zero_()
                else:
                    t.normal_(0.0, 0.02, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # rounds every 500 steps, none in the measured steps; the rounds run by hand prune to 70%
    sp = granet.GraNet(
        model,
        opt,
        sparsity=0.9,
        total_steps=1000,
        update_every=500,
        sparsity_schedule=lambda step: min(0.9, 0.5 + 0.1 * step),
    )
    return model, opt, sp


def train_step(model, opt, spec: dict, i: int, rank: int, world: int) -> None:  # noqa: ANN001
    g = torch.Generator().manual_seed(i)
    tokens = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=g)
    share = tokens[rank * spec["batch"] // world : (rank + 1) * spec["batch"] // world]
    opt.zero_grad()
    model(share, labels=share).loss.backward()
    opt.step()


def round_cost(sp, counter: Counter, rounds: int, sharded: bool) -> dict:  # noqa: ANN001
    """Wall time (slowest rank, median) and communication of ``rounds`` topology rounds."""
    from torch.distributed.tensor.debug import CommDebugMode

    times, cpus, sent, calls, debug_calls = [], [], set(), [], 0
    for _ in range(rounds):
        if sharded:
            dist.barrier()
        counter.on, counter.bytes, counter.calls = True, 0, {}
        with CommDebugMode() as debug:
            start, cpu = time.perf_counter(), time.process_time()
            sp.update_topology()
            seconds = time.perf_counter() - start
            cpus.append(time.process_time() - cpu)
        counter.on = False
        debug_calls += debug.get_total_counts()
        sent.add(counter.bytes)
        calls.append(dict(counter.calls))
        if sharded:
            slowest = torch.tensor([seconds])
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            seconds = float(slowest)
        times.append(seconds)
    return {
        "round_s": statistics.median(times),
        # this process's CPU time (all its threads; waiting for a core or a rank not counted)
        "round_cpu_s": statistics.median(cpus),
        "round_bytes": sorted(sent),
        "round_calls": calls[-1],
        # CommDebugMode's count of every collective (c10d's and DTensor's) in the rounds
        "debug_collectives": debug_calls,
        "wrapped_collectives": sum(sum(c.values()) for c in calls),
        "last_round": sp.last_round,
    }


def measure(rank: int, world: int, args: argparse.Namespace, sharded: bool) -> dict:
    counter = Counter()
    mesh = None
    if sharded:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, opt, sp = build(args.spec, mesh)
    steps = []
    for i in range(args.steps):
        start = time.perf_counter()
        train_step(model, opt, args.spec, i, rank, world)
        steps.append(time.perf_counter() - start)
    params = list(model.parameters())
    masks = [local(m) for m in sp.masks.values()]
    # on CPU float copies of the masks; elsewhere the masks themselves, not counted twice
    own = {m.untyped_storage().data_ptr() for m in masks}
    multipliers = [m for m in sp._targets()[1] if m.untyped_storage().data_ptr() not in own]
    state = sp.state_dict()
    sparse_weights = sum(m.numel() for m in masks)
    row = {
        "mode": f"fsdp{world}" if sharded else "plain",
        "world": world,
        "rank": rank,
        "weights": sum(p.numel() for p in params),
        "local_weights": sum(local(p).numel() for p in params),
        "sparse_weights": sum(p.numel() for p in sp.params),
        "local_sparse_weights": sparse_weights,
        "params": held(params),
        "grads": held(p.grad for p in params),
        "optim": held(v for s in opt.state.values() for v in s.values()),
        "masks": held(masks),
        "masks_elements": nbytes(masks),  # the local masks' own bytes, storage aside
        "multipliers": held(multipliers),
        "ever_active": held([sp._ever_active]),
        "packed": nbytes(state["masks"].values()),
        "step_s": steps[-1],
        "rss_start_mib": rss_start / 1024,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    row["peak_rss_before_round_mib"] = row["peak_rss_mib"]
    row.update(round_cost(sp, counter, args.rounds, sharded))
    row["sparsity"] = sp.sparsity()
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del model, opt, sp
    # the same round on a model a quarter as wide: do the bytes follow the weights?
    model, opt, sp = build(args.spec, mesh, narrow=True)
    train_step(model, opt, args.spec, 0, rank, world)
    narrow = round_cost(sp, counter, 1, sharded)
    row["narrow_sparse_weights"] = sum(p.numel() for p in sp.params)
    row["narrow_round_bytes"] = narrow["round_bytes"]
    row["layers"] = len(sp.params)
    return row


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    row = measure(rank, world, args, sharded=args.mode != "plain")
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        (out / f"{args.mode}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def run(mode: str, world: int, args: argparse.Namespace, out: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args.mode = mode
    mp.spawn(worker, args=(world, port, args, out), nprocs=world, join=True)
    return json.loads((out / f"{mode}.json").read_text())


STORED = ("params", "grads", "optim", "masks", "multipliers", "ever_active")


def summary(runs: dict[str, list[dict]]) -> dict:
    """Per mode: rank 0's bytes (the largest rank's where they differ), and the targets."""
    one = runs.get("fsdp1")
    out = {}
    for mode, rows in runs.items():
        top = max(rows, key=lambda r: sum(r[k] for k in STORED))
        s = {k: top[k] for k in top if k != "rank"}
        s["total"] = sum(top[k] for k in STORED)
        s["round_s"] = max(r["round_s"] for r in rows)
        for key in ("round_cpu_s", "peak_rss_mib", "peak_rss_before_round_mib"):
            s[key] = max(r[key] for r in rows)
        s["mask_bytes_per_local_weight"] = top["masks"] / max(top["local_sparse_weights"], 1)
        s["packed_bytes_per_local_weight"] = top["packed"] / max(top["local_sparse_weights"], 1)
        if one is not None:
            base = sum(one[0][k] for k in STORED) / top["world"]
            s["total_vs_one_over_n"] = s["total"] / base
        out[mode] = s
    return out


def table(summ: dict) -> str:
    """The rows as the markdown table of docs/benchmarks.md."""
    mib = 2**20
    lines = [
        "| run | params | grads | AdamW | bool masks: held (own elements) | CPU mask copies "
        "| ITOP bits | total | total / (fsdp1 total / N) | masks at rest (packed) "
        "| peak RSS before / after the rounds | round: bytes sent (narrow model) "
        "| round s: wall / CPU | step s |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for mode, s in summ.items():
        ratio = s.get("total_vs_one_over_n")
        lines.append(
            f"| {mode} | {s['params'] / mib:.1f} | {s['grads'] / mib:.1f} | {s['optim'] / mib:.1f} "
            f"| {s['masks'] / mib:.1f} ({s['masks_elements'] / mib:.1f}) "
            f"| {s['multipliers'] / mib:.1f} "
            f"| {s['ever_active'] / mib:.2f} | {s['total'] / mib:.1f} "
            f"| {'' if ratio is None or mode == 'plain' else f'{ratio:.3f}'} "
            f"| {s['packed'] / mib:.2f} "
            f"| {s['peak_rss_before_round_mib']:.0f} / {s['peak_rss_mib']:.0f} "
            f"| {max(s['round_bytes']):,} ({max(s['narrow_round_bytes']):,}) "
            f"| {s['round_s']:.2f} / {s['round_cpu_s']:.2f} | {s['step_s']:.2f} |"
        )
    return "\n".join(lines) + (
        "\n\n(MiB per rank, the largest rank; RSS and CPU time: the largest rank's; bytes sent by "
        "one rank)"
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--no-plain", action="store_true", help="skip the one-process run")
    ap.add_argument("--steps", type=int, default=2, help="training steps before measuring")
    ap.add_argument("--rounds", type=int, default=3, help="rounds timed (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--quick", action="store_true", help="a tiny model on 2 ranks")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    args = ap.parse_args(argv)
    args.spec = dict(QUICK if args.quick else FULL)
    if args.quick:  # one launch: imports dominate
        args.world, args.rounds, args.no_plain = [2], 1, True
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, model {args.spec}", file=sys.stderr)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_plain:
            runs["plain"] = run("plain", 1, args, Path(tmp))
        for world in args.world:
            runs[f"fsdp{world}"] = run(f"fsdp{world}", world, args, Path(tmp))
    result = {
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load": os.getloadavg(),
        "model": args.spec,
        "summary": summary(runs),
        "ranks": runs,
    }
    print(table(result["summary"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
