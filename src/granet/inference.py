"""Serve a model whose weights contain zeros with sparse (CSR) kernels where they are faster.

:func:`sparse_inference` returns an eval-mode copy of a model in which every ``nn.Linear`` and
``nn.Conv2d`` that runs faster on a CSR weight is replaced by :class:`SparseLinear` /
:class:`SparseConv2d`; all other layers are left as they are. The decision is per layer:

- ``probe=True`` (default): time the dense layer against its CSR version on a random input of
  the layer's shape with ``batch_size`` rows (interleaved repeats, median of the paired
  ratios); CSR is kept if it is faster. A ``Linear`` layer's input shape is known from its
  weight; a ``Conv2d`` layer's spatial size is not, so convolutions are probed only when
  ``example_input`` is given (one forward pass records every layer's input shape) and follow
  the rule otherwise.
- ``probe=False``: the rule below, from measurements on this project's machine.

The formulation is ``addmm(bias, W_csr, x.T).T`` with int32 indices (one MKL sparse x dense
product with the bias fused; the result is a transposed view, which the next sparse layer
consumes without a copy). It beat ``x @ W_csr.T`` (3-30x slower than dense) and COO. Speed-up
of a CSR ``Linear`` over ``F.linear`` (float32, torch 2.13, medians of interleaved repeats):

==================  ======================  ======================================
layer, batch        1 thread (90/95/98%)    2 threads (earlier project measurement,
                                            quiet 2-core CPU; 90/95/98%)
==================  ======================  ======================================
1000 x 1000, 128    1.5x / 2.7x / 4.7x      1.35x / 2.4x / 4.3x
1000 x 1000, 1      0.9x / 1.5x / 2.2x
4096 x 4096, 1      1.6x / 3.0x / 6.0x      2.9x / 6.7x / 14.5x
6272 -> 256, 128    1.0x / 1.1x / 1.5x      0.92x / 1.5x / 2.2x
120 x 400, 128      0.8x / 1.1x / 1.3x
==================  ======================  ======================================

:class:`SparseConv2d` against ``nn.Conv2d`` (3x3, padding 1, 1 thread, 90/95/98%): 512 channels
on 4x4 maps 2.3x / 3.6x / 3.5x at batch 1 and 0.9x / 2.0x / 3.2x at batch 32; 256 channels on
8x8 maps 0.9x / 1.4x / 1.9x at batch 32; 64 channels on 16x16 maps 0.4x / 0.5x / 0.6x at batch 32.

On a 2-core CPU busy with other processes, two OpenMP threads can make the CSR product
milliseconds slower (a thread waits for a core at every parallel region) while small dense
products stay fast; the probe sees this, the rule cannot.

Hence the rule: a ``Linear`` layer on the CPU with density <= 5% and at least 2**18 weights
goes sparse. ``Conv2d`` stays dense under the rule: the CSR route needs ``unfold`` (im2col),
which alone takes longer than the whole dense (oneDNN) convolution on large feature maps
(LeNet-5, early ResNet layers); only the probe, which knows the feature map size, picks it.
Float16/bfloat16 layers stay dense: the CPU CSR kernels do not support them.

GPU: CSR products were measured 3-18x slower than dense on an H100 for these shapes, so the rule
keeps every layer dense on a GPU; the probe (run on the layer's own device) picks CSR only where
it measures faster. The GPU path has not been timed in this project's test suite.

2:4 layers: an ``nn.Linear`` whose weight holds the 2:4 pattern along its input dimension (at
most 2 non-zeros in every 4 consecutive weights, as ``pattern="2:4"`` trains it) with more than
a quarter of its weights non-zero (a much sparser layer holds 2:4 by chance; it is left to the
route above, as an unstructured one) runs on
``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt, or CUTLASS when torch is set to force
it) where that exists: a CUDA device of compute capability 8.0 or above, a dtype and shape the
kernel takes (float16/bfloat16/int8, float32 on CUTLASS; each dimension a multiple of the
kernel's minimum). Every other 2:4 layer stays on the route above, and :func:`sparse_inference`
says so in one warning with the reason (on a CPU: no N:M kernel exists); :func:`nm_plan` gives
the decision per layer without converting anything.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from granet.csr import CSR_DTYPES, MIN_NUMEL, index_dtype, quiet_csr
from granet.patterns import holds

__all__ = [
    "SEMI_STRUCTURED",
    "SparseConv2d",
    "SparseLinear",
    "interleaved_times",
    "nm_plan",
    "sparse_inference",
    "sparse_layers",
]

RULE_MAX_DENSITY = 0.05
RULE_MIN_NUMEL = MIN_NUMEL
RULE = (
    f"a CPU nn.Linear with at least 2**{RULE_MIN_NUMEL.bit_length() - 1} weights at a density "
    f"of at most {RULE_MAX_DENSITY:.0%} runs on CSR"
)
PROBE_REPEATS = 7
SEMI_STRUCTURED = "semi-structured"  # nm_plan's value for a layer that runs the 2:4 kernel


class _CSRLayer(nn.Module):
    """A 2-D weight held as CSR (three buffers) and the product ``bias + W @ cols``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        with quiet_csr():
            csr = weight.detach().to_sparse_csr()
        index = index_dtype(csr.values().numel())
        self.register_buffer("weight_crow", csr.crow_indices().to(index))
        self.register_buffer("weight_col", csr.col_indices().to(index))
        self.register_buffer("weight_values", csr.values())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.weight_shape = tuple(weight.shape)
        self._csr: torch.Tensor | None = None

    @property
    def density(self) -> float:
        return self.weight_values.numel() / max(1, math.prod(self.weight_shape))

    def _matmul(self, cols: torch.Tensor) -> torch.Tensor:
        """``W @ cols (+ bias)`` for ``cols`` of shape ``(in, n)``: shape ``(out, n)``."""
        if self._csr is None:  # built once: constructing it costs ~10 us per call
            with quiet_csr():
                self._csr = torch.sparse_csr_tensor(
                    self.weight_crow,
                    self.weight_col,
                    self.weight_values,
                    self.weight_shape,
                    check_invariants=True,  # once per build; guards against a bad state_dict
                )
        if self.bias is None:
            return torch.sparse.mm(self._csr, cols)
        return torch.addmm(self.bias.unsqueeze(1), self._csr, cols)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> _CSRLayer:
        self._csr = None  # .to()/.double()/... replace the buffers
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_csr": None}  # CSR tensors cannot be deep-copied or pickled


class SparseLinear(_CSRLayer):
    """``nn.Linear`` with its weight in CSR form; same inputs, same outputs."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear.weight, linear.bias)
        self.in_features = linear.in_features
        self.out_features = linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._matmul(x.reshape(-1, self.in_features).T).T
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + (
            f"density={self.density:.4f}, bias={self.bias is not None}"
        )


class SparseConv2d(_CSRLayer):
    """``nn.Conv2d`` (groups 1, zero padding) as ``unfold`` and a CSR product."""

    def __init__(self, conv: nn.Conv2d) -> None:
        if not _conv_supported(conv):
            raise ValueError(
                "SparseConv2d supports groups=1, padding_mode='zeros' and numeric padding; "
                f"got groups={conv.groups}, padding_mode={conv.padding_mode!r}, "
                f"padding={conv.padding!r}"
            )
        super().__init__(conv.weight.reshape(conv.out_channels, -1), conv.bias)
        self.out_channels = conv.out_channels
        self.kernel_size = conv.kernel_size
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batched = x.dim() == 4
        if not batched:
            x = x.unsqueeze(0)
        n, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        out = self._matmul(cols.transpose(0, 1).reshape(cols.shape[1], -1))
        ho, wo = (
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, s, p, d in zip(
                (h, w), self.kernel_size, self.stride, self.padding, self.dilation
            )
        )
        out = out.reshape(self.out_channels, n, ho, wo).transpose(0, 1)
        return out if batched else out.squeeze(0)

    def extra_repr(self) -> str:
        return (
            f"out_channels={self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"density={self.density:.4f}, bias={self.bias is not None}"
        )


def sparse_inference(
    model: nn.Module,
    *,
    probe: bool = True,
    batch_size: int = 128,
    example_input: torch.Tensor | None = None,
) -> nn.Module:
    """An eval-mode copy of ``model`` whose sparse enough Linear/Conv2d layers run on CSR.

    ``model`` itself is not modified. ``probe`` times each candidate layer at ``batch_size``
    (see the module docstring); ``probe=False`` applies the documented rule instead, which is
    deterministic. ``example_input`` (a batch the model accepts, any batch size) lets the probe
    learn the input shapes of convolutions. The copy computes the same function up to float
    rounding (the sums run in a different order).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    model = copy.deepcopy(model).eval()
    plan = nm_plan(model)
    _to_semi_structured(model, [n for n, why in plan.items() if why == SEMI_STRUCTURED])
    dense = {}
    for name, why in plan.items():
        if why != SEMI_STRUCTURED:
            dense.setdefault(why, []).append(name)
    if dense:
        warnings.warn(
            "granet: 2:4 layers without the semi-structured kernel (dense or CSR instead): "
            + "; ".join(f"{', '.join(names)} ({why})" for why, names in dense.items()),
            RuntimeWarning,
            stacklevel=2,
        )
    candidates = {
        name: module
        for name, module in model.named_modules()
        if plan.get(name) != SEMI_STRUCTURED and _sparse_class(module) is not None
    }
    shapes = _input_shapes(model, candidates, example_input) if probe else {}
    for name, module in candidates.items():
        sparse = _sparse_class(module)(module)
        shape = shapes.get(name)
        if shape is None and probe and isinstance(module, nn.Linear):
            shape = (batch_size, module.in_features)
        if shape is None:
            use_sparse = _rule(module)
        else:
            use_sparse = _probe(module, sparse, (batch_size, *shape[1:]))
        if use_sparse:
            model.set_submodule(name, sparse)
    return model


def nm_plan(model: nn.Module) -> dict[str, str]:
    """For every ``nn.Linear`` of ``model`` whose weight holds 2:4 at a density above 1/4:
    :data:`SEMI_STRUCTURED` where ``to_sparse_semi_structured`` can run it, else why not."""
    plan = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if type(module) is not nn.Linear or not isinstance(weight, torch.Tensor):
            continue
        if weight.layout != torch.strided or not holds(weight.detach(), "2:4"):
            continue
        if int(weight.count_nonzero()) * 4 <= weight.numel():
            continue
        plan[name] = semi_structured_reason(weight) or SEMI_STRUCTURED
    return plan


def semi_structured_reason(weight: torch.Tensor) -> str | None:
    """None if ``to_sparse_semi_structured`` takes this 2:4 weight on its device, else why not."""
    if weight.device.type != "cuda":
        return f"no N:M kernel on {weight.device.type}"
    major, minor = _capability(weight.device)
    if (major, minor) < (8, 0):
        return f"compute capability {major}.{minor} is below 8.0"
    kernel = _semi_structured_class()
    if kernel is None:
        return "torch has no semi-structured sparse kernel here (cuSPARSELt unavailable)"
    limits = kernel._DTYPE_SHAPE_CONSTRAINTS.get(weight.dtype)
    if limits is None:
        return f"{_dtype_name(weight.dtype)} is not a dtype of {kernel.__name__}"
    rows, cols = weight.shape
    if rows % limits.sparse_min_rows or cols % limits.sparse_min_cols:
        return (
            f"shape {rows}x{cols} is not a multiple of "
            f"{limits.sparse_min_rows}x{limits.sparse_min_cols}"
        )
    return None


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _semi_structured_class() -> type | None:
    """The class ``to_sparse_semi_structured`` builds (CUTLASS when forced, else cuSPARSELt),
    or None where that is not available."""
    semi = getattr(torch.sparse, "SparseSemiStructuredTensor", None)
    if semi is None:
        return None
    if semi._FORCE_CUTLASS:
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    if not torch.backends.cusparselt.is_available():
        return None
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT


def _to_semi_structured(model: nn.Module, names: Sequence[str]) -> None:
    """Give each named ``nn.Linear`` its weight as a semi-structured sparse tensor."""
    for name in names:
        module = model.get_submodule(name)
        weight = torch.sparse.to_sparse_semi_structured(module.weight.detach().contiguous())
        module.weight = nn.Parameter(weight, requires_grad=False)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sparse_layers(model: nn.Module) -> list[str]:
    """Names of the layers of ``model`` that run on CSR weights."""
    return [name for name, m in model.named_modules() if isinstance(m, _CSRLayer)]


def interleaved_times(
    fns: Sequence[Callable[[], object]],
    repeats: int = PROBE_REPEATS,
    min_sample_s: float = 1e-3,
    device: torch.device | str = "cpu",
) -> list[list[float]]:
    """Seconds per call of each function: ``repeats`` samples each, taken in turn.

    Taking the samples in turn (f0, f1, f0, f1 ...) makes a changing machine load hit every
    function alike; each sample averages enough calls to last about ``min_sample_s``. On a CUDA
    ``device`` every sample waits for the GPU.
    """
    device = torch.device(device)

    def sample(fn: Callable[[], object], number: int) -> float:
        start = time.perf_counter()
        for _ in range(number):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / number

    warm = [sample(fn, 1) for fn in fns]
    number = max(1, math.ceil(min_sample_s / max(min(warm), 1e-9)))
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times):
            samples.append(sample(fn, number))
    return times


def _sparse_class(module: nn.Module) -> type[_CSRLayer] | None:
    """The CSR replacement of a layer that could use one (exact types: subclasses such as
    attention's out_proj are read by their owners, not called)."""
    weight = getattr(module, "weight", None)
    if (
        not isinstance(weight, torch.Tensor)
        or weight.dtype not in CSR_DTYPES
        or bool((weight != 0).all())
    ):
        return None
    if type(module) is nn.Linear:
        return SparseLinear
    if type(module) is nn.Conv2d and _conv_supported(module):
        return SparseConv2d
    return None


def _conv_supported(conv: nn.Conv2d) -> bool:
    return conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def _rule(module: nn.Module) -> bool:
    weight = module.weight
    density = float((weight != 0).float().mean())
    return (
        isinstance(module, nn.Linear)
        and weight.device.type == "cpu"
        and density <= RULE_MAX_DENSITY
        and weight.numel() >= RULE_MIN_NUMEL
    )


def _probe(dense: nn.Module, sparse: nn.Module, shape: tuple[int, ...]) -> bool:
    """Whether ``sparse`` beats ``dense`` on a random input of ``shape`` (median paired ratio)."""
    weight = dense.weight
    x = torch.randn(shape, dtype=weight.dtype, device=weight.device)
    with torch.inference_mode():
        t_dense, t_sparse = interleaved_times(
            [lambda: dense(x), lambda: sparse(x)], device=weight.device
        )
    return statistics.median(s / d for s, d in zip(t_sparse, t_dense)) < 1.0


def _input_shapes(
    model: nn.Module, layers: dict[str, nn.Module], example_input: torch.Tensor | None
) -> dict[str, tuple[int, ...]]:
    """Input shape of each layer in one forward pass of ``example_input`` (empty without it)."""
    if example_input is None:
        return {}
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            shapes.setdefault(name, tuple(args[0].shape))

        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in layers.items()]
    try:
        with torch.inference_mode():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return shapes
