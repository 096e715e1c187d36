"""DESIGN §3 oracles O1–O5 for PC on every available backend, through ``pcfast.functional`` (float64).

Each test takes the ``backend`` fixture (``tests/conftest.py``) and builds its tensors on that
backend's ``device`` (CUDA for compiled Triton). The equilibrium oracles O3–O5 relax
for hundreds to thousands of inference steps; under the Triton interpreter (``small``) each relaxes
with a faster schedule or rate, or a better-conditioned problem, chosen so that it still reaches
the equilibrium: the same assertions, the same tolerances.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from pcfast import functional as F
from pcfast import reference
from pcfast.testing import assert_all_close, assert_close, make_batch, make_net

ACTIVATIONS = ["tanh", "relu", "sigmoid", "gelu", "identity"]


@dataclass(frozen=True)
class Relaxation:
    """How a test relaxes to equilibrium (and, for O3, the weight scale of its problem)."""

    schedule: str
    inference_lr: float
    inference_steps: int
    scale: float = 1.0


def _cos(a, b):
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_o1_gradients_equal_autograd_of_energy(backend, device, loss):
    """O1: each Jacobi step is −(κ/γ_l) × autograd ∂F/∂z_l, and the weight gradients are autograd of F/B."""
    dims = (5, 7, 6, 3)
    weights, biases, acts = make_net(dims, activation=["tanh", "gelu"], scale=1.5, device=device)
    x, y = make_batch(dims, 4, loss, device=device)
    gammas, kappa = [0.7, 1.3, 0.9], 0.2
    out = F.pc_train_step(weights, biases, acts, x, y, precisions=gammas, inference_steps=4,
                          inference_lr=kappa, loss=loss, return_trajectory=True, backend=backend)
    assert len(out.trajectory) == 5
    for before, after in zip(out.trajectory[:-1], out.trajectory[1:]):
        zs = [z.clone().requires_grad_(True) for z in before]
        energy = reference.pc_energy(weights, biases, acts, x, y, zs, precisions=gammas, loss=loss)
        expected = torch.autograd.grad(energy, zs)
        implied = [(b - a) * (-g / kappa) for a, b, g in zip(before, after, gammas)]
        assert_all_close(implied, list(expected), name="activity grad")
    ws = [w.clone().requires_grad_(True) for w in weights]
    bs = [b.clone().requires_grad_(True) for b in biases]
    energy = reference.pc_energy(ws, bs, acts, x, y, out.latents, precisions=gammas, loss=loss)
    expected = torch.autograd.grad(energy / x.shape[0], ws + bs)
    assert_all_close(out.weight_grads + out.bias_grads, list(expected), name="weight grad")
    assert_close(out.energy, energy.detach(), name="energy")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_o2_pc_equals_bp_under_fpa(backend, device, activation, loss):
    """O2: forward init + FPA + sequential + T = 1 + κ = 1 gives γ_L × the BP gradients exactly."""
    dims = (6, 9, 7, 5, 4)
    weights, biases, acts = make_net(dims, activation=activation, scale=1.3, device=device)
    x, y = make_batch(dims, 5, loss, device=device)
    gammas = [0.5, 2.0, 1.5, 0.3]
    pc = F.pc_train_step(weights, biases, acts, x, y, precisions=gammas, inference_steps=1, inference_lr=1.0,
                         schedule="sequential", fpa=True, loss=loss, backend=backend)
    bp = F.bp_train_step(weights, biases, acts, x, y, loss=loss)
    scaled = [gammas[-1] * g for g in bp.weight_grads + bp.bias_grads]
    # "Exactly": tighter than the float64 row of the table (1e-10, 1e-9).
    assert_all_close(pc.weight_grads + pc.bias_grads, scaled, atol=1e-12, rtol=1e-10)


def test_o2_fails_with_inferred_presynaptic_activity(backend, device):
    """The contrast DESIGN names: without FPA (φ(z) as presynaptic activity) O2 does not hold."""
    dims = (6, 9, 7, 4)
    weights, biases, acts = make_net(dims, scale=1.3, device=device)
    x, y = make_batch(dims, 5, "mse", device=device)
    pc = F.pc_train_step(weights, biases, acts, x, y, inference_steps=1, inference_lr=1.0,
                         schedule="sequential", fpa=False, backend=backend)
    bp = F.bp_train_step(weights, biases, acts, x, y)
    assert max(float((a - b).abs().max()) for a, b in zip(pc.weight_grads, bp.weight_grads)) > 1e-3


# Jacobi at κ = 0.15 on weights of scale 1 needs ~1500 steps; at scale 0.5 (C_γ still moves ε*_L by
# 0.6 from y − f_0) κ = 0.7 reaches the equilibrium to 1e-15 in 100.
O3_RELAXATION = {False: Relaxation("jacobi", 0.15, 1500), True: Relaxation("jacobi", 0.7, 100, scale=0.5)}


def test_o3_linear_equilibrium(backend, device, small):
    """O3: linear φ at equilibrium, ε*_L = (I + C_γ)^{-1}(y − f_0), ε*_l = (γ_L/γ_l) ε*_L J_l."""
    relax = O3_RELAXATION[small]
    dims = (4, 6, 5, 3)
    weights, biases, acts = make_net(dims, activation="identity", scale=relax.scale, device=device)
    x, y = make_batch(dims, 3, "mse", device=device)
    gammas = [1.0, 2.0, 1.5]
    out = F.pc_train_step(weights, biases, acts, x, y, precisions=gammas, inference_steps=relax.inference_steps,
                          inference_lr=relax.inference_lr, schedule=relax.schedule, backend=backend)
    f0 = reference.forward(weights, biases, acts, x)[0][-1]
    jac = [weights[2] @ weights[1], weights[2]]  # J_1 = W_3 W_2, J_2 = W_3
    c_gamma = sum(gammas[-1] / gammas[i] * jac[i] @ jac[i].T for i in range(2))
    eps_top = torch.linalg.solve(torch.eye(3, dtype=x.dtype, device=device) + c_gamma, (y - f0).T).T
    assert float((eps_top - (y - f0)).abs().max()) > 0.1  # C_γ matters: the check can fail
    assert_close(out.errors[-1], eps_top, name="output error")
    for l in range(2):
        assert_close(out.errors[l], gammas[-1] / gammas[l] * eps_top @ jac[l], name=f"errors[{l}]")


# The sequential sweep reaches the same equilibrium in 20 steps at κ = 0.9 (the gradients agree with
# 600 Jacobi steps to 1e-8 relative, far below the γ_L-linear error measured here).
O4_RELAXATION = {False: Relaxation("jacobi", 0.1, 600), True: Relaxation("sequential", 0.9, 20)}


def test_o4_small_output_precision_tends_to_bp(backend, device, small):
    """O4: PC gradients / γ_L → BP gradients as γ_L → 0, with an error linear in γ_L."""
    relax = O4_RELAXATION[small]
    dims = (5, 8, 6, 3)
    weights, biases, acts = make_net(dims, device=device)
    x, y = make_batch(dims, 4, "mse", device=device)
    bp = F.bp_train_step(weights, biases, acts, x, y)
    ref = torch.cat([g.flatten() for g in bp.weight_grads])
    errors = []
    for gamma in (1e-1, 1e-2, 1e-3):
        pc = F.pc_train_step(weights, biases, acts, x, y, precisions=gamma, inference_steps=relax.inference_steps,
                             inference_lr=relax.inference_lr, schedule=relax.schedule, backend=backend)
        got = torch.cat([g.flatten() for g in pc.weight_grads]) / gamma
        errors.append(float((got - ref).norm() / ref.norm()))
    assert errors[2] < 1e-2
    for big, small_error in zip(errors[:-1], errors[1:]):
        assert 7.0 < big / small_error < 13.0, errors  # shrinks by ~10 per factor 10 in γ_L


def _o5_rate_and_steps(gamma: float, w_out: torch.Tensor, small: bool) -> tuple[float, int]:
    """κ and T for one hidden linear layer. The latent's Hessian (in units of γ_1 = 1) is
    I + γ W_2ᵀW_2; from the forward state the relaxation only moves z_1 within the row space of W_2,
    where its eigenvalues are 1 + γ σ_i². Full: κ = 1/(1 + γ σ_max²) for 60/κ steps. Small: the
    optimal rate over that subspace, κ = 2/(2 + γ(σ_max² + σ_min²)), for 40 steps."""
    s = torch.linalg.svdvals(w_out)
    top, bottom = float(s[0]) ** 2, float(s[-1]) ** 2
    if small:
        return 2.0 / (2.0 + gamma * (top + bottom)), 40
    kappa = 1.0 / (1.0 + gamma * top)
    return kappa, int(60 / kappa)


def test_o5_large_c_gamma_aligns_with_gauss_newton(backend, device, small):
    """O5: as C_γ grows the hidden PC update turns from the GD direction to the Gauss–Newton target's."""
    dims = (5, 8, 3)
    weights, biases, acts = make_net(dims, activation="identity", device=device)
    x, y = make_batch(dims, 6, "mse", device=device)
    gd = F.bp_train_step(weights, biases, acts, x, y).weight_grads[:1]
    gnt = F.gnt_train_step(weights, biases, acts, x, y).weight_grads[:1]
    cos_gnt, cos_gd = [], []
    for gamma in (1e-2, 1.0, 100.0):
        kappa, steps = _o5_rate_and_steps(gamma, weights[1], small)
        pc = F.pc_train_step(weights, biases, acts, x, y, precisions=gamma, inference_steps=steps,
                             inference_lr=kappa, backend=backend)
        cos_gnt.append(_cos(pc.weight_grads[:1], gnt))
        cos_gd.append(_cos(pc.weight_grads[:1], gd))
    assert cos_gd[0] > 0.999 and cos_gd[0] > cos_gnt[0]
    assert cos_gnt[0] < cos_gnt[1] < cos_gnt[2]
    assert cos_gnt[2] > 0.999
