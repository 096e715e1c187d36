"""The Triton backend's TP/DTP train step and feedback gradients: which kernel runs when (DESIGN §4, §6).

TP/DTP step (L layers): the feedforward pass, one ``linear`` launch per layer (u and h = φ(u) in one
pass) with the output target ``f + β ε_L`` in the readout's epilogue; per layer top-down one
``tp_targets`` launch (DTP: ĥ and h share each Q tile); then one local-gradient launch per layer,
equal-width hidden layers 2 … H sharing one (their u, h and ĥ live in (H, B, M) buffers).

Feedback gradients, per layer l = 2 … L: one launch for h_out = f_l(h_in), one for
pre = h_out Q_lᵀ + c_l, and one gradient launch whose δ = (h_in − ψ(pre)) ⊙ ψ'(pre) is formed on load
and which also sums the squared residuals for the loss. ξ is given as tensors, or drawn from a seed
inside the first and last launch (``tp_targets.gaussian_noise`` draws the same numbers), or zero.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..results import FeedbackResult, TPResult
from ..types import Feedback, Net, TPConfig
from . import linear_epilogue, local_grad, tp_targets
from ._triton_common import Noise, as_contiguous
from .torch_pc import _loss_sum
from .torch_tp import feedforward

def _forward(net: Net, x: Tensor, *, objective: linear_epilogue.OutputLoss | None = None, stacked: bool = False,
             ce_fused_max_classes: int = linear_epilogue.CE_FUSED_MAX_CLASSES):
    """Pre-activations [u_1 … u_L] and activities [h_1 … h_{L-1}, f] with one launch per layer;
    with ``objective`` the last launch also returns the output target ``f + β ε_L``; ``stacked``: the
    hidden layers' u and h are views of (H, B, M) buffers (equal widths), returned as the fourth value."""
    weights, biases = net.weights, net.biases
    depth, batch = len(weights), x.shape[0]
    output_target = []
    stacks = None
    if stacked:
        stacks = tuple(torch.empty(depth - 1, batch, weights[0].shape[0], dtype=x.dtype, device=x.device)
                       for _ in range(2))

    def layer(l: int, h: Tensor, act: str | None) -> tuple[Tensor, Tensor]:
        w, b = weights[l], biases[l]
        if act is not None:
            u, out = (stacks[0][l], stacks[1][l]) if stacked else (None, None)
            u = torch.empty(batch, w.shape[0], dtype=x.dtype, device=x.device) if u is None else u
            return u, linear_epilogue.linear(h, w, b, act_out=act, pred=u, out=out)
        u = torch.empty(batch, w.shape[0], dtype=x.dtype, device=x.device)
        if objective is None:
            return u, linear_epilogue.linear(h, w, b, out=u)
        output_target.append(linear_epilogue.output_error(h, w, b, objective, pred=u,
                                                          ce_fused_max_classes=ce_fused_max_classes))
        return u, u

    us, hs = feedforward(weights, biases, net.activations, x, layer)
    return us, hs, output_target[0] if output_target else None, stacks


def tp_step(net: Net, feedback: Feedback, x: Tensor, target: Tensor, config: TPConfig, *, stacked: bool,
            ce_fused_max_classes: int) -> TPResult:
    """One TP/DTP train step with the kernels (parameters in the kernels' layout)."""
    weights, biases, activations = net.weights, net.biases, net.activations
    depth, batch = len(weights), x.shape[0]
    hidden = depth - 1
    # Local gradients of equal-width hidden layers 2 … H in one launch: their u, h and ĥ are stacked.
    stacked = (stacked and hidden >= 2 and len({w.shape[0] for w in weights[:hidden]}) == 1
               and len(set(activations[:hidden])) == 1 and len({b is None for b in biases[1:hidden]}) == 1)
    objective = linear_epilogue.OutputLoss(target, config.loss, scale=config.beta, add_pred=True)  # f + β ε_L
    us, activities, output_target, stacks = _forward(net, x, objective=objective, stacked=stacked,
                                                     ce_fused_max_classes=ce_fused_max_classes)
    targets: list[Tensor] = [None] * depth  # type: ignore[list-item]
    targets[-1] = output_target
    stacked_targets = torch.empty(hidden, batch, weights[0].shape[0], dtype=x.dtype, device=x.device) if stacked else None
    for l in reversed(range(1, depth)):
        targets[l - 1] = tp_targets.tp_targets(
            targets[l], activities[l], as_contiguous(feedback.weights[l - 1]), feedback.biases[l - 1],
            activities[l - 1], act=feedback.activations[l - 1], difference=config.difference,
            out=None if stacked_targets is None else stacked_targets[l - 1],
        )

    # δ_l = φ'(u_l) ⊙ (ĥ_l − φ(u_l)) formed on load (no φ' on the readout); ∂/∂W_l = −δ_lᵀ h_{l-1} / B.
    inputs = [x] + activities[:-1]
    weight_grads, bias_grads = [], []
    local_loss = x.new_zeros(())
    for l in range(depth):
        local_loss += 0.5 * torch.sum((targets[l] - activities[l]) ** 2) / batch
        if stacked and 0 < l < hidden:
            continue
        gw, gb = local_grad.tp_weight_grad(
            targets[l], us[l], inputs[l], scale=-1.0 / batch, act=activations[l] if l < depth - 1 else "identity",
            has_bias=biases[l] is not None,
        )
        weight_grads.append(gw)
        bias_grads.append(gb)
    if stacked:
        stacked_u, stacked_h = stacks
        gw, gb = local_grad.stacked_tp_weight_grad(
            stacked_targets[1:], stacked_u[1:], stacked_h[:-1], scale=-1.0 / batch, act=activations[0],
            has_bias=biases[1] is not None,
        )
        weight_grads[1:1] = list(gw)
        bias_grads[1:1] = list(gb) if gb is not None else [None] * (hidden - 1)
    return TPResult(
        targets=targets, activities=activities, weight_grads=weight_grads, bias_grads=bias_grads,
        loss=_loss_sum(activities[-1], target, config.loss) / batch, local_loss=local_loss,
    )


def feedback_step(net: Net, feedback: Feedback, x: Tensor, noise: Sequence[Tensor | None] | None,
                  noise_seed: int | None, noise_std: float) -> FeedbackResult:
    """Gradients of ``½‖g_l(f_l(h_{l-1}+ξ)) − (h_{l-1}+ξ)‖²`` (batch mean) for l = 2 … L."""
    weights, biases, activations = net.weights, net.biases, net.activations
    depth, batch = len(weights), x.shape[0]
    _, activities, _, _ = _forward(net, x)
    offsets = tp_targets.noise_offsets(batch, [w.shape[0] for w in weights[:-1]])
    weight_grads, bias_grads = [], []
    total = x.new_zeros(())
    for l in range(1, depth):
        xi = None if noise is None else noise[l - 1]
        h_in = activities[l - 1] if xi is None else (activities[l - 1] + xi).contiguous()
        drawn = None if noise_seed is None else Noise(int(noise_seed), float(noise_std), offsets[l - 1])
        h_out = linear_epilogue.linear(h_in, weights[l], biases[l],
                                       act_out=activations[l] if l < depth - 1 else "identity", noise=drawn)
        q, c, psi = as_contiguous(feedback.weights[l - 1]), feedback.biases[l - 1], feedback.activations[l - 1]
        pre = linear_epilogue.linear(h_out, q, c, out=torch.empty_like(h_in))
        squares = torch.empty(h_in.shape[1], dtype=x.dtype, device=x.device)
        gw, gb = local_grad.tp_weight_grad(h_in, pre, h_out, scale=-1.0 / batch, act=psi, has_bias=c is not None,
                                           noise=drawn, squares=squares)
        weight_grads.append(gw)
        bias_grads.append(gb)
        total += 0.5 * torch.sum(squares) / batch
    return FeedbackResult(weight_grads, bias_grads, total)
