"""The benchmark suite runs end to end with --quick (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_suite_writes_its_results(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)]
    subprocess.run([*cmd, "overhead", "update", "memory"], env=env, check=True, timeout=600)
    overhead = json.loads((tmp_path / "overhead.json").read_text())
    assert set(overhead["median_step_ms"]) == {"dense", "floor", "granet"}
    assert overhead["granet_vs_dense"] > 0 and overhead["update_round_ms"] > 0
    update = json.loads((tmp_path / "update.json").read_text())
    assert [r["weights"] for r in update["results"]] == [2**20, 2**21]
    assert (tmp_path / "update_cost.png").stat().st_size > 0
    memory = json.loads((tmp_path / "memory.json").read_text())
    # bool mask + (CPU only) a float32 multiplier per weight; the ever-active bits in host memory
    assert memory["mask_bytes_per_weight"] == 1 + 4
    assert memory["host_bytes_per_weight"] == 1 / 8
    assert memory["sparsifier_state_bytes"] < memory["model_state_bytes"] / 8


def test_unknown_benchmark_is_refused():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "nonsense"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "unknown benchmarks ['nonsense']" in result.stderr
