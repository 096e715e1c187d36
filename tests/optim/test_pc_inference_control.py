"""``pcfast.optim.PC``'s inference control: adaptive stopping (``inference_tol``), the trace, and the
divergence guard with its estimate of the largest stable inference rate (DESIGN §3).

Oracles: a PC step that stops adaptively after t steps equals a PC step with a fixed T = t; a
forced divergence leaves the model and the optimizer exactly as they were (their copies); the
estimated stable rate is compared with the threshold measured by bisection on the guard itself."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pcfast
from pcfast.errors import DivergenceError
from pcfast.optim import IPC, PC
from pcfast.reference.stability import pc_stability
from pcfast.types import Net, PCConfig

BACKENDS = ["torch", "cpp", "reference"]


def _model(stiff: int | None = None, factor: float = 4.0, seed: int = 0, activation=nn.Tanh) -> nn.Sequential:
    """6-12-12-4 MLP in float64; ``stiff`` (1 or 2): W_{stiff+1} scaled by ``factor``, so that
    hidden layer ``stiff``'s activity curvature γ_{l+1} ‖W_{l+1}‖² dominates."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 12), activation(), nn.Linear(12, 12), activation(), nn.Linear(12, 4)).double()
    if stiff is not None:
        with torch.no_grad():
            model[2 * stiff].weight.mul_(factor)
    return model


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64)


def _everything(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            copy.deepcopy(opt.state_dict()))


def _assert_unchanged(before, after):
    for a, b in zip(before[0] + [g for g in before[1] if g is not None],
                    after[0] + [g for g in after[1] if g is not None]):
        assert torch.equal(a, b)
    assert [g is None for g in before[1]] == [g is None for g in after[1]]
    assert str(before[2]) == str(after[2])


RULES = ["sgd", "adam", "compute_gradients"]


@pytest.mark.parametrize("stiff", [1, 2])
@pytest.mark.parametrize("backend,rule", [(b, r) for b in BACKENDS for r in RULES] + [pytest.param(
    "triton", "sgd", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors: the Triton interpreter"))])
def test_a_diverging_relaxation_is_caught_before_anything_changes(backend, stiff, rule):
    """Oracle: copies of the parameters, .grad and the optimizer's state_dict from before the step.
    Identity activations: nothing saturates, so the unstable mode grows until the last step."""
    model = _model(stiff, activation=nn.Identity)
    kwargs = dict(optimizer=torch.optim.Adam) if rule == "adam" else dict(momentum=0.9)
    opt = PC(model, None, lr=1e-3, inference_lr=0.6, inference_steps=40, backend=backend, **kwargs)
    x, y = _batch()
    safe = PC(copy.deepcopy(model), None, lr=0.05, inference_lr=0.6, inference_steps=40, backend=backend,
              check_divergence=False, **kwargs)
    safe.step(x, y)  # without the guard the step goes through: the energy rose but stayed finite
    for group in opt.param_groups:  # a step that does not diverge (a stable rate): state to keep
        group["inference_lr"] = 0.05
    opt.step(x, y)
    for group in opt.param_groups:
        group["inference_lr"] = 0.6
    before = _everything(model, opt)
    with pytest.raises(DivergenceError, match=f"hidden layer {stiff} ") as caught:
        if rule == "compute_gradients":
            opt.compute_gradients(x, y)
        else:
            opt.step(x, y)
    _assert_unchanged(before, _everything(model, opt))
    error = caught.value
    assert error.layer == stiff and 1 <= error.step <= 40
    assert f"inference step {error.step} of 40" in str(error)
    assert 0 < error.stable_inference_lr < 0.6


@pytest.mark.parametrize("activation,rate", [(nn.ReLU, 0.3), (nn.Tanh, 0.6)])
def test_the_named_step_is_the_first_whose_energy_rose(activation, rate):
    """Oracle: the reference's trace. With tanh the latents saturate and the energy ends below its
    start and falling, which the last-step check cannot see; with the trace every step is checked."""
    model = _model(2, activation=activation)
    x, y = _batch()
    if activation is nn.Tanh:
        PC(copy.deepcopy(model), None, lr=0.05, inference_lr=rate, inference_steps=40, backend="torch").step(x, y)
    opt = PC(model, None, lr=0.05, inference_lr=rate, inference_steps=40, backend="torch", trace=True)
    with pytest.raises(DivergenceError) as caught:
        opt.step(x, y)
    name = "relu" if activation is nn.ReLU else "tanh"
    trace = pcfast.functional.pc_train_step(
        [m.weight for m in model[::2]], [m.bias for m in model[::2]], [name, name], x, y, inference_steps=40,
        inference_lr=rate, return_trace=True, backend="reference").trace
    energy = trace.energy.sum(1)
    rose = (energy[1:] > energy[:-1]).tolist()
    assert caught.value.step == rose.index(True) + 1 and caught.value.layer == 2


@pytest.mark.parametrize("activation", [nn.Identity, nn.Tanh, nn.ReLU])
def test_the_estimated_stable_rate_is_within_2x_of_the_measured_threshold(activation):
    """Oracle: the threshold measured by bisection on κ with the guard itself (T = 200). (For identity
    activations the estimate is exact: the closed-form test below.)"""
    within = 2.0
    model = _model(1, factor=3.0, activation=activation)
    x, y = _batch()

    def raises(rate):
        opt = PC(copy.deepcopy(model), None, lr=0.05, inference_lr=rate, inference_steps=200, backend="torch")
        try:
            opt.step(x, y)
        except DivergenceError as error:
            return error
        return None

    low, high, estimate = 1e-3, 4.0, None
    assert raises(low) is None and raises(high) is not None
    for _ in range(14):
        middle = (low * high) ** 0.5
        error = raises(middle)
        if error is None:
            low = middle
        else:
            high, estimate = middle, error.stable_inference_lr
    measured = (low * high) ** 0.5
    assert 1 / within <= estimate / measured <= within, (estimate, measured)


def test_stability_of_a_linear_network_is_the_exact_jacobi_threshold():
    """Oracle: 2 / λ_max(Γ^{-1/2} H Γ^{-1/2}) with H built in closed form for identity activations."""
    model = _model(2, factor=2.0)
    weights = [m.weight.detach() for m in model[::2]]
    x, y = _batch()
    gammas = [0.5, 2.0, 1.0]
    w2, w3 = weights[1], weights[2]
    i1, i2 = torch.eye(12, dtype=torch.float64), torch.eye(12, dtype=torch.float64)
    h = torch.cat([torch.cat([gammas[0] * i1 + gammas[1] * w2.T @ w2, -gammas[1] * w2.T], 1),
                   torch.cat([-gammas[1] * w2, gammas[1] * i2 + gammas[2] * w3.T @ w3], 1)])
    root = torch.cat([torch.full((12,), gammas[0]), torch.full((12,), gammas[1])]).double().rsqrt()
    exact = 2 / float(torch.linalg.eigvalsh(root[:, None] * h * root[None, :]).max())
    stability = pc_stability(Net(weights, [m.bias.detach() for m in model[::2]], ["identity", "identity"]), x, y,
                             PCConfig(tuple(gammas)), iterations=400)
    assert stability.inference_lr == pytest.approx(exact, rel=1e-6)
    blocks = [h[:12, :12] / gammas[0], h[12:, 12:] / gammas[1]]
    for rate, block in zip(stability.layer_inference_lr, blocks):
        assert rate == pytest.approx(2 / float(torch.linalg.eigvalsh(block).max()), rel=1e-6)


def test_no_guard_under_fpa_or_when_switched_off():
    x, y = _batch()
    for kwargs in (dict(fpa=True), dict(check_divergence=False)):
        opt = PC(_model(1, activation=nn.Identity), None, lr=1e-3, inference_lr=0.6, inference_steps=40,
                 backend="torch", **kwargs)
        assert set(opt.step(x, y)) == {"loss", "energy"}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
def test_adaptive_stopping_equals_pc_with_the_steps_it_took(backend, schedule):
    """Oracle: PC with a fixed T equal to the steps the adaptive step took, from the same state."""
    model = _model()
    twin = copy.deepcopy(model)
    x, y = _batch()
    opt = PC(model, None, lr=0.05, inference_lr=0.1, inference_steps=60, inference_tol=0.05,
             schedule=schedule, backend=backend)
    stats = opt.step(x, y)
    taken = stats["inference_steps"]
    assert taken == int(taken) and 1 <= taken < 60
    fixed = PC(twin, None, lr=0.05, inference_lr=0.1, inference_steps=int(taken), schedule=schedule, backend=backend)
    expected = fixed.step(x, y)
    assert stats["energy"] == pytest.approx(expected["energy"], rel=1e-12)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_trace_is_kept_on_request(backend):
    x, y = _batch()
    opt = PC(_model(), None, lr=0.05, inference_steps=7, backend=backend)
    opt.step(x, y)
    assert opt.last_trace is None
    opt = PC(_model(), None, lr=0.05, inference_steps=7, trace=True, backend=backend)
    stats = opt.step(x, y)
    assert opt.last_trace.energy.shape == (8, 3) and opt.last_trace.grad_norm.shape == (7, 2)
    assert float(opt.last_trace.energy[-1].sum()) / 8 == pytest.approx(stats["energy"], rel=1e-12)


@pytest.mark.parametrize("name,value", [("inference_tol", 0.1), ("trace", True), ("check_divergence", True)])
def test_ipc_refuses_pc_only_inference_control(name, value):
    with pytest.raises(ValueError, match=name):
        IPC(_model(), None, lr=0.01, inference_steps=3, **{name: value})


@pytest.mark.parametrize("name,value,error", [("inference_tol", 1.5, ValueError), ("inference_tol", "x", TypeError),
                                              ("trace", 1, TypeError), ("check_divergence", None, TypeError)])
def test_bad_settings_are_refused(name, value, error):
    with pytest.raises(error, match=name):
        PC(_model(), None, lr=0.01, **{name: value})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_no_refusal_at_the_rounding_floor_of_a_met_target(backend, dtype):
    """A target the model already meets to within rounding: the energy sits at the floor of
    ε = z − μ and jitters there, which is not a divergence."""
    model = _model().to(dtype)
    x, _ = _batch()
    x = x.to(dtype)
    with torch.no_grad():
        y = model(x) + 1e-9 * torch.randn(8, 4, dtype=dtype, generator=torch.Generator().manual_seed(3))
    for schedule in ("jacobi", "sequential"):
        for steps in (1, 2, 20):
            opt = PC(model, None, lr=1e-3, inference_steps=steps, schedule=schedule, backend=backend, trace=True)
            assert set(opt.step(x, y)) == {"loss", "energy"}


def test_a_refused_step_keeps_the_last_trace():
    x, y = _batch()
    opt = PC(_model(1, activation=nn.Identity), None, lr=1e-3, inference_lr=0.05, inference_steps=40,
             backend="torch", trace=True)
    opt.step(x, y)
    kept = opt.last_trace
    for group in opt.param_groups:
        group["inference_lr"] = 0.6
    with pytest.raises(DivergenceError):
        opt.step(x, y)
    assert opt.last_trace is kept


@pytest.mark.parametrize("cls", [PC, IPC])
def test_a_state_saved_before_inference_control_loads(cls):
    """Groups saved without inference_tol, trace and check_divergence keep this optimizer's values."""
    x, y = _batch()
    opt = cls(_model(), None, lr=0.01, inference_steps=3)
    opt.step(x, y)
    state = opt.state_dict()
    for group in state["param_groups"]:
        for key in ("inference_tol", "trace", "check_divergence"):
            del group[key]
    fresh = cls(_model(), None, lr=0.01, inference_steps=3)
    fresh.load_state_dict(state)
    assert fresh.param_groups[0]["check_divergence"] is (cls is PC)
    expected = cls(_model(), None, lr=0.01, inference_steps=3)
    expected.load_state_dict(opt.state_dict())
    assert fresh.step(x, y) == expected.step(x, y)


def test_a_saved_inference_tol_round_trips():
    x, y = _batch()
    opt = PC(_model(), None, lr=0.01, inference_tol=0.2, inference_steps=30)
    opt.step(x, y)
    fresh = PC(_model(), None, lr=0.01, inference_steps=30)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["inference_tol"] == 0.2 and "inference_steps" in fresh.step(x, y)
