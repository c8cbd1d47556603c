"""compute="sparse" / "auto": CSR kernels in the training step give the masked-dense results."""

import copy
import gc
import io
import json
import pickle
import warnings

import pytest
import torch
from helpers import SmallNet, batch, masked_zero, optimizer_gain, rounding_tol, sum_magnitude
from torch import nn

import granet
from granet import compute
from granet.experiment.models import mlp

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "sgd-plain": lambda p: torch.optim.SGD(p, lr=0.05, dampening=0.1, momentum=0.5),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.01),
    "adam-amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, weight_decay=1e-3),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9),  # no sparse update
}
KW = dict(sparsity=0.8, total_steps=30, update_every=5)


def net64(dtype=torch.float64):
    torch.manual_seed(0)
    return mlp(64, 10, hidden=(48, 32)).to(dtype)


def side_by_side(method, make_opt, dtype=torch.float64, model=net64, **kw):
    """The same model, optimizer and masks twice: compute='dense' and compute='sparse'."""
    base = model(dtype)
    runs = []
    for mode in ("dense", "sparse"):
        net = copy.deepcopy(base)
        opt = make_opt(net.parameters())
        runs.append((net, opt, granet.sparsify(net, opt, method, compute=mode, **{**KW, **kw})))
    return runs


def step(net, opt, i, dtype=torch.float64, micro=1, set_to_none=True):
    opt.zero_grad(set_to_none=set_to_none)
    for j in range(micro):
        x, y = batch(10 * i + j)
        (nn.functional.cross_entropy(net(x.to(dtype)), y) / micro).backward()
    opt.step()


def tol(net, opt, steps, dtype=torch.float64):
    """How far ``steps`` steps of dense and sparse compute may drift apart by rounding alone:
    every step's sums run in another order, the optimizer amplifies the difference."""
    terms, magnitude = sum_magnitude(net, batch(0)[0].to(dtype))
    return steps * optimizer_gain(opt) * rounding_tol(dtype, terms, magnitude)


def forward_tol(net, x):
    """How far one forward pass of dense and sparse compute may be apart, per output entry."""
    return rounding_tol(x.dtype, *sum_magnitude(net, x, backward=False))


def gap(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def state_gap(opt_a, opt_b, a, b):
    worst = 0.0
    for p, q in zip(a.parameters(), b.parameters()):
        for key, v in opt_a.state[p].items():
            if torch.is_tensor(v) and v.shape == p.shape:
                worst = max(worst, (v - opt_b.state[q][key]).abs().max().item())
    return worst


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("method", ["granet", "gmp", "rigl", "set", "snfs", "static"])
def test_sparse_compute_trains_like_dense_step_for_step(method, opt_name):
    (dense, d_opt, d_sp), (sparse, s_opt, s_sp) = side_by_side(method, OPTIMIZERS[opt_name])
    assert s_sp._compute.sparse_layers() == s_sp.names  # every Linear runs sparse
    for i in range(KW["total_steps"]):
        step(dense, d_opt, i)
        step(sparse, s_opt, i)
        assert all(torch.equal(d_sp.masks[n], s_sp.masks[n]) for n in d_sp.names), i
        assert gap(dense, sparse) <= tol(dense, d_opt, i + 1), i
        assert state_gap(d_opt, s_opt, dense, sparse) <= tol(dense, d_opt, i + 1), i
    assert d_sp.itop_rate() == s_sp.itop_rate()
    masked_zero(s_sp, s_opt)


def test_float32_is_as_accurate_as_dense_compute():
    """Both float32 paths against the float64 run: sparse compute's error is of the size of
    dense compute's own (a few float32 roundings of each weight; a lost bit of precision or a
    wrong entry would be orders of magnitude more; a factor 4 leaves room for chance)."""
    (dense, d_opt, _), (sparse, s_opt, _) = side_by_side("granet", OPTIMIZERS["sgd"], torch.float32)
    (ref, r_opt, _), _ = side_by_side("granet", OPTIMIZERS["sgd"])
    for i in range(KW["total_steps"]):
        step(ref, r_opt, i)
        step(dense, d_opt, i, torch.float32)
        step(sparse, s_opt, i, torch.float32)
    error = gap(dense.double(), ref)
    assert 0 < gap(sparse.double(), ref) <= 4 * error


def test_weight_gradient_is_dense_only_for_the_step_before_a_round():
    (dense, d_opt, d_sp), (sparse, s_opt, s_sp) = side_by_side("rigl", OPTIMIZERS["sgd"])
    for i in range(12):
        for net, opt in ((dense, d_opt), (sparse, s_opt)):
            opt.zero_grad()
            x, y = batch(i)
            nn.functional.cross_entropy(net(x.double()), y).backward()
        before_round = s_sp.step + 1 in (5, 10)
        within = tol(dense, d_opt, i + 1)  # i steps' drift and this step's sums
        for name, p, q in zip(s_sp.names, d_sp.params, s_sp.params):
            mask = s_sp.masks[name]
            assert (p.grad[mask] - q.grad[mask]).abs().max() <= within
            if before_round:  # growth reads the dense gradient, inactive positions included
                assert (p.grad - q.grad).abs().max() <= within and q.grad[~mask].any()
            else:
                assert not q.grad[~mask].any()
        d_opt.step()
        s_opt.step()
    assert s_sp.last_round["regrown"] > 0


def test_growth_by_momentum_sees_the_dense_gradient_every_step():
    (_, _, d_sp), (sparse, s_opt, s_sp) = side_by_side("snfs", OPTIMIZERS["sgd"])
    assert s_sp._compute.dense_grad
    step(sparse, s_opt, 0)
    assert all(p.grad[~m].any() for p, m in zip(s_sp.params, s_sp.masks.values()))


def test_gradient_accumulation_zeroed_gradients_and_a_layer_called_twice():
    class Twice(nn.Module):
        def __init__(self, dtype):
            super().__init__()
            torch.manual_seed(0)
            self.inp, self.mid, self.out = nn.Linear(64, 40), nn.Linear(40, 40), nn.Linear(40, 10)
            self.to(dtype)

        def forward(self, x):
            h = torch.relu(self.mid(torch.relu(self.inp(x.flatten(1)))))
            return self.out(torch.relu(self.mid(h)))  # mid twice: two gradients to add

    (dense, d_opt, _), (sparse, s_opt, _) = side_by_side("granet", OPTIMIZERS["adamw"], model=Twice)
    for i in range(KW["total_steps"]):
        step(dense, d_opt, i, micro=3, set_to_none=i % 2 == 0)
        step(sparse, s_opt, i, micro=3, set_to_none=i % 2 == 0)
        assert gap(dense, sparse) <= tol(dense, d_opt, i + 1), i


def test_the_weight_gradient_buffer_is_reused_not_copied():
    _, (sparse, opt, sp) = side_by_side("static", OPTIMIZERS["sgd"])
    seen = set()
    for i in range(3):
        opt.zero_grad(set_to_none=True)
        x, y = batch(i)
        nn.functional.cross_entropy(sparse(x.double()), y).backward()
        seen.add(sparse.fc2.weight.grad.data_ptr())
        opt.step()
    assert len(seen) == 1


def test_a_gradient_kept_from_an_earlier_step_does_not_change():
    _, (sparse, opt, sp) = side_by_side("static", OPTIMIZERS["sgd"])
    step(sparse, opt, 0)
    kept = sparse.fc2.weight.grad
    before = kept.clone()
    for i in range(1, 3):
        step(sparse, opt, i)
        assert torch.equal(kept, before), i
        assert sparse.fc2.weight.grad.data_ptr() != kept.data_ptr()


def test_gradient_noise_added_in_place_does_not_stay_in_later_gradients():
    (dense, d_opt, _), (sparse, s_opt, s_sp) = side_by_side("static", OPTIMIZERS["sgd"])
    noise = torch.Generator().manual_seed(0)
    for i in range(4):
        within = tol(dense, d_opt, i + 1)
        for net, opt in ((dense, d_opt), (sparse, s_opt)):
            opt.zero_grad(set_to_none=True)
            x, y = batch(i)
            nn.functional.cross_entropy(net(x.double()), y).backward()
        for name, mask in s_sp.masks.items():
            p, q = dense.get_parameter(name), sparse.get_parameter(name)
            assert not q.grad[~mask].any(), (i, name)  # not the last step's noise
            assert (p.grad[mask] - q.grad[mask]).abs().max() <= within, (i, name)
        noises = [torch.randn(p.shape, generator=noise, dtype=p.dtype) for p in dense.parameters()]
        for net, opt in ((dense, d_opt), (sparse, s_opt)):
            for p, n in zip(net.parameters(), noises):
                p.grad.add_(n, alpha=0.1)
            opt.step()


def test_the_update_of_sparse_layers_touches_only_active_entries():
    _, (sparse, opt, sp) = side_by_side("static", OPTIMIZERS["sgd"])
    step(sparse, opt, 0)
    # the mask multiply skips them: their inactive entries were never written, so still zero
    assert sp._target_cache is not None
    masked = {id(t) for t in sp._target_cache[1][0]}
    assert not masked & {id(p) for p in sp.params}
    assert {id(t) for t in sp._targets()[0]} >= {id(p) for p in sp.params}
    masked_zero(sp, opt)


def test_grad_scaler_skipped_step_and_clipping():
    (dense, d_opt, d_sp), (sparse, s_opt, s_sp) = side_by_side("granet", OPTIMIZERS["sgd"])
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**4) for _ in range(2)]
    for i in range(12):
        for (net, opt, _), scaler in zip(((dense, d_opt, 0), (sparse, s_opt, 0)), scalers):
            opt.zero_grad()
            x, y = batch(i)
            loss = nn.functional.cross_entropy(net(x.double()), y) * (float("inf") if i == 3 else 1)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(net.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
    assert d_sp.step == s_sp.step == 11
    assert gap(dense, sparse) <= tol(dense, d_opt, 12)


def test_a_closure_step_runs_the_optimizer_on_the_whole_gradient():
    (dense, d_opt, _), (sparse, s_opt, _) = side_by_side("rigl", OPTIMIZERS["sgd"])
    for i in range(12):
        for net, opt in ((dense, d_opt), (sparse, s_opt)):
            x, y = batch(i)

            def closure(net=net, opt=opt, x=x, y=y):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(net(x.double()), y)
                loss.backward()
                return loss

            opt.step(closure)
    assert gap(dense, sparse) <= tol(dense, d_opt, 12)


def test_auto_follows_the_rule_and_decides_again_after_every_round():
    torch.manual_seed(0)
    net = mlp(64, 10, hidden=(512, 512)).double()  # fc2: 2**18 weights, the rule's minimum
    opt = OPTIMIZERS["sgd"](net.parameters())
    sp = granet.GraNet(
        net, opt, sparsity=0.95, init_sparsity=0.5, total_steps=40, update_every=5, compute="auto"
    )
    assert net.fc2.weight.numel() == compute.AUTO_MIN_NUMEL
    decisions = []
    for i in range(40):
        step(net, opt, i)
        stats = sp.stats()["layers"]
        density = stats["fc2.weight"]["density"]
        decisions.append(stats["fc2.weight"]["compute"])
        assert decisions[-1] == ("sparse" if density <= compute.AUTO_MAX_DENSITY else "dense")
        assert stats["fc1.weight"]["compute"] == "dense"  # 32768 weights: below the minimum
    assert decisions[0] == "dense" and decisions[-1] == "sparse"


def test_a_dense_compute_state_resumes_with_sparse_compute():
    (dense, d_opt, d_sp), (sparse, s_opt, s_sp) = side_by_side("granet", OPTIMIZERS["adamw"])
    for i in range(12):
        step(dense, d_opt, i)
    saved = copy.deepcopy((dense.state_dict(), d_opt.state_dict(), d_sp.state_dict()))
    sparse.load_state_dict(saved[0])
    s_opt.load_state_dict(saved[1])
    s_sp.load_state_dict(saved[2])  # compute says how, not what: not refused
    for i in range(12, 30):
        step(dense, d_opt, i)
        step(sparse, s_opt, i)
    assert gap(dense, sparse) <= tol(dense, d_opt, 18)


def test_bad_compute_value_names_the_choices():
    net = net64()
    opt = OPTIMIZERS["sgd"](net.parameters())
    with pytest.raises(ValueError, match="compute must be one of dense, sparse, auto; got 'csr'"):
        granet.RigL(net, opt, compute="csr", **KW)


def test_layers_without_a_sparse_route_are_named_once_and_run_dense():
    torch.manual_seed(0)
    net = SmallNet().double()
    opt = OPTIMIZERS["sgd"](net.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sp = granet.RigL(net, opt, compute="sparse", **KW)
        for i in range(6):
            step(net, opt, i)
    said = [str(w.message) for w in caught if "compute=" in str(w.message)]
    assert said == [
        "granet: compute='sparse' runs these layers dense: conv1.weight, conv2.weight "
        "(Conv2d has no sparse training route)"
    ]
    assert sp._compute.sparse_layers() == ["fc1.weight", "fc2.weight"]


class Attention(nn.Module):
    """A Linear, a MultiheadAttention (which reads its weights itself), a Linear head."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.out = nn.Linear(64, 32), nn.Linear(32, 10)
        self.att = nn.MultiheadAttention(32, 4)
        self.to(dtype)

    def forward(self, x):
        h = self.inp(x.flatten(1)).unflatten(0, (2, -1))  # (sequence 2, batch 8, 32)
        return self.out(self.att(h, h, h)[0].mean(0).repeat(2, 1))


def test_attention_weights_run_dense_and_train_like_dense_compute():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (dense, d_opt, _), (sparse, s_opt, s_sp) = side_by_side(
            "granet", OPTIMIZERS["adamw"], model=Attention, sparsity=0.5
        )
    said = [str(w.message) for w in caught if "compute=" in str(w.message)]
    assert "att.out_proj.weight (MultiheadAttention has no sparse training route)" in said[0]
    assert s_sp._compute.sparse_layers() == ["inp.weight", "out.weight"]
    for i in range(KW["total_steps"]):
        step(dense, d_opt, i)
        step(sparse, s_opt, i)
        assert gap(dense, sparse) <= tol(dense, d_opt, i + 1), i


def test_an_unsupported_dtype_is_named_once_and_runs_dense():
    net = net64(torch.bfloat16)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sp = granet.RigL(net, opt, compute="sparse", **KW)
        for i in range(3):
            step(net, opt, i, torch.bfloat16)
        net.double()  # supported from now on: the layers run sparse
        step(net, opt, 3)
    said = [str(w.message) for w in caught if "compute=" in str(w.message)]
    assert said == [
        "granet: compute='sparse' runs these layers dense: fc1.weight, fc2.weight, fc3.weight "
        "(CPU CSR kernels do not support torch.bfloat16)"
    ]
    assert sp._compute.sparse_layers() == sp.names
    assert not net.fc1.weight.grad[~sp.masks["fc1.weight"]].any()


def test_autocast_and_a_mismatched_input_run_dense_with_a_warning():
    _, (net, opt, sp) = side_by_side("static", OPTIMIZERS["sgd"], torch.float32)
    x, _ = batch(0)
    expected = net(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with torch.autocast("cpu", torch.bfloat16):
                net(x)
            with pytest.raises(RuntimeError):  # F.linear refuses the mix too
                net(x.double())
    assert [str(w.message) for w in caught] == [
        "granet: compute='sparse' runs fc1.weight, fc2.weight, fc3.weight dense: autocast is on",
        "granet: compute='sparse' runs fc1.weight dense: the input of fc1.weight is "
        "torch.float64, its weight torch.float32",
    ]
    assert (net(x) - expected).abs().max() <= forward_tol(net, x)


def test_copies_and_pickles_run_dense_and_remove_restores_the_forward():
    _, (net, opt, sp) = side_by_side("static", OPTIMIZERS["sgd"])
    x, _ = batch(0)
    x = x.double()
    out = net(x)
    twin = copy.deepcopy(net)
    assert "forward" in twin.fc1.__dict__ and compute._LAYERS.get(twin.fc1) is None
    within = forward_tol(net, x)  # a copy runs dense
    assert (twin(x) - out).abs().max() <= within
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert (loaded(x) - out).abs().max() <= within
    assert pickle.loads(pickle.dumps(net.fc1)).forward.__func__ is nn.Linear.forward
    with torch.inference_mode():
        assert (net(x) - out).abs().max() <= within
    sp.remove()
    assert all("forward" not in m.__dict__ for m in net.modules())
    assert (net(x) - out).abs().max() <= within


def test_a_copy_runs_sparse_under_a_sparsifier_of_its_own():
    _, (net, _, _) = side_by_side("static", OPTIMIZERS["sgd"])
    for twin in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        sp = granet.Static(twin, OPTIMIZERS["sgd"](twin.parameters()), compute="sparse", **KW)
        assert sp._compute.sparse_layers() == sp.names


def test_a_dropped_sparsifier_lets_go_of_its_model():
    (_, _, _), (net, opt, sp) = side_by_side("rigl", OPTIMIZERS["sgd"])
    step(net, opt, 0)
    del sp, opt
    gc.collect()
    opt = OPTIMIZERS["sgd"](net.parameters())
    sp = granet.RigL(net, opt, compute="sparse", **KW)  # not "another sparsifier holds ..."
    assert sp._compute.sparse_layers() == sp.names


def test_an_inference_mode_pass_between_steps_and_rounds():
    (dense, d_opt, _), (sparse, s_opt, _) = side_by_side("rigl", OPTIMIZERS["sgd"])
    x, _ = batch(99)
    for i in range(12):  # a round every 5 steps: inference passes right after rounds too
        with torch.inference_mode():
            sparse(x.double())
        step(dense, d_opt, i)
        step(sparse, s_opt, i)
    assert gap(dense, sparse) <= tol(dense, d_opt, 12)


def test_a_double_backward_through_a_sparse_layer_raises():
    _, (net, _, _) = side_by_side("static", OPTIMIZERS["sgd"])
    x = batch(0)[0].double().requires_grad_()
    (g,) = torch.autograd.grad(net(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.square().sum().backward()


def test_a_non_contiguous_weight_runs_dense():
    net = nn.Sequential(nn.Linear(64, 48)).double()
    net[0].weight = nn.Parameter(torch.randn(64, 48, dtype=torch.float64).t())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sp = granet.Static(net, OPTIMIZERS["sgd"](net.parameters()), compute="sparse", **KW)
        net(batch(0)[0].double().flatten(1)).sum().backward()
    assert sp._compute.sparse_layers() == []
    assert any("its weight is not contiguous" in str(w.message) for w in caught)


def test_granet_train_compute_flag_reaches_the_sparsifier(tmp_path):
    from test_cli import run_cli

    code, _, err = run_cli(
        "train", "--dataset", "synthetic", "--model", "lenet5", "--epochs", "1",
        "--compute", "sparse", "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert code == 0, err
    assert "runs these layers dense: conv1.weight, conv2.weight" in err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert {n: v["compute"] for n, v in report["layers"].items()} == {
        "conv1.weight": "dense",
        "conv2.weight": "dense",
        "fc1.weight": "sparse",
        "fc2.weight": "sparse",
        "fc3.weight": "sparse",
    }


def test_weights_changed_between_steps_are_seen_by_the_next_forward():
    (dense, d_opt, _), (sparse, s_opt, _) = side_by_side("static", OPTIMIZERS["sgd"])
    for i in range(3):
        step(dense, d_opt, i)
        step(sparse, s_opt, i)
    x, _ = batch(99)
    x = x.double()
    for net in (dense, sparse):
        with torch.no_grad():  # an in-place write: the version counter moves
            net.fc1.weight.mul_(2.0)
    assert (dense(x) - sparse(x)).abs().max() <= tol(dense, d_opt, 4)  # 3 steps and a forward
    averaged = [p.detach() * 0.5 for p in dense.parameters()]
    for net in (dense, sparse):
        for p, a in zip(net.parameters(), averaged):  # a swap through .data: the probe sees it
            p.data.copy_(a)
    assert (dense(x) - sparse(x)).abs().max() <= forward_tol(dense, x)
    step(dense, d_opt, 3)
    step(sparse, s_opt, 3)
    assert gap(dense, sparse) <= tol(dense, d_opt, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["auto", "sparse"])
def test_cuda_layers_stay_dense_without_a_host_sync_per_step(mode):
    torch.manual_seed(0)
    net = mlp(64, 10, hidden=(512, 512)).cuda()
    opt = OPTIMIZERS["sgd"](net.parameters())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sp = granet.RigL(net, opt, sparsity=0.98, total_steps=100, update_every=50, compute=mode)
    said = [str(w.message) for w in caught if "compute=" in str(w.message)]
    assert len(said) == (mode == "sparse") and sp._compute.sparse_layers() == []
    x, y = torch.randn(16, 64, device="cuda"), torch.randint(0, 10, (16,), device="cuda")

    def step_once():
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    step_once()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step_once()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    masked_zero(sp, opt)
