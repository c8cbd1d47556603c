"""benchmarks/inference.py --quick runs and prints its table (no timing is checked)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from helpers import src_env

ROOT = Path(__file__).resolve().parents[2]


def test_quick_benchmark_prints_a_table():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "inference.py"), "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        env=src_env(),
        timeout=300,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith("torch ") and "1 threads" in lines[0]
    assert lines[1].startswith("| model | sparsity | batch | dense ms")
    rows = [line.split(" | ") for line in lines[3:]]
    assert [(r[0], r[2]) for r in rows] == [
        ("| mlp", "1"),
        ("| mlp", "8"),
        ("| lenet5", "1"),
        ("| lenet5", "8"),
    ]
    assert all(r[1] == "98%" and r[-1].endswith("% |") for r in rows)
