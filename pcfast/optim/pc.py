"""``pcfast.optim.PC``: predictive coding as a drop-in ``torch.optim.Optimizer``."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

from .. import functional
from ..errors import DivergenceError
from ..network import SCHEDULES, check_bool, check_pc_options
from ..results import PCTrace
from ..types import PCConfig
from .base import LocalOptimizer, Options, _Step

# The divergence guard's margin: F may exceed F_{T-1} and F_0 by this many ε of the dtype (relative)
# before the relaxation counts as diverging — well above the rounding of a sum of squares.
_RISE_EPS = 1000


@dataclass(frozen=True)
class PCOptions(Options):
    """PC's settings: T (``inference_steps``), κ (``inference_lr``), the schedule, FPA, the loss, adaptive
    stopping (``inference_tol``), the trace, and the divergence guard (``check_divergence``)."""

    inference_steps: int = 20
    inference_lr: float = 0.1
    schedule: str = "jacobi"
    fpa: bool = False
    inference_tol: float | None = None
    trace: bool = False
    check_divergence: bool = True

    # Settings a state saved by an older pcfast lacks: loading it keeps this optimizer's values.
    added_later: ClassVar[tuple[str, ...]] = ("inference_tol", "trace", "check_divergence")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_pc_options(inference_steps=0, inference_lr=1.0, schedule="jacobi", fpa=False,
                         inference_tol=self.inference_tol)
        check_bool("trace", self.trace)
        check_bool("check_divergence", self.check_divergence)
        if self.inference_tol is not None:
            object.__setattr__(self, "inference_tol", float(self.inference_tol))
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
        inference_steps: T (the cap, with ``inference_tol``). inference_lr: κ. schedule: ``"jacobi"``
            or ``"sequential"``. fpa: fixed-prediction assumption. loss: ``"mse"`` or ``"ce"``.
        inference_tol: adaptive stopping — end the relaxation after the first step whose size
            ‖Δz‖ is at most ``inference_tol`` × the largest step so far (DESIGN §3); None runs all T.
            The steps taken are reported as the ``inference_steps`` statistic.
        trace: keep the step's ``PCTrace`` (energy per layer after every inference step, and the
            activity-gradient norms) in ``last_trace``, on the device.
        check_divergence: the divergence guard (not under FPA, where F is not descended): a
            relaxation whose energy rose in its last step, or ended above its start — with
            ``trace``, rose in any step — raises ``DivergenceError`` naming the first step whose
            energy rose and the layer whose curvature limits κ, with the largest stable
            ``inference_lr`` estimated; nothing is changed. Costs one extra energy evaluation per train step.
        backend: ``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"`` or ``"reference"``.
        process_group: data parallelism (``pcfast.distributed``): ``"auto"`` (the default group when
            ``torch.distributed`` is initialised with more than one rank), None (single process) or
            a ``ProcessGroup``; each rank then steps on its shard of the batch and the gradients and
            statistics are averaged over the group's samples (one all-reduce per step).

    Returns from ``step``: ``{"loss": mean feedforward loss, "energy": F / B at the final state}``,
    with ``"inference_steps"`` (the steps taken; the mean over ranks under data parallelism) when
    ``inference_tol`` is set.

    Example:
        >>> model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 10))
        >>> par = pcfast.parametrize(model, "mup", algo="pc", base_width=64)
        >>> opt = pcfast.optim.PC(model, par, lr=0.1, inference_steps=20, inference_lr=0.1)
        >>> for x, y in loader:
        ...     opt.zero_grad()
        ...     stats = opt.step(x, y)
    """

    algo = "pc"
    options = PCOptions
    last_trace: PCTrace | None = None

    @property
    def stat_names(self) -> tuple[str, ...]:  # type: ignore[override]
        tol = self.param_groups[0].get("inference_tol") if self.param_groups else None
        return ("loss", "energy") if tol is None else ("loss", "energy", "inference_steps")

    def _pc_config(self) -> PCConfig:
        """The step's ``PCConfig`` from the group settings and the parametrization's precisions,
        made (and so checked) again only when one of them changed."""
        settings = self.param_groups[0]
        key = (settings["inference_steps"], settings["inference_lr"], settings["schedule"], settings["fpa"],
               settings["loss"], settings.get("inference_tol"), settings.get("trace", False),
               settings.get("check_divergence", True), tuple(self.parametrization.precisions))
        if getattr(self, "_config_key", None) != key:
            steps, rate, schedule, fpa, loss, tol, trace, check, gammas = key
            self.options(inference_steps=steps, inference_lr=rate, schedule=schedule, fpa=fpa, loss=loss,
                         inference_tol=tol, trace=trace, check_divergence=check)
            self._config = PCConfig(gammas, inference_steps=steps, inference_lr=rate, schedule=schedule, fpa=fpa,
                                    loss=loss, inference_tol=tol, return_trace=trace,
                                    check_divergence=check and not fpa)
            self._config_key = key
        return self._config

    def _local_gradients(self, x: Tensor, target: Tensor):
        config = self._pc_config()
        result = functional.pc_grads(self._net(), x, target, config, self._setting("backend"))
        energy = result.energy / x.shape[0]
        pending = {}
        if config.check_divergence:
            # F_T above F_{T-1} or above F_0 = γ_L Σℓ(f_0) (with the trace: any step above the one
            # before): the energy is reported as NaN, which the step's one host read sees with its
            # other values; _raise_non_finite explains it.
            # A rise counts beyond 1000 ε relative and ε · B · max γ absolute: an energy at the
            # rounding floor of ε_l = z_l − μ_l (a relaxation with nothing left to explain) jitters.
            eps = torch.finfo(energy.dtype).eps
            margin, floor = 1 + _RISE_EPS * eps, eps * x.shape[0] * max(config.precisions)
            start = result.loss * (config.precisions[-1] * x.shape[0])
            rose = result.energy > torch.maximum(result.energy_prev, start) * margin + floor
            if result.trace is not None:
                totals = result.trace.energy.sum(1)  # NaN after a stop: NaN comparisons are False
                rose = rose | (totals[1:] > totals[:-1] * margin + floor).any()
            energy = torch.where(rose, torch.full_like(energy, math.nan), energy)
            pending["relaxation"] = (result.energy, rose, config)
        stats = {"loss": result.loss, "energy": energy}
        if result.steps is not None:
            stats["inference_steps"] = result.steps.to(energy.dtype)
        pending["trace"] = result.trace
        return result.weight_grads, result.bias_grads, stats, pending

    def _commit_extra(self, pending: dict) -> None:
        """The step went through: its trace becomes ``last_trace`` (a refused step changes nothing)."""
        if "trace" in pending:
            self.last_trace = pending["trace"]

    def _raise_non_finite(self, grads, values: dict[str, float], step: _Step) -> None:
        """A finite energy that the guard marked (the relaxation rose): ``DivergenceError`` naming the
        first step whose energy rose and the layer with the smallest stable κ, with the estimate."""
        relaxation = step.pending.get("relaxation")
        if relaxation is not None and math.isnan(values.get("energy", 0.0)) and all(
                math.isfinite(v) for name, v in values.items() if name != "energy"):
            energy, rose, config = relaxation
            if bool(torch.isfinite(energy)) and all(bool(torch.isfinite(g).all()) for g in grads.values()):
                if not bool(rose):  # finite and not rising here: the reduced energy came from another rank
                    raise DivergenceError("the PC relaxation diverged on another rank of the process group (its "
                                          "energy rose); nothing was changed (that rank's error names the step "
                                          "and layer)")
                self._raise_diverging_relaxation(step, config)
        super()._raise_non_finite(grads, values, step)

    def _raise_diverging_relaxation(self, step: _Step, config: PCConfig) -> None:
        from ..reference.stability import pc_stability

        net = self._net()
        traced = functional.pc_grads(net, step.x, step.target, replace(config, return_trace=True,
                                                                      check_divergence=False),
                                     self._setting("backend"))
        energies = traced.trace.energy.sum(1).double().cpu()
        energies = energies[~torch.isnan(energies)]
        rises = (energies[1:] > energies[:-1]).tolist()
        first = rises.index(True) + 1 if True in rises else len(energies) - 1
        stability = pc_stability(net, step.x, step.target, config)
        layer = stability.limiting_layer
        raise DivergenceError(
            f"the PC relaxation diverged: its energy rose at inference step {first} of {len(energies) - 1} "
            f"(F = {float(energies[first - 1]):.6g} → {float(energies[first]):.6g}; F_0 = {float(energies[0]):.6g}); "
            f"inference_lr = {config.inference_lr:g} is too large for the curvature of hidden layer {layer + 1} "
            f"(the output of {self._layer_name(self.mlp.linears[layer])}; alone it is stable up to about "
            f"{stability.layer_inference_lr[layer]:.3g}); the largest stable inference_lr is estimated at "
            f"{stability.inference_lr:.3g} (power iteration on the activity Hessian at the feedforward state); "
            "nothing was changed (lower inference_lr, or pass check_divergence=False to skip this guard)",
            step=first, layer=layer + 1, stable_inference_lr=stability.inference_lr)

