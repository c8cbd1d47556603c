"""GraNetCallback in Lightning, on a small CNN (CPU)."""

import csv

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

import granet  # noqa: E402
from granet.checksum import with_checksum  # noqa: E402
from granet.integrations.lightning import GraNetCallback  # noqa: E402

EPOCHS, BATCHES = 4, 8  # 8 optimizer steps an epoch


class CNN(pl.LightningModule):
    def __init__(self, overflow_at=()) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 10),
        )
        self.overflow_at = overflow_at

    def training_step(self, batch, index):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def on_after_backward(self):
        if self.trainer.global_step in self.overflow_at:  # as an fp16 overflow would
            self.net[0].weight.grad[0, 0, 0, 0] = float("inf")


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(8 * BATCHES, 1, 8, 8, generator=g),
        torch.randint(0, 10, (8 * BATCHES,), generator=g),
    )
    return torch.utils.data.DataLoader(data, batch_size=8)


def fit(root, ckpt_path=None, model=None, checkpoints=True, **trainer_args):
    torch.manual_seed(0)
    model = model or CNN()
    cb = GraNetCallback("granet", sparsity=0.8, update_every=4)
    saving = [ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1)] if checkpoints else []
    settings = dict(
        max_epochs=EPOCHS,
        accelerator="cpu",
        default_root_dir=root,
        logger=CSVLogger(root),
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb, *saving],
        enable_checkpointing=checkpoints,
    )
    trainer = pl.Trainer(**{**settings, **trainer_args})
    trainer.fit(model, loader(), ckpt_path=ckpt_path)
    return trainer, model, cb


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lightning")
    return (root, *fit(root))


def test_the_cnn_reaches_the_target_sparsity_and_logs_it(run):
    root, trainer, model, cb = run
    sp = cb.sparsifier
    assert sp.step == EPOCHS * BATCHES == trainer.global_step
    assert sp.names == ["net.0.weight", "net.3.weight", "net.6.weight"]
    assert sp.sparsity() == pytest.approx(0.8, abs=1e-3)
    with open(trainer.logger.log_dir + "/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == EPOCHS * BATCHES
    assert float(rows[-1]["granet/sparsity"]) == pytest.approx(sp.sparsity())
    assert float(rows[0]["granet/sparsity"]) == pytest.approx(0.5, abs=1e-3)  # GraNet's start
    assert float(rows[-1]["granet/itop_rate"]) == pytest.approx(sp.itop_rate())
    assert {"granet/pruned", "granet/dropped", "granet/regrown"} <= set(rows[-1])


def test_a_resumed_fit_ends_as_the_uninterrupted_one(run, tmp_path):
    root, _, model, cb = run
    _, model2, cb2 = fit(tmp_path, ckpt_path=root / "ckpt" / "epoch=1-step=16.ckpt")
    a, b = cb.sparsifier.state_dict(), cb2.sparsifier.state_dict()
    for name in a["masks"]:
        assert torch.equal(a["masks"][name], b["masks"][name]), name
        assert torch.equal(a["ever_active"][name], b["ever_active"][name]), name
    for (name, p), q in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(p, q), name


def test_the_checkpoint_loads_without_granet_and_keeps_its_zeros(run):
    root, _, model, cb = run
    loaded = CNN.load_from_checkpoint(root / "ckpt" / "epoch=3-step=32.ckpt")
    for name, mask in cb.sparsifier.masks.items():
        weight = loaded.get_parameter(name)
        assert torch.equal(weight, model.get_parameter(name)) and not weight[~mask].any()


def test_steps_skipped_by_the_grad_scaler_do_not_count(tmp_path):
    # 16-mixed makes a GradScaler on GPUs; this one runs its CPU code path, at a scale that
    # overflows only where the model says so
    scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
    precision = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer, model, cb = fit(
        tmp_path,
        model=CNN(overflow_at={2, 5}),
        max_epochs=2,
        plugins=[precision],
        accumulate_grad_batches=2,
        checkpoints=False,
    )
    sp = cb.sparsifier
    assert trainer.global_step == 8 and sp.step == 8 - 2
    for name, p in zip(sp.names, sp.params):
        assert torch.isfinite(p).all() and not p[~sp.masks[name]].any()


def test_more_than_one_optimizer_is_refused(tmp_path):
    class TwoOptimizers(CNN):
        automatic_optimization = False

        def configure_optimizers(self):
            return [
                torch.optim.SGD(self.net[:3].parameters(), lr=0.1),
                torch.optim.SGD(self.net[3:].parameters(), lr=0.1),
            ]

        def training_step(self, batch, index):
            return None

    with pytest.raises(ValueError, match="works with one optimizer; configure_optimizers gave 2"):
        fit(tmp_path, model=TwoOptimizers(), checkpoints=False)


def test_a_checkpoint_without_sparsifier_state_is_refused(run, tmp_path):
    checkpoint = torch.load(run[0] / "ckpt" / "epoch=1-step=16.ckpt", weights_only=False)
    del checkpoint["callbacks"]["GraNetCallback"]
    torch.save(checkpoint, tmp_path / "dense.ckpt")
    with pytest.raises(ValueError, match="dense.ckpt holds no GraNetCallback state"):
        fit(tmp_path, ckpt_path=tmp_path / "dense.ckpt", checkpoints=False)


def with_granet_state(run, tmp_path, change):
    """A copy of the run's epoch-2 checkpoint whose GraNetCallback state ``change`` edited."""
    checkpoint = torch.load(run[0] / "ckpt" / "epoch=1-step=16.ckpt", weights_only=False)
    states = checkpoint["callbacks"]
    assert set(states["GraNetCallback"]) == {"sparsifier", "sha256"}
    states["GraNetCallback"] = change(states["GraNetCallback"])
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    return tmp_path / "edited.ckpt"


def flip_a_mask_bit(state):
    next(iter(state["sparsifier"]["masks"].values()))[0] ^= 1
    return state


@pytest.mark.parametrize(
    "change, message",
    [
        (flip_a_mask_bit, "its GraNetCallback state is corrupt: its contents do not match"),
        (lambda s: [1, 2], "not a granet GraNetCallback state .*found \\[1, 2\\]"),
        (lambda s: "granet", "not a granet GraNetCallback state"),
        (lambda s: {"sparsifier": s["sparsifier"]}, "not a granet GraNetCallback state"),
        (lambda s: with_checksum({"sparsifier": 5}), "holds no sparsifier state dict"),
        (
            lambda s: with_checksum({"sparsifier": {**s["sparsifier"], "step": -16}}),
            "sparsifier state step must be an integer >= 0; got -16",
        ),
    ],
    ids=["mask bit", "a list", "a string", "no checksum", "inner", "negative step"],
)
def test_a_damaged_state_is_refused_in_one_line_naming_the_checkpoint(
    run, tmp_path, change, message
):
    path = with_granet_state(run, tmp_path, change)
    with pytest.raises(ValueError, match=message) as error:
        fit(tmp_path, ckpt_path=path, checkpoints=False)
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)


def test_a_state_of_granet_before_checksums_resumes_with_a_warning(run, tmp_path):
    path = with_granet_state(run, tmp_path, lambda s: s["sparsifier"])
    with pytest.warns(UserWarning, match="its GraNetCallback state has no checksum"):
        _, _, cb = fit(tmp_path, ckpt_path=path, checkpoints=False)
    assert cb.sparsifier.step == EPOCHS * BATCHES


def test_a_model_fits_again_with_a_new_callback_and_keeps_its_zeros(tmp_path):
    trainer, model, first = fit(tmp_path / "a", max_epochs=1, checkpoints=False)
    for name, mask in first.sparsifier.masks.items():
        assert not model.get_parameter(name)[~mask].any()
    second = GraNetCallback("rigl", sparsity=0.9, update_every=4)
    again = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[second],
    )
    again.fit(model, loader())
    assert second.sparsifier.step == BATCHES
    assert second.sparsifier.sparsity() == pytest.approx(0.9, abs=1e-3)


def test_a_lightning_optimizer_is_unwrapped_for_sparse_compute():
    from lightning.pytorch.core.optimizer import LightningOptimizer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 600), torch.nn.ReLU(), torch.nn.Linear(600, 10))
    inner = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sp = granet.RigL(
        net, LightningOptimizer(inner), sparsity=0.95, total_steps=20, compute="sparse"
    )
    assert sp.optimizer is inner and sp._compute.sparse_layers() == sp.names
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    for _ in range(3):
        inner.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        inner.step()  # the sparse update: no KeyError on the wrapper's class
    assert all(not (p[~m] != 0).any() for p, m in zip(sp.params, sp.masks.values()))
