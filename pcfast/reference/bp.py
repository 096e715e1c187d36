"""Backpropagation, the baseline every local rule is compared with: autograd of the mean loss."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..results import GradResult
from .common import forward, loss_sum


def bp_train_step(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    x: Tensor,
    target: Tensor,
    *,
    loss: str = "mse",
) -> GradResult:
    """Gradients of ``ℓ(f, y) / B`` with respect to every weight and bias."""
    with torch.enable_grad():
        ws = [w.detach().requires_grad_(True) for w in weights]
        bs = [None if b is None else b.detach().requires_grad_(True) for b in biases]
        f = forward(ws, bs, activations, x)[0][-1]
        value = loss_sum(f, target, loss) / x.shape[0]
        params = ws + [b for b in bs if b is not None]
        grads = list(torch.autograd.grad(value, params))
    rest = iter(grads[len(ws) :])
    return GradResult(grads[: len(ws)], [None if b is None else next(rest) for b in bs], value.detach())
