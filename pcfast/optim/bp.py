"""``pcfast.optim.BP``: backprop with the same interface, for side-by-side comparisons."""
from __future__ import annotations

from torch import Tensor, nn

from .. import functional
from ..mup.presets import Parametrization
from ..network import resolve_loss
from .base import LocalOptimizer


class BP(LocalOptimizer):
    r"""Backpropagation SGD over an MLP with μP learning rates — the baseline for PC, TP and DTP.

    ``step(x, y)`` writes ``∂(ℓ/B)/∂θ`` to ``.grad`` and applies SGD with ``η_l = lr · m^{-c_l}``.

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
    ) -> None:
        loss = resolve_loss(loss)  # a name, or nn.CrossEntropyLoss() (see pcfast.network.resolve_loss)
        super().__init__(model, parametrization, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, backend=backend, loss=loss)

    def _local_gradients(self, x: Tensor, y: Tensor):
        weights, biases = self._params()
        result = functional.bp_train_step(weights, biases, self.mlp.activations, x, y, loss=self._setting("loss"))
        return result.weight_grads, result.bias_grads, {"loss": result.loss}, {}
