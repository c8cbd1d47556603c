"""``granet plasticity``: the study's files and numbers, its continuations, resuming a stopped
study, and bad input.

Most studies here are LeNet-5 on 128 synthetic examples in batches of 32 (4 steps an epoch);
the done-when command of issue 12 runs once, as given (the 784-1000-1000-1000-10 MLP).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from helpers import SignalAt, granet_process, run_cli

from granet.experiment.blocks import load_data
from granet.experiment.checkpoints import load_checkpoint, save_checkpoint
from granet.experiment.models import build_model
from granet.experiment.plasticity import (
    COLUMNS,
    VARIANTS,
    Cell,
    Study,
    base_config,
    continuation_config,
    every_tenth,
    plasticity_rows,
    regrowth_gradients,
    run_study,
)
from granet.experiment.records import read_metrics
from granet.experiment.signals import Interrupted
from granet.experiment.tables import csv_row
from granet.experiment.trainer import Callbacks, StartFrom, Trainer

# issue 12's interface: these columns first, in this order
REQUIRED = ("prune_epoch", "rate", "variant", "t_pre")
REQUIRED += ("t_after_prune", "t_continue", "plasticity", "final_gap")
SMALL = {
    "dataset": "synthetic",
    "model": "lenet5",
    "epochs": 3,
    "train_size": 128,
    "batch_size": 32,
}


def small_study(**changes) -> Study:
    settings = {"prune_epochs": (1, 2), "rates": (0.5,), "variants": tuple(VARIANTS), **changes}
    return Study(base_config(None, SMALL), **settings)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def shown(value: float) -> float:
    """``value`` as the CSV files show it (12 significant digits; the JSON files keep all)."""
    return csv_row({"x": value})["x"]


def numbers(rows) -> list[tuple]:
    return [(r["cell"], r["t_pre"], r["t_after_prune"], r["t_continue"]) for r in rows]


@pytest.fixture(scope="module")
def done_when(tmp_path_factory):
    """Issue 12's command, as written."""
    out = tmp_path_factory.mktemp("done-when") / "study"
    code, stdout, err = run_cli(
        "plasticity",
        *("--dataset", "synthetic", "--model", "mlp", "--epochs", "4"),
        *("--prune-epochs", "1", "3", "--rates", "0.5", "0.9", "--out", str(out)),
    )
    assert code == 0, err
    return out, stdout


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The small study with every variant, uninterrupted; checkpoints kept."""
    out = tmp_path_factory.mktemp("reference") / "study"
    return out, run_study(small_study(), out, keep_checkpoints=True, progress=False)


def test_the_done_when_command_writes_eight_rows_and_the_plots(done_when):
    out, stdout = done_when
    with (out / "plasticity.csv").open() as f:
        header = next(csv.reader(f))
    assert tuple(header[: len(REQUIRED)]) == REQUIRED and tuple(header) == COLUMNS
    rows = read_csv(out / "plasticity.csv")
    assert len(rows) == 8
    assert {(r["prune_epoch"], r["rate"], r["variant"]) for r in rows} == {
        (e, r, v) for e in ("1", "3") for r in ("0.5", "0.9") for v in ("prune", "prune+regrow")
    }
    png = (out / "plasticity.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "## prune+regrow" in (out / "plasticity.md").read_text()
    assert stdout.startswith("# Pruning plasticity: mlp on synthetic, dense base")


def test_the_numbers_come_from_the_runs_and_prune_the_asked_fraction(done_when):
    out, _ = done_when
    base = json.loads((out / "base" / "report.json").read_text())
    for r in read_csv(out / "plasticity.csv"):
        cell = out / "cells" / r["cell"]
        point = json.loads(
            (out / "base" / "checkpoints" / f"epoch-{r['prune_epoch']}.json").read_text()
        )
        report = json.loads((cell / "report.json").read_text())
        t_pre, t_continue = float(r["t_pre"]), float(r["t_continue"])
        assert t_pre == shown(point["t_pre"]) and t_continue == shown(report["test_accuracy"])
        assert float(r["t_final"]) == shown(base["test_accuracy"])
        assert float(r["plasticity"]) == shown(report["test_accuracy"] / point["t_pre"])
        assert float(r["final_gap"]) == pytest.approx(t_continue - base["test_accuracy"])
        rate, numel = float(r["rate"]), sum(v["numel"] for v in report["layers"].values())
        # a dense base: exactly round(rate * N) weights go, and the continuation stays there
        assert abs(float(r["sparsity_after_prune"]) - rate) <= 0.5 / numel
        assert shown(report["sparsity"]) == float(r["sparsity_after_prune"])
        assert report["epochs"] - report["checkpoint"]["epoch"] == 0
        assert read_metrics(cell)[0]["epoch"] == int(r["prune_epoch"]) + 1
        assert not (cell / "checkpoints").exists()  # removed once finished
    assert (out / "base" / "checkpoints" / "epoch-3.pt").is_file()  # the base run's stay


def test_plasticity_arithmetic_on_known_accuracies(tmp_path):
    """A study folder whose runs are written by hand: the table is their arithmetic."""
    study = Study(base_config(None, SMALL), prune_epochs=(1, 2), rates=(0.5,), variants=("prune",))
    out = tmp_path / "study"
    report = {"method": "dense", "model": "lenet5", "dataset": "synthetic", "seed": 0}
    report |= {"sparsity": 0.0, "target_sparsity": 0.0, "train_seconds": 1.0, "itop_rate": None}
    report |= {"flops": {"inference_per_sample": {"ratio": 1.0}, "training_total": {"ratio": 1.0}}}
    report |= {"epochs": 3}  # the fields read_report checks, as granet writes them
    (out / "base" / "checkpoints").mkdir(parents=True)
    (out / "base" / "report.json").write_text(json.dumps({**report, "test_accuracy": 0.80}))
    known = {1: (0.50, 0.20, 0.45), 2: (0.64, 0.40, 0.72)}  # t_pre, t_after_prune, t_continue
    for epoch, (t_pre, t_after, t_continue) in known.items():
        point = {"t_pre": t_pre, "lr": 0.05}
        (out / "base" / "checkpoints" / f"epoch-{epoch}.json").write_text(json.dumps(point))
        cell = out / "cells" / f"e{epoch}-r0.5-prune"
        cell.mkdir(parents=True)
        (cell / "report.json").write_text(
            json.dumps({**report, "test_accuracy": t_continue, "sparsity": 0.5})
        )
        info = {"t_after_prune": t_after, "sparsity_before": 0.0, "sparsity_after_prune": 0.5}
        (cell / "oneshot.json").write_text(json.dumps(info))
    rows = plasticity_rows(study, out)
    assert [(r["prune_epoch"], r["t_after_prune"]) for r in rows] == [(1, 0.20), (2, 0.40)]
    assert [r["plasticity"] for r in rows] == pytest.approx([0.9, 1.125])
    assert [r["final_gap"] for r in rows] == pytest.approx([-0.35, -0.08])
    assert [r["continue_epochs"] for r in rows] == [2, 1]


def test_a_rate_that_removes_nothing_continues_the_base_run_exactly(tmp_path):
    study = Study(base_config(None, SMALL), prune_epochs=(1,), rates=(1e-9,), variants=("prune",))
    rows = run_study(study, tmp_path / "study", keep_checkpoints=True, progress=False)
    assert rows[0]["sparsity"] == 0.0 and rows[0]["t_continue"] == rows[0]["t_final"]
    cell = load_checkpoint(
        tmp_path / "study" / "cells" / "e1-r1e-09-prune" / "checkpoints" / "last.pt"
    )
    base = load_checkpoint(tmp_path / "study" / "base" / "checkpoints" / "last.pt")
    assert cell["position"] == base["position"]
    for name, tensor in base["model"].items():
        assert torch.equal(cell["model"][name], tensor), name


def test_each_variant_continues_as_documented(reference):
    out, rows = reference
    assert [r["cell"] for r in rows] == [
        f"e{e}-r0.5-{v}" for e in (1, 2) for v in ("prune", "prune+regrow", "prune+regrow-once")
    ]
    for r in rows:
        cell = out / "cells" / r["cell"]
        metrics = read_metrics(cell)
        assert metrics[0]["epoch"] == r["prune_epoch"] + 1  # the rest of the schedule
        if r["variant"] == "prune+regrow-once":  # a dense base: every pruned weight regrows
            assert r["sparsity"] == 0.0 and r["sparsity_after_prune"] == pytest.approx(
                0.5, abs=1e-3
            )
        else:  # the pruned density is kept through the continuation
            assert r["sparsity"] == r["sparsity_after_prune"] == pytest.approx(0.5, abs=1e-3)
        rounds = [m["itop_rate"] for m in metrics]
        if r["variant"] == "prune+regrow":  # drop-and-regrow rounds explore new positions
            assert rounds[-1] > 1 - r["sparsity"] + 0.01
        else:  # fixed masks
            assert rounds == [pytest.approx(1 - r["sparsity"], abs=1e-6)] * len(rounds)
    after = {r["variant"]: r["t_after_prune"] for r in rows if r["prune_epoch"] == 2}
    assert len(set(after.values())) == 1  # regrown weights start at zero: the same network


def test_rewind_trains_a_fixed_budget_from_the_start_of_the_schedule(tmp_path):
    study = small_study(continuation="rewind", continue_epochs=2, prune_epochs=(3,))
    rows = run_study(study, tmp_path / "study", progress=False)
    for r in rows:
        metrics = read_metrics(tmp_path / "study" / "cells" / r["cell"])
        assert [m["epoch"] for m in metrics] == [1, 2] and r["continue_epochs"] == 2
        assert metrics[0]["lr"] == study.base.lr  # rewound: the base learning rate again
    assert rows[0]["lr_at_prune"] == pytest.approx(study.base.lr * 0.01)  # after both decays


class StopInCell(Callbacks):
    """SIGTERM at step ``step`` of the first continuation that reaches it."""

    def __init__(self, step: int) -> None:
        self.step, self.done = step, False

    def on_step(self, trainer) -> None:
        if not self.done and trainer.run_dir.parent.name == "cells" and trainer.step == self.step:
            self.done = True
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("stop", [SignalAt(6), StopInCell(9)], ids=["in-base", "in-cell"])
def test_a_stopped_study_resumes_to_the_same_numbers(reference, tmp_path, stop):
    out = tmp_path / "study"
    with pytest.raises(Interrupted, match="run the same command again"):
        run_study(small_study(), out, callbacks=[stop], progress=False)
    assert not (out / "plasticity.csv").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    rows = run_study(small_study(), out, progress=False)
    assert numbers(rows) == numbers(reference[1])


def test_a_base_run_killed_before_keeping_its_prune_point_recovers_it(reference, tmp_path):
    """SIGKILL between the epoch's last.pt and its prune point: last.pt is that point."""
    out = tmp_path / "study"
    with pytest.raises(Interrupted):
        run_study(small_study(), out, callbacks=[SignalAt(6)], progress=False)
    checkpoints = out / "base" / "checkpoints"
    shutil.copy(checkpoints / "epoch-1.pt", checkpoints / "last.pt")  # the state after epoch 1
    (checkpoints / "epoch-1.pt").unlink()
    (checkpoints / "epoch-1.json").unlink()
    rows = run_study(small_study(), out, progress=False)
    assert numbers(rows) == numbers(reference[1])


def test_a_killed_study_with_two_workers_resumes_to_the_same_numbers(reference, tmp_path):
    """A real ``granet plasticity --workers 2`` process is sent SIGTERM once its first
    continuation has started; the same command then finishes the study."""
    out = tmp_path / "study"
    argv = ["plasticity", "--dataset", "synthetic", "--model", "lenet5", "--epochs", "3"]
    argv += ["--train-size", "128", "--batch-size", "32", "--prune-epochs", "1", "2"]
    argv += ["--rates", "0.5", "--variants", *VARIANTS, "--out", str(out), "--workers", "2"]
    proc = granet_process(*argv)
    deadline = time.monotonic() + 300
    while not list(out.glob("cells/*.log")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "run the same command again" in err
    assert not (out / "plasticity.csv").exists()
    code, _, err = run_cli(*argv)
    assert code == 0, err
    assert numbers(read_csv(out / "plasticity.csv")) == [
        (r["cell"], *(repr(shown(r[k])) for k in ("t_pre", "t_after_prune", "t_continue")))
        for r in reference[1]
    ]


def test_a_finished_study_is_collected_again_not_retrained(reference, capsys):
    out, rows = reference
    before = (out / "cells" / "e1-r0.5-prune" / "report.json").stat().st_mtime_ns
    assert numbers(run_study(small_study(), out, keep_checkpoints=True, progress=False)) == numbers(
        rows
    )
    assert (out / "cells" / "e1-r0.5-prune" / "report.json").stat().st_mtime_ns == before


def test_a_folder_of_another_study_or_not_of_a_study_is_refused(reference, tmp_path):
    out, _ = reference
    with pytest.raises(ValueError, match=r"other settings \(pruning: 'global' -> 'uniform'\)"):
        run_study(small_study(pruning="uniform"), out)
    with pytest.raises(ValueError, match=r"base.epochs: 3 -> 4"):
        run_study(
            Study(base_config(None, {**SMALL, "epochs": 4}), (1, 2), (0.5,), tuple(VARIANTS)), out
        )
    with pytest.raises(FileExistsError, match="is a granet run folder, not a plasticity study"):
        run_study(small_study(), out / "base")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is a folder, not a plasticity study"):
        run_study(small_study(), tmp_path / "mine", overwrite=True)


FLAGS = ["plasticity", "--dataset", "synthetic", "--model", "lenet5", "--epochs", "4"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rates", "0.5", "1"], "rates must be in (0, 1); got 1.0"),
        (["--rates", "0"], "rates must be in (0, 1); got 0.0"),
        (["--rates", "0.5", "0.5"], "rates must be distinct fractions in (0, 1)"),
        (["--prune-epochs", "3", "1"], "prune_epochs must be increasing epochs in [1, 3]"),
        (["--prune-epochs", "0"], "prune_epochs must be increasing epochs in [1, 3]"),
        (["--prune-epochs", "4"], "continue=schedule trains at least one epoch after pruning"),
        (["--prune-epochs", "2", "2"], "prune_epochs must be increasing"),
        (
            ["--variants", "regrow"],
            "variants must be one of prune, prune+regrow, prune+regrow-once",
        ),
        (["--pruning", "layer"], "pruning must be one of global, uniform; got 'layer'"),
        (["--continue", "restart"], "continue must be one of schedule, rewind; got 'restart'"),
        (["--continue", "rewind"], "continue=rewind needs continue_epochs (--continue-epochs N)"),
        (["--rates", "0.1234567", "0.1234568"], "rates must differ in their first 6 digits"),
        (["--continue-epochs", "3"], "continue_epochs is for continue=rewind"),
        (["--workers", "0"], "workers must be an integer >= 1; got 0"),
        (["--train-size", "0"], "train_size must be >= 1"),
        (["--epochs", "1"], "epochs=1 leaves no epoch to prune after"),
    ],
)
def test_bad_input_is_a_one_line_error_naming_the_setting(tmp_path, args, message):
    code, _, err = run_cli(*FLAGS, "--out", str(tmp_path / "study"), *args)
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("granet plasticity: error: ") and message in line, err
    assert not (tmp_path / "study" / "base").exists()


def test_default_pruning_epochs_are_every_tenth_of_training():
    assert every_tenth(10, 9) == list(range(1, 10))
    assert every_tenth(4, 3) == [1, 2, 3]
    assert every_tenth(20, 19) == list(range(2, 20, 2))
    assert Study(base_config(None, {**SMALL, "epochs": 10})).prune_epochs == tuple(range(1, 10))
    rewind = Study(base_config(None, SMALL), continuation="rewind", continue_epochs=1)
    assert rewind.prune_epochs == (1, 2, 3)  # rewind may prune the finished run


def test_a_continuation_is_the_variants_method_at_the_pruned_sparsity():
    study = small_study(pruning="uniform")
    for name, variant in VARIANTS.items():
        c = continuation_config(study, Cell(1, 0.5, name), 0.625, 7)
        assert (c.method, c.sparsity, c.init_sparsity, c.update_every) == (
            variant.method,
            0.625,
            0.625,
            7,
        )
        assert (c.init, c.distribution, c.scale_init) == ("magnitude", "uniform", False)
        assert c.regrow_fraction == (None if variant.method == "rigl" else 0.0)
        assert (c.epochs, c.seed, c.train_size) == (3, 0, 128)


def test_start_from_a_sparse_checkpoint_keeps_its_weights(tmp_path):
    """Trainer + StartFrom with a sparsifier state: the fresh sparsifier's initial masks must
    not zero weights that the given state keeps active."""
    config = base_config(None, {**SMALL, "method": "rigl", "sparsity": 0.8})
    first = Trainer(config)
    first.fit(1)
    path = tmp_path / "epoch-1.pt"
    save_checkpoint(first.state_dict(), path)
    second = Trainer(config, start=StartFrom.checkpoint(path))
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], tensor), name
    assert all(
        torch.equal(second.sparsifier.masks[n], m) for n, m in first.sparsifier.masks.items()
    )


def test_a_study_refused_before_training_leaves_no_folder(tmp_path):
    out = tmp_path / "study"
    flags = [*FLAGS, "--method", "granet", "--update-every", "100", "--out", str(out)]
    code, _, err = run_cli(*flags)
    assert code == 2 and "the schedule never reaches sparsity=0.9" in err
    assert not out.exists()  # so the corrected command is not refused as another study


def test_the_one_shot_regrowth_gradient_does_not_depend_on_the_global_rng():
    config = base_config(None, {**SMALL, "augment": True})  # random crops and flips
    data = load_data(config)
    model = build_model("lenet5", num_classes=10, in_channels=1, image_size=data.image_size)
    names = [n for n, _ in model.named_parameters()]
    torch.manual_seed(1)
    first = regrowth_gradients(model, config, data, 1, names)
    torch.manual_seed(2)
    second = regrowth_gradients(model, config, data, 1, names)
    assert all(torch.equal(first[n], second[n]) for n in names)


def test_a_rerun_with_more_rates_and_variants_adds_their_cells_only(tmp_path):
    out = tmp_path / "study"
    first = run_study(small_study(variants=("prune",)), out, progress=False)
    base = (out / "base" / "report.json").stat().st_mtime_ns
    kept = (out / "cells" / "e1-r0.5-prune" / "report.json").stat().st_mtime_ns
    grown = run_study(small_study(rates=(0.5, 0.9)), out, progress=False)
    assert (out / "base" / "report.json").stat().st_mtime_ns == base  # not trained again
    assert (out / "cells" / "e1-r0.5-prune" / "report.json").stat().st_mtime_ns == kept
    assert len(grown) == 2 * 2 * len(VARIANTS)
    cells = {(r["prune_epoch"], r["rate"], r["variant"]): r for r in grown}
    assert all(cells[(r["prune_epoch"], r["rate"], r["variant"])] == r for r in first)
    recorded = json.loads((out / "plasticity.json").read_text())["settings"]
    assert recorded["rates"] == [0.5, 0.9] and recorded["variants"] == list(VARIANTS)


@pytest.mark.parametrize("stored", ["dense", None])  # None: a granet without the setting
def test_a_study_made_with_another_compute_is_the_same_study(tmp_path, stored):
    """compute says how the base trains, not what: a study made when the default was dense is
    continued, not refused as one with other settings (its base resumes with its own value)."""
    from granet.experiment.plasticity import STUDY_FILE, STUDY_KIND, open_study

    study = small_study()
    assert study.base.compute == "auto"
    recorded = study.settings()
    recorded["base"] = {**recorded["base"], "compute": stored}
    if stored is None:
        del recorded["base"]["compute"]
    out = tmp_path / "study"
    out.mkdir()
    record = {"kind": STUDY_KIND, "settings": recorded}
    (out / STUDY_FILE).write_text(json.dumps(record))
    open_study(study, out, overwrite=False)
    recorded["base"]["epochs"] = 4
    (out / STUDY_FILE).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"base.epochs: 4 -> 3"):
        open_study(study, out, overwrite=False)


def test_a_study_loads_its_data_once_and_builds_one_trainer_per_run(
    reference, tmp_path, monkeypatch
):
    """The base run, each cell's prune and each continuation share the study's data set; a
    prepared cell is one trainer (its masks set, not drawn by throwaway trainers)."""

    def no_loading(*args, **kwargs):
        raise AssertionError("the data set was loaded again")

    built = []
    init = Trainer.__init__

    def counting(self, config, run_dir=None, **kwargs):
        built.append(None if run_dir is None else Path(run_dir).name)
        init(self, config, run_dir, **kwargs)

    monkeypatch.setattr("granet.experiment.blocks.load_data", no_loading)
    monkeypatch.setattr(Trainer, "__init__", counting)
    rows = run_study(small_study(prune_epochs=(1,), variants=("prune",)), tmp_path / "study")
    assert built == ["base", "e1-r0.5-prune", "e1-r0.5-prune"]  # base, prune, continuation
    assert numbers(rows) == [r for r in numbers(reference[1]) if r[0] == "e1-r0.5-prune"]


def test_workers_prune_every_cell_then_hand_the_pool_plain_jobs(reference, tmp_path, monkeypatch):
    """With workers the cells are pruned first; the pool gets jobs (name, config, folder) to
    resume, no callback into the study (here the pool trains them in this process)."""
    from granet.experiment.plasticity.folder import prepared
    from granet.experiment.processes import resumed_config
    from granet.experiment.train import train

    calls = []

    def pool(todo, workers, overwrite, out, *more):
        calls.append((workers, overwrite, more))
        for job, resume in todo:
            assert resume and prepared(job.run_dir), job.name
        for job, _ in todo:
            train(resumed_config(job.run_dir, job.config), job.run_dir, resume=True)

    monkeypatch.setattr("granet.experiment.plasticity.cells.run_processes", pool)
    study = small_study(variants=("prune",))
    rows = run_study(study, tmp_path / "study", workers=2, progress=False)
    assert calls == [(2, False, ())]
    expected = [r for r in numbers(reference[1]) if r[0].endswith("-prune")]
    assert numbers(rows) == expected
