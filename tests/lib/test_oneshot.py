import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from granet.oneshot import Pruned, prune, prune_masks, regrow, regrow_masks


def weights(seed: int = 0, zeros: float = 0.0) -> list[torch.Tensor]:
    """Three tensors of different sizes; a fraction ``zeros`` of them already zero."""
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(*shape, generator=g) for shape in ((20, 30), (7, 5, 3, 3), (40,))]
    for t in tensors:
        t.mul_(torch.rand(t.shape, generator=g) >= zeros)
    return tensors


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)
    )


@settings(max_examples=40, deadline=None)
@given(rate=st.floats(0.01, 0.99), zeros=st.sampled_from([0.0, 0.5, 0.9]), seed=st.integers(0, 99))
def test_global_prune_removes_exactly_the_fraction_of_the_remaining_weights(rate, zeros, seed):
    ws = weights(seed, zeros)
    active = [w != 0 for w in ws]
    n = sum(int(a.sum()) for a in active)
    masks = prune_masks(ws, rate, "global")
    kept = sum(int(m.sum()) for m in masks)
    assert n - kept == round(rate * n)
    assert all(not (m & ~a).any() for m, a in zip(masks, active))  # nothing comes back
    # one threshold: every kept weight is at least as large as every removed one
    kept_abs = torch.cat([w[m].abs() for w, m in zip(ws, masks)])
    removed_abs = torch.cat([w[a & ~m].abs() for w, a, m in zip(ws, active, masks)])
    if len(kept_abs) and len(removed_abs):
        assert kept_abs.min() >= removed_abs.max()


@settings(max_examples=40, deadline=None)
@given(rate=st.floats(0.01, 0.99), zeros=st.sampled_from([0.0, 0.5, 0.9]), seed=st.integers(0, 99))
def test_uniform_prune_removes_the_fraction_of_each_tensor(rate, zeros, seed):
    ws = weights(seed, zeros)
    for w, m in zip(ws, prune_masks(ws, rate, "uniform")):
        active = w != 0
        n = int(active.sum())
        assert n - int(m.sum()) == round(rate * n)
        if m.any() and (active & ~m).any():
            assert w[m].abs().min() >= w[active & ~m].abs().max()


def test_a_rate_that_removes_nothing_keeps_the_masks():
    w = torch.tensor([[0.0, 3.0, -2.0, 1.0]])
    for pruning in ("global", "uniform"):  # 0.1 x 3 rounds to 0
        assert prune_masks([w], 0.1, pruning)[0].tolist() == [[False, True, True, True]]


def test_given_masks_say_what_remains_even_at_zero():
    w = torch.tensor([[0.0, 3.0, -2.0, 0.0, 1.0, 5.0]])
    active = torch.tensor([[True, True, True, False, True, True]])  # the first: regrown at zero
    (m,) = prune_masks([w], 0.4, masks=[active])  # 5 active, 2 go: the 0.0 and the 1.0
    assert m.tolist() == [[False, True, True, False, False, True]]


def test_prune_zeroes_the_weights_and_their_optimizer_state():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    nn.functional.cross_entropy(model(torch.randn(8, 12)), torch.randint(0, 4, (8,))).backward()
    opt.step()
    biases = [model[i].bias.detach().clone() for i in (0, 2, 4)]
    pruned = prune(model, 0.75, optimizer=opt)
    assert list(pruned.masks) == ["0.weight", "2.weight", "4.weight"]
    total = sum(model[i].weight.numel() for i in (0, 2, 4))
    assert sum(pruned.removed.values()) == round(0.75 * total)
    assert pruned.sparsity() == pytest.approx(0.75, abs=1 / total)
    for i in (0, 2, 4):
        w, mask = model[i].weight, pruned.masks[f"{i}.weight"]
        assert torch.equal(w != 0, mask)
        assert not opt.state[w]["momentum_buffer"][~mask].any()
        assert opt.state[w]["momentum_buffer"][mask].any()
    assert all(torch.equal(b, model[i].bias) for b, i in zip(biases, (0, 2, 4)))


def test_prune_follows_include_exclude_and_given_masks():
    model = net()
    pruned = prune(model, 0.5, pruning="uniform", exclude=["4.*"])
    assert list(pruned.masks) == ["0.weight", "2.weight"]
    assert bool((model[4].weight != 0).all())
    again = prune(model, 0.5, pruning="uniform", exclude=["4.*"], masks=pruned.masks)
    assert again.removed == {"0.weight": 96, "2.weight": 128}  # half of 192 and of 256
    with pytest.raises(ValueError, match="masks has no mask for 2.weight"):
        prune(model, 0.5, exclude=["4.*"], masks={"0.weight": pruned.masks["0.weight"]})


def test_regrowth_keeps_the_density_and_takes_the_largest_gradients():
    model = net()
    sparse = prune(model, 0.5)  # a sparse network: half of each tensor's weights remain
    before = {n: int(m.sum()) for n, m in sparse.masks.items()}
    pruned = prune(model, 0.6, masks=sparse.masks)
    x = torch.randn(16, 12)
    out = model(x).detach()
    g = torch.Generator().manual_seed(1)
    grads = {n: torch.randn(m.shape, generator=g) for n, m in pruned.masks.items()}
    grown = regrow(pruned, grads)
    for name, mask in grown.masks.items():
        assert int(mask.sum()) == before[name]  # as many regrew as were pruned
        new = mask & ~pruned.masks[name]
        assert int(new.sum()) == pruned.removed[name]
        inactive = ~pruned.masks[name]
        assert grads[name].abs()[new].min() >= grads[name].abs()[inactive & ~mask].max()
        assert not (pruned.masks[name] & ~mask).any()
    assert grown.removed == dict.fromkeys(grown.masks, 0)
    assert torch.equal(model(x).detach(), out)  # regrown weights are zero: nothing changes


def test_regrowth_of_a_dense_network_brings_back_the_pruned_positions():
    model = net()
    pruned = prune(model, 0.3)
    grads = {n: torch.ones(m.shape) for n, m in pruned.masks.items()}
    grown = regrow(pruned, grads)
    assert all(bool(m.all()) for m in grown.masks.values())
    assert grown.sparsity() == 0.0


@pytest.mark.parametrize("rate", [0, 1, 1.5, -0.1, math.nan, True, "0.5"])
def test_rates_outside_the_open_unit_interval_are_refused(rate):
    with pytest.raises(ValueError, match="rate must be"):
        prune_masks(weights(), rate)


def test_bad_input_is_refused_naming_it():
    with pytest.raises(
        ValueError, match="pruning must be one of global, uniform, row; got 'layer'"
    ):
        prune_masks(weights(), 0.5, "layer")
    with pytest.raises(ValueError, match="one mask per weight"):
        prune_masks(weights(), 0.5, masks=[torch.ones(3, dtype=torch.bool)])
    m = torch.tensor([True, False, True])
    with pytest.raises(ValueError, match="cannot regrow 2 connections where 1 are inactive"):
        regrow_masks([m], [torch.ones(3)], [2])
    pruned = Pruned({"w": m}, {"w": 1})
    with pytest.raises(ValueError, match="grads has no gradient for w"):
        regrow(pruned, {})
    with pytest.raises(ValueError, match="no sparse tensors selected"):
        prune(nn.Sequential(nn.ReLU()), 0.5)
