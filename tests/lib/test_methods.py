import pytest
import torch
from helpers import SmallNet, batch, masked_zero, train
from torch import nn

import granet

KW = dict(total_steps=60, update_every=5)


def test_a_method_is_its_defaults():
    own = {name: cls.defaults for name, cls in granet.METHODS.items()}
    assert own["granet"] == {"init_sparsity": 0.5, "regrow_fraction": 0.5, "growth": "gradient"}
    assert own["gmp"] == {"init_sparsity": 0.0, "regrow_fraction": 0.0, "growth": "gradient"}
    assert own["rigl"] == {"init_sparsity": None, "regrow_fraction": 0.5, "growth": "gradient"}
    assert own["set"]["growth"] == "random" and own["snfs"]["growth"] == "momentum"
    assert own["static"]["regrow_fraction"] == 0.0
    resolved = granet.RigL.resolve(sparsity=0.95)
    assert resolved.init_sparsity == 0.95  # None: start at the final sparsity
    assert granet.GraNet.resolve(sparsity=0.3).init_sparsity == 0.3  # never above the final
    assert granet.GMP.resolve(regrow_fraction=0.2).regrow_fraction == 0.2  # given wins


def test_a_new_method_is_a_few_lines(net):
    class Pruner(granet.GMP):
        defaults = {"pruning": "uniform"}  # any option can have a method default

    assert Pruner.defaults["init_sparsity"] == 0.0  # the parent's, merged
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = Pruner(net, opt, **KW)
    assert sp.algorithm.pruning == "uniform" and sp.algorithm.regrow_fraction == 0.0


def test_granet_without_regrowth_from_dense_is_gmp():
    results = []
    for cls, kw in [
        (granet.GraNet, dict(init_sparsity=0.0, regrow_fraction=0.0)),
        (granet.GMP, {}),
    ]:
        torch.manual_seed(3)
        net = SmallNet()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        sp = cls(net, opt, sparsity=0.9, **KW, **kw)
        train(net, opt, 60)
        results.append(({n: m.clone() for n, m in sp.masks.items()}, net.state_dict()))
    (m1, w1), (m2, w2) = results
    assert all(torch.equal(m1[n], m2[n]) for n in m1)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_granet_with_init_equal_final_is_rigl():
    results = []
    for cls, kw in [(granet.GraNet, dict(init_sparsity=0.9)), (granet.RigL, {})]:
        torch.manual_seed(4)
        net = SmallNet()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        sp = cls(net, opt, sparsity=0.9, **KW, **kw)
        train(net, opt, 40)
        results.append({n: m.clone() for n, m in sp.masks.items()})
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


def test_static_masks_never_change(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = granet.Static(net, opt, sparsity=0.9, **KW)
    masks = {n: m.clone() for n, m in sp.masks.items()}
    train(net, opt, 30)
    assert all(torch.equal(masks[n], m) for n, m in sp.masks.items())
    assert sp.stats()["next_update"] is None
    assert sp.itop_rate() == pytest.approx(1 - sp.sparsity())


def test_random_growth_ignores_global_rng(net):
    def run(noise):
        torch.manual_seed(5)
        net = SmallNet()
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        sp = granet.SET(net, opt, sparsity=0.9, seed=7, **KW)
        for i in range(20):
            train(net, opt, 1, i)
            if noise:
                torch.rand(100)
        return sp.masks

    a, b = run(False), run(True)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_snfs_grows_by_momentum(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sp = granet.SNFS(net, opt, sparsity=0.9, **KW)
    assert sp.growth.beta == 0.9
    train(net, opt, 20)
    assert sp.last_round["regrown"] > 0
    masked_zero(sp, opt)


def test_sparsify_rejects_unknown_method(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(
        ValueError, match="method must be one of granet, gmp, rigl, set, snfs, static"
    ):
        granet.sparsify(net, opt, "magic", total_steps=10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.half])
def test_snfs_survives_a_change_of_precision_mid_run(net, dtype):
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sp = granet.SNFS(net, opt, sparsity=0.9, **KW)
    train(net, opt, 7)
    net.to(dtype)
    for i in range(7, 16):
        x, y = batch(i)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x.to(dtype)).float(), y).backward()
        opt.step()
    assert sp.step == 16 and sp.last_round["regrown"] > 0
    assert all(b.dtype == dtype for b in sp.growth.buffers)
    for name, p in zip(sp.names, sp.params):
        assert not p[~sp.masks[name]].any()
