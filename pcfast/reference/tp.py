"""Target propagation and difference target propagation, the specification (DESIGN §4).

Feedback maps ``g_l(v) = ψ_l(v Q_lᵀ + c_l)`` take layer l back to layer l−1, for l = 2 … L.
Lists of feedback parameters are indexed from layer 2: ``feedback_weights[0]`` is ``Q_2`` with shape
(d_1, d_2). ψ_l defaults to φ_{l-1}, the activation that produced h_{l-1}.

- Output target: ``ĥ_L = f − β ∂ℓ/∂f`` (per sample).
- TP: ``ĥ_{l-1} = g_l(ĥ_l)``; DTP: ``ĥ_{l-1} = h_{l-1} + g_l(ĥ_l) − g_l(h_l)``.
- Layer l's local loss is ``½‖ĥ_l − h_l‖²`` with ĥ_l and h_{l-1} held fixed; its gradients
  (batch mean) come from autograd here.
- Feedback training minimises ``½‖g_l(f_l(h_{l-1} + ξ)) − (h_{l-1} + ξ)‖²`` (batch mean), where
  ``f_l`` is layer l's forward map; for ψ = identity the ridge closed form is
  ``argmin_{Q,c} (1/B)‖H_{l-1} − H_l Qᵀ − c‖² + μ‖Q‖²``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ..activations import phi
from ..types import Feedback, Net, TPConfig, config_of, takes_settings
from ..results import FeedbackResult, TPResult
from .common import forward, linear, loss_sum, output_error


def default_feedback_activations(activations: Sequence[str]) -> list[str]:
    """ψ_l = φ_{l-1} for l = 2 … L."""
    return list(activations)


def feedback_map(v: Tensor, weight: Tensor, bias: Tensor | None, activation: str) -> Tensor:
    """``g(v) = ψ(v Qᵀ + c)``."""
    return phi(activation)(linear(v, weight, bias))


def tp_targets(net: Net, feedback: Feedback, x: Tensor, target: Tensor,
               config: TPConfig) -> tuple[list[Tensor], list[Tensor]]:
    """Targets ``[ĥ_1 … ĥ_L]`` and activities ``[h_1 … h_{L-1}, f]``."""
    us, hs = forward(net.weights, net.biases, net.activations, x)
    activities = hs[1:] + [us[-1]]
    targets = [activities[-1] + config.beta * output_error(us[-1], target, config.loss)]
    for l in reversed(range(1, net.depth)):  # 0-based layer l maps back to layer l-1
        q, c, psi = feedback.weights[l - 1], feedback.biases[l - 1], feedback.activations[l - 1]
        projected = feedback_map(targets[0], q, c, psi)
        if config.difference:
            projected = activities[l - 1] + projected - feedback_map(activities[l], q, c, psi)
        targets.insert(0, projected)
    return targets, activities


@takes_settings(TPConfig, "weights", "biases", "activations", "feedback_weights", "feedback_biases",
                "feedback_activations", "x", "target")
def tp_train_step(weights: Sequence[Tensor], biases: Sequence[Tensor | None], activations: Sequence[str],
                  feedback_weights: Sequence[Tensor], feedback_biases: Sequence[Tensor | None],
                  feedback_activations: Sequence[str], x: Tensor, target: Tensor, **settings: Any) -> TPResult:
    """Targets, then each layer's local gradient (autograd of its local loss, batch mean)."""
    config = config_of(TPConfig, settings, depth=len(weights), where="tp_train_step")
    targets, activities = tp_targets(Net(weights, biases, activations),
                                     Feedback(feedback_weights, feedback_biases, feedback_activations), x, target,
                                     config)
    batch = x.shape[0]
    inputs = [x] + activities[:-1]
    weight_grads, bias_grads = [], []
    local_total = x.new_zeros(())
    with torch.enable_grad():
        for l, (w, b) in enumerate(zip(weights, biases)):
            w = w.detach().requires_grad_(True)
            b = None if b is None else b.detach().requires_grad_(True)
            u = linear(inputs[l].detach(), w, b)
            h = u if l == len(weights) - 1 else phi(activations[l])(u)
            local = 0.5 * ((targets[l].detach() - h) ** 2).sum() / batch
            grads = torch.autograd.grad(local, [w] + ([] if b is None else [b]))
            weight_grads.append(grads[0])
            bias_grads.append(None if b is None else grads[1])
            local_total = local_total + local.detach()
    f = activities[-1]
    return TPResult(
        targets=[t.detach() for t in targets],
        activities=[a.detach() for a in activities],
        weight_grads=weight_grads,
        bias_grads=bias_grads,
        loss=(loss_sum(f, target, config.loss) / batch).detach(),
        local_loss=local_total,
    )


def feedback_grads(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    feedback_weights: Sequence[Tensor],
    feedback_biases: Sequence[Tensor | None],
    feedback_activations: Sequence[str],
    x: Tensor,
    noise: Sequence[Tensor | None] | None = None,
) -> FeedbackResult:
    """Gradients of the noisy reconstruction losses; ``noise[l-2]`` is ξ for layer l (or None)."""
    _, hs = forward(weights, biases, activations, x)
    batch = x.shape[0]
    weight_grads, bias_grads = [], []
    total = x.new_zeros(())
    with torch.enable_grad():
        for l in range(1, len(weights)):
            q = feedback_weights[l - 1].detach().requires_grad_(True)
            c = feedback_biases[l - 1]
            c = None if c is None else c.detach().requires_grad_(True)
            xi = None if noise is None else noise[l - 1]
            h_in = hs[l].detach() if xi is None else hs[l].detach() + xi
            u = linear(h_in, weights[l].detach(), None if biases[l] is None else biases[l].detach())
            h_out = u if l == len(weights) - 1 else phi(activations[l])(u)
            rec = feedback_map(h_out, q, c, feedback_activations[l - 1])
            value = 0.5 * ((rec - h_in) ** 2).sum() / batch
            grads = torch.autograd.grad(value, [q] + ([] if c is None else [c]))
            weight_grads.append(grads[0])
            bias_grads.append(None if c is None else grads[1])
            total = total + value.detach()
    return FeedbackResult(weight_grads, bias_grads, total)


def ridge_feedback(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    x: Tensor,
    *,
    ridge: float = 1e-3,
    bias: bool = True,
) -> tuple[list[Tensor], list[Tensor | None]]:
    """Closed-form linear feedback (ψ = identity) on the batch, for l = 2 … L.

    ``Q_l, c_l = argmin (1/B)‖H_{l-1} − H_l Q_lᵀ − c_l‖² + μ‖Q_l‖²`` with μ = ``ridge``; the
    intercept c_l is unpenalised (present only when ``bias``).
    """
    us, hs = forward(weights, biases, activations, x)
    activities = hs + [us[-1]]
    batch = x.shape[0]
    qs, cs = [], []
    for l in range(1, len(weights)):
        h_in, h_out = activities[l], activities[l + 1]
        if bias:
            mean_in, mean_out = h_in.mean(0), h_out.mean(0)
            h_in, h_out = h_in - mean_in, h_out - mean_out
        gram = h_out.T @ h_out / batch
        cross = h_out.T @ h_in / batch
        if ridge > 0:
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            q = torch.linalg.solve(gram + ridge * eye, cross).T
        else:
            q = (torch.linalg.pinv(h_out) @ h_in).T
        qs.append(q)
        cs.append(mean_in - mean_out @ q.T if bias else None)
    return qs, cs
