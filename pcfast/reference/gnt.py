"""Gauss–Newton targets (GNT), a reference algorithm for comparisons (DESIGN §4).

Per sample, the minimum-norm change of pre-activation ``u_l`` that moves the output by a Newton
step on the loss: ``Δu_l = −β J_l⁺ ∂ℓ/∂f`` with ``J_l = ∂f/∂u_l``. Each layer then takes the local
gradient of ``½‖(u_l + Δu_l) − u_l‖²``, i.e. ``−Δu_lᵀ h_{l-1} / B``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..activations import phi_grad
from ..results import GradResult
from ..types import Net
from .common import forward, loss_sum, output_error


def output_jacobians(
    weights: Sequence[Tensor], activations: Sequence[str], us: Sequence[Tensor]
) -> list[Tensor]:
    """``[J_1 … J_L]``, ``J_l = ∂f/∂u_l`` per sample, shape (B, C, d_l); ``J_L = I``."""
    batch, classes = us[-1].shape
    eye = torch.eye(classes, dtype=us[-1].dtype, device=us[-1].device)
    jacobians = [eye.expand(batch, classes, classes)]
    for l in reversed(range(len(weights) - 1)):
        # ∂f/∂u_l = ∂f/∂u_{l+1} · W_{l+1} · diag(φ'(u_l))
        jac = jacobians[0] @ weights[l + 1] * phi_grad(activations[l])(us[l]).unsqueeze(1)
        jacobians.insert(0, jac)
    return jacobians


def gnt_targets(net: Net, x: Tensor, target: Tensor, *, beta: float = 1.0, loss: str = "mse") -> list[Tensor]:
    """``[Δu_1 … Δu_L]``, the Gauss–Newton target displacements of the pre-activations."""
    us, _ = forward(net.weights, net.biases, net.activations, x)
    residual = output_error(us[-1], target, loss)  # −∂ℓ/∂f
    return [
        beta * torch.einsum("bdc,bc->bd", _pinv(jac), residual)
        for jac in output_jacobians(net.weights, net.activations, us)
    ]


def _pinv(matrix: Tensor) -> Tensor:
    """The pseudo-inverse, computed in float32 for float16/bfloat16 (``linalg.pinv`` has no kernels
    there) and returned in ``matrix``'s dtype."""
    if matrix.dtype in (torch.float16, torch.bfloat16):
        return torch.linalg.pinv(matrix.float()).to(matrix.dtype)
    return torch.linalg.pinv(matrix)


def gnt_train_step(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    x: Tensor,
    target: Tensor,
    *,
    beta: float = 1.0,
    loss: str = "mse",
) -> GradResult:
    """Local gradients toward the Gauss–Newton targets."""
    us, hs = forward(weights, biases, activations, x)
    deltas = gnt_targets(Net(weights, biases, activations), x, target, beta=beta, loss=loss)
    batch = x.shape[0]
    weight_grads = [-(d.T @ h) / batch for d, h in zip(deltas, hs)]
    bias_grads = [None if b is None else -d.sum(0) / batch for d, b in zip(deltas, biases)]
    return GradResult(weight_grads, bias_grads, loss_sum(us[-1], target, loss) / batch)
