"""``pcfast.optim.IPC``: incremental predictive coding, one weight update per inference step."""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import DivergenceError
from ..mup.presets import Parametrization
from ..ops.torch_pc import _loss_sum, _Relaxation
from ..reference.common import forward
from ..reference.pc import pc_activity_grads, pc_energy, pc_weight_grads
from ..types import Net, PCConfig
from .base import _PER_ELEMENT_STATE, _Step
from .pc import PC, PCOptions


@dataclass(frozen=True)
class IPCOptions(PCOptions):
    """iPC's settings: PC's, with T ≥ 1 (each inference step is a weight step), the Jacobi schedule
    and no FPA (the weights change at every step, so there are no fixed feedforward predictions).
    Adaptive stopping, the trace and the divergence guard are PC's and not offered here: every
    inference step is also a weight step, so the energy is not descended."""

    check_divergence: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, off in (("inference_tol", None), ("trace", False), ("check_divergence", False)):
            if getattr(self, name) != off:
                raise ValueError(f"{name}: not available for iPC (each inference step also updates the weights); "
                                 f"use pcfast.optim.PC, or leave {name}={off!r}")
        if self.inference_steps < 1:
            raise ValueError(f"inference_steps: expected an int >= 1 (iPC updates the weights once per inference "
                             f"step), got {self.inference_steps!r}")
        if self.schedule != "jacobi":
            raise ValueError(f"schedule: iPC relaxes with the 'jacobi' schedule, got {self.schedule!r}")
        if self.fpa:
            raise ValueError("fpa: iPC changes the weights at every step, so there are no fixed feedforward "
                             "predictions; use fpa=False")


class _LiveRelaxation(_Relaxation):
    """The torch backend's relaxation state over weights that change between its steps."""

    def weights_changed(self) -> None:
        """Recompute every prediction and error under the current weights (``_Relaxation`` keeps the
        first layer's prediction from its feedforward pass, since PC's weights stay put)."""
        self.layer_map(0)
        self.refresh()


class _ReferenceRelaxation:
    """The relaxation state of ``_Relaxation``'s interface on ``pcfast.reference.pc`` (autograd of F)."""

    def __init__(self, net: Net, x: Tensor, target: Tensor, config: PCConfig) -> None:
        self.net, self.x, self.target, self.config = net, x, target, config
        us, _ = forward(net.weights, net.biases, net.activations, x)
        self.latents = [u.clone() for u in us[:-1]]
        self.f0 = us[-1]

    def weights_changed(self) -> None:
        """Nothing is cached: every quantity is computed from the latents and the live weights."""

    def jacobi_step(self) -> None:
        gammas, rate = self.config.precisions, self.config.inference_lr
        g = pc_activity_grads(self.net, self.x, self.target, self.latents, self.config)
        self.latents = [z - rate / gammas[l] * g[l] for l, z in enumerate(self.latents)]

    def weight_grads(self) -> tuple[list[Tensor], list[Tensor | None]]:
        return pc_weight_grads(self.net, self.x, self.target, self.latents, self.config)

    def energy(self) -> Tensor:
        net, config = self.net, self.config
        return pc_energy(net.weights, net.biases, net.activations, self.x, self.target, self.latents,
                         precisions=config.precisions, loss=config.loss)


class IPC(PC):
    r"""Incremental predictive coding (iPC; Salvatori et al., ICLR 2024) with μP learning rates.

    PC (``pcfast.optim.PC``) relaxes the latents for T steps and then updates the weights once; iPC
    updates the weights at every one of the T inference steps. Each ``step(x, y)``, from the
    feedforward latents ``z_0`` under the current weights θ_0, runs for t = 1 … T:

    1. one Jacobi relaxation step ``z_l ← z_l − (κ/γ_l) ∂F/∂z_l`` at (z_{t-1}; θ_{t-1});
    2. the local gradients ``∂(F/B)/∂W_l = −γ_l ε_lᵀ φ(z_{l-1}) / B`` (and the biases') at
       (z_t; θ_{t-1}), written to ``.grad``;
    3. one step of the update rule (SGD unless ``optimizer=`` names another) with each layer's rate
       ``η_l = lr · m^{-c_l}``: θ_t.

    The paper describes the latent and weight updates of a time step as running in parallel from
    the same state; here the weight gradient reads the freshly relaxed latents, so that the first
    weight step is not spent at the feedforward state (where every hidden error is zero) and T = 1
    is exactly one PC step with T = 1 (``pcfast.reference.ipc`` says more). The specification is
    ``pcfast.reference.ipc.ipc_trajectory``. The μP multipliers are PC's (the parametrization is
    made with ``algo="pc"``): each inner step is PC's local gradient under PC's update rule.

    All or nothing. Before the first inner step the parameters that train and their inner-optimizer
    state are copied (``LocalOptimizer._save_state``) and their ``.grad`` kept; the T inner steps
    then run in place without a host sync. One flag — a non-finite energy at any inner step, a
    non-finite gradient, parameter or per-element state (momentum, Adam's moments) after the last
    one, or a class label out of range — is read with the statistics in the step's one host sync.
    Each step's energy suffices for the earlier steps: a non-finite weight or bias left by step t
    makes a prediction, hence the energy, of step t + 1 non-finite, and a non-finite momentum or
    moment either makes the next update of its parameter non-finite or stays non-finite (every
    update scales it by a nonzero factor and adds to it) up to the final check. If the flag is
    set, or anything raises, parameters, ``.grad`` and the inner state are put back from the copies
    and ``DivergenceError`` (``ValueError`` for a bad batch or model) is raised: nothing changed.

    After ``step(x, y)``, ``.grad`` holds the gradients of the last inner step. ``step()`` without a
    batch applies ``.grad`` once, as for every pcfast optimizer. Differences from the
    ``LocalOptimizer`` contract: ``compute_gradients`` raises (iPC's gradients exist only between
    weight updates), ``step(x, y)`` does not update parameters added with ``add_param_group`` (a
    later ``step()`` does), and data parallelism (``process_group``) is not supported.

    Args:
        model: ``nn.Sequential`` of ``nn.Linear`` and supported activations, linear readout.
        parametrization: from ``pcfast.parametrize(model, ..., algo="pc")``; None keeps the weights
            and uses multipliers and precisions of one.
        lr: base learning rate η of every inner step.
        optimizer: the update rule, a ``torch.optim`` class or a factory, as for ``PC``.
        **optimizer_kwargs: passed to ``optimizer`` (``momentum=0.9`` for SGD; ``betas`` for Adam).
        inference_steps: T ≥ 1, the inference steps and weight updates per batch. inference_lr: κ.
        schedule: ``"jacobi"`` only. fpa: False only. loss: ``"mse"`` or ``"ce"``.
        backend: ``"auto"`` or ``"torch"`` (explicit formulas, ``pcfast.ops.torch_pc``), or
            ``"reference"`` (autograd of F, ``pcfast.reference.pc``).

    Returns from ``step``: ``{"loss": mean feedforward loss under the weights before the step,
    "energy": F / B at the last inner step's gradient, (z_T; θ_{T-1})}``.

    Example:
        >>> model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 10))
        >>> par = pcfast.parametrize(model, "mup", algo="pc", base_width=64)
        >>> opt = pcfast.optim.IPC(model, par, lr=0.01, inference_steps=5, inference_lr=0.2)
        >>> for x, y in loader:
        ...     opt.zero_grad()
        ...     stats = opt.step(x, y)
    """

    algo = "ipc"
    options = IPCOptions
    backends = ("auto", "torch", "reference")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.mlp.is_conv:
            raise TypeError("model: IPC trains MLPs only (its interleaved updates are written for dense layers); "
                            "train a conv net with pcfast.optim.PC")
        if self.process_group is not None:
            raise ValueError("process_group: IPC does not support data parallelism (it would need one all-reduce "
                             "per inference step); pass process_group=None")

    def _check_parametrization(self, parametrization: Parametrization, name: str) -> None:
        """iPC's multipliers are PC's: a parametrization made for ``algo="pc"`` (or ``"any"``) fits."""
        parametrization.check_matches(self.mlp)
        if parametrization.algo not in ("any", "pc", self.algo):
            raise ValueError(f"{name}: made for algo={parametrization.algo!r}, but IPC takes PC's multipliers; "
                             "call pcfast.parametrize(model, ..., algo='pc')")

    def _local_gradients(self, x: Tensor, target: Tensor):
        raise NotImplementedError("IPC: the gradients of iPC exist only between its weight updates; call step(x, y)")

    @torch.no_grad()
    def compute_gradients(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """Not available: iPC's gradients exist only between its weight updates; call ``step(x, y)``."""
        raise NotImplementedError("IPC.compute_gradients: iPC updates the weights at every inference step, so its "
                                  "gradients exist only inside step(x, y); call step(x, y)")

    @torch.no_grad()
    def step(self, x: Tensor | None = None, y: Tensor | None = None, closure=None) -> dict[str, float] | None:  # type: ignore[override]
        """T inference steps on batch ``(x, y)``, each followed by one weight update (class docstring);
        without a batch, one update from the current ``.grad``."""
        if closure is not None or x is None or y is None:
            return super().step(x, y, closure)  # its errors, or the plain update from .grad
        self._check_ready()
        target = self._check_batch(x, y)
        config = self._pc_config()
        self._sync_inner()
        stepped = [(i, p, None) for i, group in enumerate(self.param_groups[:self._model_groups])
                   for p in group["params"] if p.requires_grad]
        self._check_rates(stepped)
        params = [p for _, p, _ in stepped]
        saved = self._save_state(params)
        previous = [(p, p.grad) for p in params]
        try:
            stats, energies = self._inner_steps(x, target, config, stepped)
            like = stats["energy"]
            # Per inner step its energy only (the class docstring says why that suffices); the last
            # step's gradients, parameters and state are checked themselves.
            last = [*(p.grad for p in params), *params, *self._element_state(params)]
            flag = torch.stack([~torch.isfinite(torch.stack(energies)).all(),
                                *(~torch.isfinite(v).all() for v in last)]).any()
            values = self._read([*stats.values(), self._guard(y, like), flag.to(like.dtype)])
            if not all(map(math.isfinite, values[:-1])) or values[-1]:
                self._put_back(saved, previous)  # before the diagnosis, which reads the model
                self._diverged(energies, values, _Step(x, y, target, {}))
        except BaseException:
            self._put_back(saved, previous)
            raise
        for p in params:
            self._written_grads[p] = weakref.ref(p.grad)
        return dict(zip(self.stat_names, values))

    def _put_back(self, saved, previous) -> None:
        self._load_state(saved)
        for p, g in previous:
            p.grad = g

    def _element_state(self, params: list[Tensor]) -> list[Tensor]:
        """The per-element inner state of ``params`` (momentum buffers, Adam's moments)."""
        return [v for p in params for k, v in self.state.get(p, {}).items()
                if k in _PER_ELEMENT_STATE and isinstance(v, Tensor)]

    def _inner_steps(self, x: Tensor, target: Tensor, config: PCConfig, stepped):
        """The T relaxation and weight steps in place: the statistics and every inner step's
        energy F(z_t; θ_{t-1}), as 0-d tensors (nothing is read on the host)."""
        net = self._net()
        relaxation = (_ReferenceRelaxation if self._setting("backend") == "reference" else _LiveRelaxation)(
            net, x, target, config)
        loss = _loss_sum(relaxation.f0, target, config.loss) / x.shape[0]
        energies = []
        for t in range(config.inference_steps):
            if t:
                relaxation.weights_changed()  # the errors under the weights the last inner step updated
            relaxation.jacobi_step()
            energies.append(relaxation.energy())
            weight_grads, bias_grads = relaxation.weight_grads()
            for p, g in self._grads_by_param(weight_grads, bias_grads).items():
                p.grad = g
            self._inner_step(stepped)
        return {"loss": loss, "energy": energies[-1] / x.shape[0]}, energies

    def _diverged(self, energies: list[Tensor], values: list[float], step: _Step) -> None:
        """Raise for a step whose flag or statistics are not finite (the caller has put back the
        state): ``ValueError`` for a bad batch or model, else ``DivergenceError`` naming the first
        inner step whose energy, or (the last step) whose update, is not finite."""
        bad = [name for name, v in zip((*self.stat_names, "labels"), values) if not math.isfinite(v)]
        finite = torch.isfinite(torch.stack(energies)).tolist()
        first = finite.index(False) if False in finite else len(finite) - 1
        if "labels" in bad or "loss" in bad or first == 0:
            self._raise_for_inputs(step)  # the ValueError naming x, y or a non-finite model
        raise DivergenceError(f"the iPC step diverged at inner step {first + 1} of {len(energies)} (a non-finite "
                              "energy, gradient, parameter or optimizer state); nothing was changed (lower the "
                              "learning rates or inference_lr)")
