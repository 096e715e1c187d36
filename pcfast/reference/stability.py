"""How large the inference rate κ may be: power iteration on the activity Hessian of F (DESIGN §3,
"Divergence guard").

The Jacobi relaxation ``z ← z − κ Γ⁻¹ ∇F(z)`` (Γ = diag(γ_l)) linearised at a state z is
``δ ← (I − κ Γ⁻¹ H) δ`` with H = ∇²F(z); it is stable when κ < 2 / λ_max(Γ^{-1/2} H Γ^{-1/2}). One
layer alone (the others held) is stable when κ < 2γ_l / λ_max(H_ll), the diagonal block's. Both
come from power iteration with autograd Hessian–vector products, in float64. For a quadratic F
(identity activations, MSE) the first is the exact threshold of the Jacobi schedule; for others it
is the threshold of the dynamics linearised at that state (the sequential sweep tolerates more).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..types import Net, PCConfig
from .common import forward
from .pc import pc_energy


@dataclass(frozen=True)
class Stability:
    """``inference_lr``: the largest stable κ of the whole relaxation (``math.inf`` when F has no
    positive curvature there); ``layer_inference_lr[l]``: hidden layer l+1's alone."""

    inference_lr: float
    layer_inference_lr: tuple[float, ...]

    @property
    def limiting_layer(self) -> int:
        """The 0-based hidden layer with the smallest single-layer stable κ."""
        return min(range(len(self.layer_inference_lr)), key=self.layer_inference_lr.__getitem__)


def _largest_eigenvalue(apply, like: list[Tensor], iterations: int, seed: int) -> float:
    """The Rayleigh quotient of power iteration on the symmetric operator ``apply`` (lists of tensors)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    v = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device) for t in like]
    value = 0.0
    for _ in range(iterations):
        norm = math.sqrt(sum(float((t * t).sum()) for t in v))
        if norm == 0 or not math.isfinite(norm):
            return value
        v = [t / norm for t in v]
        w = apply(v)
        value = sum(float((a * b).sum()) for a, b in zip(v, w))
        v = w
    return value


def pc_stability(net: Net, x: Tensor, target: Tensor, config: PCConfig, *, iterations: int = 60,
                 seed: int = 0) -> Stability:
    """The largest stable inference rates at the feedforward state of ``(x, target)`` (see the module
    docstring); ``config`` gives the precisions and the loss."""
    as64 = lambda t: None if t is None else t.detach().to(torch.float64)
    weights, biases = [as64(w) for w in net.weights], [as64(b) for b in net.biases]
    x64 = as64(x)
    target64 = target if not target.is_floating_point() else as64(target)
    gammas = list(config.precisions)
    if net.is_conv:  # the same on the conv energy (``reference.conv``)
        from .conv import conv_forward, conv_pc_energy

        layers64 = Net(weights, biases, net.activations, geometry=net.geometry).layers()
        us, _ = conv_forward(layers64, x64)
        energy_of = lambda zs: conv_pc_energy(layers64, x64, target64, zs, precisions=gammas, loss=config.loss)
    else:
        us, _ = forward(weights, biases, net.activations, x64)
        energy_of = lambda zs: pc_energy(weights, biases, net.activations, x64, target64, zs, precisions=gammas,
                                         loss=config.loss)
    with torch.enable_grad():
        zs = [u.detach().clone().requires_grad_(True) for u in us[:-1]]
        energy = energy_of(zs)
        grads = torch.autograd.grad(energy, zs, create_graph=True)

        def hvp(v: list[Tensor]) -> list[Tensor]:
            dot = sum((g * t).sum() for g, t in zip(grads, v))
            return list(torch.autograd.grad(dot, zs, retain_graph=True))

        root = [math.sqrt(g) for g in gammas[:-1]]

        def whole(v):  # Γ^{-1/2} H Γ^{-1/2} v
            hv = hvp([t / r for t, r in zip(v, root)])
            return [t / r for t, r in zip(hv, root)]

        total = _largest_eigenvalue(whole, zs, iterations, seed)
        layers = []
        for l in range(len(zs)):
            def block(v, l=l):  # H_ll / γ_l on layer l's coordinates
                full = [v[0] if k == l else torch.zeros_like(z) for k, z in enumerate(zs)]
                return [hvp(full)[l] / gammas[l]]

            layers.append(_largest_eigenvalue(block, [zs[l]], iterations, seed + 1 + l))
    rate = lambda value: 2.0 / value if value > 0 else math.inf
    return Stability(rate(total), tuple(rate(v) for v in layers))
