"""TP/DTP targets, local gradients and feedback gradients with explicit formulas; the ``torch``
backend (``TorchBackend``: these and ``torch_pc.pc_grads``; for conv nets ``torch_conv`` and
``torch_conv_tp``).

No autograd. DTP evaluates each feedback map on the stacked ``[ĥ_l; h_l]`` with one GEMM so both
share Q_l, then takes the difference. The math is ``pcfast.reference.tp``. ``feedforward`` is the
layer loop the Triton schedules share.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..activations import phi, phi_grad
from ..results import FeedbackResult, PCResult, TPResult
from ..types import Feedback, Net, TPConfig
from .backend import HostNoiseBackend
from .torch_pc import _affine, _loss_sum, _output_error, pc_grads

# One layer of the feedforward pass: (l, h_{l-1}, φ_l or None on the readout) -> (u_l, h_l).
Layer = Callable[[int, Tensor, "str | None"], "tuple[Tensor, Tensor]"]


def feedforward(weights: Sequence[Tensor], biases: Sequence[Tensor | None], activations: Sequence[str], x: Tensor,
                layer: Layer | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Pre-activations [u_1 … u_L] and activities [h_1 … h_{L-1}, f] (f = u_L: the readout is
    linear), one ``layer`` call per layer (by default torch's ``h Wᵀ + b`` and φ)."""

    def torch_layer(l: int, h: Tensor, act: str | None) -> tuple[Tensor, Tensor]:
        w, b = weights[l], biases[l]
        u = _affine(torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device), h, w, b)
        return u, (u if act is None else phi(act)(u))

    layer = layer or torch_layer
    depth = len(weights)
    us, hs, h = [], [], x
    for l in range(depth):
        u, h = layer(l, h, activations[l] if l < depth - 1 else None)
        us.append(u)
        hs.append(h)
    return us, hs


@torch.no_grad()
def tp_grads(net: Net, feedback: Feedback, x: Tensor, target: Tensor, config: TPConfig) -> TPResult:
    """TP/DTP targets and local gradients (the ``torch`` backend's ``tp_grads``)."""
    depth, batch = net.depth, x.shape[0]
    us, activities = feedforward(net.weights, net.biases, net.activations, x)
    f = activities[-1]
    targets: list[Tensor] = [None] * depth  # type: ignore[list-item]
    targets[-1] = _output_error(torch.empty_like(f), f, target, config.loss).mul_(config.beta).add_(f)
    for l in reversed(range(1, depth)):
        q, c, psi = feedback.weights[l - 1], feedback.biases[l - 1], phi(feedback.activations[l - 1])
        if config.difference:
            stacked = _affine(
                torch.empty(2 * batch, q.shape[0], dtype=x.dtype, device=x.device),
                torch.cat([targets[l], activities[l]]), q, c,
            )
            mapped = psi(stacked)
            targets[l - 1] = mapped[:batch].sub_(mapped[batch:]).add_(activities[l - 1])
        else:
            targets[l - 1] = psi(_affine(torch.empty_like(activities[l - 1]), targets[l], q, c))

    # Local gradients: δ_l = φ'(u_l) ⊙ (ĥ_l − h_l) (no φ' on the linear readout);
    # ∂/∂W_l = −δ_lᵀ h_{l-1} / B.
    inputs = [x] + activities[:-1]
    weight_grads, bias_grads = [], []
    local_loss = x.new_zeros(())
    for l in range(depth):
        delta = targets[l] - activities[l]
        local_loss += 0.5 * torch.sum(delta * delta) / batch
        if l < depth - 1:
            delta.mul_(phi_grad(net.activations[l])(us[l]))
        weight_grads.append(torch.mm(delta.T, inputs[l]).mul_(-1.0 / batch))
        bias_grads.append(None if net.biases[l] is None else delta.sum(0).mul_(-1.0 / batch))
    return TPResult(
        targets=targets,
        activities=activities,
        weight_grads=weight_grads,
        bias_grads=bias_grads,
        loss=_loss_sum(f, target, config.loss) / batch,
        local_loss=local_loss,
    )


@torch.no_grad()
def reconstruction_grads(net: Net, feedback: Feedback, x: Tensor,
                         noise: Sequence[Tensor | None] | None = None) -> FeedbackResult:
    """Gradients of ``½‖g_l(f_l(h_{l-1}+ξ_l)) − (h_{l-1}+ξ_l)‖²`` (batch mean) for l = 2 … L."""
    depth, batch = net.depth, x.shape[0]
    _, activities = feedforward(net.weights, net.biases, net.activations, x)
    weight_grads, bias_grads = [], []
    total = x.new_zeros(())
    for l in range(1, depth):
        xi = None if noise is None else noise[l - 1]
        h_in = activities[l - 1] if xi is None else activities[l - 1] + xi
        w = net.weights[l]
        h_out = _affine(torch.empty(batch, w.shape[0], dtype=x.dtype, device=x.device), h_in, w, net.biases[l])
        if l < depth - 1:
            h_out = phi(net.activations[l])(h_out)
        q, c, psi = feedback.weights[l - 1], feedback.biases[l - 1], feedback.activations[l - 1]
        pre = _affine(torch.empty_like(h_in), h_out, q, c)
        slope = phi_grad(psi)(pre)
        residual = phi(psi)(pre) - h_in
        total += 0.5 * torch.sum(residual * residual) / batch
        delta = residual.mul_(slope)
        weight_grads.append(torch.mm(delta.T, h_out).mul_(1.0 / batch))
        bias_grads.append(None if c is None else delta.sum(0).mul_(1.0 / batch))
    return FeedbackResult(weight_grads, bias_grads, total)


class TorchBackend(HostNoiseBackend):
    """Explicit formulas, no autograd, preallocated buffers: any device, any floating dtype, MLPs and
    conv nets."""

    name = "torch"
    capabilities = HostNoiseBackend.capabilities | {"conv"}

    @staticmethod
    def pc_grads(net: Net, x: Tensor, target: Tensor, config) -> PCResult:
        if net.is_conv:
            from .torch_conv import conv_pc_grads

            return conv_pc_grads(net.layers(), x, target, config)
        return pc_grads(net, x, target, config)

    @staticmethod
    def tp_grads(net: Net, feedback: Feedback, x: Tensor, target: Tensor, config: TPConfig) -> TPResult:
        if net.is_conv:
            from .torch_conv_tp import conv_tp_grads

            return conv_tp_grads(net.layers(), feedback, x, target, config)
        return tp_grads(net, feedback, x, target, config)

    @staticmethod
    def reconstruction_grads(net: Net, feedback: Feedback, x: Tensor,
                             noise: Sequence[Tensor | None] | None) -> FeedbackResult:
        if net.is_conv:
            from .torch_conv_tp import conv_feedback_grads

            return conv_feedback_grads(net.layers(), feedback, x, noise)
        return reconstruction_grads(net, feedback, x, noise)
