"""TP/DTP targets, local gradients and feedback gradients with explicit formulas: ``torch`` backend.

No autograd. DTP evaluates each feedback map on the stacked ``[ĥ_l; h_l]`` with one GEMM so both
share Q_l, then takes the difference. The math is ``pcfast.reference.tp``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..activations import phi, phi_grad
from ..network import check_tp_options
from ..results import FeedbackResult, TPResult
from .torch_pc import _affine, _loss_sum, _output_error


def _forward(weights, biases, activations, x) -> tuple[list[Tensor], list[Tensor]]:
    """Pre-activations [u_1 … u_L] and activities [h_1 … h_{L-1}, f]."""
    us, hs, h = [], [], x
    for l, (w, b) in enumerate(zip(weights, biases)):
        u = _affine(torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device), h, w, b)
        us.append(u)
        h = u if l == len(weights) - 1 else phi(activations[l])(u)
        hs.append(h)
    return us, hs


@torch.no_grad()
def tp_train_step(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    feedback_weights: Sequence[Tensor],
    feedback_biases: Sequence[Tensor | None],
    feedback_activations: Sequence[str],
    x: Tensor,
    target: Tensor,
    *,
    beta: float,
    loss: str,
    difference: bool,
) -> TPResult:
    check_tp_options(beta=beta, difference=difference)
    depth, batch = len(weights), x.shape[0]
    us, activities = _forward(weights, biases, activations, x)
    f = activities[-1]
    targets: list[Tensor] = [None] * depth  # type: ignore[list-item]
    targets[-1] = _output_error(torch.empty_like(f), f, target, loss).mul_(beta).add_(f)
    for l in reversed(range(1, depth)):
        q, c, psi = feedback_weights[l - 1], feedback_biases[l - 1], phi(feedback_activations[l - 1])
        if difference:
            stacked = _affine(
                torch.empty(2 * batch, q.shape[0], dtype=x.dtype, device=x.device),
                torch.cat([targets[l], activities[l]]), q, c,
            )
            mapped = psi(stacked)
            targets[l - 1] = mapped[:batch].sub_(mapped[batch:]).add_(activities[l - 1])
        else:
            targets[l - 1] = psi(_affine(torch.empty_like(activities[l - 1]), targets[l], q, c))

    # Local gradients: δ_l = φ'(u_l) ⊙ (ĥ_l − h_l) (no φ' on the linear readout);
    # ∂/∂W_l = −δ_lᵀ h_{l-1} / B.
    inputs = [x] + activities[:-1]
    weight_grads, bias_grads = [], []
    local_loss = x.new_zeros(())
    for l in range(depth):
        delta = targets[l] - activities[l]
        local_loss += 0.5 * torch.sum(delta * delta) / batch
        if l < depth - 1:
            delta.mul_(phi_grad(activations[l])(us[l]))
        weight_grads.append(torch.mm(delta.T, inputs[l]).mul_(-1.0 / batch))
        bias_grads.append(None if biases[l] is None else delta.sum(0).mul_(-1.0 / batch))
    return TPResult(
        targets=targets,
        activities=activities,
        weight_grads=weight_grads,
        bias_grads=bias_grads,
        loss=_loss_sum(f, target, loss) / batch,
        local_loss=local_loss,
    )


@torch.no_grad()
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
    depth, batch = len(weights), x.shape[0]
    _, activities = _forward(weights, biases, activations, x)
    weight_grads, bias_grads = [], []
    total = x.new_zeros(())
    for l in range(1, depth):
        xi = None if noise is None else noise[l - 1]
        h_in = activities[l - 1] if xi is None else activities[l - 1] + xi
        h_out = _affine(torch.empty(batch, weights[l].shape[0], dtype=x.dtype, device=x.device), h_in, weights[l], biases[l])
        if l < depth - 1:
            h_out = phi(activations[l])(h_out)
        q, c, psi = feedback_weights[l - 1], feedback_biases[l - 1], feedback_activations[l - 1]
        pre = _affine(torch.empty_like(h_in), h_out, q, c)
        slope = phi_grad(psi)(pre)
        residual = phi(psi)(pre) - h_in
        total += 0.5 * torch.sum(residual * residual) / batch
        delta = residual.mul_(slope)
        weight_grads.append(torch.mm(delta.T, h_out).mul_(1.0 / batch))
        bias_grads.append(None if c is None else delta.sum(0).mul_(1.0 / batch))
    return FeedbackResult(weight_grads, bias_grads, total)
