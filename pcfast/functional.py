"""Stateless public functions, one per algorithm step, with a ``backend=`` switch.

Each function validates its inputs once (shapes, dtypes, devices, finiteness, hyperparameters),
normalises the target, and hands the work to a backend (``pcfast.ops``):
``"reference"`` (the specification), ``"torch"``, ``"cpp"``, ``"triton"`` or ``"auto"``.
Signatures match ``pcfast.reference``. Math: DESIGN §3–4.

Targets: for ``loss="mse"`` a float (B, C) tensor or int64 labels (B,) (one-hot encoded here); for
``loss="ce"`` int64 labels (B,).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from . import ops, reference
from .activations import check_activation
from .sgd import LayerSGD, layer_updates
from .network import SCHEDULES, check_batch, check_params, resolve_precisions
from .results import FeedbackResult, GradResult, PCResult, TPResult

__all__ = [
    "bp_train_step", "feedback_grads", "gnt_train_step", "pc_energy", "pc_train_step",
    "ridge_feedback", "tp_train_step",
]


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    value = float(value)
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a finite number {bound}, got {value}")
    return value


def _check_network(weights, biases, activations) -> None:
    check_params(weights, biases, activations)
    for l, act in enumerate(activations):
        check_activation(act, f"activations[{l}]")


def pc_train_step(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    x: Tensor,
    y: Tensor,
    *,
    precisions: Sequence[float] | float | None = None,
    inference_steps: int = 20,
    inference_lr: float = 0.1,
    schedule: str = "jacobi",
    fpa: bool = False,
    loss: str = "mse",
    return_trajectory: bool = False,
    sgd: Sequence[LayerSGD] | None = None,
    backend: str = "auto",
) -> PCResult:
    """Relax the PC latents from the feedforward pass for ``inference_steps`` steps of rate κ, then
    return the local gradients ``∂F/∂W_l = −γ_l ε_lᵀ φ(z_{l-1}) / B`` and the state (DESIGN §3).

    Args:
        precisions: ``[γ_1 … γ_L]``, a single γ_L, or None for all ones.
        schedule: ``"jacobi"`` (all layers from the same state) or ``"sequential"`` (top-down sweep).
        fpa: fixed-prediction assumption — predictions and φ' frozen at their feedforward values.
        return_trajectory: also return the latents after every step.
        sgd: one ``pcfast.sgd.LayerSGD`` per layer: also compute that SGD step from the gradients,
            out of place, into ``result.sgd_updates`` (nothing is modified). The ``triton`` backend
            applies it inside each layer's gradient launch; the others right after.
    """
    _check_network(weights, biases, activations)
    target = check_batch(x, y, weights, loss)
    gammas = resolve_precisions(precisions, len(weights))
    if isinstance(inference_steps, bool) or not isinstance(inference_steps, int) or inference_steps < 0:
        raise ValueError(f"inference_steps: expected an int >= 0, got {inference_steps!r}")
    _check_positive("inference_lr", inference_lr)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if sgd is not None:
        _check_sgd(sgd, weights, biases)
    name, fn = ops.resolve(backend, "pc_train_step", x.device)
    kwargs = dict(precisions=gammas, inference_steps=inference_steps, inference_lr=float(inference_lr),
                  schedule=schedule, fpa=bool(fpa), loss=loss, return_trajectory=return_trajectory)
    if sgd is not None and name == "triton":
        return fn(weights, biases, activations, x, target, sgd=list(sgd), **kwargs)
    result = fn(weights, biases, activations, x, target, **kwargs)
    if sgd is not None:
        result.sgd_updates = layer_updates(weights, biases, result.weight_grads, result.bias_grads, sgd)
    return result


def _check_sgd(sgd: Sequence[LayerSGD], weights: Sequence[Tensor], biases: Sequence[Tensor | None]) -> None:
    if len(sgd) != len(weights):
        raise ValueError(f"sgd: expected one LayerSGD per layer ({len(weights)}), got {len(sgd)}")
    for l, (step, w, b) in enumerate(zip(sgd, weights, biases)):
        if not isinstance(step, LayerSGD):
            raise TypeError(f"sgd[{l}]: expected a pcfast.sgd.LayerSGD, got {type(step).__name__}")
        step.check(f"sgd[{l}]")
        for name, buf, param in (("weight_buffer", step.weight_buffer, w), ("bias_buffer", step.bias_buffer, b)):
            if buf is None:
                continue
            if not step.momentum:
                raise ValueError(f"sgd[{l}].{name}: a momentum buffer without momentum")
            if param is None or buf.shape != param.shape or buf.dtype != param.dtype or buf.device != param.device:
                raise ValueError(f"sgd[{l}].{name}: expected the parameter's shape, dtype and device")
        if b is not None and step.momentum and (step.weight_buffer is None) != (step.bias_buffer is None):
            raise ValueError(f"sgd[{l}]: give both momentum buffers or neither")


def pc_energy(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    x: Tensor,
    y: Tensor,
    latents: Sequence[Tensor],
    *,
    precisions: Sequence[float] | float | None = None,
    loss: str = "mse",
    fpa: bool = False,
) -> Tensor:
    """The PC energy F(z), summed over the batch (the reference definition; differentiable)."""
    _check_network(weights, biases, activations)
    target = check_batch(x, y, weights, loss)
    if len(latents) != len(weights) - 1:
        raise ValueError(f"latents: expected {len(weights) - 1} tensors (z_1 … z_(L-1)), got {len(latents)}")
    for l, z in enumerate(latents):
        if z.shape != (x.shape[0], weights[l].shape[0]):
            raise ValueError(f"latents[{l}]: expected shape {(x.shape[0], weights[l].shape[0])}, got {tuple(z.shape)}")
    return reference.pc_energy(
        weights, biases, activations, x, target, latents, precisions=precisions, loss=loss, fpa=fpa
    )


def _check_feedback(weights, feedback_weights, feedback_biases, feedback_activations, activations):
    depth = len(weights)
    if len(feedback_weights) != depth - 1 or len(feedback_biases) != depth - 1:
        raise ValueError(
            f"feedback_weights/feedback_biases: expected {depth - 1} entries (layers 2 … L), "
            f"got {len(feedback_weights)} and {len(feedback_biases)}"
        )
    for k, q in enumerate(feedback_weights):
        expected = (weights[k].shape[0], weights[k + 1].shape[0])
        if tuple(q.shape) != expected or q.dtype != weights[0].dtype or q.device != weights[0].device:
            raise ValueError(
                f"feedback_weights[{k}]: expected shape {expected}, dtype {weights[0].dtype} on "
                f"{weights[0].device}, got shape {tuple(q.shape)}, dtype {q.dtype} on {q.device}"
            )
        c = feedback_biases[k]
        if c is not None and tuple(c.shape) != (expected[0],):
            raise ValueError(f"feedback_biases[{k}]: expected shape ({expected[0]},), got {tuple(c.shape)}")
    if feedback_activations is None:
        return reference.default_feedback_activations(activations)
    if len(feedback_activations) != depth - 1:
        raise ValueError(f"feedback_activations: expected {depth - 1} names, got {len(feedback_activations)}")
    for k, act in enumerate(feedback_activations):
        check_activation(act, f"feedback_activations[{k}]")
    return list(feedback_activations)


def tp_train_step(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    feedback_weights: Sequence[Tensor],
    feedback_biases: Sequence[Tensor | None],
    feedback_activations: Sequence[str] | None,
    x: Tensor,
    y: Tensor,
    *,
    beta: float = 0.1,
    loss: str = "mse",
    difference: bool = True,
    backend: str = "auto",
) -> TPResult:
    """Targets ``ĥ_L = f − β ∂ℓ/∂f`` propagated down by the feedback maps — DTP
    (``difference=True``: ``ĥ_{l-1} = h_{l-1} + g_l(ĥ_l) − g_l(h_l)``) or TP (``ĥ_{l-1} = g_l(ĥ_l)``) —
    and each layer's local gradient of ``½‖ĥ_l − h_l‖²`` (DESIGN §4)."""
    _check_network(weights, biases, activations)
    psi = _check_feedback(weights, feedback_weights, feedback_biases, feedback_activations, activations)
    target = check_batch(x, y, weights, loss)
    _check_positive("beta", beta, allow_zero=True)
    _, fn = ops.resolve(backend, "tp_train_step", x.device)
    return fn(
        weights, biases, activations, feedback_weights, feedback_biases, psi, x, target,
        beta=float(beta), loss=loss, difference=bool(difference),
    )


def feedback_grads(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    feedback_weights: Sequence[Tensor],
    feedback_biases: Sequence[Tensor | None],
    feedback_activations: Sequence[str] | None,
    x: Tensor,
    noise: Sequence[Tensor | None] | None = None,
    *,
    noise_seed: int | None = None,
    noise_std: float = 0.0,
    backend: str = "auto",
) -> FeedbackResult:
    """Gradients of the reconstruction losses ``½‖g_l(f_l(h_{l-1}+ξ_l)) − (h_{l-1}+ξ_l)‖²`` (batch
    mean) with respect to each Q_l and c_l; ``noise[l-2]`` is ξ_l, shape (B, d_{l-1}), or None.

    Or ``noise_seed``: ξ_l ~ N(0, ``noise_std``²) drawn from the seed — inside the kernels on the
    ``triton`` backend (never stored; ``pcfast.ops.tp_targets.gaussian_noise`` gives the same
    numbers), from a ``torch.Generator`` seeded with it elsewhere. The same seed on the same backend
    gives the same result; different backends draw different (equally distributed) numbers."""
    _check_network(weights, biases, activations)
    psi = _check_feedback(weights, feedback_weights, feedback_biases, feedback_activations, activations)
    if x.dim() != 2 or x.shape[1] != weights[0].shape[1]:
        raise ValueError(f"x: expected shape (batch, {weights[0].shape[1]}), got {tuple(x.shape)}")
    if noise is not None:
        if len(noise) != len(weights) - 1:
            raise ValueError(f"noise: expected {len(weights) - 1} entries, got {len(noise)}")
        for k, xi in enumerate(noise):
            if xi is not None and tuple(xi.shape) != (x.shape[0], weights[k].shape[0]):
                raise ValueError(f"noise[{k}]: expected shape {(x.shape[0], weights[k].shape[0])}, got {tuple(xi.shape)}")
    if noise_seed is not None:
        if noise is not None:
            raise ValueError("noise, noise_seed: give the noise tensors or a seed, not both")
        if isinstance(noise_seed, bool) or not isinstance(noise_seed, int) or not 0 <= noise_seed < 2**63:
            raise ValueError(f"noise_seed: expected an int in [0, 2**63), got {noise_seed!r}")
        if not isinstance(noise_std, (int, float)) or not math.isfinite(noise_std) or noise_std < 0:
            raise ValueError(f"noise_std: expected a finite number >= 0, got {noise_std!r}")
    name, fn = ops.resolve(backend, "feedback_grads", x.device)
    if noise_seed is not None:
        if name == "triton":
            return fn(weights, biases, activations, feedback_weights, feedback_biases, psi, x,
                      noise_seed=noise_seed, noise_std=float(noise_std))
        generator = torch.Generator(device=x.device).manual_seed(noise_seed)
        noise = [torch.randn(x.shape[0], w.shape[0], generator=generator, dtype=x.dtype, device=x.device).mul_(noise_std)
                 for w in weights[:-1]]
    return fn(weights, biases, activations, feedback_weights, feedback_biases, psi, x, noise)


def ridge_feedback(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    x: Tensor,
    *,
    ridge: float = 1e-3,
    bias: bool = True,
) -> tuple[list[Tensor], list[Tensor | None]]:
    """Closed-form linear feedback weights (ψ = identity) on a batch; see ``reference.ridge_feedback``."""
    _check_network(weights, biases, activations)
    _check_positive("ridge", ridge, allow_zero=True)
    return reference.ridge_feedback(weights, biases, activations, x, ridge=ridge, bias=bias)


def bp_train_step(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    x: Tensor,
    y: Tensor,
    *,
    loss: str = "mse",
) -> GradResult:
    """Backprop gradients of the mean loss (autograd; the baseline)."""
    _check_network(weights, biases, activations)
    target = check_batch(x, y, weights, loss)
    return reference.bp_train_step(weights, biases, activations, x, target, loss=loss)


def gnt_train_step(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    x: Tensor,
    y: Tensor,
    *,
    beta: float = 1.0,
    loss: str = "mse",
) -> GradResult:
    """Local gradients toward the Gauss–Newton targets ``Δu_l = −β J_l⁺ ∂ℓ/∂f`` (reference only)."""
    _check_network(weights, biases, activations)
    target = check_batch(x, y, weights, loss)
    return reference.gnt_train_step(weights, biases, activations, x, target, beta=beta, loss=loss)
