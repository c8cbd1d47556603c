"""The benchmark suite runs end to end with --quick (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import src_env

ROOT = Path(__file__).resolve().parents[1]


def test_quick_suite_writes_its_results(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)]
    subprocess.run(
        [*cmd, "overhead", "epochs", "update", "memory", "compute", "compute-layers"]
        + ["compute-conv", "compute-run"],
        env=src_env(OMP_NUM_THREADS="1"),
        check=True,
        timeout=600,
    )
    overhead = json.loads((tmp_path / "overhead.json").read_text())
    assert set(overhead["median_step_ms"]) == {"dense", "floor", "granet"}
    assert overhead["granet_vs_dense"] > 0 and overhead["update_round_ms"] > 0
    epochs = json.loads((tmp_path / "epochs.json").read_text())
    assert epochs["rounds"] == 2 and epochs["final_sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert epochs["seconds"]["granet"] > 0 and epochs["seconds"]["dense"] > 0
    update = json.loads((tmp_path / "update.json").read_text())
    assert [r["weights"] for r in update["results"]] == [2**20, 2**21]
    assert (tmp_path / "update_cost.png").stat().st_size > 0
    memory = json.loads((tmp_path / "memory.json").read_text())
    # bool mask + (CPU only) a float32 multiplier per weight; the ever-active bits in host memory
    assert memory["mask_bytes_per_weight"] == 1 + 4
    assert memory["host_bytes_per_weight"] == 1 / 8
    assert memory["sparsifier_state_bytes"] < memory["model_state_bytes"] / 8
    compute = json.loads((tmp_path / "compute.json").read_text())
    mlp, lenet5 = compute["results"]
    assert mlp["sparse_layers"] == ["fc1.weight", "fc2.weight", "fc3.weight", "fc4.weight"]
    assert lenet5["sparse_layers"] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert mlp["speedup"] > 0 and "aten::" in mlp["profile"]
    (layer,) = json.loads((tmp_path / "compute-layers.json").read_text())["results"]
    assert layer["shape"] == [64, 48] and layer["speedup"] > 0
    conv = json.loads((tmp_path / "compute-conv.json").read_text())["results"]
    assert [c["layer"] for c in conv] == [
        "lenet5.conv1",
        "lenet5.conv2",
        "small-cnn.conv1",
        "small-cnn.conv2",
    ]
    runs = json.loads((tmp_path / "compute-run.json").read_text())["runs"]
    assert [r["compute"] for r in runs] == ["dense", "auto"]
    assert all(0 <= r["test_accuracy"] <= 1 and r["peak_rss_mib"] > 0 for r in runs)


def test_unknown_benchmark_is_refused():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "nonsense"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "unknown benchmarks ['nonsense']" in result.stderr


def test_reference_table_puts_our_seeds_beside_the_reference():
    sys.path.insert(0, str(ROOT / "benchmarks" / "accuracy"))
    try:
        from reference import table
    finally:
        sys.path.pop(0)

    def row(method, sparsity, accs):
        mean = sum(accs) / len(accs)
        std = (sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) ** 0.5 if accs[1:] else None
        return {
            "method": method,
            "sparsity": sparsity,
            "runs": len(accs),
            "seeds": " ".join(str(i + 1) for i in range(len(accs))),
            "test_accuracy_mean": mean,
            "test_accuracy_std": std,
            "test_accuracy_min": min(accs),
            "test_accuracy_max": max(accs),
        }

    text = table(
        [
            row("dense", 0.0, [0.9020, 0.9030, 0.9025]),
            row("granet (s_i=0.5)", 0.9, [0.8950, 0.8960, 0.8955]),
            row("rigl", 0.98, [0.8700]),
        ]
    )
    lines = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in text.splitlines()}
    # dense: one row of ours for every sparsity; 0.02 below the reference, within one std
    assert lines[("dense", "98%")].endswith(
        "| 90.25 ± 0.05 | 90.20–90.30 | 1 2 3 | 90.27 | -0.02 |"
    )
    assert lines[("granet (s_i=0.5)", "90%")].endswith("| 89.79 | -0.24 **> std** |")
    assert lines[("rigl", "98%")].endswith("| 87.00 | 87.00–87.00 | 1 | 87.43 | -0.43 |")
    assert "not run" in lines[("gmp", "90%")]


def test_gmp_schedule_experiment_starts_dense_and_prunes_from_half():
    sys.path.insert(0, str(ROOT / "benchmarks" / "accuracy"))
    try:
        from gmp_schedule import schedule_from
    finally:
        sys.path.pop(0)
    import torch

    import granet
    from granet.experiment.config import make_config
    from granet.experiment.models import build_model

    config = make_config({"method": "gmp", "model": "mlp", "sparsity": 0.9, "update_every": 10})
    model = build_model("mlp")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = granet.GMP(
        model,
        optimizer,
        total_steps=1000,
        update_every=10,
        sparsity_schedule=schedule_from(0.5, config, 1000),
    )
    assert sp.sparsity() == 0.0  # the masks start dense, as the reference's GMP
    # gradual phase: steps 0-500, 50 rounds; the first round prunes from 50%, not from 0%
    assert sp.sparsity_schedule(10) == pytest.approx(0.9 - 0.4 * (1 - 1 / 50) ** 3)
    assert sp.sparsity_schedule(500) == pytest.approx(0.9)


@pytest.fixture(scope="module")
def fsdp_memory(tmp_path_factory) -> list[dict]:
    """The FSDP2 memory benchmark's quick run: a tiny GPT-2 on 2 gloo ranks, each rank's row."""
    out = tmp_path_factory.mktemp("fsdp_memory") / "fsdp_memory.json"
    script = ROOT / "benchmarks" / "fsdp_memory.py"
    subprocess.run(
        [sys.executable, str(script), "--quick", "--json", str(out)],
        env=src_env(OMP_NUM_THREADS="1"),
        check=True,
        timeout=600,
    )
    return json.loads(out.read_text())["ranks"]["fsdp2"]


def test_fsdp_memory_counts_each_ranks_shards_and_a_rounds_bytes(fsdp_memory):
    ranks = fsdp_memory
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        # each rank holds half of every float32 tensor (the tiny model's rows split evenly)
        assert 2 * r["local_weights"] == r["weights"] and r["params"] == 4 * r["local_weights"]
        assert r["grads"] == r["params"]
        assert 2 * r["params"] <= r["optim"] <= 2 * r["params"] + 8 * 28  # + AdamW's steps
        # a bool mask byte per local sparse weight, 1 bit at rest; a float32 copy on CPU
        assert 2 * r["local_sparse_weights"] == r["sparse_weights"]
        assert r["masks_elements"] == r["local_sparse_weights"] == 8 * r["packed"]
        assert r["multipliers"] == 4 * r["local_sparse_weights"]
        # the round pruned and regrew; what it sent depends on the layers, not the weights
        assert r["last_round"]["pruned"] > 0 and r["last_round"]["regrown"] > 0
        assert r["narrow_sparse_weights"] * 16 == r["sparse_weights"]
        assert r["round_bytes"] == r["narrow_round_bytes"] == ranks[0]["round_bytes"]
        assert r["wrapped_collectives"] == r["debug_collectives"] > 0
        assert r["sparsity"] > 0.5
        assert r["round_s"] > 0 and r["round_cpu_s"] > 0
        assert r["peak_rss_mib"] >= r["peak_rss_before_round_mib"] > 0


def test_fsdp_masks_hold_only_their_shards_storage(fsdp_memory):
    """The masks' storage is the rank's rows only (not a view into a whole layer's draw)."""
    for r in fsdp_memory:
        assert r["masks"] == r["local_sparse_weights"]


def test_fsdp_float32_counts_the_positions_that_differ_from_one_process(tmp_path):
    out = tmp_path / "flips.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "fsdp_float32.py"),
            "--world",
            "2",
            "--steps",
            "8",
            "--json",
            str(out),
        ],
        env=src_env(OMP_NUM_THREADS="1"),
        check=True,
        timeout=300,
        capture_output=True,
    )
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"granet", "gmp", "rigl", "set", "snfs"}
    for r in rows:
        assert r["world"] == 2 and 0 <= r["flipped"] <= 2 * r["active"]
        assert r["active"] > 0 and r["max_weight_gap"] >= 0
