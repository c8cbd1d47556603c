"""Every code block of docs/extending.md, run, and what it promises checked."""

from pathlib import Path

import pytest
import torch
from helpers import SmallNet, run_doc, train

import granet

DOC = Path(__file__).parents[2] / "docs" / "extending.md"
T = 60


@pytest.fixture(scope="module")
def doc() -> dict:
    """The page's definitions; each usage block builds its sparsifier once on a fresh model."""

    def stand_ins() -> dict:
        torch.manual_seed(0)
        model = SmallNet()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        # T: a run long enough for every block
        return {"granet": granet, "T": 20_000, "model": model, "optimizer": optimizer}

    return run_doc(DOC, stand_ins)  # the definitions each as a reader copies it


def fresh(method, **options):
    torch.manual_seed(0)
    net = SmallNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    return net, opt, method(net, opt, total_steps=T, update_every=5, **options)


def test_a_user_growth_score_regrows(doc):
    net, opt, sp = fresh(granet.RigL, growth=doc["gradient_or_random"])
    with pytest.warns(RuntimeWarning, match="skipped the regrowth at step 0"):
        sp.update_topology()  # no gradient yet: the score says None
    train(net, opt, 10)
    assert sp.last_round["regrown"] > 0
    assert sp.algorithm.record()["growth"].endswith("gradient_or_random")


def test_a_user_importance_score_decides_what_is_pruned(doc):
    net = torch.nn.Linear(8, 8, bias=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    sp = granet.GMP(net, opt, sparsity=0.9, total_steps=T, update_every=5, importance=doc["taylor"])
    with torch.no_grad():  # |w| and |w * g| rank the weights in opposite orders
        net.weight.copy_(torch.arange(1.0, 65.0).view(8, 8))
    net.weight.grad = 1.0 / torch.arange(1.0, 65.0).view(8, 8) ** 2
    taylor = doc["taylor"](net.weight.detach().clone(), net.weight.grad)
    sp.step = 10
    sp.update_topology()
    kept = sp.masks["weight"]
    assert 0 < int(kept.sum()) < 64
    assert taylor[kept].min() > taylor[~kept].max()  # the smallest weights survived


def test_a_user_schedule_is_followed(doc):
    net, opt, sp = fresh(
        granet.GraNet,
        sparsity=0.9,
        init_sparsity=0.5,
        sparsity_schedule=lambda step: min(0.9, 0.5 + 0.1 * (step // 10)),
        regrow_schedule=doc["constant_regrowth"],
    )
    n = sum(p.numel() for p in sp.params)
    for start in range(0, 50, 10):
        train(net, opt, 10, start)
        expected = min(0.9, 0.5 + 0.1 * (sp.step // 10))
        assert sum(int(m.sum()) for m in sp.masks.values()) == round((1 - expected) * n)
    assert sp.stats()["regrow_fraction"] == 0.2
    assert doc["staircase"](0) == 0.5 and doc["staircase"](10_000) == 0.9


def test_a_stateful_score_observes_steps_and_is_saved(doc):
    net, opt, sp = fresh(granet.RigL, growth=doc["AccumulatedGradient"]())
    train(net, opt, 7)
    saved = sp.state_dict()["scores"]["growth"]["sums"]
    assert len(saved) == len(sp.params) and all(
        s.shape == p.shape for s, p in zip(saved, sp.params)
    )
    net2, opt2, sp2 = fresh(granet.RigL, growth=doc["AccumulatedGradient"]())
    sp2.load_state_dict({**sp.state_dict(), "settings": sp2.state_dict()["settings"]})
    assert all(torch.equal(a, b) for a, b in zip(sp2.growth.sums, saved))


def test_a_method_is_a_subclass_with_defaults(doc):
    net, opt, sp = fresh(doc["GraNetUniform"])
    assert sp.algorithm.pruning == "uniform" and sp.algorithm.init_sparsity == 0.5
