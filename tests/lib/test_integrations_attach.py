"""What the framework callbacks share: early option checks, resuming on restored weights without
disturbing them (init="existing" included), the cached log scalars; no framework imported."""

import copy
import subprocess
import sys

import pytest
import torch
from helpers import SmallNet, train

import granet
from granet.checksum import checked, state_digest, with_checksum
from granet.experiment import checkpoints
from granet.integrations.attach import Scalars, SparsifierHolder, attach, method_class

KW = dict(sparsity=0.8, update_every=4)
T = 24


class Wrapped:
    """An optimizer wrapper of the kind frameworks hand over (accelerate, Lightning)."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer


def pruned_net() -> SmallNet:
    torch.manual_seed(0)
    net = SmallNet()
    with torch.no_grad():
        for p in (net.conv2.weight, net.fc1.weight, net.fc2.weight):
            p.mul_(p.abs() > p.abs().flatten().quantile(0.7))
    return net


@pytest.mark.parametrize(
    "method, options",
    [
        ("granet", {"sparsity": 0.8}),
        ("rigl", {"init": "existing"}),
        ("granet", {"init": "existing", "sparsity": 0.8}),
    ],
)
def test_resuming_on_restored_weights_continues_the_run_exactly(method, options):
    cls = method_class(method, options)
    net = pruned_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sp = attach(cls, net, Wrapped(opt), T, {**options, "update_every": 4})
    train(net, opt, 10)
    saved = copy.deepcopy((net.state_dict(), opt.state_dict(), sp.state_dict()))
    train(net, opt, T - 10, 10)

    # the framework restores the model and optimizer, then the callback attaches
    net2 = SmallNet()
    net2.load_state_dict(saved[0])
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(saved[1])
    restored = copy.deepcopy((net2.state_dict(), opt2.state_dict()["state"]))
    sp2 = attach(cls, net2, Wrapped(opt2), T, {**options, "update_every": 4}, saved[2])
    for (name, p), q in zip(net2.state_dict().items(), restored[0].values()):
        assert torch.equal(p, q), name  # nothing the framework restored was touched
    for key, state in opt2.state_dict()["state"].items():
        assert torch.equal(state["momentum_buffer"], restored[1][key]["momentum_buffer"])
    train(net2, opt2, T - 10, 10)
    assert sp2.step == sp.step == T
    for name in sp.masks:
        assert torch.equal(sp.masks[name], sp2.masks[name]), name
    for (name, p), q in zip(net.state_dict().items(), net2.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_state_of_other_settings_is_refused_and_changes_nothing():
    net = pruned_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    state = granet.GraNet(net, opt, total_steps=T, **KW).state_dict()
    net2 = pruned_net()
    before = copy.deepcopy(net2.state_dict())
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.05)
    with pytest.raises(ValueError, match="belongs to another run: it has sparsity=0.8"):
        attach(granet.GraNet, net2, opt2, T, {"sparsity": 0.9, "update_every": 4}, state)
    assert all(torch.equal(p, before[n]) for n, p in net2.state_dict().items())
    granet.GraNet(net2, opt2, total_steps=T, **KW)  # the failed attach holds no tensor


def test_options_are_checked_when_the_callback_is_made():
    assert method_class("RigL", {}) is granet.RigL
    with pytest.raises(ValueError, match="method must be one of granet, gmp"):
        method_class("lottery", {})
    with pytest.raises(ValueError, match="unknown option"):
        method_class("granet", {"sparsty": 0.9})
    with pytest.raises(ValueError, match="sparsity must be"):
        method_class("granet", {"sparsity": 1.5})
    assert method_class("set", {"include": [torch.nn.Linear], "algorithm": None}) is granet.SET


def test_scalars_follow_the_rounds():
    net = SmallNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    sp = granet.GraNet(net, opt, total_steps=T, sparsity=0.8, update_every=4)
    scalars = Scalars(sp)
    first = scalars()
    assert first == {
        "granet/sparsity": pytest.approx(0.5, abs=1e-3),
        "granet/itop_rate": pytest.approx(0.5, abs=1e-3),
        "granet/pruned": 0.0,
        "granet/dropped": 0.0,
        "granet/regrown": 0.0,
    }
    train(net, opt, 3)
    assert scalars() == first  # no round yet
    train(net, opt, 1, 3)
    after = scalars()
    assert after["granet/sparsity"] == pytest.approx(sp.sparsity()) and after != first
    assert after["granet/pruned"] == sp.last_round["pruned"] > 0


def test_granet_and_its_integrations_package_import_no_framework():
    code = (
        "import sys, granet, granet.integrations, granet.integrations.attach\n"
        "found = {'transformers', 'accelerate', 'lightning', 'tensorboard'} & set(sys.modules)\n"
        "assert not found, found\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"exclude": "lm_head.*"}, "exclude must be a list of rules; got the single rule"),
        ({"include": [3]}, "include/exclude rules must be nn.Module subclasses or name patterns"),
        ({"verify_ranks": "no"}, "verify_ranks must be True or False; got 'no'"),
    ],
)
def test_selection_options_are_checked_when_the_callback_is_made(options, message):
    with pytest.raises(ValueError, match=message):
        method_class("granet", options)


# ------------------------------------------------------------- checked states, detaching
def sparsifier_state() -> dict:
    net = pruned_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    sp = granet.GraNet(net, opt, total_steps=T, **KW)
    train(net, opt, 5)
    state = sp.state_dict()
    sp.remove()
    return state


def saved_and_loaded(state, tmp_path):
    torch.save(state, tmp_path / "state.pt")
    return torch.load(tmp_path / "state.pt", weights_only=True)


# as the Hugging Face callback's: a format field marks the states that have a checksum
FIELDS, OLD = ("format", "global_step", "sparsifier"), ("global_step", "sparsifier")


def check(saved):
    return checked(saved, "state.pt", FIELDS, "sparsifier state", legacy=OLD)


def test_a_checksummed_state_round_trips_through_a_file(tmp_path):
    state = {"format": 2, "global_step": 5, "sparsifier": sparsifier_state()}
    saved = saved_and_loaded(with_checksum(state), tmp_path)
    assert saved["sha256"] == state_digest(state)
    back = check(saved)
    assert state_digest(back) == state_digest(state)
    # the CLI's checkpoints are checked the same way
    assert checkpoints.state_digest is state_digest


def flip_a_mask_bit(state):
    mask = next(iter(state["sparsifier"]["masks"].values()))
    mask[0] ^= 1


def rename_the_checksum(state):
    state["sha257"] = state.pop("sha256")


@pytest.mark.parametrize(
    "damage, message",
    [
        (flip_a_mask_bit, "state.pt: its sparsifier state is corrupt: its contents do not match"),
        (lambda s: s.update(global_step=6), "state.pt: its sparsifier state is corrupt"),
        (rename_the_checksum, "state.pt: not a granet sparsifier state .* found a dict of"),
        (lambda s: s.pop("sparsifier"), "state.pt: not a granet sparsifier state"),
        (lambda s: s.update(extra=1), "state.pt: not a granet sparsifier state"),
        (lambda s: s.pop("sha256"), "state.pt: not a granet sparsifier state"),
    ],
    ids=["mask bit", "step", "checksum renamed", "key missing", "extra key", "checksum removed"],
)
def test_a_damaged_state_is_refused_in_one_line_naming_the_file(damage, message):
    saved = with_checksum({"format": 2, "global_step": 5, "sparsifier": sparsifier_state()})
    damage(saved)
    with pytest.raises(ValueError, match=message) as error:
        check(saved)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("saved", [[1, 2], "text", None, 3, {}])
def test_a_state_that_is_no_dict_of_the_fields_is_refused(saved):
    with pytest.raises(ValueError, match="state.pt: not a granet sparsifier state"):
        check(saved)


def test_a_state_saved_before_checksums_loads_with_a_warning():
    state = {"global_step": 5, "sparsifier": sparsifier_state()}
    with pytest.warns(UserWarning, match="state.pt: its sparsifier state has no checksum"):
        back = check(state)
    assert back == state


def drop(key):
    return lambda s: s.pop(key)


def first_mask(change):
    def damage(state):
        name = next(iter(state["masks"]))
        state["masks"][name] = change(state["masks"][name])

    return damage


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda s: s.update(step=-3), "step must be an integer >= 0; got -3"),
        (lambda s: s.update(step=2.5), "step must be an integer"),
        (drop("masks"), "sparsifier state has no masks"),
        (drop("step"), "sparsifier state has no step"),
        (lambda s: s.update(generators=[1]), "generators is a list, not a dict"),
        (lambda s: s.update(generators={"cpu": 5}), "generators are not all tensors"),
        (lambda s: s.update(settings="granet"), "settings is a str, not a dict"),
        (lambda s: s["shapes"].clear(), "is incomplete or of the wrong kind"),
        (first_mask(lambda m: m.tolist()), "is incomplete or of the wrong kind"),
        (first_mask(lambda m: m[:-1]), "packed mask has"),
    ],
)
def test_a_malformed_sparsifier_state_is_a_value_error_and_changes_nothing(damage, message):
    state = sparsifier_state()
    damage(state)
    net = pruned_net()
    before = copy.deepcopy(net.state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with pytest.raises(ValueError, match=message):
        attach(granet.GraNet, net, opt, T, KW, state)
    assert all(torch.equal(p, before[n]) for n, p in net.state_dict().items())
    with pytest.raises(ValueError, match="sparsifier state must be a dict; got a list"):
        attach(granet.GraNet, net, opt, T, KW, [state])


def test_a_callback_names_the_file_of_a_refused_state():
    holder = SparsifierHolder("granet", **KW)
    net = pruned_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    state = {**sparsifier_state(), "step": -1}
    with pytest.raises(ValueError, match=r"^ckpt/state.pt: sparsifier state step must be"):
        holder._attach(net, opt, T, state, "ckpt/state.pt")


def test_a_detached_callback_lets_a_new_one_train_the_model_with_its_zeros():
    net = pruned_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    first = SparsifierHolder("granet", **KW)
    first._attach(net, opt, T, None)
    train(net, opt, T)
    weights = {
        n: p.detach().clone() for n, p in zip(first.sparsifier.names, first.sparsifier.params)
    }
    first._detach()
    assert all(not weights[n][~m].any() for n, m in first.sparsifier.masks.items())
    assert first.sparsifier.state_dict()["step"] == T  # still readable
    second = SparsifierHolder("rigl", sparsity=0.9, update_every=4)
    second._attach(net, torch.optim.SGD(net.parameters(), lr=0.05), T, None)
    assert second.sparsifier.sparsity() == pytest.approx(0.9, abs=1e-3)
