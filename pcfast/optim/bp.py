"""``pcfast.optim.BP``: backprop with the same interface, for side-by-side comparisons.

BP is the wall-clock baseline of every PC/TP/DTP comparison, so ``step(x, y)`` costs what a plain
``torch.optim.SGD`` + autograd step costs: the batch checks, one autograd pass on the live parameters
(``reference.bp_train_step``'s computation, op for op, so the same numbers), one finiteness test for
the whole step (two foreach norms, one host sync) and SGD applied in place with torch's foreach ops.

The base class's guarantee is kept: the in-place update runs only when every new parameter and
momentum buffer is certainly finite (``_certainly_finite``); otherwise the step goes through
``LocalOptimizer.step``, which computes everything out of place, checks each tensor and raises
``DivergenceError`` (or ``ValueError`` for a non-finite input) with nothing changed — or applies a
step that was finite after all. Anything else the fast path does not cover — ``step()`` without a
batch, frozen parameters, tensor hooks on parameters, groups added with ``add_param_group``, a
learning rate that is not a finite number, a process group (only the base step reduces across
ranks) — also goes there.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional
from ..mup.presets import Parametrization
from ..network import check_batch, resolve_loss
from ..reference.common import forward, loss_sum
from .base import LocalOptimizer

# New values are applied in place only when their norm bounds stay below finfo.max / _MARGIN: far
# beyond the rounding of the norms, of the gradient GEMMs (a factor (1 + u)^B ≤ 1.1 in float32 for
# any batch below 10^6) and of the few SGD operations on each element.
_MARGIN = 16.0
_NUMBERS = (int, float)  # hyperparameter types the fast path takes (not bool, not a tensor)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class BP(LocalOptimizer):
    r"""Backpropagation SGD over an MLP with μP learning rates — the baseline for PC, TP and DTP.

    ``step(x, y)`` writes ``∂(ℓ/B)/∂θ`` to ``.grad`` and applies SGD with ``η_l = lr · m^{-c_l}``:
    ``d = g + λθ``; ``buf = d`` (first step) or ``μ·buf + (1 − τ)·d``; ``d = d + μ·buf``
    (Nesterov) or ``buf`` (μ > 0); ``θ ← θ − η_l·d`` — ``torch.optim.SGD``'s rule: at SP (multipliers
    of one) a step equals ``torch.optim.SGD`` + ``loss.backward()`` on the same model, to rounding.

    Args:
        model: ``nn.Sequential`` of ``nn.Linear`` and supported activations, linear readout.
        parametrization: from ``pcfast.parametrize(model, ..., algo="bp")``; None keeps the weights
            and uses multipliers of one.
        lr: base learning rate η. momentum, dampening, weight_decay, nesterov: as ``torch.optim.SGD``.
        loss: ``"mse"`` (``½‖y − f‖²`` per sample) or ``"ce"``, averaged over the batch.
        backend: accepted for a uniform interface; BP always runs on autograd.
        process_group: data parallelism, as for ``pcfast.optim.PC``: ``"auto"``, None or a
            ``ProcessGroup``; the gradients are averaged over the group's samples.

    Returns from ``step``: ``{"loss": mean loss of the batch before the update}``.

    Example:
        >>> model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 10))
        >>> opt = pcfast.optim.BP(model, pcfast.parametrize(model, "mup", algo="bp", base_width=64), lr=0.1)
        >>> for x, y in loader:
        ...     opt.zero_grad()
        ...     stats = opt.step(x, y)
    """

    algo = "bp"

    def __init__(
        self,
        model: nn.Module,
        parametrization: Parametrization | None = None,
        *,
        lr: float = 0.1,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        loss: str = "mse",
        backend: str = "auto",
        process_group: Any = "auto",
    ) -> None:
        loss = resolve_loss(loss)  # a name, or nn.CrossEntropyLoss() (see pcfast.network.resolve_loss)
        super().__init__(model, parametrization, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, backend=backend, loss=loss,
                         process_group=process_group)

    def _local_gradients(self, x: Tensor, y: Tensor):
        weights, biases = self._params()
        result = functional.bp_train_step(weights, biases, self.mlp.activations, x, y, loss=self._setting("loss"))
        return result.weight_grads, result.bias_grads, {"loss": result.loss}, {}

    # ------------------------------------------------------------------ the fast step

    @torch.no_grad()
    def step(self, x: Tensor | None = None, y: Tensor | None = None, closure=None) -> dict[str, float] | None:  # type: ignore[override]
        """One training step on batch ``(x, y)``; without a batch, apply SGD to the current ``.grad``.

        ``.grad`` is replaced by the batch's gradients, which are applied; returns ``{"loss": …}``.
        A non-finite loss, gradient or update raises ``DivergenceError`` with parameters, ``.grad``
        and momentum buffers unchanged.
        """
        params = [p for lin in self.mlp.linears for p in (lin.weight, lin.bias) if p is not None]
        groups = self.param_groups
        plain = x is not None and y is not None and closure is None and self.process_group is None and len(
            groups) == len(params) and all(
            len(group["params"]) == 1 and group["params"][0] is p and p.requires_grad and not p._backward_hooks
            for p, group in zip(params, groups))
        settings = [self._settings(group) for group in groups] if plain else [None]
        if None in settings:  # see the module docstring: the general path
            return super().step(x, y, closure)
        self._check_ready()
        loss = self._setting("loss")
        # x and float targets are not scanned for NaN/inf here: ``_certainly_finite`` reads ‖x‖, and
        # a non-finite target makes the loss non-finite; either way the general path raises the
        # ValueError naming them.
        target = check_batch(x, y, self.mlp.weights(), loss, check_finite=False)
        buffers = [self.state[p].get("momentum_buffer") if s[1] and p in self.state else None
                   for p, s in zip(params, settings)]
        state_norms = self._norms(params + [b for b in buffers if b is not None])  # the forward pass then
        value, grads, deltas, activities = self._backprop(params, x, target, loss)  # finds the weights in cache
        if not (math.isfinite(value) and self._certainly_finite(settings, state_norms, grads, deltas, activities, buffers)):
            return super().step(x, y)  # possibly non-finite: the out-of-place path decides
        for p, g in zip(params, grads):
            if p.grad is None:
                p.grad = g  # a fresh tensor from autograd, read but never modified below
            else:
                p.grad.copy_(g)
        self._apply_sgd(settings, params, grads, buffers)
        return {"loss": value}

    def _backprop(self, params: list[Tensor], x: Tensor, target: Tensor, loss: str):
        """``reference.bp_train_step`` on the live parameters: (loss ℓ/B as a float, gradients in
        ``params`` order, ``δ_l = ∂(ℓ/B)/∂u_l`` per layer, activities ``[h_0 = x, …, h_{L-1}]``)."""
        with torch.enable_grad():
            us, hs = forward(self.mlp.weights(), self.mlp.biases(), self.mlp.activations, x)
            value = loss_sum(us[-1], target, loss) / x.shape[0]
            grads = torch.autograd.grad(value, params + us)
        return float(value.detach()), list(grads[:len(params)]), list(grads[len(params):]), hs

    @staticmethod
    def _settings(group: dict[str, Any]) -> tuple[float, float, float, float, bool] | None:
        """(rate η_l = lr · lr_mult, momentum, dampening, weight_decay, nesterov), or None unless every
        number is a finite Python int/float (a tensor or a NaN rate goes to the general path)."""
        numbers = (group["lr"], group["lr_mult"], group["momentum"], group["dampening"], group["weight_decay"])
        for value in numbers:
            if type(value) not in _NUMBERS or not math.isfinite(value):
                return None
        lr, lr_mult, momentum, dampening, weight_decay = numbers
        return lr * lr_mult, momentum, dampening, weight_decay, bool(group["nesterov"])

    @staticmethod
    def _norms(tensors: list[Tensor]) -> list[Tensor]:
        """2-norms as 0-d tensors (no host sync yet), accumulated in float32 for float16/bfloat16."""
        low = tensors[0].dtype in _LOW_PRECISION
        return list(torch._foreach_norm(tensors, 2, dtype=torch.float32 if low else None))

    def _certainly_finite(self, settings, state_norms, grads, deltas, activities, buffers) -> bool:
        r"""Whether every gradient, new parameter and new momentum buffer is certainly finite, from
        tensor norms read with one host sync for the whole step.

        ``state_norms``: the 2-norms of every parameter θ and present momentum buffer, from
        ``_norms`` (read before the forward pass). It adds those of ``δ_l`` and ``h_{l-1}``
        (small, B × width) rather than of the gradients: ``g_{W_l} = δ_lᵀ h_{l-1}`` and
        ``g_{b_l} = Σ_b δ_l`` give ``‖g_W‖ ≤ ‖δ_l‖‖h_{l-1}‖`` and ``‖g_b‖ ≤ √B ‖δ_l‖`` (in float16/bfloat16,
        whose rounding is coarse, the gradients' own norms are read instead). No element exceeds its
        tensor's 2-norm, and a NaN/inf makes a norm non-finite. Then ``‖d‖ ≤ ‖g‖ + |λ|‖θ‖``,
        ``‖buf'‖ ≤ |μ|‖buf‖ + |1 − τ|‖d‖`` (``‖d‖`` on the first step), ``‖d'‖ ≤ ‖d‖ + |μ|‖buf'‖``
        (Nesterov) or ``‖buf'‖``, ``‖θ'‖ ≤ ‖θ‖ + |η|‖d'‖``. When every norm and bound is below
        ``finfo.max / 16`` nothing can overflow, and from finite inputs with only additions and
        multiplications nothing becomes NaN either. False is not a divergence, only "not certain":
        the caller then checks every new value exactly.
        """
        dtype = grads[0].dtype
        low = dtype in _LOW_PRECISION
        norms = torch.stack(state_norms + self._norms(grads if low else deltas + activities)).tolist()
        count = len(settings)
        param_norms, buffer_norms = norms[:count], iter(norms[count:len(state_norms)])
        if low:
            grad_norms = norms[len(state_norms):]
        else:
            depth = len(deltas)
            delta_norms, activity_norms = norms[len(state_norms):][:depth], norms[len(state_norms):][depth:]
            root_batch = math.sqrt(activities[0].shape[0])
            grad_norms = []
            for lin, delta, activity in zip(self.mlp.linears, delta_norms, activity_norms):
                grad_norms.append(delta * activity)
                if lin.bias is not None:
                    grad_norms.append(root_batch * delta)
        limit = torch.finfo(dtype).max / _MARGIN
        for (rate, momentum, dampening, weight_decay, nesterov), p_norm, g_norm, buffer in zip(
                settings, param_norms, grad_norms, buffers):
            d_norm = g_norm + abs(weight_decay) * p_norm
            bounds = [p_norm, g_norm, d_norm]
            if momentum:
                new_buffer = d_norm if buffer is None else abs(momentum) * next(buffer_norms) + abs(1 - dampening) * d_norm
                d_norm = d_norm + abs(momentum) * new_buffer if nesterov else new_buffer
                bounds += [new_buffer, d_norm]
            bounds.append(p_norm + abs(rate) * d_norm)
            for bound in bounds:
                if not bound <= limit:  # also for NaN
                    return False
        return True

    def _apply_sgd(self, settings, params, grads, buffers) -> None:
        """``torch.optim.SGD``'s rule in place (``pcfast.sgd.sgd_update``'s arithmetic, op for op),
        one foreach call per set of parameters that share their settings; ``.grad`` is not modified."""
        batches: dict[tuple, list[int]] = {}
        for i, setting in enumerate(settings):
            batches.setdefault(setting, []).append(i)
        for (lr, momentum, dampening, weight_decay, nesterov), members in batches.items():
            ps = [params[i] for i in members]
            gs = [grads[i] for i in members]
            d = torch._foreach_add(gs, ps, alpha=weight_decay) if weight_decay else gs
            if momentum:
                bufs = [buffers[i] for i in members]
                running = [k for k, b in enumerate(bufs) if b is not None]
                if running:
                    for k in running:  # not _foreach_mul_: in float16/bfloat16 it rounds the factor first
                        bufs[k].mul_(momentum)
                    torch._foreach_add_([bufs[k] for k in running], [d[k] for k in running], alpha=1 - dampening)
                for k, b in enumerate(bufs):
                    if b is None:  # first step: the buffer starts as d
                        bufs[k] = self.state[ps[k]]["momentum_buffer"] = d[k].clone()
                d = torch._foreach_add(d, bufs, alpha=momentum) if nesterov else bufs
            torch._foreach_add_(ps, d, alpha=-lr)
