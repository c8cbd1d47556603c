"""LoRA that keeps a sparse base model's zeros (PEFT): ``keep_sparse(peft_model)`` before
training, ``merge_and_unload(peft_model)`` after it.

Needs the ``granet[peft]`` extra. Plain LoRA trains ``W + B·A``: the low-rank update is dense,
so merging it fills the zeros of a pruned ``W`` (Wanda's issue 83: 40% sparsity became 32.7%).
Here every LoRA layer of the model computes ``W + M ⊙ (B·A)``, with ``M = (W != 0)`` read when
:func:`keep_sparse` is called: the update is masked in the forward pass, so the adapters train
for exactly the model that merging gives, and :func:`merge_and_unload` writes ``W + M ⊙ (B·A)``
into the base weights, whose zeros stay zeros bit for bit.

How: each LoRA layer gets a forward of its own (an instance attribute, as ``compute.py`` does)
that adds ``x @ (M ⊙ s·B·A)ᵀ`` to the base layer's output, instead of PEFT's ``B(A(x))·s``,
and keeps ``M`` as a non-persistent buffer (adapter files stay PEFT's own). The masked product
costs one ``out x in`` matrix per layer and forward, the size of the base weight. Masking only
at the merge instead would merge a model other than the one trained.

The base's mask cannot move under LoRA: a regrown position would take the value of ``B·A``
there at once (not zero, so regrowth would no longer be free), and its value would be tied to
the low-rank factors rather than be a weight of its own. Do not attach a granet sparsifier to a
PEFT model either: the base weights are frozen (not selected) and the LoRA factors are
``nn.Linear`` weights that it would sparsify.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.nn import functional as F

__all__ = ["keep_sparse", "merge_and_unload"]

_MASK = "granet_mask"


def keep_sparse(peft_model: nn.Module) -> nn.Module:
    """Make every LoRA layer of ``peft_model`` train ``W + M ⊙ (B·A)`` with ``M`` its base
    weight's non-zeros now; returns ``peft_model``. Call it before training (the factors start
    with ``B = 0``, so the model's output does not change)."""
    layers = _lora_layers(peft_model)
    if not layers:
        raise ValueError("peft_model: holds no LoRA layer (wrap it with peft.get_peft_model)")
    for name, layer in layers:
        base = layer.get_base_layer().weight
        if not isinstance(layer, LoraLinear):
            if bool((base == 0).any()):
                raise ValueError(
                    f"peft_model: {name} is a LoRA {type(layer).__name__} on a sparse weight; "
                    "keep_sparse masks LoRA on Linear and Conv1D layers only"
                )
            continue
        if any(layer.lora_variant.get(a) or layer.use_dora.get(a) for a in layer.lora_A):
            raise ValueError(
                f"peft_model: {name} uses a LoRA variant (DoRA?); keep_sparse masks plain LoRA"
            )
        if layer.merged:
            raise ValueError(f"peft_model: {name} has merged adapters; unmerge them first")
        layer.register_buffer(_MASK, base.detach() != 0, persistent=False)
        layer.forward = types.MethodType(_masked_forward, layer)
    return peft_model


def merge_and_unload(peft_model: nn.Module) -> nn.Module:
    """Merge the active adapters as ``W + M ⊙ (B·A)`` into the base weights (the zeros of
    ``W`` stay exactly zero) and return the base model without LoRA layers, as PEFT's
    ``merge_and_unload`` does. Needs :func:`keep_sparse` to have been called on ``peft_model``:
    otherwise the masks of its base are unknown."""
    layers = [(n, layer) for n, layer in _lora_layers(peft_model) if isinstance(layer, LoraLinear)]
    unknown = [n for n, layer in layers if not hasattr(layer, _MASK)]
    if not layers or unknown:
        raise ValueError(
            "peft_model: the masks of its base are unknown (keep_sparse was not called on it"
            + (f"; {unknown[0]}" if unknown else "")
            + "): merging would fill the zeros; call keep_sparse(peft_model) before training"
        )
    with torch.no_grad():
        for _, layer in layers:
            delta = _delta(layer)
            if delta is None:
                continue
            base = layer.get_base_layer().weight
            mask = getattr(layer, _MASK)
            if layer.fan_in_fan_out:  # a Conv1D's weight is (in, out)
                delta = delta.T
            base.copy_(torch.where(mask, base + delta.to(base.dtype), base))
    return peft_model.unload()


def _lora_layers(model: nn.Module) -> list[tuple[str, Any]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _delta(layer: Any) -> torch.Tensor | None:
    """``M ⊙ Σ s·B·A`` over the active adapters, as an ``(out, in)`` matrix (None: none)."""
    mask = getattr(layer, _MASK)
    if layer.fan_in_fan_out:
        mask = mask.T
    total = None
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        product = (b @ a) * layer.scaling[adapter]
        total = product if total is None else total + product
    return None if total is None else total * mask.to(total.dtype)


def _masked_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT's LoRA forward with the low-rank update masked by the base's zeros."""
    if kwargs.get("adapter_names") is not None:
        raise ValueError("adapter_names: mixed-adapter batches are not supported by keep_sparse")
    if self.disable_adapters or self.merged:
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x, *args, **kwargs)
    dtype = result.dtype
    for adapter in self.active_adapters:
        if adapter not in self.lora_A:
            continue
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        mask = getattr(self, _MASK)
        delta = (b @ a) * self.scaling[adapter] * (mask.T if self.fan_in_fan_out else mask)
        inputs = self.lora_dropout[adapter](x.to(a.dtype))
        result = result + F.linear(inputs, delta)
    return result.to(dtype)
