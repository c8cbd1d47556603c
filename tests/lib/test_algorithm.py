import dataclasses

import pytest
import torch
from torch import nn

import granet
from granet.algorithm import OPTIONS, Algorithm


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
        (dict(sparsity="0.9"), "sparsity must be a number"),
        (dict(total_steps=1.5), "total_steps must be an integer"),
        (dict(total_steps=float("inf")), "total_steps must be an integer"),
        (dict(seed="a"), "seed must be an integer; got 'a'"),
        (dict(scale_init=1), "scale_init must be True or False"),
        (dict(include="fc.*"), "include must be a list of rules; got the single rule 'fc.*'"),
        (dict(exclude=nn.Linear), "exclude must be a list of rules"),
        (dict(importance="taylor"), "importance must be one of magnitude; got 'taylor'"),
        (dict(init="warm"), "init must be one of random, magnitude, existing"),
        (dict(sparsity_schedule=0.9), "sparsity_schedule must be a callable"),
        (dict(sparsty=0.9), "unknown option.s. sparsty; known: sparsity, "),
        (dict(prune_end=200), r"prune_end \(200\) lies beyond total_steps \(100\)"),
        (dict(update_every=100), "the schedule never reaches sparsity=0.9"),
        (dict(update_every=50, prune_end=1.0), "its last pruning round would be step 100, but"),
        (dict(sparsity_schedule=lambda step: 0.5), "sparsity_schedule reaches only 0.5"),
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


def test_a_schedule_that_reaches_the_target_in_its_last_round_is_accepted(pair):
    net, opt = pair
    sp = granet.GraNet(net, opt, total_steps=100, update_every=60, prune_end=0.6)
    assert sp.sparsity_schedule(60) == 0.9
    sp.remove()
    granet.RigL(net, opt, total_steps=100, update_every=100)  # no gradual phase: nothing to reach


def test_every_option_is_declared_with_help_and_a_check():
    assert [o.name for o in OPTIONS] == [f.name for f in dataclasses.fields(Algorithm)]
    for option in OPTIONS:
        assert option.help and option.check(option.name, option.default) == option.default
        if option.choices:
            assert option.default is None or option.default in option.choices
    assert {o.name for o in OPTIONS if not o.cli} == {
        "total_steps",
        "sparsity_schedule",
        "regrow_schedule",
    }


def test_an_algorithm_is_a_value_that_records_itself():
    alg = Algorithm(sparsity=0.95, growth=lambda w, g, **c: g.abs(), total_steps=10)
    assert alg == dataclasses.replace(alg)
    record = alg.record()
    assert record["sparsity"] == 0.95 and record["growth"].endswith("<lambda>")
    with pytest.raises(dataclasses.FrozenInstanceError):
        alg.sparsity = 0.5


def test_a_sparsifier_takes_an_algorithm_value(pair):
    net, opt = pair
    alg = Algorithm(sparsity=0.8, update_every=5, total_steps=50)
    sp = granet.SET(net, opt, alg, seed=3)
    assert sp.algorithm.sparsity == 0.8 and sp.algorithm.seed == 3
    assert sp.algorithm.growth == "random"  # None in the value: the method's own
    with pytest.raises(ValueError, match="algorithm must be a granet.Algorithm"):
        granet.SET(net, opt, 0.9, total_steps=10)
