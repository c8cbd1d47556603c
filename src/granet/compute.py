"""Sparse kernels in the training step, on CPU: the ``compute`` option of every sparsifier.

``compute="dense"`` trains with dense kernels on masked weights. ``"sparse"`` runs every
selected ``nn.Linear`` on the CPU through CSR kernels, forward and backward:

- forward ``bias + W @ x`` as one ``torch.addmm`` of a CSR of the active weights;
- input gradient through a CSR of ``W.T`` (positions built once per mask, values permuted from
  the forward's);
- weight gradient only at the active positions (``torch.sparse.sampled_addmm``), written into a
  dense ``.grad`` buffer the layer keeps (zero at the inactive positions, which are never
  written; a buffer its caller still holds or wrote into is replaced or zeroed), so that
  hooks, ``GradScaler``, gradient clipping and DDP's all-reduce see an ordinary dense gradient;
- for ``torch.optim.SGD``, ``Adam`` and ``AdamW`` the update of such a layer runs on its active
  entries only (flat gathers and scatters of the weight and its optimizer state, the param
  group's hyperparameters, torch's formulas and state layout), and the mask multiply skips it;
  the values written are kept for the next step's forward and update (see ``_Layer.gather``).

The CSR positions are rebuilt only when the masks change (a topology round, ``load_state_dict``).
The step before a topology round computes the full dense weight gradient, which gradient-based
growth reads; so does every step when a score observes the gradients (SNFS's momentum). Results
equal the masked-dense path's up to float rounding (sums in another order), except under gradient
clipping by norm, which sees only the active entries' gradient here.

``"auto"`` (the default) decides per layer by a rule, again after every mask change: a CPU
``nn.Linear`` in float32/float64 with at least :data:`AUTO_MIN_NUMEL` weights at a density of at
most :data:`AUTO_MAX_DENSITY` runs sparse (measured: ``benchmarks/compute.py layers``). A rule, not
a timed probe, so that a resumed run decides exactly as the original did (bitwise resume) and
every data-parallel rank alike. GPU layers always stay dense: CSR kernels there were measured
slower than dense ones (see ``inference.py``).

What stays O(all weights), and every case that runs dense: ``docs/design.md``, section 3.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from granet.csr import CSR_DTYPES, MIN_NUMEL, index_dtype, quiet_csr

COMPUTE: dict[str, str] = {
    "dense": "dense kernels on masked weights",
    "sparse": "CSR kernels for every selected nn.Linear on CPU",
    "auto": "CSR kernels for the CPU nn.Linear layers sparse and large enough, decided again "
    "after every topology round",
}
AUTO_MAX_DENSITY = 0.1
AUTO_MIN_NUMEL = MIN_NUMEL
PROBES = 16  # entries that check a kept copy of a tensor's active entries

# module -> its _Layer (weakly: the engine owns it), for the installed forward; a copy of the
# module, or one whose sparsifier is gone, finds none and runs dense
_LAYERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref[_Layer]] = weakref.WeakKeyDictionary()


class _Positions:
    """Where one mask is active, in the layouts the kernels need, built once per mask."""

    def __init__(self, mask: torch.Tensor) -> None:
        rows_n, cols_n = mask.shape
        flat = mask.reshape(-1).nonzero().squeeze(1)  # row-major: the order of W's CSR values
        index = index_dtype(flat.numel())
        rows = flat // cols_n
        cols = flat - rows * cols_n
        # W.T's CSR order (by column of W, then row): a stable sort of W's values by column
        order = torch.argsort(cols, stable=True)
        self.shape = (rows_n, cols_n)
        self.flat = flat
        # a few entries, evenly spread, that a kept copy is checked against (see _Layer.gather)
        probe = torch.arange(PROBES) * max(flat.numel() - 1, 0) // (PROBES - 1)  # exact ints
        self.probe = probe.unique()[: flat.numel()]
        self.probe_flat = flat[self.probe]
        self.crow = _crow(rows, rows_n, index)
        self.col = cols.to(index)
        self.order_t = order  # W.T's CSR values are W's CSR values at these places
        self.crow_t = _crow(cols, cols_n, index)
        self.col_t = rows[order].to(index)
        self._patterns: dict[torch.dtype, torch.Tensor] = {}
        with quiet_csr():  # torch warns once per process that CSR tensors are in beta
            self.pattern(torch.float32)

    def csr(self, values: torch.Tensor) -> torch.Tensor:
        """The CSR matrix ``W`` of :meth:`values`."""
        return _csr(self.crow, self.col, values, self.shape)

    def csr_t(self, values: torch.Tensor) -> torch.Tensor:
        """The CSR matrix ``W.T`` of :meth:`values` (a gather among them only)."""
        return _csr(self.crow_t, self.col_t, values.index_select(0, self.order_t), self.shape[::-1])

    def pattern(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask as a CSR of zeros: where ``sampled_addmm`` computes the weight gradient."""
        if dtype not in self._patterns:
            zeros = torch.zeros(self.flat.numel(), dtype=dtype)
            self._patterns[dtype] = _csr(self.crow, self.col, zeros, self.shape)
        return self._patterns[dtype]


def _crow(rows: torch.Tensor, n: int, index: torch.dtype) -> torch.Tensor:
    counts = torch.bincount(rows, minlength=n)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(index)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: Any) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


class _SparseLinear(torch.autograd.Function):
    """``F.linear`` through CSR kernels; the weight gradient only at the active positions (or
    in full when the sparsifier needs the dense gradient this step).

    The kernels read and write ``(features, batch)`` row-major blocks, so the output is the
    transposed view of one (as :class:`granet.inference.SparseLinear`'s): the next sparse layer
    reads it without a copy, and its gradient arrives in the same layout.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        layer: _Layer,
        own_buffer: bool,
    ) -> torch.Tensor:
        positions = layer.positions()
        xt = x.reshape(-1, weight.shape[1]).t()
        if not xt.is_contiguous():  # a copy is faster than the product on a strided input
            xt = xt.contiguous()
        values = layer.gather("weight", weight)
        w = positions.csr(values)
        out = torch.sparse.mm(w, xt) if bias is None else torch.addmm(bias.unsqueeze(1), w, xt)
        ctx.save_for_backward(xt, values)  # the weights this forward used, for its backward
        ctx.layer, ctx.positions, ctx.x_shape, ctx.w_shape = layer, positions, x.shape, weight.shape
        ctx.full, ctx.own_buffer = layer.engine.dense_grad, own_buffer
        return out.t().reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable  # a double backward raises, not misleads
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xt, values = ctx.saved_tensors
        positions = ctx.positions
        gyt = gy.reshape(-1, ctx.w_shape[0]).t()
        if not gyt.is_contiguous():
            gyt = gyt.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.sparse.mm(positions.csr_t(values), gyt).t().reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if ctx.full:
                gw = gyt.mm(xt.t())
            else:
                pattern = positions.pattern(gyt.dtype)
                active = torch.sparse.sampled_addmm(pattern, gyt, xt.t(), beta=0.0).values()
                gw = ctx.layer.weight_grad(active, positions, ctx.own_buffer)
        if ctx.needs_input_grad[2]:
            gb = gyt.sum(1)
        return gx, gw, gb, None, None


def forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """The forward installed on a sparse-compute ``nn.Linear`` (named ``forward`` so that a
    pickled module restores the class's own)."""
    ref = _LAYERS.get(self)
    layer = ref() if ref is not None else None
    if layer is not None and layer.runs_sparse(input):
        own = torch.is_grad_enabled() and self.weight.requires_grad and layer.claim_buffer()
        return _SparseLinear.apply(input, self.weight, self.bias, layer, own)
    return F.linear(input, self.weight, self.bias)


class _Layer:
    """One ``nn.Linear`` the engine may run sparse: its decision, CSR positions, grad buffer."""

    def __init__(self, engine: SparseCompute, index: int, name: str, module: nn.Linear) -> None:
        self.engine, self.index, self.name = engine, index, name
        self._module = weakref.ref(module)  # the module does not keep its sparsifier alive
        self.param = module.weight
        self._buffer_free = True
        self.refresh(None)

    @property
    def module(self) -> nn.Linear | None:
        return self._module()

    def refresh(self, mask: torch.Tensor | None) -> None:
        """A new mask: the decision, positions, gradient buffer and kept entries start over."""
        self.mask = mask
        self._sparse: bool | None = None  # by mode and density
        self._positions: _Positions | None = None
        self._buffer: torch.Tensor | None = None
        self._buffer_version = -1
        self._kept: dict[str, tuple[torch.Tensor, int, int, torch.Tensor]] = {}

    def gather(self, role: str, dense: torch.Tensor) -> torch.Tensor:
        """The active entries of ``dense`` (the weight or one of its optimizer-state tensors) in
        CSR order, not to be changed in place.

        Kept from the last gather or scatter while ``dense`` is the same tensor on the same
        memory, its version counter has not moved and a few spread-out entries still match, so
        a step reads the weight and state it wrote at the previous step without gathering them
        again (at high sparsity a gather reads a large share of the tensor's cache lines).
        Every in-place change (optimizer, masks, ``load_state_dict``, ``torch.no_grad()``
        writes) moves the counter; writes through ``.data`` do not, and are caught by the probe
        when they change many entries (a swap to averaged weights), not when they change a few.
        """
        if torch.is_inference_mode_enabled():  # inference tensors cannot serve a training step
            return self.take(dense)
        kept = self._kept.get(role)
        if (
            kept is not None
            and kept[0] is dense
            and kept[1:3] == (dense._version, dense.data_ptr())
            and self._probe_matches(dense, kept[3])
        ):
            return kept[3]
        values = self.take(dense)
        self._kept[role] = (dense, dense._version, dense.data_ptr(), values)
        return values

    def scatter(self, role: str, dense: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values`` at the active entries of ``dense``, and keep them (see gather)."""
        dense.view(-1).index_copy_(0, self.positions().flat, values)
        self._kept[role] = (dense, dense._version, dense.data_ptr(), values)

    def take(self, dense: torch.Tensor) -> torch.Tensor:
        """The active entries of ``dense``, gathered now."""
        return dense.reshape(-1).index_select(0, self.positions().flat)

    def _probe_matches(self, dense: torch.Tensor, values: torch.Tensor) -> bool:
        pos = self.positions()
        now = dense.reshape(-1).index_select(0, pos.probe_flat)
        return torch.equal(now, values.index_select(0, pos.probe))

    @property
    def sparse(self) -> bool:
        """Whether this layer runs on CSR kernels now (for ``auto``, by the rule)."""
        reason = _unsupported(self.param)
        if reason is not None:
            self.engine.fallback(reason, lambda other: _unsupported(other.param) == reason)
            return False
        if self._sparse is None:
            self._sparse = self.engine.mode == "sparse" or _sparse_enough(self.mask)
        return self._sparse

    def runs_sparse(self, x: torch.Tensor) -> bool:
        """Whether this call with input ``x`` runs on CSR kernels."""
        if not self.sparse:
            return False
        if torch.is_autocast_enabled("cpu"):
            self.engine.fallback("autocast is on", lambda other: _unsupported(other.param) is None)
            return False
        if x.dtype != self.param.dtype:
            reason = f"the input of {self.name} is {x.dtype}, its weight {self.param.dtype}"
            self.engine.fallback(reason, lambda other: other is self)
            return False
        return True

    def positions(self) -> _Positions:
        if self._positions is None:
            self._positions = _Positions(self.mask.cpu())
        return self._positions

    def claim_buffer(self) -> bool:
        """True for the first call of this step: its weight gradient may use the buffer."""
        free, self._buffer_free = self._buffer_free, False
        return free

    def release_buffer(self) -> None:
        self._buffer_free = True

    def weight_grad(self, values: torch.Tensor, positions: _Positions, own: bool) -> torch.Tensor:
        """A dense gradient holding ``values`` at the active positions, zero elsewhere.

        The first call of a step, with no gradient accumulated yet, fills the layer's buffer,
        whose inactive entries are zero since the mask last changed; autograd takes it over as
        ``.grad`` without a copy. Any other call gets a fresh tensor, which autograd adds.

        The reuse is invisible: a buffer that something still holds (an earlier step's ``.grad``
        kept by the caller) is left to its holder and a new one made; one written in place since
        it was handed out (gradient noise, clipping, unscaling) is zeroed in full first.
        """
        weight = self.param
        if own and weight.grad is None and positions is self._positions:
            buffer = self._buffer
            if (
                buffer is None
                or buffer.dtype != weight.dtype
                or buffer.device != weight.device
                or not _unshared(buffer)
            ):
                buffer = self._buffer = torch.zeros_like(weight)
            elif buffer._version != self._buffer_version:
                buffer.zero_()
            buffer.view(-1).index_copy_(0, positions.flat, values)
            self._buffer_version = buffer._version
            return buffer.detach()  # a new tensor object on the same memory (and version
            # counter): autograd steals it, not copies
        grad = torch.zeros_like(weight)
        grad.view(-1).index_copy_(0, positions.flat, values)
        return grad


class SparseCompute:
    """Sparse kernels for the ``nn.Linear`` layers among one sparsifier's tensors.

    The sparsifier calls :meth:`refresh` whenever its masks change, sets :attr:`dense_grad`
    before every step (True when the next step needs the full weight gradient), and calls
    :meth:`finish_step` from its step hook, which applies the sparse optimizer updates and says
    which tensors need no mask multiply.
    """

    def __init__(
        self,
        mode: str,
        model: nn.Module,
        names: Sequence[str],
        params: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor],
        optimizer: torch.optim.Optimizer,
        warn: Callable[[str], None],
    ) -> None:
        self.mode, self.optimizer, self._warn = mode, optimizer, warn
        self.dense_grad = False
        self._warned: set[str] = set()
        owners = _owners(model)
        self.layers: list[_Layer] = []
        dense: dict[str, list[str]] = {}
        for i, (name, p) in enumerate(zip(names, params)):
            modules = owners.get(id(p), [])
            reason = _no_route(modules)
            if reason is None:
                self.layers.append(_Layer(self, i, name, modules[0]))
                reason = _unsupported(p)
                if reason is not None:  # said below, not again at the first step
                    self._warned.add(reason)
            if reason is not None:
                dense.setdefault(reason, []).append(name)
        if mode == "sparse" and dense:
            self._warn(
                "compute='sparse' runs these layers dense: "
                + "; ".join(f"{', '.join(n)} ({reason})" for reason, n in dense.items())
            )
        for layer in self.layers:
            _LAYERS[layer.module] = weakref.ref(layer)
            layer.module.forward = types.MethodType(forward, layer.module)
        self.refresh(masks)
        self._taken: list[tuple[_Layer, torch.Tensor, dict[str, Any]]] = []
        self._hook = optimizer.register_step_pre_hook(self._take_grads)

    def refresh(self, masks: Sequence[torch.Tensor]) -> None:
        """The masks changed: rebuild positions and decisions (lazily, at the next use)."""
        for layer in self.layers:
            layer.refresh(masks[layer.index])

    def sparse_layers(self) -> list[str]:
        """Names of the layers that run on CSR kernels now."""
        return [layer.name for layer in self.layers if layer.sparse]

    def fallback(self, reason: str, same: Callable[[_Layer], bool]) -> None:
        """With ``sparse``, say once per reason which layers (those ``same`` selects) run
        dense."""
        if self.mode == "sparse" and reason not in self._warned:
            self._warned.add(reason)
            names = ", ".join(layer.name for layer in self.layers if same(layer))
            self._warn(f"compute='sparse' runs {names} dense: {reason}")

    # ------------------------------------------------------------- the update
    def _take_grads(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """Step pre-hook: hide from the optimizer the gradients this engine applies itself."""
        self._taken = []
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0]: self
        if type(optimizer) not in SPARSE_UPDATES or closure is not None:
            return
        groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for layer in self.layers:
            p = layer.param
            group = groups[id(p)]
            if layer.sparse and p.grad is not None and _updatable(p, group):
                self._taken.append((layer, p.grad, group))
                p.grad = None

    def finish_step(self, stepped: bool) -> set[int]:
        """Step post-hook: apply the sparse updates (unless the step was skipped), give the
        gradients back; returns the indices of the tensors updated here."""
        taken, self._taken = self._taken, []
        for layer in self.layers:
            layer.release_buffer()
        if not taken:
            return set()
        if stepped:
            by_group: dict[int, tuple[dict[str, Any], list[tuple[_Layer, torch.Tensor]]]] = {}
            for layer, grad, group in taken:
                by_group.setdefault(id(group), (group, []))[1].append((layer, grad))
            update = SPARSE_UPDATES[type(self.optimizer)]
            with torch.no_grad():
                for group, items in by_group.values():
                    update(self.optimizer, group, items)
        for layer, grad, _ in taken:
            layer.param.grad = grad
        return {layer.index for layer, _, _ in taken} if stepped else set()

    def remove(self) -> None:
        """Put the layers' own forward back and detach from the optimizer."""
        self._hook.remove()
        for layer in self.layers:
            module = layer.module
            ref = _LAYERS.get(module) if module is not None else None
            if ref is not None and ref() is layer:
                del _LAYERS[module]
                if getattr(module.__dict__.get("forward"), "__func__", None) is forward:
                    del module.forward
            layer.refresh(layer.mask)


Update = Callable[[torch.optim.Optimizer, dict[str, Any], list[tuple[_Layer, torch.Tensor]]], None]


def _sgd(optimizer: torch.optim.Optimizer, group: dict[str, Any], items: list) -> None:
    """``torch.optim.SGD``'s step on the active entries of each ``(layer, grad)``."""
    lr, wd, momentum = float(group["lr"]), group["weight_decay"], group["momentum"]
    w = [layer.gather("weight", layer.param) for layer, _ in items]
    g = [layer.take(grad) for layer, grad in items]
    if group["maximize"]:
        torch._foreach_neg_(g)
    if wd != 0:
        g = torch._foreach_add(g, w, alpha=wd)
    if momentum != 0:
        bufs = []
        for (layer, _), gi in zip(items, g):
            state = optimizer.state[layer.param]
            full = state.get("momentum_buffer")
            if full is None:  # torch starts the buffer at the first gradient
                full = state["momentum_buffer"] = torch.zeros_like(layer.param)
                b = gi.clone()
            else:
                b = layer.gather("momentum_buffer", full).mul(momentum)
                b.add_(gi, alpha=1 - group["dampening"])
            layer.scatter("momentum_buffer", full, b)
            bufs.append(b)
        g = torch._foreach_add(g, bufs, alpha=momentum) if group["nesterov"] else bufs
    for (layer, _), wi in zip(items, torch._foreach_add(w, g, alpha=-lr)):
        layer.scatter("weight", layer.param, wi)


def _adam(optimizer: torch.optim.Optimizer, group: dict[str, Any], items: list) -> None:
    """``torch.optim.Adam``/``AdamW``'s step (single-tensor formulas) on the active entries."""
    lr, wd, eps = float(group["lr"]), group["weight_decay"], group["eps"]
    beta1, beta2 = (float(b) for b in group["betas"])
    decoupled = group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW))
    names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if group["amsgrad"] else [])
    for layer, grad in items:
        p, state = layer.param, optimizer.state[layer.param]
        if len(state) == 0:  # as torch's lazy initialisation (step on the host)
            state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
            for name in names:
                state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        step = float(state["step"])
        w = layer.gather("weight", p)
        g = layer.take(grad)
        if group["maximize"]:
            g = g.neg()
        if wd != 0:
            if decoupled:
                w = w.mul(1 - lr * wd)
            else:
                g = g.add(w, alpha=wd)
        m, v, *mx = (layer.gather(name, state[name]) for name in names)
        m = m.lerp(g, 1 - beta1)
        v = v.mul(beta2).addcmul_(g, g, value=1 - beta2)
        if mx:
            mx = [torch.maximum(mx[0], v)]
        denom = ((mx[0] if mx else v).sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
        layer.scatter("weight", p, w.addcdiv(m, denom, value=-lr / (1 - beta1**step)))
        for name, values in zip(names, (m, v, *mx)):
            layer.scatter(name, state[name], values)


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


# The optimizers whose step the engine applies to the active entries itself (exact types).
SPARSE_UPDATES: dict[type[torch.optim.Optimizer], Update] = {
    torch.optim.SGD: _sgd,
    torch.optim.Adam: _adam,
    torch.optim.AdamW: _adam,
}


def _updatable(p: torch.Tensor, group: dict[str, Any]) -> bool:
    """Whether the sparse update reproduces the optimizer's step for ``p`` in ``group``."""
    if p.device.type != "cpu" or not p.is_contiguous() or torch.is_complex(p):
        return False
    if p.grad is None or p.grad.layout != torch.strided or p.grad.shape != p.shape:
        return False
    flags = ("fused", "capturable", "differentiable")
    return not any(group.get(f) for f in flags) and not torch.is_tensor(group["weight_decay"])


def _owners(model: nn.Module) -> dict[int, list[nn.Module]]:
    """id(parameter) -> the modules that hold it as their ``weight`` (``out_proj``'s is
    MultiheadAttention's: it reads the weight itself and never calls ``out_proj``)."""
    owners: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        w = module._parameters.get("weight")
        if w is not None:
            owners.setdefault(id(w), []).append(module)
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention):
            owners[id(module.out_proj.weight)] = [module]
    return owners


def _no_route(modules: Sequence[nn.Module]) -> str | None:
    """Why these owners of a tensor cannot run sparse (None: one plain ``nn.Linear``)."""
    if len(modules) != 1:
        return "a weight shared by several modules" if modules else "not a module's weight"
    module = modules[0]
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
        return f"{type(module).__name__} has no sparse training route"
    own = getattr(module.__dict__.get("forward"), "__func__", None)  # ours, on a copy: replaced
    if "forward" in module.__dict__ and own not in (forward, nn.Linear.forward):
        return "the module's forward was replaced"
    return None


def _unsupported(w: torch.Tensor) -> str | None:
    """Why the CSR kernels cannot take ``w`` now (None: they can)."""
    if w.device.type != "cpu":
        return f"its weight is on {w.device.type}, where CSR kernels are slower than dense ones"
    if w.dtype not in CSR_DTYPES:
        return f"CPU CSR kernels do not support {w.dtype}"
    if not w.is_contiguous():
        return "its weight is not contiguous"
    return None


def _unshared(t: torch.Tensor) -> bool:
    """Whether nothing but ``t`` holds its memory (no other tensor on it, no ``.grad``)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # cannot tell: treat it as held
        return False
    return use_count(t.untyped_storage()._cdata) <= 2  # t and the storage object asked here


def _sparse_enough(mask: torch.Tensor) -> bool:
    """``auto``'s rule for a layer the CSR kernels can take: at least AUTO_MIN_NUMEL weights
    at a density of at most AUTO_MAX_DENSITY."""
    if mask.numel() < AUTO_MIN_NUMEL:
        return False
    return int(mask.count_nonzero()) <= AUTO_MAX_DENSITY * mask.numel()
