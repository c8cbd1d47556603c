"""Run folders: checksummed checkpoints, atomic writes, the marker, the lock (with real
processes), the life-cycle of a new run, and reading metrics and reports."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import src_env

from granet.experiment import checkpoints, errors, files, records
from granet.experiment.checkpoints import load_checkpoint, save_checkpoint
from granet.experiment.files import LOCK_FILE, FolderLock, to_json, write_atomic
from granet.experiment.folder import MARKER_FILE, open_run, write_marker
from granet.experiment.records import read_metrics, read_report, truncate_metrics


def try_open(run_dir: Path, **kwargs) -> None:
    with open_run(run_dir, **kwargs):
        pass


PATTERN = 1.5  # a float32 whose bytes are easy to find in a file: 00 00 c0 3f


def checkpoint(path: Path) -> Path:
    save_checkpoint({"weights": torch.full((256,), PATTERN), "step": 7}, path)
    return path


def test_a_checkpoint_reads_back_checked(tmp_path):
    state = load_checkpoint(checkpoint(tmp_path / "c.pt"))
    assert state["format"] == checkpoints.CHECKPOINT_FORMAT and state["step"] == 7
    assert torch.equal(state["weights"], torch.full((256,), PATTERN))
    assert "sha256" not in state


def test_a_flipped_bit_in_a_tensor_is_caught_and_named(tmp_path):
    path = checkpoint(tmp_path / "c.pt")
    raw = bytearray(path.read_bytes())
    at = raw.find(torch.full((64,), PATTERN).numpy().tobytes())
    assert at >= 0
    raw[at + 100] ^= 0x01  # torch.load itself does not notice
    path.write_bytes(bytes(raw))
    assert torch.load(path, weights_only=True)["weights"][25] != PATTERN
    with pytest.raises(ValueError, match=f"checkpoint {path} is corrupt"):
        load_checkpoint(path)


def test_a_truncated_checkpoint_is_named(tmp_path):
    path = checkpoint(tmp_path / "c.pt")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=f"cannot read checkpoint {path}"):
        load_checkpoint(path)


def test_writes_go_through_a_temporary_of_their_own_that_never_stays(tmp_path, monkeypatch):
    names = []
    real_replace = os.replace

    def replace(src, dst):
        names.append(Path(src).name)
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    write_atomic(tmp_path / "a.txt", "one")
    write_atomic(tmp_path / "a.txt", "two")
    assert names[0] != names[1] and all(str(os.getpid()) in n for n in names)
    assert (tmp_path / "a.txt").read_text() == "two"

    def fails(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")  # a full disk, injected

    with pytest.raises(OSError, match=r"cannot write it: No space left on device") as info:
        write_atomic(tmp_path / "a.txt", fails)
    assert info.value.filename == str(tmp_path / "a.txt")  # named by the file meant
    assert (tmp_path / "a.txt").read_text() == "two"  # the old version stands
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_strict_json_writes_null_for_non_finite_numbers():
    text = to_json({"loss": math.nan, "x": [math.inf, 1.0]})
    assert json.loads(text) == {"loss": None, "x": [None, 1.0]}


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path):
    lines = [json.dumps({"epoch": e, "train_loss": 1.0}) for e in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:11])
    with pytest.warns(UserWarning, match="metrics.jsonl: dropped its last line"):
        assert [r["epoch"] for r in read_metrics(tmp_path)] == [1]
    with pytest.warns(UserWarning):
        truncate_metrics(tmp_path, 1)
    assert (tmp_path / "metrics.jsonl").read_text() == lines[0] + "\n"
    (tmp_path / "metrics.jsonl").write_text("{not json\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl, line 1"):
        read_metrics(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [("{", "is not valid JSON"), ('{"method": "gmp"}', "is not a granet report .no model")],
)
def test_a_malformed_report_is_named(tmp_path, content, message):
    (tmp_path / "report.json").write_text(content)
    with pytest.raises(ValueError, match=f"{tmp_path / 'report.json'} {message}"):
        read_report(tmp_path)


HOLD = """
import sys, time
from pathlib import Path
from granet.experiment.files import FolderLock
with FolderLock(Path(sys.argv[1]), "run folder"):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes it
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding ``tmp_path/run``'s lock until the test ends."""
    folder = tmp_path / "run"
    folder.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=src_env(),
    )
    assert proc.stdout.readline() == "locked\n"
    yield folder, proc
    proc.stdin.close()
    proc.wait(timeout=60)


def test_the_lock_refuses_a_second_process_and_names_the_holder(holder):
    folder, proc = holder
    with pytest.raises(FileExistsError, match=f"in use by process {proc.pid}"):
        FolderLock(folder, "run folder").acquire()
    with pytest.raises(FileExistsError, match=f"in use by process {proc.pid}"):
        try_open(folder)
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]  # nothing added, nothing gone
    proc.stdin.close()
    proc.wait(timeout=60)
    with FolderLock(folder, "run folder"):  # free again once the holder has gone
        assert (folder / LOCK_FILE).read_text() == f"{os.getpid()}\n"


def test_a_new_run_that_fails_before_its_first_checkpoint_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), open_run(tmp_path / "new") as folder:
        assert (folder.path / MARKER_FILE).is_file()
        raise KeyboardInterrupt  # Ctrl-C during start-up
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "empty"
    mine.mkdir()
    with pytest.raises(ValueError), open_run(mine):
        raise ValueError("no data")
    assert mine.is_dir() and not any(mine.iterdir())  # the user's folder stays, emptied
    # once a checkpoint exists the run is kept, to be resumed
    with pytest.raises(ValueError), open_run(tmp_path / "kept") as folder:
        checkpoint(folder.path / "checkpoints" / "last.pt")
        raise ValueError("later")
    assert (tmp_path / "kept" / MARKER_FILE).is_file()


def test_overwrite_empties_only_a_marked_folder(tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "x.py").write_text("keep me")
    (project / "config.yaml").write_text("db: 1\n")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError):
            try_open(project, overwrite=overwrite)
    assert sorted(p.name for p in project.rglob("*")) == ["config.yaml", "src", "x.py"]

    with open_run(tmp_path / "run") as folder:
        first = folder.marker["run_id"]
        (folder.path / "old.txt").write_text("from the first run")
        checkpoint(folder.path / "checkpoints" / "last.pt")
    with pytest.raises(FileExistsError, match="--resume"):
        try_open(tmp_path / "run")
    with open_run(tmp_path / "run", overwrite=True) as folder:
        assert folder.marker["run_id"] != first
        assert sorted(p.name for p in folder.path.iterdir()) == [MARKER_FILE, LOCK_FILE]


def test_resume_needs_a_marked_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run folder"):
        try_open(tmp_path / "x", resume=True)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a granet run folder"):
        try_open(tmp_path / "plain", resume=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="is a file, not a run folder"):
        try_open(tmp_path / "file")


@pytest.mark.parametrize("damage", ["removed", "key name bit-flipped"])
def test_a_checkpoint_of_this_format_without_its_checksum_is_refused(tmp_path, damage):
    path = checkpoint(tmp_path / "c.pt")
    if damage == "removed":
        state = torch.load(path, weights_only=True)
        del state["sha256"]
        torch.save(state, path)
    else:
        raw = path.read_bytes()
        assert raw.count(b"sha256") == 1
        path.write_bytes(raw.replace(b"sha256", b"sha257"))  # one bit: 6 is 0x36, 7 is 0x37
        assert "sha257" in torch.load(path, weights_only=True)
    with pytest.raises(ValueError, match=f"checkpoint {path} is corrupt: it has no SHA-256"):
        load_checkpoint(path)
    torch.save({"model": {}, "epoch": 1}, path)  # best.pt of a granet before formats
    assert load_checkpoint(path)["epoch"] == 1


def test_nothing_is_written_through_a_link(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("mine")
    folder = tmp_path / "run"
    folder.mkdir()
    for name, target in [("a.json", outside), ("dangling.jsonl", tmp_path / "nowhere")]:
        (folder / name).symlink_to(target)
        for write in (lambda p: write_atomic(p, "x"), lambda p: files.open_append(p).close()):
            with pytest.raises(OSError, match="a symbolic link, which granet does not write"):
                write(folder / name)
    assert outside.read_text() == "mine" and not (tmp_path / "nowhere").exists()
    # in a folder this process locked, no folder on the way is a link either
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (folder / "checkpoints").symlink_to(elsewhere, target_is_directory=True)
    with FolderLock(folder, "run folder"):
        with pytest.raises(OSError, match="a symbolic link") as info:
            checkpoint(folder / "checkpoints" / "last.pt")
        assert info.value.filename == str(folder / "checkpoints")
    assert not any(elsewhere.iterdir())
    # a resumed run refuses a link among its files before it writes anything
    write_marker(folder, None)
    with pytest.raises(OSError, match="a symbolic link, which granet does not write through"):
        try_open(folder, resume=True)


def test_the_lock_goes_at_release_and_a_stale_one_is_taken(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).write_text("4194304\n")  # a dead holder's: flock went with it
    with FolderLock(folder, "run folder") as lock:
        assert (folder / LOCK_FILE).read_text() == f"{os.getpid()}\n"
        lock.verify()
    assert not (folder / LOCK_FILE).exists()


def test_a_locked_folder_deleted_and_made_again_is_not_written(tmp_path):
    folder = tmp_path / "run"
    with open_run(folder) as run:  # a new run, no checkpoint yet
        write_atomic(folder / "a.txt", "one")
        shutil.rmtree(folder)
        folder.mkdir()  # another run's now (its lock is a file of its own)
        (folder / LOCK_FILE).write_text("1\n")
        (folder / "theirs.txt").write_text("theirs")
        for write in (
            lambda: write_atomic(folder / "a.txt", "two"),
            lambda: records.append_metrics(folder, {"epoch": 1}),
            lambda: checkpoint(folder / "checkpoints" / "last.pt"),
        ):
            with pytest.raises(errors.FolderLost, match=f"run folder {folder} was deleted"):
                write()
        assert run.marker
    # and the failed new run's clean-up leaves the folder there now alone
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE, "theirs.txt"]


@pytest.mark.parametrize(
    ("best", "val_accuracy", "at_target", "last", "chosen"),
    [
        (None, 0.5, True, False, True),  # the first epoch at the target
        ({"epoch": 1, "val_accuracy": 0.6}, 0.5, True, False, False),  # a worse one
        ({"epoch": 1, "val_accuracy": 0.6}, 0.6, True, False, False),  # a tie keeps the earlier
        ({"epoch": 1, "val_accuracy": 0.6}, 0.7, True, False, True),  # a better one
        (None, 0.9, False, False, False),  # denser than asked: not eligible, however good
        ({"epoch": 1, "val_accuracy": 0.6}, 0.7, False, True, True),  # the last epoch always is
        (None, None, True, False, False),  # no validation split: only the last epoch
        ({"epoch": 1, "val_accuracy": None}, None, False, True, True),
    ],
)
def test_the_best_epoch_is_the_best_validated_at_the_target(
    best, val_accuracy, at_target, last, chosen
):
    assert checkpoints.is_best(best, val_accuracy, at_target, last) is chosen


def test_best_is_written_and_loaded_back_into_a_model_and_its_sparsifier(tmp_path):
    import granet

    def sparse_mlp(seed: int):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
        )
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, granet.sparsify(model, optimizer, "static", sparsity=0.5, total_steps=10)

    model, sp = sparse_mlp(0)
    shape = {"num_classes": 4, "in_channels": 1, "image_size": 4}
    weights = checkpoints.weights_state(model, sp)
    checkpoints.save_best(tmp_path, weights, shape, {"epoch": 2, "val_accuracy": 0.5})
    other, other_sp = sparse_mlp(1)
    best = checkpoints.load_best(tmp_path, other, other_sp)
    assert (best["epoch"], best["val_accuracy"], best["data_shape"]) == (2, 0.5, shape)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert all(torch.equal(sp.masks[n], other_sp.masks[n]) for n in sp.masks)
    wrong = torch.nn.Sequential(torch.nn.Linear(16, 8))
    path = checkpoints.checkpoint_path(tmp_path, "best")
    with pytest.raises(ValueError, match=re.escape(f"{path} does not hold a state of this run")):
        checkpoints.load_best(tmp_path, wrong, None)
