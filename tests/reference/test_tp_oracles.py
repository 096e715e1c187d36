"""DESIGN §4 oracles T1–T3 for TP/DTP on every CPU backend (float64)."""
from __future__ import annotations

import pytest
import torch

from pcfast import functional as F
from pcfast.testing import assert_all_close, assert_close
from tests.conftest import random_batch, random_mlp

BACKENDS = ["reference", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_t1_dtp_with_exact_inverses_gives_gauss_newton_targets(backend, loss):
    """T1: linear φ = ψ = id and Q_l = W_l⁻¹ ⇒ DTP targets are h_l + the Gauss–Newton Δu_l."""
    dims = (6, 6, 6, 6)
    weights, biases, acts = random_mlp(dims, activation="identity", scale=1.0, seed=3)
    weights = [w + 2.0 * torch.eye(6, dtype=w.dtype) for w in weights]  # well conditioned
    qs = [torch.linalg.inv(w) for w in weights[1:]]
    cs = [-(b @ q.T) for b, q in zip(biases[1:], qs)]  # g_l inverts u = h Wᵀ + b exactly
    x, y = random_batch(dims, 5, loss)
    beta = 0.3
    out = F.tp_train_step(weights, biases, acts, qs, cs, ["identity"] * 2, x, y, beta=beta, loss=loss,
                          difference=True, backend=backend)
    from pcfast.reference import gnt_targets

    deltas = gnt_targets(weights, biases, acts, x, y if loss == "ce" else y, beta=beta, loss=loss)
    assert_all_close(out.targets, [h + d for h, d in zip(out.activities, deltas)], atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu"])
def test_t2_dtp_keeps_targets_that_are_already_met(backend, activation):
    """T2: ĥ_l = h_l (β = 0) ⇒ DTP gives ĥ_{l-1} = h_{l-1} for any feedback map; gradients vanish."""
    dims = (5, 7, 6, 4)
    weights, biases, acts = random_mlp(dims, activation=activation)
    gen = torch.Generator().manual_seed(9)
    qs = [torch.randn(dims[l - 1], dims[l], generator=gen, dtype=torch.float64) for l in range(2, 4)]
    cs = [torch.randn(dims[l - 1], generator=gen, dtype=torch.float64) for l in range(2, 4)]
    x, y = random_batch(dims, 3, "mse")
    out = F.tp_train_step(weights, biases, acts, qs, cs, ["sigmoid", "tanh"], x, y, beta=0.0,
                          difference=True, backend=backend)
    assert_all_close(out.targets, out.activities, atol=1e-12)
    assert all(float(g.abs().max()) < 1e-12 for g in out.weight_grads)
    tp = F.tp_train_step(weights, biases, acts, qs, cs, ["sigmoid", "tanh"], x, y, beta=0.0,
                         difference=False, backend=backend)
    assert float((tp.targets[0] - tp.activities[0]).abs().max()) > 1e-3  # plain TP does not


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_t3_feedback_training_converges_to_ridge(backend, bias):
    """T3: ψ = id, σ_fb = 0, weight decay μ: feedback SGD converges to the ridge solution with that μ."""
    dims = (4, 5, 6, 3)
    weights, biases, acts = random_mlp(dims, bias=bias)
    x, _ = random_batch(dims, 8, "mse")
    mu = 0.05
    gen = torch.Generator().manual_seed(4)
    qs = [0.1 * torch.randn(dims[l - 1], dims[l], generator=gen, dtype=torch.float64) for l in range(2, 4)]
    cs = [torch.zeros(dims[l - 1], dtype=torch.float64) if bias else None for l in range(2, 4)]
    psi = ["identity", "identity"]
    for _ in range(4000):
        g = F.feedback_grads(weights, biases, acts, qs, cs, psi, x, backend=backend)
        qs = [q - 0.3 * (gq + mu * q) for q, gq in zip(qs, g.weight_grads)]
        cs = [None if c is None else c - 0.3 * gc for c, gc in zip(cs, g.bias_grads)]
    ridge_q, ridge_c = F.ridge_feedback(weights, biases, acts, x, ridge=mu, bias=bias)
    assert_all_close(qs, ridge_q, atol=1e-9)
    if bias:
        assert_all_close(cs, ridge_c, atol=1e-9)
    # ... and the same iteration with a different μ lands elsewhere, so the check can fail.
    other, _ = F.ridge_feedback(weights, biases, acts, x, ridge=2 * mu, bias=bias)
    assert float((other[0] - qs[0]).abs().max()) > 1e-4
