"""Wanda one-shot pruning (granet.oneshot.prune(score="wanda")) and init="wanda" for every
sparsifier, on plain layers and on a Llama-style and a GPT-2 model built from tiny configs."""

import pytest
import torch
from helpers import VOCAB, tiny_gpt2, tiny_llama
from torch import nn

import granet
from granet.oneshot import prune

pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def token_batches(n: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (2, 16), generator=g)} for _ in range(n)]


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))


def test_wanda_keeps_the_largest_weight_times_input_norm_in_every_row():
    model = mlp()
    xs = [torch.randn(5, 12) * torch.linspace(0.1, 3, 12) for _ in range(3)]
    first, second = (m.weight.detach().clone() for m in (model[0], model[2]))
    # the inputs of each layer, by hand, in float64
    x1 = torch.cat(xs).double()
    x2 = torch.relu(x1 @ first.double().T + model[0].bias.detach().double())
    pruned = prune(model, 0.25, score="wanda", calibration=xs)
    for name, w, x in (("0.weight", first, x1), ("2.weight", second, x2)):
        score = w.double().abs() * x.norm(dim=0)
        keep = w.shape[1] - round(0.25 * w.shape[1])
        expected = torch.zeros_like(w, dtype=torch.bool).scatter_(
            1, score.topk(keep, dim=1).indices, True
        )
        assert torch.equal(pruned.masks[name], expected), name
        assert torch.equal(model.get_parameter(name).detach(), w * expected), name


def test_a_conv1d_is_pruned_per_output_like_the_linear_of_its_transpose():
    torch.manual_seed(0)
    conv, linear = Conv1D(nf=6, nx=10), nn.Linear(10, 6)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)  # Conv1D keeps (in, out)
    xs = [torch.randn(4, 10) * torch.linspace(0.1, 3, 10)]
    a = prune(nn.Sequential(conv), 0.5, score="wanda", calibration=xs).masks["0.weight"]
    b = prune(nn.Sequential(linear), 0.5, score="wanda", calibration=xs).masks["0.weight"]
    assert torch.equal(a, b.T)
    assert (a.sum(0) == 5).all()  # every output unit (a column of a Conv1D) keeps half


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_every_output_row_of_a_transformer_keeps_exactly_half(make):
    model = make()
    pruned = prune(model, 0.5, score="wanda", calibration=token_batches())
    names = list(pruned.masks)
    assert names and not [n for n in names if "embed" in n or "wte" in n or "wpe" in n]
    for name, mask in pruned.masks.items():
        rows = mask if isinstance(model.get_submodule(name[:-7]), nn.Linear) else mask.T
        assert (rows.sum(1) == rows.shape[1] // 2).all(), name
        assert torch.equal(model.get_parameter(name).detach() != 0, mask), name
    assert pruned.sparsity() == 0.5
    logits = model(**token_batches(1, seed=5)[0]).logits
    assert torch.isfinite(logits).all()


def test_wanda_differs_from_magnitude_where_inputs_differ_in_scale():
    a, b = tiny_llama(), tiny_llama()
    wanda = prune(a, 0.5, score="wanda", calibration=token_batches()).masks
    magnitude = prune(b, 0.5, pruning="row").masks
    assert any(not torch.equal(wanda[n], magnitude[n]) for n in wanda)


def test_init_wanda_starts_any_sparsifier_at_wandas_masks():
    reference = tiny_llama()
    expected = prune(reference, 0.5, score="wanda", calibration=token_batches()).masks
    for method in ("rigl", "static", "set"):
        model = tiny_llama()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sp = granet.METHODS[method](
            model,
            opt,
            sparsity=0.5,
            distribution="uniform",
            init="wanda",
            calibration=token_batches(),
            total_steps=10,
        )
        assert sp.names == list(expected)
        for name in sp.names:
            assert torch.equal(sp.masks[name], expected[name]), (method, name)
            assert torch.equal(model.get_parameter(name), reference.get_parameter(name)), name
        sp.remove()


def test_init_wanda_spreads_an_odd_count_over_the_rows():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = [torch.randn(8, 12)]
    sp = granet.Static(
        model,
        opt,
        sparsity=0.7,
        distribution="uniform",
        init="wanda",
        calibration=xs,
        total_steps=5,
    )
    for name, mask in sp.masks.items():
        numel = mask.numel()
        assert int(mask.sum()) == round(0.3 * numel), name
        per_row = mask.sum(1)
        assert int(per_row.max() - per_row.min()) <= 1, name


def test_bad_calibration_is_refused_in_one_line_naming_it():
    model = mlp()
    with pytest.raises(ValueError, match="^calibration: score='wanda' needs calibration"):
        prune(model, 0.5, score="wanda")
    with pytest.raises(
        ValueError,
        match=r"^calibration: batch 1 \(a tensor of shape \(4, 7\)\) does not fit the model: "
        r"0.weight takes 12 input features, the batch brings it 7$",
    ):
        prune(model, 0.5, score="wanda", calibration=[torch.randn(4, 12), torch.randn(4, 7)])
    with pytest.raises(ValueError, match="^calibration: holds no batch$"):
        prune(model, 0.5, score="wanda", calibration=[])
    with pytest.raises(ValueError, match="^calibration is read only by score='wanda'$"):
        prune(model, 0.5, calibration=[torch.randn(4, 12)])
    with pytest.raises(ValueError, match="^score must be one of magnitude, wanda; got 'sparsegpt'"):
        prune(model, 0.5, score="sparsegpt")
    assert all(int(m.weight.count_nonzero()) == m.weight.numel() for m in (model[0], model[2]))
    with pytest.raises(ValueError, match=r"does not fit the model"):
        prune(tiny_llama(), 0.5, score="wanda", calibration=[{"input_ids": torch.randn(2, 8)}])
    conv = nn.Sequential(nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError, match=r"reads the inputs of nn.Linear and Conv1D.*0.weight"):
        prune(conv, 0.5, score="wanda", calibration=[torch.randn(1, 1, 5, 5)])


def test_init_wanda_without_calibration_is_refused_also_by_the_callbacks():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="^calibration: init='wanda' needs calibration"):
        granet.RigL(model, opt, sparsity=0.5, init="wanda", total_steps=10)
    with pytest.raises(ValueError, match="^calibration is read only by init='wanda'"):
        granet.RigL(model, opt, sparsity=0.5, calibration=[torch.randn(2, 12)], total_steps=10)
    from granet.integrations.hf import GraNetCallback

    with pytest.raises(ValueError, match="^calibration: init='wanda' needs calibration"):
        GraNetCallback("rigl", init="wanda")


def test_the_command_line_refuses_init_wanda_in_one_line(tmp_path, capsys):
    from granet.cli import main

    argv = ["train", "--dataset", "synthetic", "--model", "lenet5", "--epochs", "1"]
    assert main([*argv, "--init", "wanda", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("error: calibration: init='wanda' needs calibration batches "
                            "(model inputs, from Python)")  # fmt: skip


def test_row_pruning_removes_the_rate_of_each_rows_remaining_weights():
    model = mlp()
    xs = [torch.randn(6, 12)]
    first = prune(model, 0.5, score="wanda", calibration=xs)
    second = prune(model, 0.5, score="wanda", calibration=xs)
    for name, mask in second.masks.items():
        assert not (mask & ~first.masks[name]).any(), name  # nothing comes back
        kept = first.masks[name].sum(1)
        assert torch.equal(mask.sum(1), kept - (kept.double() * 0.5).round().long()), name


def test_wanda_under_a_pattern_keeps_the_n_best_scores_of_every_group():
    """One-shot and init='wanda' with pattern='2:4': in every group of 4 consecutive inputs the
    2 largest |W_ij| * ||X_j||, computed here by hand in float64."""
    xs = [torch.randn(5, 12) * torch.linspace(0.1, 3, 12) for _ in range(3)]
    model = mlp()
    first = model[0].weight.detach().clone()
    score = first.double().abs() * torch.cat(xs).double().norm(dim=0)
    groups = score.view(first.shape[0], -1, 4)
    expected = torch.zeros_like(groups, dtype=torch.bool).scatter_(
        2, groups.topk(2, dim=2).indices, True
    )
    expected = expected.view(first.shape)
    pruned = prune(model, 0.5, score="wanda", calibration=xs, pattern="2:4")
    assert torch.equal(pruned.masks["0.weight"], expected)

    fresh = mlp()
    opt = torch.optim.SGD(fresh.parameters(), lr=0.1)
    sp = granet.Static(fresh, opt, pattern="2:4", init="wanda", calibration=xs, total_steps=10)
    assert torch.equal(sp.masks["0.weight"], expected)
