"""Comparison tables: runs grouped by the sparsity they reached, a missed target marked and
kept apart, every run counted once."""

from __future__ import annotations

import json

import pytest

from granet.experiment.comparison import comparison_markdown, find_runs, summarize
from granet.experiment.tables import counted, csv_row


def report(seed, accuracy, sparsity=0.9, target=0.9, run_id=None, **extra):
    return {
        "run_dir": f"runs/granet-seed{seed}",
        "run_id": run_id or f"id{seed}",
        "dataset": "cifar10",
        "model": "vgg19",
        "method": "granet",
        "config": {"init_sparsity": None},
        "seed": seed,
        "test_accuracy": accuracy,
        "sparsity": sparsity,
        "target_sparsity": target,
        "itop_rate": 1.0,
        "train_seconds": 1.0,
        "flops": {"inference_per_sample": {"ratio": 0.1}, "training_total": {"ratio": 0.3}},
        **extra,
    }


def test_a_run_that_missed_its_target_is_marked_and_not_averaged_in():
    reports = [
        report(0, 0.90),
        report(1, 0.92),
        report(2, 0.95, sparsity=0.5, target_reached=False),  # its schedule stopped at 50%
    ]
    rows = {r["method"]: r for r in summarize(reports)}
    assert set(rows) == {"granet", "granet (missed target 90%)"}
    assert rows["granet"]["runs"] == 2 and rows["granet"]["test_accuracy_mean"] == pytest.approx(
        0.91
    )
    missed = rows["granet (missed target 90%)"]
    assert (missed["sparsity"], missed["target_sparsity"], missed["target_reached"]) == (
        0.5,
        0.9,
        False,
    )
    table = comparison_markdown(list(rows.values()))
    assert "| method | 50% | 90% |" in table
    assert "| granet (missed target 90%) | 95.00 | — |" in table
    assert "*missed target*" in table


def test_reports_without_the_flag_are_judged_by_their_sparsity():
    old = [report(0, 0.9, sparsity=0.8996), report(1, 0.9, sparsity=0.62)]
    for r in old:
        r.pop("run_id")
    assert sorted(r["method"] for r in summarize(old)) == ["granet", "granet (missed target 90%)"]


def test_a_run_counts_once():
    reports = [report(0, 0.90), report(1, 0.80), report(0, 0.90, run_id="id0")]  # a copy
    with pytest.warns(UserWarning, match="counted once"):
        (row,) = summarize(reports)
    assert row["runs"] == 2 and row["seeds"] == "0 1"


def test_find_runs_lists_each_folder_once(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "grid" / name).mkdir(parents=True)
        (tmp_path / "grid" / name / "report.json").write_text(json.dumps(report(0, 0.9)))
    grid = tmp_path / "grid"
    found = find_runs([grid, grid / "a", grid / ".." / "grid" / "a"])
    assert found == [grid / "a", grid / "b"]


def test_counts_and_csv_numbers_read_as_meant():
    assert [counted(n, "epoch") for n in (0, 1, 2)] == ["0 epochs", "1 epoch", "2 epochs"]
    row = csv_row({"sparsity": 1 - 0.8, "lr_at_prune": 0.05 * 0.1 * 0.1, "runs": 3, "name": "a"})
    assert row == {"sparsity": 0.2, "lr_at_prune": 0.0005, "runs": 3, "name": "a"}
    assert str(row["sparsity"]) == "0.2" and str(1 - 0.8) == "0.19999999999999996"
    tiny = csv_row({"lr": 1.2345678901234e-20})["lr"]  # small values keep their digits
    assert tiny == 1.23456789012e-20


@pytest.mark.parametrize("name", ["comparison.md", "comparison.csv", "accuracy_vs_sparsity.png"])
def test_the_comparison_is_not_written_through_a_link(tmp_path, name):
    from granet.experiment.comparison import write_comparison

    rows = summarize([report(0, 0.90), report(1, 0.92)])
    out = tmp_path / "sweep"
    out.mkdir()
    outside = tmp_path / "mine.txt"
    outside.write_text("mine")
    (out / name).symlink_to(outside)
    with pytest.raises(OSError, match="cannot write it: a symbolic link") as info:
        write_comparison(rows, out)
    assert info.value.filename == str(out / name)
    assert outside.read_text() == "mine"
    (out / name).unlink()
    assert sorted(p.name for p in write_comparison(rows, out)) == sorted(
        ["comparison.md", "comparison.csv", "accuracy_vs_sparsity.png"]
    )
