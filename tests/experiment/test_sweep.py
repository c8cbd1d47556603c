"""Sweeps: duplicate grid points and unreachable schedules refused before anything trains, one
sweep per folder, failed runs reported in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import one_line_error, src_env

from granet.cli import main
from granet.experiment.config import save_config
from granet.experiment.files import FolderLock
from granet.experiment.sweep import SWEEP_LOCK, _state, load_sweep, run_sweep

TINY = {"dataset": "synthetic", "model": "lenet5", "epochs": 1, "batch_size": 300}


def sweep_file(tmp_path: Path, **spec) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"config": TINY, "out": str(tmp_path / "grid"), **spec}))
    return path


@pytest.mark.parametrize(
    ("spec", "twice"),
    [
        ({"methods": ["set"], "sparsities": [0.8], "seeds": [0, 0]}, "set-s0.8-seed0"),
        ({"methods": ["set"], "sparsities": [0.8, 0.80], "seeds": [1]}, "set-s0.8-seed1"),
        ({"methods": ["dense", "dense"], "seeds": [2]}, "dense-seed2"),
    ],
)
def test_a_grid_point_given_twice_is_refused(tmp_path, spec, twice):
    with pytest.raises(ValueError, match=f"given more than once: {twice}"):
        load_sweep(sweep_file(tmp_path, **spec))


def test_an_unreachable_schedule_is_refused_before_any_run_trains(tmp_path, capsys):
    # 1 epoch of 3 steps: update_every 4 leaves GraNet no round at all; RigL has no gradual phase
    path = sweep_file(
        tmp_path, config={**TINY, "update_every": 4}, methods=["rigl", "granet"], sparsities=[0.9]
    )
    assert main(["sweep", str(path)]) == 2
    line = one_line_error(capsys.readouterr().err, "sweep")
    assert "sweep run granet-s0.9-seed0: the schedule never reaches sparsity=0.9" in line
    assert not [p for p in (tmp_path / "grid").iterdir() if p.is_dir()]  # nothing trained


def test_one_sweep_at_a_time_per_folder(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, methods=["dense"]))
    sweep.out.mkdir()
    in_use = pytest.raises(FileExistsError, match=f"sweep folder {sweep.out} is in use")
    with FolderLock(sweep.out, "sweep folder", SWEEP_LOCK), in_use:  # another sweep holds it
        run_sweep(sweep)


def test_failed_runs_end_the_sweep_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", src_env()["PYTHONPATH"])
    path = sweep_file(tmp_path, methods=["dense"], seeds=[0, 1], workers=2)
    blocked = tmp_path / "grid" / "dense-seed1"  # a folder granet did not make: refused
    blocked.mkdir(parents=True)
    (blocked / "notes.txt").write_text("mine")
    assert main(["sweep", str(path)]) == 1
    line = one_line_error(capsys.readouterr().err, "sweep")
    assert "some runs failed: dense-seed1 (exit 2, see" in line
    assert (blocked / "notes.txt").read_text() == "mine"
    assert "already exists" in (tmp_path / "grid" / "dense-seed1.log").read_text()
    assert (tmp_path / "grid" / "dense-seed0" / "report.json").is_file()


def test_a_started_run_names_its_log_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", src_env()["PYTHONPATH"])
    path = sweep_file(tmp_path, methods=["dense"], seeds=[0], workers=2)
    blocked = tmp_path / "grid" / "dense-seed0"  # refused at once: nothing trains
    blocked.mkdir(parents=True)
    (blocked / "notes.txt").write_text("mine")
    assert main(["sweep", str(path)]) == 1
    log = tmp_path / "grid" / "dense-seed0.log"
    assert f"[sweep] started dense-seed0 (log: {log})" in capsys.readouterr().err


def test_runs_of_an_older_granet_without_a_marker(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, methods=["dense"], seeds=[0, 1]))
    finished, unfinished = sweep.jobs
    for job in sweep.jobs:
        job.run_dir.mkdir(parents=True)
        save_config(job.config, job.run_dir / "config.yaml")
    (finished.run_dir / "report.json").write_text("{}")
    assert _state(finished, overwrite=False) == "done"  # its numbers are kept
    with pytest.raises(ValueError, match="unfinished run of an older granet .no run.json."):
        _state(unfinished, overwrite=False)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"config": [1, 2], "methods": ["dense"]},
            "config must be a mapping of settings; got [1, 2]",
        ),
        ({"out": 5, "methods": ["dense"]}, "out must be a folder's path; got 5"),
        ({"out": "", "methods": ["dense"]}, "out must be a folder's path; got ''"),
        ({"base": 3, "methods": ["dense"]}, "base must be a config file's path; got 3"),
        ({"methods": []}, "methods is empty; the grid would have no run"),
        ({"methods": ["set"], "sparsities": []}, "sparsities is empty; the grid would have no run"),
        ({"methods": ["dense"], "seeds": []}, "seeds is empty; the grid would have no run"),
    ],
)
def test_a_malformed_sweep_file_is_one_line_naming_it(tmp_path, capsys, spec, message):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"config": TINY, "out": str(tmp_path / "grid"), **spec}))
    assert main(["sweep", str(path)]) == 2
    assert f"sweep file {path}: {message}" in one_line_error(capsys.readouterr().err, "sweep")
    assert not (tmp_path / "grid").exists()


def test_a_non_utf8_sweep_file_is_named(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(b"methods: [dense]  # \xff\n")
    assert main(["sweep", str(path)]) == 2
    line = one_line_error(capsys.readouterr().err, "sweep")
    assert f"sweep file {path} is not UTF-8 text (byte 0xff at offset 20)" in line


def test_a_sweep_refuses_a_run_folder_as_its_out(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *_flags(TINY), "--method", "dense", "--out", str(run)]) == 0
    before = sorted(p.name for p in run.iterdir())
    capsys.readouterr()
    path = sweep_file(tmp_path, methods=["dense"], out=str(run))
    assert main(["sweep", str(path)]) == 2
    line = one_line_error(capsys.readouterr().err, "sweep")
    assert f"{run} is a granet run folder, not a sweep's out folder" in line
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written into it


def _flags(settings: dict) -> list[str]:
    return [f for k, v in settings.items() for f in ("--" + k.replace("_", "-"), str(v))]


@pytest.mark.parametrize("stored", ["dense", None])  # None: a granet without the setting
def test_runs_made_with_another_compute_still_belong_to_the_sweep(tmp_path, stored):
    """compute says how a step is computed, not what: a run made when the default was dense
    is kept (and resumed with its own value), not refused as trained with other settings."""
    sweep = load_sweep(sweep_file(tmp_path, methods=["set"], sparsities=[0.8]))
    (job,) = sweep.jobs
    assert job.config.compute == "auto"
    job.run_dir.mkdir(parents=True)
    config = {**job.config.to_dict(), "compute": stored}
    if stored is None:
        del config["compute"]
    (job.run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (job.run_dir / "report.json").write_text("{}")
    assert _state(job, overwrite=False) == "done"
    (job.run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "seed": 5}))
    with pytest.raises(ValueError, match="trained with other settings .seed."):
        _state(job, overwrite=False)
