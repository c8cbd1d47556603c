"""Every expected failure of every command ends in one line, ``granet <command>: error: ...``,
a non-zero exit status and no traceback; ``--debug`` or ``GRANET_DEBUG=1`` shows it."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import shutil
import subprocess

import pytest
import yaml
from helpers import one_line_error

from granet import cli
from granet.cli import main
from granet.experiment import runs, trainer
from granet.experiment.runs import checkpoint_path

TINY = ["--dataset", "synthetic", "--model", "lenet5", "--epochs", "1", "--batch-size", "300"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *TINY, "--out", str(run_dir)]) == 0
    return run_dir


def fails(capsys, argv, command="train", status=2) -> str:
    assert main(argv) == status
    return one_line_error(capsys.readouterr().err, command)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "inf"], "lr must be a finite number; got inf"),
        (["--lr", "nan"], "lr must be a finite number; got nan"),
        (["--weight-decay=-inf"], "weight_decay must be a finite number; got -inf"),
        (["--device", "meta"], "device must be auto, cpu, cuda, cuda:N or mps; got 'meta'"),
        (["--device", "cpu:5"], "device 'cpu:5': the CPU has no device 5"),
        (["--device", "cuda:7"], "device 'cuda:7' asked for, but"),
        (["--update-every", "100"], "the schedule never reaches sparsity=0.9"),
    ],
)
def test_bad_settings_are_refused_before_training(tmp_path, capsys, flags, message):
    line = fails(capsys, ["train", *TINY, "--out", str(tmp_path / "run"), *flags])
    assert message in line
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert "is a file, not a run folder" in fails(
        capsys, ["train", *TINY, "--out", str(tmp_path / "file")]
    )


def test_an_unwritable_run_folder_names_the_file(tmp_path, capsys, monkeypatch):
    # Injected, so that it runs wherever the tests do (see test_a_read_only_folder).
    def refuse(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(src))

    monkeypatch.setattr(runs.os, "replace", refuse)
    line = fails(capsys, ["train", *TINY, "--out", str(tmp_path / "run")])
    assert f"{tmp_path / 'run' / 'run.json'}: cannot write it: Permission denied" in line
    assert not (tmp_path / "run").exists()  # a new run that failed leaves nothing


@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB file system of the test's own (a tmpfs; where mounting is allowed: root)."""
    point = tmp_path / "small"
    point.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(point)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a file system here; the injected-error tests stand in")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=True)


def test_a_full_file_system(small_fs, finished, capsys):
    # the first checkpoint (LeNet-5's weights and momentum: about 500 KB) does not fit
    line = fails(capsys, ["train", *TINY, "--out", str(small_fs / "run")])
    assert "checkpoints/best.pt: cannot write it: No space left on device" in line
    assert list(small_fs.iterdir()) == []  # the failed new run and its temporaries are gone
    # with the disk full in the middle of the file, torch.save fails with a RuntimeError of its
    # own (inline_container.cc), which must read the same
    (small_fs / "filler").write_bytes(b"x" * (128 << 10))
    line = fails(capsys, ["train", *TINY, "--out", str(small_fs / "run")])
    assert "checkpoints/best.pt: cannot write it: No space left on device" in line
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]
    (small_fs / "filler").write_bytes(b"x" * (250 << 10))
    line = fails(capsys, ["export", str(finished), "--out", str(small_fs / "m.gnt")], "export")
    assert f"{small_fs / 'm.gnt'}: cannot write it: No space left on device" in line


def test_a_read_only_folder(tmp_path, capsys):
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() == 0:  # permissions do not stop root: a read-only file system does
        mount = ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)]
        if subprocess.run(mount, capture_output=True).returncode != 0:
            pytest.skip("root, and cannot mount a file system; the injected-error test stands in")
    else:
        folder.chmod(0o555)
    try:
        line = fails(capsys, ["train", *TINY, "--out", str(folder / "run")])
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(folder)], check=True)
        folder.chmod(0o755)
    assert str(folder / "run") in line
    assert "Read-only file system" in line or "Permission denied" in line


def test_a_full_disk_while_saving_a_checkpoint(tmp_path, capsys, monkeypatch):
    # Injected below torch.save, as a full disk fails: the file's writes raise ENOSPC once some
    # bytes are in, which torch.save itself turns into a RuntimeError of its own.
    opened: dict[int, str] = {}
    real_open_own = runs._open_own

    def open_own(path, *args):
        fd = real_open_own(path, *args)
        opened[fd] = str(path)
        return fd

    class FullDisk(io.FileIO):
        room = 4096

        def write(self, data):
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(data)
            return super().write(data)

    saves = []

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, int) and "last.pt" in opened.get(file, "") and "w" in mode:
            saves.append(file)
            if len(saves) == 2:  # the disk is full by epoch 2's checkpoint
                return io.BufferedWriter(FullDisk(file, "wb"))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(runs, "_open_own", open_own)
    monkeypatch.setattr(runs, "open", fake_open, raising=False)
    run_dir = tmp_path / "run"
    line = fails(capsys, ["train", *TINY, "--epochs", "2", "--out", str(run_dir)])
    assert f"{run_dir / 'checkpoints' / 'last.pt'}: cannot write it: No space left on device" in (
        line
    )
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.undo()
    assert runs.load_checkpoint(checkpoint_path(run_dir))["position"]["epoch"] == 1  # it stands


def test_a_non_finite_loss_stops_the_run(tmp_path, capsys):
    line = fails(capsys, ["train", *TINY, "--lr", "1e20", "--out", str(tmp_path / "run")], status=1)
    assert "the training loss became non-finite" in line and "Lower lr (now 1e+20)" in line
    assert not (tmp_path / "run" / "report.json").exists()


def test_ctrl_c_during_start_up_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "load_dataset", interrupted)
    assert main(["train", *TINY, "--out", str(tmp_path / "run")]) == 130
    assert "granet train: interrupted" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_malformed_files(finished, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "report.json").write_text('{"method": ')
    line = fails(capsys, ["report", str(run_dir)], "report")
    assert f"{run_dir / 'report.json'} is not valid JSON" in line
    (run_dir / "report.json").unlink()
    (run_dir / "config.yaml").write_text("epochs: [1\n")
    line = fails(capsys, ["train", "--resume", str(run_dir)])
    assert f"{run_dir / 'config.yaml'} is not valid YAML" in line
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"epochs": "many"}))
    assert "epochs must be an integer" in fails(capsys, ["train", "--resume", str(run_dir)])


def test_export_and_bench_inference_input(finished, tmp_path, capsys):
    line = fails(capsys, ["export", str(finished), "--out", str(tmp_path)], "export")
    assert f"--out {tmp_path} is a folder" in line
    line = fails(
        capsys, ["bench-inference", str(finished), "--batch-sizes", "-1"], "bench-inference"
    )
    assert "--batch-sizes must be >= 1; got -1" in line
    broken = tmp_path / "broken"
    shutil.copytree(finished, broken)
    checkpoint_path(broken, "best").write_bytes(b"not a checkpoint")
    line = fails(capsys, ["export", str(broken), "--out", str(tmp_path / "m")], "export")
    assert f"cannot read checkpoint {checkpoint_path(broken, 'best')}" in line


def test_report_json_is_always_valid_json(finished):
    report = json.loads((finished / "report.json").read_text())
    report["test_loss"] = math.inf
    (finished.parent / "copy").mkdir(exist_ok=True)
    runs.write_atomic(finished.parent / "copy" / "report.json", runs.to_json(report))
    text = (finished.parent / "copy" / "report.json").read_text()
    assert "Infinity" not in text and json.loads(text)["test_loss"] is None


def test_an_unexpected_error_is_one_line_and_debug_shows_it(capsys, monkeypatch):
    def broken(args):
        raise TypeError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "report", broken)
    line = fails(capsys, ["report", "somewhere"], "report", status=1)
    assert "TypeError: a bug" in line and "--debug" in line
    with pytest.raises(TypeError, match="a bug"):
        main(["report", "somewhere", "--debug"])
    monkeypatch.setenv("GRANET_DEBUG", "1")
    with pytest.raises(TypeError, match="a bug"):
        main(["report", "somewhere"])
