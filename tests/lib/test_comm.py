"""The compact DDP gradient exchange (``communication=``) against DDP's own dense all-reduce.

One spawn of 2 and one of 4 gloo processes run every scenario with ``communication="compact"``
and ``"dense"`` from the same start and compare, step for step, what the ranks end with. The
runs are in float64: the compact vector is summed by gloo in other chunks than the whole bucket,
so an element's partial sums may be added in another order; in float64 that moves a weight by
about ``steps * world * eps64`` relative, far below anything a wrong exchange gives, and the
masks stay bit-identical. With 2 processes the sums have one order and the weights are equal
bit for bit (so they are in float32: measured, docs/distributed.md).
"""

import warnings
from pathlib import Path

import helpers
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import batch, snapshot
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import granet
from granet.comm import AUTO_MAX_FRACTION

GLOBAL_BATCH = 16
STEPS, RESUME_AT = 12, 5
KW = dict(sparsity=0.8, total_steps=STEPS, update_every=3, prune_end=0.5)
METHODS = tuple(granet.METHODS)


class TinyNet(nn.Module):
    def __init__(self, unused: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 8 * 8, 24)
        self.fc2 = nn.Linear(24, 10)
        self.spare = nn.Linear(24, 24) if unused else None  # never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def build(method, rank, communication, ddp_kw=None, unused=False, **kw):
    torch.manual_seed(0)
    net = TinyNet(unused).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    model = DDP(net, **(ddp_kw or {}))
    torch.manual_seed(1000 + rank)  # the ranks' global RNGs differ on purpose
    sp = granet.sparsify(model, opt, method, communication=communication, **{**KW, **kw})
    return model, net, opt, sp


def run(model, opt, start, stop, rank, world, micro=1, scaler=None, inf_at=()):
    share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    for i in range(start, stop):
        x, y = batch(i, GLOBAL_BATCH)
        x, y = x[share].double(), y[share]
        opt.zero_grad()
        parts = list(zip(x.chunk(micro), y.chunk(micro)))
        for j, (xs, ys) in enumerate(parts):
            loss = nn.functional.cross_entropy(model(xs), ys) / micro
            if i in inf_at:
                loss = loss * float("inf")
            if j < micro - 1:
                with model.no_sync():
                    loss.backward()
            elif scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()


class Counter:
    """Elements all-reduced through torch.distributed.all_reduce, counted."""

    def __init__(self) -> None:
        self.elements = 0
        self.original = dist.all_reduce

    def __call__(self, tensor, *args, **kwargs):
        self.elements += tensor.numel()
        return self.original(tensor, *args, **kwargs)


def scenarios(rank, world):
    """name -> (communication -> snapshot) for every scenario compared."""
    out = {}
    for method in METHODS:
        for comm in ("compact", "dense"):
            model, net, opt, sp = build(method, rank, comm)
            run(model, opt, 0, STEPS, rank, world)
            out.setdefault(method, {})[comm] = snapshot(net, sp)
    variants = {
        "no_sync": (dict(), dict(micro=2)),
        "find_unused": (
            dict(ddp_kw=dict(find_unused_parameters=True), unused=True, exclude=["spare.*"]),
            dict(),
        ),
        "static_graph": (dict(ddp_kw=dict(static_graph=True)), dict()),
        "sparse_compute": (dict(compute="sparse"), dict()),
        "auto": (dict(), dict()),
    }
    for name, (build_kw, run_kw) in variants.items():
        for comm in ("compact", "dense"):
            kw = dict(build_kw)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # compute='sparse' names its dense conv layer
                model, net, opt, sp = build(
                    "granet", rank, "auto" if name == "auto" and comm == "compact" else comm, **kw
                )
                run(model, opt, 0, STEPS, rank, world, **run_kw)
            out.setdefault(name, {})[comm] = snapshot(net, sp)
    # a GradScaler step skipped for inf gradients, on every rank
    for comm in ("compact", "dense"):
        model, net, opt, sp = build("granet", rank, comm)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
        run(model, opt, 0, STEPS + 1, rank, world, scaler=scaler, inf_at={4})
        out.setdefault("scaler", {})[comm] = snapshot(net, sp)
    return out


def resumed(rank, world, store: Path):
    """Compact: stopped at RESUME_AT, saved, rebuilt (a fresh DDP), loaded, run to the end."""
    model, net, opt, sp = build("granet", rank, "compact")
    run(model, opt, 0, RESUME_AT, rank, world)
    state = {"model": net.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()}
    sp.remove()
    model, net, opt, sp = build("granet", rank, "compact")
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sp.load_state_dict(state["sp"])
    run(model, opt, RESUME_AT, STEPS, rank, world)
    return snapshot(net, sp)


def traffic(rank, world):
    """Elements sent by one ordinary step, and what they should be."""
    found = {}
    for comm, sparsity in (("compact", 0.8), ("auto", 0.9), ("auto", 0.5)):
        model, net, opt, sp = build("rigl", rank, comm, update_every=100, sparsity=sparsity)
        run(model, opt, 0, 2, rank, world)  # the buckets are final after the first iteration
        counter = Counter()
        dist.all_reduce = counter
        try:
            run(model, opt, 2, 3, rank, world)
        finally:
            dist.all_reduce = counter.original
        active = sum(int(m.sum()) for m in sp.masks.values())
        dense = sum(p.numel() for n, p in net.named_parameters() if n not in sp.masks)
        total = sum(p.numel() for p in net.parameters())
        found[f"{comm}-{sparsity}"] = {
            "sent": counter.elements,
            "compact": active + dense,
            "total": total,
        }
    return found


def refusals(rank):
    """A hook the user registered: refused with compact, kept (with a warning) with auto."""
    found = {}
    for name, register in {
        "python": lambda m: m.register_comm_hook(None, _user_hook),
        "builtin": lambda m: m._register_builtin_comm_hook(dist.BuiltinCommHookType.FP16_COMPRESS),
    }.items():
        for comm in ("compact", "auto"):
            net = TinyNet().double()
            model = DDP(net)
            register(model)
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    sp = granet.RigL(model, opt, communication=comm, **KW)
                    found[f"{name}-{comm}"] = ("kept", [str(w.message) for w in caught])
                    sp.remove()
                except ValueError as error:
                    found[f"{name}-{comm}"] = ("refused", str(error))
    return found


def installed(rank):
    """By default a DDP model gets the hook; a later sparsifier on it takes the hook over."""
    net = TinyNet().double()
    model = DDP(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    first = granet.RigL(model, opt, exclude=["fc2.*"], **KW)
    hooks = [type(state).__name__ for _, state in model._comm_hooks]
    try:  # a second live sparsifier on the model cannot share the hook
        granet.SET(model, opt, include=["fc2.*"], communication="compact", **KW)
    except ValueError as error:
        shared = str(error)
    first.remove()
    second = granet.SET(model, opt, **KW)  # DDP would refuse a second register_comm_hook
    return {"hooks": hooks, "taken_over": second._comm is first._comm, "shared": shared}


def _user_hook(state, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    return allreduce_hook(dist.group.WORLD, bucket)


def worker(rank, world, store, out):
    helpers.join_gloo(rank, world, store, 120)
    results = {"scenarios": scenarios(rank, world), "traffic": traffic(rank, world)}
    results["resumed"] = resumed(rank, world, out)
    if world == 2:
        results["refusals"] = refusals(rank)
        results["installed"] = installed(rank)
    torch.save(results, out / f"world{world}-rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4])
def ranks(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"comm{world}")
    mp.spawn(worker, args=(world, tmp / "store", tmp), nprocs=world, join=True)
    return [torch.load(tmp / f"world{world}-rank{r}.pt", weights_only=True) for r in range(world)]


def tolerance(weights, world):
    """Reordered float64 sums over ``world`` ranks, compounded over the run's steps; none for two
    ranks, whose sum ``a + b`` has one order."""
    if world == 2:
        return 0.0
    return STEPS * 2 * world * torch.finfo(torch.float64).eps * max(w.abs().max() for w in weights)


def assert_same(a, b, world):
    assert a["step"] == b["step"]
    assert a["masks"].keys() == b["masks"].keys()
    for k in a["masks"]:
        assert torch.equal(a["masks"][k], b["masks"][k]), k
    atol = tolerance(a["weights"].values(), world)
    for k in a["weights"]:
        gap = (a["weights"][k] - b["weights"][k]).abs().max().item()
        assert gap <= atol, (k, gap, atol)


@pytest.mark.parametrize(
    "scenario",
    [*METHODS, "no_sync", "find_unused", "static_graph", "sparse_compute", "auto", "scaler"],
)
def test_compact_exchange_trains_what_the_dense_all_reduce_trains(ranks, scenario):
    for rank in ranks:
        runs = rank["scenarios"][scenario]
        assert runs["compact"]["step"] == STEPS  # the scaler's skipped step did not count
        assert_same(runs["compact"], runs["dense"], len(ranks))
    first = ranks[0]["scenarios"][scenario]["compact"]["weights"]
    for rank in ranks[1:]:  # and the ranks agree bit for bit
        for name, weight in rank["scenarios"][scenario]["compact"]["weights"].items():
            assert torch.equal(first[name], weight), name


def test_an_ordinary_step_sends_the_active_entries_and_the_dense_parameters(ranks):
    for rank in ranks:
        for case in ("compact-0.8", "auto-0.9"):
            t = rank["traffic"][case]
            assert t["sent"] == t["compact"] < t["total"] / 4, case
        # auto sends a bucket whole where packing would not pay (AUTO_MAX_FRACTION)
        t = rank["traffic"]["auto-0.5"]
        assert t["compact"] > AUTO_MAX_FRACTION * t["total"] and t["sent"] == t["total"]


def test_resume_under_compact_exchange(ranks):
    for rank in ranks:
        assert_same(rank["resumed"], rank["scenarios"]["granet"]["compact"], len(ranks))


def test_a_users_hook_is_refused_by_compact_and_kept_by_auto(ranks):
    if "refusals" not in ranks[0]:
        pytest.skip("checked on 2 processes")
    found = ranks[0]["refusals"]
    for name, qualname in (("python", "_user_hook"), ("builtin", "FP16_COMPRESS")):
        kind, message = found[f"{name}-compact"]
        assert kind == "refused" and qualname in message and "communication='dense'" in message
        kind, caught = found[f"{name}-auto"]
        assert kind == "kept" and any("is kept" in w and qualname in w for w in caught)


def test_the_hook_is_the_default_and_a_new_sparsifier_takes_it_over(ranks):
    if "installed" not in ranks[0]:
        pytest.skip("checked on 2 processes")
    for rank in ranks:
        found = rank["installed"]
        assert found["hooks"] == ["CompactAllReduce"] and found["taken_over"]
        assert "granet's, of another live sparsifier" in found["shared"]
