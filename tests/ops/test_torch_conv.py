"""``pcfast.ops.torch_conv`` (PC on conv nets, explicit formulas) against its oracle, the float64
specification ``pcfast.reference.conv.conv_pc_train_step`` (autograd of the energy).

Whole 5-step trajectories, errors, weight and bias gradients, energy and loss agree to 1e-10 in
float64 on a fixed sample of awkward networks that covers every value of every axis (batch 1 and 5;
channels 1, 3, 7; kernels 1, 3, 5; stride 1 and 2; padding 0 and 1; odd image sizes; biases on and
off; max, avg and no pooling with overlapping windows; dilation; MSE and CE; jacobi and sequential;
FPA on and off), and to float32's tolerance in float32. Also: no autograd is used, arg-max ties route
as ``max_pool2d``'s own backward does, each inference-control setting runs, and bad input raises.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as nnf

from pcfast.ops import torch_conv
from pcfast.ops.torch_conv import _ConvRelaxation, conv_pc_grads
from pcfast.ops.torch_pc import _loss_sum, relax
from pcfast.reference.conv import ConvLayer, LinearLayer, conv_forward, conv_pc_train_step
from pcfast.testing import assert_all_close, assert_close
from pcfast.types import PCConfig

TIGHT = {"atol": 1e-10, "rtol": 1e-10}
STEPS, RATE, CLASSES = 5, 0.2, 4
ACTIVATIONS = ("tanh", "relu", "gelu", "sigmoid")

AXES = {
    "batch": (1, 5),
    "c_in": (1, 3, 7),
    "c_hidden": (1, 3, 7),
    "kernel": (1, 3, 5),
    "stride": (1, 2),
    "padding": (0, 1),
    "image": ((7, 7), (9, 11), (10, 7)),
    "bias": (True, False),
    "pool": ("max", "avg", None),
    "pool_shape": ((2, 2), (3, 2), (2, 1)),  # (kernel, stride); 3/2 and 2/1 windows overlap
    "second": ("conv", "dilated", "none"),  # layer 2: conv k3 p1, conv k3 d2 p2 s2, or no second conv
    "activation": ACTIVATIONS,
    "loss": ("mse", "ce"),
    "schedule": ("jacobi", "sequential"),
    "fpa": (False, True),
}
COUNT = 24


@dataclass(frozen=True)
class Case:
    batch: int
    c_in: int
    c_hidden: int
    kernel: int
    stride: int
    padding: int
    image: tuple[int, int]
    bias: bool
    pool: str | None
    pool_shape: tuple[int, int]
    second: str
    activation: str
    loss: str
    schedule: str
    fpa: bool

    def __str__(self) -> str:
        pool = f"{self.pool}{self.pool_shape[0]}s{self.pool_shape[1]}" if self.pool else "nopool"
        return (f"B{self.batch}-c{self.c_in}x{self.c_hidden}-k{self.kernel}s{self.stride}p{self.padding}-"
                f"{self.image[0]}x{self.image[1]}-{'bias' if self.bias else 'nobias'}-{pool}-{self.second}-"
                f"{self.activation}-{self.loss}-{self.schedule}-{'fpa' if self.fpa else 'nofpa'}")


def _cases() -> list[Case]:
    """COUNT cases: each axis's values repeated to COUNT entries, shuffled with a seed of its own."""
    columns = {}
    for i, (name, values) in enumerate(AXES.items()):
        column = [values[j % len(values)] for j in range(COUNT)]
        random.Random(100 + i).shuffle(column)
        columns[name] = column
    return [Case(**{name: columns[name][j] for name in AXES}) for j in range(COUNT)]


CASES = _cases()


def test_the_cases_cover_every_value_of_every_axis():
    for name, values in AXES.items():
        assert {getattr(case, name) for case in CASES} == set(values), name


def _randn(gen, *shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _conv(gen, c_out, c_in, k, bias, **options):
    weight = 1.3 * _randn(gen, c_out, c_in, k, k) / (c_in * k * k) ** 0.5
    return ConvLayer(weight, 0.1 * _randn(gen, c_out) if bias else None, **options)


def _linear(gen, d_out, d_in, bias, activation="identity"):
    return LinearLayer(1.3 * _randn(gen, d_out, d_in) / d_in**0.5, 0.1 * _randn(gen, d_out) if bias else None,
                       activation)


def _size(size, k, s, p, d=1):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def build(case: Case, seed: int = 0):
    """The case's network (float64) and a batch: conv (pooled) → [conv] → linear → linear readout."""
    gen = torch.Generator().manual_seed(seed)
    acts = [ACTIVATIONS[(ACTIVATIONS.index(case.activation) + j) % len(ACTIVATIONS)] for j in range(3)]
    size = [_size(n, case.kernel, case.stride, case.padding) for n in case.image]
    pool = None
    if case.pool is not None:
        kernel = min(case.pool_shape[0], *size)  # a window no larger than the image
        pool = (case.pool, kernel, case.pool_shape[1])
        size = [_size(n, kernel, case.pool_shape[1], 0) for n in size]
    layers = [_conv(gen, case.c_hidden, case.c_in, case.kernel, case.bias, stride=case.stride,
                    padding=case.padding, activation=acts[0], pool=pool)]
    channels = case.c_hidden
    if case.second != "none":
        dilation, stride = (2, 2) if case.second == "dilated" else (1, 1)
        size = [_size(n, 3, stride, dilation, dilation) for n in size]
        second_pool = None
        if case.pool is not None and min(size) >= 2:  # the other kind, overlapping windows
            second_pool = ("avg" if case.pool == "max" else "max", 2, 1)
            size = [n - 1 for n in size]
        layers.append(_conv(gen, 4, channels, 3, not case.bias, stride=stride, padding=dilation, dilation=dilation,
                            activation=acts[1], pool=second_pool))
        channels = 4
    flat = channels * size[0] * size[1]
    layers += [_linear(gen, 6, flat, case.bias, acts[2]), _linear(gen, CLASSES, 6, case.bias)]
    x = _randn(gen, case.batch, case.c_in, *case.image)
    y = (_randn(gen, case.batch, CLASSES) if case.loss == "mse"
         else torch.randint(CLASSES, (case.batch,), generator=gen))
    return layers, x, y


def _gammas(depth):
    return [1.0, 0.6, 1.5][: depth - 1] + [0.8]


def _settings(case, depth, steps=STEPS):
    return dict(precisions=_gammas(depth), inference_steps=steps, inference_lr=RATE, schedule=case.schedule,
                fpa=case.fpa, loss=case.loss, return_trajectory=True)


def _cast(layers, dtype):
    cast = lambda t: None if t is None else t.to(dtype)
    return [replace(layer, weight=cast(layer.weight), bias=cast(layer.bias)) for layer in layers]


def _compare(out, ref, **tol):
    assert len(out.trajectory) == len(ref.trajectory)
    for t, (a, e) in enumerate(zip(out.trajectory, ref.trajectory)):
        assert_all_close(a, e, name=f"latents after step {t}", **tol)
    assert_all_close(out.errors, ref.errors, name="errors", **tol)
    assert_all_close(out.weight_grads, ref.weight_grads, name="weight grads", **tol)
    assert_all_close(out.bias_grads, ref.bias_grads, name="bias grads", **tol)
    assert_close(out.energy, ref.energy, name="energy", **tol)
    assert_close(out.loss, ref.loss, name="loss", **tol)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_conv_equals_reference(case):
    layers, x, y = build(case)
    settings = _settings(case, len(layers))
    ref = conv_pc_train_step(layers, x, y, **settings)
    out = conv_pc_grads(layers, x, y, PCConfig(tuple(settings.pop("precisions")), **settings))
    _compare(out, ref, **TIGHT)
    moved = max(float((a - b).abs().max()) for a, b in zip(ref.trajectory[-1], ref.trajectory[0]))
    assert moved > 1e-3, "the relaxation should move the latents"


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2]], ids=str)
def test_torch_conv_float32(case):
    layers, x, y = build(case, seed=3)
    settings = _settings(case, len(layers))
    ref = conv_pc_train_step(layers, x, y, **settings)
    layers32, x32 = _cast(layers, torch.float32), x.to(torch.float32)
    y32 = y.to(torch.float32) if case.loss == "mse" else y
    out = conv_pc_grads(layers32, x32, y32, PCConfig(tuple(settings.pop("precisions")), **settings))
    assert out.energy.dtype == torch.float32 and out.weight_grads[0].dtype == torch.float32
    _compare(out, ref, dtype=torch.float32)


@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
@pytest.mark.parametrize("fpa", [False, True])
@pytest.mark.parametrize("depth", [1, 2])
def test_shallow_nets_and_no_steps(depth, fpa, schedule):
    """A readout alone on the image, a conv then the readout; T = 0 and T = 3."""
    gen = torch.Generator().manual_seed(7)
    conv = _conv(gen, 3, 2, 3, True, stride=2, padding=1, activation="tanh", pool=("max", 2, 1))
    layers = [_linear(gen, CLASSES, 2 * 7 * 9, True)] if depth == 1 else [conv, _linear(gen, CLASSES, 3 * 3 * 4, False)]
    x, y = _randn(gen, 2, 2, 7, 9), _randn(gen, 2, CLASSES)
    for steps in (0, 3):
        settings = dict(precisions=_gammas(depth), inference_steps=steps, inference_lr=RATE, schedule=schedule,
                        fpa=fpa, return_trajectory=True)
        ref = conv_pc_train_step(layers, x, y, **settings)
        out = conv_pc_grads(layers, x, y, PCConfig(tuple(settings.pop("precisions")), **settings))
        _compare(out, ref, **TIGHT)


@pytest.mark.parametrize("fpa", [False, True])
def test_max_pool_ties_route_as_its_backward(fpa):
    """An image constant over each channel and a 1×1 conv: every window is a tie (overlapping windows
    share their arg-max), routed to the index ``max_pool2d`` returns, as autograd routes it."""
    gen = torch.Generator().manual_seed(11)
    layers = [_conv(gen, 3, 2, 1, True, activation="identity", pool=("max", 3, 2)),
              _conv(gen, 2, 3, 3, True, padding=1, activation="tanh"), _linear(gen, CLASSES, 2 * 3 * 4, True)]
    x = _randn(gen, 2, 2, 1, 1).expand(2, 2, 7, 9).contiguous()
    y = _randn(gen, 2, CLASSES)
    settings = dict(precisions=_gammas(3), inference_steps=3, inference_lr=RATE, fpa=fpa, return_trajectory=True)
    ref = conv_pc_train_step(layers, x, y, **settings)
    out = conv_pc_grads(layers, x, y, PCConfig(tuple(settings.pop("precisions")), **settings))
    _compare(out, ref, **TIGHT)


@pytest.mark.parametrize("case", [case for case in CASES if case.pool is not None and case.c_hidden > 1][:4], ids=str)
def test_channels_last_input(case):
    """An input in channels-last memory format runs the whole state in it (max pooling's CPU kernel is
    faster there), with the same numbers."""
    layers, x, y = build(replace(case, c_in=3))
    settings = _settings(case, len(layers))
    ref = conv_pc_train_step(layers, x, y, **settings)
    x_last = x.contiguous(memory_format=torch.channels_last)
    out = conv_pc_grads(layers, x_last, y, PCConfig(tuple(settings.pop("precisions")), **settings))
    z = out.latents[0]
    assert z.is_contiguous(memory_format=torch.channels_last) and not z.is_contiguous()
    _compare(out, ref, **TIGHT)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("fpa", [False, True], ids=["nofpa", "fpa"])
@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu", "identity"])
def test_disjoint_max_pooling_equals_reference(activation, schedule, fpa, channels_last):
    """Max pooling with disjoint windows (2/2, and 2/3: kernel < stride) adds the top-down term
    straight into z at the arg-maxes, with φ' taken there (ReLU: pooled before the activation): equal
    to the reference in both memory formats, both schedules, with and without FPA. ReLU nets have
    windows that are ≤ 0 throughout (their arg-max changes with the fold; the update must not)."""
    gen = torch.Generator().manual_seed(5)
    layers = [_conv(gen, 4, 3, 3, True, padding=1, activation=activation, pool=("max", 2, 2)),
              _conv(gen, 5, 4, 3, False, padding=1, activation=activation, pool=("max", 2, 3)),
              _linear(gen, 6, 5 * 2 * 2, True, activation), _linear(gen, CLASSES, 6, True)]
    x, y = _randn(gen, 3, 3, 12, 12), _randn(gen, 3, CLASSES)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    settings = dict(precisions=_gammas(4), inference_steps=STEPS, inference_lr=RATE,
                    schedule=schedule, fpa=fpa, return_trajectory=True)
    ref = conv_pc_train_step(layers, x.contiguous(), y, **settings)
    out = conv_pc_grads(layers, x, y, PCConfig(tuple(settings.pop("precisions")), **settings))
    _compare(out, ref, **TIGHT)
    if activation == "relu":
        u = conv_forward(layers, x.contiguous())[0][0]
        windows = nnf.max_pool2d(u, 2, 2)
        assert bool((windows <= 0).any()) and bool((windows > 0).any())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_runs_max_pooling_nets_channels_last(dtype):
    """On the CPU a contiguous input to a net with a max pooling runs the state in channels-last: the
    result is, to the last bit, that of a channels-last input, and equals the state run in the given
    format (``_ConvRelaxation`` driven by ``relax`` directly) to the dtype's tolerance; a net without
    max pooling keeps the input's format."""
    case = next(c for c in CASES if c.pool == "max" and c.c_hidden > 1)
    layers, x, y = build(replace(case, c_in=3))
    layers, x = _cast(layers, dtype), x.to(dtype)
    y = y.to(dtype) if case.loss == "mse" else y
    settings = _settings(case, len(layers))
    config = PCConfig(tuple(settings.pop("precisions")), **settings)
    auto = conv_pc_grads(layers, x, y, config)
    last = conv_pc_grads(layers, x.contiguous(memory_format=torch.channels_last), y, config)
    with torch.no_grad():
        state = _ConvRelaxation(layers, x, y, config)
        given = relax(state, config, _loss_sum(state.f0, y, config.loss) / state.batch)
    assert given.latents[0].is_contiguous() and not auto.latents[0].is_contiguous()
    assert auto.latents[0].is_contiguous(memory_format=torch.channels_last)
    for name in ("latents", "errors", "weight_grads", "bias_grads"):
        for a, b in zip(getattr(auto, name), getattr(last, name)):
            assert (a is None and b is None) or torch.equal(a, b), name
    assert torch.equal(auto.energy, last.energy)
    _compare(auto, given, **(TIGHT if dtype == torch.float64 else {"dtype": dtype}))
    averaging = [replace(layer, pool=("avg", *layer.pool[1:])) if getattr(layer, "pool", None) else layer
                 for layer in layers]
    assert conv_pc_grads(averaging, x, y, config).latents[0].is_contiguous()


@pytest.mark.parametrize("fpa", [False, True])
def test_jacobi_skips_the_layers_the_output_error_has_not_reached(monkeypatch, fpa):
    """From the forward initialisation ε_l = 0 below the top until the output error arrives, one layer
    per step: on 4 conv blocks and a readout, T = 7, the top-down ``conv_transpose2d`` of block k
    (k = 2, 3, 4) runs in steps 6 − k … 7 only (4, 5, 6 times), and (without FPA) so does the
    prediction ``conv2d`` of block k, besides the forward pass's — with the reference's numbers."""
    gen = torch.Generator().manual_seed(8)
    layers = [_conv(gen, 3, 2, 3, True, padding=1, activation="relu", pool=("max", 2, 2))]
    layers += [_conv(gen, 3, 3, 3, True, padding=1, activation="tanh") for _ in range(3)]
    layers.append(_linear(gen, CLASSES, 3 * 4 * 4, True))
    x, y = _randn(gen, 2, 2, 8, 8), _randn(gen, 2, CLASSES)
    settings = dict(precisions=(1.0, 0.6, 1.5, 0.7, 0.8), inference_steps=7, inference_lr=RATE, fpa=fpa,
                    return_trajectory=True)
    ref = conv_pc_train_step(layers, x, y, **settings)
    calls = {"conv2d": [], "conv_transpose2d": []}
    for name, log in calls.items():
        kernel = getattr(torch_conv.nnf, name)
        monkeypatch.setattr(torch_conv.nnf, name, lambda a, w, *args, kernel=kernel, log=log, **kwargs:
                            log.append(id(w)) or kernel(a, w, *args, **kwargs))
    out = conv_pc_grads(layers, x, y, PCConfig(tuple(settings.pop("precisions")), **settings))
    _compare(out, ref, **TIGHT)
    predictions = [calls["conv2d"].count(id(layer.weight)) for layer in layers[:4]]
    topdowns = len(calls["conv_transpose2d"])
    assert predictions == ([1, 1, 1, 1] if fpa else [1, 1 + 4, 1 + 5, 1 + 6])
    assert topdowns == 4 + 5 + 6


def test_uses_no_autograd(monkeypatch):
    case = CASES[3]
    layers, x, y = build(case)
    settings = _settings(case, len(layers))
    ref = conv_pc_train_step(layers, x, y, **settings)
    leaves = [replace(layer, weight=layer.weight.clone().requires_grad_(True)) for layer in layers]

    def forbidden(*args, **kwargs):
        raise AssertionError("autograd was called")

    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    monkeypatch.setattr(torch.autograd, "backward", forbidden)
    out = conv_pc_grads(leaves, x, y, PCConfig(tuple(settings.pop("precisions")), **settings))
    assert not any(g.requires_grad for g in out.weight_grads) and not out.energy.requires_grad
    _compare(out, ref, **TIGHT)


@pytest.mark.parametrize("setting", [{"inference_tol": 1e-3}, {"return_trace": True}, {"check_divergence": True}])
def test_inference_control_settings_run(setting):
    """Each inference-control setting alone equals the reference (all of them together, stops and the
    device gate: ``test_torch_conv_inference_control``)."""
    case = CASES[0]
    layers, x, y = build(case)
    settings = {**_settings(case, len(layers)), **setting}
    ref = conv_pc_train_step(layers, x, y, **settings)
    out = conv_pc_grads(layers, x, y, PCConfig(tuple(settings.pop("precisions")), **settings))
    _compare(out, ref, **TIGHT)
    name = {"inference_tol": "steps", "return_trace": "trace", "check_divergence": "energy_prev"}[next(iter(setting))]
    assert getattr(out, name) is not None and getattr(ref, name) is not None


def test_bad_input_raises():
    layers, x, y = build(CASES[0])
    with pytest.raises(ValueError, match="precisions"):
        conv_pc_grads(layers, x, y, PCConfig.of(len(layers) + 1))
    with pytest.raises(ValueError, match="readout"):
        conv_pc_grads(layers[:-1], x, y, PCConfig.of(len(layers) - 1))
    with pytest.raises(ValueError, match="input channels"):
        conv_pc_grads(layers, x[:, :0], y, PCConfig.of(len(layers)))


def test_feedforward_state_is_the_forward_pass():
    """T = 0: the latents are the pre-activations of the forward pass, the errors zero below the top."""
    layers, x, y = build(CASES[5])
    us, _ = conv_forward(layers, x)
    out = conv_pc_grads(layers, x, y, PCConfig.of(len(layers), inference_steps=0, loss=CASES[5].loss))
    assert_all_close(out.latents, us[:-1], **TIGHT)
    for eps in out.errors[:-1]:
        assert float(eps.abs().max()) == 0.0
