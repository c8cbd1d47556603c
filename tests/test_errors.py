import pytest
import torch
from torch import nn

import granet


@pytest.fixture
def pair():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    return net, torch.optim.SGD(net.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity=1.0), r"sparsity must be in \[0, 1\); got 1.0"),
        (dict(sparsity=-0.1), r"sparsity must be in \[0, 1\)"),
        (dict(sparsity=0.8, init_sparsity=0.9), r"init_sparsity must be in \[0, sparsity=0.8\]"),
        (dict(total_steps=0), "total_steps must be an integer >= 1"),
        (dict(total_steps=None), "total_steps must be an integer >= 1"),
        (dict(prune_start=0.5, prune_end=0.5), "prune_end .* must come after prune_start"),
        (dict(prune_start=50, prune_end=10), "prune_end .* must come after prune_start"),
        (dict(prune_end=1.5), r"prune_end must be in \[0, 1\] as a fraction of total_steps"),
        (dict(prune_end="half"), "prune_end must be a float fraction"),
        (dict(update_every=0), "update_every must be an integer >= 1"),
        (dict(regrow_fraction=2.0), r"regrow_fraction must be in \[0, 1\]"),
        (dict(distribution="erdos"), "distribution must be one of uniform, er, erk, global"),
        (dict(pruning="local"), "pruning must be one of global, uniform"),
        (dict(growth="magic"), "growth must be one of gradient, momentum, random"),
        (dict(include=["nothing.*"]), "no sparse tensors selected"),
        (dict(include=[42]), "must be nn.Module subclasses or name patterns"),
    ],
)
def test_bad_arguments_name_themselves(pair, kwargs, message):
    net, opt = pair
    kwargs = {"total_steps": 100, **kwargs}
    with pytest.raises(ValueError, match=message):
        granet.GraNet(net, opt, **kwargs)


def test_optimizer_must_hold_the_sparse_parameters(pair):
    net, _ = pair
    opt = torch.optim.SGD(net[0].parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"does not hold these sparse parameters: \['2.weight'\]"):
        granet.RigL(net, opt, total_steps=10)


def test_defaults_never_exceed_the_final_sparsity(pair):
    net, opt = pair
    sp = granet.GraNet(net, opt, sparsity=0.3, total_steps=10)
    assert sp.algorithm.init_sparsity == 0.3
