"""Target propagation (TP, DTP) and the feedback reconstruction gradients on convolutional networks
with explicit formulas: the ``torch`` implementation of ``pcfast.reference.conv``'s
``conv_tp_train_step`` and ``conv_feedback_grads``.

No autograd. The layers are ``pcfast.reference.conv``'s ``ConvLayer`` / ``LinearLayer`` and the math
is that module's (its docstring is the specification), written out:

- forward: ``u_l = m_l(h_{l-1})`` (``conv2d``, or ``flatten(h) Wᵀ + b``), ``h_l = π_l(φ_l(u_l))``, with
  the arg-max indices of every max pooling kept; ``f = u_L``;
- feedback map ``g_l(v) = ψ_l(p_l(v))``, ``p_l(v) = conv_transpose(υ_l(v), Q_l) + c_l`` (layer l's
  stride, padding and dilation, the output padding that restores h_{l-1}'s size) or ``v Q_lᵀ + c_l``
  reshaped to h_{l-1}'s shape. The unpooling υ_l is one gather per axis: output row i reads pooled
  row ``min(⌊i / s⌋, n − 1)`` (the s × s blocks, cropped or edge-replicated to u_l's size);
- targets ``ĥ_L = f − β ∂ℓ/∂f``; TP ``ĥ_{l-1} = g_l(ĥ_l)``; DTP
  ``ĥ_{l-1} = h_{l-1} + g_l(ĥ_l) − g_l(h_l)``, both feedback maps in one call on the stacked batch
  ``[ĥ_l; h_l]``;
- local gradients of ``½‖ĥ_l − h_l‖² / B``: ``δ_l = φ_l'(u_l) ⊙ π_lᵀ(ĥ_l − h_l)`` (no φ' or pooling
  on the readout), π's adjoint as in ``torch_conv`` (max: to each window's arg-max; avg: the uniform
  kernel 1/k², transposed), then ``∂/∂W_l = −(1/B) Σ_b δ_l ⋆ h_{l-1}`` (``torch.nn.grad.conv2d_weight``)
  or ``−δ_lᵀ flatten(h_{l-1}) / B``, ``∂/∂b_l = −(1/B) Σ δ_l`` (over the batch and the image);
- reconstruction gradients of ``½‖ψ_l(p_l(v)) − h̃‖² / B`` with ``h̃ = h_{l-1} + ξ``, ``v = F_l(h̃)``:
  ``r = (ψ_l(p_l(v)) − h̃) ⊙ ψ_l'(p_l(v))``; a transposed convolution is the input gradient of the
  convolution with the same kernel, so ``⟨r, conv_transpose(υ(v), Q)⟩ = ⟨conv2d(r, Q), υ(v)⟩`` and
  ``∂/∂Q_l = (1/B) Σ_b r ⋆ υ_l(v)`` (``conv2d_weight`` with r as the input, υ(v) as the output
  gradient), or ``rᵀ v / B`` for a linear layer; ``∂/∂c_l = (1/B) Σ r``.

Runs on any device and floating dtype, in the memory format of ``x`` (a channels-last input keeps
the conv activities in it), with the same numbers.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as nnf
from torch import Tensor

from ..activations import phi, phi_grad
from ..reference.conv import ConvLayer, Layer, _check_feedback, check_conv_net
from ..results import FeedbackResult, TPResult
from ..types import Feedback, TPConfig
from .torch_conv import _route, _transpose_padding
from .torch_pc import _affine, _loss_sum, _output_error


class _Forward:
    """The feedforward pass of a conv net and what its adjoints need.

    inputs[l]: layer l's presynaptic activity (x, h_1 … h_{L-1}, unflattened); us[l] = u_l;
    activities[l]: h_1 … h_{L-1}, f; routes[l]: the arg-max indices of layer l's max pooling, or None."""

    def __init__(self, layers: Sequence[Layer], x: Tensor) -> None:
        self.layers, self.batch = list(layers), x.shape[0]
        self.inputs, self.us, self.activities, self.routes = [x], [], [], []
        for l, layer in enumerate(layers):
            u = self.layer_map(layer, self.inputs[l])
            h, route = (u, None) if l == len(layers) - 1 else self.layer_output(layer, u)
            self.us.append(u)
            self.activities.append(h)
            self.routes.append(route)
            self.inputs.append(h)
        self.inputs.pop()

    def layer_map(self, layer: Layer, a: Tensor) -> Tensor:
        """``m_l(a)``."""
        if isinstance(layer, ConvLayer):
            return nnf.conv2d(a, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation)
        out = a.new_empty(self.batch, layer.weight.shape[0])
        return _affine(out, a.reshape(self.batch, -1), layer.weight, layer.bias)

    @staticmethod
    def layer_output(layer: Layer, u: Tensor) -> tuple[Tensor, Tensor | None]:
        """``π_l(φ_l(u))`` and the arg-max indices of a max pooling."""
        h = phi(layer.activation)(u)
        pool = getattr(layer, "pool", None)
        if pool is None:
            return h, None
        kind, kernel, stride = pool
        if kind == "max":
            return nnf.max_pool2d(h, kernel, stride, return_indices=True)
        return nnf.avg_pool2d(h, kernel, stride), None

    def input_delta(self, l: int, grad: Tensor) -> Tensor:
        """``φ_l'(u_l) ⊙ π_lᵀ(grad)``: ``grad`` (h_l's shape) back to u_l (``grad`` itself on the readout)."""
        layer, u = self.layers[l], self.us[l]
        if l == len(self.layers) - 1:
            return grad
        pool = getattr(layer, "pool", None)
        if pool is not None:
            grad = _pool_adjoint(pool, grad, self.routes[l], u)
        if layer.activation == "identity":
            return grad
        return grad.mul_(phi_grad(layer.activation)(u))


def _pool_adjoint(pool: tuple[str, int, int], grad: Tensor, route: Tensor | None, u: Tensor) -> Tensor:
    """π's adjoint, from the pooled shape to u's: max adds each value at its window's arg-max (``route``),
    avg spreads it evenly over its window; overlapping windows add up."""
    kind, kernel, stride = pool
    if kind == "max":
        return _route(torch.zeros_like(u), grad, route)
    batch, channels = grad.shape[:2]
    padding = _transpose_padding(u.shape[2:], grad.shape[2:], (kernel, kernel), stride, 0, 1)
    spread = nnf.conv_transpose2d(grad.reshape(batch * channels, 1, *grad.shape[2:]),
                                  grad.new_full((1, 1, kernel, kernel), 1.0 / (kernel * kernel)), None, stride, 0,
                                  padding)
    return spread.view(u.shape)


def _memory_format(t: Tensor) -> torch.memory_format:
    """``torch.channels_last`` for an image batch stored channels-last, else the contiguous format."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _unpool(v: Tensor, stride: int, size: Sequence[int]) -> Tensor:
    """υ: ``out[..., i, j] = v[..., min(⌊i/s⌋, n_h − 1), min(⌊j/s⌋, n_w − 1)]``, s = ``stride``: each
    value repeated over its s × s block, cropped or edge-replicated to ``size``."""
    memory_format, out = _memory_format(v), v
    for axis, (n, length) in enumerate(zip(v.shape[2:], size), start=2):
        index = torch.arange(length, device=v.device).div_(stride, rounding_mode="floor").clamp_(max=n - 1)
        out = out.index_select(axis, index)
    return out.contiguous(memory_format=memory_format)


def _feedback_pre(layer: Layer, v: Tensor, weight: Tensor, bias: Tensor | None, u_shape: Sequence[int],
                  h: Tensor) -> tuple[Tensor, Tensor]:
    """``p_l(v)`` (with h_{l-1}'s per-sample shape and memory format, ``h`` being h_{l-1}) and the input
    of its linear part: υ_l(v) for a conv layer (u_l's per-sample shape ``u_shape``), v for a linear one."""
    if not isinstance(layer, ConvLayer):
        pre = _affine(v.new_empty(v.shape[0], weight.shape[0]), v, weight, bias)
        return pre.view(v.shape[0], *h.shape[1:]).contiguous(memory_format=_memory_format(h)), v
    if layer.pool is not None:
        v = _unpool(v, layer.pool[2], u_shape[1:])
    padding = _transpose_padding(h.shape[2:], u_shape[1:], layer.weight.shape[2:], layer.stride, layer.padding,
                                 layer.dilation)
    pre = nnf.conv_transpose2d(v, weight, bias, layer.stride, layer.padding, padding, 1, layer.dilation)
    return pre.contiguous(memory_format=_memory_format(h)), v  # a copy only if v's format was ambiguous (1×1)


def _targets(layers: Sequence[Layer], feedback: Feedback, state: _Forward, shapes: Sequence[tuple[int, ...]],
             target: Tensor, config: TPConfig) -> list[Tensor]:
    """``[ĥ_1 … ĥ_L]``: the output target, then TP's or DTP's feedback steps down the net."""
    activities, batch = state.activities, state.batch
    f = activities[-1]
    targets: list[Tensor] = [None] * len(layers)  # type: ignore[list-item]
    targets[-1] = _output_error(torch.empty_like(f), f, target, config.loss).mul_(config.beta).add_(f)
    for l in reversed(range(1, len(layers))):  # layer l maps back to layer l-1 (0-based)
        q, c, psi = feedback.weights[l - 1], feedback.biases[l - 1], phi(feedback.activations[l - 1])
        h = activities[l - 1]
        if config.difference:
            pre, _ = _feedback_pre(layers[l], torch.cat([targets[l], activities[l]]), q, c, shapes[l], h)
            mapped = psi(pre)
            targets[l - 1] = mapped[:batch].sub_(mapped[batch:]).add_(h)
        else:
            targets[l - 1] = psi(_feedback_pre(layers[l], targets[l], q, c, shapes[l], h)[0])
    return targets


def _local_param_grads(layer: Layer, a: Tensor, delta: Tensor, scale: float) -> tuple[Tensor, Tensor | None]:
    """W_l's and b_l's gradients of ``scale · ⟨delta, m_l(a)⟩``: ``scale · Σ_b delta ⋆ a`` (conv) or
    ``scale · deltaᵀ flatten(a)``, and ``scale · Σ delta`` over the batch and the image (if b_l exists)."""
    if isinstance(layer, ConvLayer):
        grad = torch.nn.grad.conv2d_weight(a, layer.weight.shape, delta, layer.stride, layer.padding, layer.dilation)
        dims = (0, 2, 3)
    else:
        batch = delta.shape[0]
        grad = torch.mm(delta.reshape(batch, -1).T, a.reshape(batch, -1))
        dims = (0,)
    return grad.mul_(scale), (None if layer.bias is None else delta.sum(dims).mul_(scale))


def _feedback_param_grads(layer: Layer, weight_shape: Sequence[int], residual: Tensor, v: Tensor, scale: float,
                          bias: bool) -> tuple[Tensor, Tensor | None]:
    """Q_l's and c_l's gradients of ``scale · ⟨residual, p_l(v)⟩``, ``v`` the input of p_l's linear part.
    A transposed convolution is the input gradient of the convolution with the same kernel, so
    ``⟨r, conv_transpose(v, Q)⟩ = ⟨conv2d(r, Q), v⟩``: Q's gradient is conv2d's weight gradient with r
    as the input and v as the output gradient (``rᵀ v`` for a linear layer); c's is ``Σ r``."""
    if isinstance(layer, ConvLayer):
        grad = torch.nn.grad.conv2d_weight(residual, weight_shape, v, layer.stride, layer.padding, layer.dilation)
        bias_grad = residual.sum((0, 2, 3)) if bias else None
    else:
        flat = residual.reshape(residual.shape[0], -1)
        grad = torch.mm(flat.T, v)
        bias_grad = flat.sum(0) if bias else None
    return grad.mul_(scale), (None if bias_grad is None else bias_grad.mul_(scale))


@torch.no_grad()
def conv_tp_grads(layers: Sequence[Layer], feedback: Feedback, x: Tensor, target: Tensor,
                  config: TPConfig) -> TPResult:
    """TP/DTP targets and local gradients of a conv net: ``pcfast.reference.conv.conv_tp_train_step``
    with ``config``'s settings, written out. ``feedback``: Q_l, c_l, ψ_l of layers 2 … L;
    ``x`` (B, C, H, W); ``target`` (B, C_out) for MSE, int64 labels (B,) for CE."""
    shapes = check_conv_net(layers, x)
    _check_feedback(layers, feedback.weights, feedback.biases, feedback.activations)
    state = _Forward(layers, x)
    targets = _targets(layers, feedback, state, shapes, target, config)
    batch = state.batch
    weight_grads, bias_grads = [], []
    local_loss = x.new_zeros(())
    for l, layer in enumerate(layers):
        gap = targets[l] - state.activities[l]
        local_loss += 0.5 * torch.sum(gap * gap) / batch
        delta = state.input_delta(l, gap)
        w, b = _local_param_grads(layer, state.inputs[l], delta, -1.0 / batch)
        weight_grads.append(w)
        bias_grads.append(b)
    return TPResult(
        targets=targets,
        activities=state.activities,
        weight_grads=weight_grads,
        bias_grads=bias_grads,
        loss=_loss_sum(state.activities[-1], target, config.loss) / batch,
        local_loss=local_loss,
    )


@torch.no_grad()
def conv_feedback_grads(layers: Sequence[Layer], feedback: Feedback, x: Tensor,
                        noise: Sequence[Tensor | None] | None = None) -> FeedbackResult:
    """Gradients of the noisy reconstruction losses ``½‖g_l(F_l(h_{l-1} + ξ)) − (h_{l-1} + ξ)‖²``
    (batch mean), l = 2 … L: ``pcfast.reference.conv.conv_feedback_grads`` written out. ``noise[l-2]``
    is ξ for layer l (h_{l-1}'s shape), or None; ``noise`` None: no noise anywhere."""
    shapes = check_conv_net(layers, x)
    _check_feedback(layers, feedback.weights, feedback.biases, feedback.activations)
    if noise is not None and len(noise) != len(layers) - 1:
        raise ValueError(f"noise: expected {len(layers) - 1} entries (layers 2 … L) or None, got {len(noise)}")
    state = _Forward(layers, x)
    batch = x.shape[0]
    weight_grads, bias_grads = [], []
    total = x.new_zeros(())
    for l in range(1, len(layers)):
        layer, xi = layers[l], None if noise is None else noise[l - 1]
        h_in = state.activities[l - 1] if xi is None else state.activities[l - 1] + xi
        v = state.layer_map(layer, h_in)
        if l < len(layers) - 1:
            v = state.layer_output(layer, v)[0]
        q, c, psi = feedback.weights[l - 1], feedback.biases[l - 1], feedback.activations[l - 1]
        pre, v = _feedback_pre(layer, v, q, c, shapes[l], h_in)
        residual = phi(psi)(pre) - h_in
        total += 0.5 * torch.sum(residual * residual) / batch
        if psi != "identity":
            residual.mul_(phi_grad(psi)(pre))
        w, b = _feedback_param_grads(layer, q.shape, residual, v, 1.0 / batch, c is not None)
        weight_grads.append(w)
        bias_grads.append(b)
    return FeedbackResult(weight_grads, bias_grads, total)
