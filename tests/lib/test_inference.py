"""sparse_inference: same outputs as the dense model, CSR where the rule says, original intact."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import rounding_tol
from torch import nn

from granet.inference import (
    RULE_MAX_DENSITY,
    RULE_MIN_NUMEL,
    SparseConv2d,
    SparseLinear,
    interleaved_times,
    sparse_inference,
    sparse_layers,
)


def mlp() -> nn.Module:
    # 600 x 600 passes the rule's size threshold at 98%; 196 x 600 and 600 x 10 do not.
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(196, 600),
        nn.ReLU(),
        nn.Linear(600, 600),
        nn.ReLU(),
        nn.Linear(600, 10),
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 10),
    )


INPUTS = {mlp: (1, 14, 14), cnn: (1, 14, 14)}


def sparse_model(build, sparsity: float, seed: int = 0) -> nn.Module:
    """``build()`` with its Linear/Conv2d weights zeroed by a random mask at ``sparsity``."""
    torch.manual_seed(seed)
    model = build()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.weight.mul_(torch.rand_like(module.weight) >= sparsity)
        model.train()(torch.randn(8, *INPUTS[build]))  # BatchNorm statistics
    return model


def assert_layer_matches(layer: nn.Module, x: torch.Tensor, got: torch.Tensor) -> None:
    """``got`` is what the dense ``layer`` gives for ``x``, up to the rounding of its sums
    (another order): compared per entry with the float64 result, within the bound the dtype
    and the sum of the absolute terms give."""
    reference = copy.deepcopy(layer).double()
    absolute = copy.deepcopy(reference)
    with torch.no_grad():
        for p in absolute.parameters():
            p.abs_()
        expected, magnitude = reference(x.double()), absolute(x.double().abs())
    terms = layer.weight[0].numel() + 1  # a row of the weight and the bias
    assert got.dtype == x.dtype and got.shape == expected.shape
    assert ((got.double() - expected).abs() <= rounding_tol(got.dtype, terms, magnitude)).all()


def assert_same_function(dense: nn.Module, sparse: nn.Module, x: torch.Tensor) -> None:
    """Each CSR layer of ``sparse`` computes its dense original's function on the input it
    receives (see assert_layer_matches); every other layer is the original's copy."""
    dense = copy.deepcopy(dense).eval()
    originals = dict(dense.named_modules())
    seen = {}
    hooks = [
        module.register_forward_hook(
            lambda m, args, out, name=name: seen.update({name: (args[0], out)})
        )
        for name, module in sparse.named_modules()
        if name in sparse_layers(sparse)
    ]
    with torch.no_grad():
        got = sparse(x)
    for hook in hooks:
        hook.remove()
    assert sorted(seen) == sorted(sparse_layers(sparse))
    for name, (layer_input, out) in seen.items():
        assert_layer_matches(originals[name], layer_input, out)
    if not seen:  # the very same computation
        with torch.no_grad():
            assert torch.equal(got, dense(x))


@pytest.mark.parametrize("probe", [True, False])
@pytest.mark.parametrize("build", [mlp, cnn])
def test_outputs_match_the_dense_model(build, probe):
    model = sparse_model(build, 0.98)
    x = torch.randn(64, *INPUTS[build])
    example = x[:2] if probe else None
    served = sparse_inference(model, probe=probe, batch_size=4, example_input=example)
    assert not served.training
    assert_same_function(model, served, x)


def test_rule_puts_large_very_sparse_linear_layers_on_csr():
    model = sparse_model(mlp, 0.98)
    served = sparse_inference(model, probe=False)
    assert sparse_layers(served) == ["3"]
    assert isinstance(served[3], SparseLinear) and isinstance(served[1], nn.Linear)
    assert served[3].density <= RULE_MAX_DENSITY
    assert served[3].weight_shape[0] * served[3].weight_shape[1] >= RULE_MIN_NUMEL


def test_rule_keeps_denser_layers_and_convolutions_dense():
    assert sparse_layers(sparse_inference(sparse_model(mlp, 0.9), probe=False)) == []
    assert sparse_layers(sparse_inference(sparse_model(cnn, 0.99), probe=False)) == []


def test_layers_that_cannot_use_csr_are_left_alone():
    model = sparse_model(mlp, 0.98).half()
    assert sparse_layers(sparse_inference(model, batch_size=4)) == []
    dense = mlp()  # no zeros anywhere: nothing to gain, nothing probed
    assert sparse_layers(sparse_inference(dense, batch_size=4)) == []


def test_original_model_is_not_modified():
    model = sparse_model(cnn, 0.98)
    before = copy.deepcopy(model.state_dict())
    sparse_inference(model, batch_size=4, example_input=torch.randn(2, 1, 14, 14))
    sparse_inference(model, probe=False)
    assert model.training
    assert [type(m) for m in model.modules()] == [type(m) for m in cnn().modules()]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 8, 3),
        nn.Conv2d(3, 8, 3, stride=2, padding=1, dilation=2, bias=False),
        nn.Conv2d(3, 5, (3, 1), stride=(1, 2), padding=(2, 0)),
    ],
    ids=["plain", "strided-dilated-nobias", "rectangular"],
)
def test_sparse_conv_matches_conv(conv):
    torch.manual_seed(0)
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) > 0.8)
    sparse = SparseConv2d(conv)
    x = torch.randn(4, 3, 11, 13)
    with torch.no_grad():
        assert_layer_matches(conv, x, sparse(x))
        assert_layer_matches(conv, x[0], sparse(x[0]))


def test_a_model_on_sparse_convolutions_matches():
    model = sparse_model(cnn, 0.9).eval()
    served = copy.deepcopy(model)
    served[0], served[4] = SparseConv2d(model[0]), SparseConv2d(model[4])
    assert_same_function(model, served, torch.randn(32, 1, 14, 14))


def test_sparse_conv_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="groups=2"):
        SparseConv2d(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        SparseConv2d(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))


def test_sparse_linear_handles_extra_leading_dimensions_and_no_bias():
    linear = nn.Linear(20, 7, bias=False)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) > 0.7)
    x = torch.randn(3, 5, 20)
    with torch.no_grad():
        assert_layer_matches(linear, x, SparseLinear(linear)(x))
        assert_layer_matches(linear, x[0, 0], SparseLinear(linear)(x[0, 0]))


def test_served_model_can_be_copied_and_converted():
    model = sparse_model(mlp, 0.98)
    served = sparse_inference(model, probe=False)
    x = torch.randn(8, 1, 14, 14)
    assert_same_function(model, copy.deepcopy(served), x)
    doubled = served.double()
    assert doubled[3].weight_values.dtype == torch.float64
    assert_same_function(model.double(), doubled, x.double())


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True])
def test_bad_batch_size_is_refused(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        sparse_inference(mlp(), batch_size=batch_size)


def test_interleaved_times_takes_samples_in_turn():
    calls = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    times = interleaved_times(fns, repeats=4, min_sample_s=0)
    assert [len(t) for t in times] == [4, 4] and all(s > 0 for t in times for s in t)
    assert calls == ["a", "b"] * 5  # a warm-up call each, then one call per sample
