"""The ``granet`` command: a tiny run's folder, bad input, sweeps and redrawn reports.

Runs use the synthetic data set and LeNet-5 for one or two epochs of 8 steps.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
import yaml
from helpers import run_cli

from granet.cli import main
from granet.experiment.checkpoints import load_checkpoint
from granet.experiment.models import MODELS
from granet.experiment.records import load_run_model, read_metrics

TINY = ["--dataset", "synthetic", "--model", "lenet5"]
REPORT_KEYS = {"test_accuracy", "sparsity", "itop_rate", "train_seconds", "layers", "flops"}
PNGS = ("training.png", "layer_density.png", "itop_rate.png")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One finished two-epoch run, configured by a file and a flag that overrides it."""
    root = tmp_path_factory.mktemp("tiny")
    config = root / "settings.yaml"
    config.write_text("epochs: 2\nsparsity: 0.8\nlr: 0.05\n")
    run_dir = root / "run"
    code, out, err = run_cli(
        "train", *TINY, "--config", str(config), "--sparsity", "0.9", "--out", str(run_dir)
    )
    assert code == 0, err
    return run_dir, out


def test_a_run_writes_its_folder_and_prints_the_report(tiny_run):
    run_dir, out = tiny_run
    for name in ("config.yaml", "metrics.jsonl", "report.json", "report.md", *PNGS):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert out.strip() == (run_dir / "report.md").read_text().strip()

    metrics = read_metrics(run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for key in (
        "train_loss",
        "train_accuracy",
        "val_accuracy",
        "sparsity",
        "itop_rate",
        "lr",
        "regrow_fraction",
        "seconds",
    ):
        assert all(key in m for m in metrics), key

    report = json.loads((run_dir / "report.json").read_text())
    assert set(report) >= REPORT_KEYS
    assert 0.0 <= report["test_accuracy"] <= 1.0
    assert report["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert report["checkpoint"]["which"] == "best"
    assert report["checkpoint"]["epoch"] in (1, 2)
    for layer in report["layers"].values():
        assert layer["nnz"] == round(layer["density"] * layer["numel"])
    for kind in ("inference_per_sample", "training_total"):
        flops = report["flops"][kind]
        assert 0 < flops["sparse"] < flops["dense"]


def test_the_run_config_merges_file_and_flags(tiny_run):
    run_dir, _ = tiny_run
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["sparsity"] == 0.9  # flag over file
    assert (config["epochs"], config["lr"]) == (2, 0.05)  # file over default
    assert config["update_every"] >= 1  # "automatic" is written down as the number used


def test_the_best_checkpoint_is_what_the_report_tested(tiny_run):
    run_dir, _ = tiny_run
    model, config = load_run_model(run_dir)
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert config["model"] == "lenet5"
    assert config["data_shape"] == {"num_classes": 10, "in_channels": 1, "image_size": 28}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, best["model"][name]), name
    report = json.loads((run_dir / "report.json").read_text())
    assert best["epoch"] == report["checkpoint"]["epoch"]
    nonzero = sum(int(model.state_dict()[n].count_nonzero()) for n in report["layers"])
    assert nonzero <= sum(v["nnz"] for v in report["layers"].values())


@pytest.mark.parametrize(
    ("flag", "value", "choices"),
    [
        ("--model", "alexnet", MODELS),
        ("--dataset", "mnist", ("fashion-mnist", "synthetic")),
        ("--method", "snip", ("granet", "rigl", "dense")),
    ],
)
def test_unknown_names_list_the_choices(tmp_path, flag, value, choices):
    code, _, err = run_cli("train", flag, value, "--out", str(tmp_path / "r"))
    assert code == 2
    assert value in err and all(c in err for c in choices)
    assert not (tmp_path / "r").exists()


def test_without_a_validation_split_the_last_epoch_is_tested(tmp_path):
    run_dir = tmp_path / "run"
    code, out, err = run_cli(
        "train", *TINY, "--epochs", "2", "--val-size", "0", "--out", str(run_dir)
    )
    assert code == 0, err
    report = json.loads((run_dir / "report.json").read_text())
    assert report["data"]["val"] == 0 and report["data"]["train"] == 1000  # all of it
    assert report["checkpoint"]["epoch"] == 2 and report["checkpoint"]["val_accuracy"] is None
    assert [m["best"] for m in read_metrics(run_dir)] == [False, True]
    assert "checkpoint the last epoch, epoch 2" in err and "val —" in err
    assert "(sparsity 0.9) lenet5 on cpu" in err and "): 2 epochs x 8 steps, into" in err
    assert "validation accuracy —" in (run_dir / "report.md").read_text()
    model, _ = load_run_model(run_dir, "last")
    best, _ = load_run_model(run_dir, "best")
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), best.state_dict().values())
    )


def test_an_existing_run_folder_is_refused(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    code, _, err = run_cli("train", *TINY, "--epochs", "1", "--out", str(run_dir))
    assert code == 2 and "--resume" in err and "--overwrite" in err
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    code, _, err = run_cli("train", *TINY, "--out", str(other), "--overwrite")
    assert code == 2 and "not a granet run folder" in err
    assert (other / "notes.txt").read_text() == "keep me"


def test_resume_takes_no_other_settings(tiny_run):
    run_dir, _ = tiny_run
    code, _, err = run_cli("train", "--resume", str(run_dir), "--epochs", "5")
    assert code == 2 and "--epochs" in err


def test_resuming_a_finished_run_reprints_its_report(tiny_run):
    run_dir, _ = tiny_run
    before = (run_dir / "report.json").read_text()
    code, out, err = run_cli("train", "--resume", str(run_dir))
    assert code == 0 and "already finished" in err
    assert out.strip() == (run_dir / "report.md").read_text().strip()
    assert (run_dir / "report.json").read_text() == before


def test_export_and_bench_inference_use_the_best_checkpoint(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    out = tmp_path / "model.granet"
    code, printed, err = run_cli("export", str(run_dir), "--out", str(out))
    assert code == 0, err
    assert out.is_file() and json.loads(printed)["bytes"] == out.stat().st_size
    code, printed, err = run_cli("bench-inference", str(run_dir), "--batch-sizes", "2")
    assert code == 0, err
    # LeNet-5's layers are too small for the rule: no speed-up of a model against itself
    assert printed.startswith("no layer runs sparse; nothing to compare (the rule: ")


def test_sweep_table_and_redrawn_reports(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "config": {"dataset": "synthetic", "model": "lenet5", "epochs": 1},
                "methods": ["granet", "static"],
                "sparsities": [0.5, 0.8],
                "seeds": [0, 1],
                "out": str(tmp_path / "grid"),
            }
        )
    )
    code, out, err = run_cli("sweep", str(sweep))
    assert code == 0, err
    grid = tmp_path / "grid"
    runs = sorted(p.name for p in grid.iterdir() if p.is_dir())
    assert runs == [
        f"{m}-s{s}-seed{k}" for m in ("granet", "static") for s in (0.5, 0.8) for k in (0, 1)
    ]
    table = (grid / "comparison.md").read_text()
    assert "| method | 50% | 80% |" in table
    for method in ("granet", "static"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {method} |"))
        assert row.count("±") == 2
    with (grid / "comparison.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["method"], float(r["sparsity"]), int(r["runs"])) for r in rows) == [
        (m, s, 2) for m in ("granet", "static") for s in (0.5, 0.8)
    ]
    assert (grid / "accuracy_vs_sparsity.png").is_file()
    assert table.strip() in out

    # A second start finds everything finished and trains nothing.
    code, _, err = run_cli("sweep", str(sweep))
    assert code == 0 and err.count("finished earlier") == 8

    # ``granet report`` redraws each run's report and the comparison from the files.
    one = grid / "granet-s0.8-seed1"
    for name in ("report.md", *PNGS):
        (one / name).unlink()
    (grid / "comparison.md").unlink()
    code, out, _ = run_cli("report", str(grid), "--out", str(tmp_path / "again"))
    assert code == 0
    assert all((one / name).is_file() for name in ("report.md", *PNGS))
    assert (tmp_path / "again" / "comparison.md").read_text() == table
    assert table.strip() in out


def test_every_sparsifier_option_is_a_flag_a_setting_and_a_docs_row():
    import dataclasses
    import re
    from pathlib import Path

    from granet.algorithm import cli_options
    from granet.cli import build_parser, options_table
    from granet.experiment.config import Config

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    flags = {s for a in train._actions for s in a.option_strings}
    keys = {f.name for f in dataclasses.fields(Config)}
    for option in cli_options():
        assert "--" + option.name.replace("_", "-") in flags, option.name
        assert option.name in keys, option.name
    doc = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    table = re.search(r"<!-- options:begin -->\n(.*?)\n<!-- options:end -->", doc, re.S)
    assert table and table.group(1) == options_table(), "regenerate: granet.cli.options_table()"


def test_every_run_setting_is_a_flag_with_its_declared_default_and_a_docs_row():
    import re
    from pathlib import Path

    from granet.cli import build_parser, settings_table
    from granet.cli.flags import setting_default
    from granet.experiment.config import SETTINGS
    from granet.experiment.plasticity import BASE_DEFAULTS

    commands = build_parser()._subparsers._group_actions[0].choices
    helps = {
        command: {s: a.help for a in commands[command]._actions for s in a.option_strings}
        for command in ("train", "plasticity")
    }
    for setting in SETTINGS:
        assert "default" not in setting.help, setting.name  # derived, never written by hand
        flag = "--" + setting.name.replace("_", "-")
        assert helps["train"][flag].endswith(f"(default: {setting_default(setting)})"), flag
        if setting.name != "workers":  # the study's --workers: continuations at a time
            shown = setting_default(
                setting, BASE_DEFAULTS.get(setting.name), setting.name in BASE_DEFAULTS
            )
            assert helps["plasticity"][flag].endswith(f"(default: {shown})"), flag
    train, study = helps["train"], helps["plasticity"]
    assert train["--epochs"].endswith("(default: 10)")
    assert train["--lr"].endswith("(default: 0.05 for sgd, 0.001 for adamw)")
    assert train["--lr-milestones"].endswith("(default: 0.5 0.75)")
    assert train["--augment"].endswith("(default: off)")
    assert train["--train-size"].endswith("(default: all)")
    assert study["--method"].endswith("(default: dense)")
    assert study["--model"].endswith("(default: lenet5)")
    assert study["--val-size"].endswith("(default: 0)")
    assert study["--train-size"].endswith("(default: 6000)")
    doc = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    table = re.search(r"<!-- settings:begin -->\n(.*?)\n<!-- settings:end -->", doc, re.S)
    assert table and table.group(1) == settings_table(), "regenerate: granet.cli.settings_table()"


def test_each_run_setting_is_checked_by_its_declaration():
    from granet.experiment.config import SETTINGS, make_config

    for setting in SETTINGS:
        if setting.choices:  # a name not among them is refused, the choices listed
            bad = ["nope"] if setting.many else "nope"
            with pytest.raises(ValueError, match=f"{setting.name} must be one of") as e:
                make_config({setting.name: bad})
            assert all(choice in str(e.value) for choice in setting.choices)
    for name, value, rule in [
        ("val_size", 1.0, r"in \[0, 1\)"),
        ("train_size", 0, r">= 1 \(or null: all\)"),
        ("epochs", 0, ">= 1"),
        ("batch_size", 0, ">= 1"),
        ("lr", -1.0, "> 0"),
        ("momentum", 1.0, r"in \[0, 1\)"),
        ("weight_decay", -1.0, ">= 0"),
        ("warmup_epochs", 10.0, r"in \[0, epochs=10\)"),
        ("label_smoothing", 1.0, r"in \[0, 1\)"),
        ("workers", -1, r"in \[0, \d+\] \(4 per CPU here\)"),
    ]:
        with pytest.raises(ValueError, match=f"^{name} must be {rule}; got {value!r}$"):
            make_config({name: value})


def test_sparsifier_flags_reach_the_run(tmp_path):
    code, _, err = run_cli(
        "train",
        *TINY,
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "run"),
        "--method",
        "rigl",
        "--init",
        "magnitude",
        "--importance",
        "magnitude",
        "--pruning",
        "uniform",
    )
    assert code == 0, err
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["init"] == "magnitude" and config["pruning"] == "uniform"
    settings = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["sparsifier"]
    assert settings["settings"]["init"] == "magnitude"


@pytest.mark.parametrize(
    "command", ["train", "sweep", "plasticity", "report", "export", "bench-inference"]
)
def test_every_command_prints_its_help(command, capsys):
    # the help texts come from the option declarations: a bare % in one broke argparse
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0 and "usage: granet" in capsys.readouterr().out
