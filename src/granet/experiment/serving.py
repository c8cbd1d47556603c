"""Serving a trained run: export it as a small sparse file, time its sparse CPU inference.

``granet export RUN_DIR --out FILE`` calls :func:`export_run`, ``granet bench-inference RUN_DIR``
calls :func:`bench_inference`; both load the run's best model with
``granet.experiment.records.load_run_model``.

A dense run (no zero in any weight) is still exported, with a warning: its file holds every
tensor as it is and is about as large as ``torch.save``'s. Exporting a dense baseline next to
its sparse siblings is a fair thing to want, so it is not an error.
"""

from __future__ import annotations

import copy
import io
import os
import statistics
import warnings
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from granet.export import inspect_sparse, save_sparse
from granet.inference import interleaved_times, sparse_inference, sparse_layers
from granet.masks import sparsity_of

__all__ = ["bench_inference", "bench_model", "export_model", "export_run"]


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike) -> dict[str, Any]:
    """Write the best model of the run in ``run_dir`` to ``out`` (see :func:`export_model`)."""
    model, meta = _load(run_dir)  # meta: the run's settings, its N:M pattern among them
    return export_model(model, out, pattern=meta.get("pattern"))


def bench_inference(
    run_dir: str | os.PathLike, batch_sizes: Sequence[int] = (1, 128)
) -> list[dict[str, Any]]:
    """Dense vs :func:`~granet.inference.sparse_inference` latency of the run's best model, the
    sparse layers chosen by the rule (see :func:`bench_model`)."""
    model, meta = _load(run_dir)
    return bench_model(model, _input_shape(model, meta), batch_sizes)


def export_model(
    model: nn.Module, out: str | os.PathLike, pattern: str | None = None
) -> dict[str, Any]:
    """Save ``model`` with :func:`~granet.export.save_sparse`; sizes and sparsity of the file.

    Returns ``out``, ``bytes``, ``torch_save_bytes`` (``torch.save(model.state_dict())``),
    ``ratio`` (their quotient), ``weight_sparsity`` (zero fraction of the tensors with two or
    more dimensions), ``sparse_tensors`` (how many are stored sparse) and ``tensors``.
    """
    save_sparse(model, out, pattern=pattern)
    info = inspect_sparse(out)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    tensors = info["tensors"]
    weights = [t for t in tensors if len(t["shape"]) > 1]
    numel = sum(t["numel"] for t in weights)
    sparse = sum(t["encoding"] != "dense" for t in tensors)
    if not sparse:
        warnings.warn(
            f"{out}: no tensor has enough zeros to be stored sparse (a dense model?); "
            "the file holds every tensor as it is",
            stacklevel=2,
        )
    return {
        "out": str(out),
        "bytes": info["bytes"],
        "torch_save_bytes": buffer.tell(),
        "ratio": info["bytes"] / buffer.tell(),
        "weight_sparsity": sparsity_of(sum(t["nnz"] for t in weights), numel),
        "sparse_tensors": sparse,
        "tensors": len(tensors),
    }


def bench_model(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 128),
    repeats: int = 15,
    min_sample_s: float = 5e-3,
    probe: bool = False,
) -> list[dict[str, Any]]:
    """Time ``model`` (eval mode) against its sparse-inference copy on random inputs.

    ``input_shape`` is one example's shape (no batch dimension). Which layers run sparse:
    :func:`~granet.inference.sparse_inference`'s documented rule by default, so that every
    run of a model compares the same two models; ``probe=True`` times each layer instead (its
    choice may change with the machine's load from one run to the next), per batch size and
    told the real input shape. One row per batch size: medians of ``repeats`` interleaved
    samples, in milliseconds, and the speed-up; a copy in which no layer runs sparse is the
    model itself, so its row has ``sparse_ms`` and ``speedup`` None (nothing to compare).
    """
    dense = copy.deepcopy(model).eval()
    layers = sum(type(m) in (nn.Linear, nn.Conv2d) for m in dense.modules())
    rows = []
    for batch_size in batch_sizes:
        x = torch.randn(batch_size, *input_shape)
        sparse = sparse_inference(dense, probe=probe, batch_size=batch_size, example_input=x)
        csr = len(sparse_layers(sparse))
        fns = [partial(dense, x), partial(sparse, x)] if csr else [partial(dense, x)]
        with torch.inference_mode():
            times = interleaved_times(fns, repeats, min_sample_s)
        dense_ms = statistics.median(times[0]) * 1e3
        sparse_ms = statistics.median(times[1]) * 1e3 if csr else None
        rows.append(
            {
                "batch_size": batch_size,
                "dense_ms": dense_ms,
                "sparse_ms": sparse_ms,
                "speedup": dense_ms / sparse_ms if sparse_ms else None,
                "csr_layers": f"{csr}/{layers}",
                "threads": torch.get_num_threads(),
            }
        )
    return rows


def _load(run_dir: str | os.PathLike) -> tuple[nn.Module, dict[str, Any]]:
    from granet.experiment.checkpoints import checkpoint_path
    from granet.experiment.folder import is_run_dir
    from granet.experiment.records import load_run_model

    best = checkpoint_path(run_dir, "best")
    if is_run_dir(run_dir) and not best.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no best model yet: {best} is written when an epoch at the target "
            "sparsity ends (the last epoch at the latest); let the run go on "
            f"(granet train --resume {run_dir})"
        )
    return load_run_model(Path(run_dir), which="best")


def _input_shape(model: nn.Module, meta: dict[str, Any]) -> tuple[int, ...]:
    """One example's shape: from the run's ``data_shape`` if recorded, else from a model whose
    first layer is Linear."""
    data_shape = meta.get("data_shape")
    if data_shape:
        side = data_shape["image_size"]
        return (data_shape["in_channels"], side, side)
    first = next((m for m in model.modules() if type(m) in (nn.Linear, nn.Conv2d)), None)
    if isinstance(first, nn.Linear):
        return (first.in_features,)
    raise ValueError(
        "cannot tell the model's input shape: the run's metadata has no 'data_shape' "
        "(in_channels, image_size) and the first layer is not Linear"
    )
