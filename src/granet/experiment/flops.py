"""Dense and sparse FLOPs of a model, for inference and for a whole training run.

The dense counts come from ``torch.utils.flop_counter.FlopCounterMode`` on a copy of the model
built on the ``meta`` device, so counting costs no compute. :data:`NOTE` says what is counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

NOTE = (
    "FLOPs of matmuls and convolutions (torch.utils.flop_counter), forward and backward; a sparse "
    "layer at density d counts d times its dense FLOPs, forward and backward alike (training: "
    "the mean density over each epoch's steps). Not counted: the dense gradients that "
    "gradient-based growth reads at update steps (every step for SNFS's momentum) and "
    "element-wise ops such as norms and activations."
)


@dataclass(frozen=True)
class LayerFlops:
    """Per-sample FLOPs: the whole model's and each sparse tensor's share of them."""

    forward: float
    backward: float
    layer_forward: dict[str, float]
    layer_backward: dict[str, float]


def _per_module(counter: FlopCounterMode, root: nn.Module) -> dict[str, float]:
    prefix = type(root).__name__
    counts = counter.get_flop_counts()
    out = {"": float(sum(counts.get("Global", {}).values()))}
    for key, ops in counts.items():
        if key.startswith(prefix + "."):
            out[key[len(prefix) + 1 :]] = float(sum(ops.values()))
    return out


def count_flops(
    make_model: Callable[[], nn.Module],
    input_shape: Sequence[int],
    param_names: Iterable[str],
    batch: int = 2,
) -> LayerFlops:
    """Count per-sample FLOPs of the model ``make_model()`` builds (called on the meta device).

    ``param_names`` are the sparse tensors (``"features.0.weight"``); each gets the FLOPs of the
    module that owns it. ``batch`` samples are counted and divided out (BatchNorm in training
    mode needs more than one).
    """
    with torch.device("meta"):
        model = make_model()
    model.train()
    x = torch.zeros(batch, *input_shape, device="meta")
    with FlopCounterMode(display=False) as fwd:
        model(x)
    with FlopCounterMode(display=False) as both:
        model(x).sum().backward()
    f, fb = _per_module(fwd, model), _per_module(both, model)
    modules = {name: name.rpartition(".")[0] for name in param_names}
    return LayerFlops(
        forward=f[""] / batch,
        backward=(fb[""] - f[""]) / batch,
        layer_forward={n: f.get(m, 0.0) / batch for n, m in modules.items()},
        layer_backward={n: (fb.get(m, 0.0) - f.get(m, 0.0)) / batch for n, m in modules.items()},
    )


def inference_flops(flops: LayerFlops, density: Mapping[str, float]) -> dict[str, float]:
    """Per-sample forward FLOPs, dense and at the given per-layer densities."""
    saved = sum(flops.layer_forward[n] * (1.0 - d) for n, d in density.items())
    return _pair(flops.forward, flops.forward - saved)


def training_flops(
    flops: LayerFlops, epochs: Sequence[tuple[int, Mapping[str, float]]]
) -> dict[str, float]:
    """Total training FLOPs over ``epochs``: ``(samples, mean per-layer density)`` per epoch."""
    per_sample = flops.forward + flops.backward
    dense = sparse = 0.0
    for samples, density in epochs:
        saved = sum(
            (flops.layer_forward[n] + flops.layer_backward[n]) * (1.0 - d)
            for n, d in density.items()
        )
        dense += samples * per_sample
        sparse += samples * (per_sample - saved)
    return _pair(dense, sparse)


def _pair(dense: float, sparse: float) -> dict[str, float]:
    return {"dense": dense, "sparse": sparse, "ratio": sparse / dense if dense else 1.0}
