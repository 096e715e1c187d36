"""PC relaxation and weight gradients with explicit formulas: the ``torch`` backend.

No autograd. Every buffer is allocated once per call and reused across inference steps; latents,
errors and activities are updated in place. Per step and layer there is one GEMM for the prediction
(the first layer's is constant and computed once) and one for the top-down term; with FPA only the
top-down GEMMs remain. Runs on any device and dtype. The math is ``pcfast.reference.pc``.

``pc_grads`` takes a ``Net`` and a ``PCConfig`` (``TorchBackend.pc_grads``). The state of one step
and its in-place updates are ``_Relaxation``; ``relax`` runs the inference steps of any such state and
collects the result — the triton backend's schedule (``triton_pc``) drives its kernels through it too.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ..activations import phi, phi_grad
from ..results import PCResult
from ..types import Net, PCConfig


def _affine(out: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``out = h Wᵀ + b`` in place."""
    if bias is None:
        return torch.mm(h, weight.T, out=out)
    return torch.addmm(bias, h, weight.T, out=out)


def _output_error(out: Tensor, f: Tensor, target: Tensor, loss: str) -> Tensor:
    """``out = −∂ℓ/∂f`` in place (MSE: ``y − f``; CE: ``onehot(y) − softmax(f)``)."""
    if loss == "mse":
        return torch.sub(target, f, out=out)
    torch.softmax(f, dim=1, out=out).neg_()
    out.scatter_add_(1, target.view(-1, 1), torch.ones_like(out[:, :1]))
    return out


def _loss_sum(f: Tensor, target: Tensor, loss: str) -> Tensor:
    if loss == "mse":
        return 0.5 * torch.sum((target - f) ** 2)
    return torch.nn.functional.cross_entropy(f, target, reduction="sum")


class Relaxation(Protocol):
    """The state of one PC step after its feedforward pass, as ``relax`` drives it."""

    latents: list[Tensor]
    errors: list[Tensor]

    def step(self) -> None:
        """One inference step of the configured schedule."""

    def refresh(self) -> None:
        """Bring every error up to date with the latents (a sequential sweep leaves them stale)."""

    def weight_grads(self) -> tuple[list[Tensor], list[Tensor | None]]:
        """−γ_l ε_lᵀ a_{l-1} / B and its bias row sums, at the final state."""

    def energy(self) -> Tensor:
        """F at the final state (DESIGN §3)."""


def relax(state: Relaxation, config: PCConfig, loss: Tensor) -> PCResult:
    """Run ``config``'s inference steps on ``state`` and collect the result (``loss``: ℓ at the
    feedforward pass, batch mean)."""
    trajectory = [[z.clone() for z in state.latents]] if config.return_trajectory else None
    for _ in range(config.inference_steps):
        state.step()
        if trajectory is not None:
            trajectory.append([z.clone() for z in state.latents])
    if not config.fpa and config.schedule == "sequential" and config.inference_steps > 0:
        state.refresh()
    weight_grads, bias_grads = state.weight_grads()
    return PCResult(latents=state.latents, errors=state.errors, weight_grads=weight_grads, bias_grads=bias_grads,
                    energy=state.energy(), loss=loss, trajectory=trajectory)


class _Relaxation:
    """One PC step in preallocated buffers (a ``Relaxation``), updated in place.

    predictions[l]: layer l's prediction (layer 1's is constant: φ(z_0) = x); acts[l]: its
    presynaptic activity x, φ(z_1), …, φ(z_{L-1}); latents[l] = z_l; errors[l] = ε_l; topdown[l]:
    ε_{l+1} W_{l+1}; slopes[l]: φ'(z_l), frozen at φ'(u_l) under FPA."""

    def __init__(self, net: Net, x: Tensor, target: Tensor, config: PCConfig) -> None:
        self.net, self.target, self.config = net, target, config
        self.depth, self.batch = net.depth, x.shape[0]
        self.hidden = self.depth - 1
        self.phis = [phi(a) for a in net.activations]
        self.dphis = [phi_grad(a) for a in net.activations]
        self.feedforward(x)
        # z_l ← z_l − (κ/γ_l)(γ_l ε_l − γ_{l+1} φ'(z_l) ⊙ (ε_{l+1} W_{l+1}))
        gammas, kappa = config.precisions, config.inference_lr
        self.coefficients = [kappa * gammas[l + 1] / gammas[l] for l in range(self.hidden)]

    def feedforward(self, x: Tensor) -> None:
        """Forward initialisation: z_l = u_l, so ε_l = 0 for l < L, ε_L = −∂ℓ/∂f_0."""
        weights, biases, hidden = self.net.weights, self.net.biases, self.hidden
        self.predictions: list[Tensor] = []
        self.acts: list[Tensor] = [x]
        for l in range(self.depth):
            out = torch.empty(self.batch, weights[l].shape[0], dtype=x.dtype, device=x.device)
            self.predictions.append(_affine(out, self.acts[l], weights[l], biases[l]))
            if l < hidden:
                act = self.phis[l](out)
                self.acts.append(act.clone() if act is out else act)  # own buffer: refreshed in place later
        self.latents = [u.clone() for u in self.predictions[:hidden]]
        self.f0 = self.predictions[-1].clone()
        output_error = _output_error(torch.empty_like(self.f0), self.f0, self.target, self.config.loss)
        self.errors = [torch.zeros_like(z) for z in self.latents] + [output_error]
        self.topdown = [torch.empty_like(z) for z in self.latents]
        fpa = self.config.fpa
        self.slopes = [self.dphis[l](self.predictions[l]) if fpa else torch.empty_like(self.latents[l])
                       for l in range(hidden)]

    def refresh_activity(self, l: int) -> None:
        """acts[l+1] = φ(z_{l+1}) (0-based hidden layer l)."""
        self.acts[l + 1].copy_(self.phis[l](self.latents[l]))

    def refresh_error(self, l: int) -> None:
        """ε of 0-based layer l from the current presynaptic activity."""
        if l > 0:
            _affine(self.predictions[l], self.acts[l], self.net.weights[l], self.net.biases[l])
        if l < self.hidden:
            torch.sub(self.latents[l], self.predictions[l], out=self.errors[l])
        else:
            _output_error(self.errors[l], self.predictions[l], self.target, self.config.loss)

    def refresh(self) -> None:
        for l in range(self.hidden):
            self.refresh_activity(l)
        for l in range(self.depth):
            self.refresh_error(l)

    def apply_update(self, l: int) -> Tensor:
        """Add the step to z_l, using topdown[l] = ε_{l+1} W_{l+1} (overwritten); return the step."""
        if not self.config.fpa:
            self.slopes[l].copy_(self.dphis[l](self.latents[l]))
        step = self.topdown[l].mul_(self.slopes[l]).mul_(self.coefficients[l])
        step.sub_(self.errors[l], alpha=self.config.inference_lr)
        self.latents[l].add_(step)
        return step

    def step(self) -> None:
        if self.config.schedule == "jacobi":
            self.jacobi_step()
        elif self.hidden > 0:
            self.sequential_step()

    def jacobi_step(self) -> None:
        errors, weights, fpa = self.errors, self.net.weights, self.config.fpa
        for l in range(self.hidden):
            torch.mm(errors[l + 1], weights[l + 1], out=self.topdown[l])
        for l in range(self.hidden):
            step = self.apply_update(l)
            if fpa:
                errors[l].add_(step)  # predictions are frozen: ε_l moves with z_l
        if not fpa:
            self.refresh()

    def sequential_step(self) -> None:
        errors, weights, fpa, hidden = self.errors, self.net.weights, self.config.fpa, self.hidden
        if not fpa:
            self.refresh_activity(hidden - 1)
            self.refresh_error(self.depth - 1)
        for l in reversed(range(hidden)):
            if not fpa:
                if l > 0:
                    self.refresh_activity(l - 1)
                self.refresh_error(l)
            torch.mm(errors[l + 1], weights[l + 1], out=self.topdown[l])
            # Layer l's prediction does not depend on z_l, so ε_l moves with z_l; the next layer
            # down reads this fresh ε_l in its top-down term.
            errors[l].add_(self.apply_update(l))

    def weight_grads(self) -> tuple[list[Tensor], list[Tensor | None]]:
        """−γ_l ε_lᵀ a_{l-1} / B at the final state."""
        weight_grads, bias_grads = [], []
        for l in range(self.depth):
            scale = -self.config.precisions[l] / self.batch
            weight_grads.append(torch.mm(self.errors[l].T, self.acts[l]).mul_(scale))
            bias_grads.append(None if self.net.biases[l] is None else self.errors[l].sum(0).mul_(scale))
        return weight_grads, bias_grads

    def energy(self) -> Tensor:
        gammas, errors = self.config.precisions, self.errors
        energy = self.f0.new_zeros(())
        for l in range(self.hidden):
            energy += 0.5 * gammas[l] * torch.sum(errors[l] * errors[l])
        f = self.f0 if self.config.fpa else self.predictions[-1]
        return energy + gammas[-1] * _loss_sum(f, self.target, self.config.loss)


@torch.no_grad()
def pc_grads(net: Net, x: Tensor, target: Tensor, config: PCConfig) -> PCResult:
    """PC relaxation and local gradients (the ``torch`` backend's ``pc_grads``)."""
    state = _Relaxation(net, x, target, config)
    return relax(state, config, _loss_sum(state.f0, target, config.loss) / state.batch)
