"""Run settings, LR schedule, shuffling order and FLOP counting: fast unit tests, no training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import granet
from granet import criteria
from granet.experiment.blocks import epoch_batches, lr_factor
from granet.experiment.comparison import summarize
from granet.experiment.config import KEYS, make_config, resolve_config, save_config
from granet.experiment.datasets import DATASETS
from granet.experiment.flops import count_flops, inference_flops, training_flops
from granet.experiment.folder import write_marker
from granet.experiment.models import MODELS
from granet.experiment.sweep import _state, load_sweep


def test_file_overrides_defaults_and_flags_override_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\nsparsity: 0.8\nlr: 0.05\nmethod: rigl\n")
    config = resolve_config(path, {"sparsity": 0.95, "seed": 7})
    assert (config.epochs, config.lr, config.method) == (3, 0.05, "rigl")  # from the file
    assert (config.sparsity, config.seed) == (0.95, 7)  # flags win
    assert config.batch_size == 128  # default


def test_saved_config_reads_back_identical(tmp_path):
    config = make_config({"method": "set", "optimizer": "adamw", "lr_milestones": [0.3, 0.6]})
    assert config.lr == 1e-3  # adamw's default when lr is not given
    save_config(config, tmp_path / "config.yaml")
    assert resolve_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize(
    ("key", "value", "choices"),
    [
        ("model", "alexnet", MODELS),
        ("dataset", "mnist", DATASETS),
        ("method", "snip", None),
        ("pruning", "local", ("global", "uniform")),
        ("growth", "magic", ("gradient", "momentum", "random")),
    ],
)
def test_unknown_choice_lists_the_choices(key, value, choices):
    with pytest.raises(ValueError, match=f"{key} must be one of") as e:
        make_config({key: value})
    for choice in choices or ("granet", "gmp", "rigl", "set", "snfs", "static", "dense"):
        assert choice in str(e.value)


def test_bad_values_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="sparsity must be in"):
        make_config({"sparsity": 1.0})
    with pytest.raises(ValueError, match="epochs must be an integer"):
        make_config({"epochs": 2.5})
    with pytest.raises(ValueError, match="prune_end"):
        make_config({"prune_start": 0.5, "prune_end": 0.2})
    path = tmp_path / "bad.yaml"
    path.write_text("epoch: 3\n")
    with pytest.raises(ValueError, match=f"{path}: unknown setting.*epoch.*known: {KEYS[0]}"):
        resolve_config(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        resolve_config(path)


def test_step_schedule_drops_tenfold_at_half_and_three_quarters():
    config = make_config({"epochs": 4})
    factors = [lr_factor(s, 400, 100, config) for s in range(400)]
    assert factors[0] == factors[199] == 1.0
    assert factors[200] == factors[299] == pytest.approx(0.1)
    assert factors[300] == factors[399] == pytest.approx(0.01)


def test_warmup_then_cosine():
    config = make_config({"epochs": 4, "schedule": "cosine", "warmup_epochs": 1})
    factors = [lr_factor(s, 400, 100, config) for s in range(400)]
    assert factors[0] == pytest.approx(0.01) and factors[99] == 1.0  # linear ramp
    assert factors[100] == 1.0 and factors[250] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(factors[100:], factors[101:]))


def test_epoch_order_depends_on_seed_and_epoch_only():
    a = epoch_batches(50, 16, seed=3, epoch=2)
    assert a == epoch_batches(50, 16, seed=3, epoch=2)
    assert sorted(i for batch in a for i in batch) == list(range(50))
    assert [len(b) for b in a] == [16, 16, 16, 2]
    assert a != epoch_batches(50, 16, seed=3, epoch=3)
    assert a != epoch_batches(50, 16, seed=4, epoch=2)


def test_flops_of_an_mlp_scale_with_density():
    def make():
        return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))

    counts = count_flops(make, (1, 3, 4), ["1.weight", "3.weight"])
    assert counts.layer_forward == {"1.weight": 2 * 12 * 8, "3.weight": 2 * 8 * 4}
    assert counts.forward == 2 * 12 * 8 + 2 * 8 * 4
    # backward: weight gradients of both layers, input gradient of the second only
    assert counts.layer_backward == {"1.weight": 2 * 12 * 8, "3.weight": 2 * 2 * 8 * 4}
    half = inference_flops(counts, {"1.weight": 0.5, "3.weight": 1.0})
    assert half["dense"] == counts.forward
    assert half["sparse"] == 12 * 8 + 2 * 8 * 4
    run = training_flops(
        counts, [(10, {"1.weight": 1.0, "3.weight": 1.0}), (10, {"1.weight": 0.0, "3.weight": 0.0})]
    )
    assert run["dense"] == 20 * (counts.forward + counts.backward)
    assert run["ratio"] == pytest.approx(0.5)


def test_flops_are_counted_without_touching_real_memory():
    def make():
        return nn.Conv2d(3, 16, 3, padding=1)

    counts = count_flops(make, (3, 32, 32), ["weight"])
    assert counts.forward == 2 * 3 * 16 * 9 * 32 * 32
    assert torch.zeros(1).device.type == "cpu"  # the meta device context did not leak


def test_presets_are_valid_and_the_default_preset_is_the_default():
    configs = Path(__file__).parents[2] / "configs"
    presets = sorted(p for p in configs.glob("*.yaml") if not p.name.startswith("sweep"))
    assert {p.stem for p in presets} >= {"fashion-mnist", "cifar10-vgg19", "imagenet-resnet50"}
    for path in presets:
        resolve_config(path)
    assert resolve_config(configs / "fashion-mnist.yaml") == make_config({})
    for path in configs.glob("sweep-*.yaml"):
        assert load_sweep(path).jobs


def _report(method, init, sparsity, seed, accuracy):
    return {
        "dataset": "fashion-mnist",
        "model": "mlp",
        "method": method,
        "config": {"init_sparsity": init},
        "target_sparsity": sparsity,
        "sparsity": sparsity,
        "seed": seed,
        "test_accuracy": accuracy,
        "itop_rate": 1.0,
        "train_seconds": 1.0,
        "flops": {"inference_per_sample": {"ratio": 0.1}, "training_total": {"ratio": 0.3}},
    }


def test_comparison_keeps_initial_sparsities_apart():
    reports = [
        _report("granet", None, 0.9, 1, 0.80),
        _report("granet", None, 0.9, 2, 0.82),
        _report("granet", 0.0, 0.9, 1, 0.90),
        _report("granet", 0.5, 0.9, 3, 0.81),  # the default, written out
        _report("rigl", 0.9, 0.9, 2, 0.70),
        _report("rigl", None, 0.9, 1, 0.70),
    ]
    rows = {r["method"]: r for r in summarize(reports)}
    assert set(rows) == {"granet (s_i=0)", "granet (s_i=0.5)", "rigl"}
    assert rows["granet (s_i=0.5)"]["runs"] == 3
    assert rows["rigl"]["runs"] == 2
    assert rows["granet (s_i=0.5)"]["test_accuracy_mean"] == pytest.approx(0.81)
    assert rows["granet (s_i=0)"]["test_accuracy_mean"] == pytest.approx(0.90)


def test_pruning_and_growth_reach_the_sparsifier():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    config = make_config({"method": "granet", "pruning": "uniform", "growth": "random"})
    sp = granet.sparsify(
        net, opt, config.method, total_steps=100, **config.resolved(100).sparsifier_options()
    )
    assert sp.algorithm.pruning == "uniform" and sp.growth is criteria.random


def test_sweep_refuses_one_initial_sparsity_for_several_methods(tmp_path):
    # It would turn RigL, GMP and static into the same GraNet run.
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "config: {init_sparsity: 0.5}\nmethods: [dense, granet, rigl]\nsparsities: [0.9]\n"
    )
    with pytest.raises(ValueError, match="init_sparsity is set for every method"):
        load_sweep(sweep)
    sweep.write_text("config: {init_sparsity: 0.0}\nmethods: [dense, granet]\nsparsities: [0.9]\n")
    assert [j.config.init_sparsity for j in load_sweep(sweep).jobs] == [0.0, 0.0]


def test_sweep_methods_differ(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    base = Path(__file__).parents[2] / "configs" / "fashion-mnist.yaml"
    sweep.write_text(f"base: {base}\nmethods: [granet, gmp, rigl, static]\nsparsities: [0.9]\n")
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    shape = {}
    for job in load_sweep(sweep).jobs:
        options = job.config.resolved(100).sparsifier_options()
        sp = granet.sparsify(net, opt, job.config.method, total_steps=100, **options)
        shape[job.config.method] = (sp.algorithm.init_sparsity, sp.algorithm.regrow_fraction)
        sp.remove()
    assert shape == {
        "granet": (0.5, 0.5),
        "gmp": (0.0, 0.0),
        "rigl": (0.9, 0.5),
        "static": (0.9, 0.0),
    }


def test_sweep_keeps_a_run_whose_settings_only_spell_out_the_defaults(tmp_path):
    # A run saved with GraNet's own init sparsity and regrowth written out, by a version that
    # had no `pruning` setting yet, is the same run as the sweep's; another init sparsity is not.
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"methods: [dense, granet]\nsparsities: [0.9]\nout: {tmp_path / 'out'}\n")
    dense, granet_job = load_sweep(sweep).jobs
    for job, spelled in [(dense, {"init_sparsity": 0.5}), (granet_job, {"regrow_fraction": 0.5})]:
        job.run_dir.mkdir(parents=True)
        write_marker(job.run_dir, None)
        stored = {**job.config.to_dict(), "init_sparsity": 0.5, **spelled}
        del stored["pruning"]
        (job.run_dir / "config.yaml").write_text(yaml.safe_dump(stored))
        assert _state(job, overwrite=False) == "resume"  # same run, not finished
    (granet_job.run_dir / "config.yaml").write_text(
        yaml.safe_dump({**granet_job.config.to_dict(), "init_sparsity": 0.0})
    )
    with pytest.raises(ValueError, match=r"other settings \(init_sparsity\)"):
        _state(granet_job, overwrite=False)
    assert _state(granet_job, overwrite=True) == "new"


def test_effective_settings_write_out_each_methods_defaults():
    def effective(**values):
        return make_config({"sparsity": 0.9, **values}).effective()

    assert effective(method="rigl") == effective(method="rigl", init_sparsity=0.9)
    assert effective(method="gmp")["regrow_fraction"] == 0.0
    assert effective(method="set")["growth"] == "random"
    assert effective(method="granet") != effective(method="granet", init_sparsity=0.0)
    assert effective(method="dense") == effective(method="dense", regrow_fraction=0.3)
