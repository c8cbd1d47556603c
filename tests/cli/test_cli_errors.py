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
from granet.experiment import blocks, checkpoints, files
from granet.experiment.checkpoints import checkpoint_path

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
        # the optimizer steps float32 weights: a scalar a float32 cannot hold fails its step
        (["--lr", "1e39"], "lr must be at most 3.403e+38 (a float32 must hold it); got 1e+39"),
        (["--weight-decay", "1e308"], "weight_decay must be at most 3.403e+38"),
        (["--optimizer", "adamw", "--lr", "1e38"], "lr must be at most 3.403e+37 with adamw"),
        (
            ["--optimizer", "adamw", "--lr", "1", "--weight-decay", "1e39"],
            "weight_decay must be at most 3.403e+38",
        ),
        (
            ["--optimizer", "adamw", "--lr", "1e3", "--weight-decay", "1e36"],
            "lr x weight_decay must be at most 3.403e+38 with adamw",
        ),
        (["--seed", "-1"], "seed must be in [0, 4294967295] (NumPy's seed range); got -1"),
        (
            ["--seed", str(2**64)],
            f"seed must be in [0, 4294967295] (NumPy's seed range); got {2**64}",
        ),
        (["--workers", "100000"], "workers must be in [0, "),
        (["--lr-milestones", "0.5", "0.5"], "lr_milestones must be increasing fractions"),
        # one step: the gradual phase cannot fit, and the line says why
        (["--batch-size", "100000"], "the run has only 1 optimizer step(s): prune_start (0.0)"),
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

    monkeypatch.setattr(files.os, "replace", refuse)
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
    real_open_own = files._open_own

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

    monkeypatch.setattr(files, "_open_own", open_own)
    monkeypatch.setattr(files, "open", fake_open, raising=False)
    run_dir = tmp_path / "run"
    line = fails(capsys, ["train", *TINY, "--epochs", "2", "--out", str(run_dir)])
    assert f"{run_dir / 'checkpoints' / 'last.pt'}: cannot write it: No space left on device" in (
        line
    )
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.undo()
    # it stands
    assert checkpoints.load_checkpoint(checkpoint_path(run_dir))["position"]["epoch"] == 1


def test_a_non_finite_loss_stops_the_run(tmp_path, capsys):
    line = fails(capsys, ["train", *TINY, "--lr", "1e20", "--out", str(tmp_path / "run")], status=1)
    assert "the training loss became non-finite" in line and "Lower lr (now 1e+20)" in line
    assert not (tmp_path / "run" / "report.json").exists()


def test_ctrl_c_during_start_up_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(blocks, "load_dataset", interrupted)
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


@pytest.mark.parametrize("part", ["position", "sparsifier"])
def test_a_checkpoint_with_a_negative_step_is_refused_naming_it(finished, tmp_path, capsys, part):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "report.json").unlink()  # not finished: --resume loads the checkpoint
    last = checkpoint_path(run_dir, "last")
    state = checkpoints.load_checkpoint(last)
    state[part]["step"] = -3
    checkpoints.save_checkpoint(state, last)
    line = fails(capsys, ["train", "--resume", str(run_dir)])
    assert f"{last} does not hold a state of this run" in line
    assert "is negative" in line or "step must be an integer >= 0; got -3" in line


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["sums"].update(density=s["sums"]["density"][:1]), "running sums"),
        (lambda s: s["sums"].pop("seen"), "running sums"),
        (lambda s: s.update(sums=[1, 2]), "running sums"),
        (lambda s: s.update(best={"epoch": "x"}), "best-checkpoint record"),
        (lambda s: s.update(best={"epoch": 0, "val_accuracy": 0.5}), "best-checkpoint record"),
    ],
)
def test_a_checkpoint_with_malformed_sums_or_best_is_refused_naming_it(
    finished, tmp_path, capsys, change, message
):
    # a RuntimeError (a sum of another shape) or KeyError at the epoch's end: exit 1
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "report.json").unlink()  # not finished: --resume loads the checkpoint
    last = checkpoint_path(run_dir, "last")
    state = checkpoints.load_checkpoint(last)
    change(state)
    checkpoints.save_checkpoint(state, last)
    line = fails(capsys, ["train", "--resume", str(run_dir)])
    assert f"{last} does not hold a state of this run" in line and message in line


def edit_json(path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(test_accuracy="high"), "test_accuracy is 'high', not a number"),
        (lambda r: r.update(sparsity=[1]), "sparsity is [1], not a number"),
        (lambda r: r.update(seed="s"), "seed is 's', not an integer"),
        (lambda r: r.update(method=5), "method is 5, not a string"),
        (lambda r: r.update(flops="x"), "flops is 'x', not an object"),
        (lambda r: r.update(flops={"x": 1}), "no flops.inference_per_sample.ratio"),
        (lambda r: r.update(itop_rate="x"), "itop_rate is 'x', not a number or null"),
        (lambda r: r.update(environment=3), "TypeError"),
    ],
)
def test_a_report_json_of_wrong_types_is_refused_naming_it(
    finished, tmp_path, capsys, change, message
):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    edit_json(run_dir / "report.json", change)
    expected = f"{run_dir / 'report.json'} is not a granet report ("
    for argv in (
        ["report", str(run_dir)],
        ["report", str(run_dir), str(finished), "--out", str(tmp_path)],
    ):
        line = fails(capsys, argv, "report")
        assert expected in line and message in line


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(train_loss="x"), "train_loss is 'x', not a number"),
        (lambda r: r.update(epoch="1"), "epoch is '1', not an integer"),
        (lambda r: r.update(lr=None), "lr is None, not a number"),
        (lambda r: r.update(best=1), "best is 1, not true or false"),
        (lambda r: r.pop("epoch"), "no epoch"),
    ],
)
def test_a_wrong_typed_last_metrics_line_is_refused_naming_it(
    finished, tmp_path, capsys, change, message
):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    edit_json(run_dir / "metrics.jsonl", change)  # one epoch: its one line is the last
    line = fails(capsys, ["report", str(run_dir)], "report")
    assert f"{run_dir / 'metrics.jsonl'}, line 1: not an epoch record ({message})" in line


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


def test_export_names_what_is_wrong_with_its_input(finished, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "empty", tmp_path / "absent"):
        line = fails(capsys, ["export", str(folder), "--out", str(out)], "export")
        assert f"{folder} is not a granet run folder" in line and "cannot write" not in line
    early = tmp_path / "early"
    shutil.copytree(finished, early)
    checkpoint_path(early, "best").unlink()
    line = fails(capsys, ["export", str(early), "--out", str(out)], "export")
    assert f"{early} has no best model yet: {checkpoint_path(early, 'best')} is written" in line
    assert not out.exists()
    out = tmp_path / "absent" / "m.safetensors"
    line = fails(capsys, ["export", str(finished), "--out", str(out)], "export")
    assert f"{out}: cannot write it: No such file or directory" in line


def test_report_json_is_always_valid_json(finished):
    report = json.loads((finished / "report.json").read_text())
    report["test_loss"] = math.inf
    (finished.parent / "copy").mkdir(exist_ok=True)
    files.write_atomic(finished.parent / "copy" / "report.json", files.to_json(report))
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


def test_the_largest_float32_lr_still_trains(tmp_path, capsys):
    # the bound is the optimizer's own: just below it the first step runs (and the loss,
    # no longer finite, stops the run as any diverging run stops)
    argv = ["train", *TINY, "--out", str(tmp_path / "run"), "--lr", "3e38"]
    assert "the training loss became non-finite" in fails(capsys, argv, status=1)


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"WORLD_SIZE": "abc"}, "the environment variable WORLD_SIZE must be an integer >= 1"),
        ({"WORLD_SIZE": "0"}, "the environment variable WORLD_SIZE must be an integer >= 1"),
        ({"RANK": "x"}, "the environment variable RANK must be an integer >= 0"),
        ({"LOCAL_RANK": "-2"}, "the environment variable LOCAL_RANK must be an integer >= 0"),
    ],
)
def test_a_bad_launch_environment_is_one_line(finished, capsys, monkeypatch, env, line):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert line in fails(capsys, ["report", str(finished)], "report")


def test_bench_inference_with_a_batch_that_cannot_fit(finished, capsys):
    line = fails(
        capsys,
        ["bench-inference", str(finished), "--batch-sizes", "1", str(10**11)],
        "bench-inference",
    )
    assert f"--batch-sizes {10**11}: a batch that large does not fit in memory" in line


@pytest.mark.parametrize("command", ["train", "plasticity"])
def test_a_non_utf8_config_file_is_named(tmp_path, capsys, command):
    config = tmp_path / "config.yaml"
    config.write_bytes(b"epochs: 1\n# caf\xe9\n")
    line = fails(capsys, [command, "--config", str(config), "--out", str(tmp_path / "o")], command)
    assert f"config file {config} is not UTF-8 text (byte 0xe9 at offset 15)" in line


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--resume", ""],  # an unset variable: it trained a new default run
        ["train", "--out", ""],
        ["train", "--config", ""],
        ["plasticity", "--out", ""],
        ["plasticity", "--config", ""],
        ["report", "run", "--out", ""],
        ["export", "run", "--out", ""],
    ],
)
def test_an_empty_path_is_refused_not_taken_for_no_flag(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    flag = argv[argv.index("") - 1]
    assert f"argument {flag}: an empty path" in capsys.readouterr().err.splitlines()[-1]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("argv", "usage", "hint"),
    [
        # a prefix of a flag is not that flag: --epoch -1 was --epochs -1
        (["train", "--epoch", "-1"], "usage: granet train", "--epoch: did you mean --epochs?"),
        (["train", "--sparsty=0.5"], "usage: granet train", "--sparsty: did you mean --sparsity?"),
        (["sweep", "s.yaml", "--worker", "2"], "usage: granet sweep", "did you mean --workers?"),
        (["plasticity", "--rate", "0.5"], "usage: granet plasticity", "did you mean --rates?"),
        (
            ["bench-inference", "run", "--batch-size", "3"],
            "usage: granet bench-inference",
            "--batch-size: did you mean --batch-sizes?",
        ),
    ],
)
def test_an_unknown_flag_gets_its_commands_usage_and_the_closest_flag(capsys, argv, usage, hint):
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and "usage: granet [-h]" not in err
    assert hint in err.splitlines()[-1]


def test_the_start_line_counts_in_words(tmp_path, capsys):
    assert main(["train", *TINY, "--sparsity", "0.8", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "(sparsity 0.8) lenet5 on cpu" in err and "): 1 epoch x 3 steps, into" in err
