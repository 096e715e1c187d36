"""``pcfast.optim.BP``: backprop with the same interface, for side-by-side comparisons.

BP is the wall-clock baseline of every PC/TP/DTP comparison, so ``step(x, y)`` costs what a plain
``torch.optim`` + autograd step costs: the batch checks, one autograd pass on the live parameters
(``reference.bp_train_step``'s computation, op for op, so the same numbers), the step's one
finiteness flag (``LocalOptimizer``: norms read in one host sync) and the inner optimizer's update.
"""
from __future__ import annotations

import math
import torch
from torch import Tensor

from .. import functional
from ..reference.common import forward, loss_sum
from .base import LocalOptimizer


class BP(LocalOptimizer):
    r"""Backpropagation SGD over an MLP with μP learning rates — the baseline for PC, TP and DTP.

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

    def _local_gradients(self, x: Tensor, target: Tensor):
        """``reference.bp_train_step`` on the live parameters (autograd, op for op; no host sync).
        Frozen parameters get zeros (never applied: the update skips them). With a tensor hook on a
        parameter, which autograd on the live parameter would run, ``functional.bp_train_step``
        computes them on detached copies instead."""
        weights, biases = self._params()
        if any(p is not None and p._backward_hooks for p in (*weights, *biases)):
            result = functional.bp_train_step(weights, biases, self.mlp.activations, x, target, loss=self._setting("loss"))
            return result.weight_grads, result.bias_grads, {"loss": result.loss}, {}
        params = [p for p in (*weights, *biases) if p is not None]
        wanted = [p for p in params if p.requires_grad]
        with torch.enable_grad():
            us, hs = forward(weights, biases, self.mlp.activations, x)
            value = loss_sum(us[-1], target, self._setting("loss")) / x.shape[0]
            found = torch.autograd.grad(value, wanted + us)
        grads = iter(found[:len(wanted)])
        by_param = [next(grads) if p.requires_grad else torch.zeros_like(p) for p in params]
        weight_grads, rest = by_param[:len(weights)], iter(by_param[len(weights):])
        bias_grads = [None if b is None else next(rest) for b in biases]
        pending = {"norm_terms": (list(found[len(wanted):]), hs)}  # this step's bounds, for _grad_norm_terms
        return weight_grads, bias_grads, {"loss": value.detach()}, pending

    def _grad_norm_terms(self, stepped, step):
        r"""Bounds from ``δ_l = ∂(ℓ/B)/∂u_l`` and ``h_{l-1}`` (small, B × width) rather than from the
        gradients: ``g_{W_l} = δ_lᵀ h_{l-1}`` and ``g_{b_l} = Σ_b δ_l`` give ``‖g_W‖ ≤ ‖δ_l‖‖h_{l-1}‖``
        and ``‖g_b‖ ≤ √B ‖δ_l‖``. In float16/bfloat16, whose rounding is coarse, with groups added by
        ``add_param_group`` or a data-parallel reduction, the gradients' own norms are read instead."""
        found = None if step is None else step.pending.get("norm_terms")
        slots = self._slots
        if (found is None or self.process_group is not None or len(stepped) != len(slots)
                or any(p is not q for (_, p, _), (_, _, q) in zip(stepped, slots))
                or stepped[0][1].dtype in (torch.float16, torch.bfloat16)):
            return super()._grad_norm_terms(stepped, step)
        deltas, activities = found
        depth, root_batch = len(deltas), math.sqrt(activities[0].shape[0])

        layers = [(l, kind) for l, b in enumerate(self._biases) for kind in ("weight", "bias")
                  if kind == "weight" or b is not None]  # the model's parameters in order, as slots

        def combine(norms: list[float]) -> list[float]:
            delta, activity = norms[:depth], norms[depth:]
            return [delta[l] * activity[l] if kind == "weight" else root_batch * delta[l] for l, kind in layers]

        return deltas + activities, combine
