"""Predictive coding, the specification (DESIGN §3).

Latents ``z_1 … z_{L-1}`` live in pre-activation space; ``φ(z_0) := x``. The energy, summed over
the batch, is

    F(z) = Σ_{l<L} γ_l/2 · ‖z_l − φ(z_{l-1}) W_lᵀ − b_l‖² + γ_L · ℓ(φ(z_{L-1}) W_Lᵀ + b_L, y).

Activity gradients come from autograd on F, the relaxation is an explicit loop over steps (and
layers, for the sequential schedule), and weight gradients are autograd of F / B at the final state.
Under the fixed-prediction assumption (FPA) predictions and φ' stay at their feedforward values, so
the dynamics are no longer the gradient of an energy: there the activity gradient is written out.
Everything works in float64.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from ..activations import phi, phi_grad
from ..network import resolve_precisions
from ..results import PCResult, PCTrace
from ..types import Net, PCConfig, config_of, takes_settings
from .common import forward, linear, loss_sum, output_error


def _presynaptic(activations: Sequence[str], x: Tensor, latents: Sequence[Tensor]) -> list[Tensor]:
    """``[x, φ(z_1), …, φ(z_{L-1})]``."""
    return [x] + [phi(act)(z) for act, z in zip(activations, latents)]


def _fpa_presynaptic(weights, biases, activations, x) -> tuple[list[Tensor], list[Tensor]]:
    """Feedforward pre-activations and presynaptic activities, detached: FPA's frozen values."""
    us, hs = forward(weights, biases, activations, x)
    return [u.detach() for u in us], [h.detach() for h in hs]


def pc_energy(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    x: Tensor,
    target: Tensor,
    latents: Sequence[Tensor],
    *,
    precisions: Sequence[float] | float | None = None,
    loss: str = "mse",
    fpa: bool = False,
) -> Tensor:
    """F(z), summed over the batch. With ``fpa`` each prediction uses the feedforward φ(u_{l-1})."""
    terms = pc_energy_terms(weights, biases, activations, x, target, latents, precisions=precisions, loss=loss,
                            fpa=fpa)
    energy = x.new_zeros(())
    for term in terms:
        energy = energy + term
    return energy


def pc_energy_terms(weights, biases, activations, x, target, latents, *, precisions=None, loss="mse",
                    fpa=False) -> list[Tensor]:
    """F's term of each layer, summed over the batch: γ_l/2 ‖ε_l‖² for l < L, γ_L Σ ℓ(f, y)."""
    gammas = resolve_precisions(precisions, len(weights))
    if fpa:
        _, pre = _fpa_presynaptic(weights, biases, activations, x)
    else:
        pre = _presynaptic(activations, x, latents)
    terms = []
    for l in range(len(weights) - 1):
        eps = latents[l] - linear(pre[l], weights[l], biases[l])
        terms.append(0.5 * gammas[l] * (eps**2).sum())
    f = linear(pre[-1], weights[-1], biases[-1])
    return terms + [gammas[-1] * loss_sum(f, target, loss)]


def pc_errors(net: Net, x: Tensor, target: Tensor, latents: Sequence[Tensor], config: PCConfig) -> list[Tensor]:
    """``[ε_1 … ε_L]``: ``ε_l = z_l − prediction_l`` for l < L, ``ε_L = −∂ℓ/∂f``."""
    weights, biases, activations = net.weights, net.biases, net.activations
    loss, fpa = config.loss, config.fpa
    if fpa:
        us, pre = _fpa_presynaptic(weights, biases, activations, x)
    else:
        pre = _presynaptic(activations, x, latents)
    errors = [latents[l] - linear(pre[l], weights[l], biases[l]) for l in range(len(weights) - 1)]
    f = us[-1] if fpa else linear(pre[-1], weights[-1], biases[-1])
    return errors + [output_error(f, target, loss)]


def pc_activity_grads(net: Net, x: Tensor, target: Tensor, latents: Sequence[Tensor],
                      config: PCConfig) -> list[Tensor]:
    """``[∂F/∂z_1 … ∂F/∂z_{L-1}]``.

    Without FPA: autograd of :func:`pc_energy`. With FPA:
    ``γ_l ε_l − γ_{l+1} φ'(u_l) ⊙ (ε_{l+1} W_{l+1})`` with frozen predictions and φ'.
    """
    weights, biases, activations = net.weights, net.biases, net.activations
    gammas, loss, fpa = list(config.precisions), config.loss, config.fpa
    if fpa:
        us, _ = _fpa_presynaptic(weights, biases, activations, x)
        errors = pc_errors(net, x, target, latents, config)
        return [
            gammas[l] * errors[l]
            - gammas[l + 1] * phi_grad(activations[l])(us[l]) * (errors[l + 1] @ weights[l + 1])
            for l in range(len(weights) - 1)
        ]
    with torch.enable_grad():
        zs = [z.detach().requires_grad_(True) for z in latents]
        energy = pc_energy(weights, biases, activations, x, target, zs, precisions=gammas, loss=loss)
        return list(torch.autograd.grad(energy, zs)) if zs else []


class Stopping:
    """Adaptive stopping (DESIGN §3): after step t, with s_t = ‖Δz_t‖ (every layer's change in that
    step, Frobenius), stop when s_t ≤ ``tol`` · max_{τ≤t} s_τ. Fed the squared norms of one step."""

    def __init__(self, tol: float | None) -> None:
        self.tol, self.largest = tol, 0.0

    def done(self, squares: Sequence[float]) -> bool:
        size = math.sqrt(sum(squares))
        self.largest = max(self.largest, size)
        return self.tol is not None and size <= self.tol * self.largest


def pc_relax(net: Net, x: Tensor, target: Tensor, config: PCConfig) -> tuple[list[Tensor], list[list[Tensor]] | None]:
    """Relax the latents from their feedforward values; return them (and every step's, if asked).

    Each update is ``z_l ← z_l − (κ/γ_l) ∂F/∂z_l`` with κ = ``inference_lr``. ``jacobi`` updates
    all layers from the same state; ``sequential`` sweeps l = L−1 … 1, each from the freshest state.
    """
    latents, trajectory, _, _, _ = pc_relax_traced(net, x, target, config)
    return latents, trajectory


def pc_relax_traced(net: Net, x: Tensor, target: Tensor, config: PCConfig):
    """:func:`pc_relax` with adaptive stopping and the trace: (latents, trajectory, steps taken,
    ``PCTrace`` or None, F before the last step or None). After a stop the trajectory repeats the
    final state and the trace's rows are NaN; see ``PCResult.energy_prev`` for the last."""
    gammas, activations = list(config.precisions), net.activations
    weights = [w.detach() for w in net.weights]
    biases = [None if b is None else b.detach() for b in net.biases]
    us, _ = forward(weights, biases, activations, x)
    detached = Net(weights, biases, activations)

    def grads(latents: Sequence[Tensor]) -> list[Tensor]:
        return pc_activity_grads(detached, x, target, latents, config)

    def terms(latents: Sequence[Tensor]) -> list[Tensor]:
        return pc_energy_terms(weights, biases, activations, x, target, latents, precisions=gammas,
                               loss=config.loss, fpa=config.fpa)

    return relax_latents([u.clone() for u in us[:-1]], grads, terms, config, like=x)


def relax_latents(latents: list[Tensor], grads, terms, config: PCConfig, like: Tensor):
    """The relaxation loop of any PC network, with ``config``'s inference control (DESIGN §3):
    ``grads(latents)`` gives ``[∂F/∂z_1 … ∂F/∂z_{L-1}]``, ``terms(latents)`` F's term of each layer.
    Returns (latents, trajectory or None, steps taken, ``PCTrace`` or None, F before the last step
    or None), as :func:`pc_relax_traced` (``like``: the trace's dtype and device)."""
    gammas, rate = list(config.precisions), config.inference_lr
    trajectory = [[z.clone() for z in latents]] if config.return_trajectory else None
    hidden, steps = len(latents), config.inference_steps
    trace = None
    if config.return_trace:
        depth = hidden + 1
        trace = PCTrace(energy=torch.full((steps + 1, depth), math.nan, dtype=like.dtype, device=like.device),
                        grad_norm=torch.full((steps, hidden), math.nan, dtype=like.dtype, device=like.device))

    def record_energy(t: int) -> None:
        if trace is not None:
            trace.energy[t] = torch.stack(terms(latents))

    def energy_now() -> Tensor:
        return torch.stack(terms(latents)).sum()

    record_energy(0)
    stopping, taken, energy_prev = Stopping(config.inference_tol), steps, None
    measures = trace is not None or config.inference_tol is not None  # every step's ‖∂F/∂z_l‖
    norm = lambda g: float(torch.linalg.vector_norm(g)) if measures else 0.0
    for t in range(steps):
        if config.check_divergence and t == steps - 1:
            energy_prev = energy_now()
        norms = [0.0] * hidden
        if config.schedule == "jacobi":
            g = grads(latents)
            latents = [latents[l] - rate / gammas[l] * g[l] for l in range(hidden)]
            norms = [norm(g[l]) for l in range(hidden)]
        else:  # "sequential" (PCConfig checked the name)
            for l in reversed(range(hidden)):
                g = grads(latents)
                latents[l] = latents[l] - rate / gammas[l] * g[l]
                norms[l] = norm(g[l])
        if trace is not None and hidden:
            trace.grad_norm[t] = torch.tensor(norms, dtype=like.dtype)
        record_energy(t + 1)
        if trajectory is not None:
            trajectory.append([z.clone() for z in latents])
        if measures and stopping.done([(rate / gammas[l] * norms[l]) ** 2 for l in range(hidden)]):
            taken = t + 1
            break
    if trajectory is not None:
        trajectory += [[z.clone() for z in latents] for _ in range(steps - taken)]
    if config.check_divergence and (energy_prev is None or taken < steps):
        energy_prev = energy_now()
    return latents, trajectory, taken, trace, energy_prev


def pc_weight_grads(net: Net, x: Tensor, target: Tensor, latents: Sequence[Tensor],
                    config: PCConfig) -> tuple[list[Tensor], list[Tensor | None]]:
    """``∂(F/B)/∂W_l`` and ``∂(F/B)/∂b_l`` at the given latents: ``−γ_l ε_lᵀ φ(z_{l-1}) / B``.

    With FPA the presynaptic activity is the feedforward ``φ(u_{l-1})``.
    """
    weights, biases, activations = net.weights, net.biases, net.activations
    precisions, loss, fpa = list(config.precisions), config.loss, config.fpa
    with torch.enable_grad():
        ws = [w.detach().requires_grad_(True) for w in weights]
        bs = [None if b is None else b.detach().requires_grad_(True) for b in biases]
        zs = [z.detach() for z in latents]
        energy = pc_energy(ws, bs, activations, x, target, zs, precisions=precisions, loss=loss, fpa=fpa)
        params = ws + [b for b in bs if b is not None]
        grads = list(torch.autograd.grad(energy / x.shape[0], params))
    weight_grads = grads[: len(ws)]
    rest = iter(grads[len(ws) :])
    bias_grads = [None if b is None else next(rest) for b in bs]
    return weight_grads, bias_grads


@takes_settings(PCConfig, "weights", "biases", "activations", "x", "target")
def pc_train_step(weights: Sequence[Tensor], biases: Sequence[Tensor | None], activations: Sequence[str], x: Tensor,
                  target: Tensor, **settings: Any) -> PCResult:
    """Relaxation, then local weight gradients at the final state (DESIGN §3); the settings are
    ``PCConfig``'s (``precisions`` as ``pcfast.functional`` takes them)."""
    config = config_of(PCConfig, settings, depth=len(weights), where="pc_train_step")
    gammas, loss, fpa = list(config.precisions), config.loss, config.fpa
    latents, trajectory, taken, trace, energy_prev = pc_relax_traced(Net(weights, biases, activations), x, target, config)
    weights = [w.detach() for w in weights]
    biases = [None if b is None else b.detach() for b in biases]
    net = Net(weights, biases, activations)
    weight_grads, bias_grads = pc_weight_grads(net, x, target, latents, config)
    errors = pc_errors(net, x, target, latents, config)
    energy = pc_energy(weights, biases, activations, x, target, latents, precisions=gammas, loss=loss, fpa=fpa)
    f0 = forward(weights, biases, activations, x)[0][-1]
    return PCResult(
        latents=latents,
        errors=errors,
        weight_grads=weight_grads,
        bias_grads=bias_grads,
        energy=energy.detach(),
        loss=(loss_sum(f0, target, loss) / x.shape[0]).detach(),
        trajectory=trajectory,
        steps=None if config.inference_tol is None else torch.tensor(taken, device=x.device),
        trace=trace,
        energy_prev=None if energy_prev is None else energy_prev.detach(),
    )
