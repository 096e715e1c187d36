"""Conv nets through the whole stack: the model parser, ``pcfast.functional`` and the optimizers.

Oracle: ``pcfast.reference.conv`` (autograd on the energy and the local losses, float64). A step of
an optimizer at SP with plain SGD is ``θ − lr · g`` with g the reference's gradients for the same
batch, on every backend that runs conv nets; BP also equals ``torch.optim.SGD`` + ``backward()``.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pcfast
from pcfast import functional, reference
from pcfast.network import ConvGeometry, parse_mlp
from pcfast.ops import get_backend
from pcfast.types import Net

TOL = dict(rtol=1e-10, atol=1e-12)


def _cnn(pool: str = "max", bias: bool = True, activation: type = nn.Tanh) -> nn.Sequential:
    """Padding, a pooling, stride 2 with a rectangular kernel, then two linear layers; 2×9×9 images,
    float64."""
    torch.manual_seed(0)
    pooling = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2, stride=1)
    convs = [nn.Conv2d(2, 4, 3, padding=1, bias=bias), activation(), pooling,
             nn.Conv2d(4, 3, (3, 2), stride=2, bias=bias), activation(), nn.Flatten()]
    features = nn.Sequential(*convs)(torch.zeros(1, 2, 9, 9)).shape[1]
    return nn.Sequential(*convs, nn.Linear(features, 6, bias=bias), activation(), nn.Linear(6, 5, bias=bias)).double()


def _batch(loss: str = "mse", batch: int = 3):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 2, 9, 9, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (batch,), generator=gen)
    return x, y


def _target(y: torch.Tensor, loss: str) -> torch.Tensor:
    return torch.nn.functional.one_hot(y, 5).double() if loss == "mse" else y


def _layers(model: nn.Module):
    parsed = parse_mlp(model)
    net = Net([m.weight.detach() for m in parsed.linears], [None if m.bias is None else m.bias.detach()
                                                             for m in parsed.linears],
              parsed.activations, geometry=parsed.geometry)
    return net.layers()


def _sgd_equals(model_before: nn.Module, model_after: nn.Module, weight_grads, bias_grads, lr: float) -> None:
    before, after = parse_mlp(model_before).linears, parse_mlp(model_after).linears
    for l, (b, a) in enumerate(zip(before, after)):
        torch.testing.assert_close(a.weight, b.weight - lr * weight_grads[l], **TOL)
        if b.bias is not None:
            torch.testing.assert_close(a.bias, b.bias - lr * bias_grads[l], **TOL)


# --------------------------------------------------------------------------------------------------
# The parser


def test_a_conv_net_is_read_with_its_geometry():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding="same"), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 5, (5, 3), stride=(2, 2), dilation=1, bias=False), nn.Tanh(), nn.AvgPool2d(3, 2),
                          nn.Flatten(), nn.Linear(20, 7), nn.GELU(), nn.Linear(7, 3))
    parsed = parse_mlp(model)
    assert parsed.is_conv and parsed.depth == 4
    assert parsed.activations == ("relu", "tanh", "gelu")
    assert parsed.geometry == (ConvGeometry(1, 1, 1, ("max", 2, 2)), ConvGeometry(2, 0, 1, ("avg", 3, 2)), None, None)
    assert parsed.widths == (1, 4, 5, 7, 3)
    assert all(a is b for a, b in zip(parsed.linears, (model[0], model[3], model[7], model[9])))


def test_a_module_holding_a_conv_net_is_probed_and_accepted():
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.MaxPool2d(2))
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 3 * 3, 4))

        def forward(self, x):
            return self.head(self.features(x))

    assert parse_mlp(Holder()).geometry[0] == ConvGeometry(pool=("max", 2, 2))

    class Skips(Holder):
        def forward(self, x):
            return self.head(self.features(x) * 2)

    with pytest.raises(TypeError, match="forward must compute exactly the chain"):
        parse_mlp(Skips())


@pytest.mark.parametrize("build, message", [
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Linear(2, 2)), r"needs an nn\.Flatten\(\) before it"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2, 2)),
     r"model\[2\]: an activation after the pooling \(model\[1\]\)"),
    (lambda: nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(2, 2)), "groups=2 is not supported"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, stride=(1, 2)), nn.Flatten(), nn.Linear(2, 2)),
     r"stride=\(1, 2\) is not supported"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding_mode="circular"), nn.Flatten(), nn.Linear(2, 2)),
     "padding_mode='circular'"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, padding=1), nn.Flatten(), nn.Linear(2, 2)),
     r"model\[1\]: MaxPool2d.*not supported"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2, 2)),
     "two poolings"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Conv2d(4, 2, 1)), r"an nn\.Conv2d after an nn\.Linear"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3)), r"ends with an nn\.Conv2d"),
    (lambda: nn.Sequential(nn.Linear(4, 4), nn.MaxPool2d(2), nn.Linear(4, 2)), "pooling is supported after a conv"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout2d(), nn.Flatten(), nn.Linear(2, 2)), "unsupported module"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 2)),
     "BatchNorm2d is not supported"),
])
def test_refused_conv_models_say_why(build, message):
    with pytest.raises(TypeError, match=message):
        parse_mlp(build())


def test_channels_that_do_not_chain_are_a_value_error():
    with pytest.raises(ValueError, match=r"model\[2\]: Conv2d expects 3 input channels but the previous Conv2d gives 2"):
        parse_mlp(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2, 2)))


# --------------------------------------------------------------------------------------------------
# Backends


def test_only_the_torch_and_reference_backends_run_conv_nets():
    cpu = torch.device("cpu")
    assert get_backend("auto", "pc", cpu, torch.float32, conv=True).name == "torch"
    assert get_backend("reference", "tp", cpu, torch.float64, conv=True).name == "reference"
    if pcfast.ops.is_available("cpp"):
        assert get_backend("auto", "pc", cpu, torch.float32).name == "cpp"  # MLPs keep the C++ engine
        with pytest.raises(NotImplementedError, match="runs MLPs only; conv nets run on backend='torch'"):
            get_backend("cpp", "pc", cpu, torch.float32, conv=True)


def test_net_checks_conv_layers():
    w = [torch.randn(4, 1, 3, 3), torch.randn(10, 36)]
    geometry = (ConvGeometry(pool=("max", 2, 2)), None)
    net = Net(w, [None, None], ["relu"], geometry=geometry)
    assert net.kinds == ("conv", "linear") and net.is_conv
    net.check_input(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="weight has 36 input features, its input has 60"):
        net.check_input(torch.randn(2, 1, 9, 12))
    with pytest.raises(ValueError, match=r"weights\[0\]: expected a 4-D"):
        Net([torch.randn(4, 9), w[1]], [None, None], ["relu"], geometry=geometry)
    with pytest.raises(ValueError, match="conv layers come first"):
        Net([torch.randn(4, 9), torch.randn(3, 4, 1, 1), torch.randn(2, 3)], [None] * 3, ["tanh", "tanh"],
            geometry=(None, ConvGeometry(), None))
    with pytest.raises(ValueError, match="the readout must be a linear layer"):
        Net(w, [None, None], ["relu"], geometry=(geometry[0], ConvGeometry()))
    with pytest.raises(ValueError, match=r"kinds\[0\]: 'linear' disagrees with geometry\[0\]"):
        Net(w, [None, None], ["relu"], kinds=("linear", "linear"), geometry=geometry)


# --------------------------------------------------------------------------------------------------
# Optimizers against the reference


@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("schedule, fpa, loss", [("jacobi", False, "mse"), ("sequential", True, "ce")])
def test_pc_step_is_sgd_on_the_reference_gradients(backend, pool, schedule, fpa, loss):
    model = (_cnn(pool))
    before = copy.deepcopy(model)
    x, y = _batch(loss)
    settings = dict(inference_steps=4, inference_lr=0.1, schedule=schedule, fpa=fpa, loss=loss)
    opt = pcfast.optim.PC(model, lr=0.05, backend=backend, **settings)
    stats = opt.step(x, y)
    expected = reference.conv_pc_train_step(_layers(before), x, _target(y, loss), **settings)
    _sgd_equals(before, model, expected.weight_grads, expected.bias_grads, 0.05)
    assert stats["energy"] == pytest.approx(float(expected.energy) / x.shape[0], rel=1e-10)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("algo", ["TP", "DTP"])
def test_tp_step_is_sgd_on_the_reference_gradients(backend, algo):
    model = (_cnn("max"))
    before = copy.deepcopy(model)
    x, y = _batch()
    opt = getattr(pcfast.optim, algo)(model, lr=0.05, backend=backend, beta=0.3, feedback_steps=0)
    qs, cs = [q.clone() for q in opt.feedback_weights], [c.clone() for c in opt.feedback_biases]
    opt.step(x, y)
    expected = reference.conv_tp_train_step(_layers(before), qs, cs, list(opt.feedback_activations), x,
                                            _target(y, "mse"), beta=0.3, difference=algo == "DTP")
    _sgd_equals(before, model, expected.weight_grads, expected.bias_grads, 0.05)


def test_dtp_feedback_training_is_sgd_on_the_reference_reconstruction_gradients():
    model = (_cnn("avg"))
    x, y = _batch()
    opt = pcfast.optim.DTP(model, lr=0.05, backend="torch", feedback_lr=0.1, feedback_steps=1, feedback_noise=0.0,
                           beta=0.3)
    qs, cs = [q.clone() for q in opt.feedback_weights], [c.clone() for c in opt.feedback_biases]
    assert [tuple(q.shape) for q in qs] == [tuple(model[3].weight.shape), (model[6].in_features, 6), (6, 5)]
    assert [tuple(c.shape) for c in cs] == [(4,), (model[6].in_features,), (6,)]
    expected = reference.conv_feedback_grads(_layers(model), qs, cs, list(opt.feedback_activations), x, None)
    mults = opt.feedback_lr_mults
    opt.step(x, y)
    for k, (q, c) in enumerate(zip(opt.feedback_weights, opt.feedback_biases)):
        torch.testing.assert_close(q, qs[k] - 0.1 * mults[k] * expected.weight_grads[k], **TOL)
        torch.testing.assert_close(c, cs[k] - 0.1 * mults[k] * expected.bias_grads[k], **TOL)


def test_noisy_dtp_on_a_conv_net_trains_and_resumes_bitwise():
    x, y = _batch(batch=4)
    model = (_cnn("max"))
    opt = pcfast.optim.DTP(model, lr=0.05, feedback_noise=0.1, feedback_steps=2)
    opt.step(x, y)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.step(x, y)
    twin = (_cnn("max"))
    twin.load_state_dict(saved_model)
    twin_opt = pcfast.optim.DTP(twin, lr=0.05, feedback_noise=0.1, feedback_steps=2)
    twin_opt.load_state_dict(saved_opt)
    twin_opt.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(opt.feedback_weights, twin_opt.feedback_weights))


def test_bp_step_is_torch_sgd_and_backward():
    model = (_cnn("avg", activation=nn.ReLU))
    twin = copy.deepcopy(model)
    x, y = _batch("ce")
    pcfast.optim.BP(model, lr=0.1, loss="ce", momentum=0.9).step(x, y)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    torch.nn.functional.cross_entropy(twin(x), y).backward()
    opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, **TOL)


def test_gnt_step_is_sgd_on_the_reference_gradients():
    model = (_cnn("max"))
    before = copy.deepcopy(model)
    x, y = _batch(batch=2)
    pcfast.optim.GNT(model, lr=0.05, beta=0.5).step(x, y)
    expected = reference.conv_gnt_train_step(_layers(before), x, _target(y, "mse"), beta=0.5)
    _sgd_equals(before, model, expected.weight_grads, expected.bias_grads, 0.05)


def test_gnt_local_gradients_are_those_of_the_targets():
    """Oracle: ``½‖u_l − (u_l + Δu_l)‖²``'s gradient is ``−Δu_l ⋆ h_{l-1}`` (conv) / ``−Δu_lᵀ h`` (linear)."""
    layers = _layers((_cnn("max")))
    x, y = _batch(batch=2)
    target = _target(y, "mse")
    deltas = reference.conv_gnt_targets(layers, x, target, beta=0.5)
    _, hs = reference.conv_forward(layers, x)
    grads = reference.conv_gnt_train_step(layers, x, target, beta=0.5)
    conv = layers[0]
    expected = -torch.nn.grad.conv2d_weight(hs[0], conv.weight.shape, deltas[0], conv.stride, conv.padding) / 2
    torch.testing.assert_close(grads.weight_grads[0], expected, **TOL)
    torch.testing.assert_close(grads.weight_grads[-1], -(deltas[-1].T @ hs[-1].flatten(1)) / 2, **TOL)
    torch.testing.assert_close(grads.bias_grads[0], -deltas[0].sum((0, 2, 3)) / 2, **TOL)


def test_functional_takes_a_conv_geometry():
    model = (_cnn("max"))
    parsed = parse_mlp(model)
    x, y = _batch()
    weights, biases = parsed.weights(), parsed.biases()
    result = functional.pc_train_step(weights, biases, parsed.activations, x, y, geometry=parsed.geometry,
                                      inference_steps=3, backend="torch")
    expected = reference.conv_pc_train_step(_layers(model), x, _target(y, "mse"), inference_steps=3)
    for a, b in zip(result.weight_grads, expected.weight_grads):
        torch.testing.assert_close(a, b, **TOL)
    bp = functional.bp_train_step(weights, biases, parsed.activations, x, y, geometry=parsed.geometry)
    for a, b in zip(bp.weight_grads, reference.conv_bp_train_step(_layers(model), x, _target(y, "mse")).weight_grads):
        torch.testing.assert_close(a, b, **TOL)
    with pytest.raises(ValueError, match=r"x: expected images of shape \(batch >= 1, 2, height, width\)"):
        functional.pc_train_step(weights, biases, parsed.activations, x.flatten(1), y, geometry=parsed.geometry)
    with pytest.raises(NotImplementedError, match="runs MLPs only"):
        if not pcfast.ops.is_available("cpp"):
            raise NotImplementedError("runs MLPs only")  # no C++ engine here: nothing to refuse
        functional.pc_train_step(weights, biases, parsed.activations, x, y, geometry=parsed.geometry, backend="cpp")


# --------------------------------------------------------------------------------------------------
# Bad input and all-or-nothing steps


@pytest.mark.parametrize("algo", ["PC", "BP", "DTP"])
def test_bad_images_are_refused_and_change_nothing(algo):
    model = (_cnn("max"))
    opt = getattr(pcfast.optim, algo)(model)
    before = copy.deepcopy(model.state_dict())
    x, y = _batch()
    with pytest.raises(ValueError, match=r"x: expected images of shape"):
        opt.step(x.flatten(1), y)
    with pytest.raises(ValueError, match=r"input features, its input has"):
        opt.step(torch.randn(3, 2, 12, 12, dtype=torch.float64), y)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x: contains NaN"):
        opt.step(bad, y)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_ridge_feedback_is_refused_for_conv_nets():
    with pytest.raises(ValueError, match="feedback='ridge' is defined for MLPs only"):
        pcfast.optim.DTP((_cnn("max")), feedback="ridge", feedback_activations=["identity"] * 3)


def test_a_diverging_conv_relaxation_raises_and_changes_nothing():
    model = (_cnn("avg"))
    opt = pcfast.optim.PC(model, inference_lr=3.0, inference_steps=8)
    before = copy.deepcopy(model.state_dict())
    x, y = _batch()
    with pytest.raises(pcfast.DivergenceError, match="PC relaxation diverged"):
        opt.step(x * 20, y)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_mlp_only_backends_are_refused_when_the_optimizer_is_built(backend):
    with pytest.raises(ValueError, match=f"backend='{backend}' runs MLPs only; conv nets run on backend='torch'"):
        pcfast.optim.PC(_cnn("max"), backend=backend)


def test_ipc_refuses_conv_nets():
    with pytest.raises(TypeError, match="IPC trains MLPs only"):
        pcfast.optim.IPC(_cnn("max"))
