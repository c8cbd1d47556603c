import pytest
import torch
from helpers import train
from torch import nn

import granet
from granet.initial import INIT, existing_init, magnitude_init, random_init

KW = dict(total_steps=40, update_every=5)


def test_initial_masks_have_their_counts():
    params = [torch.randn(6, 5), torch.randn(4, 3)]
    gen = torch.Generator().manual_seed(0)
    for init in (random_init, magnitude_init):
        assert [int(m.sum()) for m in init(params, [7, 12], gen)] == [7, 12]
    top = magnitude_init(params, [3, 0], gen)[0]
    assert params[0].abs()[top].min() >= params[0].abs()[~top].max()
    params[0][0] = 0.0
    assert torch.equal(existing_init(params, [0, 0], gen)[0], params[0] != 0)
    assert list(INIT) == ["random", "magnitude", "existing", "wanda"]


def pruned_mlp(sparsity: float = 0.8) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        for layer in (net[0], net[2]):
            w = layer.weight
            w.mul_(w.abs() > w.abs().flatten().quantile(sparsity))
    return net


def step(net, opt, i):
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g)
    opt.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    opt.step()


def test_existing_masks_keep_a_pruned_models_sparsity_under_rigl():
    net = pruned_mlp()
    zeros = {n: (p == 0).clone() for n, p in net.named_parameters() if n.endswith("weight")}
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sp = granet.RigL(net, opt, init="existing", **KW)
    for name, mask in sp.masks.items():
        assert torch.equal(mask, ~zeros[name])  # exactly the checkpoint's pattern
    start = sp.sparsity()
    assert start == pytest.approx(0.8, abs=0.01) and sp.algorithm.sparsity == start
    for i in range(40):
        step(net, opt, i)
    assert sp.last_round["regrown"] > 0  # positions moved ...
    assert sp.sparsity() == start  # ... the density did not
    for name, p in zip(sp.names, sp.params):
        assert not p[~sp.masks[name]].any()


def test_existing_masks_start_granet_at_the_models_sparsity():
    net = pruned_mlp(0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    sp = granet.GraNet(net, opt, init="existing", sparsity=0.9, **KW)
    assert sp.algorithm.init_sparsity == pytest.approx(0.5, abs=0.01)
    for i in range(40):
        step(net, opt, i)
    assert sp.sparsity() == pytest.approx(0.9, abs=1e-3)
    sp.remove()
    with pytest.raises(ValueError, match="below the model's existing sparsity"):
        granet.GraNet(net, opt, init="existing", sparsity=0.5, **KW)
    with pytest.raises(ValueError, match="contradicts init='existing'"):
        granet.GraNet(net, opt, init="existing", init_sparsity=0.2, **KW)


def test_magnitude_masks_keep_each_layers_largest_weights(net):
    weights = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    sp = granet.RigL(net, opt, init="magnitude", sparsity=0.9, **KW)
    for name, mask in sp.masks.items():
        w = weights[name].abs()
        assert w[mask].min() >= w[~mask].max()
    train(net, opt, 3)
