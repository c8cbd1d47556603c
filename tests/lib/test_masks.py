import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from granet import masks
from granet.masks import apply_masks, pack_bits, random_mask, top_mask, unpack_bits


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


def test_apply_masks_zeroes_in_place_in_every_dtype():
    a, b = torch.ones(2, 3), torch.ones(4, dtype=torch.bfloat16)
    ma, mb = torch.tensor([[True, False, True], [False, True, True]]), torch.tensor([1, 0, 0, 1])
    apply_masks([a, b], [ma.float(), mb.to(torch.bfloat16)])
    assert torch.equal(a, ma.float()) and b.tolist() == [1, 0, 0, 1]


def test_the_sparsity_count_of_counts_tensors_and_nothing():
    weights = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    mask = torch.tensor([True, False, False, False])
    assert masks.nonzeros([weights, torch.zeros(3), mask]) == (3, 11)
    assert masks.density_of(3, 12) == 0.25 and masks.sparsity_of(3, 12) == 0.75
    assert masks.density_of(0, 0) == 1.0 and masks.sparsity_of(0, 0) == 0.0  # nothing pruned
    on_device = masks.density_of(mask.sum(), mask.numel())  # a count not read back stays a tensor
    assert torch.is_tensor(on_device) and on_device.item() == 0.25


def test_every_sparsity_granet_reports_is_the_one_count(tmp_path):
    import granet
    from granet import oneshot
    from granet.experiment.serving import export_model
    from granet.export import inspect_sparse

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10))
    sp = granet.sparsify(
        model, torch.optim.SGD(model.parameters(), lr=0.1), "static", sparsity=0.7, total_steps=10
    )
    counted = masks.sparsity_of(*masks.nonzeros(sp.masks.values()))
    assert sp.sparsity() == counted == oneshot.sparsity(sp.masks.values())
    for name, layer in sp.stats()["layers"].items():
        assert layer["density"] == masks.density_of(int(sp.masks[name].sum()), layer["numel"])
    exported = export_model(model, tmp_path / "model.safetensors")
    weights = [p for p in model.parameters() if p.dim() > 1]
    assert exported["weight_sparsity"] == masks.sparsity_of(*masks.nonzeros(weights))
    stored = {t["name"]: t for t in inspect_sparse(tmp_path / "model.safetensors")["tensors"]}
    for name, p in model.named_parameters():
        assert stored[name]["sparsity"] == masks.sparsity_of(*masks.nonzeros([p]))
