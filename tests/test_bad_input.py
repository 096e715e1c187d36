"""Bad input gets a clear exception naming the argument, the expected and the actual value."""
from __future__ import annotations

import re

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


# ------------------------------------------------------------------------------------------------
# Every public function of pcfast.functional: strict types, the argument named, non-finite results
# refused (ValueError naming the non-finite input, or DivergenceError when the computation itself
# overflowed).


def functional_problem(bias=True):
    m = model(bias)
    weights = [m[0].weight.detach(), m[2].weight.detach()]
    biases = [None if lin.bias is None else lin.bias.detach() for lin in (m[0], m[2])]
    x, labels = good_batch()
    y = torch.nn.functional.one_hot(labels, 3).float()
    gen = torch.Generator().manual_seed(3)
    feedback = [torch.randn(8, 3, generator=gen) / 3**0.5], [torch.zeros(8)]
    return weights, biases, x, y, feedback


def test_gnt_train_step_rejects_a_nan_beta():
    w, b, x, y, _ = functional_problem()
    with pytest.raises(ValueError, match="beta: expected a finite number >= 0, got nan"):
        F.gnt_train_step(w, b, ["tanh"], x, y, beta=float("nan"))
    with pytest.raises(TypeError, match="beta: expected a finite number >= 0, got str"):
        F.gnt_train_step(w, b, ["tanh"], x, y, beta="1.0")


@pytest.mark.parametrize("backend", pcfast.available_backends())
def test_feedback_grads_rejects_a_nan_x(backend):
    w, b, x, _, (q, c) = functional_problem()
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="x: contains NaN or infinite values"):
        F.feedback_grads(w, b, ["tanh"], q, c, None, x, backend=backend)
    noise = [torch.zeros(4, 8)]
    noise[0][0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"noise\[0\]: contains NaN or infinite values"):
        F.feedback_grads(w, b, ["tanh"], q, c, None, x.nan_to_num(), noise, backend=backend)


def test_ridge_feedback_rejects_an_empty_batch_and_a_bad_x():
    w, b, x, _, _ = functional_problem()
    with pytest.raises(ValueError, match=r"x: expected shape \(batch >= 1, 6\), got shape \(0, 6\)"):
        F.ridge_feedback(w, b, ["tanh"], x[:0])
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        F.ridge_feedback(w, b, ["tanh"], x.double())
    with pytest.raises(TypeError, match="bias: expected a bool, got str"):
        F.ridge_feedback(w, b, ["tanh"], x, bias="false")


def _call(name, w, b, x, y, feedback, backend="torch", **kwargs):
    q, c = feedback
    acts = ["tanh"]
    if name == "pc_train_step":
        return F.pc_train_step(w, b, acts, x, y, backend=backend, **kwargs)
    if name == "tp_train_step":
        return F.tp_train_step(w, b, acts, q, c, None, x, y, backend=backend, **kwargs)
    if name == "feedback_grads":
        return F.feedback_grads(w, b, acts, q, c, None, x, backend=backend, **kwargs)
    if name == "ridge_feedback":
        return F.ridge_feedback(w, b, acts, x, **kwargs)
    if name == "bp_train_step":
        return F.bp_train_step(w, b, acts, x, y, **kwargs)
    if name == "gnt_train_step":
        return F.gnt_train_step(w, b, acts, x, y, **kwargs)
    return F.pc_energy(w, b, acts, x, y, [torch.zeros(4, 8)], **kwargs)


FUNCTIONS = ["pc_train_step", "tp_train_step", "feedback_grads", "ridge_feedback", "bp_train_step",
             "gnt_train_step", "pc_energy"]


@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("where", ["weights[1]", "biases[0]"])
def test_nan_parameters_are_named_not_returned(name, where):
    w, b, x, y, feedback = functional_problem()
    w, b = [t.clone() for t in w], [t.clone() for t in b]
    (w if where.startswith("weights") else b)[int(where[-2])].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=re.escape(where) + ": contains NaN or infinite"):
        _call(name, w, b, x, y, feedback)


@pytest.mark.parametrize("backend", pcfast.available_backends())
def test_a_too_large_inference_step_is_a_divergence(backend):
    w, b, x, y, _ = functional_problem()
    with pytest.raises(pcfast.DivergenceError, match="pc_train_step: .* is not finite"):
        F.pc_train_step(w, b, ["tanh"], x * 30, y, inference_lr=1e3, inference_steps=60, backend=backend)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bfloat16, torch.float64])
def test_pc_energy_latents_need_the_models_dtype(dtype):
    w, b, x, y, _ = functional_problem()
    with pytest.raises(TypeError, match=rf"latents\[0\]: expected dtype torch.float32 \(the model's\), got {dtype}"):
        F.pc_energy(w, b, ["tanh"], x, y, [torch.zeros(4, 8, dtype=dtype)])
    with pytest.raises(TypeError, match=r"latents\[0\]: expected a torch.Tensor, got list"):
        F.pc_energy(w, b, ["tanh"], x, y, [[[0.0] * 8] * 4])


@pytest.mark.parametrize("backend", pcfast.available_backends())
@pytest.mark.parametrize("bad", ["float64", "bfloat16", "numpy", "wrong shape"])
def test_feedback_biases_are_checked_alike_on_every_backend(backend, bad):
    import numpy as np

    w, b, x, y, (q, c) = functional_problem()
    c = {"float64": [c[0].double()], "bfloat16": [c[0].bfloat16()], "numpy": [np.zeros(8, dtype=np.float32)],
         "wrong shape": [torch.zeros(3)]}[bad]
    error = TypeError if bad == "numpy" else ValueError
    with pytest.raises(error, match=r"feedback_biases\[0\]: expected"):
        F.feedback_grads(w, b, ["tanh"], q, c, None, x, backend=backend)
    with pytest.raises(error, match=r"feedback_biases\[0\]: expected"):
        F.tp_train_step(w, b, ["tanh"], q, c, None, x, y, backend=backend)


@pytest.mark.parametrize("name, kwargs, message", [
    ("pc_train_step", {"fpa": "false"}, "fpa: expected a bool, got str 'false'"),
    ("pc_train_step", {"fpa": 0}, "fpa: expected a bool, got int 0"),
    ("pc_train_step", {"return_trajectory": None}, "return_trajectory: expected a bool, got NoneType"),
    ("pc_train_step", {"inference_steps": 2.0}, "inference_steps: expected an int >= 0, got float 2.0"),
    ("pc_train_step", {"inference_steps": True}, "inference_steps: expected an int >= 0, got bool True"),
    ("pc_train_step", {"inference_lr": "0.1"}, "inference_lr: expected a finite number > 0, got str"),
    ("pc_train_step", {"precisions": True}, "precisions: expected None, a number or a list"),
    ("pc_train_step", {"precisions": [1.0, "2"]}, r"precisions\[1\]: expected a finite positive number, got str"),
    ("pc_train_step", {"schedule": None}, "schedule: expected one of"),
    ("pc_train_step", {"backend": None}, "backend: expected one of"),
    ("tp_train_step", {"difference": "yes"}, "difference: expected a bool, got str"),
    ("tp_train_step", {"beta": True}, "beta: expected a finite number >= 0, got bool"),
    ("feedback_grads", {"noise_seed": 1.0}, "noise_seed: expected an int >= 0, got float"),
    ("feedback_grads", {"noise_seed": 3, "noise_std": "0.1"}, "noise_std: expected a finite number >= 0, got str"),
    ("ridge_feedback", {"ridge": None}, "ridge: expected a finite number >= 0, got NoneType"),
    ("pc_energy", {"fpa": "no"}, "fpa: expected a bool, got str"),
])
def test_functional_options_are_type_checked(name, kwargs, message):
    w, b, x, y, feedback = functional_problem()
    with pytest.raises((TypeError, ValueError), match=message) as info:
        _call(name, w, b, x, y, feedback, **kwargs)
    if "expected a bool" in message or "got bool" in message:
        assert info.type is TypeError


def _takes(name, where):
    if where == "y":
        return name not in ("feedback_grads", "ridge_feedback")
    if where.startswith("feedback"):
        return name in ("tp_train_step", "feedback_grads")
    return True


@pytest.mark.parametrize("name, where", [
    (name, where) for name in FUNCTIONS
    for where in ["weights", "weights[0]", "biases[1]", "x", "y", "activations", "activations[0]",
                  "feedback_weights[0]", "feedback_biases"] if _takes(name, where)
])
def test_non_tensor_arguments_are_named(name, where):
    w, b, x, y, (q, c) = functional_problem()
    if where == "weights":
        w = None
    elif where == "weights[0]":
        w = [None, w[1]]
    elif where == "biases[1]":
        b = [b[0], b[1].tolist()]
    elif where == "x":
        x = x.numpy()
    elif where == "y":
        y = y.tolist()
    elif where == "feedback_weights[0]":
        q = [None]
    elif where == "feedback_biases":
        c = None
    acts = ["tanh"]
    if where == "activations":
        acts = "tanh"
    elif where == "activations[0]":
        acts = [None]
    pattern = where.replace("[", r"\[").replace("]", r"\]")
    with pytest.raises(TypeError, match=rf"^{pattern}: expected"):
        if acts != ["tanh"]:
            F.pc_train_step(w, b, acts, x, y) if name == "pc_train_step" else F.bp_train_step(w, b, acts, x, y)
        else:
            _call(name, w, b, x, y, (q, c))


@pytest.mark.parametrize("algo", ["pc", "bp", "tp", "dtp"])
@pytest.mark.parametrize("settings", [{"lr": 1e300}, {"lr": 1e300, "momentum": 0.9, "weight_decay": 1e-4},
                                      {"lr": 0.1, "weight_decay": 1e300}])
def test_optimizer_rates_past_float32_are_a_divergence(algo, settings):
    m = model()
    opt = {"pc": pcfast.optim.PC, "bp": pcfast.optim.BP, "tp": pcfast.optim.TP, "dtp": pcfast.optim.DTP}[algo](
        m, **settings)
    x, y = good_batch()
    before = [p.detach().clone() for p in m.parameters()]
    state = {k: v for k, v in opt.state_dict().items()}
    with pytest.raises(pcfast.DivergenceError):
        opt.step(x, y)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    assert all(p.grad is None for p in m.parameters())
    assert opt.state_dict()["state"] == state["state"]


# ------------------------------------------------------------------------------------------------
# Low precision: backend="auto" picks a backend that computes in the model's dtype; an explicit
# backend that cannot says which can.


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_auto_backend_runs_low_precision_models_on_cpu(dtype):
    w, b, x, y, (q, c) = functional_problem()
    w, b, x, y = [t.to(dtype) for t in w], [t.to(dtype) for t in b], x.to(dtype), y.to(dtype)
    q, c = [t.to(dtype) for t in q], [t.to(dtype) for t in c]
    assert pcfast.ops.get_backend("auto", "pc", x.device, dtype).name == "torch"
    auto = F.pc_train_step(w, b, ["tanh"], x, y, inference_steps=3)
    explicit = F.pc_train_step(w, b, ["tanh"], x, y, inference_steps=3, backend="torch")
    assert auto.energy.dtype == dtype and torch.equal(auto.energy, explicit.energy)
    F.tp_train_step(w, b, ["tanh"], q, c, None, x, y)
    F.feedback_grads(w, b, ["tanh"], q, c, None, x)
    m = model().to(dtype)
    opt = pcfast.optim.PC(m, lr=0.1)
    stats = opt.step(x, y)
    assert all(map(lambda v: v == v, stats.values()))


@pytest.mark.parametrize("backend", [name for name in ("cpp", "triton") if pcfast.ops.is_available(name)])
def test_explicit_backend_dtype_error_names_the_backends_that_support_it(backend):
    w, b, x, y, _ = functional_problem()
    w, b, x, y = [t.bfloat16() for t in w], [t.bfloat16() for t in b], x.bfloat16(), y.bfloat16()
    with pytest.raises(TypeError, match=rf"backend='{backend}' does not support dtype torch.bfloat16 on cpu; "
                                        r"backends that do: 'reference', 'torch'"):
        F.pc_train_step(w, b, ["tanh"], x, y, backend=backend)


@pytest.mark.parametrize("backend", [name for name in ("reference", "torch", "cpp", "triton")
                                     if pcfast.ops.is_available(name)])
@pytest.mark.parametrize("change, message", [
    ({"inference_steps": 2.0}, "inference_steps: expected an int >= 0, got float 2.0"),
    ({"inference_steps": 2.5}, "inference_steps: expected an int >= 0, got float 2.5"),
    ({"inference_steps": True}, "inference_steps: expected an int >= 0, got bool"),
    ({"fpa": "false"}, "fpa: expected a bool, got str"),
    ({"inference_lr": "0.1"}, "inference_lr: expected a finite number > 0, got str"),
    ({"beta": "0.1"}, "beta: expected a finite number >= 0, got str"),
    ({"difference": 1}, "difference: expected a bool, got int"),
])
def test_raw_backend_ops_check_their_settings(backend, change, message):
    """The backends behind pcfast.functional, called directly (a Backend from pcfast.ops.get_backend
    with the value types, and the reference's own functions), refuse the same settings."""
    from pcfast import reference
    from pcfast.types import Feedback, Net, PCConfig, TPConfig

    w, b, x, y, (q, c) = functional_problem()
    chosen = pcfast.ops.get_backend(backend, "pc", x.device, x.dtype)
    net = Net(w, b, ["tanh"])
    if "beta" in change or "difference" in change:
        kwargs = {"beta": 0.1, "loss": "mse", "difference": True, **change}
        with pytest.raises(TypeError, match=message):
            chosen.tp_grads(net, Feedback(q, c, ["tanh"]), x, y, TPConfig(**kwargs))
        if backend == "reference":
            with pytest.raises(TypeError, match=message):
                reference.tp_train_step(w, b, ["tanh"], q, c, ["tanh"], x, y, **kwargs)
        return
    kwargs = dict(precisions=[1.0, 1.0], inference_steps=2, inference_lr=0.1, schedule="jacobi", fpa=False, loss="mse")
    kwargs.update(change)
    with pytest.raises(TypeError, match=message):
        chosen.pc_grads(net, x, y, PCConfig.of(len(w), **kwargs))
    if backend == "reference":
        with pytest.raises(TypeError, match=message):
            reference.pc_train_step(w, b, ["tanh"], x, y, **kwargs)
