"""The round the host never waits on (the GPU path), checked on CPU.

On a GPU the sparsifier reads a round's results back at the next round instead of at once, and
per-layer counts that only the device knows select by rank. Setting ``_reads_free = False``
takes that path on CPU, where it must give the same masks and statistics as the immediate one.
"""

import pytest
import torch
from helpers import SmallNet, batch, train

import granet

KW = dict(total_steps=60, update_every=5)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def deferred(sp):
    sp._reads_free = False
    return sp


@pytest.mark.parametrize("pruning", ["global", "uniform"])
@pytest.mark.parametrize("method", ["granet", "set", "snfs"])
def test_deferred_rounds_match_immediate_ones(method, pruning):
    runs = []
    for defer in (False, True):
        torch.manual_seed(0)
        net = SmallNet()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        sp = granet.sparsify(net, opt, method, sparsity=0.9, pruning=pruning, seed=3, **KW)
        runs.append((net, opt, deferred(sp) if defer else sp))
    for start in range(0, 50, 5):
        history = []
        for net, opt, sp in runs:
            train(net, opt, 5, start)
            history.append(({n: m.clone() for n, m in sp.masks.items()}, sp.stats()))
        (masks_a, stats_a), (masks_b, stats_b) = history
        assert all(torch.equal(masks_a[n], masks_b[n]) for n in masks_a), start
        assert stats_a == stats_b, start
    assert stats_a["last_round"]["dropped"] > 0
    assert runs[1][2]._pending is None  # stats() took the last round in


def test_deferred_round_on_non_finite_weights_keeps_masks_and_warns_later():
    torch.manual_seed(0)
    net = SmallNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = deferred(granet.GraNet(net, opt, sparsity=0.9, **KW))
    train(net, opt, 4)
    with torch.no_grad():
        net.fc1.weight[0, 0] = float("nan")
    masks = {n: m.clone() for n, m in sp.masks.items()}
    before = sp.stats()
    sp.update_topology()  # nothing read back yet: no warning
    assert all(torch.equal(masks[n], m) for n, m in sp.masks.items())
    with pytest.warns(RuntimeWarning, match="step 4: non-finite weights in fc1.weight"):
        after = sp.stats()
    assert after["layers"] == before["layers"]
    assert after["last_round"] == before["last_round"]


@CUDA
def test_cuda_round_makes_no_host_sync():
    torch.manual_seed(0)
    net = SmallNet().cuda()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sp = granet.GraNet(net, opt, sparsity=0.9, **KW)
    x = torch.randn(16, 1, 8, 8, device="cuda")
    y = torch.randint(0, 10, (16,), device="cuda")
    for _ in range(3):  # drop-and-regrow rounds (steps 1-3 are before the first pruning one)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        sp.update_topology()
    torch.cuda.synchronize()
    sp.step = 10  # mid gradual phase: a pruning round with per-layer counts only on the GPU
    torch.cuda.set_sync_debug_mode("error")
    try:
        sp.update_topology()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sp.last_round["pruned"] > 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("method", ["granet", "rigl", "set", "snfs"])
def test_deferred_rounds_hold_the_schedule_and_the_counts(method, device):
    torch.manual_seed(0)
    net = SmallNet().to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sp = deferred(granet.sparsify(net, opt, method, sparsity=0.9, **KW))
    for start in range(0, 50, 5):
        counts = {n: int(m.sum()) for n, m in sp.masks.items()}
        for i in range(start, start + 5):
            x, y = batch(i)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x.to(device)), y.to(device)).backward()
            opt.step()
        stats = sp.stats()
        rounding = len(sp.params) / sum(p.numel() for p in sp.params)  # ERK's, per layer
        assert stats["sparsity"] == pytest.approx(sp.sparsity_schedule(sp.step), abs=rounding)
        for n, m in sp.masks.items():
            assert stats["layers"][n]["nnz"] == int(m.sum())
            assert not net.get_parameter(n)[~m].any()
            if not sp.sparsity_schedule.prunes_at(sp.step):
                assert int(m.sum()) == counts[n]  # drop and regrow keep each layer's count
    assert sp.last_round["dropped"] > 0
