"""``pcfast.optim.BP``: backprop with the same interface, for side-by-side comparisons.

BP is the wall-clock baseline of every PC/TP/DTP comparison, so ``step(x, y)`` costs what a plain
``torch.optim`` + autograd step costs: the batch checks, one autograd pass on the live parameters
(``reference.bp_train_step``'s computation, op for op, so the same numbers), the step's one
finiteness flag (``LocalOptimizer``: norms read in one host sync) and the inner optimizer's update.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import Tensor

from .. import reference
from ..reference.common import forward, loss_sum
from ..reference.conv import conv_forward
from .base import LocalOptimizer

_BOUNDED = ("tanh", "sigmoid")  # activations whose values lie in [-1, 1]


class BP(LocalOptimizer):
    r"""Backpropagation SGD over an MLP or a conv net with μP learning rates — the baseline for PC, TP
    and DTP.

    ``step(x, y)`` writes ``∂(ℓ/B)/∂θ`` to ``.grad`` and applies the update rule (``torch.optim.SGD``
    unless ``optimizer=`` names another) with ``η_l = lr · m^{-c_l}``: at SP (multipliers of one) a
    step equals that optimizer + ``loss.backward()`` on the same model, to rounding.

    Args:
        model: ``nn.Sequential`` of ``nn.Linear`` and supported activations, linear readout.
        parametrization: from ``pcfast.parametrize(model, ..., algo="bp")``; None keeps the weights
            and uses multipliers of one.
        lr: base learning rate η. optimizer, **optimizer_kwargs: the update rule, as for
            ``pcfast.optim.PC`` (SGD unless given; ``momentum=0.9`` etc. go to it).
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
    _target_guards_labels = True  # the loss of a NaN target row is NaN
    _warns_foreign_grads = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the model's parameters, weights then biases (autograd's order), and, in slot order, the
        # layer of each and whether it is a weight (the terms of its gradient's norm bound)
        self._live = [p for p in (*self._weights, *self._biases) if p is not None]
        self._bound_layers = [(l, kind == "weight") for l, b in enumerate(self._biases)
                              for kind in ("weight", "bias") if kind == "weight" or b is not None]
        # the hidden activities whose norm is read: those of activations with values beyond [-1, 1]
        self._normed_activities = [l for l, name in enumerate(self.mlp.activations, start=1) if name not in _BOUNDED]

    def _local_gradients(self, x: Tensor, target: Tensor):
        """``reference.bp_train_step`` on the live parameters (autograd, op for op; no host sync).
        Frozen parameters get zeros (never applied: the update skips them). With a tensor hook on a
        parameter, which autograd on the live parameter would run, ``reference.bp_train_step``
        computes them on detached copies instead (the step's finiteness flag checks them)."""
        weights, biases, params = self._weights, self._biases, self._live
        conv = self.mlp.is_conv
        if any(p._backward_hooks for p in params):
            if conv:
                result = reference.conv_bp_train_step(self._net().layers(), x, target, loss=self._setting("loss"))
            else:
                result = reference.bp_train_step(weights, biases, self.mlp.activations, x, target,
                                                 loss=self._setting("loss"))
            return result.weight_grads, result.bias_grads, {"loss": result.loss}, {}
        wanted = [p for p in params if p.requires_grad]
        with torch.enable_grad():
            if conv:  # reference.conv_bp_train_step's computation on the live parameters
                us, hs = conv_forward(self._net().layers(), x)
            else:
                us, hs = forward(weights, biases, self.mlp.activations, x)
            value = loss_sum(us[-1], target, self._setting("loss")) / x.shape[0]
            found = torch.autograd.grad(value, wanted + us)
        if len(wanted) == len(params):
            by_param = found[:len(params)]
        else:
            grads = iter(found[:len(wanted)])
            by_param = [next(grads) if p.requires_grad else torch.zeros_like(p) for p in params]
        depth = len(weights)
        rest = iter(by_param[depth:])
        bias_grads = [None if b is None else next(rest) for b in biases]
        # this step's bounds, for _grad_norm_terms (an MLP's; a conv net's gradients are normed directly)
        pending = {} if conv else {"norm_terms": (list(found[len(wanted):]), hs)}
        return list(by_param[:depth]), bias_grads, {"loss": value.detach()}, pending

    def _grad_norm_terms(self, stepped, step):
        r"""Bounds from ``δ_l = ∂(ℓ/B)/∂u_l`` and ``h_{l-1}`` (small, B × width) rather than from the
        gradients: ``g_{W_l} = δ_lᵀ h_{l-1}`` and ``g_{b_l} = Σ_b δ_l`` give ``‖g_W‖ ≤ ‖δ_l‖‖h_{l-1}‖``
        and ``‖g_b‖ ≤ √B ‖δ_l‖``. Hidden activities of tanh and sigmoid lie in [-1, 1], so
        ``‖h‖ ≤ √(its size)`` without reading them (a NaN among them makes the loss NaN, and then
        nothing is certain). In float16/bfloat16, whose rounding is coarse, with groups added by
        ``add_param_group`` or a data-parallel reduction, the gradients' own norms are read instead."""
        found = None if step is None else step.pending.get("norm_terms")
        slots = self._slot_params
        if (found is None or self.process_group is not None or len(stepped) != len(slots)
                or not all(map(operator.is_, map(operator.itemgetter(1), stepped), slots))
                or slots[0].dtype in (torch.float16, torch.bfloat16)):
            return super()._grad_norm_terms(stepped, step)
        deltas, activities = found
        depth, root_batch, normed = len(deltas), math.sqrt(activities[0].shape[0]), self._normed_activities
        # per slot: its layer and the bound of its activity's norm (None: the first, ‖x‖ read; 0: a bias)
        factors = self._bound_factors(root_batch)
        terms = [*deltas, activities[0], *(activities[l] for l in normed)]

        def combine(norms: list[float]) -> list[float]:
            read = dict(zip(normed, norms[depth + 1:]))
            return [norms[l] * (root_batch if factor == 0 else norms[depth] if factor is None else read.get(l, factor))
                    for l, factor in factors]

        return terms, combine

    def _bound_factors(self, root_batch: float) -> list[tuple[int, float | None]]:
        """Per slot (weights and biases in model order), its layer and: 0 for a bias (``‖g_b‖ ≤ √B ‖δ‖``),
        None for the first weight (times ``‖x‖``), else ``√(B · width)``, the bound of a bounded
        activity's norm (read instead for the activities in ``_normed_activities``), made once per batch size."""
        cached = self.__dict__.get("_factors")
        if cached is None or cached[0] != root_batch:
            widths = [w.shape[1] for w in self._weights]
            factors = [(l, 0 if not weight else None if l == 0 else root_batch * math.sqrt(widths[l]))
                       for l, weight in self._bound_layers]
            cached = self.__dict__["_factors"] = (root_batch, factors)
        return cached[1]
