"""export_run / bench_inference on a run whose loader is stubbed (records.py is the CLI's)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from granet import inference
from granet.experiment import serving
from granet.export import load_sparse


def fake_runs(monkeypatch, model: nn.Module, meta: dict) -> list:
    """Make ``granet.experiment.records.load_run_model`` return ``model, meta``; the calls made."""
    try:
        import granet.experiment.records as records
    except ModuleNotFoundError:
        records = types.ModuleType("granet.experiment.records")
        monkeypatch.setitem(sys.modules, "granet.experiment.records", records)
    calls = []

    def load_run_model(run_dir, which="best"):
        calls.append((str(run_dir), which))
        return model, meta

    monkeypatch.setattr(records, "load_run_model", load_run_model, raising=False)
    return calls


def lenet(sparsity: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(6 * 14 * 14, 10),
    )
    with torch.no_grad():
        for m in (model[0], model[4]):
            m.weight.mul_(torch.rand_like(m.weight) >= sparsity)
    return model.eval()


def test_export_run_writes_a_small_loadable_file(monkeypatch, tmp_path):
    model = lenet(0.95)
    calls = fake_runs(monkeypatch, model, {"model": "lenet"})
    info = serving.export_run(tmp_path / "run", tmp_path / "m.gsp")
    assert calls == [(str(tmp_path / "run"), "best")]
    assert info["bytes"] == (tmp_path / "m.gsp").stat().st_size
    assert info["ratio"] == pytest.approx(info["bytes"] / info["torch_save_bytes"])
    assert info["ratio"] < 0.15
    assert info["weight_sparsity"] == pytest.approx(0.95, abs=0.01)
    assert (info["sparse_tensors"], info["tensors"]) == (2, 4)
    fresh = load_sparse(tmp_path / "m.gsp", lenet(0.0))
    assert torch.equal(fresh[4].weight, model[4].weight)


def test_export_run_of_a_dense_run_warns_and_still_exports(monkeypatch, tmp_path):
    fake_runs(monkeypatch, lenet(0.0), {})
    with pytest.warns(UserWarning, match="no tensor has enough zeros"):
        info = serving.export_run(tmp_path, tmp_path / "m.gsp")
    assert info["sparse_tensors"] == 0 and info["weight_sparsity"] == 0.0
    assert 0.9 < info["ratio"] < 1.0


def wide(sparsity: float) -> nn.Module:
    """A Linear large enough for the rule (2**18 weights or more)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(600, 600), nn.ReLU(), nn.Linear(600, 10))
    with torch.no_grad():
        model[1].weight.mul_(torch.rand_like(model[1].weight) >= sparsity)
    return model.eval()


@pytest.mark.parametrize(
    "meta", [{"data_shape": {"in_channels": 1, "image_size": 28, "num_classes": 10}}, {}]
)
def test_bench_inference_rows(monkeypatch, tmp_path, meta):
    model = lenet(0.98) if meta else nn.Sequential(nn.Flatten(), nn.Linear(30, 4))
    fake_runs(monkeypatch, model, meta)
    rows = serving.bench_inference(tmp_path, batch_sizes=(1, 3))
    assert [r["batch_size"] for r in rows] == [1, 3]
    for row in rows:  # too small for the rule: nothing runs sparse, no speed-up is claimed
        assert row["csr_layers"] == ("0/2" if meta else "0/1")
        assert row["dense_ms"] > 0 and row["sparse_ms"] is None and row["speedup"] is None


def test_bench_inference_chooses_layers_by_the_rule_not_by_timing(monkeypatch, tmp_path):
    def no_timing(*args, **kwargs):
        raise AssertionError("bench_inference timed a layer to choose it")

    monkeypatch.setattr(inference, "_probe", no_timing)
    for sparsity, chosen in ((0.98, "1/2"), (0.9, "0/2")):  # the rule: density <= 5%
        fake_runs(monkeypatch, wide(sparsity), {})
        rows = serving.bench_inference(tmp_path, batch_sizes=(1, 128))
        assert [row["csr_layers"] for row in rows] == [chosen, chosen]
        for row in rows:
            if chosen == "1/2":
                assert row["speedup"] == pytest.approx(row["dense_ms"] / row["sparse_ms"])
            else:
                assert row["sparse_ms"] is None and row["speedup"] is None


def test_bench_inference_command_says_when_there_is_nothing_to_compare(
    monkeypatch, tmp_path, capsys
):
    from granet.cli import main

    fake_runs(monkeypatch, wide(0.9), {})
    assert main(["bench-inference", str(tmp_path), "--batch-sizes", "1", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("no layer runs sparse; nothing to compare (the rule: ")
    assert "speedup" not in out
    fake_runs(monkeypatch, wide(0.98), {})
    assert main(["bench-inference", str(tmp_path), "--batch-sizes", "1", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| batch_size | dense_ms | sparse_ms | speedup | csr_layers")
    assert [line.split(" | ")[4] for line in lines[2:]] == ["1/2", "1/2"]


def test_bench_inference_needs_an_input_shape_for_convolutions(monkeypatch, tmp_path):
    fake_runs(monkeypatch, lenet(0.9), {"model": "lenet5"})
    with pytest.raises(ValueError, match="data_shape"):
        serving.bench_inference(tmp_path)
