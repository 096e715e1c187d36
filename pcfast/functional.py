"""Stateless public functions, one per algorithm step, with a ``backend=`` switch.

Each function validates its inputs once (types — a bool is a bool, an int an int —, shapes, dtypes,
devices, finiteness, hyperparameters), normalises the target, applies lazy negative/conjugate bits
(the fused backends read raw memory; strides are theirs to handle), hands the work to a backend
(``pcfast.ops``) and checks that the results are finite: a ``ValueError`` names a non-finite weight
or bias, ``pcfast.DivergenceError`` reports a computation that overflowed. The backends:
``"reference"`` (the specification), ``"torch"``, ``"cpp"``, ``"triton"`` or ``"auto"``.
Signatures match ``pcfast.reference``. Math: DESIGN §3–4.

Targets: for ``loss="mse"`` a float (B, C) tensor or int64 labels (B,) (one-hot encoded here); for
``loss="ce"`` int64 labels (B,).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from . import ops, reference
from .ops.backend import activity_shapes
from .activations import check_activation
from .types import Feedback, Net, PCConfig, SeededNoise, TPConfig, config_of, takes_settings
from .errors import DivergenceError
from .network import (
    _all_finite, check_batch, check_bool, check_like, check_number, check_sequence, check_tensor, resolve_precisions,
)
from .results import FeedbackResult, GradResult, PCResult, TPResult

__all__ = [
    "bp_train_step", "feedback_grads", "gnt_train_step", "pc_energy", "pc_train_step",
    "ridge_feedback", "tp_train_step",
]


def _readable(t: Tensor | None) -> Tensor | None:
    """``t`` with its lazy negative/conjugate bits applied (a copy only when one is set): the fused
    backends read memory through raw pointers, which do not see those bits. Strides are kept.
    Anything but a tensor is returned as it is (for the checks to name)."""
    if not isinstance(t, Tensor):
        return t
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    return t


def _readable_all(tensors: Sequence[Tensor | None]) -> list[Tensor | None]:
    if not isinstance(tensors, (list, tuple)):
        return tensors
    return [_readable(t) for t in tensors]


def as_net(weights, biases, activations, geometry=None) -> Net:
    """The network as a checked ``Net`` (types, shapes, dtypes, devices, activation names) of
    tensors the fused backends can read (lazy bits applied); ``geometry``: a conv net's
    ``ConvGeometry`` per layer (None for a linear one), or None for an MLP."""
    return Net(_readable_all(weights), _readable_all(biases), activations, geometry=tuple(geometry or ()))


def _check_input(name: str, x, net: Net) -> None:
    """``x``: a finite (batch >= 1, d_0) tensor — images (batch >= 1, C, H, W) that fit a conv net —
    of the model's dtype and device."""
    check_tensor(name, x)
    w0 = net.weights[0]
    d0 = w0.shape[1]
    if net.is_conv and (x.dim() != 4 or x.shape[1] != d0 or x.shape[0] == 0):
        raise ValueError(f"{name}: expected images of shape (batch >= 1, {d0}, height, width), got shape "
                         f"{tuple(x.shape)}")
    if not net.is_conv and (x.dim() != 2 or x.shape[1] != d0 or x.shape[0] == 0):
        raise ValueError(f"{name}: expected shape (batch >= 1, {d0}), got shape {tuple(x.shape)}")
    check_like(name, x, w0, tuple(x.shape))
    net.check_input(x)
    if not _all_finite(x):
        raise ValueError(f"{name}: contains NaN or infinite values")


def _inputs(**groups) -> list[tuple[str, Tensor]]:
    """(name, tensor) pairs of the named arguments: a tensor, or a list of tensors/None."""
    pairs = []
    for name, value in groups.items():
        if isinstance(value, Tensor):
            pairs.append((name, value))
        elif value is not None:
            pairs.extend((f"{name}[{k}]", t) for k, t in enumerate(value) if t is not None)
    return pairs


def _check_finite_result(op: str, values: dict[str, Tensor | Sequence[Tensor | None]],
                         inputs: list[tuple[str, Tensor]]) -> None:
    """Raise unless every result tensor in ``values`` is finite: ``ValueError`` naming the input
    that holds NaN/inf if one does, else ``DivergenceError`` (the computation itself overflowed).
    One reduction and one host sync when everything is finite."""
    named = []
    for name, value in values.items():
        if isinstance(value, Tensor):
            named.append((name, value))
        elif value is not None:
            named.extend((f"{name}[{k}]", t) for k, t in enumerate(value) if t is not None)
    with torch.no_grad():
        total = torch.stack([t.detach().sum().to(torch.float64) for _, t in named]).sum()
        if bool(torch.isfinite(total)):
            return
        bad = [name for name, t in named if not bool(torch.isfinite(t.detach()).all())]
        if not bad:
            return  # the float64 sum overflowed; every element is finite
    _raise_non_finite(op, f"{bad[0]} is not finite", inputs)


def _raise_non_finite(op: str, what: str, inputs: list[tuple[str, Tensor]]) -> None:
    """``ValueError`` naming the first input holding NaN/inf, else ``DivergenceError``."""
    with torch.no_grad():
        for name, t in inputs:
            if t.is_floating_point() and not _all_finite(t.detach()):
                raise ValueError(f"{name}: contains NaN or infinite values ({op}: {what})")
    knobs = "inference_lr, the learning rates" if op.startswith("pc") else "the learning rates, beta"
    raise DivergenceError(f"{op}: {what}: the computation diverged (lower {knobs} or the scale of the inputs)")


@takes_settings(PCConfig, "weights", "biases", "activations", "x", "y", backend="auto", geometry=None)
def pc_train_step(weights: Sequence[Tensor], biases: Sequence[Tensor | None], activations: Sequence[str], x: Tensor,
                  y: Tensor, *, backend: str = "auto", geometry: Sequence[Any] | None = None,
                  **settings: Any) -> PCResult:
    """Relax the PC latents from the feedforward pass for ``inference_steps`` steps of rate κ, then
    return the local gradients ``∂F/∂W_l = −γ_l ε_lᵀ φ(z_{l-1}) / B`` and the state (DESIGN §3).
    Nothing is modified: apply the gradients with any ``torch.optim`` optimizer (or use
    ``pcfast.optim.PC``, which does).

    Settings (keywords; ``pcfast.types.PCConfig``, which checks them):
        precisions: ``[γ_1 … γ_L]``, a single γ_L, or None for all ones.
        inference_steps: T (20). inference_lr: κ (0.1). loss: ``"mse"`` or ``"ce"``.
        schedule: ``"jacobi"`` (all layers from the same state) or ``"sequential"`` (top-down sweep).
        fpa: fixed-prediction assumption — predictions and φ' frozen at their feedforward values.
        return_trajectory: also return the latents after every step.
        inference_tol: adaptive stopping — end after the first step whose size ‖Δz‖ is at most this
            fraction of the largest step so far (``result.steps``: the steps taken); None runs all T.
        return_trace: also return ``result.trace`` (``PCTrace``: each layer's energy after every
            step and the activity-gradient norms).
        check_divergence: also return ``result.energy_prev``, F before the last step (the
            optimizers' divergence guard compares it with the final F).

    A conv net: ``geometry`` gives each layer's ``pcfast.network.ConvGeometry`` (None for a linear
    layer), ``weights[l]`` of a conv layer is (C_out, C_in, k_h, k_w) and x holds images (B, C, H, W).
    """
    net = as_net(weights, biases, activations, geometry)
    config = config_of(PCConfig, settings, depth=net.depth, where="pc_train_step")
    target = check_batch(x, y, weights, config.loss)
    net.check_input(x)
    result = pc_grads(net, _readable(x), _readable(target), config, backend)
    _check_finite_result("pc_train_step", {"energy": result.energy, "loss": result.loss,
                                           "weight_grads": result.weight_grads, "bias_grads": result.bias_grads},
                         _inputs(weights=weights, biases=biases))
    return result


def pc_grads(net: Net, x: Tensor, target: Tensor, config: PCConfig, backend: str = "auto") -> PCResult:
    """``pc_train_step`` on checked values (``target`` as ``check_batch`` returns it), with no check
    of its results: the optimizers' hot path, which checks each step with one finiteness flag."""
    return ops.get_backend(backend, "pc", x.device, x.dtype, conv=net.is_conv).pc_grads(net, x, target, config)


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
    as_net(weights, biases, activations)
    target = check_batch(x, y, weights, loss)
    check_sequence("latents", latents)
    if len(latents) != len(weights) - 1:
        raise ValueError(f"latents: expected {len(weights) - 1} tensors (z_1 … z_(L-1) of weights' layers), "
                         f"got {len(latents)}")
    for l, z in enumerate(latents):
        check_tensor(f"latents[{l}]", z)
        check_like(f"latents[{l}]", z, weights[0], (x.shape[0], weights[l].shape[0]))
    resolve_precisions(precisions, len(weights))
    check_bool("fpa", fpa)
    energy = reference.pc_energy(
        weights, biases, activations, x, target, latents, precisions=precisions, loss=loss, fpa=fpa
    )
    _check_finite_result("pc_energy", {"energy": energy},
                         _inputs(weights=weights, biases=biases, latents=latents))
    return energy


def _check_feedback(weights, feedback_weights, feedback_biases, feedback_activations, activations):
    depth = len(weights)
    check_sequence("feedback_weights", feedback_weights)
    check_sequence("feedback_biases", feedback_biases)
    if len(feedback_weights) != depth - 1 or len(feedback_biases) != depth - 1:
        raise ValueError(
            f"feedback_weights/feedback_biases: expected {depth - 1} entries (layers 2 … L of weights), "
            f"got {len(feedback_weights)} and {len(feedback_biases)}"
        )
    for k, q in enumerate(feedback_weights):
        check_tensor(f"feedback_weights[{k}]", q)
        # Q_{k+2} maps layer k+2's activity back to layer k+1's: a transposed convolution with W_{k+2}'s
        # shape, or a (d_{k+1}, d_{k+2}) matrix (d_{k+1}: the flattened input of a linear layer k+2)
        following = weights[k + 1]
        expected = tuple(following.shape) if following.dim() == 4 else (following.shape[1], following.shape[0])
        if tuple(q.shape) != expected or q.dtype != weights[0].dtype or q.device != weights[0].device:
            raise ValueError(
                f"feedback_weights[{k}]: expected shape {expected}, dtype {weights[0].dtype} on "
                f"{weights[0].device}, got shape {tuple(q.shape)}, dtype {q.dtype} on {q.device}"
            )
        c = feedback_biases[k]
        check_tensor(f"feedback_biases[{k}]", c, optional=True)
        if c is not None and (tuple(c.shape) != (following.shape[1],) or c.dtype != weights[0].dtype
                              or c.device != weights[0].device):
            raise ValueError(
                f"feedback_biases[{k}]: expected shape ({following.shape[1]},), dtype {weights[0].dtype} on "
                f"{weights[0].device}, got shape {tuple(c.shape)}, dtype {c.dtype} on {c.device}"
            )
    if feedback_activations is None:
        return reference.default_feedback_activations(activations)
    check_sequence("feedback_activations", feedback_activations)
    if len(feedback_activations) != depth - 1:
        raise ValueError(f"feedback_activations: expected {depth - 1} names, got {len(feedback_activations)}")
    for k, act in enumerate(feedback_activations):
        if not isinstance(act, str):
            raise TypeError(f"feedback_activations[{k}]: expected an activation name (str), got {type(act).__name__}")
        check_activation(act, f"feedback_activations[{k}]")
    return list(feedback_activations)


@takes_settings(TPConfig, "weights", "biases", "activations", "feedback_weights", "feedback_biases",
                "feedback_activations", "x", "y", backend="auto", geometry=None)
def tp_train_step(weights: Sequence[Tensor], biases: Sequence[Tensor | None], activations: Sequence[str],
                  feedback_weights: Sequence[Tensor], feedback_biases: Sequence[Tensor | None],
                  feedback_activations: Sequence[str] | None, x: Tensor, y: Tensor, *, backend: str = "auto",
                  geometry: Sequence[Any] | None = None, **settings: Any) -> TPResult:
    """Targets ``ĥ_L = f − β ∂ℓ/∂f`` propagated down by the feedback maps — DTP
    (``difference=True``: ``ĥ_{l-1} = h_{l-1} + g_l(ĥ_l) − g_l(h_l)``) or TP (``ĥ_{l-1} = g_l(ĥ_l)``) —
    and each layer's local gradient of ``½‖ĥ_l − h_l‖²`` (DESIGN §4). Settings (keywords;
    ``pcfast.types.TPConfig``): ``beta`` (0.1), ``loss`` (``"mse"``), ``difference`` (True: DTP).
    A conv net: ``geometry`` as for ``pc_train_step``; a conv layer's feedback weight Q_l has W_l's
    shape (a transposed convolution) and its bias the layer's input channels."""
    net = as_net(weights, biases, activations, geometry)
    feedback = _as_feedback(weights, feedback_weights, feedback_biases, feedback_activations, activations)
    config = config_of(TPConfig, settings, depth=net.depth, where="tp_train_step")
    target = check_batch(x, y, weights, config.loss)
    net.check_input(x)
    result = tp_grads(net, feedback, _readable(x), _readable(target), config, backend)
    _check_finite_result("tp_train_step", {"loss": result.loss, "local_loss": result.local_loss,
                                           "weight_grads": result.weight_grads, "bias_grads": result.bias_grads},
                         _inputs(weights=weights, biases=biases, feedback_weights=feedback_weights,
                                 feedback_biases=feedback_biases))
    return result


def tp_grads(net: Net, feedback: Feedback, x: Tensor, target: Tensor, config: TPConfig,
             backend: str = "auto") -> TPResult:
    """``tp_train_step`` on checked values, with no check of its results (the optimizers' hot path)."""
    return ops.get_backend(backend, "tp", x.device, x.dtype, conv=net.is_conv).tp_grads(net, feedback, x, target,
                                                                                         config)


def _as_feedback(weights, feedback_weights, feedback_biases, feedback_activations, activations) -> Feedback:
    psi = _check_feedback(weights, feedback_weights, feedback_biases, feedback_activations, activations)
    return Feedback(_readable_all(feedback_weights), _readable_all(feedback_biases), psi)


@takes_settings(SeededNoise, "weights", "biases", "activations", "feedback_weights", "feedback_biases",
                "feedback_activations", "x", ("noise", None), backend="auto", geometry=None)
def feedback_grads(weights: Sequence[Tensor], biases: Sequence[Tensor | None], activations: Sequence[str],
                   feedback_weights: Sequence[Tensor], feedback_biases: Sequence[Tensor | None],
                   feedback_activations: Sequence[str] | None, x: Tensor,
                   noise: Sequence[Tensor | None] | None = None, *, backend: str = "auto",
                   geometry: Sequence[Any] | None = None, **seeded: Any) -> FeedbackResult:
    """Gradients of the reconstruction losses ``½‖g_l(f_l(h_{l-1}+ξ_l)) − (h_{l-1}+ξ_l)‖²`` (batch
    mean) with respect to each Q_l and c_l; ``noise[l-2]`` is ξ_l, shape (B, d_{l-1}), or None.

    Or ``noise_seed``: ξ_l ~ N(0, ``noise_std``²) drawn from the seed — inside the kernels on the
    ``triton`` backend (never stored; ``pcfast.ops.tp_targets.gaussian_noise`` gives the same
    numbers), from a ``torch.Generator`` seeded with it elsewhere. The same seed on the same backend
    gives the same result; different backends draw different (equally distributed) numbers."""
    net = as_net(weights, biases, activations, geometry)
    feedback = _as_feedback(weights, feedback_weights, feedback_biases, feedback_activations, activations)
    _check_input("x", x, net)
    if noise is not None:
        check_sequence("noise", noise)
        if len(noise) != len(weights) - 1:
            raise ValueError(f"noise: expected {len(weights) - 1} entries, got {len(noise)}")
        for k, (xi, shape) in enumerate(zip(noise, activity_shapes(net, x))):
            check_tensor(f"noise[{k}]", xi, optional=True)
            if xi is not None:
                check_like(f"noise[{k}]", xi, weights[0], (x.shape[0], *shape))
                if not _all_finite(xi):
                    raise ValueError(f"noise[{k}]: contains NaN or infinite values")
    drawn = config_of(SeededNoise, seeded, depth=net.depth, where="feedback_grads")
    noise_seed, noise_std = drawn.noise_seed, drawn.noise_std
    if noise_seed is not None and noise is not None:
        raise ValueError("noise, noise_seed: give the noise tensors or a seed, not both")
    result = reconstruction_grads(net, feedback, _readable(x), None if noise is None else _readable_all(noise),
                                  noise_seed=noise_seed, noise_std=noise_std, backend=backend)
    _check_finite_result("feedback_grads", {"loss": result.loss, "weight_grads": result.weight_grads,
                                            "bias_grads": result.bias_grads},
                         _inputs(weights=weights, biases=biases, feedback_weights=feedback_weights,
                                 feedback_biases=feedback_biases))
    return result


def reconstruction_grads(net: Net, feedback: Feedback, x: Tensor, noise: Sequence[Tensor | None] | None = None, *,
                         noise_seed: int | None = None, noise_std: float = 0.0,
                         backend: str = "auto") -> FeedbackResult:
    """``feedback_grads`` on checked values, with no check of its results (the optimizers' hot
    path). The noise: tensors, or drawn from ``noise_seed`` (in the kernels where the backend can)."""
    chosen = ops.get_backend(backend, "feedback", x.device, x.dtype, conv=net.is_conv)
    return chosen.feedback_grads(net, feedback, x, noise=noise, noise_seed=noise_seed, noise_std=noise_std)


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
    net = as_net(weights, biases, activations)
    _check_input("x", x, net)
    ridge = check_number("ridge", ridge, allow_zero=True)
    check_bool("bias", bias)
    inputs = _inputs(weights=weights, biases=biases)
    try:
        qs, cs = reference.ridge_feedback(weights, biases, activations, x, ridge=ridge, bias=bias)
    except torch.linalg.LinAlgError as exc:  # a singular system from non-finite activities
        _raise_non_finite("ridge_feedback", f"the ridge system cannot be solved ({exc})", inputs)
    _check_finite_result("ridge_feedback", {"feedback_weights": qs, "feedback_biases": cs}, inputs)
    return qs, cs


def bp_train_step(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    x: Tensor,
    y: Tensor,
    *,
    loss: str = "mse",
    geometry: Sequence[Any] | None = None,
) -> GradResult:
    """Backprop gradients of the mean loss (autograd; the baseline). ``geometry``: a conv net's, as
    for ``pc_train_step``."""
    net = as_net(weights, biases, activations, geometry)
    target = check_batch(x, y, weights, loss)
    net.check_input(x)
    if net.is_conv:
        result = reference.conv_bp_train_step(net.layers(), x, target, loss=loss)
    else:
        result = reference.bp_train_step(weights, biases, activations, x, target, loss=loss)
    _check_finite_result("bp_train_step", {"loss": result.loss, "weight_grads": result.weight_grads,
                                           "bias_grads": result.bias_grads}, _inputs(weights=weights, biases=biases))
    return result


def gnt_train_step(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    x: Tensor,
    y: Tensor,
    *,
    beta: float = 1.0,
    loss: str = "mse",
    geometry: Sequence[Any] | None = None,
) -> GradResult:
    """Local gradients toward the Gauss–Newton targets ``Δu_l = −β J_l⁺ ∂ℓ/∂f`` (reference only).
    ``geometry``: a conv net's, as for ``pc_train_step`` (one Jacobian per sample and layer: small
    nets only)."""
    net = as_net(weights, biases, activations, geometry)
    target = check_batch(x, y, weights, loss)
    net.check_input(x)
    beta = check_number("beta", beta, allow_zero=True)
    inputs = _inputs(weights=weights, biases=biases)
    try:
        if net.is_conv:
            result = reference.conv_gnt_train_step(net.layers(), x, target, beta=beta, loss=loss)
        else:
            result = reference.gnt_train_step(weights, biases, activations, x, target, beta=beta, loss=loss)
    except torch.linalg.LinAlgError as exc:  # the pseudo-inverse of a non-finite Jacobian
        _raise_non_finite("gnt_train_step", f"the Gauss–Newton targets cannot be computed ({exc})", inputs)
    _check_finite_result("gnt_train_step", {"loss": result.loss, "weight_grads": result.weight_grads,
                                            "bias_grads": result.bias_grads}, inputs)
    return result
