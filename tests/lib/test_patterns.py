"""N:M sparsity (``pattern=``): every method keeps at most N of every M consecutive weights
along each layer's input dimension after every round."""

import io
import warnings

import numpy as np
import pytest
import torch
from helpers import SmallNet, train
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import granet
from granet import oneshot, patterns

METHODS = ["granet", "gmp", "rigl", "set", "snfs", "static"]


def group_counts(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Active entries of every group of ``m`` along dim 1 (flattened), computed directly."""
    return mask.reshape(mask.shape[0], -1, m).sum(dim=-1)


def net_of(kind: str, width: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(width, 24), nn.ReLU(), nn.Linear(24, 8))
    return nn.Sequential(
        nn.Conv2d(width // 4, 8, 2), nn.Flatten(), nn.ReLU(), nn.Linear(8 * 3 * 3, 8)
    )


def batch(kind: str, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (8, width) if kind == "mlp" else (8, width // 4, 4, 4)
    return torch.randn(shape, generator=g), torch.randint(0, 8, (8,), generator=g)


@settings(max_examples=12, deadline=None)
@given(
    method=st.sampled_from(METHODS),
    pattern=st.sampled_from(["2:4", "1:4", "4:8"]),
    kind=st.sampled_from(["mlp", "conv"]),
    width=st.sampled_from([8, 16, 24]),
    seed=st.integers(0, 2**16),
    init=st.sampled_from(["random", "magnitude"]),
)
def test_the_pattern_holds_after_every_round(method, pattern, kind, width, seed, init):
    n, m = map(int, pattern.split(":"))
    net = net_of(kind, width, seed)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    # a gradual method starts dense here, so that its groups shrink round by round
    start = {"init_sparsity": 0.0} if method in ("granet", "gmp") else {}
    sp = granet.sparsify(
        net,
        opt,
        method,
        pattern=pattern,
        total_steps=24,
        update_every=2,
        seed=seed,
        init=init,
        **start,
    )
    rounds = 0
    for step in range(24):
        x, y = batch(kind, width, step)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        if sp.step % 2 == 0:
            rounds += 1
            target = sp.sparsity_schedule(sp.step)
            for name, p in zip(sp.names, sp.params):
                counts = group_counts(sp.masks[name], m)
                cap = min(m, max(n, round(m * (1 - target))))
                assert (counts <= cap).all(), (name, step)
                assert (group_counts(p.detach() != 0, m) <= cap).all(), name
    assert rounds > 0
    for name in sp.names:  # the end: exactly N of every M
        assert (group_counts(sp.masks[name], m) == n).all(), name
    assert sp.sparsity() == pytest.approx(1 - n / m)


def test_gradual_granet_shrinks_groups_to_exactly_n():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = granet.GraNet(net, opt, pattern="1:8", init_sparsity=0, total_steps=40, update_every=2)
    assert all(m.all() for m in sp.masks.values())  # dense start
    seen = set()
    for step in range(40):
        x = torch.randn(4, 32, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
        for mask in sp.masks.values():
            counts = group_counts(mask, 8)
            assert counts.min() == counts.max()  # every group alike
            seen.add(int(counts[0, 0]))
    assert {1, 8} <= seen and len(seen) > 3  # through intermediate counts to exactly N
    assert sp.sparsity() == 1 - 1 / 8


def test_drop_and_regrow_moves_weights_within_groups():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sp = granet.RigL(net, opt, pattern="2:4", total_steps=10, update_every=1, regrow_fraction=0.5)
    before = sp.masks["0.weight"].clone()
    x = torch.randn(16, 64)
    opt.zero_grad()
    net(x).square().mean().backward()
    opt.step()
    after = sp.masks["0.weight"]
    moved = int((before & ~after).sum())
    assert 0 < moved <= sp.last_round["dropped"] <= (32 * 64 // 2) * 0.5 + 1
    assert (group_counts(after, 4) == 2).all()


def test_layers_m_does_not_divide_stay_unstructured_with_a_warning():
    torch.manual_seed(0)
    net = SmallNet()  # conv1: 1x3x3 = 9 inputs, conv2: 6x3x3 = 54: not multiples of 4
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with pytest.warns(RuntimeWarning, match="conv1.weight, conv2.weight is not a multiple"):
        sp = granet.RigL(net, opt, pattern="2:4", total_steps=20, update_every=2)
    train(net, opt, 20)
    masks = sp.masks
    assert (group_counts(masks["fc1.weight"], 4) == 2).all()
    for name in ("conv1.weight", "conv2.weight"):
        assert int(masks[name].sum()) == round(masks[name].numel() / 2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"pattern": "4:4"}, "1 <= N < M"),
        ({"pattern": "0:4"}, "1 <= N < M"),
        ({"pattern": "2-4"}, 'pattern must be a string "N:M"'),
        ({"pattern": 124}, 'quote it in YAML: "2:4"'),
        ({"pattern": "2:4", "sparsity": 0.9}, "sparsity=0.9 contradicts pattern='2:4'"),
        ({"pattern": "2:4", "distribution": "erk"}, "distribution='erk' does not apply"),
        ({"pattern": "2:4", "distribution": "uniform"}, "distribution='uniform' does not"),
    ],
)
def test_bad_patterns_are_refused_in_one_line(options, message):
    net = nn.Sequential(nn.Linear(8, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=message) as error:
        granet.RigL(net, opt, total_steps=10, **options)
    assert "\n" not in str(error.value)


def test_an_algorithm_value_with_a_pattern_needs_its_sparsity():
    with pytest.raises(ValueError, match="sparsity=0.9 contradicts pattern='4:8'"):
        granet.Algorithm(pattern="4:8")
    alg = granet.Algorithm(pattern="4:8", sparsity=0.5, total_steps=10)
    net = nn.Sequential(nn.Linear(16, 4))
    sp = granet.RigL(net, torch.optim.SGD(net.parameters(), lr=0.1), alg)
    assert (group_counts(sp.masks["0.weight"], 8) == 4).all()


def test_magnitude_init_keeps_the_n_largest_of_every_m():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(16, 6))
    w = net[0].weight.detach().clone()
    sp = granet.Static(
        net,
        torch.optim.SGD(net.parameters(), lr=0.1),
        pattern="2:4",
        init="magnitude",
        total_steps=5,
    )
    assert torch.equal(sp.masks["0.weight"], reference_nm(w, 2, 4))


def test_existing_init_checks_the_weights_hold_the_pattern():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 4))
    oneshot.prune(net, 0.5, pattern="2:4")
    sp = granet.RigL(
        net,
        torch.optim.SGD(net.parameters(), lr=0.1),
        pattern="2:4",
        init="existing",
        total_steps=5,
    )
    assert torch.equal(sp.masks["0.weight"], net[0].weight != 0)
    sp.remove()
    with torch.no_grad():
        net[0].weight[1, 4:8] = 1.0
    with pytest.raises(ValueError, match=r"0.weight has more than 2 non-zeros in 1 of its"):
        granet.RigL(
            net,
            torch.optim.SGD(net.parameters(), lr=0.1),
            pattern="2:4",
            init="existing",
            total_steps=5,
        )


def reference_nm(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N largest |w| of every M consecutive along dim 1, by numpy, group by group."""
    w = np.abs(weight.detach().reshape(weight.shape[0], -1).numpy())
    keep = np.zeros(w.shape, dtype=bool)
    for row in range(w.shape[0]):
        for start in range(0, w.shape[1], m):
            group = w[row, start : start + m]
            keep[row, start + np.argsort(-group, kind="stable")[:n]] = True
    return torch.from_numpy(keep).reshape(weight.shape)


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    pattern=st.sampled_from(["2:4", "1:4", "4:8"]),
    rows=st.integers(1, 6),
    groups=st.integers(1, 5),
)
def test_oneshot_pattern_is_the_n_largest_of_m(seed, pattern, rows, groups):
    n, m = map(int, pattern.split(":"))
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(groups * m, rows), nn.Conv2d(m, 3, 2))
    expected = {k: reference_nm(v, n, m) for k, v in net.state_dict().items() if "weight" in k}
    pruned = oneshot.prune(net, 1 - n / m, pattern=pattern)
    assert pruned.masks.keys() == expected.keys()
    for name, mask in pruned.masks.items():
        assert torch.equal(mask, expected[name]), name
        assert torch.equal(net.get_parameter(name) != 0, mask)


def test_oneshot_pattern_refuses_a_contradicting_rate():
    net = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="rate=0.3 contradicts pattern='2:4'"):
        oneshot.prune(net, 0.3, pattern="2:4")


def build(seed: int = 5):
    torch.manual_seed(seed)
    net = SmallNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the convolutions stay unstructured
        sp = granet.GraNet(
            net, opt, pattern="1:4", init_sparsity=0, total_steps=40, update_every=4, seed=3
        )
    return net, opt, sp


def test_resume_with_a_pattern_is_bit_exact():
    net, opt, sp = build()
    train(net, opt, 40)
    straight = net.state_dict()

    net, opt, sp = build()
    train(net, opt, 14)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()}, buf)
    assert sp.state_dict()["settings"]["pattern"] == "1:4"
    net2, opt2, sp2 = build(seed=6)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    net2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    sp2.load_state_dict(ckpt["sp"])
    train(net2, opt2, 26, start=14)
    for key, value in net2.state_dict().items():
        assert torch.equal(straight[key], value), key
    assert (group_counts(sp2.masks["fc1.weight"], 4) == 1).all()


def test_a_state_without_the_pattern_is_refused():
    net, opt, sp = build()
    state = sp.state_dict()
    torch.manual_seed(5)
    other = SmallNet()
    o = torch.optim.SGD(other.parameters(), lr=0.05)
    plain = granet.GraNet(other, o, sparsity=0.75, init_sparsity=0, total_steps=40, update_every=4)
    with pytest.raises(ValueError, match="pattern='1:4' \\(here None\\)"):
        plain.load_state_dict(state)


def test_holds():
    w = torch.tensor([[1.0, 0, 0, 2, 0, 3, 0, 0]])
    assert patterns.holds(w, "2:4") and patterns.holds(w, "1:4") is False
    assert not patterns.holds(torch.ones(2, 6), "2:4")  # 4 does not divide 6


def test_export_records_the_pattern(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 6))
    oneshot.prune(net, 0.5, pattern="2:4", include=["0.weight"])
    granet.save_sparse(net, tmp_path / "m.safetensors", pattern="2:4")
    info = granet.export.inspect_sparse(tmp_path / "m.safetensors")
    marked = {t["name"]: t.get("pattern") for t in info["tensors"]}
    assert marked == {"0.weight": "2:4", "0.bias": None, "2.weight": None, "2.bias": None}
    assert info["pattern"] == "2:4"
    from safetensors import safe_open

    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:
        assert f.metadata()["pattern"] == "2:4"
    granet.save_sparse(net, tmp_path / "plain.safetensors")
    assert granet.export.inspect_sparse(tmp_path / "plain.safetensors")["pattern"] is None
    with pytest.raises(ValueError, match="pattern must have 1 <= N < M"):
        granet.save_sparse(net, tmp_path / "bad.safetensors", pattern="4:2")


def two_four_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    oneshot.prune(net, 0.5, pattern="2:4", include=["0.weight"])
    return net


def test_on_cpu_inference_says_no_nm_kernel_exists():
    net = two_four_net()
    assert granet.inference.nm_plan(net) == {"0": "no N:M kernel on cpu"}
    with pytest.warns(RuntimeWarning, match=r"2:4 layers without .*: 0 \(no N:M kernel on cpu\)"):
        fast = granet.sparse_inference(net, probe=False)
    x = torch.randn(4, 64)
    torch.testing.assert_close(fast(x), net(x))


class FakeCuda:
    """A weight as the decision sees it on a CUDA device (no GPU here)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        self.device, self.dtype, self.shape = torch.device("cuda", 0), dtype, weight.shape


@pytest.mark.parametrize(
    ("capability", "dtype", "shape", "cutlass", "expected"),
    [
        ((8, 0), torch.float16, (32, 64), False, None),
        ((9, 0), torch.bfloat16, (64, 128), True, None),
        ((7, 5), torch.float16, (32, 64), False, "compute capability 7.5 is below 8.0"),
        ((8, 0), torch.float32, (32, 64), False, "float32 is not a dtype of"),
        ((8, 0), torch.float32, (32, 64), True, None),
        ((8, 0), torch.float16, (32, 40), True, "shape 32x40 is not a multiple of 32x64"),
    ],
)
def test_semi_structured_decision(monkeypatch, capability, dtype, shape, cutlass, expected):
    from granet import inference

    monkeypatch.setattr(inference, "_capability", lambda device: capability)
    monkeypatch.setattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS", cutlass)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    reason = inference.semi_structured_reason(FakeCuda(torch.empty(shape), dtype))
    if expected is None:
        assert reason is None
    else:
        assert expected in reason


def test_sparse_inference_converts_the_layers_the_plan_allows(monkeypatch):
    from granet import inference

    converted = []
    monkeypatch.setattr(inference, "semi_structured_reason", lambda w: None)
    monkeypatch.setattr(
        inference, "_to_semi_structured", lambda model, names: converted.extend(names)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = granet.sparse_inference(two_four_net(), probe=False)
    assert converted == ["0"]
    assert inference.sparse_layers(fast) == []


def test_a_config_with_a_pattern_takes_its_sparsity(tmp_path):
    from granet.experiment.config import make_config, resolve_config, save_config

    config = make_config({"pattern": "4:8", "method": "rigl"})
    assert config.sparsity == 0.5
    assert "distribution" not in config.sparsifier_options()
    save_config(config, tmp_path / "c.yaml")
    assert resolve_config(tmp_path / "c.yaml") == config  # a saved run reads back
    with pytest.raises(ValueError, match="sparsity=0.9 contradicts pattern='2:4'"):
        make_config({"pattern": "2:4", "sparsity": 0.9})
    with pytest.raises(ValueError, match="distribution='er' does not apply"):
        make_config({"pattern": "2:4", "distribution": "er"})
    (tmp_path / "bad.yaml").write_text("pattern: 2:4\n")
    with pytest.raises(ValueError, match='quote it in YAML: "2:4"'):
        resolve_config(tmp_path / "bad.yaml")


def test_granet_train_with_a_pattern(tmp_path):
    from granet.experiment.checkpoints import checkpoint_path, load_checkpoint
    from granet.experiment.config import make_config
    from granet.experiment.train import train as train_run

    settings = {"dataset": "synthetic", "model": "lenet5", "epochs": 2, "batch_size": 300}
    config = make_config({**settings, "method": "gmp", "pattern": "2:4", "exclude": ["conv*"]})
    train_run(config, tmp_path / "run", progress=False)
    state = load_checkpoint(checkpoint_path(tmp_path / "run"))["sparsifier"]
    assert state["settings"]["pattern"] == "2:4"
    for name, packed in state["masks"].items():
        mask = granet.masks.unpack_bits(packed, state["shapes"][name])
        assert (group_counts(mask, 4) == 2).all(), name  # fc1, fc2, fc3: GMP ended at 2:4
    from granet.experiment.serving import export_run

    export_run(tmp_path / "run", tmp_path / "m.safetensors")
    info = granet.export.inspect_sparse(tmp_path / "m.safetensors")
    assert info["pattern"] == "2:4"
    assert {t["name"] for t in info["tensors"] if t.get("pattern")} == {
        "fc1.weight",
        "fc2.weight",
        "fc3.weight",
    }


@pytest.mark.filterwarnings("ignore:granet. pattern")
def test_a_callback_resumes_an_existing_pattern_on_restored_weights():
    import copy

    from granet.integrations.attach import attach, method_class

    options = {"init": "existing", "pattern": "2:4", "update_every": 4}
    cls = method_class("rigl", options)

    def pruned():
        torch.manual_seed(0)
        net = SmallNet()
        oneshot.prune(net, 0.5, pattern="2:4")
        return net

    net = pruned()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sp = attach(cls, net, opt, 24, options)
    train(net, opt, 10)
    saved = copy.deepcopy((net.state_dict(), opt.state_dict(), sp.state_dict()))
    train(net, opt, 14, 10)

    net2 = SmallNet()
    net2.load_state_dict(saved[0])
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(saved[1])
    sp2 = attach(cls, net2, opt2, 24, options, saved[2])
    for name, p in net2.state_dict().items():
        assert torch.equal(p, saved[0][name]), name  # what the framework restored is kept
    train(net2, opt2, 14, 10)
    for name, p in net.state_dict().items():
        assert torch.equal(p, net2.state_dict()[name]), name
    assert (group_counts(sp2.masks["fc1.weight"], 4) == 2).all()


def test_a_layer_that_holds_2_4_by_chance_is_left_unstructured():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 8))
    oneshot.prune(net, 0.9)  # unstructured 90%: 64 groups of 4, likely none above 2
    assert patterns.holds(net[0].weight, "2:4")
    assert granet.inference.nm_plan(net) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        granet.sparse_inference(net, probe=False)


@pytest.mark.parametrize("method", ["granet", "set"])
def test_sparse_compute_with_a_pattern_matches_dense_compute(method):
    def run(compute):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).double()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        sp = granet.sparsify(
            net,
            opt,
            method,
            pattern="1:4",
            init_sparsity=0.5,
            total_steps=12,
            update_every=2,
            compute=compute,
        )
        for step in range(12):
            g = torch.Generator().manual_seed(step)
            x = torch.randn(8, 32, generator=g, dtype=torch.float64)
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
        return net.state_dict(), sp.masks

    (dense, dense_masks), (sparse, sparse_masks) = run("dense"), run("sparse")
    for name in dense_masks:
        assert torch.equal(dense_masks[name], sparse_masks[name]), name
        assert (group_counts(sparse_masks[name], 4) == 1).all()
    # float64 sums of up to 64 terms in another order, over 12 steps
    atol = 64 * 12 * torch.finfo(torch.float64).eps
    for key in dense:
        torch.testing.assert_close(sparse[key], dense[key], rtol=0, atol=atol)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--pattern", "5:4"], "pattern must have 1 <= N < M; got '5:4'"),
        (["--pattern", "2:4", "--sparsity", "0.9"], "sparsity=0.9 contradicts pattern='2:4'"),
        (["--pattern", "2:4", "--distribution", "er"], "distribution='er' does not apply"),
    ],
)
def test_granet_train_refuses_a_bad_pattern_in_one_line(capsys, tmp_path, flags, message):
    from helpers import one_line_error

    from granet.cli import main

    assert main(["train", *flags, "--out", str(tmp_path / "run")]) == 2
    assert message in one_line_error(capsys.readouterr().err, "train")
    assert not (tmp_path / "run").exists()


def test_the_nm_sweep_files_hold_the_whole_grid():
    from pathlib import Path

    from granet.experiment.sweep import load_sweep

    cells = set()
    for path in (Path(__file__).parents[2] / "configs" / "sweep-nm").glob("*.yaml"):
        for job in load_sweep(path).jobs:
            c = job.config
            cells.add((c.model, c.pattern, c.method, c.init_sparsity, c.sparsity, c.seed))
    methods = [("granet", 0.0), ("rigl", None), ("set", None), ("gmp", None), ("static", None)]
    expected = {
        (model, pattern, method, init, 0.5, seed)
        for model in ("mlp", "lenet5")
        for pattern in ("2:4", "4:8", None)
        for method, init in methods
        for seed in (0, 1, 2)
    }
    assert cells == expected


def test_drop_and_regrow_rule_by_hand():
    inf = float("inf")
    groups = patterns.Groups(shape=(1, 8), size=4, keep=2)
    mask = torch.tensor([[True, True, False, False, True, True, False, False]])
    importance = torch.tensor([[0.1, 0.9, -inf, -inf, 0.2, 0.3, -inf, -inf]])
    growth = torch.tensor([[0.0, 0.0, 5.0, 1.0, 0.0, 0.0, 0.0, 7.0]])
    new, dropped = patterns.drop_and_regrow(groups, mask, 2, importance, growth)
    # the layer's two weakest (0.1, 0.2) leave; each group regrows its best free position
    assert new.tolist() == [[False, True, True, False, False, True, False, True]]
    assert int(dropped) == 2
    # a full group cannot move anything, however weak: the drop goes to a group with room
    mask = torch.tensor([[True, True, True, True, True, False, False, False]])
    importance = torch.tensor([[0.01, 0.01, 0.01, 0.01, 0.5, -inf, -inf, -inf]])
    new, dropped = patterns.drop_and_regrow(groups, mask, 1, importance, growth)
    assert new.tolist() == [[True, True, True, True, False, False, False, True]]
    assert int(dropped) == 1


def test_random_pattern_masks_do_not_follow_weights_drawn_with_the_same_seed():
    # torch.manual_seed(0) and a sparsifier with seed 0 start from the same random stream: a
    # mask from uniform draws would keep the 2 largest initial weights of every group of 4
    torch.manual_seed(0)
    layer = nn.Linear(512, 256)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    sp = granet.Static(layer, opt, pattern="2:4", seed=0, total_steps=5)
    kept = layer.weight.detach()[sp.masks["weight"]]
    bound = 1 / 512**0.5  # the init's uniform bound
    standard_error = bound / 3**0.5 / kept.numel() ** 0.5
    assert abs(float(kept.mean())) < 5 * standard_error
