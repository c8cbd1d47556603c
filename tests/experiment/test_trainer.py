"""The trainer as experiments use it: hooks, a run in memory, part of a schedule, a start from
a given (pruned) state, evaluation, and the checks it makes before and while training."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_identical

from granet.experiment.blocks import check_schedule
from granet.experiment.config import make_config
from granet.experiment.datasets.synthetic import synthetic
from granet.experiment.errors import RunFailed
from granet.experiment.trainer import Callbacks, StartFrom, Trainer
from granet.masks import unpack_bits

SETTINGS = {"dataset": "synthetic", "model": "lenet5", "epochs": 3, "batch_size": 300}
STEPS_PER_EPOCH = 3  # 900 / 300
DATA = synthetic(seed=0)


class Log(Callbacks):
    def __init__(self, save_at: dict[int, object] | None = None) -> None:
        self.steps, self.rounds, self.epochs = [], [], []
        self.save_at = save_at or {}

    def on_step(self, trainer):
        self.steps.append(trainer.step)

    def on_round(self, trainer):
        self.rounds.append((trainer.step, trainer.sparsifier.last_round))

    def on_epoch_end(self, trainer, record):
        self.epochs.append((trainer.epoch, record["epoch"]))
        if trainer.epoch in self.save_at:
            trainer.save(self.save_at[trainer.epoch])


def make(callbacks=(), start=None, **settings) -> Trainer:
    config = make_config({**SETTINGS, **settings})
    return Trainer(config, data=DATA, device="cpu", callbacks=callbacks, start=start)


def test_hooks_see_every_step_every_round_and_every_epoch():
    log = Log()
    trainer = make([log], update_every=2)
    trainer.fit()
    assert log.steps == list(range(1, 10))
    assert [step for step, _ in log.rounds] == [2, 4, 6, 8]  # rounds strictly inside (0, 9)
    assert all(counts["dropped"] > 0 for _, counts in log.rounds)
    assert log.epochs == [(1, 1), (2, 2), (3, 3)]


def test_part_of_the_schedule_then_the_rest_is_the_whole_run():
    whole = make()
    whole.fit()
    parted = make()
    parted.fit(epochs=1)
    assert (parted.epoch, parted.step) == (1, STEPS_PER_EPOCH)
    parted.fit()
    assert_identical(parted.model.state_dict(), whole.model.state_dict())
    with pytest.raises(ValueError, match=r"epochs must be in \[3, 3\]; got 2"):
        parted.fit(epochs=2)


def test_a_checkpoint_saved_by_a_hook_starts_another_run_where_it_was(tmp_path):
    whole = make([Log({1: tmp_path / "epoch1.pt"})])
    whole.fit()
    assert not list(tmp_path.glob("*.tmp")) and (tmp_path / "epoch1.pt").is_file()
    later = make(start=StartFrom.checkpoint(tmp_path / "epoch1.pt"))
    assert (later.epoch, later.step) == (1, STEPS_PER_EPOCH)
    later.fit()
    assert_identical(later.model.state_dict(), whole.model.state_dict())
    assert_identical(later.sparsifier.masks, whole.sparsifier.masks)
    assert later.evaluate("test") == whole.evaluate("test")


def test_weights_pruned_by_the_caller_start_a_static_run(tmp_path):
    dense = make([Log({1: tmp_path / "dense1.pt"})], method="dense")
    dense.fit(epochs=1)
    start = StartFrom.checkpoint(tmp_path / "dense1.pt", optimizer=False)
    pruned = dict(start.model)
    weight = pruned["fc1.weight"].clone()
    cut = weight.abs().flatten().kthvalue(weight.numel() // 2).values
    pruned["fc1.weight"] = torch.where(weight.abs() > cut, weight, torch.zeros(()))
    start.model = pruned
    trainer = make(start=start, method="static", init="existing", exclude=["conv*", "fc2*", "fc3*"])
    kept = trainer.sparsifier.masks["fc1.weight"]
    assert torch.equal(kept, pruned["fc1.weight"] != 0)
    assert trainer.sparsifier.algorithm.total_steps == 2 * STEPS_PER_EPOCH  # the rest of the run
    trainer.fit()
    assert not trainer.model.fc1.weight[~kept].any()  # the pruned weights stay pruned
    loss, accuracy = trainer.evaluate("test")
    assert loss > 0 and 0 <= accuracy <= 1


def test_a_mid_epoch_checkpoint_is_not_a_start(tmp_path):
    class SaveMidway(Callbacks):
        def on_step(self, trainer):
            if trainer.step == 2:
                trainer.save(tmp_path / "mid.pt")

    make([SaveMidway()]).fit(epochs=1)
    with pytest.raises(ValueError, match="middle of an epoch: resume that run instead"):
        StartFrom.checkpoint(tmp_path / "mid.pt")


def test_start_from_is_the_checkpoints_own():
    from granet.experiment import checkpoints

    assert StartFrom is checkpoints.StartFrom


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: s["position"].update(epoch=-1),
        lambda s: s.update(best={"epoch": 0, "val_accuracy": 0.5}),
        lambda s: s.update(format=2),
    ],
)
def test_a_malformed_state_is_refused_before_anything_changes(damage):
    trained = make()
    trained.fit(epochs=1)
    state = trained.state_dict()
    damage(state)
    fresh = make()
    before = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    with pytest.raises(ValueError, match="does not hold a state of this run|checkpoint format"):
        fresh.load_state_dict(state)
    assert_identical(fresh.model.state_dict(), before)
    assert (fresh.epoch, fresh.step) == (0, 0)


def test_evaluate_names_its_splits():
    config = make_config({**SETTINGS, "val_size": 0.0})
    trainer = Trainer(config, data=synthetic(val_size=0.0), device="cpu")
    with pytest.raises(ValueError, match="no validation split"):
        trainer.evaluate("val")
    with pytest.raises(ValueError, match="split must be 'val' or 'test'; got 'train'"):
        trainer.evaluate("train")


def test_a_non_finite_loss_stops_training():
    images = DATA.train.images.clone()
    images[5] = float("nan")
    broken = type(DATA)(
        DATA.train.split(torch.arange(len(images)), False), DATA.val, DATA.test, 10, 1, 28, "nan"
    )
    broken.train.images = images
    trainer = Trainer(make_config(SETTINGS), data=broken, device="cpu")
    with pytest.raises(RunFailed, match="training loss became non-finite .* by step 3, epoch 1"):
        trainer.fit()


def test_a_schedule_that_cannot_reach_its_target_is_refused_before_training():
    config = make_config({**SETTINGS, "epochs": 1, "update_every": 4})
    with pytest.raises(ValueError, match="never reaches sparsity=0.9"):
        check_schedule(config, train_size=900)
    check_schedule(make_config({**SETTINGS, "epochs": 1, "update_every": 1}), 900)
    check_schedule(make_config({**SETTINGS, "method": "rigl", "update_every": 100}), 900)
    with pytest.raises(ValueError, match="never reaches sparsity=0.9"):
        make(epochs=1, update_every=4)


def test_layer_densities_are_the_mean_over_the_epochs_steps():
    class Densities(Callbacks):
        def __init__(self):
            self.steps, self.epochs = [], []

        def on_step(self, trainer):
            masks = trainer.sparsifier.masks.values()
            self.steps.append([m.float().mean().item() for m in masks])

        def on_epoch_end(self, trainer, record):
            self.epochs.append(list(record["layer_density"].values()))

    seen = Densities()
    make([seen], method="gmp", update_every=1, epochs=2).fit()
    assert seen.steps[0] != seen.steps[-1]  # the masks changed from step to step
    for epoch, logged in enumerate(seen.epochs):
        steps = seen.steps[epoch * STEPS_PER_EPOCH : (epoch + 1) * STEPS_PER_EPOCH]
        assert logged == pytest.approx([sum(layer) / len(steps) for layer in zip(*steps)])


def test_masks_given_to_start_from_keep_the_whole_runs_schedule(tmp_path):
    """StartFrom(masks=...): the masks of a checkpoint, given as masks instead of its
    sparsifier state, go on at the checkpoint's step with the whole run's schedule, and the
    run ends as the uninterrupted one did."""
    settings = {"method": "rigl", "sparsity": 0.5, "update_every": 2}
    whole = make([Log({1: tmp_path / "epoch1.pt"})], **settings)
    whole.fit()
    saved = StartFrom.checkpoint(tmp_path / "epoch1.pt")
    state = saved.sparsifier
    masks = {n: unpack_bits(m, state["shapes"][n]) for n, m in state["masks"].items()}
    start = StartFrom(saved.model, saved.optimizer, epoch=1, masks=masks)
    later = make(start=start, **settings)
    sp = later.sparsifier
    assert sp.algorithm.total_steps == 3 * STEPS_PER_EPOCH and sp.step == STEPS_PER_EPOCH
    assert_identical(sp.masks, masks)
    assert_identical(later.model.state_dict(), dict(saved.model))  # not masked by its own draw
    density = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert sp.itop_rate() == density  # the given masks are its whole record
    later.fit()
    assert_identical(later.model.state_dict(), whole.model.state_dict())
    assert_identical(later.sparsifier.masks, whole.sparsifier.masks)
    with pytest.raises(ValueError, match="a sparsifier state or masks, not both"):
        StartFrom(saved.model, sparsifier=state, masks=masks)
