"""Save a model whose weights contain zeros as a small file; load it back bit-exactly.

``save_sparse(model, path)`` writes every tensor of ``model.state_dict()`` (parameters and
buffers). A tensor is stored *sparse* -- its non-zero values plus their positions -- when that is
smaller than storing it as it is, otherwise *dense*. ``load_sparse(path, model)`` checks the file
and copies every tensor into a freshly built model of the same architecture.

File format, version 1 (all integers little-endian)::

    offset  size  field
    0       8     magic  b"GRANETSP"
    8       4     format version, uint32
    12      32    sha256 of everything from offset 44 to the end of the file
    44      8     header length H, uint64
    52      H     header: UTF-8 JSON  {"tensors": [entry, ...]}
    52+H    ...   payload: one block per tensor, in header order, no padding

A header entry is ``{"name", "dtype", "shape", "encoding", "nnz", "offset", "index_bytes"}``:
``dtype`` is the torch dtype name (``"float32"``, ``"bfloat16"`` ...), ``offset`` is where the
tensor's block starts in the payload, ``nnz`` the number of non-zero elements (the tensor's
sparsity is ``1 - nnz / numel``). A block holds the element bytes and then ``index_bytes`` bytes
of positions. Elements are raw little-endian bytes in row-major (C) order, so every dtype --
bfloat16 included -- round-trips bit for bit, with one exception: in a sparse-encoded tensor a
zero is not stored, so a ``-0.0`` comes back as ``+0.0``. Masking weights by multiplication
leaves a ``-0.0`` wherever a negative weight was pruned; keeping those signs would cost a bit
per zero, more than the rest of the file at high sparsity. NaN and inf are values like any other.

Encodings (chosen per tensor: the smallest, ``dense`` on a tie):

- ``dense``: all ``numel`` elements; no positions.
- ``bitmask``: the ``nnz`` non-zero elements, then one bit per element (1 = non-zero), packed
  little-endian bit order (``numpy.packbits(..., bitorder="little")``), ``ceil(numel / 8)`` bytes.
- ``gap8`` / ``gap16``: the ``nnz`` non-zero elements, then their flat positions as gaps: for each
  non-zero element, the number ``g`` of zeros since the previous one (or since the start) is
  written as ``g // M`` words equal to ``M`` followed by one word ``g % M``, with words of
  8 / 16 bits and ``M = 255`` / ``65535``. A word below ``M`` ends an element's gap, so the
  positions decode as a cumulative sum. At 98% sparsity this costs about one byte per non-zero
  weight, against 6.25 bytes for a bitmask; below ~88% sparsity the bitmask is smaller.

The file is read whole and its checksum verified before anything is decoded, so a truncated or
corrupted file is refused with a ``ValueError``, as is an unknown format version.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["FORMAT_VERSION", "inspect_sparse", "load_sparse", "save_sparse"]

FORMAT_VERSION = 1
MAGIC = b"GRANETSP"
_PREFIX = struct.Struct("<8sI32s")  # magic, version, sha256
_HEADER_LEN = struct.Struct("<Q")
ENCODINGS = ("dense", "bitmask", "gap8", "gap16")
_GAP_WORDS = {"gap8": np.dtype("<u1"), "gap16": np.dtype("<u2")}


def save_sparse(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model.state_dict()`` to ``path`` in the compact format described above.

    The file is written to a temporary name and renamed, so ``path`` is either the old file or
    the complete new one.
    """
    entries: list[dict[str, Any]] = []
    blocks: list[bytes] = []
    offset = 0
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise ValueError(
                f"state_dict entry {name!r} is not a dense (strided) tensor; "
                "save_sparse stores plain tensors only"
            )
        entry, block = _encode(tensor)
        entries.append({"name": name, **entry, "offset": offset})
        blocks.append(block)
        offset += len(block)
    header = json.dumps({"tensors": entries}, separators=(",", ":")).encode()
    body = b"".join([_HEADER_LEN.pack(len(header)), header, *blocks])
    data = _PREFIX.pack(MAGIC, FORMAT_VERSION, hashlib.sha256(body).digest()) + body

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_sparse(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Copy the tensors stored at ``path`` into ``model`` (in place) and return ``model``.

    ``model`` must have exactly the file's tensors, with the same shapes and dtypes; otherwise a
    ``ValueError`` names the first tensor that differs. Values come back bit-exactly (zeros of
    sparse-encoded tensors as ``+0.0``, see the module docstring).
    """
    header, payload = _read(path)
    state = model.state_dict()
    stored = {entry["name"]: entry for entry in header["tensors"]}
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
                f"{str(tensor.dtype).removeprefix('torch.')} in the model; convert the model "
                "first (e.g. model.half())"
            )
    for name in stored:
        if name not in state:
            raise ValueError(f"{path}: the file has tensor {name!r}, the model does not")
    model.load_state_dict({name: _decode(entry, payload, path) for name, entry in stored.items()})
    return model


def inspect_sparse(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a file written by :func:`save_sparse`, checksum verified.

    Returns ``{"version", "bytes", "tensors"}``; each tensor is its header entry plus ``numel``,
    ``sparsity`` (``1 - nnz / numel``, 0 for empty tensors) and ``bytes`` (its block's size).
    """
    header, _ = _read(path)
    tensors = []
    for entry in header["tensors"]:
        numel = math.prod(entry["shape"])
        tensors.append(
            {
                **entry,
                "numel": numel,
                "sparsity": 1 - entry["nnz"] / numel if numel else 0.0,
                "bytes": _values_bytes(entry) + entry["index_bytes"],
            }
        )
    return {"version": FORMAT_VERSION, "bytes": Path(path).stat().st_size, "tensors": tensors}


def _encode(tensor: torch.Tensor) -> tuple[dict[str, Any], bytes]:
    """Header fields (without name and offset) and payload block of one tensor."""
    itemsize = tensor.element_size()
    numel = tensor.numel()
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy()
    elements = raw.reshape(numel, itemsize)
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
    sparse_encoding = min(index_sizes, key=index_sizes.__getitem__)
    meta = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
    if nnz * itemsize + index_sizes[sparse_encoding] >= numel * itemsize:
        return {**meta, "encoding": "dense", "nnz": nnz, "index_bytes": 0}, raw.tobytes()
    if sparse_encoding == "bitmask":
        index = np.packbits(nonzero, bitorder="little")
    else:
        index = _gap_encode(gaps, _GAP_WORDS[sparse_encoding])
    entry = {**meta, "encoding": sparse_encoding, "nnz": nnz, "index_bytes": index.nbytes}
    return entry, elements[nonzero].tobytes() + index.tobytes()


def _decode(entry: dict[str, Any], payload: memoryview, path: str | os.PathLike) -> torch.Tensor:
    dtype = _dtype(entry)
    shape = entry["shape"]
    numel = math.prod(shape)
    itemsize = dtype.itemsize
    start = entry["offset"]
    end = start + _values_bytes(entry)
    values = np.frombuffer(payload[start:end], dtype=np.uint8)
    out = torch.empty(numel * itemsize, dtype=torch.uint8)
    if entry["encoding"] == "dense":
        out.numpy()[:] = values
    else:
        index = payload[end : end + entry["index_bytes"]]
        if entry["encoding"] == "bitmask":
            bits = np.frombuffer(index, dtype=np.uint8)
            nonzero = np.unpackbits(bits, count=numel, bitorder="little").astype(bool)
            positions = np.flatnonzero(nonzero)
        else:
            positions = _gap_decode(np.frombuffer(index, dtype=_GAP_WORDS[entry["encoding"]]))
        if len(positions) != entry["nnz"] or (len(positions) and positions[-1] >= numel):
            raise ValueError(f"{path}: positions of tensor {entry['name']!r} are inconsistent")
        elements = out.zero_().numpy().reshape(numel, itemsize)
        elements[positions] = values.reshape(-1, itemsize)
    return out.view(dtype).reshape(shape)


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


def _values_bytes(entry: dict[str, Any]) -> int:
    count = math.prod(entry["shape"]) if entry["encoding"] == "dense" else entry["nnz"]
    return count * _dtype(entry).itemsize


def _dtype(entry: dict[str, Any]) -> torch.dtype:
    dtype = getattr(torch, entry["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"tensor {entry['name']!r} has unknown dtype {entry['dtype']!r}")
    return dtype


def _read(path: str | os.PathLike) -> tuple[dict[str, Any], memoryview]:
    """The verified header and the payload of a file."""
    data = Path(path).read_bytes()
    if data[: len(MAGIC)] != MAGIC:
        raise ValueError(f"{path} is not a granet sparse model file (bad magic bytes)")
    if len(data) < _PREFIX.size + _HEADER_LEN.size:
        raise ValueError(f"{path} is truncated ({len(data)} bytes)")
    _, version, digest = _PREFIX.unpack_from(data)
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {version}; this granet reads version {FORMAT_VERSION} "
            "only (upgrade granet, or re-export the model)"
        )
    body = memoryview(data)[_PREFIX.size :]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError(f"{path} is truncated or corrupted (sha256 checksum mismatch)")
    (header_len,) = _HEADER_LEN.unpack_from(body)
    header = json.loads(bytes(body[_HEADER_LEN.size : _HEADER_LEN.size + header_len]))
    payload = body[_HEADER_LEN.size + header_len :]
    for entry in header["tensors"]:
        if entry["encoding"] not in ENCODINGS:
            raise ValueError(f"{path}: tensor {entry['name']!r} has unknown encoding")
        if entry["offset"] + _values_bytes(entry) + entry["index_bytes"] > len(payload):
            raise ValueError(f"{path}: tensor {entry['name']!r} lies past the end of the file")
    return header, payload
