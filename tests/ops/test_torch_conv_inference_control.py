"""Inference control of PC on conv nets (DESIGN §3, "Inference control"): adaptive stopping
(``inference_tol``), the trace (``return_trace``) and F before the last step (``check_divergence``),
``pcfast.ops.torch_conv`` against its oracle ``pcfast.reference.conv.conv_pc_train_step`` in float64
(≤ 1e-10): steps taken, trajectories, latents, errors, gradients, energy, energy_prev and the trace
with its NaN rows — on the host-stopping path (the CPU's) and on the device-gate path (a gate that
turns the remaining steps into no-ops, CUDA's), forced here on the CPU.

The reference itself is checked against definitions: its trace energies are
``conv_pc_energy_terms`` at the recorded latents, its activity-gradient norms are autograd of F at
the state each layer moved from (and (γ_l/κ)‖Δz_l‖ under FPA), its stopping step is the first
whose ‖Δz_t‖ is within τ of the largest so far, and a run that stops after t steps equals a run of
``inference_steps=t``.

Networks: small images (2×8×8, 1×9×7, 3×6×6), stride 2, padding, max and avg pooling (overlapping
windows), biases on and off, a linear hidden layer; both schedules, FPA on and off, MSE and CE.
"""
from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch

from pcfast.ops.torch_conv import _ConvRelaxation, conv_pc_grads
from pcfast.ops.torch_pc import _loss_sum, relax
from pcfast.reference.conv import ConvLayer, LinearLayer, conv_pc_energy_terms, conv_pc_train_step
from pcfast.testing import assert_all_close, assert_close
from pcfast.types import PCConfig

TIGHT = {"atol": 1e-10, "rtol": 1e-10}
CLASSES, RATE = 4, 0.2
CONTROLS = list(itertools.product(["jacobi", "sequential"], [False, True], ["mse", "ce"]))


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _conv(gen, c_out, c_in, k, bias, **options):
    weight = 1.3 * _randn(gen, c_out, c_in, k, k) / (c_in * k * k) ** 0.5
    return ConvLayer(weight, 0.1 * _randn(gen, c_out) if bias else None, **options)


def _linear(gen, d_out, d_in, bias, activation="identity"):
    return LinearLayer(1.3 * _randn(gen, d_out, d_in) / d_in**0.5, 0.1 * _randn(gen, d_out) if bias else None,
                       activation)


def _net_max(gen):
    """2×8×8 → conv k3 s2 p1 (tanh, max 2/1) → 3×3×3 → conv k3 p1 no bias (gelu, avg 2/1) → 2×2×2 →
    linear 8→5 (sigmoid) → linear 5→4."""
    return [_conv(gen, 3, 2, 3, True, stride=2, padding=1, activation="tanh", pool=("max", 2, 1)),
            _conv(gen, 2, 3, 3, False, padding=1, activation="gelu", pool=("avg", 2, 1)),
            _linear(gen, 5, 8, True, "sigmoid"), _linear(gen, CLASSES, 5, True)], (2, 8, 8)


def _net_avg(gen):
    """1×9×7 → conv k3 s2 p1 no bias (gelu, avg 2/2) → 2×2×2 → conv k2 s2 p1 (tanh) → 2×2×2 →
    linear 8→4."""
    return [_conv(gen, 2, 1, 3, False, stride=2, padding=1, activation="gelu", pool=("avg", 2, 2)),
            _conv(gen, 2, 2, 2, True, stride=2, padding=1, activation="tanh"),
            _linear(gen, CLASSES, 8, False)], (1, 9, 7)


NETS = {"max": _net_max, "avg": _net_avg}


def _problem(net, loss, batch=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layers, image = NETS[net](gen)
    x = _randn(gen, batch, *image)
    y = _randn(gen, batch, CLASSES) if loss == "mse" else torch.randint(CLASSES, (batch,), generator=gen)
    return layers, x, y


def _gammas(depth):
    return [1.0, 0.6, 1.5][: depth - 1] + [0.8]


def _settings(layers, **settings):
    return {"precisions": _gammas(len(layers)), "inference_lr": RATE, **settings}


def _torch(layers, x, y, host_stops=None, **settings):
    """``conv_pc_grads``; ``host_stops=False`` forces the device-gate path of ``torch_pc.relax``."""
    settings = dict(settings)
    config = PCConfig(tuple(settings.pop("precisions")), **settings)
    if host_stops is None:
        return conv_pc_grads(layers, x, y, config)
    with torch.no_grad():
        state = _ConvRelaxation(layers, x, y, config)
        return relax(state, config, _loss_sum(state.f0, y, config.loss) / state.batch, host_stops=host_stops)


def _assert_trace_equal(actual, expected):
    for name in ("energy", "grad_norm"):
        a, e = getattr(actual, name), getattr(expected, name)
        assert a.shape == e.shape, name
        assert torch.equal(torch.isnan(a), torch.isnan(e)), f"trace.{name}: NaN rows differ"
        assert_close(torch.nan_to_num(a), torch.nan_to_num(e), name=f"trace.{name}", **TIGHT)


def _assert_result_equal(out, ref):
    assert (out.steps is None) == (ref.steps is None)
    if ref.steps is not None:
        assert int(out.steps) == int(ref.steps)
    if ref.trajectory is not None:
        assert len(out.trajectory) == len(ref.trajectory)
        for t, (a, e) in enumerate(zip(out.trajectory, ref.trajectory)):
            assert_all_close(a, e, name=f"latents after step {t}", **TIGHT)
    assert_all_close(out.latents, ref.latents, name="latents", **TIGHT)
    assert_all_close(out.errors, ref.errors, name="errors", **TIGHT)
    assert_all_close(out.weight_grads + out.bias_grads, ref.weight_grads + ref.bias_grads, name="grads", **TIGHT)
    assert_close(out.energy, ref.energy, name="energy", **TIGHT)
    assert (out.energy_prev is None) == (ref.energy_prev is None)
    if ref.energy_prev is not None:
        assert_close(out.energy_prev, ref.energy_prev, name="energy_prev", **TIGHT)
    assert (out.trace is None) == (ref.trace is None)
    if ref.trace is not None:
        _assert_trace_equal(out.trace, ref.trace)


@pytest.mark.parametrize("schedule,fpa,loss", CONTROLS)
@pytest.mark.parametrize("net", NETS)
def test_inference_control_equals_reference(net, schedule, fpa, loss):
    """Every setting at once, with and without a stop; host stops and the device gate alike."""
    layers, x, y = _problem(net, loss)
    steps = 12
    stopped = False
    for tol in (None, 0.3):
        settings = _settings(layers, inference_steps=steps, schedule=schedule, fpa=fpa, loss=loss,
                             return_trajectory=True, inference_tol=tol, return_trace=True, check_divergence=True)
        ref = conv_pc_train_step(layers, x, y, **settings)
        for host_stops in (None, False):
            _assert_result_equal(_torch(layers, x, y, host_stops, **settings), ref)
        taken = steps if tol is None else int(ref.steps)
        stopped |= taken < steps
        assert_close(ref.trace.energy[taken].sum(), ref.energy, name="trace.energy[last].sum() = energy", **TIGHT)
    assert stopped, "the loose tolerance should stop before the cap"


@pytest.mark.parametrize("schedule,fpa", [("jacobi", False), ("sequential", False), ("jacobi", True)])
@pytest.mark.parametrize("steps", [0, 1, 4])
def test_energy_before_the_last_step_equals_reference(schedule, fpa, steps):
    """F_{T−1} alone (no trace, no stopping): equal to the reference's, and to the trace's row T−1."""
    layers, x, y = _problem("max", "mse")
    settings = _settings(layers, inference_steps=steps, schedule=schedule, fpa=fpa, check_divergence=True)
    ref = conv_pc_train_step(layers, x, y, **settings)
    out = _torch(layers, x, y, **settings)
    assert out.steps is None and out.trace is None
    _assert_result_equal(out, ref)
    if steps:
        traced = conv_pc_train_step(layers, x, y, **settings, return_trace=True)
        assert_close(ref.energy_prev, traced.trace.energy[steps - 1].sum(), name="F_{T-1} from the trace", **TIGHT)
    else:
        assert_close(ref.energy_prev, ref.energy, name="T = 0: energy_prev is F", **TIGHT)


@pytest.mark.parametrize("schedule,fpa,loss", CONTROLS)
def test_reference_trace_is_the_energy_and_its_gradient(schedule, fpa, loss):
    """Oracle: the energy definition and autograd. trace.energy[t] is ``conv_pc_energy_terms`` at the
    latents after step t; trace.grad_norm[t, l] is (γ_l/κ)‖z_l^{t+1} − z_l^t‖ and, without FPA,
    ‖∂F/∂z_l‖ by autograd at the state layer l moved from (jacobi: the state after step t;
    sequential: layers above l already at step t+1)."""
    layers, x, y = _problem("max", loss)
    gammas = _gammas(len(layers))
    ref = conv_pc_train_step(layers, x, y, **_settings(layers, inference_steps=4, schedule=schedule, fpa=fpa,
                                                       loss=loss, return_trace=True, return_trajectory=True))
    states = ref.trajectory
    for t, state in enumerate(states):
        terms = conv_pc_energy_terms(layers, x, y, state, precisions=gammas, loss=loss, fpa=fpa)
        assert_close(ref.trace.energy[t], torch.stack(terms), name=f"energy terms after step {t}", **TIGHT)
    for t in range(len(states) - 1):
        moved = torch.stack([(after - before).norm() * g / RATE
                             for before, after, g in zip(states[t], states[t + 1], gammas)])
        assert_close(ref.trace.grad_norm[t], moved, name=f"(γ/κ)‖Δz‖ of step {t + 1}", **TIGHT)
        if fpa:
            continue
        for l in range(len(states[t])):
            sweep = states[t][: l + 1] + states[t + 1][l + 1:] if schedule == "sequential" else states[t]
            zs = [z.clone().requires_grad_(True) for z in sweep]
            energy = sum(conv_pc_energy_terms(layers, x, y, zs, precisions=gammas, loss=loss))
            (grad,) = torch.autograd.grad(energy, zs[l])
            assert_close(ref.trace.grad_norm[t, l], grad.norm(), name=f"‖∂F/∂z_{l + 1}‖ at step {t + 1}",
                         **TIGHT)


@pytest.mark.parametrize("schedule,fpa", [("jacobi", False), ("sequential", False), ("sequential", True)])
@pytest.mark.parametrize("net", NETS)
def test_stopping_rule_and_a_stop_equals_a_shorter_run(net, schedule, fpa):
    """Definition: the stop comes at the first step with ‖Δz_t‖ ≤ τ · max_{s≤t} ‖Δz_s‖ (read from the
    reference's trace); a run that stops after t steps equals a run of ``inference_steps=t``
    (latents, gradients, energy; energy_prev is then F at the final state), on both implementations."""
    layers, x, y = _problem(net, "mse", seed=1)
    gammas, tol, cap = _gammas(len(layers)), 0.2, 40
    settings = _settings(layers, schedule=schedule, fpa=fpa)
    ref = conv_pc_train_step(layers, x, y, **settings, inference_steps=cap, inference_tol=tol, return_trace=True,
                             check_divergence=True)
    taken = int(ref.steps)
    assert 1 <= taken < cap
    scale = torch.tensor([RATE / g for g in gammas[:-1]], dtype=torch.float64)
    sizes = (ref.trace.grad_norm[:taken] * scale).norm(dim=1)
    below = (sizes <= tol * torch.cummax(sizes, 0).values).tolist()
    assert below.index(True) == taken - 1
    assert torch.isnan(ref.trace.grad_norm[taken:]).all() and not torch.isnan(ref.trace.grad_norm[:taken]).any()
    assert_close(ref.energy_prev, ref.energy, name="stopped: energy_prev is F at the final state", **TIGHT)
    for run in (lambda **s: conv_pc_train_step(layers, x, y, **s), lambda **s: _torch(layers, x, y, **s)):
        stopped = run(**settings, inference_steps=cap, inference_tol=tol)
        fixed = run(**settings, inference_steps=taken)
        assert int(stopped.steps) == taken
        assert_all_close(stopped.latents, fixed.latents, name="latents", **TIGHT)
        assert_all_close(stopped.weight_grads + stopped.bias_grads, fixed.weight_grads + fixed.bias_grads,
                         name="grads", **TIGHT)
        assert_close(stopped.energy, fixed.energy, name="energy", **TIGHT)


def test_channels_last_input_with_inference_control():
    """The step norms are read in the state's memory format: a channels-last input gives the same
    numbers."""
    gen = torch.Generator().manual_seed(4)
    layers = [_conv(gen, 3, 3, 3, True, stride=2, padding=1, activation="tanh", pool=("max", 2, 1)),
              _conv(gen, 2, 3, 2, True, padding=1, activation="gelu", pool=("avg", 2, 1)),
              _linear(gen, CLASSES, 8, True)]
    x, y = _randn(gen, 2, 3, 6, 6), _randn(gen, 2, CLASSES)
    settings = _settings(layers, inference_steps=10, inference_tol=0.3, return_trace=True, check_divergence=True,
                         return_trajectory=True)
    ref = conv_pc_train_step(layers, x, y, **settings)
    out = _torch(layers, x.contiguous(memory_format=torch.channels_last), y, **settings)
    assert out.latents[0].is_contiguous(memory_format=torch.channels_last) and not out.latents[0].is_contiguous()
    _assert_result_equal(out, ref)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("schedule,fpa", [("jacobi", False), ("sequential", False), ("jacobi", True)])
def test_relu_with_disjoint_max_pooling(schedule, fpa, channels_last):
    """ReLU then max pooling 2/2 (pooled before the activation: the arg-max of a window ≤ 0
    throughout differs from max_pool2d(relu(z))'s) on the gated and measured path: equal to the
    reference, stops and traces included."""
    gen = torch.Generator().manual_seed(6)
    layers = [_conv(gen, 3, 2, 3, True, padding=1, activation="relu", pool=("max", 2, 2)),
              _conv(gen, 4, 3, 3, False, padding=1, activation="relu", pool=("max", 2, 2)),
              _linear(gen, CLASSES, 4 * 2 * 2, True)]
    x, y = _randn(gen, 3, 2, 8, 8), _randn(gen, 3, CLASSES)
    xin = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    for tol in (None, 0.3):
        settings = _settings(layers, inference_steps=8, schedule=schedule, fpa=fpa, inference_tol=tol,
                             return_trace=True, check_divergence=True, return_trajectory=True)
        ref = conv_pc_train_step(layers, x, y, **settings)
        for host_stops in (None, False):
            _assert_result_equal(_torch(layers, xin, y, host_stops, **settings), ref)


@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
@pytest.mark.parametrize("depth", [1, 2])
def test_shallow_nets(depth, schedule):
    """A readout alone (no latents: the step norm is 0, so the first step stops) and a conv then the
    readout."""
    gen = torch.Generator().manual_seed(7)
    conv = _conv(gen, 2, 2, 3, True, stride=2, padding=1, activation="tanh", pool=("avg", 2, 1))
    layers = [_linear(gen, CLASSES, 2 * 7 * 7, True)] if depth == 1 else [conv, _linear(gen, CLASSES, 2 * 3 * 3, False)]
    x, y = _randn(gen, 2, 2, 7, 7), _randn(gen, 2, CLASSES)
    settings = _settings(layers, inference_steps=5, schedule=schedule, inference_tol=0.1, return_trace=True,
                         check_divergence=True, return_trajectory=True)
    ref = conv_pc_train_step(layers, x, y, **settings)
    assert ref.trace.grad_norm.shape == (5, depth - 1)
    if depth == 1:
        assert int(ref.steps) == 1
    for host_stops in (None, False):
        _assert_result_equal(_torch(layers, x, y, host_stops, **settings), ref)


def test_default_path_returns_no_extras():
    layers, x, y = _problem("avg", "mse")
    for out in (conv_pc_train_step(layers, x, y, **_settings(layers, inference_steps=3)),
                _torch(layers, x, y, **_settings(layers, inference_steps=3))):
        assert out.steps is None and out.trace is None and out.energy_prev is None
