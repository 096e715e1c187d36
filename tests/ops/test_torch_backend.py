"""The ``torch`` backend equals ``pcfast.reference`` over whole trajectories, on awkward shapes."""
from __future__ import annotations

import itertools

import pytest
import torch

from pcfast import functional as F
from pcfast.testing import assert_all_close, assert_close
from tests.conftest import random_batch, random_mlp

HIDDEN = (13, 1, 17, 7)  # primes and a width of one
ACTS = ("tanh", "gelu", "relu", "sigmoid")


def network(depth, bias, dtype=torch.float64, seed=0):
    dims = (11, *HIDDEN[: depth - 1], 5)
    acts = [ACTS[l % len(ACTS)] for l in range(depth - 1)]
    return dims, *random_mlp(dims, bias=bias, activation=acts, dtype=dtype, seed=seed, scale=1.2)


PC_CASES = list(itertools.product((1, 7, 64), (2, 3, 4, 5), ("jacobi", "sequential"), (False, True), ("mse", "ce"), (True, False)))


def _pc_id(case):
    b, d, s, fpa, loss, bias = case
    return f"B{b}-L{d}-T5-{s}-{'fpa' if fpa else 'nofpa'}-{loss}-{'bias' if bias else 'nobias'}"


@pytest.mark.parametrize("case", PC_CASES, ids=[_pc_id(c) for c in PC_CASES])
def test_pc_torch_equals_reference(case):
    batch, depth, schedule, fpa, loss, bias = case
    dims, weights, biases, acts = network(depth, bias)
    x, y = random_batch(dims, batch, loss)
    kwargs = dict(precisions=[1.0] * (depth - 1) + [0.8], inference_steps=5, inference_lr=0.2,
                  schedule=schedule, fpa=fpa, loss=loss, return_trajectory=True)
    ref = F.pc_train_step(weights, biases, acts, x, y, backend="reference", **kwargs)
    out = F.pc_train_step(weights, biases, acts, x, y, backend="torch", **kwargs)
    for t, (a, e) in enumerate(zip(out.trajectory, ref.trajectory)):
        assert_all_close(a, e, name=f"latents at step {t}")
    assert_all_close(out.errors, ref.errors, name="errors")
    assert_all_close(out.weight_grads, ref.weight_grads, name="weight grads")
    assert_all_close(out.bias_grads, ref.bias_grads, name="bias grads")
    assert_close(out.energy, ref.energy, name="energy")
    assert_close(out.loss, ref.loss, name="loss")


@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
def test_pc_torch_equals_reference_float32(schedule):
    dims, weights, biases, acts = network(4, True, dtype=torch.float32)
    x, y = random_batch(dims, 7, "mse", dtype=torch.float32)
    kwargs = dict(inference_steps=10, inference_lr=0.1, schedule=schedule, return_trajectory=True)
    ref = F.pc_train_step(weights, biases, acts, x, y, backend="reference", **kwargs)
    out = F.pc_train_step(weights, biases, acts, x, y, backend="torch", **kwargs)
    for a, e in zip(out.trajectory, ref.trajectory):
        assert_all_close(a, e, dtype=torch.float32)
    assert_all_close(out.weight_grads, ref.weight_grads, dtype=torch.float32)


def test_pc_zero_inference_steps_is_forward_state():
    dims, weights, biases, acts = network(3, True)
    x, y = random_batch(dims, 7, "mse")
    for backend in ("reference", "torch"):
        out = F.pc_train_step(weights, biases, acts, x, y, inference_steps=0, backend=backend)
        assert all(float(e.abs().max()) == 0.0 for e in out.errors[:-1])
        assert float(out.weight_grads[-1].abs().max()) > 0


TP_CASES = list(itertools.product((1, 7, 64), (2, 3, 4, 5), (False, True), ("mse", "ce"), (True, False)))


@pytest.mark.parametrize("case", TP_CASES, ids=[f"B{b}-L{d}-{'dtp' if dt else 'tp'}-{lo}-{'bias' if bi else 'nobias'}" for b, d, dt, lo, bi in TP_CASES])
def test_tp_torch_equals_reference(case):
    batch, depth, difference, loss, bias = case
    dims, weights, biases, acts = network(depth, bias, seed=2)
    gen = torch.Generator().manual_seed(5)
    qs = [torch.randn(dims[l - 1], dims[l], generator=gen, dtype=torch.float64) / dims[l] ** 0.5 for l in range(2, depth + 1)]
    cs = [0.1 * torch.randn(dims[l - 1], generator=gen, dtype=torch.float64) if bias else None for l in range(2, depth + 1)]
    noise = [0.1 * torch.randn(batch, dims[l - 1], generator=gen, dtype=torch.float64) for l in range(2, depth + 1)]
    x, y = random_batch(dims, batch, loss)
    ref = F.tp_train_step(weights, biases, acts, qs, cs, None, x, y, beta=0.4, loss=loss, difference=difference, backend="reference")
    out = F.tp_train_step(weights, biases, acts, qs, cs, None, x, y, beta=0.4, loss=loss, difference=difference, backend="torch")
    assert_all_close(out.targets, ref.targets, name="targets")
    assert_all_close(out.weight_grads, ref.weight_grads, name="weight grads")
    assert_all_close(out.bias_grads, ref.bias_grads, name="bias grads")
    assert_close(out.local_loss, ref.local_loss)
    fb_ref = F.feedback_grads(weights, biases, acts, qs, cs, None, x, noise, backend="reference")
    fb_out = F.feedback_grads(weights, biases, acts, qs, cs, None, x, noise, backend="torch")
    assert_all_close(fb_out.weight_grads, fb_ref.weight_grads, name="feedback weight grads")
    assert_all_close(fb_out.bias_grads, fb_ref.bias_grads, name="feedback bias grads")
    assert_close(fb_out.loss, fb_ref.loss)


@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
@pytest.mark.parametrize("fpa", [False, True])
def test_pc_single_layer_network(schedule, fpa):
    """Depth 1: no latents, so the relaxation must leave the output error and gradient as at T = 0."""
    dims, weights, biases, acts = network(1, True)
    x, y = random_batch(dims, 7, "mse")
    ref = F.pc_train_step(weights, biases, acts, x, y, inference_steps=3, schedule=schedule, fpa=fpa, backend="reference")
    out = F.pc_train_step(weights, biases, acts, x, y, inference_steps=3, schedule=schedule, fpa=fpa, backend="torch")
    assert_all_close(out.weight_grads, ref.weight_grads)
    assert_close(out.energy, ref.energy)
