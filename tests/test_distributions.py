import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from granet import masks
from granet.distributions import DISTRIBUTIONS, er, erk, global_magnitude, uniform
from granet.masks import pack_bits, random_mask, top_mask, unpack_bits

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


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(shape, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=g) > 0.5
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, shape), mask)


def test_unpack_rejects_wrong_size():
    with pytest.raises(ValueError, match="expected 2 uint8 bytes"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), (4, 4))


@pytest.mark.parametrize("path", ["topk", "rank", "kthvalue"])
@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.integers(-5, 5), min_size=1, max_size=200),  # many ties
    fraction=st.floats(0, 1),
)
def test_top_mask_selects_exactly_k_of_the_largest(path, values, fraction):
    scores = torch.tensor(values, dtype=torch.float32)
    k = round(fraction * len(values))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(masks, "CPU_TOPK_LIMIT", 0 if path == "kthvalue" else 2**24)
        mask = top_mask(scores, torch.tensor(k) if path == "rank" else k)
    assert int(mask.sum()) == k
    if 0 < k < len(values):
        assert scores[mask].min() >= scores[~mask].max()


def test_random_and_top_masks_have_exact_counts():
    g = torch.Generator().manual_seed(0)
    assert int(random_mask(torch.Size([7, 9]), 20, g).sum()) == 20
    assert bool(random_mask(torch.Size([3]), 5, g).all())
    scores = torch.tensor([0.3, 0.9, 0.1, 0.5])
    assert top_mask(scores, 2).tolist() == [False, True, False, True]
