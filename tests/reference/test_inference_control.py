"""Adaptive stopping, traces and the divergence check of the PC relaxation (DESIGN §3, "Inference
control") on every available backend, against ``pcfast.reference`` (float64, ≤ 1e-10).

Oracle: the reference's explicit loop — the steps it takes under ``inference_tol``, its trace
(``pc_energy_terms`` after every step, ‖∂F/∂z_l‖ of every update) and F before the last step. The
trace is also checked against autograd of F itself, and the stopping rule against its definition.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from pcfast import functional as F
from pcfast import reference
from pcfast.testing import assert_all_close, assert_close, make_batch, make_net

GAMMAS = [1.0, 1.6, 0.7]
CASES = list(itertools.product(["jacobi", "sequential"], [False, True], ["mse", "ce"]))


def _problem(device, loss, batch=5, dims=(6, 9, 7, 4)):
    weights, biases, acts = make_net(dims, activation=["tanh", "gelu"], scale=1.3, device=device)
    biases[1] = None  # a layer without bias
    x, y = make_batch(dims, batch, loss, device=device)
    return weights, biases, acts, x, y


def _run(backend, problem, **settings):
    weights, biases, acts, x, y = problem
    settings = {"precisions": GAMMAS, "inference_lr": 0.15, **settings}
    return F.pc_train_step(weights, biases, acts, x, y, backend=backend, **settings)


def _assert_trace_equal(actual, expected):
    for name in ("energy", "grad_norm"):
        a, e = getattr(actual, name), getattr(expected, name)
        assert a.shape == e.shape, name
        assert torch.equal(torch.isnan(a), torch.isnan(e)), f"trace.{name}: NaN rows differ"
        assert_close(torch.nan_to_num(a), torch.nan_to_num(e), name=f"trace.{name}")


@pytest.mark.parametrize("schedule,fpa,loss", CASES)
def test_adaptive_stopping_equals_reference(backend, device, small, schedule, fpa, loss):
    """Same steps taken, same latents, gradients, energy and trajectory as the reference."""
    problem = _problem(device, loss)
    steps = 12 if small else 40
    settings = dict(inference_steps=steps, schedule=schedule, fpa=fpa, loss=loss, inference_tol=0.05,
                    return_trajectory=True)
    out, ref = _run(backend, problem, **settings), _run("reference", problem, **settings)
    assert int(out.steps) == int(ref.steps)
    assert len(out.trajectory) == steps + 1
    for got, want in zip(out.trajectory, ref.trajectory):
        assert_all_close(got, want, name="trajectory")
    assert_all_close(out.latents, ref.latents, name="latents")
    assert_all_close(out.weight_grads + out.bias_grads, ref.weight_grads + ref.bias_grads, name="grads")
    assert_close(out.energy, ref.energy, name="energy")


@pytest.mark.parametrize("schedule,fpa", [("jacobi", False), ("jacobi", True), ("sequential", True)])
def test_adaptive_stopping_stops_before_the_cap(backend, device, schedule, fpa):
    """On a relaxation that converges, a loose tolerance stops early, a tight one takes more steps,
    and the stopping step is the first whose step norm is within tol of the largest so far."""
    problem = _problem(device, "mse")
    loose = _run("reference", problem, inference_steps=60, schedule=schedule, fpa=fpa, inference_tol=0.2,
                 return_trace=True)
    tight = _run(backend, problem, inference_steps=60, schedule=schedule, fpa=fpa, inference_tol=0.01)
    taken = int(loose.steps)
    assert 1 <= taken < int(tight.steps) <= 60
    # Definition: s_t = ‖Δz_t‖ = sqrt(Σ_l (κ/γ_l)² ‖∂F/∂z_l‖²).
    scale = torch.tensor([0.15 / g for g in GAMMAS[:-1]], dtype=torch.float64, device=device)
    sizes = (loose.trace.grad_norm[:taken] * scale).norm(dim=1)
    largest = torch.cummax(sizes, 0).values
    below = (sizes <= 0.2 * largest).tolist()
    assert below.index(True) == taken - 1


@pytest.mark.parametrize("schedule,fpa,loss", CASES)
def test_trace_equals_reference(backend, device, small, schedule, fpa, loss):
    """Per-step energies (per layer) and activity-gradient norms equal the reference's, with and
    without adaptive stopping (rows after the stop are NaN on both)."""
    problem = _problem(device, loss)
    steps = 4 if small else 9
    for tol in (None, 0.3):
        settings = dict(inference_steps=steps, schedule=schedule, fpa=fpa, loss=loss, return_trace=True,
                        inference_tol=tol)
        out, ref = _run(backend, problem, **settings), _run("reference", problem, **settings)
        _assert_trace_equal(out.trace, ref.trace)
        taken = steps if tol is None else int(ref.steps)
        assert_close(out.trace.energy[taken].sum(), out.energy, name="trace.energy[last].sum() = energy")


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_trace_is_autograd_of_the_energy(backend, device, loss):
    """Oracle: autograd. Jacobi without FPA: trace.energy[t] are F's terms at the trajectory's state
    t, and trace.grad_norm[t−1] the norms of autograd ∂F/∂z_l there."""
    weights, biases, acts, x, y = _problem(device, loss)
    out = _run(backend, (weights, biases, acts, x, y), inference_steps=3, loss=loss, return_trace=True,
               return_trajectory=True)
    for t, state in enumerate(out.trajectory):
        zs = [z.clone().requires_grad_(True) for z in state]
        terms = reference.pc_energy_terms(weights, biases, acts, x, y, zs, precisions=GAMMAS, loss=loss)
        assert_close(out.trace.energy[t], torch.stack(terms).detach(), name=f"energy terms at step {t}")
        if t < len(out.trajectory) - 1:
            grads = torch.autograd.grad(sum(terms), zs)
            norms = torch.stack([g.norm() for g in grads])
            assert_close(out.trace.grad_norm[t], norms, name=f"grad norms used by step {t + 1}")


@pytest.mark.parametrize("schedule,fpa", [("jacobi", False), ("sequential", False), ("jacobi", True)])
@pytest.mark.parametrize("steps", [0, 1, 5])
def test_energy_before_the_last_step_equals_reference(backend, device, schedule, fpa, steps):
    problem = _problem(device, "mse")
    settings = dict(inference_steps=steps, schedule=schedule, fpa=fpa, check_divergence=True)
    out, ref = _run(backend, problem, **settings), _run("reference", problem, **settings)
    assert_close(out.energy_prev, ref.energy_prev, name="energy_prev")
    assert_close(out.energy, ref.energy, name="energy")
    if steps:
        traced = _run("reference", problem, **settings, return_trace=True)
        assert_close(ref.energy_prev, traced.trace.energy[steps - 1].sum(), name="F_{T-1} from the trace")


def test_default_path_returns_no_extras(backend, device):
    out = _run(backend, _problem(device, "mse"), inference_steps=3)
    assert out.steps is None and out.trace is None and out.energy_prev is None


@pytest.mark.parametrize("bad,error", [(-0.1, ValueError), (1.0, ValueError), (math.nan, ValueError),
                                       ("0.1", TypeError), (True, TypeError)])
def test_inference_tol_is_checked(bad, error):
    problem = _problem("cpu", "mse")
    with pytest.raises(error, match="inference_tol"):
        _run("torch", problem, inference_steps=3, inference_tol=bad)
