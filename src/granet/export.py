"""Save a model whose weights contain zeros as a small safetensors file; load it back bit-exactly.

``save_sparse(model, path)`` writes every tensor of ``model.state_dict()`` (parameters and
buffers). A tensor is stored *sparse* -- its non-zero values plus their positions -- when that is
smaller than storing it as it is, otherwise *dense*. ``load_sparse(path, model)`` checks the file
and copies every tensor into a freshly built model of the same architecture.

The file is a `safetensors <https://github.com/huggingface/safetensors>`_ file (format version
2): no pickle, readable with ``safetensors.safe_open`` (memory-mapped) or ``load_file`` from any
language with a safetensors reader. Its tensors, for a state-dict entry ``name``:

- ``name``: a tensor stored ``dense``, as it is;
- ``name:values`` and ``name:positions``: a tensor stored sparse, its ``nnz`` non-zero elements
  (1-D, row-major (C) order) and their positions in one of the encodings below;
- nothing for an ``alias``: an entry that is the very tensor of an earlier one (a tied weight,
  such as GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``), stored once.

Elements keep their dtype where safetensors has it (float64/32/16, bfloat16, int64/32/16/8,
uint8, bool); any other dtype is stored as its raw bytes (``uint8``), the true dtype in the
layout. Every dtype round-trips bit for bit (NaN payloads, infinities, subnormals), with one
exception: in a sparse-encoded tensor a zero is not stored, so a ``-0.0`` comes back as ``+0.0``.
Masking weights by multiplication leaves a ``-0.0`` wherever a negative weight was pruned;
keeping those signs would cost a bit per zero, more than the rest of the file at high sparsity.

The file's metadata (safetensors' string-to-string ``__metadata__``):

- ``format``: ``"granet.sparse"``; ``format_version``: ``"2"``;
- ``layout``: JSON, one entry per state-dict entry in order, ``{"name", "dtype", "shape",
  "encoding", "nnz"}`` (``"of"``, the name it repeats, for an alias); ``dtype`` is the torch dtype
  name, ``nnz`` the number of non-zero elements (the tensor's sparsity is ``1 - nnz / numel``);
  with ``save_sparse(..., pattern="2:4")``, the entries of the tensors whose non-zeros hold that
  N:M pattern along dim 1 (the input dimension of ``nn.Linear`` and convolution weights) also
  carry ``"pattern": "2:4"``;
- ``pattern``: the N:M pattern the model was trained with, when ``save_sparse`` was given one;
- ``checksum``: ``"sha256:"`` and the hex digest of the layout's UTF-8 bytes followed, for every
  stored tensor in sorted name order, by its name's UTF-8 bytes, a zero byte and its raw bytes.

Encodings of positions (chosen per tensor: the smallest, ``dense`` on a tie):

- ``bitmask``: one bit per element (1 = non-zero), packed little-endian bit order
  (``numpy.packbits(..., bitorder="little")``), ``ceil(numel / 8)`` bytes, ``uint8``.
- ``gap8`` / ``gap16``: the flat positions as gaps: for each non-zero element, the number ``g``
  of zeros since the previous one (or since the start) is written as ``g // M`` words equal to
  ``M`` followed by one word ``g % M``, with ``uint8`` / ``uint16`` words and ``M = 255`` /
  ``65535``. A word below ``M`` ends an element's gap, so the positions decode as a cumulative
  sum. At 98% sparsity this costs about one byte per non-zero weight, against 6.25 bytes for a
  bitmask; below ~88% sparsity the bitmask is smaller.

The checksum is verified before anything is decoded, so a truncated or corrupted file is refused
with a one-line ``ValueError``, as is an unknown format version or a model that does not match.

Files of format version 1 (granet 0.1's own container, ``GRANETSP`` magic bytes, the same
encodings) are still read by ``load_sparse`` and ``inspect_sparse``; ``save_sparse`` writes
version 2 only.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from granet import patterns
from granet.masks import sparsity_of

__all__ = ["FORMAT_VERSION", "inspect_sparse", "load_sparse", "save_sparse"]

FORMAT = "granet.sparse"
FORMAT_VERSION = 2
ENCODINGS = ("dense", "bitmask", "gap8", "gap16", "alias")
_GAP_WORDS = {"gap8": np.dtype("<u1"), "gap16": np.dtype("<u2")}
_POSITION_DTYPES = {"gap8": torch.uint8, "gap16": torch.uint16}
# dtypes safetensors stores as themselves; others are stored as their bytes
_TYPED = {
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
}
# version 1: magic, version, sha256, then a JSON header and one byte block per tensor
_V1_MAGIC = b"GRANETSP"
_V1_PREFIX = struct.Struct("<8sI32s")
_V1_HEADER_LEN = struct.Struct("<Q")


def save_sparse(model: nn.Module, path: str | os.PathLike, *, pattern: str | None = None) -> None:
    """Write ``model.state_dict()`` to ``path`` in the format described above.

    ``pattern`` (``"2:4"``, any ``"N:M"``) records the N:M pattern the model was trained with,
    and marks each tensor that holds it. The file is written to a temporary name and renamed,
    so ``path`` is either the old file or the complete new one.
    """
    from safetensors.torch import save

    nm = None if pattern is None else patterns.parse(pattern)
    layout: list[dict[str, Any]] = []
    stored: dict[str, torch.Tensor] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise ValueError(
                f"state_dict entry {name!r} is not a dense (strided) tensor; "
                "save_sparse stores plain tensors only"
            )
        meta = {"name": name, "dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape)}
        same = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())
        if tensor.numel() and same in seen:
            layout.append({**meta, "encoding": "alias", "nnz": 0, "of": seen[same]})
            continue
        seen[same] = name
        encoding, nnz, parts = _encode(tensor)
        layout.append({**meta, "encoding": encoding, "nnz": nnz})
        if nm is not None and tensor.is_floating_point() and patterns.holds(tensor, nm):
            layout[-1]["pattern"] = str(nm)
        for key, part in zip(_keys(name, encoding), parts):
            if key in stored:
                raise ValueError(f"state_dict entry {name!r} clashes with the stored {key!r}")
            stored[key] = part
    layout_json = json.dumps(layout, separators=(",", ":"))
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "layout": layout_json,
        "checksum": _checksum(layout_json, stored.items()),
        **({} if nm is None else {"pattern": str(nm)}),
    }

    path = Path(path)
    data = save(stored, metadata=metadata)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        # a new file ("x"), so its mode follows the umask as torch.save's does (mkstemp's is 0600)
        with open(tmp, "xb") as f:
            try:
                # serialised in memory, written by Python: a full disk is an OSError, not a
                # SafetensorError
                f.write(data)
                f.close()
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    except OSError as e:  # named by the file meant, not the temporary one
        raise OSError(e.errno, f"cannot write it: {e.strerror}", str(path)) from None


def load_sparse(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Copy the tensors stored at ``path`` into ``model`` (in place) and return ``model``.

    ``model`` must have exactly the file's tensors, with the same shapes and dtypes; otherwise a
    ``ValueError`` names the first tensor that differs. Values come back bit-exactly (zeros of
    sparse-encoded tensors as ``+0.0``, see the module docstring).
    """
    layout, tensors, _ = _read(path)
    state = model.state_dict()
    stored = {entry["name"]: entry for entry in layout}
    for name, tensor in state.items():
        if name not in stored:
            raise ValueError(f"{path}: the model has tensor {name!r}, the file does not")
        entry = stored[name]
        if tuple(entry["shape"]) != tuple(tensor.shape):
            raise ValueError(
                f"{path}: tensor {name!r} has shape {tuple(entry['shape'])} in the file "
                f"but {tuple(tensor.shape)} in the model"
            )
        if _dtype(entry) != tensor.dtype:
            raise ValueError(
                f"{path}: tensor {name!r} is {entry['dtype']} in the file but "
                f"{_dtype_name(tensor.dtype)} in the model; convert the model first "
                "(e.g. model.half())"
            )
    for name in stored:
        if name not in state:
            raise ValueError(f"{path}: the file has tensor {name!r}, the model does not")
    values: dict[str, torch.Tensor] = {}
    for entry in layout:
        if entry["encoding"] == "alias":
            values[entry["name"]] = values[entry["of"]]
        else:
            values[entry["name"]] = _decode(entry, tensors, path)
    model.load_state_dict(values)
    return model


def inspect_sparse(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a file written by :func:`save_sparse`, checksum verified.

    Returns ``{"version", "bytes", "pattern", "tensors"}`` (``pattern``: the N:M pattern of
    the tensors marked with one, else None); each tensor is its layout entry plus ``numel``,
    ``sparsity`` (``1 - nnz / numel``, 0 for empty tensors) and ``bytes`` (what it stores: 0
    for an alias).
    """
    layout, tensors, version = _read(path)
    out = []
    for entry in layout:
        numel = math.prod(entry["shape"])
        if entry["encoding"] == "alias":
            nnz = next(e["nnz"] for e in layout if e["name"] == entry["of"])
        else:
            nnz = entry["nnz"]
        stored = sum(tensors[k].nbytes for k in _keys(entry["name"], entry["encoding"]))
        out.append(
            {
                **entry,
                "nnz": nnz,
                "numel": numel,
                "sparsity": sparsity_of(nnz, numel),
                "bytes": stored,
            }
        )
    marked = sorted({e["pattern"] for e in layout if e.get("pattern")})
    return {
        "version": version,
        "bytes": Path(path).stat().st_size,
        "pattern": ", ".join(marked) or None,
        "tensors": out,
    }


# ----------------------------------------------------------------------------- encoding
def _keys(name: str, encoding: str) -> tuple[str, ...]:
    """The names a state-dict entry is stored under."""
    if encoding == "alias":
        return ()
    if encoding == "dense":
        return (name,)
    return (f"{name}:values", f"{name}:positions")


def _encode(tensor: torch.Tensor) -> tuple[str, int, list[torch.Tensor]]:
    """The encoding of one tensor, its non-zero count and the tensors it is stored as."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    numel, itemsize = flat.numel(), flat.element_size()
    nonzero = (flat != 0).numpy()
    positions = np.flatnonzero(nonzero)
    nnz = len(positions)

    gaps = np.diff(positions, prepend=-1) - 1
    index_sizes = {
        "bitmask": (numel + 7) // 8,
        **{
            enc: (nnz + int((gaps // _max_word(word)).sum())) * word.itemsize
            for enc, word in _GAP_WORDS.items()
        },
    }
    encoding = min(index_sizes, key=index_sizes.__getitem__)
    if nnz * itemsize + index_sizes[encoding] >= numel * itemsize:
        # a copy: safetensors refuses tensors that share memory, as tied weights' views do
        return "dense", nnz, [_storable(flat.reshape(tensor.shape).clone())]
    if encoding == "bitmask":
        index = np.packbits(nonzero, bitorder="little")
    else:
        index = _gap_encode(gaps, _GAP_WORDS[encoding])
    # the values are taken byte for byte, so that no element passes through arithmetic
    elements = flat.view(torch.uint8).reshape(numel, itemsize)[torch.from_numpy(nonzero)]
    values = elements.reshape(-1).view(flat.dtype)
    return encoding, nnz, [_storable(values), torch.from_numpy(index)]


def _decode(
    entry: dict[str, Any], tensors: dict[str, torch.Tensor], path: str | os.PathLike
) -> torch.Tensor:
    dtype, shape = _dtype(entry), entry["shape"]
    numel = math.prod(shape)
    if entry["encoding"] == "dense":
        return _typed(tensors[entry["name"]], dtype).reshape(shape)
    values = tensors[f"{entry['name']}:values"]
    index = tensors[f"{entry['name']}:positions"].reshape(-1).numpy()
    if entry["encoding"] == "bitmask":
        nonzero = np.unpackbits(index, count=numel, bitorder="little").astype(bool)
        positions = np.flatnonzero(nonzero)
    else:
        positions = _gap_decode(index)
    # every position, not only the last: a value must never land at another index
    if len(positions) != entry["nnz"] or (
        len(positions)
        and (positions[0] < 0 or positions[-1] >= numel or not np.all(np.diff(positions) > 0))
    ):
        raise ValueError(f"{path}: positions of tensor {entry['name']!r} are inconsistent")
    itemsize = dtype.itemsize
    out = torch.zeros(numel, itemsize, dtype=torch.uint8)
    out[torch.from_numpy(positions)] = _typed(values, dtype).view(torch.uint8).reshape(-1, itemsize)
    return out.reshape(-1).view(dtype).reshape(shape)


def _storable(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as safetensors can store it: itself, or its bytes."""
    tensor = tensor.contiguous()
    if tensor.dtype in _TYPED:
        return tensor
    return tensor.reshape(-1).view(torch.uint8)


def _typed(stored: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stored tensor as ``dtype`` (from its bytes where it was stored as bytes), flat."""
    return stored.reshape(-1).view(dtype) if stored.dtype != dtype else stored.reshape(-1)


def _max_word(word: np.dtype) -> int:
    return int(np.iinfo(word).max)


def _gap_encode(gaps: np.ndarray, word: np.dtype) -> np.ndarray:
    """Each gap ``g`` as ``g // M`` words ``M`` and then ``g % M`` (see the module docstring)."""
    m = _max_word(word)
    words_per_gap = gaps // m + 1
    out = np.full(int(words_per_gap.sum()), m, dtype=word)
    out[np.cumsum(words_per_gap) - 1] = gaps % m
    return out


def _gap_decode(words: np.ndarray) -> np.ndarray:
    """Flat positions from gap words: a word ``w < M`` advances ``w + 1`` and marks an element."""
    w = words.astype(np.int64)
    ends = w < _max_word(words.dtype)
    return np.cumsum(w + ends)[ends] - 1


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(entry: dict[str, Any]) -> torch.dtype:
    dtype = getattr(torch, entry["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"tensor {entry['name']!r} has unknown dtype {entry['dtype']!r}")
    return dtype


def _checksum(layout: str, tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256(layout.encode())
    for key, tensor in sorted(tensors, key=lambda kv: kv[0]):
        digest.update(key.encode() + b"\0")
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return f"sha256:{digest.hexdigest()}"


# ------------------------------------------------------------------------------ reading
def _read(
    path: str | os.PathLike,
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], int]:
    """The verified layout, the stored tensors by name and the format version of a file."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:8] == _V1_MAGIC:
        return _read_v1(path)
    if len(head) < 9 or head[8:9] != b"{":
        raise ValueError(f"{path} is not a granet sparse model file (neither safetensors nor v1)")
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (no dict)
    except Exception as e:  # safetensors' parse errors, of several types
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is truncated or corrupted ({reason})") from None
    if metadata.get("format") != FORMAT:
        if "checksum" in metadata or "layout" in metadata:  # granet's, with a damaged header
            raise ValueError(f"{path} is truncated or corrupted (no granet format field)")
        raise ValueError(f"{path} is a safetensors file but not a granet sparse model file")
    version = metadata.get("format_version")
    if version is None:  # granet writes it always: a damaged header
        raise ValueError(f"{path} is truncated or corrupted (no format version field)")
    if version != str(FORMAT_VERSION):
        raise ValueError(
            f"{path} has format version {version}; this granet reads versions 1 and "
            f"{FORMAT_VERSION} (upgrade granet, or re-export the model)"
        )
    layout_json = metadata.get("layout", "")
    if _checksum(layout_json, tensors.items()) != metadata.get("checksum"):
        raise ValueError(f"{path} is truncated or corrupted (sha256 checksum mismatch)")
    try:
        layout = json.loads(layout_json)
    except ValueError:
        raise ValueError(f"{path}: its layout is not valid JSON") from None
    _check_layout(path, layout, tensors)
    return layout, tensors, FORMAT_VERSION


_LAYOUT_FIELDS = ("name", "dtype", "shape", "encoding", "nnz")


def _check_layout(
    path: str | os.PathLike,
    layout: Any,
    tensors: dict[str, torch.Tensor],
    as_bytes: bool = False,
) -> None:
    """Refuse a layout that :func:`save_sparse` cannot have written, or stored tensors that do not
    fit it (a checksum only proves that the file is as its writer made it, not who that was), so
    that decoding meets no surprise. ``as_bytes``: values are stored as bytes (version 1)."""
    if not isinstance(layout, list):
        raise ValueError(f"{path}: its layout is not a list of tensors")
    entries: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(layout):
        if not isinstance(entry, dict) or any(k not in entry for k in _LAYOUT_FIELDS):
            raise ValueError(
                f"{path}: layout entry {i} is not an object with {', '.join(_LAYOUT_FIELDS)}"
            )
        name = entry["name"]
        if not isinstance(name, str) or name in entries:
            raise ValueError(f"{path}: layout entry {i} has a bad or repeated name {name!r}")
        bad = _bad_entry(entry, entries, tensors, as_bytes)
        if bad:
            raise ValueError(f"{path}: tensor {name!r} {bad}")
        entries[name] = entry
    expected = {k for e in layout for k in _keys(e["name"], e["encoding"])}
    if expected != set(tensors):
        raise ValueError(f"{path}: the stored tensors do not match the layout")


def _bad_entry(
    entry: dict[str, Any],
    earlier: dict[str, dict[str, Any]],
    tensors: dict[str, torch.Tensor],
    as_bytes: bool = False,
) -> str | None:
    """What is wrong with one layout entry and the tensors it names, or ``None``."""
    shape, nnz, encoding = entry["shape"], entry["nnz"], entry["encoding"]
    dtype = getattr(torch, entry["dtype"], None) if isinstance(entry["dtype"], str) else None
    if not isinstance(dtype, torch.dtype):
        return f"has unknown dtype {entry['dtype']!r}"
    if not isinstance(shape, list) or not all(_natural(n) for n in shape):
        return f"has a bad shape {shape!r}"
    numel = math.prod(shape)
    if encoding not in ENCODINGS:
        return "has unknown encoding"
    if not _natural(nnz) or nnz > numel:
        return f"has a bad non-zero count {nnz!r}"
    if encoding == "alias":
        target = earlier.get(entry.get("of"))  # type: ignore[arg-type]
        if target is None or target["encoding"] == "alias":
            return f"is an alias of {entry.get('of')!r}, which no earlier stored tensor is"
        if (target["dtype"], target["shape"]) != (entry["dtype"], shape):
            return f"is an alias of {entry['of']!r}, which has another dtype or shape"
        return None
    word = torch.uint8 if as_bytes or dtype not in _TYPED else dtype
    sizes = {"dense": numel} if encoding == "dense" else {"values": nnz}
    for part, count in sizes.items():
        stored = tensors.get(entry["name"] if part == "dense" else f"{entry['name']}:{part}")
        if stored is None:
            return f"has no stored {part}"
        if stored.dtype != word or stored.nbytes != count * dtype.itemsize:
            return f"has stored {part} of another dtype or size than its layout says"
    if encoding != "dense":
        index = tensors.get(f"{entry['name']}:positions")
        if index is None:
            return "has no stored positions"
        if encoding == "bitmask":
            if index.dtype != torch.uint8 or index.numel() != (numel + 7) // 8:
                return "has a bit mask of another dtype or size than its shape needs"
        elif index.dtype != _POSITION_DTYPES[encoding]:
            return f"has {encoding} positions stored as {_dtype_name(index.dtype)}"
    return None


def _natural(value: Any) -> bool:
    """Whether ``value`` is an int >= 0 (JSON's ``true`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_v1(path: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], int]:
    """A version-1 file as the layout and stored tensors of version 2."""
    data = Path(path).read_bytes()
    if len(data) < _V1_PREFIX.size + _V1_HEADER_LEN.size:
        raise ValueError(f"{path} is truncated ({len(data)} bytes)")
    _, version, digest = _V1_PREFIX.unpack_from(data)
    if version != 1:
        raise ValueError(
            f"{path} has format version {version}; this granet reads versions 1 and "
            f"{FORMAT_VERSION} (upgrade granet, or re-export the model)"
        )
    body = memoryview(data)[_V1_PREFIX.size :]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError(f"{path} is truncated or corrupted (sha256 checksum mismatch)")
    try:
        layout, tensors = _v1_tensors(path, body)
    except (KeyError, TypeError, AttributeError, struct.error, ValueError) as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: its header is malformed ({type(e).__name__}: {e})") from None
    _check_layout(path, layout, tensors, as_bytes=True)
    return layout, tensors, 1


def _v1_tensors(
    path: str | os.PathLike, body: memoryview
) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    (header_len,) = _V1_HEADER_LEN.unpack_from(body)
    header = json.loads(bytes(body[_V1_HEADER_LEN.size : _V1_HEADER_LEN.size + header_len]))
    payload = np.frombuffer(body[_V1_HEADER_LEN.size + header_len :], dtype=np.uint8)
    layout, tensors = [], {}
    for entry in header["tensors"]:
        if entry["encoding"] not in ENCODINGS[:4]:
            raise ValueError(f"{path}: tensor {entry['name']!r} has unknown encoding")
        dense = entry["encoding"] == "dense"
        count = math.prod(entry["shape"]) if dense else entry["nnz"]
        start, size = entry["offset"], count * _dtype(entry).itemsize
        if not _natural(start) or not _natural(entry["index_bytes"]):
            raise ValueError(f"{path}: tensor {entry['name']!r} has a bad offset or index size")
        if start + size + entry["index_bytes"] > len(payload):
            raise ValueError(f"{path}: tensor {entry['name']!r} lies past the end of the file")
        blocks = [payload[start : start + size]]
        if not dense:
            index = payload[start + size : start + size + entry["index_bytes"]]
            blocks.append(index.view(_GAP_WORDS.get(entry["encoding"], np.uint8)))
        for key, block in zip(_keys(entry["name"], entry["encoding"]), blocks):
            tensors[key] = torch.from_numpy(block.copy())
        layout.append({k: entry[k] for k in ("name", "dtype", "shape", "encoding", "nnz")})
    return layout, tensors
