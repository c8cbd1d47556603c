"""The experiment loggers: metrics records and round stats as TensorBoard scalars, read back."""

import pytest
import torch
from helpers import SmallNet, train

import granet
from granet.experiment.loggers import LOGGERS, RunLoggers, epoch_scalars, round_scalars

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

RECORD = {  # an epoch's line of metrics.jsonl, as the trainer writes it
    "epoch": 2,
    "step": 40,
    "train_loss": 0.5,
    "train_accuracy": 0.8,
    "val_loss": None,
    "val_accuracy": None,
    "sparsity": 0.9,
    "itop_rate": 0.4,
    "lr": 0.05,
    "best": True,
    "layer_density": {"fc1.weight": 0.05, "fc2.weight": 0.3},
}


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def sparsifier():
    torch.manual_seed(0)
    net = SmallNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    sp = granet.GraNet(net, opt, sparsity=0.9, total_steps=20, update_every=5)
    train(net, opt, 5)
    return sp


def test_epochs_and_rounds_reach_tensorboard(tmp_path):
    sp = sparsifier()
    with RunLoggers(["tensorboard"], tmp_path) as loggers:
        loggers.log_round(sp.stats())
        loggers.log_epoch(RECORD)
    found = scalars(tmp_path / "tensorboard")
    assert found["epoch/sparsity"] == [(40, pytest.approx(0.9))]
    assert found["epoch/layer_density/fc1.weight"] == [(40, pytest.approx(0.05))]
    assert found["round/sparsity"] == [(5, pytest.approx(sp.sparsity()))]
    assert found["round/itop_rate"] == [(5, pytest.approx(sp.itop_rate()))]
    assert found["round/pruned"] == [(5, sp.last_round["pruned"])]
    assert found["round/density/conv1.weight"] == [
        (5, pytest.approx(sp.stats()["layers"]["conv1.weight"]["density"]))
    ]
    assert "epoch/val_loss" not in found and "epoch/best" not in found


def test_scalars_keep_numbers_only():
    assert epoch_scalars(RECORD) == {
        "epoch/train_loss": 0.5,
        "epoch/train_accuracy": 0.8,
        "epoch/sparsity": 0.9,
        "epoch/itop_rate": 0.4,
        "epoch/lr": 0.05,
        "epoch/layer_density/fc1.weight": 0.05,
        "epoch/layer_density/fc2.weight": 0.3,
    }
    stats = sparsifier().stats()
    assert set(round_scalars(stats)) == {
        "round/sparsity",
        "round/target_sparsity",
        "round/itop_rate",
        "round/regrow_fraction",
        "round/pruned",
        "round/dropped",
        "round/regrown",
        *(f"round/density/{name}" for name in stats["layers"]),
    }


def test_a_resumed_run_replaces_what_followed_its_checkpoint(tmp_path):
    first = LOGGERS["tensorboard"](tmp_path, None)
    for step in range(1, 6):
        first.log({"loss": float(step)}, step)
    first.close()  # the process stopped after step 5; its checkpoint was at step 3
    resumed = LOGGERS["tensorboard"](tmp_path, 4)
    for step in (4, 5):
        resumed.log({"loss": 10.0 * step}, step)
    resumed.close()
    assert scalars(tmp_path / "tensorboard")["loss"] == [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50)]


def test_unknown_loggers_are_refused(tmp_path):
    with pytest.raises(ValueError, match="log must be one of tensorboard; got 'wandb'"):
        RunLoggers(["wandb"], tmp_path)


def test_granet_train_logs_every_epoch_and_round_and_resume_may_add_a_logger(tmp_path, capsys):
    from granet.cli import main
    from granet.experiment.records import read_metrics

    run = tmp_path / "run"
    common = ["--dataset", "synthetic", "--model", "mlp", "--batch-size", "300", "--device", "cpu"]
    assert main(["train", *common, "--epochs", "2", "--log", "tensorboard", "--out", str(run)]) == 0
    found = scalars(run / "tensorboard")
    metrics = read_metrics(run)
    assert found["epoch/sparsity"] == [(m["step"], pytest.approx(m["sparsity"])) for m in metrics]
    rounds = [step for step, _ in found["round/sparsity"]]
    assert rounds and rounds == sorted(rounds) and rounds[-1] <= metrics[-1]["step"]
    assert found["round/sparsity"][-1][1] == pytest.approx(metrics[-1]["sparsity"], abs=1e-6)
    # resuming (here: a finished run) accepts --log, which changes nothing the run computes
    assert main(["train", "--resume", str(run), "--log", "tensorboard"]) == 0
    assert "has already finished" in capsys.readouterr().err


def test_an_unknown_logger_is_a_one_line_error(tmp_path, capsys):
    from granet.cli import main

    out = tmp_path / "run"
    args = ["train", "--dataset", "synthetic", "--epochs", "1", "--log", "wandb", "--out", str(out)]
    assert main(args) == 2
    assert "log must be one of tensorboard; got 'wandb'" in capsys.readouterr().err
    assert not out.exists()
