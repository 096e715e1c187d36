"""DESIGN §3 oracles O1–O5 for the PC implementations of every CPU backend (float64)."""
from __future__ import annotations

import pytest
import torch

from pcfast import functional as F
from pcfast import reference
from pcfast.testing import assert_all_close, assert_close
from tests.conftest import random_batch, random_mlp

BACKENDS = ["reference", "torch"]


def _cos(a, b):
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_o1_gradients_equal_autograd_of_energy(backend, loss):
    """O1: each Jacobi step is −(κ/γ_l) × autograd ∂F/∂z_l, and the weight gradients are autograd of F/B."""
    dims = (5, 7, 6, 3)
    weights, biases, acts = random_mlp(dims, activation=["tanh", "gelu"], scale=1.5)
    x, y = random_batch(dims, 4, loss)
    gammas, kappa = [0.7, 1.3, 0.9], 0.2
    out = F.pc_train_step(weights, biases, acts, x, y, precisions=gammas, inference_steps=4,
                          inference_lr=kappa, loss=loss, return_trajectory=True, backend=backend)
    for before, after in zip(out.trajectory[:-1], out.trajectory[1:]):
        zs = [z.clone().requires_grad_(True) for z in before]
        energy = reference.pc_energy(weights, biases, acts, x, y, zs, precisions=gammas, loss=loss)
        expected = torch.autograd.grad(energy, zs)
        implied = [(b - a) * (-g / kappa) for a, b, g in zip(before, after, gammas)]
        assert_all_close(implied, list(expected), atol=1e-10, rtol=1e-8, name="activity grad")
    ws = [w.clone().requires_grad_(True) for w in weights]
    bs = [b.clone().requires_grad_(True) for b in biases]
    energy = reference.pc_energy(ws, bs, acts, x, y, out.latents, precisions=gammas, loss=loss)
    expected = torch.autograd.grad(energy / x.shape[0], ws + bs)
    assert_all_close(out.weight_grads + out.bias_grads, list(expected), atol=1e-10, name="weight grad")
    assert_close(out.energy, energy.detach(), atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["tanh", "relu", "sigmoid", "gelu", "identity"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_o2_pc_equals_bp_under_fpa(backend, activation, loss):
    """O2: forward init + FPA + sequential + T = 1 + κ = 1 gives γ_L × the BP gradients exactly."""
    dims = (6, 9, 7, 5, 4)
    weights, biases, acts = random_mlp(dims, activation=activation, scale=1.3)
    x, y = random_batch(dims, 5, loss)
    gammas = [0.5, 2.0, 1.5, 0.3]
    pc = F.pc_train_step(weights, biases, acts, x, y, precisions=gammas, inference_steps=1, inference_lr=1.0,
                         schedule="sequential", fpa=True, loss=loss, backend=backend)
    bp = F.bp_train_step(weights, biases, acts, x, y, loss=loss)
    scaled = [gammas[-1] * g for g in bp.weight_grads + bp.bias_grads]
    assert_all_close(pc.weight_grads + pc.bias_grads, scaled, atol=1e-12, rtol=1e-10)


def test_o2_fails_with_inferred_presynaptic_activity():
    """The contrast DESIGN names: without FPA (φ(z) as presynaptic activity) O2 does not hold."""
    dims = (6, 9, 7, 4)
    weights, biases, acts = random_mlp(dims, scale=1.3)
    x, y = random_batch(dims, 5, "mse")
    pc = F.pc_train_step(weights, biases, acts, x, y, inference_steps=1, inference_lr=1.0,
                         schedule="sequential", fpa=False, backend="torch")
    bp = F.bp_train_step(weights, biases, acts, x, y)
    assert max(float((a - b).abs().max()) for a, b in zip(pc.weight_grads, bp.weight_grads)) > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_o3_linear_equilibrium(backend):
    """O3: linear φ at equilibrium, ε*_L = (I + C_γ)^{-1}(y − f_0), ε*_l = (γ_L/γ_l) ε*_L J_l."""
    dims = (4, 6, 5, 3)
    weights, biases, acts = random_mlp(dims, activation="identity")
    x, y = random_batch(dims, 3, "mse")
    gammas = [1.0, 2.0, 1.5]
    out = F.pc_train_step(weights, biases, acts, x, y, precisions=gammas, inference_steps=1500,
                          inference_lr=0.15, backend=backend)
    f0 = reference.forward(weights, biases, acts, x)[0][-1]
    jac = [weights[2] @ weights[1], weights[2]]  # J_1 = W_3 W_2, J_2 = W_3
    c_gamma = sum(gammas[-1] / gammas[i] * jac[i] @ jac[i].T for i in range(2))
    eps_top = torch.linalg.solve(torch.eye(3, dtype=x.dtype) + c_gamma, (y - f0).T).T
    assert_close(out.errors[-1], eps_top, atol=1e-10)
    for l in range(2):
        assert_close(out.errors[l], gammas[-1] / gammas[l] * eps_top @ jac[l], atol=1e-10)


def _equilibrium_grads(weights, biases, acts, x, y, gamma_top, backend, steps=600):
    return F.pc_train_step(weights, biases, acts, x, y, precisions=gamma_top, inference_steps=steps,
                           inference_lr=0.1, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_o4_small_output_precision_tends_to_bp(backend):
    """O4: PC gradients / γ_L → BP gradients as γ_L → 0, with an error linear in γ_L."""
    dims = (5, 8, 6, 3)
    weights, biases, acts = random_mlp(dims)
    x, y = random_batch(dims, 4, "mse")
    bp = F.bp_train_step(weights, biases, acts, x, y)
    ref = torch.cat([g.flatten() for g in bp.weight_grads])
    errors = []
    for gamma in (1e-1, 1e-2, 1e-3):
        pc = _equilibrium_grads(weights, biases, acts, x, y, gamma, backend)
        got = torch.cat([g.flatten() for g in pc.weight_grads]) / gamma
        errors.append(float((got - ref).norm() / ref.norm()))
    assert errors[2] < 1e-2
    for big, small in zip(errors[:-1], errors[1:]):
        assert 7.0 < big / small < 13.0, errors  # shrinks by ~10 per factor 10 in γ_L


@pytest.mark.parametrize("backend", BACKENDS)
def test_o5_large_c_gamma_aligns_with_gauss_newton(backend):
    """O5: as C_γ grows the hidden PC update turns from the GD direction to the Gauss–Newton target's."""
    dims = (5, 8, 3)
    weights, biases, acts = random_mlp(dims, activation="identity")
    x, y = random_batch(dims, 6, "mse")
    gd = F.bp_train_step(weights, biases, acts, x, y).weight_grads[:1]
    gnt = F.gnt_train_step(weights, biases, acts, x, y).weight_grads[:1]
    cos_gnt, cos_gd = [], []
    for gamma in (1e-2, 1.0, 100.0):
        kappa = 1.0 / (1.0 + gamma * float(torch.linalg.matrix_norm(weights[1], 2)) ** 2)
        pc = F.pc_train_step(weights, biases, acts, x, y, precisions=gamma, inference_steps=int(60 / kappa),
                             inference_lr=kappa, backend=backend)
        cos_gnt.append(_cos(pc.weight_grads[:1], gnt))
        cos_gd.append(_cos(pc.weight_grads[:1], gd))
    assert cos_gd[0] > 0.999 and cos_gd[0] > cos_gnt[0]
    assert cos_gnt[0] < cos_gnt[1] < cos_gnt[2]
    assert cos_gnt[2] > 0.999
