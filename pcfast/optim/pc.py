"""``pcfast.optim.PC``: predictive coding as a drop-in ``torch.optim.Optimizer``."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .. import functional
from ..network import SCHEDULES
from ..types import PCConfig
from .base import LocalOptimizer, Options


@dataclass(frozen=True)
class PCOptions(Options):
    """PC's settings: T (``inference_steps``), κ (``inference_lr``), the schedule, FPA and the loss."""

    inference_steps: int = 20
    inference_lr: float = 0.1
    schedule: str = "jacobi"
    fpa: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        steps, rate = self.inference_steps, self.inference_lr
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"inference_steps: expected an int >= 0, got {steps!r}")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < float("inf"):
            raise ValueError(f"inference_lr: expected a finite number > 0, got {rate!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        object.__setattr__(self, "inference_lr", float(rate))
        object.__setattr__(self, "fpa", bool(self.fpa))


class PC(LocalOptimizer):
    r"""Predictive coding (DESIGN §3) with μP learning rates and precisions.

    Each ``step(x, y)`` relaxes the latents from the feedforward pass for ``inference_steps`` steps
    ``z_l ← z_l − (κ/γ_l) ∂F/∂z_l`` (κ = ``inference_lr``), writes the local gradients
    ``∂F/∂W_l = −γ_l ε_lᵀ φ(z_{l-1}) / B`` to ``.grad`` and applies the update rule (SGD unless
    ``optimizer=`` names another) with each layer's learning rate ``η_l = lr · m^{-c_l}``. Evaluation is the plain feedforward ``model(x)``.

    The torch.optim contract (``LocalOptimizer``): each group's ``lr`` is η and its ``lr_mult`` the
    multiplier ``m^{-c_l}``; parameters with ``requires_grad=False`` are frozen (no ``.grad``, no
    update); ``compute_gradients`` adds into ``.grad``; ``step()`` without a batch warns once if
    ``.grad`` did not come from this optimizer (e.g. ``loss.backward()``: that step is the plain update rule).

    Args:
        model: ``nn.Sequential`` of ``nn.Linear`` and supported activations, linear readout.
        parametrization: from ``pcfast.parametrize(model, ..., algo="pc")``; None keeps the weights
            and uses multipliers and precisions of one.
        lr: base learning rate η.
        optimizer: the update rule — a ``torch.optim`` class such as ``torch.optim.SGD`` (the default),
            ``Adam`` or ``AdamW``, or a factory ``f(param_groups, lr=..., **kwargs)``; its μP
            multipliers come from the parametrization (``Parametrization.scales``).
        **optimizer_kwargs: passed to ``optimizer`` (``momentum=0.9``, ``nesterov=True`` for SGD;
            ``betas``, ``eps``, ``weight_decay`` for Adam).
        inference_steps: T. inference_lr: κ. schedule: ``"jacobi"`` or ``"sequential"``.
        fpa: fixed-prediction assumption. loss: ``"mse"`` or ``"ce"``.
        backend: ``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"`` or ``"reference"``.
        process_group: data parallelism (``pcfast.distributed``): ``"auto"`` (the default group when
            ``torch.distributed`` is initialised with more than one rank), None (single process) or
            a ``ProcessGroup``; each rank then steps on its shard of the batch and the gradients and
            statistics are averaged over the group's samples (one all-reduce per step).

    Returns from ``step``: ``{"loss": mean feedforward loss, "energy": F / B at the final state}``.

    Example:
        >>> model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 10))
        >>> par = pcfast.parametrize(model, "mup", algo="pc", base_width=64)
        >>> opt = pcfast.optim.PC(model, par, lr=0.1, inference_steps=20, inference_lr=0.1)
        >>> for x, y in loader:
        ...     opt.zero_grad()
        ...     stats = opt.step(x, y)
    """

    algo = "pc"
    stat_names = ("loss", "energy")
    options = PCOptions

    def _pc_config(self) -> PCConfig:
        """The step's ``PCConfig`` from the group settings and the parametrization's precisions,
        made (and so checked) again only when one of them changed."""
        settings = self.param_groups[0]
        key = (settings["inference_steps"], settings["inference_lr"], settings["schedule"], settings["fpa"],
               settings["loss"], tuple(self.parametrization.precisions))
        if getattr(self, "_config_key", None) != key:
            self.options(inference_steps=key[0], inference_lr=key[1], schedule=key[2], fpa=key[3], loss=key[4])
            self._config = PCConfig(key[5], inference_steps=key[0], inference_lr=key[1], schedule=key[2],
                                    fpa=key[3], loss=key[4])
            self._config_key = key
        return self._config

    def _local_gradients(self, x: Tensor, target: Tensor):
        result = functional.pc_grads(self._net(), x, target, self._pc_config(), self._setting("backend"))
        stats = {"loss": result.loss, "energy": result.energy / x.shape[0]}
        return result.weight_grads, result.bias_grads, stats, {}
