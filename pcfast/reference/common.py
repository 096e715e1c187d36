"""Pieces every reference algorithm shares: the feedforward pass and the output loss.

Conventions (DESIGN §1): batches are rows, ``u_l = h_{l-1} W_lᵀ + b_l``, ``h_l = φ_l(u_l)`` for
hidden layers, ``h_0 = x`` and the readout ``f = u_L`` is linear. The loss ℓ is summed over the
batch: MSE ``½‖y − f‖²`` against float targets (B, C), cross-entropy against int64 labels (B,).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..activations import phi


def linear(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``h Wᵀ + b`` (``nn.Linear``'s own computation)."""
    return torch.nn.functional.linear(h, weight, bias)


def forward(
    weights: Sequence[Tensor], biases: Sequence[Tensor | None], activations: Sequence[str], x: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """Feedforward pass: pre-activations ``[u_1 … u_L]`` and activities ``[h_0 = x, h_1 … h_{L-1}]``."""
    us, hs = [], [x]
    for l, (w, b) in enumerate(zip(weights, biases)):
        u = linear(hs[-1], w, b)
        us.append(u)
        if l < len(weights) - 1:
            hs.append(phi(activations[l])(u))
    return us, hs


def loss_sum(f: Tensor, target: Tensor, loss: str) -> Tensor:
    """ℓ(f, y) summed over the batch."""
    if loss == "mse":
        return 0.5 * torch.nn.functional.mse_loss(f, target, reduction="sum")
    if loss == "ce":
        return torch.nn.functional.cross_entropy(f, target, reduction="sum")
    raise ValueError(f"loss: expected 'mse' or 'ce', got {loss!r}")


def output_error(f: Tensor, target: Tensor, loss: str) -> Tensor:
    """``ε_L = −∂ℓ/∂f`` per sample: ``y − f`` for MSE, ``onehot(y) − softmax(f)`` for CE."""
    if loss == "mse":
        return target - f
    if loss == "ce":
        onehot = torch.nn.functional.one_hot(target, f.shape[1]).to(f.dtype)
        return onehot - torch.softmax(f, dim=1)
    raise ValueError(f"loss: expected 'mse' or 'ce', got {loss!r}")
