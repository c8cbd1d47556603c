"""``granet sweep`` with several worker processes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from granet.cli import main


def test_a_sweep_runs_in_two_processes(tmp_path, monkeypatch, capsys):
    src = str(Path(__file__).parents[1] / "src")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    )
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
