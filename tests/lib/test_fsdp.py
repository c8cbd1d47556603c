"""FSDP2 (``fully_shard``) on CPU: gloo processes started here, every Linear and the model sharded.

Every method runs in float64 on 1, 2 and 4 ranks, each rank taking its share of the same global
batches, and is compared with a plain one-process run here: the masks must be bit-equal (the
rounds select exactly across shards, :mod:`granet.shards`) and the weights equal within float64
rounding (a summed instead of averaged gradient, torch issue #162338, would move them by ~0.1).
Checkpoints saved with ``torch.distributed.checkpoint`` on one world size resume on another.
Layer sizes are chosen so that 4 ranks hold uneven shards and one rank an empty one.
"""

import warnings
from pathlib import Path

import helpers
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import rounding_tol
from torch import nn

import granet

METHODS = ("granet", "gmp", "rigl", "set", "snfs", "static")
GLOBAL_BATCH = 12
STEPS, RESUME_AT = 12, 5
KW = dict(sparsity=0.7, total_steps=STEPS, update_every=3, prune_end=0.75, seed=3)
# weights are O(1) and each step adds lr * gradient sums of at most GLOBAL_BATCH * 10 terms
WEIGHT_TOL = rounding_tol(torch.float64, STEPS * GLOBAL_BATCH * 10)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3)
    ).double()


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (GLOBAL_BATCH,), generator=g
    )


def build(method, mesh=None, **kw):
    model = net()
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, opt, granet.sparsify(model, opt, method, **{**KW, **kw})


def train(model, opt, start, stop, rank=0, world=1):
    share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    for i in range(start, stop):
        x, y = batch(i)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[share]), y[share]).backward()
        opt.step()


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def snapshot(model, sp) -> dict:
    stats = sp.stats()
    return {
        "masks": {n: whole(m) for n, m in sp.masks.items()},
        "weights": {n: whole(p.detach()) for n, p in model.named_parameters()},
        "sparsity": stats["sparsity"],
        "itop": stats["itop_rate"],
        "nnz": {n: layer["nnz"] for n, layer in stats["layers"].items()},
        "last_round": stats["last_round"],
    }


def checkpoint_state(model, opt, sp) -> dict:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, opt)
    return {"model": model_state, "optim": optim_state, "sparsifier": sp.state_dict()}


def resume(method, mesh, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model, opt, sp = build(method, mesh)
    state = checkpoint_state(model, opt, sp)
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sp.load_state_dict(state["sparsifier"])
    return model, opt, sp


def refusals(mesh) -> dict:
    """One-line errors for what FSDP2 runs do not support, on a one-rank mesh."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    found = {}
    for name, kw in (
        ("pattern", {"pattern": "2:4", "sparsity": None}),
        ("wanda", {"init": "wanda"}),
    ):
        try:
            build("granet", mesh, **kw)
        except ValueError as error:
            found[name] = str(error)
    model = net()  # tensor parallel: weights split by columns
    for layer in model[::2]:
        layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(1)]))
    try:
        granet.GraNet(model, torch.optim.SGD(model.parameters(), lr=0.1), **KW)
    except ValueError as error:
        found["columns"] = str(error)
    model = net()  # sharded after the optimizer and the sparsifier were built
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = granet.GraNet(model, opt, **KW)
    fully_shard(model, mesh=mesh)
    train(model, torch.optim.SGD(model.parameters(), lr=0.1), 0, 1)  # another optimizer
    for name, call in (("late-stats", sp.stats), ("late", sp.optimizer.step)):
        try:
            call()
        except ValueError as error:
            found[name] = str(error)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build("granet", mesh, compute="sparse", communication="compact")
    found["sparse-compute"] = [str(w.message) for w in caught]
    return found


def worker(rank, world, store, out, resume_only):
    helpers.join_gloo(rank, world, store)
    from torch.distributed.checkpoint import save
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for method in METHODS:
        if not resume_only:
            model, opt, sp = build(method, mesh)
            train(model, opt, 0, RESUME_AT, rank, world)
            save(checkpoint_state(model, opt, sp), checkpoint_id=out / f"ckpt{world}-{method}")
            train(model, opt, RESUME_AT, STEPS, rank, world)
            results[f"straight-{method}"] = snapshot(model, sp)
        for saved in (1, 2):
            path = out / f"ckpt{saved}-{method}"
            if path.exists() and (saved != world or not resume_only):
                model, opt, sp = resume(method, mesh, path)
                train(model, opt, RESUME_AT, STEPS, rank, world)
                results[f"from{saved}-{method}"] = snapshot(model, sp)
    if world == 4 and not resume_only:  # HSDP: two replicas of a two-way sharding
        hsdp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        model, opt, sp = build("granet", hsdp)
        train(model, opt, 0, STEPS, rank, world)
        results["hsdp-granet"] = snapshot(model, sp)
        if rank == 0:  # one replica's mask moves: the other replica of that shard notices
            mask = sp._masks[1].view(-1)
            mask[mask.nonzero()[0]] = False
            mask[(~mask).nonzero()[0]] = True
        try:
            sp.update_topology()
        except RuntimeError as error:
            results["hsdp-tampered"] = str(error)
    if world == 2 and not resume_only:  # ranks that disagree on the seed: caught at the start
        try:
            build("set", mesh, seed=rank)
        except RuntimeError as error:
            results["seeds-differ"] = str(error)
    if world == 1 and not resume_only:
        results["refused"] = refusals(mesh)
    if rank == 0:
        torch.save(results, out / f"world{world}{'-resumed' * resume_only}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    tmp: Path = tmp_path_factory.mktemp("fsdp")
    single = {}
    for method in METHODS:
        model, opt, sp = build(method)
        train(model, opt, 0, STEPS)
        single[method] = snapshot(model, sp)
    ranks = {}
    # each world size resumes from the checkpoints of those before it; a last one-rank run
    # resumes from the two-rank checkpoints
    for world, resume_only in ((1, False), (2, False), (4, False), (1, True)):
        args = (world, tmp / f"store{world}{resume_only}", tmp, resume_only)
        mp.spawn(worker, args=args, nprocs=world, join=True)
        saved = torch.load(tmp / f"world{world}{'-resumed' * resume_only}.pt", weights_only=False)
        ranks.setdefault(world, {}).update(saved)
    return {"single": single, **ranks}


def assert_same_run(run: dict, reference: dict, exact: bool) -> None:
    for name, mask in reference["masks"].items():
        assert torch.equal(run["masks"][name], mask), name
    for name, weight in reference["weights"].items():
        if exact:
            assert torch.equal(run["weights"][name], weight), name
        else:
            torch.testing.assert_close(run["weights"][name], weight, atol=WEIGHT_TOL, rtol=0)
    for key in ("sparsity", "itop", "nnz", "last_round"):
        assert run[key] == reference[key], key


@pytest.mark.parametrize("world", (1, 2, 4))
@pytest.mark.parametrize("method", METHODS)
def test_sharded_runs_make_the_masks_of_one_process(results, method, world):
    assert_same_run(results[world][f"straight-{method}"], results["single"][method], exact=False)


@pytest.mark.parametrize(("saved", "world"), ((2, 1), (1, 2), (2, 4), (1, 4), (1, 1), (2, 2)))
@pytest.mark.parametrize("method", METHODS)
def test_resume_on_another_world_size(results, method, saved, world):
    straight = results[world][f"straight-{method}"]
    # same world size: bit-identical; another: the same masks, weights within rounding
    assert_same_run(results[world][f"from{saved}-{method}"], straight, exact=saved == world)


def test_hybrid_sharding_replicas_agree_with_one_process(results):
    assert_same_run(results[4]["hsdp-granet"], results["single"]["granet"], exact=False)


def test_unsupported_layouts_and_orders_are_one_line_errors(results):
    refused = results[1]["refused"]
    assert "pattern='2:4' is not supported on weights sharded by fully_shard" in refused["pattern"]
    assert "init='wanda' is not supported on weights sharded" in refused["wanda"]
    assert "(Shard(dim=1),)" in refused["columns"] and "tensor parallelism" in refused["columns"]
    assert "was replaced after the sparsifier was built" in refused["late"]
    assert refused["late-stats"] == refused["late"]  # what it reports would not be true
    assert "apply fully_shard first" in refused["late"]
    assert any("compute='sparse' runs layers sharded" in w for w in refused["sparse-compute"])
    assert any("communication='compact' is DDP's" in w for w in refused["sparse-compute"])
    assert all("\n" not in message for message in refused.values() if isinstance(message, str))


def test_a_replica_whose_mask_differs_stops_the_run_naming_the_layer(results):
    assert "the mask of '2.weight' differs between ranks" in results[4]["hsdp-tampered"]


def test_the_step_that_makes_an_optimizers_state_for_a_checkpoint_is_not_counted():
    """``get_state_dict`` steps an optimizer without state at learning rate 0 and zero
    gradients (torch's ``_init_optim_state``): no training step, so the sparsifier stays at 0."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, opt, sp = build("set")
    get_state_dict(model, opt)
    assert sp.step == 0 and opt.state  # the state was made, the step not counted
    train(model, opt, 0, 1)
    assert sp.step == 1


def test_shards_built_with_other_seeds_stop_naming_what_differs(results):
    assert "disagree on the sparsifier's settings" in results[2]["seeds-differ"]  # seed=
