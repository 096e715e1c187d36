"""Bad input gets a clear exception naming the argument, the expected and the actual value."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pcfast
from pcfast import functional as F


def model(bias=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8, bias=bias), nn.Tanh(), nn.Linear(8, 3, bias=bias))


def good_batch():
    return torch.randn(4, 6), torch.randint(0, 3, (4,))


@pytest.mark.parametrize("module, message", [
    (nn.Sequential(nn.Linear(6, 8), nn.Softplus(), nn.Linear(8, 3)), r"model\[1\]: unsupported module Softplus"),
    (nn.Sequential(nn.Linear(6, 8), nn.Softmax(dim=1), nn.Linear(8, 3)), "unsupported module Softmax"),
    (nn.Sequential(nn.Linear(6, 8), nn.Tanh()), "ends with an activation"),
    (nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.ReLU(), nn.Linear(8, 3)), "two activations in a row"),
    (nn.Sequential(nn.Linear(6, 8), nn.GELU(approximate="tanh"), nn.Linear(8, 3)), "unsupported module GELU"),
    (nn.Conv2d(1, 1, 3), "expected an nn.Sequential"),
    (nn.Sequential(nn.Tanh()), "contains no nn.Linear"),
])
def test_unsupported_modules_raise_type_error_naming_module(module, message):
    with pytest.raises(TypeError, match=message):
        pcfast.parametrize(module, "sp")
    with pytest.raises(TypeError, match=message):
        pcfast.optim.PC(module)


def test_mismatched_linear_sizes():
    with pytest.raises(ValueError, match=r"model\[2\]: Linear expects 7 inputs but the previous Linear gives 8"):
        pcfast.optim.BP(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(7, 3)))


@pytest.mark.parametrize("algo", ["pc", "bp", "tp", "dtp"])
@pytest.mark.parametrize("case", ["x_rank", "x_features", "x_dtype", "x_device", "x_nan", "x_inf", "empty",
                                  "y_shape", "y_range", "y_negative", "y_nan", "y_dtype", "y_float_for_ce",
                                  "y_device", "not_tensor"])
def test_bad_batches(algo, case):
    m = model()
    loss = "ce" if case == "y_float_for_ce" else "mse"
    opt = {"pc": pcfast.optim.PC, "bp": pcfast.optim.BP, "tp": pcfast.optim.TP, "dtp": pcfast.optim.DTP}[algo](m, loss=loss)
    x, y = good_batch()
    expected = {
        "x_rank": (ValueError, r"x: expected shape \(batch >= 1, 6\), got shape \(4, 6, 1\)"),
        "x_features": (ValueError, r"x: expected shape \(batch >= 1, 6\), got shape \(4, 5\)"),
        "x_dtype": (TypeError, "x: expected dtype torch.float32 .* got torch.float64"),
        "x_device": (ValueError, "x: expected device cpu .* got meta"),
        "x_nan": (ValueError, "x: contains NaN or infinite"),
        "x_inf": (ValueError, "x: contains NaN or infinite"),
        "empty": (ValueError, r"x: expected shape \(batch >= 1, 6\), got shape \(0, 6\)"),
        "y_shape": (ValueError, r"y: expected class labels of shape \(4,\), got shape \(4, 1\)"),
        "y_range": (ValueError, r"y: class labels must lie in \[0, 2\], got values in \[0, 3\]"),
        "y_negative": (ValueError, r"y: class labels must lie in \[0, 2\], got values in \[-1, "),
        "y_nan": (ValueError, "y: contains NaN"),
        "y_dtype": (TypeError, "y: expected dtype torch.float32"),
        "y_float_for_ce": (TypeError, "y: loss='ce' expects int64 class labels"),
        "y_device": (ValueError, "y: expected device cpu"),
        "not_tensor": (TypeError, "x: expected a torch.Tensor, got list"),
    }[case]
    if case == "x_rank":
        x = x.unsqueeze(-1)
    elif case == "x_features":
        x = x[:, :5]
    elif case == "x_dtype":
        x = x.double()
    elif case == "x_device":
        x = x.to("meta")
    elif case == "x_nan":
        x[1, 2] = float("nan")
    elif case == "x_inf":
        x[0, 0] = float("inf")
    elif case == "empty":
        x, y = x[:0], y[:0]
    elif case == "y_shape":
        y = y.view(4, 1)
    elif case == "y_range":
        y = torch.tensor([0, 1, 2, 3])
    elif case == "y_negative":
        y = torch.tensor([0, -1, 2, 1])
    elif case == "y_nan":
        y = torch.zeros(4, 3)
        y[0, 0] = float("nan")
    elif case == "y_dtype":
        y = torch.zeros(4, 3, dtype=torch.float64)
    elif case == "y_float_for_ce":
        y = torch.zeros(4, 3)
    elif case == "y_device":
        y = y.to("meta")
    elif case == "not_tensor":
        x = x.tolist()
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(expected[0], match=expected[1]):
        opt.step(x, y)
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before))
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": -1.0}, "lr: expected a finite number > 0"),
    ({"lr": float("nan")}, "lr: expected a finite number > 0"),
    ({"momentum": -0.1}, "momentum: expected a finite number >= 0"),
    ({"weight_decay": float("inf")}, "weight_decay"),
    ({"nesterov": True}, "nesterov: requires momentum > 0"),
    ({"inference_steps": -1}, "inference_steps: expected an int >= 0, got -1"),
    ({"inference_steps": 2.5}, "inference_steps: expected an int >= 0, got 2.5"),
    ({"inference_lr": 0.0}, "inference_lr: expected a finite number > 0"),
    ({"schedule": "gauss-seidel"}, "schedule: expected one of"),
    ({"loss": "hinge"}, "loss: expected one of"),
    ({"backend": "cuda"}, "backend: expected one of"),
])
def test_bad_pc_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pcfast.optim.PC(model(), **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"beta": -1.0}, "beta"),
    ({"feedback": "random"}, "feedback: expected one of"),
    ({"feedback_steps": -2}, "feedback_steps"),
    ({"feedback_activations": ["tanh", "tanh"]}, "feedback_activations: expected 1 names"),
    ({"feedback_activations": ["softsign"]}, r"feedback_activations\[0\]: expected one of"),
    ({"feedback": "ridge", "feedback_activations": ["tanh"]}, "feedback='ridge' needs"),
])
def test_bad_tp_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pcfast.optim.DTP(model(), **kwargs)


def test_parametrization_errors_name_the_missing_call():
    m = model()
    with pytest.raises(ValueError, match="base_width: required for preset='mup'"):
        pcfast.parametrize(m, "mup", algo="pc")
    with pytest.raises(ValueError, match="preset: expected one of"):
        pcfast.parametrize(m, "ntk", base_width=4)
    with pytest.raises(ValueError, match="algo: expected one of"):
        pcfast.parametrize(m, "mup", algo="ep", base_width=4)
    with pytest.raises(ValueError, match=r"gamma_bar: expected a value in \[-1, 0\]"):
        pcfast.parametrize(m, "mup", algo="pc", base_width=4, gamma_bar=-2)
    other = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    par = pcfast.parametrize(other, "mup", algo="pc", base_width=4)
    with pytest.raises(ValueError, match=r"call pcfast.parametrize\(model, ...\) on this model"):
        pcfast.optim.PC(m, par)
    with pytest.raises(ValueError, match=r"algo='pc'.*call pcfast.parametrize\(model, ..., algo='bp'\)"):
        pcfast.optim.BP(other, par)
    with pytest.raises(TypeError, match="parametrization: expected the result of pcfast.parametrize"):
        pcfast.optim.PC(m, {"preset": "mup"})


def test_functional_errors():
    m = model()
    w = [m[0].weight.detach(), m[2].weight.detach()]
    b = [m[0].bias.detach(), m[2].bias.detach()]
    x, y = good_batch()
    with pytest.raises(ValueError, match=r"activations: expected 1 \(one per hidden layer\), got 2"):
        F.pc_train_step(w, b, ["tanh", "tanh"], x, y)
    with pytest.raises(ValueError, match=r"activations\[0\]: expected one of"):
        F.pc_train_step(w, b, ["swish"], x, y)
    with pytest.raises(ValueError, match=r"weights\[1\]: expected 8 input features"):
        F.pc_train_step([w[0], w[1][:, :5]], b, ["tanh"], x, y)
    with pytest.raises(ValueError, match=r"biases\[0\]: expected shape \(8,\)"):
        F.pc_train_step(w, [b[0][:3], b[1]], ["tanh"], x, y)
    with pytest.raises(ValueError, match=r"precisions: expected 2 values"):
        F.pc_train_step(w, b, ["tanh"], x, y, precisions=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"precisions\[1\]: expected a finite positive number"):
        F.pc_train_step(w, b, ["tanh"], x, y, precisions=[1.0, -1.0])
    with pytest.raises(ValueError, match=r"feedback_weights\[0\]: expected shape \(8, 3\)"):
        F.tp_train_step(w, b, ["tanh"], [torch.zeros(3, 8)], [None], None, x, y)
    if "cpp" not in pcfast.available_backends():
        with pytest.raises(RuntimeError, match="backend='cpp' is not available here .*pcfast._C"):
            F.pc_train_step(w, b, ["tanh"], x, y, backend="cpp")


def test_import_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, pcfast; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("change, error, message", [
    ("one layer short", ValueError, "one LayerSGD per layer"),
    ("not a LayerSGD", TypeError, "expected a pcfast.sgd.LayerSGD"),
    ("negative rate", ValueError, r"sgd\[0\].weight_lr"),
    ("nan momentum", ValueError, r"sgd\[1\].momentum"),
    ("nesterov without momentum", ValueError, "nesterov"),
    ("buffer without momentum", ValueError, "without momentum"),
    ("buffer of the wrong shape", ValueError, r"sgd\[0\].weight_buffer"),
    ("one of two buffers", ValueError, "both momentum buffers or neither"),
])
def test_pc_train_step_sgd_argument_errors_name_the_layer(change, error, message):
    from pcfast.sgd import LayerSGD

    m = model()
    weights = [m[0].weight.detach(), m[2].weight.detach()]
    biases = [m[0].bias.detach(), m[2].bias.detach()]
    steps = [LayerSGD(weight_lr=0.1, bias_lr=0.1, momentum=0.9) for _ in weights]
    if change == "one layer short":
        steps = steps[:1]
    elif change == "not a LayerSGD":
        steps[1] = {"weight_lr": 0.1}
    elif change == "negative rate":
        steps[0].weight_lr = -1.0
    elif change == "nan momentum":
        steps[1].momentum = float("nan")
    elif change == "nesterov without momentum":
        steps[0] = LayerSGD(weight_lr=0.1, nesterov=True)
    elif change == "buffer without momentum":
        steps[0] = LayerSGD(weight_lr=0.1, weight_buffer=torch.zeros(8, 6), bias_buffer=torch.zeros(8))
    elif change == "buffer of the wrong shape":
        steps[0].weight_buffer, steps[0].bias_buffer = torch.zeros(6, 8), torch.zeros(8)
    elif change == "one of two buffers":
        steps[1].weight_buffer = torch.zeros(3, 8)
    x, y = good_batch()
    with pytest.raises(error, match=message):
        F.pc_train_step(weights, biases, ["tanh"], x, y, inference_steps=2, sgd=steps, backend="torch")
