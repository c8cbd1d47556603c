"""GraNetCallback in Lightning under FSDP2: ``ModelParallelStrategy`` on two CPU processes (gloo),
``configure_model`` sharding every Linear and the model with ``fully_shard``. A fit is resumed
from its distributed checkpoint and must end bit-identical to the uninterrupted fit.

(Lightning's ``FSDPStrategy`` refuses CPU accelerators; ``ModelParallelStrategy`` is the
strategy that uses ``fully_shard``.)
"""

import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from helpers import join_gloo, rounding_tol
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from granet.integrations.lightning import STATE_KEY, GraNetCallback  # noqa: E402

BATCHES, EPOCHS = 4, 2  # optimizer steps an epoch, epochs
GLOBAL_BATCH = 4
# float64 weights are O(1); each step adds lr * momentum-summed gradients of sums of at most
# GLOBAL_BATCH * 10 terms, in another order on one rank than on two
WEIGHT_TOL = rounding_tol(torch.float64, BATCHES * EPOCHS * GLOBAL_BATCH * 10 * 10)


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 7), nn.ReLU())
        self.head = nn.Linear(7, 3)
        self.double()

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in (*self.net, self.head):
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def training_step(self, batch, index):
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.net(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader(world: int) -> torch.utils.data.DataLoader:
    """BATCHES global batches of GLOBAL_BATCH examples an epoch, the same on any number of ranks
    (Lightning's sampler gives rank r the examples r, r + world, ...)."""
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(GLOBAL_BATCH * BATCHES, 6, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (GLOBAL_BATCH * BATCHES,), generator=g),
    )
    return torch.utils.data.DataLoader(data, batch_size=GLOBAL_BATCH // world)


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def worker(
    rank: int, port: int, out, run: str, method: str, world: int, resume: str | None, full: bool
) -> None:
    """One of ``world`` processes of the fit ``run``, started as torchrun would (Lightning does
    not launch), resumed from the checkpoint ``resume`` (under ``out``); ``full``: checkpoints
    gathered whole, which GraNetCallback refuses under FSDP2."""
    env = dict(
        LOCAL_RANK=rank, NODE_RANK=0, WORLD_SIZE=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=port
    )
    os.environ.update({k: str(v) for k, v in env.items()})
    # the group joined through a file, which Lightning takes as it is: no port to race for
    join_gloo(rank, world, out / f"store-{run}")
    model = MLP()
    cb = GraNetCallback(method, sparsity=0.7, update_every=2, seed=3)
    root = out / run
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=ModelParallelStrategy(
            data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=not full
        ),
        max_epochs=EPOCHS,
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb, ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1, filename="{step}")],
    )
    try:
        trainer.fit(model, loader(world), ckpt_path=out / resume if resume else None)
    except ValueError as error:
        if not full:
            raise
        (out / f"refused{rank}.txt").write_text(str(error))
        return
    sp = cb.sparsifier
    result = {
        "placements": [
            (type(p).__name__, p.dim)
            for p in getattr(next(iter(sp.masks.values())), "placements", ())
        ],
        "masks": {n: whole(m) for n, m in sp.masks.items()},
        "ever": {n: whole(e) for n, e in sp.state_dict()["ever_active"].items()},
        "weights": {n: whole(p.detach()) for n, p in model.named_parameters()},
        "step": sp.step,
        "sparsity": sp.sparsity(),
    }
    if rank == 0:
        torch.save(result, out / f"{run}.pt")


def start(out, run, method="granet", world=2, resume=None, full=False) -> dict | None:
    """Fit ``run`` on ``world`` processes; what its rank 0 saw."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = (port, out, run, method, world, resume, full)
    processes = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="fork")
    deadline = time.monotonic() + 300
    while not processes.join(timeout=1):
        if time.monotonic() > deadline:
            for p in processes.processes:
                p.kill()
            pytest.fail(f"the {world} FSDP2 processes did not finish within 300 s")
    return None if full else torch.load(out / f"{run}.pt", weights_only=True)


METHODS = ("granet", "snfs")  # snfs: its momentum buffers are sharded too
SAVED = f"ckpt/step={BATCHES}.ckpt"  # the checkpoint at the end of the first epoch


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("lightning_fsdp")
    found = {}
    for method in METHODS:
        found[method, "straight"] = start(out, f"{method}-straight", method)
        found[method, "resumed"] = start(
            out, f"{method}-resumed", method, resume=f"{method}-straight/{SAVED}"
        )
    # the two-rank checkpoint resumed on one rank, and one rank throughout
    found["one", "resumed"] = start(out, "one-resumed", world=1, resume=f"granet-straight/{SAVED}")
    found["one", "straight"] = start(out, "one-straight", world=1)
    return out, found


def test_the_sparsifier_runs_on_the_shards_and_saves_them_with_the_model(runs):
    out, found = runs
    straight = found["granet", "straight"]
    assert straight["placements"] == [("Shard", 0)]  # masks placed like the weights
    assert straight["step"] == BATCHES * EPOCHS
    assert straight["sparsity"] == pytest.approx(0.7, abs=0.01)
    for name, mask in straight["masks"].items():
        assert not straight["weights"][name][~mask].any(), name
    checkpoint = out / "granet-straight" / SAVED
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    assert f"state_dict.{STATE_KEY}.masks/net.0.weight" in keys
    # the callback's state in Lightning's metadata file holds no DTensor
    meta = torch.load(checkpoint / "meta.pt", weights_only=True)
    (state,) = [v for k, v in meta["callbacks"].items() if "GraNetCallback" in k]
    assert all(m is None for m in state["sparsifier"]["masks"].values())


@pytest.mark.parametrize("method", METHODS)
def test_a_resumed_fsdp2_fit_ends_bit_identical_to_the_uninterrupted_one(runs, method):
    _, found = runs
    straight, resumed = found[method, "straight"], found[method, "resumed"]
    assert resumed["step"] == straight["step"]
    for name, mask in straight["masks"].items():
        assert torch.equal(resumed["masks"][name], mask), name
        assert torch.equal(resumed["ever"][name], straight["ever"][name]), name
    for name, weight in straight["weights"].items():
        assert torch.equal(resumed["weights"][name], weight), name


def test_a_two_rank_checkpoint_resumes_on_one_rank_as_one_rank_runs(runs):
    _, found = runs
    resumed, one, two = (
        found["one", "resumed"],
        found["one", "straight"],
        found["granet", "straight"],
    )
    assert resumed["placements"] == [("Shard", 0)] and resumed["step"] == one["step"]
    for name, mask in one["masks"].items():  # float64: one and two ranks select alike
        assert torch.equal(two["masks"][name], mask), name
        assert torch.equal(resumed["masks"][name], mask), name
        assert torch.equal(resumed["ever"][name], one["ever"][name]), name
    for name, weight in one["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], weight, atol=WEIGHT_TOL, rtol=0)
        torch.testing.assert_close(two["weights"][name], weight, atol=WEIGHT_TOL, rtol=0)


def test_checkpoints_gathered_whole_are_refused_in_one_line(tmp_path):
    start(tmp_path, "full", full=True)
    for rank in (0, 1):  # every rank stops, none waits for the other in a collective
        message = (tmp_path / f"refused{rank}.txt").read_text()
        assert "save_distributed_checkpoint=True" in message and "\n" not in message


def test_a_sharded_state_is_refused_without_fsdp2_in_one_line():
    import granet
    from granet.integrations.attach import SHARDED, attach, split_sharded

    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = granet.GraNet(model, opt, sparsity=0.7, total_steps=8, update_every=2).state_dict()
    rest, shards = split_sharded(state)
    assert rest == state and not shards and SHARDED not in rest  # nothing sharded here
    rest = {**state, "masks": dict.fromkeys(state["masks"]), SHARDED: ["masks/0.weight"]}
    model2 = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    options = dict(sparsity=0.7, update_every=2)
    with pytest.raises(ValueError, match="resume it under FSDP2") as error:
        attach(granet.GraNet, model2, opt2, 8, options, rest, lambda template: None)
    assert "\n" not in str(error.value)
