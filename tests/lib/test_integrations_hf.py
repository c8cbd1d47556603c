"""GraNetCallback in the Hugging Face Trainer, on a tiny GPT-2 built from a config (CPU)."""

import importlib.util
import os
import shutil
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from helpers import Tokens, hf_gpt2

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import (  # noqa: E402
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.pytorch_utils import Conv1D  # noqa: E402

from granet.checksum import with_checksum  # noqa: E402
from granet.integrations.hf import STATE_FILE, GraNetCallback  # noqa: E402

STEPS = 24
REPORT = ["tensorboard"] if importlib.util.find_spec("tensorboard") else "none"


def trainer(out, model, callbacks, **args) -> Trainer:
    settings = dict(
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=4,
        save_steps=8,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    arguments = TrainingArguments(str(out), **{**settings, **args})
    return Trainer(model=model, args=arguments, train_dataset=Tokens(64), callbacks=callbacks)


def callback() -> GraNetCallback:
    return GraNetCallback("granet", sparsity=0.8, update_every=4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One uninterrupted run of STEPS steps, with checkpoints every 8."""
    out = tmp_path_factory.mktemp("hf")
    model, cb = hf_gpt2(), callback()
    t = trainer(out, model, [cb], report_to=REPORT)
    t.train()
    return out, t, model, cb


def test_gpt2s_conv1d_weights_reach_the_target_sparsity(run):
    _, _, model, cb = run
    sp = cb.sparsifier
    assert sp.step == STEPS
    conv1d = [m.weight for m in model.modules() if isinstance(m, Conv1D)]
    assert [p.data_ptr() for p in sp.params] == [p.data_ptr() for p in conv1d]
    zeros = sum(int((p == 0).sum()) for p in conv1d) / sum(p.numel() for p in conv1d)
    assert zeros == pytest.approx(0.8, abs=1e-4)
    assert model.transformer.wte.weight.count_nonzero() == model.transformer.wte.weight.numel()


def test_sparsity_itop_and_round_counts_reach_the_logs(run):
    out, t, _, cb = run
    logged = [h for h in t.state.log_history if "loss" in h]
    assert len(logged) == STEPS // 4
    assert all({"granet/itop_rate", "granet/pruned", "granet/regrown"} <= set(h) for h in logged)
    assert logged[-1]["granet/sparsity"] == pytest.approx(cb.sparsifier.sparsity())
    if REPORT == "none":
        pytest.skip("tensorboard is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (log_dir,) = (out / "runs").iterdir()
    events = EventAccumulator(str(log_dir))
    events.Reload()
    sparsity = events.Scalars("train/granet/sparsity")
    assert [e.step for e in sparsity] == [4, 8, 12, 16, 20, 24, 24]  # each log, then the summary
    assert sparsity[-1].value == pytest.approx(0.8, abs=1e-4)


def test_the_saved_model_loads_in_plain_transformers_with_its_zeros(run, tmp_path):
    _, t, model, cb = run
    t.save_model(str(tmp_path))
    assert not (tmp_path / STATE_FILE).exists()  # nothing of granet's in the model folder
    loaded = GPT2LMHeadModel.from_pretrained(str(tmp_path))
    for name, mask in cb.sparsifier.masks.items():
        weight = loaded.get_parameter(name)
        assert torch.equal(weight, model.get_parameter(name))
        assert not weight[~mask].any()


def test_a_resumed_run_ends_as_the_uninterrupted_one(run, tmp_path):
    out, _, model, cb = run
    model2, cb2 = hf_gpt2(), callback()
    # another output folder: the checkpoint is found where the Trainer was told to resume from
    trainer(tmp_path, model2, [cb2]).train(resume_from_checkpoint=str(out / "checkpoint-8"))
    a, b = cb.sparsifier.state_dict(), cb2.sparsifier.state_dict()
    for name in a["masks"]:
        assert torch.equal(a["masks"][name], b["masks"][name]), name
        assert torch.equal(a["ever_active"][name], b["ever_active"][name]), name
    assert a["step"] == b["step"] == STEPS
    for (name, p), q in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_checkpoint_without_sparsifier_state_is_refused(run, tmp_path):
    out = run[0]
    shutil.copytree(out / "checkpoint-8", tmp_path / "checkpoint-8")
    (tmp_path / "checkpoint-8" / STATE_FILE).unlink()
    t = trainer(tmp_path, hf_gpt2(), [callback()])
    with pytest.raises(ValueError, match=f"holds no {STATE_FILE}"):
        t.train(resume_from_checkpoint=True)


def flip_a_mask_bit(path):
    saved = torch.load(path, weights_only=True)
    next(iter(saved["sparsifier"]["masks"].values()))[0] ^= 1
    torch.save(saved, path)


def truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def without(key):
    return lambda state: {k: v for k, v in state.items() if k != key}


def resave(change):
    def damage(path):
        torch.save(change(torch.load(path, weights_only=True)), path)

    return damage


@pytest.mark.parametrize(
    "damage, message",
    [
        (flip_a_mask_bit, "its sparsifier state is corrupt: its contents do not match"),
        (truncate, "cannot read it"),
        (resave(lambda s: [1, 2]), "not a granet sparsifier state .*found \\[1, 2\\]"),
        (resave(lambda s: {"global_step": 8}), "not a granet sparsifier state"),
        (resave(lambda s: {**s, "sha256": None}), "its sparsifier state is corrupt"),
        (resave(without("sha256")), "not a granet sparsifier state"),
        (
            resave(lambda s: with_checksum({**without("sha256")(s), "sparsifier": [1]})),
            "sparsifier state must be a dict",
        ),
        (
            resave(lambda s: with_checksum({**without("sha256")(s), "global_step": -8})),
            "was saved at step -8",
        ),
        (resave(lambda s: with_checksum({**without("sha256")(s), "format": 3})), "has format 3"),
    ],
    ids=[
        "mask bit",
        "truncated",
        "not a dict",
        "key missing",
        "checksum none",
        "checksum removed",
        "inner",
        "step",
        "format",
    ],
)
def test_a_damaged_state_file_is_refused_in_one_line_naming_it(run, tmp_path, damage, message):
    shutil.copytree(run[0] / "checkpoint-8", tmp_path / "checkpoint-8")
    path = tmp_path / "checkpoint-8" / STATE_FILE
    damage(path)
    with pytest.raises(ValueError, match=message) as error:
        trainer(tmp_path, hf_gpt2(), [callback()]).train(resume_from_checkpoint=True)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_a_state_file_of_granet_before_checksums_resumes_with_a_warning(run, tmp_path):
    shutil.copytree(run[0] / "checkpoint-16", tmp_path / "checkpoint-16")
    path = tmp_path / "checkpoint-16" / STATE_FILE
    saved = torch.load(path, weights_only=True)
    assert set(saved) == {"format", "global_step", "sparsifier", "sha256"}
    del saved["sha256"], saved["format"]  # as granet wrote it before checksums
    torch.save(saved, path)
    cb = callback()
    with pytest.warns(UserWarning, match=f"{path}: its sparsifier state has no checksum"):
        trainer(tmp_path, hf_gpt2(), [cb]).train(resume_from_checkpoint=True)
    assert cb.sparsifier.step == STEPS
    resaved = torch.load(tmp_path / "checkpoint-24" / STATE_FILE, weights_only=True)
    assert set(resaved) == {"format", "global_step", "sparsifier", "sha256"}


def test_a_model_trains_again_with_a_new_callback_and_keeps_its_zeros(tmp_path):
    model, first = hf_gpt2(), callback()
    trainer(tmp_path / "a", model, [first], max_steps=8, save_strategy="no").train()
    for name, mask in first.sparsifier.masks.items():
        assert not model.get_parameter(name)[~mask].any()
    second = GraNetCallback("rigl", sparsity=0.9, update_every=4)
    trainer(tmp_path / "b", model, [second], max_steps=8, save_strategy="no").train()
    assert second.sparsifier.step == 8
    assert second.sparsifier.sparsity() == pytest.approx(0.9, abs=1e-4)


class Overflow(TrainerCallback):
    """Puts an inf into a gradient before the optimizer steps at the given steps, as an fp16
    overflow would; notes whether accelerate saw the step skipped."""

    def __init__(self, steps) -> None:
        self.steps, self.skipped = steps, []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            model.transformer.h[0].mlp.c_fc.weight.grad[0, 0] = float("inf")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.skipped.append(self.accelerator.optimizer_step_was_skipped)


@pytest.mark.parametrize(
    "optim, bf16",
    [("sgd", False), ("adamw_torch_fused", True)],
    ids=["unfused", "fused-bf16"],
)
def test_steps_skipped_by_the_grad_scaler_do_not_count(tmp_path, optim, bf16):
    cb, overflow = GraNetCallback("granet", sparsity=0.8, update_every=2), Overflow({2, 5})
    t = trainer(
        tmp_path,
        hf_gpt2(),
        [cb, overflow],
        max_steps=8,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        optim=optim,
        bf16=bf16,
        max_grad_norm=0.0,
        save_strategy="no",
    )
    # accelerate makes a GradScaler for fp16 on GPUs only: this one runs its CPU code path
    t.accelerator.scaler = torch.amp.GradScaler("cpu")
    overflow.accelerator = t.accelerator
    t.train()
    sp = cb.sparsifier
    assert sp.step == 8 - 2
    if optim == "sgd":  # a fused optimizer is called on a skipped step and skips it itself
        assert [i for i, s in enumerate(overflow.skipped) if s] == [2, 5]
    assert sp.sparsity() == pytest.approx(0.8, abs=1e-4)
    for name, p in zip(sp.names, sp.params):
        assert torch.isfinite(p).all() and not p[~sp.masks[name]].any()


def ddp_worker(rank: int, port: int, out) -> None:
    """One of two processes of a Trainer under DDP (gloo), as torchrun would start it."""
    env = dict(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    os.environ.update({k: str(v) for k, v in env.items()})
    torch.set_num_threads(1)
    model, cb = hf_gpt2(), callback()
    args = dict(max_steps=8, per_device_train_batch_size=2, save_strategy="no", ddp_backend="gloo")
    t = trainer(out, model, [cb], **args)
    t.train()
    sp = cb.sparsifier
    torch.save(
        {
            "masks": sp.state_dict()["masks"],
            "step": sp.step,
            "sparsity": sp.sparsity(),
            "wrapper": type(t.model_wrapped).__name__,
            "weights": model.state_dict(),
        },
        out / f"rank{rank}.pt",
    )


def test_the_trainers_ddp_trains_the_same_masks_on_every_rank(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # forked, the processes start with transformers imported (spawned, each imports it again)
    processes = mp.start_processes(
        ddp_worker, args=(port, tmp_path), nprocs=2, join=False, start_method="fork"
    )
    deadline = time.monotonic() + 300
    while not processes.join(timeout=1):
        if time.monotonic() > deadline:
            for p in processes.processes:
                p.kill()
            pytest.fail("the two DDP processes did not finish within 300 s")
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["wrapper"] == "DistributedDataParallel" and a["step"] == b["step"] == 8
    assert a["sparsity"] == pytest.approx(0.8, abs=1e-4)
    for name in a["masks"]:  # the sparsifier also checks this itself after every round
        assert torch.equal(a["masks"][name], b["masks"][name]), name
    for name in a["weights"]:
        assert torch.equal(a["weights"][name], b["weights"][name]), name
