import io

import pytest
import torch
from helpers import SmallNet, train

import granet

KW = dict(sparsity=0.9, total_steps=40, update_every=4)


def build(method, seed=11, compute="dense"):
    torch.manual_seed(seed)
    net = SmallNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    sp = granet.sparsify(net, opt, method, compute=compute, **KW)
    return net, opt, sp


@pytest.mark.filterwarnings("ignore:granet. compute='sparse' runs these layers dense")
@pytest.mark.parametrize("compute", ["dense", "sparse"])
@pytest.mark.parametrize("method", ["granet", "set", "snfs"])
def test_bitwise_resume(method, compute):
    net, opt, sp = build(method, compute=compute)
    train(net, opt, 40)
    straight = net.state_dict()

    net, opt, sp = build(method, compute=compute)
    train(net, opt, 14)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()}, buf)

    torch.manual_seed(999)  # whatever the global RNG does in between
    torch.rand(1000)
    net2, opt2, sp2 = build(method, seed=12, compute=compute)  # fresh, other initial weights
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    net2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sp2.load_state_dict(ckpt["sp"])
    assert sp2.step == 14
    train(net2, opt2, 26, start=14)
    resumed = net2.state_dict()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    assert sp2.itop_rate() > 0


def test_saved_masks_are_bit_packed():
    net, opt, sp = build("rigl")
    state = sp.state_dict()
    for name, p in zip(sp.names, sp.params):
        packed = state["masks"][name]
        assert packed.dtype == torch.uint8
        assert packed.numel() == (p.numel() + 7) // 8


def test_load_names_missing_and_misshaped_tensors():
    net, opt, sp = build("rigl")
    state = sp.state_dict()
    missing = {**state, "masks": {k: v for k, v in state["masks"].items() if k != "fc1.weight"}}
    _, _, fresh = build("rigl")
    with pytest.raises(ValueError, match="no mask for 'fc1.weight'"):
        fresh.load_state_dict(missing)
    shaped = {**state, "shapes": {**state["shapes"], "conv2.weight": [1, 2, 3]}}
    with pytest.raises(ValueError, match=r"'conv2.weight' has shape \(1, 2, 3\)"):
        fresh.load_state_dict(shaped)


def test_state_knows_its_method_and_settings():
    _, _, sp = build("snfs")
    state = sp.state_dict()
    assert state["method"] == "SNFS"
    assert state["settings"]["sparsity"] == 0.9 and state["settings"]["growth"] == "momentum"
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True)["settings"] == state["settings"]


@pytest.mark.parametrize(
    "other, message",
    [
        (dict(method="set"), "method='SNFS' .here 'SET'., growth='momentum' .here 'random'."),
        (dict(sparsity=0.95), r"sparsity=0.9 \(here 0.95\)"),
        (dict(update_every=8), r"update_every=4 \(here 8\)"),
    ],
)
def test_a_state_of_another_run_is_refused(other, message):
    net, opt, sp = build("snfs")
    train(net, opt, 10)
    state = sp.state_dict()
    torch.manual_seed(0)
    fresh_net = SmallNet()
    fresh_opt = torch.optim.SGD(fresh_net.parameters(), lr=0.05, momentum=0.9)
    kw = {**KW, **{k: v for k, v in other.items() if k != "method"}}
    fresh = granet.sparsify(fresh_net, fresh_opt, other.get("method", "snfs"), **kw)
    with pytest.raises(ValueError, match="belongs to another run: it has " + message):
        fresh.load_state_dict(state)


def test_a_failed_load_changes_nothing():
    net, opt, sp = build("rigl")
    train(net, opt, 9)
    state = sp.state_dict()
    _, _, fresh = build("rigl", seed=3)
    masks = {n: m.clone() for n, m in fresh.masks.items()}
    broken = {**state, "masks": {**state["masks"], "fc2.weight": torch.zeros(3, dtype=torch.uint8)}}
    with pytest.raises(ValueError, match="packed mask has 3 bytes"):
        fresh.load_state_dict(broken)
    assert fresh.step == 0
    assert all(torch.equal(masks[n], m) for n, m in fresh.masks.items())
