"""save_sparse / load_sparse: bit-exact round trips, file size, the safetensors layout, files of
version 1, and refusal of bad files."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from granet.export import (
    FORMAT_VERSION,
    _gap_decode,
    _gap_encode,
    inspect_sparse,
    load_sparse,
    save_sparse,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10)
    )


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def big_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 1000),
        nn.ReLU(),
        nn.Linear(1000, 1000),
        nn.ReLU(),
        nn.Linear(1000, 1000),
        nn.ReLU(),
        nn.Linear(1000, 10),
    )


def trained_like(build, sparsity: float, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A model whose Linear/Conv2d weights but the last are zeroed at ``sparsity`` by a random
    mask (multiplication, as sparse training does: pruned negative weights become -0.0), with
    BatchNorm statistics that are not the defaults."""
    torch.manual_seed(seed)
    model = build()
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.no_grad():
        for layer in layers[:-1]:
            layer.weight.mul_(torch.rand_like(layer.weight) >= sparsity)
        if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            model.train()(torch.randn(4, 1, 12, 12))
    return model.to(dtype).eval()


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor, with -0.0 written as +0.0 (which the format does not keep)."""
    canonical = torch.where(tensor == 0, torch.zeros_like(tensor), tensor)
    return canonical.contiguous().reshape(-1).view(torch.uint8)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert sa[name].shape == sb[name].shape, name
        assert torch.equal(bits(sa[name]), bits(sb[name])), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.98, 1.0])
@pytest.mark.parametrize("build", [mlp, cnn])
def test_round_trip_is_bit_exact(tmp_path, build, sparsity, dtype):
    model = trained_like(build, sparsity, dtype)
    path = tmp_path / "model.safetensors"
    save_sparse(model, path)
    fresh = trained_like(build, 0.0, dtype, seed=1)
    assert load_sparse(path, fresh) is fresh
    assert_same_state(model, fresh)


def test_every_tensor_comes_back_including_buffers(tmp_path):
    model = trained_like(cnn, 0.9, torch.float32)
    save_sparse(model, tmp_path / "m.safetensors")
    names = [t["name"] for t in inspect_sparse(tmp_path / "m.safetensors")["tensors"]]
    assert names == list(model.state_dict())
    assert "1.running_var" in names and "1.num_batches_tracked" in names


def test_special_values_and_odd_shapes_round_trip(tmp_path):
    model = nn.Module()
    special = torch.zeros(600)
    special[[0, 255, 256, 511, 599]] = torch.tensor([float("nan"), float("inf"), -1.5, 1e-40, -0.0])
    buffers = {
        "special": special,
        "scalar": torch.tensor(-0.0, dtype=torch.bfloat16),
        "empty": torch.empty(0, 3, dtype=torch.float16),
        "flags": torch.tensor([True, False] * 40),
        "counts": torch.tensor([0, 0, 7, 0], dtype=torch.int64),
        "transposed": torch.randn(8, 300).mul(torch.rand(8, 300) > 0.9).T,
    }
    for name, value in buffers.items():
        model.register_buffer(name, value)
    save_sparse(model, tmp_path / "m.safetensors")
    fresh = nn.Module()
    for name, value in buffers.items():
        fresh.register_buffer(name, torch.ones_like(value).contiguous())
    load_sparse(tmp_path / "m.safetensors", fresh)
    assert_same_state(model, fresh)
    assert torch.isnan(fresh.special[0])


def test_negative_zero_of_a_sparse_tensor_comes_back_as_positive_zero(tmp_path):
    model = nn.Module()
    model.register_buffer("w", torch.tensor([-0.0] * 99 + [2.0]))
    save_sparse(model, tmp_path / "m.safetensors")
    (entry,) = inspect_sparse(tmp_path / "m.safetensors")["tensors"]
    assert entry["encoding"] != "dense" and entry["nnz"] == 1
    load_sparse(tmp_path / "m.safetensors", model)
    assert not torch.signbit(model.w[:99]).any()


def test_encoding_is_chosen_per_tensor(tmp_path):
    model = nn.Module()
    halved = torch.randn(4000)
    halved[::2] = 0
    far = torch.zeros(200_000)
    far[[3, 150_000]] = 1.0
    sparse = torch.randn(4000).mul(torch.rand(4000) > 0.98)
    for name, value in {
        "dense": torch.randn(50),
        "halved": halved,
        "far": far,
        "sparse": sparse,
    }.items():
        model.register_buffer(name, value)
    save_sparse(model, tmp_path / "m.safetensors")
    encodings = {
        t["name"]: t["encoding"] for t in inspect_sparse(tmp_path / "m.safetensors")["tensors"]
    }
    assert encodings == {"dense": "dense", "halved": "bitmask", "far": "gap16", "sparse": "gap8"}
    fresh = nn.Module()
    for name, value in model.named_buffers():
        fresh.register_buffer(name, torch.empty_like(value))
    assert_same_state(model, load_sparse(tmp_path / "m.safetensors", fresh))


@given(
    st.sets(st.integers(0, 300_000), max_size=60).map(sorted),
    st.sampled_from([np.dtype("<u1"), np.dtype("<u2")]),
)
def test_gap_codec_round_trips_any_positions(positions, word):
    positions = np.array(positions, dtype=np.int64)
    gaps = np.diff(positions, prepend=-1) - 1
    assert np.array_equal(_gap_decode(_gap_encode(gaps, word)), positions)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_file_is_small_at_98_percent(tmp_path, dtype):
    torch.manual_seed(0)
    model = big_mlp().to(dtype)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(torch.rand_like(layer.weight) >= 0.98)
    save_sparse(model, tmp_path / "m.safetensors")
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert (tmp_path / "m.safetensors").stat().st_size <= 0.06 * buffer.tell()


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.safetensors"
    save_sparse(trained_like(mlp, 0.9, torch.float32), path)
    return path


@pytest.mark.parametrize(
    "anchor, offset",
    [(b'"layout":"', 20), (b'"format_version"', 3), (b"", -1), (b"", -500)],
    ids=["layout", "a key", "last byte", "payload"],
)
def test_corrupt_file_is_refused(saved, anchor, offset):
    data = bytearray(saved.read_bytes())
    # safetensors does not fix the order of the header's keys: found by content, not offset
    data[(data.index(anchor) if anchor else 0) + offset] ^= 0x01
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        load_sparse(saved, mlp())


@pytest.mark.parametrize("keep", [10, 50, 0.5, -1])
def test_truncated_file_is_refused(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(ValueError, match="truncated"):
        load_sparse(saved, mlp())


def test_unknown_version_is_refused(saved):
    rewrite(saved, format_version=str(FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}"):
        load_sparse(saved, mlp())


def test_other_files_are_refused(tmp_path):
    torch.save(mlp().state_dict(), tmp_path / "m.pt")
    with pytest.raises(ValueError, match="not a granet sparse model file"):
        load_sparse(tmp_path / "m.pt", mlp())


def test_model_missing_a_tensor_is_refused(saved):
    smaller = nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
    with pytest.raises(ValueError, match="'5.weight'"):
        load_sparse(saved, smaller)


def test_model_with_an_extra_tensor_is_refused(saved):
    bigger = mlp()
    bigger.register_buffer("extra", torch.zeros(3))
    with pytest.raises(ValueError, match="'extra'"):
        load_sparse(saved, bigger)


def test_wrong_shape_is_refused(saved):
    other = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 33), nn.ReLU(), nn.Linear(33, 10)
    )
    with pytest.raises(ValueError, match=r"'3\.weight' has shape \(32, 48\) in the file"):
        load_sparse(saved, other)


def test_wrong_dtype_is_refused(saved):
    with pytest.raises(ValueError, match="'1.weight' is float32 in the file but float16"):
        load_sparse(saved, mlp().half())


def test_sparse_layout_tensors_are_refused(tmp_path):
    model = nn.Module()
    model.register_buffer("w", torch.eye(3).to_sparse())
    with pytest.raises(ValueError, match="'w' is not a dense"):
        save_sparse(model, tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------- the safetensors file
def test_the_file_is_plain_safetensors(tmp_path):
    model = trained_like(mlp, 0.9, torch.float32)
    save_sparse(model, tmp_path / "m.safetensors")
    stored = load_file(tmp_path / "m.safetensors")  # no pickle, no granet
    weight = model[1].weight.detach()
    assert torch.equal(stored["1.weight:values"], weight[weight != 0])
    assert stored["1.weight:positions"].dtype in (torch.uint8, torch.uint16)
    assert torch.equal(stored["1.bias"], model[1].bias.detach())
    with safe_open(tmp_path / "m.safetensors", framework="pt") as f:  # memory-mapped
        meta = f.metadata()
        assert f.get_slice("1.weight:values").get_shape() == [int((weight != 0).sum())]
    assert (meta["format"], meta["format_version"]) == ("granet.sparse", str(FORMAT_VERSION))
    assert meta["checksum"].startswith("sha256:")
    layout = json.loads(meta["layout"])
    assert [e["name"] for e in layout] == list(model.state_dict())
    assert layout[0] == {
        "name": "1.weight",
        "dtype": "float32",
        "shape": [48, 64],
        "encoding": "gap8",
        "nnz": int((weight != 0).sum()),
    }


def test_a_tied_weight_is_stored_once(tmp_path):
    model = nn.Sequential(nn.Embedding(500, 16), nn.Linear(16, 500, bias=False))
    model[1].weight = model[0].weight
    save_sparse(model, tmp_path / "m.safetensors")
    tensors = inspect_sparse(tmp_path / "m.safetensors")["tensors"]
    assert [(t["encoding"], t.get("of")) for t in tensors] == [
        ("dense", None),
        ("alias", "0.weight"),
    ]
    assert tensors[1]["bytes"] == 0 and tensors[1]["nnz"] == 500 * 16
    fresh = nn.Sequential(nn.Embedding(500, 16), nn.Linear(16, 500, bias=False))
    load_sparse(tmp_path / "m.safetensors", fresh)
    assert torch.equal(fresh[0].weight, model[0].weight)
    assert torch.equal(fresh[1].weight, model[0].weight)


def test_dtypes_safetensors_lacks_round_trip_as_bytes(tmp_path):
    model = nn.Module()
    sparse = torch.zeros(300, dtype=torch.complex128)
    sparse[3], sparse[200] = 1 + 2j, -3j
    model.register_buffer("c", sparse)
    model.register_buffer("d", torch.randn(4, 3, dtype=torch.complex128))
    save_sparse(model, tmp_path / "m.safetensors")
    assert load_file(tmp_path / "m.safetensors")["d"].dtype == torch.uint8
    fresh = nn.Module()
    fresh.register_buffer("c", torch.ones(300, dtype=torch.complex128))
    fresh.register_buffer("d", torch.ones(4, 3, dtype=torch.complex128))
    assert_same_state(model, load_sparse(tmp_path / "m.safetensors", fresh))


def rewrite(path: Path, **metadata: str) -> None:
    """Write ``path`` again with some of its metadata replaced (as a tool might)."""
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        meta = {**f.metadata(), **metadata}
    save_file(tensors, path, metadata=meta)


def test_a_changed_layout_is_refused(saved):
    with safe_open(saved, framework="pt") as f:
        layout = json.loads(f.metadata()["layout"])
    layout[0]["nnz"] -= 1
    rewrite(saved, layout=json.dumps(layout))
    with pytest.raises(ValueError, match="corrupted"):
        load_sparse(saved, mlp())


def test_other_safetensors_files_are_refused(tmp_path):
    save_file(mlp().state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="safetensors file but not a granet sparse model file"):
        load_sparse(tmp_path / "model.safetensors", mlp())


# ---------------------------------------------------------------------- version 1 files
V1 = Path(__file__).parent / "data" / "mlp-90-v1.gnt"  # save_sparse of granet 0.1.0


def test_version_1_files_still_load():
    assert inspect_sparse(V1)["version"] == 1
    assert inspect_sparse(V1)["tensors"][0]["encoding"] == "gap8"
    assert_same_state(trained_like(mlp, 0.9, torch.float32), load_sparse(V1, mlp()))


def test_a_corrupt_version_1_file_is_refused(tmp_path):
    data = bytearray(V1.read_bytes())
    data[-100] ^= 0x01
    (tmp_path / "m.gnt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        load_sparse(tmp_path / "m.gnt", mlp())
    struct.pack_into("<I", data, 8, 7)
    (tmp_path / "m.gnt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="format version 7"):
        load_sparse(tmp_path / "m.gnt", mlp())
