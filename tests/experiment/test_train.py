"""``train()``, the run life-cycle, with a run that starts from another run's state (as a study
continues from a checkpoint): it is stopped, resumed with the same start, and ends as the run it
continues would have."""

from __future__ import annotations

import pytest
from helpers import SignalAt, assert_identical

from granet.experiment.blocks import load_data
from granet.experiment.checkpoints import checkpoint_path, load_checkpoint
from granet.experiment.config import make_config
from granet.experiment.records import read_metrics, read_report
from granet.experiment.signals import Interrupted
from granet.experiment.train import train
from granet.experiment.trainer import Callbacks, StartFrom

SETTINGS = {"dataset": "synthetic", "model": "lenet5", "epochs": 3, "batch_size": 300}


class SaveAtEpoch(Callbacks):
    def __init__(self, epoch, path):
        self.epoch, self.path = epoch, path

    def on_epoch_end(self, trainer, record):
        if trainer.epoch == self.epoch:
            trainer.save(self.path)


def test_a_run_started_from_another_runs_state_resumes_with_it(tmp_path):
    config = make_config(SETTINGS)
    train(
        config, tmp_path / "whole", progress=False, callbacks=[SaveAtEpoch(1, tmp_path / "e1.pt")]
    )
    start = StartFrom.checkpoint(tmp_path / "e1.pt")
    with pytest.raises(Interrupted):
        train(config, tmp_path / "later", progress=False, start=start, callbacks=[SignalAt(4)])
    assert load_checkpoint(checkpoint_path(tmp_path / "later"))["position"]["step"] == 4
    train(config, tmp_path / "later", resume=True, progress=False, start=start)
    assert [m["epoch"] for m in read_metrics(tmp_path / "later")] == [2, 3]
    keys = ("model", "optimizer", "sparsifier", "position")
    final = load_checkpoint(checkpoint_path(tmp_path / "later"))
    whole = load_checkpoint(checkpoint_path(tmp_path / "whole"))
    assert_identical({k: final[k] for k in keys}, {k: whole[k] for k in keys})


def test_a_run_given_its_loaded_data_trains_on_it_without_loading_again(tmp_path, monkeypatch):
    config = make_config({**SETTINGS, "epochs": 1})
    train(config, tmp_path / "loads", progress=False)
    data = load_data(config)

    def no_loading(*args, **kwargs):
        raise AssertionError("the data set was loaded again")

    monkeypatch.setattr("granet.experiment.blocks.load_data", no_loading)
    report = train(config, tmp_path / "given", progress=False, data=data)
    assert report["test_accuracy"] == read_report(tmp_path / "loads")["test_accuracy"]
    given = load_checkpoint(checkpoint_path(tmp_path / "given"))
    loaded = load_checkpoint(checkpoint_path(tmp_path / "loads"))
    assert_identical(given["model"], loaded["model"])
