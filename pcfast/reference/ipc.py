"""Incremental predictive coding (iPC), the specification.

iPC (Salvatori et al., "A stable, fast, and fully automatic learning algorithm for predictive coding
networks", ICLR 2024; first as "Incremental predictive coding") keeps PC's energy F (DESIGN §3) and
its relaxation, but does not wait for the latents to settle before learning: the weights take one
optimizer step at every inference step. Derived from incremental EM, its E step (latents) and M step
(weights) both descend F and are interleaved at every time step instead of alternated in blocks of T.

Ordering. The paper's algorithm lists, inside each time step t, the update of the value nodes and
then the update of the parameters, and describes the two as running in parallel, both from the state
at t: ``z_{t+1} = z_t − κ ∂F/∂z (z_t, θ_t)``, ``θ_{t+1} = θ_t − η ∂F/∂θ (z_t, θ_t)``. Here the weight
gradient is taken at the freshly relaxed latents instead::

    z_0 = feedforward latents under θ_0
    for t = 1 … T:
        z_t = z_{t-1} − (κ/γ_l) ∂F/∂z_l (z_{t-1}; θ_{t-1})      (Jacobi: every layer from z_{t-1})
        θ_t = update(θ_{t-1}, ∂(F/B)/∂θ (z_t; θ_{t-1}))

Two reasons: with forward initialisation every hidden error is zero at z_0, so the parallel
ordering's first weight step would move the readout alone, on its BP gradient; and with T = 1 this
ordering is exactly one PC step with T = 1 (relax once, then the local gradients at the relaxed
state), so iPC is PC with learning spread over the relaxation. For T steps the two orderings differ
only in the weights each gradient sees the latents against (θ_{t-1} at z_t here, θ_t at z_t there).

Everything is autograd of :func:`pcfast.reference.pc.pc_energy` through the PC reference's
``pc_activity_grads`` and ``pc_weight_grads``; it works in float64.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from torch import Tensor

from ..types import Net, PCConfig
from .common import forward, loss_sum
from .pc import pc_activity_grads, pc_energy, pc_weight_grads

Update = Callable[[list[Tensor], list[Tensor | None], list[Tensor], list[Tensor | None]],
                  tuple[Sequence[Tensor], Sequence[Tensor | None]]]


@dataclass(frozen=True)
class IPCTrajectory:
    """Every state of one iPC batch.

    ``latents[t]``, ``weights[t]``, ``biases[t]`` for t = 0 … T: z_t (t = 0: the feedforward
    pre-activations) and θ_t (t = 0: the weights the batch started from). ``energies[t − 1]`` for
    t = 1 … T: F(z_t; θ_{t−1}) summed over the batch, the energy whose weight gradient makes θ_t.
    ``loss``: the feedforward loss under θ_0, batch mean."""

    latents: list[list[Tensor]]
    weights: list[list[Tensor]]
    biases: list[list[Tensor | None]]
    energies: list[Tensor]
    loss: Tensor


def sgd(lr: float) -> Update:
    """The plain SGD update ``θ ← θ − lr · g`` out of place, as an ``update`` for :func:`ipc_trajectory`."""

    def update(weights, biases, weight_grads, bias_grads):
        return ([w - lr * g for w, g in zip(weights, weight_grads)],
                [None if b is None else b - lr * g for b, g in zip(biases, bias_grads)])

    return update


def ipc_trajectory(net: Net, x: Tensor, target: Tensor, config: PCConfig, update: Update) -> IPCTrajectory:
    """Run iPC on one batch for ``config.inference_steps`` steps; return every state.

    ``update(weights, biases, weight_grads, bias_grads) -> (weights, biases)`` is one optimizer step
    out of place (:func:`sgd` for plain SGD); it may keep its own state (momentum) between calls.
    The schedule must be ``"jacobi"`` and ``fpa`` False: FPA freezes predictions at their
    feedforward values, which weights that change at every step leave undefined.
    """
    if config.schedule != "jacobi":
        raise ValueError(f"schedule: iPC relaxes with the 'jacobi' schedule, got {config.schedule!r}")
    if config.fpa:
        raise ValueError("fpa: iPC changes the weights at every step, so there are no fixed feedforward predictions")
    gammas, rate, activations = list(config.precisions), config.inference_lr, net.activations
    weights = [w.detach() for w in net.weights]
    biases = [None if b is None else b.detach() for b in net.biases]
    us, _ = forward(weights, biases, activations, x)
    latents = [u.clone() for u in us[:-1]]
    loss = loss_sum(us[-1], target, config.loss) / x.shape[0]
    trajectory = IPCTrajectory([list(latents)], [list(weights)], [list(biases)], [], loss.detach())
    for _ in range(config.inference_steps):
        current = Net(weights, biases, activations)
        g = pc_activity_grads(current, x, target, latents, config)
        latents = [latents[l] - rate / gammas[l] * g[l] for l in range(len(latents))]
        energy = pc_energy(weights, biases, activations, x, target, latents, precisions=gammas, loss=config.loss)
        weight_grads, bias_grads = pc_weight_grads(current, x, target, latents, config)
        new_weights, new_biases = update(list(weights), list(biases), weight_grads, bias_grads)
        weights = [w.detach() for w in new_weights]
        biases = [None if b is None else b.detach() for b in new_biases]
        trajectory.latents.append(list(latents))
        trajectory.weights.append(list(weights))
        trajectory.biases.append(list(biases))
        trajectory.energies.append(energy.detach())
    return trajectory
