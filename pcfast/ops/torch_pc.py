"""PC relaxation and weight gradients with explicit formulas: the ``torch`` backend.

No autograd. Every buffer is allocated once per call and reused across inference steps; latents,
errors and activities are updated in place. Per step and layer there is one GEMM for the prediction
(the first layer's is constant and computed once) and one for the top-down term; with FPA only the
top-down GEMMs remain. Runs on any device and dtype. The math is ``pcfast.reference.pc``.

``pc_grads`` takes a ``Net`` and a ``PCConfig`` (``TorchBackend.pc_grads``).
"""
from __future__ import annotations

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


@torch.no_grad()
def pc_grads(net: Net, x: Tensor, target: Tensor, config: PCConfig) -> PCResult:
    """PC relaxation and local gradients (the ``torch`` backend's ``pc_grads``)."""
    weights, biases, activations = net.weights, net.biases, net.activations
    schedule, fpa, loss = config.schedule, config.fpa, config.loss
    depth, batch = len(weights), x.shape[0]
    hidden = depth - 1
    gammas, kappa = config.precisions, config.inference_lr
    phis = [phi(a) for a in activations]
    dphis = [phi_grad(a) for a in activations]

    # Feedforward pass. Forward initialisation: z_l = u_l, so ε_l = 0 for l < L, ε_L = −∂ℓ/∂f_0.
    predictions: list[Tensor] = []  # prediction of each layer; layer 1's is constant (φ(z_0) = x)
    acts: list[Tensor] = [x]  # presynaptic activity of each layer: x, φ(z_1), …, φ(z_{L-1})
    for l in range(depth):
        out = torch.empty(batch, weights[l].shape[0], dtype=x.dtype, device=x.device)
        predictions.append(_affine(out, acts[l], weights[l], biases[l]))
        if l < hidden:
            act = phis[l](out)
            acts.append(act.clone() if act is out else act)  # own buffer: refreshed in place later
    latents = [u.clone() for u in predictions[:hidden]]
    f0 = predictions[-1].clone()
    loss_value = _loss_sum(f0, target, loss) / batch
    errors = [torch.zeros_like(z) for z in latents] + [_output_error(torch.empty_like(f0), f0, target, loss)]
    topdown = [torch.empty_like(z) for z in latents]
    # φ'(z_l): frozen at φ'(u_l) under FPA, refreshed before every update otherwise.
    slopes = [dphis[l](predictions[l]) if fpa else torch.empty_like(latents[l]) for l in range(hidden)]
    # z_l ← z_l − (κ/γ_l)(γ_l ε_l − γ_{l+1} φ'(z_l) ⊙ (ε_{l+1} W_{l+1}))
    coefficients = [kappa * gammas[l + 1] / gammas[l] for l in range(hidden)]

    def refresh_activity(l: int) -> None:
        """acts[l+1] = φ(z_{l+1}) (0-based hidden layer l)."""
        acts[l + 1].copy_(phis[l](latents[l]))

    def refresh_error(l: int) -> None:
        """ε of 0-based layer l from the current presynaptic activity."""
        if l > 0:
            _affine(predictions[l], acts[l], weights[l], biases[l])
        if l < hidden:
            torch.sub(latents[l], predictions[l], out=errors[l])
        else:
            _output_error(errors[l], predictions[l], target, loss)

    def refresh_all() -> None:
        for l in range(hidden):
            refresh_activity(l)
        for l in range(depth):
            refresh_error(l)

    def apply_update(l: int) -> Tensor:
        """Add the step to z_l, using topdown[l] = ε_{l+1} W_{l+1} (overwritten); return the step."""
        if not fpa:
            slopes[l].copy_(dphis[l](latents[l]))
        step = topdown[l].mul_(slopes[l]).mul_(coefficients[l]).sub_(errors[l], alpha=kappa)
        latents[l].add_(step)
        return step

    trajectory = [[z.clone() for z in latents]] if config.return_trajectory else None
    for _ in range(config.inference_steps):
        if schedule == "jacobi":
            for l in range(hidden):
                torch.mm(errors[l + 1], weights[l + 1], out=topdown[l])
            for l in range(hidden):
                step = apply_update(l)
                if fpa:
                    errors[l].add_(step)  # predictions are frozen: ε_l moves with z_l
            if not fpa:
                refresh_all()
        elif hidden > 0:
            if not fpa:
                refresh_activity(hidden - 1)
                refresh_error(depth - 1)
            for l in reversed(range(hidden)):
                if not fpa:
                    if l > 0:
                        refresh_activity(l - 1)
                    refresh_error(l)
                torch.mm(errors[l + 1], weights[l + 1], out=topdown[l])
                # Layer l's prediction does not depend on z_l, so ε_l moves with z_l; the next
                # layer down reads this fresh ε_l in its top-down term.
                errors[l].add_(apply_update(l))
        if trajectory is not None:
            trajectory.append([z.clone() for z in latents])
    if not fpa and schedule == "sequential" and config.inference_steps > 0:
        refresh_all()  # a sweep leaves the activities and the errors above each layer stale

    # Weight gradients at the final state: −γ_l ε_lᵀ a_{l-1} / B.
    weight_grads, bias_grads = [], []
    for l in range(depth):
        scale = -gammas[l] / batch
        weight_grads.append(torch.mm(errors[l].T, acts[l]).mul_(scale))
        bias_grads.append(None if biases[l] is None else errors[l].sum(0).mul_(scale))

    energy = x.new_zeros(())
    for l in range(hidden):
        energy += 0.5 * gammas[l] * torch.sum(errors[l] * errors[l])
    energy += gammas[-1] * _loss_sum(f0 if fpa else predictions[-1], target, loss)
    return PCResult(
        latents=latents,
        errors=errors,
        weight_grads=weight_grads,
        bias_grads=bias_grads,
        energy=energy,
        loss=loss_value,
        trajectory=trajectory,
    )
