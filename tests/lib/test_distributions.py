import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from granet.distributions import DISTRIBUTIONS, er, erk, global_magnitude, uniform

SHAPES = [(16, 3, 3, 3), (32, 16, 3, 3), (64, 32, 3, 3), (256, 1024), (10, 256)]


def weights(shapes):
    return [torch.empty(s) for s in shapes]


@pytest.mark.parametrize("name", ["uniform", "er", "erk"])
@pytest.mark.parametrize("density", [0.02, 0.1, 0.5, 0.9])
def test_totals_match_the_target(name, density):
    ws = weights(SHAPES)
    ds = DISTRIBUTIONS[name](ws, density)
    assert all(0 < d <= 1 for d in ds)
    total = sum(d * w.numel() for d, w in zip(ds, ws))
    assert total == pytest.approx(density * sum(w.numel() for w in ws), rel=1e-9)


def test_erk_is_proportional_to_shape_sums():
    ws = weights(SHAPES)
    ds = erk(ws, 0.05)
    raw = [sum(s) / math.prod(s) for s in SHAPES]
    ratios = [d / r for d, r in zip(ds, raw) if d < 1]
    assert max(ratios) == pytest.approx(min(ratios))


def test_erk_dense_layer_fix():
    # A tiny first layer would get density > 1: it is made dense and the rest re-solved.
    shapes = [(4, 1, 3, 3), (512, 512), (512, 512)]
    ws = weights(shapes)
    ds = erk(ws, 0.3)
    assert ds[0] == 1.0
    assert all(d < 1 for d in ds[1:])
    total = sum(d * w.numel() for d, w in zip(ds, ws))
    assert total == pytest.approx(0.3 * sum(w.numel() for w in ws))


def test_er_ignores_the_kernel():
    ds = er(weights([(8, 8, 3, 3), (8, 8, 5, 5)]), 0.1)
    assert ds[0] == pytest.approx(ds[1])
    assert uniform(weights([(8, 8), (3, 3)]), 0.4) == [0.4, 0.4]


def test_global_magnitude_keeps_the_largest_weights():
    a = torch.arange(1.0, 11.0)  # 1..10
    b = torch.arange(11.0, 21.0)  # 11..20
    assert global_magnitude([a, b], 0.5) == [0.0, 1.0]
    assert global_magnitude([a, b], 1.0) == [1.0, 1.0]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 3])),
        min_size=1,
        max_size=5,
    ),
    st.floats(0.01, 1.0),
)
def test_erk_never_exceeds_one_and_meets_budget(dims, density):
    shapes = [(o, i, k, k) for o, i, k in dims]
    ws = weights(shapes)
    ds = erk(ws, density)
    assert all(0 <= d <= 1 + 1e-12 for d in ds)
    total = sum(d * w.numel() for d, w in zip(ds, ws))
    assert total == pytest.approx(density * sum(w.numel() for w in ws), rel=1e-6)


def test_erk_takes_each_tensor_as_one_layer_whatever_its_layout():
    e = 32
    conv1d, linear = torch.empty(e, 4 * e), torch.empty(4 * e, e)  # (in, out) and (out, in)
    packed, q = torch.empty(3 * e, e), torch.empty(e, e)  # in_proj_weight and a lone projection
    ds = erk([conv1d, linear, packed, torch.empty(e, 3 * e), q], 0.1)
    assert ds[0] == ds[1] and ds[2] == ds[3]
    assert ds[2] / ds[4] == pytest.approx((4 / (3 * e)) / (2 / e))
    assert er([conv1d, linear], 0.1)[0] == er([conv1d, linear], 0.1)[1]
