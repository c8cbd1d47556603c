"""``granet sweep`` with several worker processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import granet_process, src_env

from granet.cli import main


def test_a_sweep_runs_in_two_processes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PYTHONPATH", src_env()["PYTHONPATH"])
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "config": {"dataset": "synthetic", "model": "lenet5", "epochs": 1},
                "methods": ["set"],
                "sparsities": [0.8],
                "seeds": [0, 1],
                "out": str(tmp_path / "grid"),
                "workers": 2,
            }
        )
    )
    assert main(["sweep", str(sweep)]) == 0
    grid = tmp_path / "grid"
    for seed in (0, 1):
        report = json.loads((grid / f"set-s0.8-seed{seed}" / "report.json").read_text())
        assert (report["method"], report["seed"]) == ("set", seed)
        assert "test accuracy" in (grid / f"set-s0.8-seed{seed}.log").read_text()
    assert "| set | " in (grid / "comparison.md").read_text()
    assert "| set | " in capsys.readouterr().out


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_for(condition, what: str, tries: int = 600) -> None:
    """Poll ``condition`` every 0.2 s, at most ``tries`` times (a bound, not a timing)."""
    for _ in range(tries):
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"gave up waiting for {what}")


def _holders(grid: Path, names: list[str]) -> list[int]:
    """The process ids in the run folders' locks (0 where none yet)."""
    pids = []
    for name in names:
        lock = grid / name / "run.lock"
        found = re.search(r"\d+", lock.read_text()) if lock.is_file() else None
        pids.append(int(found.group()) if found else 0)
    return pids


def _training(grid: Path, names: list[str]) -> bool:
    metrics = [grid / name / "metrics.jsonl" for name in names]
    return all(m.is_file() and m.stat().st_size > 0 for m in metrics)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_the_training_processes_stop_when_the_sweep_is_killed(tmp_path):
    grid = tmp_path / "grid"
    sweep = tmp_path / "sweep.yaml"
    config = {"dataset": "synthetic", "model": "lenet5", "train_size": 200, "batch_size": 100}
    sweep.write_text(
        yaml.safe_dump(
            {
                "config": {**config, "epochs": 200},  # far longer than this test waits
                "methods": ["dense"],
                "seeds": [0, 1],
                "out": str(grid),
                "workers": 2,
            }
        )
    )
    names = ["dense-seed0", "dense-seed1"]
    parent = granet_process(
        "sweep", str(sweep), env=src_env(), stdout=None, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for(lambda: _training(grid, names), "both runs to train")
        children = _holders(grid, names)
        assert all(children) and parent.pid not in children
        parent.kill()  # SIGKILL: the parent can pass nothing on
        parent.wait()
        _wait_for(lambda: not any(map(_alive, children)), "the training processes to stop")
    finally:
        parent.kill()
        parent.wait()
        for pid in _holders(grid, names):
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)
    # they stopped as on SIGTERM: saved a checkpoint a rerun resumes from
    logs = [(grid / f"{name}.log").read_text() for name in names]
    assert all("SIGTERM" in log for log in logs), "\n=====\n".join(logs)
    # a rerun, at once, resumes both runs (before, it found them held by the orphans)
    rerun = granet_process("sweep", str(sweep), env=src_env(), stdout=None)
    try:
        _wait_for(
            lambda: all(p and p not in children and _alive(p) for p in _holders(grid, names)),
            "the rerun to resume both runs",
        )
        rerun.send_signal(signal.SIGTERM)  # and it stops as a sweep stops
        _, err = rerun.communicate(timeout=120)
    finally:
        rerun.kill()
        rerun.wait()
    assert rerun.returncode == 128 + signal.SIGTERM, err
    assert "error" not in err and err.count("[sweep] started") == 2, err
