"""Convolutional networks: predictive coding, backpropagation and (difference) target propagation,
the specification.

**The network.** A list of L layers. Layer l is a parametrised map ``m_l`` followed by the
parameter-free modules that come after it — its activation φ_l, then optional pooling π_l:

    u_l = m_l(a_{l-1}),    a_l = π_l(φ_l(u_l)),    a_0 = x,    f = u_L.

- :class:`ConvLayer`: ``m_l(a) = conv2d(a, W_l) + b_l`` with ``W_l`` of shape (C_out, C_in, k_h, k_w),
  a per-channel bias (C_out,) or none, and the layer's stride, padding and dilation (groups = 1);
  ``pool`` is None or ``("max" | "avg", kernel, stride)``, applied after the activation.
- :class:`LinearLayer`: ``m_l(a) = flatten(a) W_lᵀ + b_l`` (a flatten, in (C, H, W) order, before the
  first linear layer; a no-op after a linear one).
- The last layer is the readout: a linear layer with the ``"identity"`` activation, so
  ``f = u_L`` of shape (B, C) and ℓ is MSE ``½‖y − f‖²`` or cross-entropy, summed over the batch
  (``pcfast.reference.common``). Images are (B, C, H, W); nothing mixes samples.

**Predictive coding** (DESIGN §3 with the MLP's layer map replaced by ``m_l``). Latents
``z_1 … z_{L-1}`` live in pre-activation space, z_l with u_l's shape. Writing
``a(z_l) = π_l(φ_l(z_l))`` and ``a(z_0) := x``, layer l's prediction is ``μ_l = m_l(a(z_{l-1}))``
and the energy, summed over the batch, is

    F(z) = Σ_{l<L} γ_l/2 · ‖z_l − μ_l‖² + γ_L · ℓ(μ_L, y).

Errors: ``ε_l = z_l − μ_l`` for l < L, ``ε_L = −∂ℓ/∂f`` at ``f = μ_L``. The activity gradient is

    ∂F/∂z_l = γ_l ε_l − γ_{l+1} · J_l(z_l)ᵀ ε_{l+1},    J_l(z) = ∂ m_{l+1}(π_l(φ_l(z))) / ∂z,

the vector–Jacobian product of the next layer's map: a transposed convolution of ε_{l+1} with
W_{l+1} (``ε_{l+1} W_{l+1}``, unflattened, for a linear layer), routed back through the pooling
(max: to each window's arg-max; avg: spread evenly over the window), times φ_l'(z_l). The reference
takes it from autograd on F. Relaxation: forward initialisation ``z_l = u_l``, then T steps of
``z_l ← z_l − (κ/γ_l) ∂F/∂z_l``, all layers from one state (``jacobi``) or one sweep
l = L−1 … 1 from the freshest state (``sequential``). Inference control is the MLP's (DESIGN §3,
the same loop: ``pcfast.reference.pc.relax_latents``): adaptive stopping after step t when
‖Δz_t‖ ≤ ``inference_tol`` · max_{τ≤t} ‖Δz_τ‖ (every layer's change, Frobenius), the trace (F's
term of each layer after every step, (T+1, L), and ‖∂F/∂z_l‖ of every update, (T, L−1), NaN rows
after a stop) and F before the last step (``PCResult.energy_prev``).

Fixed-prediction assumption (FPA): predictions, φ' and the pooling's routing stay at their
feedforward values: ``μ_l = u_l`` (so ``ε_l = z_l − u_l``, ``ε_L = −∂ℓ/∂f`` at ``f = u_L``) and the
top-down term is the vector–Jacobian product of the layer map at the feedforward state,
``J_l(u_l)ᵀ ε_{l+1}``; the weight gradients use the feedforward ``a_{l-1}`` as presynaptic activity.

Weight gradients at the final state (batch mean) are autograd of F / B:
``∂F/∂W_l = −(γ_l/B) · Σ_b ε_l ⋆ a(z_{l-1})`` (the cross-correlation that
``torch.nn.grad.conv2d_weight`` computes; ``ε_lᵀ flatten(a(z_{l-1}))`` for a linear layer), bias
``−(γ_l/B) Σ_{b,i,j} ε_l``.

**Backpropagation**: autograd of ``ℓ(f, y) / B``.

**Target propagation** (DESIGN §4). Activities ``h_l = a_l`` (pooled, unflattened) for l < L and
``h_L = f``; layer l's forward map is ``F_l = π_l ∘ φ_l ∘ m_l``. Feedback maps g_l, l = 2 … L, take
layer l's activity back to layer l−1's:

- convolutional layer l: ``g_l(v) = ψ_l(conv_transpose(υ_l(v), Q_l) + c_l)``, with Q_l of W_l's shape
  (C_out, C_in, k_h, k_w), a per-channel bias c_l (C_in,) or none, layer l's stride, padding and
  dilation, and the output padding that gives h_{l-1}'s size. υ_l undoes the layout of layer l's
  pooling (identity without one): each pooled value is repeated over its stride × stride block (window
  p's block starts at p · stride), cropped or edge-replicated to u_l's size — a fixed,
  state-independent map and, for kernel = stride, a right inverse of the pooling:
  ``π_l(υ_l(v)) = v``, max or avg.
- linear layer l: ``g_l(v) = ψ_l(v Q_lᵀ + c_l)`` reshaped to h_{l-1}'s shape, Q_l of shape
  (d_{l-1}, d_l) with d_{l-1} the flattened size of h_{l-1}, c_l (d_{l-1},) or none.

ψ_l defaults to φ_{l-1}. Output target ``ĥ_L = f − β ∂ℓ/∂f``; TP ``ĥ_{l-1} = g_l(ĥ_l)``; DTP
``ĥ_{l-1} = h_{l-1} + g_l(ĥ_l) − g_l(h_l)``. Layer l's local loss is ``½‖ĥ_l − h_l‖²`` with ĥ_l and
h_{l-1} held fixed (batch mean, gradients by autograd). The feedback weights minimise the noisy
reconstruction loss ``½‖g_l(F_l(h_{l-1} + ξ)) − (h_{l-1} + ξ)‖²`` (batch mean).

**Gauss–Newton targets** (``pcfast.reference.gnt``'s definition on this net): per sample,
``Δu_l = −β J_l⁺ ∂ℓ/∂f`` with ``J_l = ∂f/∂u_l`` flattened to (C, numel(u_l)).

Everything works in float64 and is written for reading, not speed. Lists of feedback parameters are
indexed from layer 2, as in ``pcfast.reference.tp``: ``feedback_weights[0]`` is Q_2.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as nnf
from torch import Tensor

from ..activations import check_activation, phi
from ..results import FeedbackResult, GradResult, PCResult, TPResult
from ..types import PCConfig, TPConfig
from .common import loss_sum, output_error
from .pc import relax_latents

Pool = tuple[str, int, int]


@dataclass(frozen=True, eq=False)
class ConvLayer:
    """``u = conv2d(a, weight) + bias``, then ``activation``, then ``pool`` (None or
    ``("max" | "avg", kernel, stride)``). ``weight``: (C_out, C_in, k_h, k_w); ``bias``: (C_out,) or None."""

    weight: Tensor
    bias: Tensor | None = None
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    activation: str = "identity"
    pool: Pool | None = None
    groups: int = 1  # only 1 is specified


@dataclass(frozen=True, eq=False)
class LinearLayer:
    """``u = flatten(a) weightᵀ + bias``, then ``activation``. ``weight``: (d_out, d_in); ``bias``:
    (d_out,) or None."""

    weight: Tensor
    bias: Tensor | None = None
    activation: str = "identity"


Layer = ConvLayer | LinearLayer


# ------------------------------------------------------------------------------------------------
# The network: checks, the layer map, the forward pass.

def _conv_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def check_conv_net(layers: Sequence[Layer], x: Tensor) -> list[tuple[int, ...]]:
    """Check ``layers`` on input ``x``; return the per-sample shape of every ``u_l``. Every error is a
    ``ValueError`` naming the layer (``layers[i]``, 0-based)."""
    if len(layers) == 0:
        raise ValueError("layers: expected at least one layer")
    shape = tuple(x.shape[1:])
    shapes = []
    for i, layer in enumerate(layers):
        name = f"layers[{i}] ({type(layer).__name__})"
        if not isinstance(layer, (ConvLayer, LinearLayer)):
            raise ValueError(f"layers[{i}]: expected a ConvLayer or LinearLayer, got {type(layer).__name__}")
        check_activation(layer.activation, f"{name}.activation")
        w, b = layer.weight, layer.bias
        if isinstance(layer, ConvLayer):
            if layer.groups != 1:
                raise ValueError(f"{name}: groups={layer.groups!r} is not supported (only groups=1)")
            if w.dim() != 4:
                raise ValueError(f"{name}: weight must be (C_out, C_in, k_h, k_w), got shape {tuple(w.shape)}")
            _positive_int(f"{name}.stride", layer.stride)
            _positive_int(f"{name}.padding", layer.padding, minimum=0)
            _positive_int(f"{name}.dilation", layer.dilation)
            if len(shape) != 3:
                raise ValueError(f"{name}: expects a (C, H, W) input per sample, got shape {shape}")
            if w.shape[1] != shape[0]:
                raise ValueError(f"{name}: weight has {w.shape[1]} input channels, its input has {shape[0]}")
            sizes = []
            for axis, size, k in zip("HW", shape[1:], w.shape[2:]):
                span, padded = layer.dilation * (k - 1) + 1, size + 2 * layer.padding
                if span > padded:
                    raise ValueError(f"{name}: kernel spans {span} along {axis} (size {k}, dilation "
                                     f"{layer.dilation}), larger than the padded input {padded}")
                sizes.append(_conv_size(size, k, layer.stride, layer.padding, layer.dilation))
            shape = (w.shape[0], *sizes)
        else:
            if w.dim() != 2:
                raise ValueError(f"{name}: weight must be (d_out, d_in), got shape {tuple(w.shape)}")
            flat = 1
            for s in shape:
                flat *= s
            if w.shape[1] != flat:
                raise ValueError(f"{name}: weight has {w.shape[1]} input features, its input has {flat} "
                                 f"(shape {shape}, flattened)")
            shape = (w.shape[0],)
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{name}: bias must have shape ({w.shape[0]},), got {tuple(b.shape)}")
        shapes.append(shape)
        pool = getattr(layer, "pool", None)
        if pool is not None:
            if not (isinstance(pool, tuple) and len(pool) == 3 and pool[0] in ("max", "avg")):
                raise ValueError(f"{name}: pool must be None or ('max' | 'avg', kernel, stride), got {pool!r}")
            _positive_int(f"{name}.pool kernel", pool[1])
            _positive_int(f"{name}.pool stride", pool[2])
            if pool[1] > min(shape[1:]):
                raise ValueError(f"{name}: pool kernel {pool[1]} larger than its input {shape[1:]}")
            shape = (shape[0], *(_conv_size(s, pool[1], pool[2], 0, 1) for s in shape[1:]))
    last = layers[-1]
    if not isinstance(last, LinearLayer) or last.activation != "identity":
        raise ValueError(f"layers[{len(layers) - 1}]: the readout must be a LinearLayer with activation 'identity'")
    return shapes


def layer_map(layer: Layer, a: Tensor) -> Tensor:
    """``m_l(a)``: the convolution, or the linear map of the flattened input."""
    if isinstance(layer, ConvLayer):
        return nnf.conv2d(a, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation)
    return nnf.linear(a.flatten(1), layer.weight, layer.bias)


def layer_output(layer: Layer, u: Tensor) -> Tensor:
    """``π_l(φ_l(u))``: the activation, then the pooling."""
    h = phi(layer.activation)(u)
    pool = getattr(layer, "pool", None)
    if pool is None:
        return h
    kind, kernel, stride = pool
    return (nnf.max_pool2d if kind == "max" else nnf.avg_pool2d)(h, kernel, stride)


def conv_forward(layers: Sequence[Layer], x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Feedforward pass: pre-activations ``[u_1 … u_L]`` and activities ``[a_0 = x, a_1 … a_{L-1}]``."""
    check_conv_net(layers, x)
    us, hs = [], [x]
    for l, layer in enumerate(layers):
        us.append(layer_map(layer, hs[-1]))
        if l < len(layers) - 1:
            hs.append(layer_output(layer, us[-1]))
    return us, hs


def _detached(layers: Sequence[Layer]) -> list[Layer]:
    return [replace(layer, weight=layer.weight.detach(), bias=None if layer.bias is None else layer.bias.detach())
            for layer in layers]


def _with_grad(layers: Sequence[Layer]) -> tuple[list[Layer], list[Tensor]]:
    """Copies of ``layers`` whose parameters require grad, and those parameters: weights, then biases."""
    ws = [layer.weight.detach().requires_grad_(True) for layer in layers]
    bs = [None if layer.bias is None else layer.bias.detach().requires_grad_(True) for layer in layers]
    copies = [replace(layer, weight=w, bias=b) for layer, w, b in zip(layers, ws, bs)]
    return copies, ws + [b for b in bs if b is not None]


def _split(layers: Sequence[Layer], grads: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor | None]]:
    rest = iter(grads[len(layers):])
    return list(grads[: len(layers)]), [None if layer.bias is None else next(rest) for layer in layers]


# ------------------------------------------------------------------------------------------------
# Predictive coding.

def _presynaptic(layers: Sequence[Layer], x: Tensor, latents: Sequence[Tensor]) -> list[Tensor]:
    """``[x, a(z_1), …, a(z_{L-1})]``."""
    return [x] + [layer_output(layer, z) for layer, z in zip(layers, latents)]


def _fpa_state(layers: Sequence[Layer], x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Feedforward pre-activations and presynaptic activities, detached: FPA's frozen values."""
    us, hs = conv_forward(layers, x)
    return [u.detach() for u in us], [h.detach() for h in hs]


def _check_latents(layers: Sequence[Layer], x: Tensor, latents: Sequence[Tensor]) -> None:
    shapes = check_conv_net(layers, x)
    if len(latents) != len(layers) - 1:
        raise ValueError(f"latents: expected {len(layers) - 1} (z_1 … z_(L-1)), got {len(latents)}")
    for l, (z, shape) in enumerate(zip(latents, shapes)):
        if tuple(z.shape) != (x.shape[0], *shape):
            raise ValueError(f"latents[{l}]: expected shape {(x.shape[0], *shape)}, got {tuple(z.shape)}")


def conv_pc_energy_terms(layers: Sequence[Layer], x: Tensor, target: Tensor, latents: Sequence[Tensor], *,
                         precisions: Sequence[float] | float | None = None, loss: str = "mse",
                         fpa: bool = False) -> list[Tensor]:
    """F's term of each layer, summed over the batch: γ_l/2 ‖ε_l‖² for l < L, γ_L Σ ℓ(f, y)."""
    _check_latents(layers, x, latents)
    gammas = PCConfig.of(len(layers), precisions).precisions
    pre = _fpa_state(layers, x)[1] if fpa else _presynaptic(layers, x, latents)
    terms = []
    for l in range(len(layers) - 1):
        eps = latents[l] - layer_map(layers[l], pre[l])
        terms.append(0.5 * gammas[l] * (eps**2).sum())
    f = layer_map(layers[-1], pre[-1])
    return terms + [gammas[-1] * loss_sum(f, target, loss)]


def conv_pc_energy(layers: Sequence[Layer], x: Tensor, target: Tensor, latents: Sequence[Tensor], *,
                   precisions: Sequence[float] | float | None = None, loss: str = "mse",
                   fpa: bool = False) -> Tensor:
    """F(z), summed over the batch. With ``fpa`` each prediction uses the feedforward ``a_{l-1}``."""
    energy = x.new_zeros(())
    for term in conv_pc_energy_terms(layers, x, target, latents, precisions=precisions, loss=loss, fpa=fpa):
        energy = energy + term
    return energy


def conv_pc_errors(layers: Sequence[Layer], x: Tensor, target: Tensor, latents: Sequence[Tensor],
                   config: PCConfig) -> list[Tensor]:
    """``[ε_1 … ε_L]``: ``ε_l = z_l − μ_l`` for l < L, ``ε_L = −∂ℓ/∂f``."""
    _check_latents(layers, x, latents)
    if config.fpa:
        us, pre = _fpa_state(layers, x)
    else:
        pre = _presynaptic(layers, x, latents)
    errors = [latents[l] - layer_map(layers[l], pre[l]) for l in range(len(layers) - 1)]
    f = us[-1] if config.fpa else layer_map(layers[-1], pre[-1])
    return errors + [output_error(f, target, config.loss)]


def conv_pc_activity_grads(layers: Sequence[Layer], x: Tensor, target: Tensor, latents: Sequence[Tensor],
                           config: PCConfig) -> list[Tensor]:
    """``[∂F/∂z_1 … ∂F/∂z_{L-1}]``.

    Without FPA: autograd of :func:`conv_pc_energy`. With FPA: ``γ_l ε_l − γ_{l+1} J_l(u_l)ᵀ ε_{l+1}``,
    the vector–Jacobian product of ``m_{l+1} ∘ π_l ∘ φ_l`` at the feedforward ``u_l``.
    """
    gammas = config.precisions
    if config.fpa:
        us, _ = _fpa_state(layers, x)
        errors = conv_pc_errors(layers, x, target, latents, config)
        grads = []
        with torch.enable_grad():
            for l in range(len(layers) - 1):
                u = us[l].detach().requires_grad_(True)
                mapped = layer_map(layers[l + 1], layer_output(layers[l], u))
                (top_down,) = torch.autograd.grad(mapped, u, grad_outputs=errors[l + 1])
                grads.append(gammas[l] * errors[l] - gammas[l + 1] * top_down)
        return grads
    with torch.enable_grad():
        zs = [z.detach().requires_grad_(True) for z in latents]
        energy = conv_pc_energy(layers, x, target, zs, precisions=list(gammas), loss=config.loss)
        return list(torch.autograd.grad(energy, zs)) if zs else []


def conv_pc_relax(layers: Sequence[Layer], x: Tensor, target: Tensor,
                  config: PCConfig) -> tuple[list[Tensor], list[list[Tensor]] | None]:
    """Relax the latents from their feedforward values; return them (and every step's, if asked).

    Each update is ``z_l ← z_l − (κ/γ_l) ∂F/∂z_l`` with κ = ``inference_lr``. ``jacobi`` updates
    all layers from the same state; ``sequential`` sweeps l = L−1 … 1, each from the freshest state.
    """
    latents, trajectory, _, _, _ = conv_pc_relax_traced(layers, x, target, config)
    return latents, trajectory


def conv_pc_relax_traced(layers: Sequence[Layer], x: Tensor, target: Tensor, config: PCConfig):
    """:func:`conv_pc_relax` with ``config``'s inference control, the loop of the MLP specification
    (``pcfast.reference.pc.relax_latents``): (latents, trajectory, steps taken, ``PCTrace`` or None,
    F before the last step or None)."""
    layers = _detached(layers)
    us, _ = conv_forward(layers, x)

    def grads(latents: Sequence[Tensor]) -> list[Tensor]:
        return conv_pc_activity_grads(layers, x, target, latents, config)

    def terms(latents: Sequence[Tensor]) -> list[Tensor]:
        return conv_pc_energy_terms(layers, x, target, latents, precisions=list(config.precisions),
                                    loss=config.loss, fpa=config.fpa)

    return relax_latents([u.clone() for u in us[:-1]], grads, terms, config, like=x)


def conv_pc_weight_grads(layers: Sequence[Layer], x: Tensor, target: Tensor, latents: Sequence[Tensor],
                         config: PCConfig) -> tuple[list[Tensor], list[Tensor | None]]:
    """``∂(F/B)/∂W_l`` and ``∂(F/B)/∂b_l`` at the given latents, by autograd (FPA: the presynaptic
    activity is the feedforward ``a_{l-1}``)."""
    with torch.enable_grad():
        copies, params = _with_grad(layers)
        zs = [z.detach() for z in latents]
        energy = conv_pc_energy(copies, x, target, zs, precisions=list(config.precisions), loss=config.loss,
                                fpa=config.fpa)
        grads = torch.autograd.grad(energy / x.shape[0], params)
    return _split(layers, grads)


def conv_pc_train_step(layers: Sequence[Layer], x: Tensor, target: Tensor, *,
                       precisions: Sequence[float] | float | None = None, inference_steps: int = 20,
                       inference_lr: float = 0.1, schedule: str = "jacobi", fpa: bool = False, loss: str = "mse",
                       return_trajectory: bool = False, inference_tol: float | None = None,
                       return_trace: bool = False, check_divergence: bool = False) -> PCResult:
    """Relaxation, then local weight gradients at the final state (``precisions`` as
    ``pcfast.functional`` takes them: None all ones, a number γ_L alone, or one per layer; the
    inference control, ``inference_tol``, ``return_trace`` and ``check_divergence``, as ``PCConfig``'s)."""
    config = PCConfig.of(len(layers), precisions, inference_steps=inference_steps, inference_lr=inference_lr,
                         schedule=schedule, fpa=fpa, loss=loss, return_trajectory=return_trajectory,
                         inference_tol=inference_tol, return_trace=return_trace, check_divergence=check_divergence)
    layers = _detached(layers)
    latents, trajectory, taken, trace, energy_prev = conv_pc_relax_traced(layers, x, target, config)
    weight_grads, bias_grads = conv_pc_weight_grads(layers, x, target, latents, config)
    errors = conv_pc_errors(layers, x, target, latents, config)
    energy = conv_pc_energy(layers, x, target, latents, precisions=list(config.precisions), loss=loss, fpa=fpa)
    f0 = conv_forward(layers, x)[0][-1]
    return PCResult(
        latents=latents,
        errors=errors,
        weight_grads=weight_grads,
        bias_grads=bias_grads,
        energy=energy.detach(),
        loss=(loss_sum(f0, target, loss) / x.shape[0]).detach(),
        trajectory=trajectory,
        steps=None if inference_tol is None else torch.tensor(taken, device=x.device),
        trace=trace,
        energy_prev=None if energy_prev is None else energy_prev.detach(),
    )


# ------------------------------------------------------------------------------------------------
# Backpropagation.

def conv_bp_train_step(layers: Sequence[Layer], x: Tensor, target: Tensor, *, loss: str = "mse") -> GradResult:
    """Gradients of ``ℓ(f, y) / B`` with respect to every weight and bias."""
    with torch.enable_grad():
        copies, params = _with_grad(layers)
        f = conv_forward(copies, x)[0][-1]
        value = loss_sum(f, target, loss) / x.shape[0]
        grads = torch.autograd.grad(value, params)
    weight_grads, bias_grads = _split(layers, grads)
    return GradResult(weight_grads, bias_grads, value.detach())


# ------------------------------------------------------------------------------------------------
# Target propagation and difference target propagation.

def conv_default_feedback_activations(layers: Sequence[Layer]) -> list[str]:
    """ψ_l = φ_{l-1} for l = 2 … L."""
    return [layer.activation for layer in layers[:-1]]


def _check_feedback(layers: Sequence[Layer], feedback_weights, feedback_biases, feedback_activations) -> None:
    count = len(layers) - 1
    for name, values in (("feedback_weights", feedback_weights), ("feedback_biases", feedback_biases),
                         ("feedback_activations", feedback_activations)):
        if len(values) != count:
            raise ValueError(f"{name}: expected {count} entries (layers 2 … L), got {len(values)}")
    for k in range(count):
        layer, q, c = layers[k + 1], feedback_weights[k], feedback_biases[k]
        check_activation(feedback_activations[k], f"feedback_activations[{k}]")
        if isinstance(layer, ConvLayer):
            expected_q, expected_c = tuple(layer.weight.shape), (layer.weight.shape[1],)
        else:
            expected_q = (layer.weight.shape[1], layer.weight.shape[0])
            expected_c = (layer.weight.shape[1],)
        if tuple(q.shape) != expected_q:
            raise ValueError(f"feedback_weights[{k}] (layers[{k + 1}]): expected shape {expected_q}, "
                             f"got {tuple(q.shape)}")
        if c is not None and tuple(c.shape) != expected_c:
            raise ValueError(f"feedback_biases[{k}] (layers[{k + 1}]): expected shape {expected_c}, "
                             f"got {tuple(c.shape)}")


def unpool(v: Tensor, stride: int, size: Sequence[int]) -> Tensor:
    """υ: repeat each value over a ``stride`` × ``stride`` block, then crop or edge-replicate to ``size``."""
    up = v.repeat_interleave(stride, dim=2).repeat_interleave(stride, dim=3)[:, :, : size[0], : size[1]]
    return nnf.pad(up, (0, size[1] - up.shape[3], 0, size[0] - up.shape[2]), mode="replicate")


def conv_feedback_map(layer: Layer, v: Tensor, weight: Tensor, bias: Tensor | None, activation: str,
                      u_shape: Sequence[int], h_shape: Sequence[int]) -> Tensor:
    """``g_l(v)`` of the forward layer ``layer`` (layer l): back from its activity (per-sample shape of
    ``v``) to ``h_{l-1}`` (per-sample shape ``h_shape``); ``u_shape`` is u_l's per-sample shape."""
    if isinstance(layer, LinearLayer):
        return phi(activation)(nnf.linear(v, weight, bias).reshape(v.shape[0], *h_shape))
    if layer.pool is not None:
        v = unpool(v, layer.pool[2], u_shape[1:])
    padding = []
    for size, out, k in zip(h_shape[1:], u_shape[1:], layer.weight.shape[2:]):
        base = (out - 1) * layer.stride - 2 * layer.padding + layer.dilation * (k - 1) + 1
        padding.append(size - base)
    mapped = nnf.conv_transpose2d(v, weight, bias, layer.stride, layer.padding, tuple(padding), 1, layer.dilation)
    return phi(activation)(mapped)


def conv_tp_targets(layers: Sequence[Layer], feedback_weights: Sequence[Tensor],
                    feedback_biases: Sequence[Tensor | None], feedback_activations: Sequence[str], x: Tensor,
                    target: Tensor, config: TPConfig) -> tuple[list[Tensor], list[Tensor]]:
    """Targets ``[ĥ_1 … ĥ_L]`` and activities ``[h_1 … h_{L-1}, f]``."""
    shapes = check_conv_net(layers, x)
    _check_feedback(layers, feedback_weights, feedback_biases, feedback_activations)
    us, hs = conv_forward(layers, x)
    activities = hs[1:] + [us[-1]]
    targets = [activities[-1] + config.beta * output_error(us[-1], target, config.loss)]
    for l in reversed(range(1, len(layers))):  # 0-based layer l maps back to layer l-1
        q, c, psi = feedback_weights[l - 1], feedback_biases[l - 1], feedback_activations[l - 1]
        h_shape = activities[l - 1].shape[1:]

        def g(v: Tensor) -> Tensor:
            return conv_feedback_map(layers[l], v, q, c, psi, shapes[l], h_shape)

        projected = g(targets[0])
        if config.difference:
            projected = activities[l - 1] + projected - g(activities[l])
        targets.insert(0, projected)
    return targets, activities


def conv_tp_train_step(layers: Sequence[Layer], feedback_weights: Sequence[Tensor],
                       feedback_biases: Sequence[Tensor | None], feedback_activations: Sequence[str] | None,
                       x: Tensor, target: Tensor, *, beta: float = 0.1, loss: str = "mse",
                       difference: bool = True) -> TPResult:
    """Targets, then each layer's local gradient (autograd of its local loss, batch mean).
    ``feedback_activations`` None means ψ_l = φ_{l-1}."""
    config = TPConfig(beta=beta, loss=loss, difference=difference)
    if feedback_activations is None:
        feedback_activations = conv_default_feedback_activations(layers)
    layers = _detached(layers)
    targets, activities = conv_tp_targets(layers, feedback_weights, feedback_biases, feedback_activations, x,
                                          target, config)
    batch = x.shape[0]
    inputs = [x] + activities[:-1]
    local_total = x.new_zeros(())
    with torch.enable_grad():
        copies, params = _with_grad(layers)
        for l, layer in enumerate(copies):
            u = layer_map(layer, inputs[l].detach())
            h = u if l == len(layers) - 1 else layer_output(layer, u)
            local = 0.5 * ((targets[l].detach() - h) ** 2).sum() / batch
            local_total = local_total + local
        grads = torch.autograd.grad(local_total, params)  # each layer's loss touches only its own W_l, b_l
    weight_grads, bias_grads = _split(layers, grads)
    return TPResult(
        targets=[t.detach() for t in targets],
        activities=[a.detach() for a in activities],
        weight_grads=weight_grads,
        bias_grads=bias_grads,
        loss=(loss_sum(activities[-1], target, loss) / batch).detach(),
        local_loss=local_total.detach(),
    )


def conv_feedback_grads(layers: Sequence[Layer], feedback_weights: Sequence[Tensor],
                        feedback_biases: Sequence[Tensor | None], feedback_activations: Sequence[str] | None,
                        x: Tensor, noise: Sequence[Tensor | None] | None = None) -> FeedbackResult:
    """Gradients of the noisy reconstruction losses ``½‖g_l(F_l(h_{l-1} + ξ)) − (h_{l-1} + ξ)‖²``
    (batch mean); ``noise[l-2]`` is ξ for layer l (h_{l-1}'s shape), or None."""
    if feedback_activations is None:
        feedback_activations = conv_default_feedback_activations(layers)
    layers = _detached(layers)
    shapes = check_conv_net(layers, x)
    _check_feedback(layers, feedback_weights, feedback_biases, feedback_activations)
    _, hs = conv_forward(layers, x)
    batch = x.shape[0]
    weight_grads, bias_grads = [], []
    total = x.new_zeros(())
    with torch.enable_grad():
        for l in range(1, len(layers)):
            q = feedback_weights[l - 1].detach().requires_grad_(True)
            c = feedback_biases[l - 1]
            c = None if c is None else c.detach().requires_grad_(True)
            xi = None if noise is None else noise[l - 1]
            h_in = hs[l].detach() if xi is None else hs[l].detach() + xi
            u = layer_map(layers[l], h_in)
            h_out = u if l == len(layers) - 1 else layer_output(layers[l], u)
            rec = conv_feedback_map(layers[l], h_out, q, c, feedback_activations[l - 1], shapes[l], h_in.shape[1:])
            value = 0.5 * ((rec - h_in) ** 2).sum() / batch
            grads = torch.autograd.grad(value, [q] + ([] if c is None else [c]))
            weight_grads.append(grads[0])
            bias_grads.append(None if c is None else grads[1])
            total = total + value.detach()
    return FeedbackResult(weight_grads, bias_grads, total)


# ------------------------------------------------------------------------------------------------
# Gauss–Newton targets, for comparisons (T1).

def conv_gnt_targets(layers: Sequence[Layer], x: Tensor, target: Tensor, *, beta: float = 1.0,
                     loss: str = "mse") -> list[Tensor]:
    """``[Δu_1 … Δu_L]``, per sample ``Δu_l = β J_l⁺ ε_L`` with ``J_l = ∂f/∂u_l`` (autograd, flattened)
    and ``ε_L = −∂ℓ/∂f``: ``pcfast.reference.gnt``'s definition on a conv net."""
    layers = _detached(layers)
    us, _ = conv_forward(layers, x)
    residual = output_error(us[-1], target, loss)
    deltas = []
    for l in range(len(layers)):
        def tail(u: Tensor, l: int = l) -> Tensor:  # u_l of one sample ↦ f of that sample
            out = u.unsqueeze(0)
            for k in range(l + 1, len(layers)):
                out = layer_map(layers[k], layer_output(layers[k - 1], out))
            return out[0]

        rows = []
        for b in range(x.shape[0]):
            jac = torch.autograd.functional.jacobian(tail, us[l][b]).reshape(residual.shape[1], -1)
            rows.append((beta * torch.linalg.pinv(jac) @ residual[b]).reshape(us[l].shape[1:]))
        deltas.append(torch.stack(rows))
    return deltas


def conv_gnt_train_step(layers: Sequence[Layer], x: Tensor, target: Tensor, *, beta: float = 1.0,
                        loss: str = "mse") -> GradResult:
    """Local gradients toward the Gauss–Newton targets ``u_l + Δu_l`` (``conv_gnt_targets``): those of
    ``½‖u_l − (u_l + Δu_l)‖²`` (batch mean) with the target held fixed, ``−Δu_l ⋆ h_{l-1} / B`` for a
    conv layer, ``−Δu_lᵀ flatten(h_{l-1}) / B`` for a linear one — ``pcfast.reference.gnt`` on a conv net."""
    deltas = conv_gnt_targets(layers, x, target, beta=beta, loss=loss)
    copies, params = _with_grad(layers)
    us, hs = conv_forward(_detached(layers), x)
    batch = x.shape[0]
    with torch.enable_grad():  # (optimizers step under no_grad)
        local = x.new_zeros(())
        for layer, h, d in zip(copies, hs, deltas):
            local = local - (layer_map(layer, h.detach()) * d).sum() / batch
        grads = torch.autograd.grad(local, params)
    weight_grads, bias_grads = _split(layers, grads)
    return GradResult(weight_grads, bias_grads, loss_sum(us[-1].detach(), target, loss) / batch)
