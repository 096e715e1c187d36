"""The ``cpp`` backend (``pcfast._C``) equals ``pcfast.reference`` over whole trajectories, and its
ops reject malformed input with a Python exception — never a crash.

Oracle: ``pcfast.reference`` (autograd on the energy). Float64 is compared with the tight row of
``pcfast.testing.TOLERANCES``, float32 with the float32 row.
"""
from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pcfast import functional as F
from pcfast import ops
from pcfast.testing import assert_all_close, assert_close
from pcfast.types import Net, PCConfig

from tests.conftest import random_batch, random_mlp

if not ops.is_available("cpp"):
    pytest.skip(f"the cpp backend is unavailable: {ops._unavailable.get('cpp', 'unknown reason')}",
                allow_module_level=True)

from pcfast.ops import cpp

ROOT = Path(__file__).resolve().parents[2]
HIDDEN = (13, 1, 17, 7)  # primes and a width of one
ACTS = ("tanh", "relu", "gelu", "sigmoid", "identity")


def network(depth, bias, *, dtype=torch.float64, seed=0, acts=None, hidden=HIDDEN):
    """A depth-``depth`` MLP 11 → hidden… → 5, activations cycling through ACTS unless given."""
    dims = (11, *hidden[: depth - 1], 5)
    if acts is None:
        acts = [ACTS[(l + depth) % len(ACTS)] for l in range(depth - 1)]
    return dims, *random_mlp(dims, bias=bias, activation=list(acts), dtype=dtype, seed=seed, scale=1.2)


def dims_id(dims):
    return "x".join(str(d) for d in dims)


def compare_pc(out, ref, dtype):
    kw = {"dtype": dtype}
    assert len(out.trajectory) == len(ref.trajectory)
    for t, (a, e) in enumerate(zip(out.trajectory, ref.trajectory)):
        assert_all_close(a, e, name=f"latents at step {t}", **kw)
    assert_all_close(out.latents, ref.latents, name="latents", **kw)
    assert_all_close(out.errors, ref.errors, name="errors", **kw)
    assert_all_close(out.weight_grads, ref.weight_grads, name="weight grads", **kw)
    assert_all_close(out.bias_grads, ref.bias_grads, name="bias grads", **kw)
    assert_close(out.energy, ref.energy, name="energy", **kw)
    assert_close(out.loss, ref.loss, name="loss", **kw)
    assert out.energy.dim() == 0 and out.loss.dim() == 0


# ------------------------------------------------------------------------------------------------
# PC: cpp equals the reference over T-step trajectories.

PC_GRID = list(itertools.product((1, 7, 64), (2, 3, 4, 5), ("jacobi", "sequential"), (False, True), ("mse", "ce"),
                                 (True, False)))


def _pc_id(case):
    batch, depth, schedule, fpa, loss, bias = case
    dims = (11, *HIDDEN[: depth - 1], 5)
    return (f"B{batch}-D{dims_id(dims)}-L{depth}-T5-{schedule}-{'fpa' if fpa else 'nofpa'}-{loss}-"
            f"{'bias' if bias else 'nobias'}")


@pytest.mark.parametrize("case", PC_GRID, ids=[_pc_id(c) for c in PC_GRID])
def test_pc_cpp_equals_reference_float64(case):
    batch, depth, schedule, fpa, loss, bias = case
    dims, weights, biases, acts = network(depth, bias)
    x, y = random_batch(dims, batch, loss)
    kwargs = dict(precisions=[1.0] * (depth - 2) + [1.3, 0.8] if depth > 1 else None, inference_steps=5,
                  inference_lr=0.2, schedule=schedule, fpa=fpa, loss=loss, return_trajectory=True)
    ref = F.pc_train_step(weights, biases, acts, x, y, backend="reference", **kwargs)
    out = F.pc_train_step(weights, biases, acts, x, y, backend="cpp", **kwargs)
    compare_pc(out, ref, torch.float64)


PC_ACT_GRID = list(itertools.product(ACTS, ("jacobi", "sequential"), (False, True)))


@pytest.mark.parametrize("case", PC_ACT_GRID, ids=[f"B7-D11x13x17x5-L3-T6-{a}-{s}-{'fpa' if f else 'nofpa'}"
                                                   for a, s, f in PC_ACT_GRID])
def test_pc_cpp_equals_reference_each_activation(case):
    act, schedule, fpa = case
    dims, weights, biases, acts = network(3, True, acts=[act, act], hidden=(13, 17))
    x, y = random_batch(dims, 7, "mse")
    kwargs = dict(inference_steps=6, inference_lr=0.15, schedule=schedule, fpa=fpa, return_trajectory=True)
    ref = F.pc_train_step(weights, biases, acts, x, y, backend="reference", **kwargs)
    out = F.pc_train_step(weights, biases, acts, x, y, backend="cpp", **kwargs)
    compare_pc(out, ref, torch.float64)


PC_F32_GRID = list(itertools.product((1, 64), (2, 4), ("jacobi", "sequential"), (False, True), ("mse", "ce")))


@pytest.mark.parametrize("case", PC_F32_GRID, ids=[
    f"B{b}-D{dims_id((11, *HIDDEN[: d - 1], 5))}-L{d}-T5-{s}-{'fpa' if f else 'nofpa'}-{lo}-float32"
    for b, d, s, f, lo in PC_F32_GRID])
def test_pc_cpp_equals_reference_float32(case):
    batch, depth, schedule, fpa, loss = case
    dims, weights, biases, acts = network(depth, True, dtype=torch.float32)
    x, y = random_batch(dims, batch, loss, dtype=torch.float32)
    kwargs = dict(inference_steps=5, inference_lr=0.2, schedule=schedule, fpa=fpa, loss=loss,
                  return_trajectory=True)
    ref = F.pc_train_step(weights, biases, acts, x, y, backend="reference", **kwargs)
    out = F.pc_train_step(weights, biases, acts, x, y, backend="cpp", **kwargs)
    assert out.weight_grads[0].dtype == torch.float32 and out.energy.dtype == torch.float32
    compare_pc(out, ref, torch.float32)


@pytest.mark.parametrize("schedule, dtype", [("jacobi", torch.float64), ("sequential", torch.float32)],
                         ids=["B131-D11x301x257x5-L3-T2-jacobi-float64", "B131-D11x301x257x5-L3-T2-sequential-float32"])
def test_pc_cpp_equals_reference_parallel_rows(schedule, dtype):
    """Blocks above the parallel grain (32k elements) are split across threads: same answer."""
    dims, weights, biases, acts = network(3, True, dtype=dtype, hidden=(301, 257), acts=["tanh", "gelu"])
    x, y = random_batch(dims, 131, "ce", dtype=dtype)
    kwargs = dict(inference_steps=2, inference_lr=0.1, schedule=schedule, loss="ce", return_trajectory=True)
    ref = F.pc_train_step(weights, biases, acts, x, y, backend="reference", **kwargs)
    out = F.pc_train_step(weights, biases, acts, x, y, backend="cpp", **kwargs)
    compare_pc(out, ref, dtype)


@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
@pytest.mark.parametrize("fpa", [False, True], ids=["nofpa", "fpa"])
def test_pc_cpp_single_layer(schedule, fpa):
    dims, weights, biases, _ = network(1, True)
    x, y = random_batch(dims, 7, "mse")
    kwargs = dict(inference_steps=3, schedule=schedule, fpa=fpa, return_trajectory=True)
    ref = F.pc_train_step(weights, biases, [], x, y, backend="reference", **kwargs)
    out = F.pc_train_step(weights, biases, [], x, y, backend="cpp", **kwargs)
    assert out.latents == [] and out.trajectory == [[]] * 4
    compare_pc(out, ref, torch.float64)


def test_pc_cpp_zero_inference_steps_is_forward_state():
    dims, weights, biases, acts = network(4, True)
    x, y = random_batch(dims, 7, "ce")
    out = F.pc_train_step(weights, biases, acts, x, y, loss="ce", inference_steps=0, backend="cpp",
                          return_trajectory=True)
    ref = F.pc_train_step(weights, biases, acts, x, y, loss="ce", inference_steps=0, backend="reference")
    assert all(float(e.abs().max()) == 0.0 for e in out.errors[:-1])
    assert len(out.trajectory) == 1
    assert_all_close(out.weight_grads, ref.weight_grads)
    assert_close(out.energy, ref.energy)


def test_pc_cpp_equals_torch_backend_long_run():
    """Forty steps on the torch backend's own test shapes: the two explicit backends agree."""
    dims, weights, biases, acts = network(4, True)
    x, y = random_batch(dims, 64, "mse")
    for schedule in ("jacobi", "sequential"):
        kwargs = dict(inference_steps=40, inference_lr=0.1, schedule=schedule)
        a = F.pc_train_step(weights, biases, acts, x, y, backend="torch", **kwargs)
        b = F.pc_train_step(weights, biases, acts, x, y, backend="cpp", **kwargs)
        assert_all_close(b.latents, a.latents)
        assert_all_close(b.weight_grads, a.weight_grads)


def test_pc_cpp_accepts_non_contiguous_and_grad_inputs():
    dims, weights, biases, acts = network(3, True)
    x, y = random_batch(dims, 7, "mse")
    ref = F.pc_train_step(weights, biases, acts, x, y, inference_steps=4, backend="reference")
    # Transposed copies (non-contiguous views of the same values), a strided x, parameters with grad.
    weights_t = [w.T.contiguous().T.requires_grad_(True) for w in weights]
    x_wide = torch.zeros(7, 2 * dims[0], dtype=x.dtype)
    x_wide[:, ::2] = x
    assert not weights_t[0].is_contiguous() and not x_wide[:, ::2].is_contiguous()
    out = cpp.CppBackend().pc_grads(Net(weights_t, biases, acts), x_wide[:, ::2], y,
                                    PCConfig.of(len(weights), inference_steps=4, inference_lr=0.1))
    assert_all_close(out.weight_grads, ref.weight_grads)
    assert not any(g.requires_grad for g in out.weight_grads) and out.energy.grad_fn is None


# ------------------------------------------------------------------------------------------------
# Inference control (adaptive stopping, trace, F before the last step): the cross-backend oracle is
# tests/reference/test_inference_control.py; here what is particular to the engine.

CONTROL_GRID = list(itertools.product(("jacobi", "sequential"), (False, True), ("tanh", "gelu")))


@pytest.mark.parametrize("schedule, fpa, act", CONTROL_GRID,
                         ids=[f"{s}-{'fpa' if f else 'nofpa'}-{a}" for s, f, a in CONTROL_GRID])
def test_pc_cpp_inference_control_changes_nothing_else(schedule, fpa, act):
    """The trace's and the divergence check's evaluations (which refresh a sequential sweep's stale
    errors, and let the next sweep reuse them) leave every other output bit for bit as it was; the
    monitored run equals the default one."""
    dims, weights, biases, _ = network(4, True)
    acts = [act] * 3
    x, y = random_batch(dims, 64, "ce")
    kwargs = dict(inference_steps=7, inference_lr=0.1, schedule=schedule, fpa=fpa, loss="ce",
                  return_trajectory=True, backend="cpp")
    plain = F.pc_train_step(weights, biases, acts, x, y, **kwargs)
    # inference_tol = 0 never stops on a relaxation that still moves: all steps, the step norms summed.
    monitored = F.pc_train_step(weights, biases, acts, x, y, inference_tol=0.0, **kwargs)
    traced = F.pc_train_step(weights, biases, acts, x, y, inference_tol=0.0, return_trace=True,
                             check_divergence=True, **kwargs)
    assert int(monitored.steps) == int(traced.steps) == 7
    fields = ("latents", "errors", "weight_grads", "bias_grads")
    for name in fields:
        for a, b in zip(getattr(monitored, name), getattr(traced, name)):
            assert torch.equal(a, b), f"{name} changed by the trace"
        assert_all_close(getattr(monitored, name), getattr(plain, name), name=name)
    for a, b in zip(monitored.trajectory, traced.trajectory):
        assert all(torch.equal(u, v) for u, v in zip(a, b)), "trajectory changed by the trace"
    assert torch.equal(monitored.energy, traced.energy)
    assert monitored.trace is None and monitored.energy_prev is None and plain.steps is None


@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
def test_pc_cpp_inference_control_float32(schedule):
    """Float32: steps, trace and F before the last step equal the reference's run on the same float32
    inputs (float32 row of the tolerances)."""
    dims, weights, biases, acts = network(3, True, dtype=torch.float32, acts=["tanh", "sigmoid"])
    x, y = random_batch(dims, 16, "mse", dtype=torch.float32)
    kwargs = dict(inference_steps=30, inference_lr=0.2, schedule=schedule, inference_tol=0.2, return_trace=True,
                  check_divergence=True)
    ref = F.pc_train_step(weights, biases, acts, x, y, backend="reference", **kwargs)
    out = F.pc_train_step(weights, biases, acts, x, y, backend="cpp", **kwargs)
    assert out.steps.dtype == torch.int64 and out.steps.dim() == 0
    assert int(out.steps) == int(ref.steps) < 30
    for name in ("energy", "grad_norm"):
        a, e = getattr(out.trace, name), getattr(ref.trace, name)
        assert a.dtype == torch.float32 and torch.equal(torch.isnan(a), torch.isnan(e)), name
        assert_close(torch.nan_to_num(a), torch.nan_to_num(e), dtype=torch.float32, name=f"trace.{name}")
    assert_close(out.energy_prev, ref.energy_prev, dtype=torch.float32, name="energy_prev")
    assert_all_close(out.weight_grads, ref.weight_grads, dtype=torch.float32, name="weight grads")


@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
def test_pc_cpp_inference_control_parallel_rows(schedule):
    """Blocks above the parallel grain: the step norms are summed over row chunks; same trace."""
    dims, weights, biases, acts = network(3, True, hidden=(301, 257), acts=["tanh", "gelu"])
    x, y = random_batch(dims, 131, "ce")
    kwargs = dict(inference_steps=3, inference_lr=0.1, schedule=schedule, loss="ce", return_trace=True,
                  inference_tol=0.5)
    ref = F.pc_train_step(weights, biases, acts, x, y, backend="reference", **kwargs)
    out = F.pc_train_step(weights, biases, acts, x, y, backend="cpp", **kwargs)
    assert int(out.steps) == int(ref.steps)
    for name in ("energy", "grad_norm"):
        a, e = getattr(out.trace, name), getattr(ref.trace, name)
        assert torch.equal(torch.isnan(a), torch.isnan(e)), name
        assert_close(torch.nan_to_num(a), torch.nan_to_num(e), name=f"trace.{name}")


def test_pc_cpp_op_returns_empty_extras_when_not_asked():
    """At the op: the step count is always there (T without a tolerance); the trace and F before the
    last step are empty (0,) tensors unless asked, with the shapes the fake kernel gives."""
    dims, weights, biases, acts = network(3, True)
    x, y = random_batch(dims, 5, "mse")
    args = (weights, biases, acts, x, y, [1.0, 2.0, 0.5], 4, 0.1, "sequential", False, "mse", False)
    out = cpp.PCStepOutputs(*torch.ops.pcfast.pc_train_step(*args))
    assert out.steps.dtype == torch.int64 and int(out.steps) == 4
    assert out.trace_energy.shape == out.trace_grad_norm.shape == out.energy_prev.shape == (0,)
    out = cpp.PCStepOutputs(*torch.ops.pcfast.pc_train_step(*args, None, True, True))
    assert out.trace_energy.shape == (5, 3) and out.trace_grad_norm.shape == (4, 2) and out.energy_prev.shape == ()
    assert not torch.isnan(out.trace_energy).any() and int(out.steps) == 4


@pytest.mark.parametrize("tol", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_pc_cpp_op_checks_inference_tol(tol):
    dims, weights, biases, acts = network(2, True)
    x, y = random_batch(dims, 3, "mse")
    with pytest.raises(ValueError, match=r"inference_tol: expected None or a number in \[0, 1\)"):
        torch.ops.pcfast.pc_train_step(weights, biases, acts, x, y, [1.0, 1.0], 3, 0.1, "jacobi", False, "mse",
                                       False, tol, False, False)


def test_cpp_is_the_auto_backend_on_cpu():
    assert "cpp" in ops.available_backends()
    assert ops.get_backend("auto", "pc", torch.device("cpu")).name == "cpp"
    assert cpp.engine_info().split("/")[0] in ("avx512", "avx2", "baseline")


# ------------------------------------------------------------------------------------------------
# TP / DTP and feedback gradients.

TP_GRID = list(itertools.product((1, 7, 64), (1, 2, 3, 4, 5), (True, False), ("mse", "ce"), (True, False)))


def feedback_params(dims, batch, bias, dtype, seed=5):
    gen = torch.Generator().manual_seed(seed)
    depth = len(dims) - 1
    qs = [torch.randn(dims[l - 1], dims[l], generator=gen, dtype=dtype) / dims[l] ** 0.5 for l in range(2, depth + 1)]
    cs = [0.1 * torch.randn(dims[l - 1], generator=gen, dtype=dtype) if bias else None for l in range(2, depth + 1)]
    noise = [0.1 * torch.randn(batch, dims[l - 1], generator=gen, dtype=dtype) for l in range(2, depth + 1)]
    return qs, cs, noise


@pytest.mark.parametrize("case", TP_GRID, ids=[
    f"B{b}-D{dims_id((11, *HIDDEN[: d - 1], 5))}-L{d}-{'dtp' if dt else 'tp'}-{lo}-{'bias' if bi else 'nobias'}"
    for b, d, dt, lo, bi in TP_GRID])
def test_tp_cpp_equals_reference(case):
    batch, depth, difference, loss, bias = case
    dims, weights, biases, acts = network(depth, bias, seed=2)
    qs, cs, noise = feedback_params(dims, batch, bias, torch.float64)
    psi = [ACTS[(l + 2) % len(ACTS)] for l in range(depth - 1)]  # ψ differs from φ
    x, y = random_batch(dims, batch, loss)
    for feedback_acts in (None, psi):
        kwargs = dict(beta=0.4, loss=loss, difference=difference)
        ref = F.tp_train_step(weights, biases, acts, qs, cs, feedback_acts, x, y, backend="reference", **kwargs)
        out = F.tp_train_step(weights, biases, acts, qs, cs, feedback_acts, x, y, backend="cpp", **kwargs)
        assert_all_close(out.targets, ref.targets, name="targets")
        assert_all_close(out.activities, ref.activities, name="activities")
        assert_all_close(out.weight_grads, ref.weight_grads, name="weight grads")
        assert_all_close(out.bias_grads, ref.bias_grads, name="bias grads")
        assert_close(out.local_loss, ref.local_loss, name="local loss")
        assert_close(out.loss, ref.loss, name="loss")
        for xi in (None, noise):
            fb_ref = F.feedback_grads(weights, biases, acts, qs, cs, feedback_acts, x, xi, backend="reference")
            fb_out = F.feedback_grads(weights, biases, acts, qs, cs, feedback_acts, x, xi, backend="cpp")
            assert_all_close(fb_out.weight_grads, fb_ref.weight_grads, name="feedback weight grads")
            assert_all_close(fb_out.bias_grads, fb_ref.bias_grads, name="feedback bias grads")
            assert_close(fb_out.loss, fb_ref.loss, name="feedback loss")


@pytest.mark.parametrize("difference", [True, False], ids=["dtp", "tp"])
def test_tp_cpp_equals_reference_float32(difference):
    dims, weights, biases, acts = network(4, True, dtype=torch.float32, seed=2)
    qs, cs, noise = feedback_params(dims, 64, True, torch.float32)
    x, y = random_batch(dims, 64, "ce", dtype=torch.float32)
    kwargs = dict(beta=0.4, loss="ce", difference=difference)
    ref = F.tp_train_step(weights, biases, acts, qs, cs, None, x, y, backend="reference", **kwargs)
    out = F.tp_train_step(weights, biases, acts, qs, cs, None, x, y, backend="cpp", **kwargs)
    assert_all_close(out.targets, ref.targets, dtype=torch.float32)
    assert_all_close(out.weight_grads, ref.weight_grads, dtype=torch.float32)
    fb_ref = F.feedback_grads(weights, biases, acts, qs, cs, None, x, noise, backend="reference")
    fb_out = F.feedback_grads(weights, biases, acts, qs, cs, None, x, noise, backend="cpp")
    assert_all_close(fb_out.weight_grads, fb_ref.weight_grads, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# The activation math of the kernels, on every instruction set this CPU runs.

SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 1e-8, 0.6249, 0.625, 0.6251, 20.0, -20.0, 40.0, 88.0, -88.0, 710.0, -710.0,
           1e30, -1e30, float("inf"), -float("inf")]


def torch_activation(name, u):
    from pcfast.activations import phi, phi_grad

    return phi(name)(u), phi_grad(name)(u)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", ACTS)
def test_kernel_activation_matches_torch(name, dtype):
    special = [v for v in SPECIAL if name != "gelu" or abs(v) != float("inf")]  # gelu(±inf): inf·0 in torch too
    u = torch.cat([torch.linspace(-50, 50, 20011, dtype=torch.float64), torch.tensor(special, dtype=torch.float64)])
    u = u.to(dtype)
    value, slope = torch.ops.pcfast.activation(u, name)
    exp_value, exp_slope = torch_activation(name, u.double())
    assert_close(value, exp_value, dtype=dtype, name=f"{name}(u)")
    assert_close(slope, exp_slope, dtype=dtype, name=f"{name}'(u)")
    nan_value = cpp.activation(torch.tensor([float("nan")] * 17, dtype=dtype), name).value
    assert bool(torch.isnan(nan_value).all()), "NaN must propagate through φ"


def test_every_instruction_set_and_gemm_path_agree():
    """Baseline, AVX2 and AVX-512 kernels (as far as this CPU goes) and both GEMM paths agree."""
    dims, weights, biases, acts = network(4, True, hidden=(37, 41, 19), acts=["tanh", "sigmoid", "gelu"])
    x, y = random_batch(dims, 29, "mse")
    u = torch.linspace(-30, 30, 4099, dtype=torch.float64)
    default = cpp.engine_info()
    runs = {}
    try:
        for isa, gemm in (("baseline", "aten"), ("avx2", "blas"), ("avx512", "blas"), ("avx512", "aten")):
            info = cpp.set_engine(isa, gemm)
            out = F.pc_train_step(weights, biases, acts, x, y, inference_steps=8, schedule="sequential",
                                  backend="cpp")
            values = [cpp.activation(u.to(dt), name).value
                      for name in ACTS for dt in (torch.float32, torch.float64)]
            runs[info] = (out.weight_grads, values)
    finally:
        isa, gemm = default.split("/")
        cpp.set_engine(isa, gemm)
    assert cpp.engine_info() == default
    assert any(info.endswith("/aten") for info in runs)
    base_grads, base_values = next(iter(runs.values()))
    for info, (grads, values) in runs.items():
        assert_all_close(grads, base_grads, name=f"weight grads under {info}")
        assert_all_close(values, base_values, dtype=torch.float32, name=f"activations under {info}")


# ------------------------------------------------------------------------------------------------
# Fuzz: malformed calls raise, the process never crashes.

ALLOWED = (RuntimeError, ValueError, TypeError)


def _valid_call(rng: random.Random) -> dict:
    """Arguments of a well-formed call to any of the three ops (each reads what it needs)."""
    depth = rng.randint(1, 4)
    dims = [rng.choice((1, 3, 5, 8)) for _ in range(depth + 1)]
    dtype = rng.choice((torch.float32, torch.float64))
    loss = rng.choice(("mse", "ce"))
    batch = rng.randint(1, 4)
    return dict(
        weights=[torch.randn(b, a, dtype=dtype) for a, b in zip(dims[:-1], dims[1:])],
        biases=[torch.randn(b, dtype=dtype) if rng.random() < 0.5 else None for b in dims[1:]],
        activations=[rng.choice(ACTS) for _ in range(depth - 1)],
        x=torch.randn(batch, dims[0], dtype=dtype),
        target=torch.randn(batch, dims[-1], dtype=dtype) if loss == "mse" else torch.randint(0, dims[-1], (batch,)),
        precisions=[1.0] * depth, inference_steps=rng.randint(0, 3), inference_lr=0.1,
        schedule=rng.choice(("jacobi", "sequential")), fpa=rng.random() < 0.5, loss=loss,
        return_trajectory=rng.random() < 0.5,
        inference_tol=rng.choice((None, 0.0, 0.3)), return_trace=rng.random() < 0.5,
        check_divergence=rng.random() < 0.5,
        feedback_weights=[torch.randn(dims[l - 1], dims[l], dtype=dtype) for l in range(2, depth + 1)],
        feedback_biases=[torch.randn(dims[l - 1], dtype=dtype) if rng.random() < 0.5 else None
                         for l in range(2, depth + 1)],
        feedback_activations=[rng.choice(ACTS) for _ in range(depth - 1)],
        beta=0.5, difference=rng.random() < 0.5,
        noise=[torch.randn(batch, dims[l - 1], dtype=dtype) if rng.random() < 0.7 else None
               for l in range(2, depth + 1)] if rng.random() < 0.7 else [],
    )


def _call(op: str, c: dict):
    if op == "pc":
        return torch.ops.pcfast.pc_train_step(
            c["weights"], c["biases"], c["activations"], c["x"], c["target"], c["precisions"], c["inference_steps"],
            c["inference_lr"], c["schedule"], c["fpa"], c["loss"], c["return_trajectory"], c["inference_tol"],
            c["return_trace"], c["check_divergence"])
    if op == "tp":
        return torch.ops.pcfast.tp_train_step(
            c["weights"], c["biases"], c["activations"], c["feedback_weights"], c["feedback_biases"],
            c["feedback_activations"], c["x"], c["target"], c["beta"], c["loss"], c["difference"])
    return torch.ops.pcfast.feedback_grads(
        c["weights"], c["biases"], c["activations"], c["feedback_weights"], c["feedback_biases"],
        c["feedback_activations"], c["x"], c["noise"])


def _broken(rng: random.Random, t: torch.Tensor, *, allow_none: bool = True) -> object:
    """A replacement for tensor argument ``t`` that no op may accept."""
    options = [
        lambda: t.reshape(-1)[:0],                      # empty
        lambda: t.unsqueeze(0),                         # one rank too many
        lambda: t.reshape(-1)[0],                       # 0-dim
        lambda: t.to(torch.int32),                      # integer
        lambda: t.to(torch.float16),                    # half
        lambda: t.to(torch.complex64),                  # complex
        lambda: torch.empty(t.shape, dtype=t.dtype, device="meta"),
        lambda: t.to_sparse(),                          # sparse layout
        lambda: "not a tensor",
        lambda: 3.0,
    ]
    if allow_none:
        options.append(lambda: None)
    return rng.choice(options)()


def _other_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float32 else torch.float32


def _grown(t: torch.Tensor, dim: int, by: int = 1) -> torch.Tensor:
    shape = list(t.shape)
    shape[dim] += by
    return torch.zeros(shape, dtype=t.dtype)


ALL, PC, PC_TP, FEEDBACK_OPS = ("pc", "tp", "feedback"), ("pc",), ("pc", "tp"), ("tp", "feedback")


def _set(key, make):
    def apply(rng, c):
        c[key] = make(rng, c)
    return apply


def _set_item(key, make):
    def apply(rng, c):
        k = rng.randrange(len(c[key]))
        c[key][k] = make(rng, c, c[key][k])
    return apply


# (name, ops that must reject it, applicable(call), apply(rng, call))
MUTATIONS = [
    ("no layers", ALL, lambda c: True,
     lambda rng, c: c.update(weights=[], biases=[], activations=[], precisions=[], feedback_weights=[],
                             feedback_biases=[], feedback_activations=[], noise=[])),
    ("broken weight", ALL, lambda c: True, _set_item("weights", lambda rng, c, w: _broken(rng, w))),
    ("weights do not chain", ALL, lambda c: len(c["weights"]) >= 2,
     lambda rng, c: c["weights"].__setitem__(1, _grown(c["weights"][1], 1, rng.randint(1, 3)))),
    ("mixed weight dtypes", ALL, lambda c: len(c["weights"]) >= 2,
     lambda rng, c: c["weights"].__setitem__(-1, c["weights"][-1].to(_other_dtype(c["weights"][0])))),
    ("one bias too many", ALL, lambda c: True, lambda rng, c: c["biases"].append(None)),
    ("one bias too few", ALL, lambda c: True, lambda rng, c: c["biases"].pop()),
    ("broken bias", ALL, lambda c: True,
     _set_item("biases", lambda rng, c, b: _broken(rng, b if b is not None else torch.zeros(2), allow_none=False))),
    ("bias of the wrong size", ALL, lambda c: True,
     lambda rng, c: c["biases"].__setitem__(0, torch.zeros(c["weights"][0].shape[0] + 1, dtype=c["x"].dtype))),
    ("one activation too many", ALL, lambda c: True, lambda rng, c: c["activations"].append("tanh")),
    ("one activation too few", ALL, lambda c: len(c["activations"]) >= 1, lambda rng, c: c["activations"].pop()),
    ("unknown activation", ALL, lambda c: len(c["activations"]) >= 1,
     _set_item("activations", lambda rng, c, a: rng.choice(("Tanh", "softplus", "", "gelu_tanh", "relu ")))),
    ("broken x", ALL, lambda c: True, _set("x", lambda rng, c: _broken(rng, c["x"]))),
    ("x of the wrong width", ALL, lambda c: True, _set("x", lambda rng, c: _grown(c["x"], 1, rng.randint(1, 3)))),
    ("empty batch", ALL, lambda c: True, _set("x", lambda rng, c: c["x"][:0])),
    ("x of another dtype", ALL, lambda c: True,
     _set("x", lambda rng, c: c["x"].to(_other_dtype(c["x"])))),
    ("broken target", PC_TP, lambda c: True, _set("target", lambda rng, c: _broken(rng, c["target"]))),
    ("target of the wrong shape", PC_TP, lambda c: True,
     _set("target", lambda rng, c: _grown(c["target"], c["target"].dim() - 1, rng.randint(1, 3)))),
    ("label out of range", PC_TP, lambda c: c["loss"] == "ce",
     _set("target", lambda rng, c: torch.full_like(c["target"], rng.choice((-1, c["weights"][-1].shape[0], 10**9))))),
    ("target of the other loss", PC_TP, lambda c: True,
     _set("loss", lambda rng, c: "ce" if c["loss"] == "mse" else "mse")),
    ("unknown loss", PC_TP, lambda c: True, _set("loss", lambda rng, c: rng.choice(("MSE", "l1", "", "nll")))),
    ("one precision too many", PC, lambda c: True, lambda rng, c: c["precisions"].append(1.0)),
    ("one precision too few", PC, lambda c: True, lambda rng, c: c["precisions"].pop()),
    ("bad precision", PC, lambda c: True,
     _set_item("precisions", lambda rng, c, p: rng.choice((0.0, -1.0, float("nan"), float("inf"))))),
    ("negative inference_steps", PC, lambda c: True,
     _set("inference_steps", lambda rng, c: rng.choice((-1, -7, -(2**40))))),
    ("bad inference_lr", PC, lambda c: True,
     _set("inference_lr", lambda rng, c: rng.choice((0.0, -0.1, float("nan"), float("inf"))))),
    ("bad inference_tol", PC, lambda c: True,
     _set("inference_tol", lambda rng, c: rng.choice((-0.1, 1.0, 2.0, float("nan"), float("inf"))))),
    ("unknown schedule", PC, lambda c: True,
     _set("schedule", lambda rng, c: rng.choice(("Jacobi", "gauss-seidel", "", "sequential ")))),
    ("bad beta", ("tp",), lambda c: True, _set("beta", lambda rng, c: rng.choice((-0.5, float("nan"), float("inf"))))),
    ("one feedback map too many", FEEDBACK_OPS, lambda c: True,
     lambda rng, c: (c["feedback_weights"].append(torch.zeros(2, 2, dtype=c["x"].dtype)),
                     c["feedback_biases"].append(None), c["feedback_activations"].append("tanh"))),
    ("one feedback weight too few", FEEDBACK_OPS, lambda c: len(c["feedback_weights"]) >= 1,
     lambda rng, c: c["feedback_weights"].pop()),
    ("broken feedback weight", FEEDBACK_OPS, lambda c: len(c["feedback_weights"]) >= 1,
     _set_item("feedback_weights", lambda rng, c, q: _broken(rng, q))),
    ("feedback weight of the wrong shape", FEEDBACK_OPS, lambda c: len(c["feedback_weights"]) >= 1,
     _set_item("feedback_weights", lambda rng, c, q: _grown(q, rng.randrange(2)))),
    ("feedback bias of the wrong shape", FEEDBACK_OPS, lambda c: len(c["feedback_biases"]) >= 1,
     _set_item("feedback_biases", lambda rng, c, b: torch.zeros(c["x"].shape[1] + 50, dtype=c["x"].dtype))),
    ("one feedback activation too many", FEEDBACK_OPS, lambda c: True,
     lambda rng, c: c["feedback_activations"].append("tanh")),
    ("unknown feedback activation", FEEDBACK_OPS, lambda c: len(c["feedback_activations"]) >= 1,
     _set_item("feedback_activations", lambda rng, c, a: rng.choice(("TANH", "swish", "")))),
    ("noise of the wrong length", ("feedback",), lambda c: True,
     _set("noise", lambda rng, c: [None] * (len(c["weights"]) + rng.randint(0, 2)))),
    ("broken noise", ("feedback",), lambda c: len(c["weights"]) >= 2,
     _set("noise", lambda rng, c: [_broken(rng, torch.zeros(c["x"].shape[0], w.shape[1], dtype=c["x"].dtype),
                                           allow_none=False) for w in c["weights"][1:]])),
    ("wrong Python type", ALL, lambda c: True,
     lambda rng, c: c.__setitem__(rng.choice(("weights", "biases", "activations", "x")),
                                  rng.choice((None, object(), "3", [[1.0]], {"a": 1}, 7)))),
    ("wrong Python type for feedback", FEEDBACK_OPS, lambda c: True,
     lambda rng, c: c.__setitem__(rng.choice(("feedback_weights", "feedback_biases", "feedback_activations")),
                                  rng.choice((None, object(), "3", [[1.0]], {"a": 1}, 7)))),
    # (None passes for a bool — the dispatcher reads it as False — so it is not offered here.)
    ("wrong Python scalar type", PC, lambda c: True,
     lambda rng, c: c.__setitem__(rng.choice(("inference_steps", "inference_lr", "schedule", "fpa", "precisions",
                                              "inference_tol", "return_trace", "check_divergence")),
                                  rng.choice((object(), [[1.0]], {"a": 1})))),
]


def _fuzz(seed: int, calls: int) -> list[str]:
    """Make ``calls`` malformed calls; return those that did not raise one of ALLOWED."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    failures, done = [], 0
    while done < calls:
        op = rng.choice(ALL)
        call = _valid_call(rng)
        name, rejecting, applicable, apply = rng.choice(MUTATIONS)
        if op not in rejecting or not applicable(call):
            continue
        apply(rng, call)
        done += 1
        try:
            _call(op, call)
        except ALLOWED:
            continue
        except Exception as exc:  # noqa: BLE001 - any other exception type breaks the contract
            failures.append(f"{op} with {name}: {type(exc).__name__}: {exc}")
        else:
            failures.append(f"{op} with {name}: did not raise")
    return failures


def test_fuzz_well_formed_calls_succeed():
    """The fuzz's base calls are valid, so each malformed call fails because of its mutation."""
    rng = random.Random(99)
    for _ in range(60):
        call = _valid_call(rng)
        for op in ALL:
            _call(op, call)


def test_fuzz_malformed_calls_raise_and_never_crash():
    """500 malformed calls in a child process: each raises a Python exception; the child exits cleanly."""
    script = ("import sys; from tests.ops.test_cpp import _fuzz; f = _fuzz(1234, 500); "
              "print('\\n'.join(f)); print('FUZZ-DONE', len(f)); sys.exit(1 if f else 0)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode >= 0, f"the process crashed with signal {-proc.returncode}:\n{proc.stderr[-4000:]}"
    assert "FUZZ-DONE" in proc.stdout, f"fuzz did not finish:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"malformed calls that did not raise properly:\n{proc.stdout[-4000:]}"
