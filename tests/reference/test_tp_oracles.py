"""DESIGN §4 oracles T1–T3 for TP/DTP on every available backend, through ``pcfast.functional`` (float64).

Each test takes the ``backend`` fixture (``tests/conftest.py``) and builds its tensors on that
backend's ``device`` (CUDA for compiled Triton). T3 trains the feedback weights for
thousands of steps; under the Triton interpreter (``small``) it trains with a stronger weight decay
and the optimal step size, which reach the ridge solution in 60 steps: the same assertions, the same
tolerances.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from pcfast import functional as F
from pcfast import reference
from pcfast.testing import assert_all_close, make_batch, make_feedback, make_net
from pcfast.types import Net


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_t1_dtp_with_exact_inverses_gives_gauss_newton_targets(backend, device, loss):
    """T1: linear φ = ψ = id and Q_l = W_l⁻¹ ⇒ DTP targets are h_l + the Gauss–Newton Δu_l."""
    dims = (6, 6, 6, 6)
    weights, biases, acts = make_net(dims, activation="identity", scale=1.0, seed=3, device=device)
    weights = [w + 2.0 * torch.eye(6, dtype=w.dtype, device=device) for w in weights]  # well conditioned
    qs = [torch.linalg.inv(w) for w in weights[1:]]
    cs = [-(b @ q.T) for b, q in zip(biases[1:], qs)]  # g_l inverts u = h Wᵀ + b exactly
    x, y = make_batch(dims, 5, loss, device=device)
    beta = 0.3
    out = F.tp_train_step(weights, biases, acts, qs, cs, ["identity"] * 2, x, y, beta=beta, loss=loss,
                          difference=True, backend=backend)
    deltas = reference.gnt_targets(Net(weights, biases, acts), x, y, beta=beta, loss=loss)
    assert_all_close(out.targets, [h + d for h, d in zip(out.activities, deltas)], name="targets")


@pytest.mark.parametrize("activation", ["tanh", "relu", "gelu"])
def test_t2_dtp_keeps_targets_that_are_already_met(backend, device, activation):
    """T2: ĥ_l = h_l (β = 0) ⇒ DTP gives ĥ_{l-1} = h_{l-1} for any feedback map; gradients vanish."""
    dims = (5, 7, 6, 4)
    weights, biases, acts = make_net(dims, activation=activation, device=device)
    qs, cs, psi = make_feedback(dims, activation=["sigmoid", "tanh"], seed=9, scale=2.0, bias_scale=1.0, device=device)
    x, y = make_batch(dims, 3, "mse", device=device)
    out = F.tp_train_step(weights, biases, acts, qs, cs, psi, x, y, beta=0.0, difference=True, backend=backend)
    # "Exactly": tighter than the float64 row of the table (1e-10, 1e-9).
    assert_all_close(out.targets, out.activities, atol=1e-12, name="targets")
    assert all(float(g.abs().max()) < 1e-12 for g in out.weight_grads)
    tp = F.tp_train_step(weights, biases, acts, qs, cs, psi, x, y, beta=0.0, difference=False, backend=backend)
    assert float((tp.targets[0] - tp.activities[0]).abs().max()) > 1e-3  # plain TP does not


@dataclass(frozen=True)
class FeedbackTraining:
    """T3's feedback SGD: weight decay μ, step size (None: the optimal one), number of steps."""

    weight_decay: float
    lr: float | None
    steps: int


# Full: μ = 0.05 at step 0.3 for 4000 steps. Small: μ = 0.5 conditions the ridge problem well enough
# that the optimal step reaches the solution to 1e-12 in 60 steps.
T3_TRAINING = {False: FeedbackTraining(0.05, 0.3, 4000), True: FeedbackTraining(0.5, None, 60)}


def _optimal_steps(weights, biases, acts, x, mu: float, bias: bool) -> list[float]:
    """Per feedback layer, 2/(λ_min + λ_max) of the reconstruction loss's Hessian ≈ [h, 1]ᵀ[h, 1]/B + μ,
    h the input of g_l (h_l, or the output f for l = L)."""
    us, hs = reference.forward(weights, biases, acts, x)
    steps = []
    for h in [*hs[2:], us[-1]]:
        a = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)], 1) if bias else h
        eigenvalues = torch.linalg.eigvalsh(a.T @ a / a.shape[0]) + mu
        steps.append(2.0 / float(eigenvalues[0] + eigenvalues[-1]))
    return steps


@pytest.mark.parametrize("bias", [True, False])
def test_t3_feedback_training_converges_to_ridge(backend, device, small, bias):
    """T3: ψ = id, σ_fb = 0, weight decay μ: feedback SGD converges to the ridge solution with that μ."""
    training = T3_TRAINING[small]
    dims = (4, 5, 6, 3)
    weights, biases, acts = make_net(dims, bias=bias, device=device)
    x, _ = make_batch(dims, 8, "mse", device=device)
    mu = training.weight_decay
    qs, cs, psi = make_feedback(dims, activation="identity", bias=bias, seed=4, scale=0.1, bias_scale=0.0,
                                device=device)
    if training.lr is None:
        lrs = _optimal_steps(weights, biases, acts, x, mu, bias)
    else:
        lrs = [training.lr] * len(qs)
    for _ in range(training.steps):
        g = F.feedback_grads(weights, biases, acts, qs, cs, psi, x, backend=backend)
        qs = [q - lr * (gq + mu * q) for q, gq, lr in zip(qs, g.weight_grads, lrs)]
        cs = [None if c is None else c - lr * gc for c, gc, lr in zip(cs, g.bias_grads, lrs)]
    ridge_q, ridge_c = F.ridge_feedback(weights, biases, acts, x, ridge=mu, bias=bias)
    assert_all_close(qs, ridge_q, name="feedback weights")
    if bias:
        assert_all_close(cs, ridge_c, name="feedback biases")
    # ... and the same iteration with a different μ lands elsewhere, so the check can fail.
    other, _ = F.ridge_feedback(weights, biases, acts, x, ridge=2 * mu, bias=bias)
    assert float((other[0] - qs[0]).abs().max()) > 1e-4
