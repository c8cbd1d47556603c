import math
import warnings

import pytest
import torch
from helpers import SmallNet, batch, masked_zero, train
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import granet
from granet.masks import unpack_bits

KW = dict(total_steps=60, update_every=5)


def test_default_selection_is_conv_and_linear_weights(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = granet.GraNet(net, opt, **KW)
    assert sp.names == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


def test_include_exclude_by_type_and_pattern(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = granet.RigL(net, opt, exclude=["conv1.*", "fc2.weight"], **KW)
    assert sp.names == ["conv2.weight", "fc1.weight"]
    sp.remove()
    sp = granet.RigL(net, opt, include=[nn.Linear, "conv2.weight"], **KW)
    assert sp.names == ["conv2.weight", "fc1.weight", "fc2.weight"]
    sp.remove()
    sp = granet.RigL(net, opt, include=[nn.Conv2d], exclude=[nn.Linear], **KW)
    assert sp.names == ["conv1.weight", "conv2.weight"]


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
        lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.01),
        lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True),
    ],
    ids=["sgd", "adamw", "adam-amsgrad"],
)
@pytest.mark.parametrize("method", ["granet", "rigl", "set", "snfs"])
def test_masked_weights_and_state_stay_zero(net, make_opt, method):
    opt = make_opt(net.parameters())
    sp = granet.sparsify(net, opt, method, sparsity=0.8, **KW)
    for start in range(0, 40, 4):
        train(net, opt, 4, start)
        masked_zero(sp, opt)


def test_regrown_weights_start_at_zero_with_zero_state(net):
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sp = granet.RigL(net, opt, sparsity=0.8, total_steps=100, update_every=10)
    train(net, opt, 9)
    before = {n: m.clone() for n, m in sp.masks.items()}
    train(net, opt, 1, 9)  # step 10: update round
    assert sp.last_round["regrown"] > 0
    grown = 0
    for name, p in zip(sp.names, sp.params):
        new = sp.masks[name] & ~before[name]
        grown += int(new.sum())
        assert not p[new].any()
        assert not opt.state[p]["exp_avg"][new].any()
        assert not opt.state[p]["exp_avg_sq"][new].any()
    assert grown > 0


def test_drop_and_regrow_keeps_every_layer_count(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sp = granet.RigL(net, opt, sparsity=0.9, **KW)
    counts = {n: int(m.sum()) for n, m in sp.masks.items()}
    masks = {n: m.clone() for n, m in sp.masks.items()}
    train(net, opt, 30)
    assert {n: int(m.sum()) for n, m in sp.masks.items()} == counts
    assert any(not torch.equal(masks[n], m) for n, m in sp.masks.items())
    assert sp.itop_rate() > 1 - sp.sparsity()


def test_granet_follows_the_schedule_exactly():
    torch.manual_seed(1)
    net = SmallNet(channels=8, hidden=64)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sp = granet.GraNet(
        net, opt, sparsity=0.95, init_sparsity=0.5, total_steps=100, prune_end=0.6, update_every=10
    )
    n = sum(p.numel() for p in sp.params)
    for start in range(0, 100, 10):
        train(net, opt, 10, start)
        target = sp.sparsity_schedule(sp.step)
        nnz = sum(int(m.sum()) for m in sp.masks.values())
        assert nnz == round((1 - target) * n)
        assert sp.sparsity() == pytest.approx(1 - nnz / n)
    assert sp.sparsity() == pytest.approx(0.95, abs=1 / n)


def test_uniform_pruning_takes_every_layer_to_the_target_of_its_own_size():
    # the reference's GraNet_uniform: layer l keeps numel_l - floor(s_t * numel_l) weights,
    # and a layer the distribution made sparser than that keeps what it has
    torch.manual_seed(2)
    net = SmallNet(channels=8, hidden=64)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    sp = granet.GraNet(
        net,
        opt,
        sparsity=0.9,
        init_sparsity=0.5,
        pruning="uniform",
        regrow_fraction=0.0,
        total_steps=40,
        update_every=10,
        prune_end=20,
    )
    start = {n: int(m.sum()) for n, m in sp.masks.items()}
    train(net, opt, 40)
    for name, mask in sp.masks.items():
        numel = mask.numel()
        assert int(mask.sum()) == min(start[name], numel - math.floor(0.9 * numel)), name


def test_gradient_accumulation_counts_optimizer_steps(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = granet.RigL(net, opt, sparsity=0.8, **KW)
    for i in range(12):
        opt.zero_grad()
        for j in range(3):
            x, y = batch(10 * i + j)
            (nn.functional.cross_entropy(net(x), y) / 3).backward()
        opt.step()
    assert sp.step == 12
    assert sp.last_round["dropped"] > 0  # rounds at steps 5 and 10


def test_grad_scaler_skipped_step_does_not_count(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = granet.RigL(net, opt, sparsity=0.8, **KW)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    x, y = batch(0)
    loss = nn.functional.cross_entropy(net(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert sp.step == 1
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(net(x), y) * float("inf")).backward()
    scaler.step(opt)  # inf gradients: the optimizer step is skipped
    scaler.update()
    assert sp.step == 1


def test_fused_optimizer_skipped_by_grad_scaler_does_not_count(net):
    # GradScaler calls a fused optimizer even for inf gradients, passing ``found_inf``.
    opt = torch.optim.SGD(net.parameters(), lr=0.1, fused=True)
    sp = granet.RigL(net, opt, sparsity=0.8, **KW)
    scaler = torch.amp.GradScaler("cpu")
    x, y = batch(0)
    for factor in (1.0, float("inf"), 1.0):
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(net(x), y) * factor).backward()
        scaler.step(opt)
        scaler.update()
    assert sp.step == 2


def test_channels_last_weights(net):
    net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sp = granet.GraNet(net, opt, sparsity=0.9, **KW)
    train(net, opt, 40)
    assert net.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    masked_zero(sp, opt)
    n = sum(p.numel() for p in sp.params)
    assert sum(int((p != 0).sum()) for p in sp.params) <= round((1 - sp.sparsity_schedule(40)) * n)


def test_missing_gradient_skips_the_round_with_a_warning(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = granet.RigL(net, opt, sparsity=0.8, **KW)
    masks = {n: m.clone() for n, m in sp.masks.items()}
    with pytest.warns(RuntimeWarning, match="gave no scores for conv1.weight"):
        sp.update_topology()
    assert all(torch.equal(masks[n], m) for n, m in sp.masks.items())


def test_nan_weights_skip_the_round_with_a_warning(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = granet.GraNet(net, opt, sparsity=0.9, **KW)
    train(net, opt, 4)
    with torch.no_grad():
        net.fc1.weight[0, 0] = float("nan")
    masks = {n: m.clone() for n, m in sp.masks.items()}
    with pytest.warns(RuntimeWarning, match="non-finite weights in fc1.weight"):
        sp.update_topology()
    assert all(torch.equal(masks[n], m) for n, m in sp.masks.items())


def test_stats_and_remove(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = granet.GraNet(net, opt, sparsity=0.9, **KW)
    train(net, opt, 7)
    st_ = sp.stats()
    assert st_["step"] == 7 and st_["next_update"] == 10
    assert st_["sparsity"] == pytest.approx(sp.sparsity())
    assert set(st_["last_round"]) == {"pruned", "dropped", "regrown"}
    assert st_["layers"]["fc1.weight"]["numel"] == net.fc1.weight.numel()
    assert 0 < st_["itop_rate"] <= 1
    sp.remove()
    train(net, opt, 5, 7)
    assert sp.step == 7
    assert any(((p != 0) & ~sp.masks[n]).any() for n, p in zip(sp.names, sp.params))


@settings(max_examples=15, deadline=None)
@given(
    widths=st.lists(st.integers(2, 24), min_size=1, max_size=3),
    sparsity=st.floats(0.3, 0.98),
    method=st.sampled_from(["granet", "gmp", "rigl", "set", "snfs", "static"]),
    distribution=st.sampled_from(["uniform", "er", "erk", "global"]),
    pruning=st.sampled_from(["global", "uniform"]),
)
def test_density_invariants_on_random_mlps(widths, sparsity, method, distribution, pruning):
    torch.manual_seed(0)
    dims = [12, *widths, 3]
    net = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(dims, dims[1:])])
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sp = granet.sparsify(
        net,
        opt,
        method,
        sparsity=sparsity,
        total_steps=24,
        update_every=3,
        distribution=distribution,
        pruning=pruning,
    )
    n = sum(p.numel() for p in sp.params)
    for _ in range(24):
        counts = [int(m.sum()) for m in sp.masks.values()]
        x = torch.randn(8, 12)
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
        new = [int(m.sum()) for m in sp.masks.values()]
        if not sp.sparsity_schedule.prunes_at(sp.step):
            assert new == counts  # drop-and-regrow keeps every layer's count
        else:
            target = sp.sparsity_schedule(sp.step)
            if pruning == "global":
                assert sum(new) in (round((1 - target) * n), sum(counts))
            else:  # every layer to the target of its own size, or left as sparse as it was
                sizes = [m.numel() for m in sp.masks.values()]
                assert new == [min(c, k - math.floor(target * k)) for c, k in zip(counts, sizes)]
        for name, p in zip(sp.names, sp.params):
            assert not p[~sp.masks[name]].any()
    assert abs(sp.sparsity() - sparsity) <= len(sp.params) / n + 1e-9


def test_packed_ever_active_matches_masks(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = granet.SET(net, opt, sparsity=0.9, **KW)
    union = {n: m.clone() for n, m in sp.masks.items()}
    for start in range(0, 30, 5):
        train(net, opt, 5, start)
        for n, m in sp.masks.items():
            union[n] |= m
    saved = sp.state_dict()["ever_active"]
    for n, p in zip(sp.names, sp.params):
        assert torch.equal(unpack_bits(saved[n], p.shape), union[n])
    total = sum(int(u.sum()) for u in union.values())
    assert sp.itop_rate() == pytest.approx(total / sum(p.numel() for p in sp.params))
    assert math.isclose(sp.stats()["itop_rate"], sp.itop_rate())
    warnings.simplefilter("default")


def test_works_with_a_compiled_model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    sp = granet.GraNet(net, opt, sparsity=0.9, total_steps=40, update_every=5)
    compiled = torch.compile(net)
    for i in range(40):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(compiled(x), y).backward()
        opt.step()
    masked_zero(sp, opt)
    assert sp.step == 40
    assert sp.sparsity() == pytest.approx(0.9, abs=1e-3)


def test_scale_init_scales_each_layer_for_its_sparse_fan_in():
    def build(scale):
        torch.manual_seed(0)
        net = SmallNet()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        return net, granet.Static(net, opt, sparsity=0.9, scale_init=scale, **KW)

    (plain, sp_plain), (scaled, sp_scaled) = build(False), build(True)
    for name, mask in sp_scaled.masks.items():
        assert torch.equal(mask, sp_plain.masks[name])
        gain = math.sqrt(mask.numel() / int(mask.sum()))
        w, w0 = scaled.get_parameter(name), plain.get_parameter(name)
        assert torch.allclose(w, w0 * gain) and not w[~mask].any()
    assert torch.equal(scaled.fc1.bias, plain.fc1.bias)  # dense tensors are left alone


# ------------------------------------------------------------- the reference's round, exactly
def test_a_weight_pruned_and_regrown_in_one_round_restarts_at_zero():
    torch.manual_seed(0)
    net = SmallNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    # huge regrowth: many weights pruned by the gradual prune come straight back by gradient
    sp = granet.GraNet(net, opt, sparsity=0.9, init_sparsity=0.0, regrow_fraction=1.0, **KW)
    train(net, opt, 4)
    before = {n: m.clone() for n, m in sp.masks.items()}
    values = {n: p.detach().clone() for n, p in zip(sp.names, sp.params)}
    train(net, opt, 1, 4)  # step 5: prune, drop and regrow
    assert sp.last_round["pruned"] > 0
    back = 0
    for name, p in zip(sp.names, sp.params):
        kept = before[name] & sp.masks[name] & (p.detach() == 0) & (values[name] != 0)
        back += int(kept.sum())
        restarted = before[name] & sp.masks[name] & (p.detach() == 0)
        assert not opt.state[p]["momentum_buffer"][restarted].any()
    assert back > 0  # pruned, regrown, and restarted from zero


def test_granet_makes_no_topology_change_before_prune_start(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sp = granet.GraNet(net, opt, sparsity=0.9, prune_start=20, prune_end=40, **KW)
    masks = {n: m.clone() for n, m in sp.masks.items()}
    assert sp.stats()["next_update"] == 20
    train(net, opt, 19)
    assert all(torch.equal(masks[n], m) for n, m in sp.masks.items())
    assert sp.last_round == {"pruned": 0, "dropped": 0, "regrown": 0}
    train(net, opt, 1, 19)
    assert sp.last_round["dropped"] > 0


def test_a_round_without_gradient_still_prunes(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = granet.GraNet(net, opt, sparsity=0.9, **KW)
    sp.step = 10  # inside the gradual phase, before any backward pass
    with pytest.warns(RuntimeWarning, match="skipped the regrowth at step 10"):
        sp.update_topology()
    n = sum(p.numel() for p in sp.params)
    assert sum(int(m.sum()) for m in sp.masks.values()) == round((1 - sp.sparsity_schedule(10)) * n)
    assert sp.last_round["pruned"] > 0 and sp.last_round["regrown"] == 0


def test_masks_reach_a_state_tensor_the_optimizer_replaced(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sp = granet.Static(net, opt, sparsity=0.9, **KW)
    train(net, opt, 2)
    for p in sp.params:  # same number of state entries, new tensors
        opt.state[p]["momentum_buffer"] = torch.ones_like(p)
    train(net, opt, 1, 2)
    masked_zero(sp, opt)


def test_a_second_sparsifier_on_held_tensors_is_refused(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = granet.RigL(net, opt, **KW)
    with pytest.raises(ValueError, match="another sparsifier already holds conv1.weight"):
        granet.GraNet(net, opt, **KW)
    granet.RigL(net, opt, include=["bn.weight"], **KW).remove()  # other tensors are free
    sp.remove()
    granet.GraNet(net, opt, **KW)


def test_a_layer_left_without_weights_is_named():
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1, bias=False))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="start leaves no active weights in 2.weight"):
        granet.Static(net, opt, sparsity=0.995, distribution="uniform", **KW)


def _half_masks(sp) -> dict[str, torch.Tensor]:
    """Masks keeping every other currently active position of each layer."""
    masks = {}
    for name, m in sp.masks.items():
        keep = m.clone().view(-1)
        keep[keep.nonzero()[::2].view(-1)] = False
        masks[name] = keep.view(m.shape)
    return masks


def test_set_masks_applies_given_masks_to_weights_and_optimizer_state(net):
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    sp = granet.RigL(net, opt, sparsity=0.5, total_steps=100, update_every=10)
    train(net, opt, 3)
    before_itop, step = sp.itop_rate(), sp.step
    masks = _half_masks(sp)
    given = {n: m.clone() for n, m in masks.items()}
    sp.set_masks(masks)
    for m in masks.values():  # the sparsifier holds copies: the caller's tensors stay theirs
        m.fill_(True)
    assert all(torch.equal(sp.masks[n], given[n]) for n in sp.names)
    masked_zero(sp, opt)
    kept = sum(int(m.sum()) for m in given.values())
    assert sp.sparsity() == 1 - kept / sum(p.numel() for p in sp.params)
    assert sp.step == step and sp.itop_rate() == before_itop  # a subset: explored already
    train(net, opt, 4, 3)  # no round before step 10: the set masks hold while training
    assert all(torch.equal(sp.masks[n], given[n]) for n in sp.names)
    masked_zero(sp, opt)


def test_set_masks_adds_new_positions_to_the_explored_ones(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = granet.SET(net, opt, sparsity=0.9, **KW)
    old = {n: m.clone() for n, m in sp.masks.items()}
    new = {n: torch.roll(m, 1, dims=-1) for n, m in old.items()}
    sp.set_masks(new)
    union = sum(int((old[n] | new[n]).sum()) for n in sp.names)
    assert sp.itop_rate() == union / sum(p.numel() for p in sp.params)


def test_set_masks_at_a_step_starts_the_sparsifier_over_there(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = granet.RigL(net, opt, sparsity=0.5, total_steps=100, update_every=10)
    train(net, opt, 10)  # one round: explored positions beyond the masks
    assert sp.itop_rate() > 0.5
    masks = _half_masks(sp)
    sp.set_masks(masks, step=42)
    assert sp.step == 42 and sp.next_update() == 50
    kept = sum(int(m.sum()) for m in masks.values())
    assert sp.itop_rate() == kept / sum(p.numel() for p in sp.params)  # the whole record
    assert sp.last_round == {"pruned": 0, "dropped": 0, "regrown": 0}
    state = sp.state_dict()
    assert state["step"] == 42
    for n, p in zip(sp.names, sp.params):
        assert torch.equal(unpack_bits(state["ever_active"][n], p.shape), masks[n])


def test_set_masks_refuses_bad_masks_in_one_line_and_changes_nothing(net):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = granet.RigL(net, opt, sparsity=0.5, **KW)
    good = _half_masks(sp)
    first = next(iter(good))
    before = {n: m.clone() for n, m in sp.masks.items()}
    weights = [p.detach().clone() for p in sp.params]
    bad = [
        ({n: m for n, m in good.items() if n != first}, "needs a mask for each of"),
        ({**good, "bn.weight": torch.ones(6, dtype=torch.bool)}, "needs a mask for each of"),
        (list(good.values()), "needs a mask for each of .*; got list"),
        ({**good, first: good[first].float()}, f"the mask for '{first}' must be bool"),
        ({**good, first: good[first].reshape(-1)}, f"the mask for '{first}' must be bool"),
        ({**good, first: None}, f"the mask for '{first}' must be bool .*; got NoneType"),
    ]
    for masks, message in bad:
        with pytest.raises(ValueError, match=message) as caught:
            sp.set_masks(masks)
        assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        sp.set_masks(good, step=-1)
    assert all(torch.equal(sp.masks[n], before[n]) for n in sp.names)
    assert all(torch.equal(p, w) for p, w in zip(sp.params, weights))
    assert sp.step == 0


def test_set_masks_refuses_masks_that_break_the_pattern():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = granet.sparsify(model, opt, "static", pattern="2:4", total_steps=10)
    before = {n: m.clone() for n, m in sp.masks.items()}
    dense_row = {n: m.clone() for n, m in sp.masks.items()}
    dense_row["0.weight"][0, :4] = True  # 4 of a group of 4 active
    with pytest.raises(ValueError, match=r"the mask for '0.weight' breaks pattern='2:4'"):
        sp.set_masks(dense_row)
    assert all(torch.equal(sp.masks[n], before[n]) for n in sp.names)
    other = {n: ~m for n, m in sp.masks.items()}  # the other 2 of every group of 4
    sp.set_masks(other)
    assert all(torch.equal(sp.masks[n], other[n]) for n in sp.names)
