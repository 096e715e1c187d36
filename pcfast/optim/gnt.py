"""``pcfast.optim.GNT``: Gauss–Newton-target local learning as a drop-in ``torch.optim.Optimizer``."""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from .. import functional
from .base import LocalOptimizer, Options


@dataclass(frozen=True)
class GNTOptions(Options):
    """GNT's settings: β, the size of the Newton step, and the loss."""

    beta: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        beta = self.beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
            raise ValueError(f"beta: expected a finite number >= 0, got {beta!r}")
        object.__setattr__(self, "beta", float(beta))


class GNT(LocalOptimizer):
    r"""Gauss–Newton targets (DESIGN §4) with μP learning rates — the local rule PC approaches as its
    output precision grows (oracle O5), trained like any other pcfast optimizer.

    Each ``step(x, y)`` computes, per sample, the minimum-norm change of every pre-activation that
    moves the output by a Newton step on the loss, ``Δu_l = −β J_l⁺ ∂ℓ/∂f`` with ``J_l = ∂f/∂u_l``,
    writes each layer's local gradient of ``½‖(u_l + Δu_l) − u_l‖²`` to ``.grad`` —
    ``∂/∂W_l = −Δu_lᵀ h_{l-1} / B`` and ``∂/∂b_l = −Σ_b Δu_l / B``
    (``functional.gnt_train_step``) — and applies the update rule (``torch.optim.SGD`` unless
    ``optimizer=`` names another) with ``η_l = lr · m^{-c_l}``.

    The targets need a pseudo-inverse of a (C × d_l) Jacobian per sample and layer: this is the
    reference implementation (float64 capable), meant for comparisons at moderate width.

    Args:
        model: ``nn.Sequential`` of ``nn.Linear`` and supported activations, linear readout.
        parametrization: from ``pcfast.parametrize(model, ..., algo="gnt")``; None keeps the weights
            and uses multipliers of one.
        lr: base learning rate η. optimizer, **optimizer_kwargs: the update rule, as for
            ``pcfast.optim.PC`` (SGD unless given; ``momentum=0.9`` etc. go to it).
        beta: β ≥ 0, the size of the Newton step the targets take (1 is a full step).
        loss: ``"mse"`` (``½‖y − f‖²`` per sample) or ``"ce"``, averaged over the batch.
        backend: ``"auto"`` or ``"reference"`` (GNT has only the reference implementation).
        process_group: data parallelism, as for ``pcfast.optim.PC``: ``"auto"``, None or a
            ``ProcessGroup``; the gradients are averaged over the group's samples.

    Returns from ``step``: ``{"loss": mean loss of the batch before the update}``.

    Example:
        >>> model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 10))
        >>> par = pcfast.parametrize(model, "mup", algo="gnt", base_width=64)
        >>> opt = pcfast.optim.GNT(model, par, lr=0.1, momentum=0.9, beta=1.0)
        >>> for x, y in loader:
        ...     opt.zero_grad()
        ...     stats = opt.step(x, y)
    """

    algo = "gnt"
    options = GNTOptions
    backends = ("auto", "reference")

    def _local_gradients(self, x: Tensor, target: Tensor):
        weights, biases = self._params()
        result = functional.gnt_train_step(weights, biases, self.mlp.activations, x, target,
                                           beta=self._setting("beta"), loss=self._setting("loss"),
                                           geometry=self.mlp.geometry)
        return result.weight_grads, result.bias_grads, {"loss": result.loss}, {}
