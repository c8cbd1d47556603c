"""GraNetCallback in the Hugging Face Trainer under accelerate's FSDP2 plugin, two gloo processes.

On CPU accelerate quietly trains a ``fsdp_version: 2`` run as DDP (MULTI_CPU); the Trainer here
is told that its accelerator runs FSDP, after which accelerate's own FSDP2 path (``fully_shard``
of every GPT2Block and the model, optimizer swapped to the DTensors) and the Trainer's sharded
checkpoints (``SHARDED_STATE_DICT``) run unchanged. A run is interrupted at a checkpoint and
resumed from it; it must end bit-identical to the uninterrupted run.
"""

import os
import shutil
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from helpers import Tokens, hf_gpt2, join_gloo

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import Trainer, TrainingArguments  # noqa: E402

from granet.integrations.hf import STATE_DIR, STATE_FILE, GraNetCallback  # noqa: E402

STEPS, SAVE = 8, 4


class FsdpTrainer(Trainer):
    """A Trainer whose accelerator runs FSDP on CPU processes (accelerate does so on GPUs)."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        self.accelerator.state.distributed_type = DistributedType.FSDP
        plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        self.accelerator.state.fsdp_plugin = plugin
        self.is_fsdp_enabled = True


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def worker(rank: int, port: int, out, resume: str | None) -> None:
    """One of two processes of the Trainer, as torchrun would start it; ``resume``: the
    checkpoint folder to resume from (under ``out``)."""
    env = dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    os.environ.update({k: str(v) for k, v in env.items()})
    # the group joined through a file, which accelerate takes as it is: no port to race for
    join_gloo(rank, 2, out / f"store-{(resume or 'straight').replace('/', '-')}")
    model = hf_gpt2()
    cb = GraNetCallback("granet", sparsity=0.8, update_every=2)
    args = TrainingArguments(
        str(out / ("resumed" if resume else "straight")),
        max_steps=STEPS,
        save_steps=SAVE,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        fsdp="full_shard",
        fsdp_config={
            "fsdp_version": 2,
            "transformer_layer_cls_to_wrap": ["GPT2Block"],
            "state_dict_type": "SHARDED_STATE_DICT",
        },
    )
    t = FsdpTrainer(model=model, args=args, train_dataset=Tokens(32), callbacks=[cb])
    try:
        t.train(resume_from_checkpoint=str(out / resume) if resume else None)
    except ValueError as error:
        (out / f"refused{rank}.txt").write_text(str(error))
        return
    sp = cb.sparsifier
    mask = next(iter(sp.masks.values()))
    result = {
        "placements": [(type(p).__name__, p.dim) for p in getattr(mask, "placements", ())],
        "masks": {n: whole(m) for n, m in sp.masks.items()},
        "weights": {n: whole(p.detach()) for n, p in model.named_parameters()},
        "step": sp.step,
        "sparsity": sp.sparsity(),
        "itop": sp.itop_rate(),
    }
    if rank == 0:
        torch.save(result, out / f"{'resumed' if resume else 'straight'}.pt")


def start(out, resume: str | None) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # forked, the processes start with transformers imported (spawned, each imports it again)
    processes = mp.start_processes(
        worker, args=(port, out, resume), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 300
    while not processes.join(timeout=1):
        if time.monotonic() > deadline:
            for p in processes.processes:
                p.kill()
            pytest.fail("the two FSDP2 processes did not finish within 300 s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_fsdp")
    start(out, resume=None)
    start(out, resume=f"straight/checkpoint-{SAVE}")
    load = lambda name: torch.load(out / f"{name}.pt", weights_only=True)  # noqa: E731
    return out, load("straight"), load("resumed")


def test_the_sparsifier_runs_on_the_shards_and_saves_them_apart(runs):
    out, straight, _ = runs
    assert straight["placements"] == [("Shard", 0)]  # masks placed like the weights
    assert straight["step"] == STEPS and straight["sparsity"] == pytest.approx(0.8, abs=1e-3)
    for name, mask in straight["masks"].items():
        assert not straight["weights"][name][~mask].any(), name
    checkpoint = out / "straight" / f"checkpoint-{SAVE}"
    assert (checkpoint / STATE_DIR / ".metadata").is_file()
    # the checksummed part holds no DTensor: it loads as plain tensors
    saved = torch.load(checkpoint / STATE_FILE, weights_only=True)
    assert saved["global_step"] == SAVE and saved["sparsifier"]["masks"]
    assert all(m is None for m in saved["sparsifier"]["masks"].values())


def test_a_resumed_fsdp2_run_ends_bit_identical_to_the_uninterrupted_one(runs):
    _, straight, resumed = runs
    assert resumed["step"] == straight["step"] == STEPS
    assert resumed["itop"] == straight["itop"]
    for name, mask in straight["masks"].items():
        assert torch.equal(resumed["masks"][name], mask), name
    for name, weight in straight["weights"].items():
        assert torch.equal(resumed["weights"][name], weight), name


def test_a_checkpoint_without_its_shards_is_refused_on_every_rank_in_one_line(runs):
    out = runs[0]
    damaged = out / "damaged"
    shutil.copytree(out / "straight" / f"checkpoint-{SAVE}", damaged)
    shutil.rmtree(damaged / STATE_DIR)
    start(out, resume="damaged")
    for rank in (0, 1):  # every rank stops, none waits for the other in a collective
        message = (out / f"refused{rank}.txt").read_text()
        assert f"{STATE_DIR} is missing" in message and "\n" not in message
