"""SGD as ``torch.optim.SGD`` defines it (momentum, dampening, Nesterov, weight decay), out of place.

One formula for every optimizer (``pcfast.optim``) and for ``functional.pc_train_step(..., sgd=)``,
whose ``triton`` backend applies the same rule inside the weight-gradient kernel (one pass writes
the gradient, the new momentum buffer and the new parameter):

    d = g + λ p;   buf = d (first step) or μ buf + (1 − τ) d;   d = d + μ buf (Nesterov) or buf (μ > 0)
    p_new = p − η d
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import DivergenceError

# Columns of the per-layer hyperparameter rows the fused kernels read (a float64 device tensor, so
# that a learning-rate schedule changes values, not CUDA graphs).
HYPER_COLUMNS = ("weight_lr", "bias_lr", "momentum", "dampening", "weight_decay")


@dataclass
class LayerSGD:
    """One layer's SGD step for its weight and bias: rates, shared settings, current momentum buffers
    (None before the first step, or without momentum)."""

    weight_lr: float
    bias_lr: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    weight_buffer: Tensor | None = None
    bias_buffer: Tensor | None = None

    def check(self, name: str) -> None:
        for field in HYPER_COLUMNS:
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}.{field}: expected a finite number >= 0, got {value!r}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError(f"{name}.nesterov: requires momentum > 0 and dampening = 0")

    def row(self) -> list[float]:
        return [float(getattr(self, field)) for field in HYPER_COLUMNS]


def sgd_update(param: Tensor, grad: Tensor, *, lr: float, momentum: float, dampening: float, weight_decay: float,
               nesterov: bool, buffer: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(new parameter, new momentum buffer or None), both new tensors; nothing is modified.

    Raises ``DivergenceError`` when a rate lies beyond the parameter dtype's range (torch would
    refuse to convert it, e.g. ``lr=1e300`` on float32): such an update cannot be finite."""
    largest = torch.finfo(param.dtype).max
    for name, value in (("lr", lr), ("weight_decay", weight_decay), ("momentum", momentum),
                        ("1 - dampening", 1 - dampening)):
        if abs(value) > largest:
            raise DivergenceError(f"{name}: {value!r} exceeds the largest {param.dtype} ({largest:g}); "
                                  "the update would not be finite; nothing was changed")
    d = grad.add(param, alpha=weight_decay) if weight_decay else grad
    new_buffer = None
    if momentum:
        new_buffer = d.clone() if buffer is None else buffer.mul(momentum).add_(d, alpha=1 - dampening)
        d = d.add(new_buffer, alpha=momentum) if nesterov else new_buffer
    return param.add(d, alpha=-lr), new_buffer


def layer_updates(weights, biases, weight_grads, bias_grads, sgd) -> list[tuple[Tensor, Tensor | None]]:
    """``sgd_update`` for every parameter in model order (W_1, b_1, W_2, …; absent biases skipped):
    the ``sgd_updates`` of a train step computed after it (backends without the fused pass)."""
    updates = []
    for w, b, gw, gb, step in zip(weights, biases, weight_grads, bias_grads, sgd):
        shared = dict(momentum=step.momentum, dampening=step.dampening, weight_decay=step.weight_decay,
                      nesterov=step.nesterov)
        updates.append(sgd_update(w, gw, lr=step.weight_lr, buffer=step.weight_buffer, **shared))
        if b is not None:
            updates.append(sgd_update(b, gb, lr=step.bias_lr, buffer=step.bias_buffer, **shared))
    return updates
