"""The local-gradient kernels (``pcfast/ops/local_grad.py``): PC's ``scale · εᵀ φ(a)`` and TP's
``scale · δᵀ a`` with ``δ = (t − φ(u)) ⊙ φ'(u)`` against their formulas in torch (with in-kernel
noise and the squared residuals), one layer and stacked, and the stacked TP local gradients inside
whole steps against ``pcfast.reference``."""
import pytest
import torch

pytest.importorskip("triton")

from pcfast import reference
from pcfast.activations import phi, phi_grad
from pcfast.ops import local_grad, tp_targets
from pcfast.ops import triton as triton_backend
from pcfast.ops._triton_common import Noise
from pcfast.testing import assert_close
from pcfast.types import Feedback, Net, TPConfig
from tests.conftest import random_batch, random_mlp
from tests.ops.cases import DTYPES, assert_same_tp, count_calls

BATCH, ROWS, COLS = 37, 33, 40  # the batch reduction and both output axes span several tiles


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_pc_weight_grad_equals_its_formula(bias):
    error, a = _randn(BATCH, ROWS, seed=0), _randn(BATCH, COLS, seed=1)
    gw, gb = local_grad.pc_weight_grad(error, a, scale=-0.3, act_in="sigmoid", has_bias=bias)
    assert_close(gw, -0.3 * error.T @ torch.sigmoid(a), name="weight grad")
    assert (gb is None) != bias
    if bias:
        assert_close(gb, -0.3 * error.sum(0), name="bias grad")


def test_stacked_pc_weight_grad_equals_each_layer():
    errors, inputs = _randn(3, BATCH, ROWS, seed=2), _randn(3, BATCH, COLS, seed=3)
    gw, gb = local_grad.stacked_pc_weight_grad(errors, inputs, scale=0.5, act_in="tanh", has_bias=True)
    assert gw.shape == (3, ROWS, COLS) and gb.shape == (3, ROWS)
    for g in range(3):
        assert_close(gw[g], 0.5 * errors[g].T @ torch.tanh(inputs[g]), name=f"weight grad {g}")
        assert_close(gb[g], 0.5 * errors[g].sum(0), name=f"bias grad {g}")


@pytest.mark.parametrize("noisy", [False, True], ids=["clean", "noise"])
def test_tp_weight_grad_equals_its_formula(noisy):
    """δ = (t̃ − φ(u)) ⊙ φ'(u) with t̃ = t + σ ξ (ξ as ``gaussian_noise`` stores it); squares = Σ_m (t̃ − φ(u))²."""
    target, u, a = _randn(BATCH, ROWS, seed=4), _randn(BATCH, ROWS, seed=5), _randn(BATCH, COLS, seed=6)
    noise = Noise(11, 0.2, 0) if noisy else None
    noisy_target = target
    if noisy:
        noisy_target = target + tp_targets.gaussian_noise(11, 0.2, BATCH, [ROWS], dtype=target.dtype,
                                                          device=target.device)[0]
    squares = torch.empty(ROWS, dtype=torch.float64)
    gw, gb = local_grad.tp_weight_grad(target, u, a, scale=-1.0 / BATCH, act="gelu", noise=noise, squares=squares)
    residual = noisy_target - phi("gelu")(u)
    delta = residual * phi_grad("gelu")(u)
    assert_close(gw, -delta.T @ a / BATCH, name="weight grad")
    assert_close(gb, -delta.sum(0) / BATCH, name="bias grad")
    assert_close(squares, (residual * residual).sum(0), name="squared residuals")


def test_stacked_tp_weight_grad_takes_noise_one_layer_at_a_time():
    t = _randn(2, 3, 4, seed=7)
    with pytest.raises(ValueError, match="noise"):
        local_grad.stacked_tp_weight_grad(t, t, t, scale=1.0, act="tanh", has_bias=True, noise=Noise(1, 0.1))


@pytest.mark.parametrize("case", [
    dict(batch=5, width=17, depth=3, difference=True, bias=True, dtype="f64", loss="mse", act="tanh"),
    dict(batch=33, width=64, depth=5, difference=False, bias=False, dtype="f32", loss="ce", act="gelu"),
    dict(batch=1, width=100, depth=4, difference=True, bias=False, dtype="f64", loss="ce", act="sigmoid"),
    dict(batch=5, width=1, depth=4, difference=False, bias=True, dtype="f32", loss="mse", act="relu"),
], ids=lambda c: f"B{c['batch']}-W{c['width']}-L{c['depth']}-{'dtp' if c['difference'] else 'tp'}-{c['act']}-{c['dtype']}")
def test_tp_triton_stacked_local_gradients_equal_reference(case, monkeypatch):
    """Equal-width hidden layers with one activation: the local gradients of layers 2 … H in one launch."""
    depth, width = case["depth"], case["width"]
    classes = 6 if case["loss"] == "ce" else 3
    dims = (8, *([width] * (depth - 1)), classes)
    dtype = DTYPES[case["dtype"]]
    weights, biases, acts = random_mlp(dims, bias=case["bias"], activation=case["act"], dtype=dtype, seed=5, scale=1.2)
    gen = torch.Generator().manual_seed(6)
    qs = [torch.randn(dims[l - 1], dims[l], generator=gen, dtype=dtype) / dims[l] ** 0.5 for l in range(2, depth + 1)]
    cs = [0.1 * torch.randn(dims[l - 1], generator=gen, dtype=dtype) if case["bias"] else None for l in range(2, depth + 1)]
    x, y = random_batch(dims, case["batch"], case["loss"], dtype=dtype)
    kwargs = dict(beta=0.3, loss=case["loss"], difference=case["difference"])
    calls = count_calls(monkeypatch, local_grad, "stacked_tp_weight_grad")
    out = triton_backend.TritonBackend().tp_grads(Net(weights, biases, acts), Feedback(qs, cs, acts), x, y,
                                                  TPConfig(**kwargs))
    assert len(calls) == 1, "the stacked launch did not run"
    assert_same_tp(out, reference.tp_train_step(weights, biases, acts, qs, cs, acts, x, y, **kwargs), dtype)
