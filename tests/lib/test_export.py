"""save_sparse / load_sparse: bit-exact round trips, file size, the safetensors layout, files of
version 1, and refusal of bad files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
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
    _checksum,
    _decode,
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


@pytest.mark.skipif(os.name != "posix", reason="file modes and the umask are POSIX")
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_the_file_mode_follows_the_umask_as_torch_save(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_sparse(mlp(), tmp_path / "m.safetensors")
        torch.save(mlp().state_dict(), tmp_path / "m.pt")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "m.pt").stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.safetensors"]


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
V1 = Path(__file__).parents[1] / "data" / "mlp-90-v1.gnt"  # save_sparse of granet 0.1.0


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


# -------------------------------------------------------- crafted files, checksum valid
def every_encoding() -> nn.Module:
    """A module whose file has each encoding: gap8, gap16, bitmask, dense and an alias."""
    model = nn.Module()
    gap8 = torch.zeros(1000)
    gap8[[3, 200, 999]] = torch.tensor([1.0, -2.0, 3.0])
    gap16 = torch.zeros(3000)
    gap16[[5, 1500, 2999]] = 4.0
    model.register_buffer("g8", gap8)
    model.register_buffer("g16", gap16)
    model.register_buffer("bm", torch.arange(64.0) % 2)
    model.register_buffer("d", torch.arange(1.0, 5.0))
    model.register_buffer("tied", gap8)
    return model


def fresh_every_encoding() -> nn.Module:
    return every_encoding().apply(lambda m: [b.fill_(7) for b in m.buffers()])


def craft(tmp_path: Path, change) -> Path:
    """A file of :func:`every_encoding` whose layout, stored tensors and metadata ``change`` has
    edited, with a checksum that matches (as a hostile writer would make it)."""
    path = tmp_path / "m.safetensors"
    save_sparse(every_encoding(), path)
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        meta = f.metadata()
    layout = json.loads(meta["layout"])
    assert [e["encoding"] for e in layout] == ["gap8", "gap16", "bitmask", "dense", "alias"]
    entries = {e["name"]: e for e in layout}
    layout = change(layout, entries, tensors, meta)
    if layout is not None:
        meta["layout"] = layout if isinstance(layout, str) else json.dumps(layout)
        meta["checksum"] = _checksum(meta["layout"], tensors.items())
    save_file(tensors, path, metadata=meta)
    return path


def edit(name: str, /, **fields):
    def change(layout, entries, tensors, meta):
        entries[name].update(fields)
        return layout

    return change


def drop(name: str, field: str):
    def change(layout, entries, tensors, meta):
        del entries[name][field]
        return layout

    return change


def store(key: str, tensor: torch.Tensor | None):
    def change(layout, entries, tensors, meta):
        if tensor is None:
            del tensors[key]
        else:
            tensors[key] = tensor
        return layout

    return change


def whole(layout_json: str):
    return lambda layout, entries, tensors, meta: layout_json


def metadata(**fields):
    def change(layout, entries, tensors, meta):
        for key, value in fields.items():
            if value is None:
                del meta[key]
            else:
                meta[key] = value

    return change


CRAFTED = {
    "layout not JSON": whole("[{"),
    "layout a dict": whole("{}"),
    "layout entry not a dict": whole("[1]"),
    "no nnz": drop("g8", "nnz"),
    "no name": drop("d", "name"),
    "no shape": drop("bm", "shape"),
    "name not a string": edit("d", name=5),
    "repeated name": edit("g16", name="g8"),
    "dtype not a string": edit("d", dtype=7),
    "unknown dtype": edit("d", dtype="float99"),
    "dtype not a dtype": edit("d", dtype="Tensor"),
    "shape not a list": edit("d", shape="4"),
    "negative dimension": edit("d", shape=[-4]),
    "bool dimension": edit("d", shape=[True, 4]),
    "dense shape too big": edit("d", shape=[5]),
    "sparse shape too big": edit("g8", shape=[1001]),
    "bitmask shape too big": edit("bm", shape=[65]),
    "unknown encoding": edit("d", encoding="rle"),
    "negative nnz": edit("g8", nnz=-1),
    "nnz above numel": edit("g8", nnz=1001),
    "nnz a float": edit("g8", nnz=3.0),
    "nnz beside the values": edit("g8", nnz=2),
    "bitmask nnz beside its bits": edit("bm", nnz=33),
    "alias of nothing": edit("tied", of="nothing"),
    "alias of a later tensor": lambda layout, e, t, m: layout[::-1],
    "alias without of": drop("tied", "of"),
    "alias of another shape": edit("tied", shape=[10, 100]),
    "alias of another dtype": edit("tied", dtype="int32"),
    "no values": store("g8:values", None),
    "no positions": store("g16:positions", None),
    "no dense tensor": store("d", None),
    "extra tensor": store("extra", torch.zeros(2)),
    "values of another dtype": store("g8:values", torch.tensor([1.0, -2.0, 3.0]).double()),
    "values too few": store("g8:values", torch.tensor([1.0, -2.0])),
    "dense of another dtype": store("d", torch.arange(1, 5)),
    "dense too long": store("d", torch.arange(1.0, 6.0)),
    "signed gap words": store("g8:positions", torch.tensor([3, -100, 127], dtype=torch.int8)),
    "gap16 as bytes": store("g16:positions", torch.tensor([5, 0, 0], dtype=torch.uint8)),
    "positions past the end": store(
        "g8:positions", torch.tensor([3, 196, 255, 255, 255, 100], dtype=torch.uint8)
    ),
    "bitmask too short": store("bm:positions", torch.zeros(7, dtype=torch.uint8)),
    "bitmask not bytes": store("bm:positions", torch.zeros(8)),
    "no layout": metadata(layout=None),
    "no checksum": metadata(checksum=None),
    "no format": metadata(format=None),
}


# found only where the positions are decoded, by load_sparse
DECODED = ("positions past the end",)


@pytest.mark.parametrize("case", CRAFTED)
def test_a_crafted_file_is_refused_with_a_value_error_naming_it(tmp_path, case):
    path = craft(tmp_path, CRAFTED[case])
    reads = [lambda: load_sparse(path, fresh_every_encoding())]
    if case not in DECODED:
        reads.append(lambda: inspect_sparse(path))
    for read in reads:
        with pytest.raises(ValueError) as error:
            read()
        assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_the_crafted_files_start_from_a_good_one(tmp_path):
    path = craft(tmp_path, lambda layout, *_: layout)
    assert_same_state(every_encoding(), load_sparse(path, fresh_every_encoding()))


def raw_safetensors(header: object, data: bytes = b"") -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    return struct.pack("<Q", len(text)) + text.encode() + data


@pytest.mark.parametrize(
    "content",
    [
        raw_safetensors([]),
        raw_safetensors("[1, 2]"),
        raw_safetensors({"__metadata__": {"format": 5}}),
        raw_safetensors({"__metadata__": ["granet.sparse"]}),
        raw_safetensors({"x": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        raw_safetensors({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
        raw_safetensors({"x": {"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}}, b"\0" * 8),
        raw_safetensors({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
        raw_safetensors({"x": [0, 8]}, b"\0" * 8),
        struct.pack("<Q", 10**9) + b"{}",
    ],
    ids=[
        "header a list",
        "header a list of numbers",
        "metadata not strings",
        "metadata a list",
        "unknown dtype",
        "data past the end",
        "offsets backwards",
        "negative shape",
        "tensor not an object",
        "header past the end",
    ],
)
def test_a_malformed_safetensors_header_is_refused_naming_the_file(tmp_path, content):
    path = tmp_path / "m.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        load_sparse(path, mlp())
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_every_decoded_position_is_checked_not_only_the_last():
    # gap words of a signed type (the layout check refuses them first) decode to a negative
    # position and then a smaller one: both caught here as well
    entry = {"name": "w", "dtype": "float32", "shape": [10], "encoding": "gap8", "nnz": 3}
    stored = {
        "w:values": torch.ones(3),
        "w:positions": torch.tensor([-5, 2, -1], dtype=torch.int8),
    }
    assert list(_gap_decode(stored["w:positions"].numpy())) == [-5, -2, -2]
    with pytest.raises(ValueError, match="positions of tensor 'w' are inconsistent"):
        _decode(entry, stored, "m.safetensors")
    stored["w:positions"] = torch.tensor([7, -4, 1], dtype=torch.int8)
    assert list(_gap_decode(stored["w:positions"].numpy())) == [7, 4, 6]
    with pytest.raises(ValueError, match="positions of tensor 'w' are inconsistent"):
        _decode(entry, stored, "m.safetensors")


def crafted_v1(tmp_path: Path, change) -> Path:
    """The version-1 test file with its header edited by ``change`` and a matching checksum."""
    data = V1.read_bytes()
    prefix = struct.Struct("<8sI32s")
    body = data[prefix.size :]
    (length,) = struct.unpack_from("<Q", body)
    header = json.loads(body[8 : 8 + length])
    change(header["tensors"])
    text = json.dumps(header).encode()
    body = struct.pack("<Q", len(text)) + text + body[8 + length :]
    path = tmp_path / "m.gnt"
    path.write_bytes(prefix.pack(b"GRANETSP", 1, hashlib.sha256(body).digest()) + body)
    return path


def v1_edit(index: int, **fields):
    return lambda tensors: tensors[index].update(fields)


@pytest.mark.parametrize(
    "change",
    [
        v1_edit(0, nnz=331),
        v1_edit(0, nnz=-1),
        v1_edit(0, offset=-8),
        v1_edit(0, offset="0"),
        v1_edit(0, shape=[48, -64]),
        v1_edit(0, shape="48x64"),
        v1_edit(0, dtype="float99"),
        v1_edit(0, encoding="gap16"),
        v1_edit(1, shape=[47]),
        lambda tensors: tensors[0].pop("index_bytes"),
        lambda tensors: tensors.append(5),
    ],
    ids=[
        "nnz",
        "negative nnz",
        "negative offset",
        "offset a string",
        "negative dimension",
        "shape a string",
        "dtype",
        "encoding",
        "dense shape",
        "no index size",
        "entry not an object",
    ],
)
def test_a_crafted_version_1_file_is_refused_with_a_value_error_naming_it(tmp_path, change):
    path = crafted_v1(tmp_path, change)
    with pytest.raises(ValueError) as error:
        load_sparse(path, mlp())
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_the_crafted_version_1_files_start_from_a_good_one(tmp_path):
    path = crafted_v1(tmp_path, lambda tensors: None)
    assert_same_state(trained_like(mlp, 0.9, torch.float32), load_sparse(path, mlp()))
