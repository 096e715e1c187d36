"""The ``Backend`` protocol every compute backend satisfies, and what the backends share.

A backend computes gradients, never updates: PC's relaxation and local gradients (``pc_grads``),
TP/DTP's targets and local gradients (``tp_grads``), and the feedback maps' reconstruction
gradients (``feedback_grads``), from value types that checked themselves when they were made
(``pcfast.types``), so a backend checks nothing again beyond what guards its raw-pointer kernels.

Also here: ``ReferenceBackend`` (``pcfast.reference``, autograd), the dtype table of every backend,
and ``draw_noise`` (the seeded noise of backends without in-kernel noise).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..results import FeedbackResult, PCResult, TPResult
from ..types import Feedback, Net, PCConfig, TPConfig

# Capabilities: the three ops, "seeded_noise" for backends that draw DTP's feedback noise from a
# seed inside their kernels (the others draw it with draw_noise, before the computation), and "conv"
# for backends that run conv nets (a ``Net`` with conv layers) besides MLPs.
CAPABILITIES = frozenset({"pc", "tp", "feedback"})


@runtime_checkable
class Backend(Protocol):
    """A compute backend (``pcfast.ops.get_backend`` picks one).

    Example::

        backend = pcfast.ops.get_backend("auto", "pc", x.device, x.dtype)
        result = backend.pc_grads(Net(weights, biases, activations), x, target,
                                  PCConfig.of(len(weights), precisions, inference_steps=20))
    """

    name: str
    capabilities: frozenset[str]

    def supports_dtype(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether this backend computes in ``dtype`` on ``device``."""
        ...

    def pc_grads(self, net: Net, x: Tensor, target: Tensor, config: PCConfig) -> PCResult:
        """PC relaxation from the feedforward pass and the local gradients (DESIGN §3)."""
        ...

    def tp_grads(self, net: Net, feedback: Feedback, x: Tensor, target: Tensor, config: TPConfig) -> TPResult:
        """TP/DTP targets and local gradients (DESIGN §4)."""
        ...

    def feedback_grads(self, net: Net, feedback: Feedback, x: Tensor, *, noise: Sequence[Tensor | None] | None = None,
                       noise_seed: int | None = None, noise_std: float = 0.0) -> FeedbackResult:
        """Gradients of the feedback reconstruction losses, on inputs perturbed by ``noise`` (tensors)
        or by noise of standard deviation ``noise_std`` drawn from ``noise_seed``."""
        ...


def dtype_supported(name: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether backend ``name`` computes in ``dtype`` on ``device``: ``cpp`` in float32 and float64;
    ``triton`` also in float16 and bfloat16 on CUDA (the interpreter: float32 and float64 only);
    ``reference`` and ``torch`` in every floating dtype torch has."""
    if name == "cpp":
        return dtype in (torch.float32, torch.float64)
    if name == "triton":
        wide = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        return dtype in (wide if device.type == "cuda" else (torch.float32, torch.float64))
    return dtype.is_floating_point


def draw_noise(seed: int, std: float, x: Tensor, shapes: Sequence[int | Sequence[int]]) -> list[Tensor]:
    """ξ_l ~ N(0, std²) of shape (B, width_l) — or (B, *shape_l) for a conv net's images — for each
    feedback layer, drawn in layer order from a ``torch.Generator`` on x's device seeded with ``seed``."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return [torch.randn(x.shape[0], *((shape,) if isinstance(shape, int) else shape), generator=generator,
                        dtype=x.dtype, device=x.device).mul_(std)
            for shape in shapes]


def activity_shapes(net: Net, x: Tensor) -> list[tuple[int, ...]]:
    """Per-sample shapes of the activities h_1 … h_{L-1} that feedback layers 2 … L reconstruct:
    the width of a linear layer; a conv layer's (C, H, W) after its pooling."""
    if not net.is_conv:
        return [(w.shape[0],) for w in net.weights[:-1]]
    from ..reference.conv import check_conv_net

    shapes = []
    for shape, g in zip(check_conv_net(net.layers(), x)[:-1], net.geometry):
        if g is not None and g.pool is not None:
            _, kernel, stride = g.pool
            shape = (shape[0], *((size - kernel) // stride + 1 for size in shape[1:]))
        shapes.append(tuple(shape))
    return shapes


class HostNoiseBackend:
    """Shared by the backends that take DTP's feedback noise as tensors: ``feedback_grads`` draws it
    from the seed first (``draw_noise``), then calls ``reconstruction_grads``."""

    name: str = ""
    capabilities = CAPABILITIES

    def supports_dtype(self, dtype: torch.dtype, device: torch.device) -> bool:
        return dtype_supported(self.name, dtype, device)

    def feedback_grads(self, net: Net, feedback: Feedback, x: Tensor, *, noise: Sequence[Tensor | None] | None = None,
                       noise_seed: int | None = None, noise_std: float = 0.0) -> FeedbackResult:
        if noise_seed is not None:
            noise = draw_noise(noise_seed, noise_std, x, activity_shapes(net, x))
        return self.reconstruction_grads(net, feedback, x, noise)

    def reconstruction_grads(self, net: Net, feedback: Feedback, x: Tensor,
                             noise: Sequence[Tensor | None] | None) -> FeedbackResult:
        raise NotImplementedError


class ReferenceBackend(HostNoiseBackend):
    """``pcfast.reference``: autograd on the energy and the local losses — the specification (of
    conv nets too: ``pcfast.reference.conv``)."""

    name = "reference"
    capabilities = CAPABILITIES | {"conv"}

    def pc_grads(self, net: Net, x: Tensor, target: Tensor, config: PCConfig) -> PCResult:
        from .. import reference

        settings = dict(precisions=list(config.precisions), inference_steps=config.inference_steps,
                        inference_lr=config.inference_lr, schedule=config.schedule, fpa=config.fpa, loss=config.loss,
                        return_trajectory=config.return_trajectory, inference_tol=config.inference_tol,
                        return_trace=config.return_trace, check_divergence=config.check_divergence)
        if net.is_conv:
            return reference.conv_pc_train_step(net.layers(), x, target, **settings)
        return reference.pc_train_step(list(net.weights), list(net.biases), list(net.activations), x, target,
                                       **settings)

    def tp_grads(self, net: Net, feedback: Feedback, x: Tensor, target: Tensor, config: TPConfig) -> TPResult:
        from .. import reference

        maps = (list(feedback.weights), list(feedback.biases), list(feedback.activations))
        settings = dict(beta=config.beta, loss=config.loss, difference=config.difference)
        if net.is_conv:
            return reference.conv_tp_train_step(net.layers(), *maps, x, target, **settings)
        return reference.tp_train_step(list(net.weights), list(net.biases), list(net.activations), *maps, x, target,
                                       **settings)

    def reconstruction_grads(self, net, feedback, x, noise) -> FeedbackResult:
        from .. import reference

        maps = (list(feedback.weights), list(feedback.biases), list(feedback.activations))
        if net.is_conv:
            return reference.conv_feedback_grads(net.layers(), *maps, x, noise)
        return reference.feedback_grads(list(net.weights), list(net.biases), list(net.activations), *maps, x, noise)
