"""The prediction GEMM with its epilogues (``pcfast/ops/linear_epilogue.py``): each launcher against
its formula in torch, on shapes spanning several interpreter tiles, and the CE row-wise kernel
(wide class rows) inside whole PC and DTP steps against ``pcfast.reference``."""
import pytest
import torch

pytest.importorskip("triton")

from pcfast import reference
from pcfast.activations import phi
from pcfast.ops import linear_epilogue, tp_targets
from pcfast.ops import triton as triton_backend
from pcfast.ops._triton_common import Noise
from pcfast.testing import assert_close
from pcfast.types import Feedback, Net, PCConfig, TPConfig
from tests.conftest import random_batch
from tests.ops.cases import assert_same_pc, assert_same_tp, pc_kwargs, pc_network, tp_network

BATCH, FEATURES, CLASSES = 33, 37, 40  # over one 32 × 32 × 32 interpreter tile on every axis


def _operands(bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(BATCH, FEATURES, generator=gen, dtype=torch.float64)
    w = torch.randn(CLASSES, FEATURES, generator=gen, dtype=torch.float64) / FEATURES**0.5
    b = 0.1 * torch.randn(CLASSES, generator=gen, dtype=torch.float64) if bias else None
    return a, w, b


def _affine(a, w, b, act_in="identity"):
    pred = phi(act_in)(a) @ w.T
    return pred if b is None else pred + b


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_stores_prediction_and_activation(bias):
    a, w, b = _operands(bias)
    pred = torch.empty(BATCH, CLASSES, dtype=torch.float64)
    out = linear_epilogue.linear(a, w, b, act_in="sigmoid", act_out="gelu", pred=pred)
    expected = _affine(a, w, b, "sigmoid")
    assert_close(pred, expected, name="prediction")
    assert_close(out, phi("gelu")(expected), name="activation")


def test_linear_reads_its_operand_with_the_seeded_noise():
    """``noise``: a + σ ξ with ξ the numbers ``gaussian_noise`` stores for the seed."""
    a, w, b = _operands()
    xi = tp_targets.gaussian_noise(5, 0.3, BATCH, [FEATURES], dtype=a.dtype, device=a.device)[0]
    out = linear_epilogue.linear(a, w, b, act_out="tanh", noise=Noise(5, 0.3, 0))
    assert_close(out, torch.tanh(_affine(a + xi, w, b)), name="noisy activation")


def test_hidden_error_is_latent_minus_prediction():
    a, w, b = _operands()
    z = torch.randn(BATCH, CLASSES, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = linear_epilogue.hidden_error(a, w, b, z, act_in="tanh")
    assert_close(out, z - _affine(a, w, b, "tanh"), name="hidden error")


@pytest.mark.parametrize("loss, fused_max", [("mse", 256), ("ce", 256), ("ce", 0)], ids=["mse", "ce-fused", "ce-rows"])
def test_output_error_is_the_scaled_negative_loss_gradient(loss, fused_max):
    """out = f + β (−∂ℓ/∂f) (TP's output target) with f stored: MSE y − f; CE onehot(y) − softmax(f),
    in one tile or by the row-wise kernel."""
    a, w, b = _operands()
    gen = torch.Generator().manual_seed(2)
    target = (torch.randint(0, CLASSES, (BATCH,), generator=gen) if loss == "ce"
              else torch.randn(BATCH, CLASSES, generator=gen, dtype=torch.float64))
    pred = torch.empty(BATCH, CLASSES, dtype=torch.float64)
    objective = linear_epilogue.OutputLoss(target, loss, scale=0.4, add_pred=True)
    out = linear_epilogue.output_error(a, w, b, objective, pred=pred, act_in="relu", ce_fused_max_classes=fused_max)
    f = _affine(a, w, b, "relu")
    if loss == "ce":
        gradient = torch.nn.functional.one_hot(target, CLASSES).double() - torch.softmax(f, dim=1)
    else:
        gradient = target - f
    assert_close(pred, f, name="prediction")
    assert_close(out, f + 0.4 * gradient, name="output target")


@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
def test_pc_triton_ce_row_kernel_equals_reference(schedule):
    """Class rows wider than one tile: logits stored, then ``_ce_error_kernel`` (forced here)."""
    case = dict(batch=5, width=17, depth=3, schedule=schedule, fpa=False, bias=True, dtype="f64", loss="ce", act_offset=0)
    dims, weights, biases, acts = pc_network(case)
    x, y = random_batch(dims, 5, "ce")
    kwargs = pc_kwargs(case, 3)
    with triton_backend.options(ce_fused_max_classes=0):
        out = triton_backend.TritonBackend().pc_grads(Net(weights, biases, acts), x, y,
                                                      PCConfig.of(len(weights), **kwargs))
    assert_same_pc(out, reference.pc_train_step(weights, biases, acts, x, y, **kwargs), torch.float64)


def test_dtp_triton_ce_row_kernel_equals_reference():
    """Output target ``f + β (onehot − softmax)`` through ``_ce_error_kernel`` (forced here)."""
    case = dict(batch=33, width=17, depth=3, difference=True, bias=True, dtype="f64", loss="ce", act_offset=1)
    dims, weights, biases, acts, qs, cs, psis = tp_network(case)
    x, y = random_batch(dims, 33, "ce")
    kwargs = dict(beta=0.5, loss="ce", difference=True)
    with triton_backend.options(ce_fused_max_classes=0):
        out = triton_backend.TritonBackend().tp_grads(Net(weights, biases, acts), Feedback(qs, cs, psis), x, y,
                                                      TPConfig(**kwargs))
    assert_same_tp(out, reference.tp_train_step(weights, biases, acts, qs, cs, psis, x, y, **kwargs), torch.float64)


def test_output_loss_checks_its_target():
    """MSE reads a float (B, C) target with its strides; CE int64 labels (B,) with class stride 0."""
    y = torch.zeros(5, 3, dtype=torch.float64)
    assert linear_epilogue.OutputLoss(y.T.contiguous().T, "mse").target_strides(5, 3) == (1, 5)
    assert linear_epilogue.OutputLoss(torch.zeros(5, dtype=torch.int64), "ce").target_strides(5, 3) == (1, 0)
    with pytest.raises(ValueError, match=r"target: expected int64 labels of shape \(5,\)"):
        linear_epilogue.OutputLoss(torch.zeros(5), "ce").target_strides(5, 3)
    with pytest.raises(ValueError, match="target"):
        linear_epilogue.OutputLoss(y, "mse").target_strides(5, 4)
    with pytest.raises(ValueError, match="loss: expected 'mse' or 'ce'"):
        linear_epilogue.OutputLoss(y, "l1").target_strides(5, 3)
