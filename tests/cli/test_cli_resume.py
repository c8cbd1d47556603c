"""Interrupting a run (a real SIGTERM) and resuming it gives the uninterrupted run, bit for bit."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import SignalAt, final_checkpoints, granet_process

from granet.cli import main
from granet.experiment.checkpoints import load_checkpoint
from granet.experiment.config import make_config
from granet.experiment.records import read_metrics
from granet.experiment.signals import Interrupted
from granet.experiment.train import train

# augment: random crops and flips draw from the global torch RNG, which resuming must restore
SETTINGS = {
    "dataset": "synthetic",
    "model": "lenet5",
    "epochs": 4,
    "batch_size": 100,
    "augment": True,
}
FLAGS = [
    "--dataset",
    "synthetic",
    "--model",
    "lenet5",
    "--epochs",
    "4",
    "--batch-size",
    "100",
    "--augment",
]
STEPS_PER_EPOCH = 9  # 900 training examples / 100


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Same final weights, optimizer state, masks and position; same per-epoch metrics."""
    a, b = final_checkpoints(run_dir, reference)
    for name, tensor in b["model"].items():
        assert torch.equal(a["model"][name], tensor), name
    for key, state in b["optimizer"]["state"].items():
        assert torch.equal(
            a["optimizer"]["state"][key]["momentum_buffer"], state["momentum_buffer"]
        )

    def drop_time(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert drop_time(read_metrics(run_dir)) == drop_time(read_metrics(reference))


def test_sigterm_mid_epoch_then_resume_matches(reference, tmp_path):
    """The signal arrives at a known step in the middle of epoch 2 (sent from a step hook)."""
    run_dir = tmp_path / "run"
    stop_at = STEPS_PER_EPOCH + 4

    with pytest.raises(Interrupted, match="--resume"):
        train(make_config(SETTINGS), run_dir, progress=False, callbacks=[SignalAt(stop_at)])
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert saved["position"] == {"epoch": 1, "batch": 4, "step": stop_at}
    assert len(read_metrics(run_dir)) == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers are put back

    train(make_config(SETTINGS), run_dir, resume=True, progress=False)
    assert_same_run(run_dir, reference)


def test_sigterm_to_the_granet_process_then_resume_matches(reference, tmp_path):
    """A real ``granet train`` process is sent SIGTERM once its first epoch is logged."""
    run_dir = tmp_path / "run"
    proc = granet_process("train", *FLAGS, "--out", str(run_dir))
    deadline = time.monotonic() + 120
    while not read_metrics(run_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "checkpoint saved" in err and f"--resume {run_dir}" in err
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert 1 <= saved["position"]["epoch"] < SETTINGS["epochs"]
    assert not (run_dir / "report.json").exists()

    assert main(["train", "--resume", str(run_dir)]) == 0
    assert_same_run(run_dir, reference)


def test_a_run_of_a_granet_without_the_compute_setting_resumes_as_dense(tmp_path):
    """granet's default became compute='auto'; a run saved before the setting existed (none in
    config.yaml, the checkpoint or the settings hash, nor any other setting added since) trained
    dense and resumes dense."""
    import json

    import yaml

    from granet.experiment.checkpoints import save_checkpoint
    from granet.experiment.folder import SETTINGS_ADDED, settings_of

    run_dir = tmp_path / "run"
    settings = {"dataset": "synthetic", "model": "mlp", "epochs": 2, "batch_size": 300}
    settings.update(method="set", sparsity=0.95, init_sparsity=0.95, **SETTINGS_ADDED)
    with pytest.raises(Interrupted):
        train(make_config(settings), run_dir, progress=False, callbacks=[SignalAt(2)])
    config_file, last = run_dir / "config.yaml", run_dir / "checkpoints" / "last.pt"
    old = yaml.safe_load(config_file.read_text())
    state = load_checkpoint(last)
    for added in SETTINGS_ADDED:
        del old[added], state["settings"][added]
    config_file.write_text(yaml.safe_dump(old, sort_keys=False))
    save_checkpoint(state, last)
    marker = json.loads((run_dir / "run.json").read_text())
    recorded = {
        k: v for k, v in settings_of(make_config(settings)).items() if k not in SETTINGS_ADDED
    }
    text = json.dumps(recorded, sort_keys=True).encode()
    marker["settings_hash"] = __import__("hashlib").sha256(text).hexdigest()[:16]
    (run_dir / "run.json").write_text(json.dumps(marker))

    assert make_config(old).compute == "auto"  # what a new run of these settings would use
    assert main(["train", "--resume", str(run_dir)]) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert {v["compute"] for v in report["layers"].values()} == {"dense"}
    assert "compute" not in yaml.safe_load(config_file.read_text())  # left as it was


def test_resuming_keeps_the_runs_own_compute_whatever_the_config_says(tmp_path):
    """As a plasticity study's base run is resumed: with the study's settings, whose compute
    (now the default, auto) is not the one the run began with."""
    import json

    run_dir = tmp_path / "run"
    settings = {"dataset": "synthetic", "model": "mlp", "epochs": 2, "batch_size": 300}
    settings.update(method="set", sparsity=0.95, init_sparsity=0.95)
    with pytest.raises(Interrupted):
        train(
            make_config({**settings, "compute": "dense"}),
            run_dir,
            progress=False,
            callbacks=[SignalAt(2)],
        )
    train(make_config(settings), run_dir, resume=True, progress=False)
    report = json.loads((run_dir / "report.json").read_text())
    assert {v["compute"] for v in report["layers"].values()} == {"dense"}
