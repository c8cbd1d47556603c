"""CSR pieces shared by training (:mod:`granet.compute`) and serving (:mod:`granet.inference`).

Both run ``nn.Linear`` layers on torch's CPU CSR kernels and agree on what those kernels take
(float32/float64), on the index dtype that makes MKL fastest (int32 where it fits), on the size
below which a layer stays dense under their rules (2**18 weights, measured for each), and on
silencing torch's "CSR support is in beta" warning for the kernels they test.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch

CSR_DTYPES = (torch.float32, torch.float64)  # the dtypes the CPU CSR kernels support
MIN_NUMEL = 2**18  # the fewest weights a layer has for compute="auto" / sparse_inference's rule


def index_dtype(nnz: int) -> torch.dtype:
    """The index dtype of a CSR with ``nnz`` entries: int32 when it fits, since MKL converts
    int64 indices on every call (1.4x slower at 98% sparsity)."""
    return torch.int32 if nnz < 2**31 else torch.int64


@contextlib.contextmanager
def quiet_csr() -> Iterator[None]:
    """Silence torch's "CSR support is in beta" warning: the CSR kernels used here are tested."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        yield
