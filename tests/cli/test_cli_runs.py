"""Run folders through ``granet train``: what --overwrite may delete, one writer per folder
(real processes), and what --resume checks before it trains."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml
from helpers import SignalAt, granet_process, one_line_error

from granet.cli import main
from granet.experiment.checkpoints import checkpoint_path
from granet.experiment.config import make_config
from granet.experiment.files import LOCK_FILE
from granet.experiment.folder import MARKER_FILE, open_run, read_marker
from granet.experiment.records import read_metrics
from granet.experiment.signals import Interrupted
from granet.experiment.train import train

SETTINGS = {"dataset": "synthetic", "model": "lenet5", "epochs": 2, "batch_size": 300}
TINY = ["--dataset", "synthetic", "--model", "lenet5", "--batch-size", "300"]
STEPS_PER_EPOCH = 3  # 900 training examples / 300


def stopped_run(run_dir: Path, at: int = STEPS_PER_EPOCH + 1) -> Path:
    """A run stopped by SIGTERM after step ``at`` (mid-epoch 2), resumable."""
    with pytest.raises(Interrupted):
        train(make_config(SETTINGS), run_dir, progress=False, callbacks=[SignalAt(at)])
    return run_dir


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    train(make_config(SETTINGS), run_dir, progress=False)
    return run_dir


def test_overwrite_never_deletes_a_folder_granet_did_not_mark(tmp_path, capsys):
    project = tmp_path / "p"
    (project / "src").mkdir(parents=True)
    (project / "src" / "x.py").write_text("print('mine')")
    (project / "config.yaml").write_text("db: 1\n")
    code = main(["train", *TINY, "--epochs", "1", "--out", str(project), "--overwrite"])
    line = one_line_error(capsys.readouterr().err)
    assert code == 2 and "not a granet run folder (no run.json" in line
    assert (project / "src" / "x.py").read_text() == "print('mine')"
    assert sorted(p.name for p in project.iterdir()) == ["config.yaml", "src"]


def test_overwrite_starts_a_marked_run_again(finished, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    before = read_marker(run_dir)
    assert before["granet"] and before["settings_hash"]
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run_dir), "--overwrite"]) == 0
    after = read_marker(run_dir)
    assert after["run_id"] != before["run_id"]
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1]


def lock_holder(run_dir: Path) -> str | None:
    try:
        return (run_dir / LOCK_FILE).read_text().strip()
    except FileNotFoundError:  # no one holds it: the last holder removed it
        return None


def wait_for_lock(run_dir: Path, pid: int) -> None:
    deadline = time.monotonic() + 120
    while lock_holder(run_dir) != str(pid):
        assert time.monotonic() < deadline, "the resumed run never took its folder's lock"
        time.sleep(0.05)


def test_one_writer_per_run_folder(tmp_path):
    run_dir = stopped_run(tmp_path / "run")
    writer = granet_process("train", "--resume", str(run_dir))
    try:
        wait_for_lock(run_dir, writer.pid)
        os.kill(writer.pid, signal.SIGSTOP)  # the writer holds the lock, for as long as needed
        for argv in (
            ["train", "--resume", str(run_dir)],
            ["train", *TINY, "--out", str(run_dir), "--overwrite"],
        ):
            second = granet_process(*argv)
            _, err = second.communicate(timeout=120)
            assert second.returncode == 2
            line = one_line_error(err)
            assert f"run folder {run_dir} is in use by process {writer.pid}" in line
        assert (run_dir / MARKER_FILE).is_file() and checkpoint_path(run_dir).is_file()
    finally:
        os.kill(writer.pid, signal.SIGCONT)
    _, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2]  # each epoch once
    assert not list(run_dir.rglob("*.tmp"))


def test_resume_refuses_an_edited_config_listing_the_settings(tmp_path, capsys):
    run_dir = stopped_run(tmp_path / "run")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump({**config, "batch_size": 150, "method": "rigl"}, sort_keys=False)
    )
    assert main(["train", "--resume", str(run_dir)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "method: 'granet' -> 'rigl'" in line and "batch_size: 300 -> 150" in line
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1]  # nothing trained


def test_resume_refuses_a_config_edited_before_the_first_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with open_run(run_dir) as folder:  # a run killed (SIGKILL) right after its start-up
        folder.record_settings(make_config(SETTINGS).resolved(2 * STEPS_PER_EPOCH))
    text = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(text.replace("epochs: 2", "epochs: 3"))
    assert main(["train", "--resume", str(run_dir)]) == 2
    assert "config.yaml was edited after the run started" in capsys.readouterr().err


def test_a_finished_run_without_its_last_checkpoint_is_reported_not_retrained(
    finished, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    checkpoint_path(run_dir).unlink()
    report, metrics = (run_dir / "report.json").read_text(), read_metrics(run_dir)
    assert main(["train", "--resume", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert "already finished" in err and "last.pt is missing" in err
    assert out.strip() == (run_dir / "report.md").read_text().strip()
    assert (run_dir / "report.json").read_text() == report
    assert read_metrics(run_dir) == metrics


def test_an_unfinished_run_without_its_last_checkpoint_is_refused(tmp_path, capsys):
    run_dir = stopped_run(tmp_path / "run")
    checkpoint_path(run_dir).unlink()
    assert main(["train", "--resume", str(run_dir)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "has 1 finished epoch(s) in metrics.jsonl but no checkpoints/last.pt" in line


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "foreign contents"])
def test_a_damaged_checkpoint_is_named(tmp_path, capsys, damage):
    run_dir = stopped_run(tmp_path / "run")
    last = checkpoint_path(run_dir)
    raw = bytearray(last.read_bytes())
    if damage == "flip a byte":
        raw[len(raw) // 2] ^= 0x40
        last.write_bytes(bytes(raw))
    elif damage == "truncate":
        last.write_bytes(bytes(raw[: len(raw) // 3]))
    else:
        import torch

        torch.save({"format": 3, "model": {}}, last)
    assert main(["train", "--resume", str(run_dir)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert str(last) in line


def test_a_torn_last_metrics_line_is_dropped_and_the_run_resumes(tmp_path, capsys):
    run_dir = stopped_run(tmp_path / "run")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "train_loss": 1.0})[:15])  # killed mid-line
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert "dropped its last line" in capsys.readouterr().err
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2]


# ------------------------------------------------------------ nothing written through a link
def test_a_linked_run_lock_is_refused_and_its_target_untouched(tmp_path, capsys):
    outside = tmp_path / "notes.txt"
    outside.write_text("mine\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).symlink_to(outside)
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run_dir)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"{run_dir / LOCK_FILE}: a symbolic link, which granet does not write through" in line
    assert outside.read_text() == "mine\n"
    (run_dir / LOCK_FILE).unlink()
    os.link(outside, run_dir / LOCK_FILE)  # a hard link: the same file under two names
    assert main(["train", *TINY, "--epochs", "1", "--out", str(run_dir)]) == 2
    assert "not a plain file of its own" in one_line_error(capsys.readouterr().err)
    assert outside.read_text() == "mine\n"


def test_report_does_not_draw_through_a_linked_figure(finished, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    outside = tmp_path / "photo.png"
    outside.write_bytes(b"my photo")
    (run_dir / "training.png").unlink()
    (run_dir / "training.png").symlink_to(outside)
    assert main(["report", str(run_dir)]) == 2
    line = one_line_error(capsys.readouterr().err, "report")
    assert f"{run_dir / 'training.png'}: cannot write it: a symbolic link" in line
    assert outside.read_bytes() == b"my photo"


def test_resume_refuses_a_dangling_metrics_link(tmp_path, capsys):
    run_dir = stopped_run(tmp_path / "run")
    target = tmp_path / "elsewhere" / "metrics.jsonl"
    target.parent.mkdir()
    (run_dir / "metrics.jsonl").rename(tmp_path / "kept.jsonl")
    (run_dir / "metrics.jsonl").symlink_to(target)
    assert main(["train", "--resume", str(run_dir)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"{run_dir / 'metrics.jsonl'}: a symbolic link, which granet does not write" in line
    assert not target.exists()


# ---------------------------------------------------- one live writer, even across deletion
def test_a_run_whose_folder_is_deleted_and_made_again_stops(tmp_path, capsys):
    run_dir = tmp_path / "run"
    first = granet_process("train", *TINY, "--epochs", "50", "--out", str(run_dir))
    try:
        wait_for_lock(run_dir, first.pid)
        os.kill(first.pid, signal.SIGSTOP)
        shutil.rmtree(run_dir)  # deleted under the running first run
        assert main(["train", *TINY, "--epochs", "2", "--out", str(run_dir)]) == 0  # made again
    finally:
        os.kill(first.pid, signal.SIGCONT)
    report = (run_dir / "report.json").read_text()
    _, err = first.communicate(timeout=300)
    assert first.returncode == 1
    line = one_line_error(err)
    assert f"run folder {run_dir} was deleted or replaced while this process wrote it" in line
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2]  # the second run's, alone
    assert (run_dir / "report.json").read_text() == report
    assert checkpoint_path(run_dir).is_file() and not (run_dir / LOCK_FILE).exists()


def test_the_lock_file_goes_when_the_run_ends_and_a_stale_one_does_not_block(finished, tmp_path):
    assert not (finished / LOCK_FILE).exists()
    run_dir = stopped_run(tmp_path / "run")
    assert not (run_dir / LOCK_FILE).exists()
    (run_dir / LOCK_FILE).write_text("4194304\n")  # left by a killed process (kill -9)
    assert main(["train", "--resume", str(run_dir)]) == 0
    assert not (run_dir / LOCK_FILE).exists()


# ------------------------------------------------------------------- what --resume checks
@pytest.mark.parametrize("damage", ["deleted", "cut short"])
def test_resume_refuses_metrics_that_miss_the_checkpoints_epochs(tmp_path, capsys, damage):
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupted):  # in epoch 3 of 3: epochs 1 and 2 done
        config = make_config({**SETTINGS, "epochs": 3})
        train(config, run_dir, progress=False, callbacks=[SignalAt(2 * STEPS_PER_EPOCH + 1)])
    metrics = run_dir / "metrics.jsonl"
    if damage == "deleted":
        metrics.unlink()
    else:
        metrics.write_text(metrics.read_text().splitlines(keepends=True)[0])
    assert main(["train", "--resume", str(run_dir)]) == 2
    line = one_line_error(capsys.readouterr().err)
    held = "none" if damage == "deleted" else "1"
    assert f"{metrics} does not hold the epochs of checkpoints/last.pt (1 to 2; it has {held})" in (
        line
    )


def test_resume_of_a_finished_run_with_edited_settings_says_how_to_continue(
    finished, tmp_path, capsys
):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    text = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(text.replace("epochs: 2", "epochs: 5"))
    report = (run_dir / "report.json").read_text()
    assert main(["train", "--resume", str(run_dir)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"{run_dir} has already finished, with settings other than" in line
    assert "epochs: 2 -> 5" in line and "StartFrom.checkpoint" in line
    assert (run_dir / "report.json").read_text() == report
