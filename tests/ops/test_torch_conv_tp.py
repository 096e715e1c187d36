"""``pcfast.ops.torch_conv_tp`` (TP/DTP and the feedback reconstruction gradients on conv nets,
explicit formulas) against its oracle, the float64 specification ``pcfast.reference.conv``'s
``conv_tp_train_step`` and ``conv_feedback_grads`` (autograd of the local and reconstruction losses).

Targets, activities, local weight and bias gradients, loss and local loss, and the feedback weight
and bias gradients and reconstruction loss agree to 1e-10 in float64 on a fixed sample of awkward
networks that covers every value of every axis (batch 1 and 3; channels 1 and 3; kernels 1 and 3;
stride 1 and 2; padding 0 and 1; odd image sizes; biases on and off; max, avg and no pooling, with
overlapping windows and windows whose unpooling crops or edge-replicates; dilation; MSE and CE; TP
and DTP; β 0 and 0.5; default and mixed feedback activations; no noise, noise on every layer, noise on
some), and to float32's tolerance in float32; a channels-last input gives the same numbers. Also: no
autograd is used, the unpooling is the reference's, and bad feedback or noise raises.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, replace

import pytest
import torch

from pcfast.ops.torch_conv_tp import _unpool, conv_feedback_grads, conv_tp_grads
from pcfast.reference import conv as reference
from pcfast.reference.conv import ConvLayer, LinearLayer, conv_forward
from pcfast.testing import assert_all_close, assert_close
from pcfast.types import Feedback, TPConfig

TIGHT = {"atol": 1e-10, "rtol": 1e-10}
CLASSES = 4
ACTIVATIONS = ("tanh", "relu", "gelu", "sigmoid")

AXES = {
    "batch": (1, 3),
    "c_in": (1, 3),
    "c_hidden": (1, 3),
    "kernel": (1, 3),
    "stride": (1, 2),
    "padding": (0, 1),
    "image": ((7, 7), (9, 8), (8, 9)),
    "bias": (True, False),
    "pool": ("max", "avg", None),
    # (kernel, stride): 3/2 and 2/1 windows overlap; 1/2 subsamples (its unpooling crops)
    "pool_shape": ((2, 2), (3, 2), (2, 1), (1, 2)),
    "second": ("conv", "dilated", "none"),  # layer 2: conv k3 p1, conv k3 d2 p2 s2, or no second conv
    "activation": ACTIVATIONS,
    "feedback_activation": ("default", "mixed"),  # ψ_l = φ_{l-1}, or another activation per layer
    "loss": ("mse", "ce"),
    "difference": (True, False),
    "beta": (0.0, 0.5),
    "noise": ("none", "all", "some"),
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
    feedback_activation: str
    loss: str
    difference: bool
    beta: float
    noise: str

    def __str__(self) -> str:
        pool = f"{self.pool}{self.pool_shape[0]}s{self.pool_shape[1]}" if self.pool else "nopool"
        return (f"B{self.batch}-c{self.c_in}x{self.c_hidden}-k{self.kernel}s{self.stride}p{self.padding}-"
                f"{self.image[0]}x{self.image[1]}-{'bias' if self.bias else 'nobias'}-{pool}-{self.second}-"
                f"{self.activation}-psi_{self.feedback_activation}-{self.loss}-{'dtp' if self.difference else 'tp'}-"
                f"beta{self.beta}-noise_{self.noise}")


def _cases() -> list[Case]:
    """COUNT cases: each axis's values repeated to COUNT entries, shuffled with a seed of its own."""
    columns = {}
    for i, (name, values) in enumerate(AXES.items()):
        column = [values[j % len(values)] for j in range(COUNT)]
        random.Random(200 + i).shuffle(column)
        columns[name] = column
    return [Case(**{name: columns[name][j] for name in AXES}) for j in range(COUNT)]


CASES = _cases()


def test_the_cases_cover_every_value_of_every_axis():
    for name, values in AXES.items():
        assert {getattr(case, name) for case in CASES} == set(values), name


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _conv(gen, c_out, c_in, k, bias, **options):
    weight = 1.3 * _randn(gen, c_out, c_in, k, k) / (c_in * k * k) ** 0.5
    return ConvLayer(weight, 0.1 * _randn(gen, c_out) if bias else None, **options)


def _linear(gen, d_out, d_in, bias, activation="identity"):
    return LinearLayer(1.3 * _randn(gen, d_out, d_in) / d_in**0.5, 0.1 * _randn(gen, d_out) if bias else None,
                       activation)


def _size(size, k, s, p, d=1):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _network(case: Case, gen: torch.Generator) -> list:
    """conv (pooled) → [conv] → linear → linear readout."""
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
        layers.append(_conv(gen, 3, channels, 3, not case.bias, stride=stride, padding=dilation, dilation=dilation,
                            activation=acts[1], pool=second_pool))
        channels = 3
    flat = channels * size[0] * size[1]
    return layers + [_linear(gen, 5, flat, case.bias, acts[2]), _linear(gen, CLASSES, 5, case.bias)]


def _feedback(case: Case, layers: list, gen: torch.Generator) -> Feedback:
    """Q_l of W_l's shape (conv) or W_lᵀ's (linear), c_l on the layers without a forward bias when
    ``case.bias`` is off (and on all of them otherwise), ψ_l = φ_{l-1} or the next activation in line."""
    weights, biases, activations = [], [], []
    for k, layer in enumerate(layers[1:]):
        if isinstance(layer, ConvLayer):
            c_out, _, kh, kw = layer.weight.shape
            weights.append(_randn(gen, *layer.weight.shape) / (c_out * kh * kw) ** 0.5)
        else:
            weights.append(_randn(gen, layer.weight.shape[1], layer.weight.shape[0]) / layer.weight.shape[0] ** 0.5)
        with_bias = case.bias or k % 2 == 0
        biases.append(0.1 * _randn(gen, layer.weight.shape[1]) if with_bias else None)
        previous = layers[k].activation
        activations.append(previous if case.feedback_activation == "default"
                            else ACTIVATIONS[(ACTIVATIONS.index(previous) + 1 + k) % len(ACTIVATIONS)])
    if case.feedback_activation == "mixed":
        activations[-1] = "identity"
    return Feedback(weights, biases, activations)


def _noise(case: Case, layers: list, x: torch.Tensor, gen: torch.Generator) -> list | None:
    """None, or ξ_l ~ N(0, 0.1²) of h_{l-1}'s shape for every feedback layer ("all") or every other one."""
    if case.noise == "none":
        return None
    _, hs = conv_forward(layers, x)
    return [0.1 * _randn(gen, *h.shape) if case.noise == "all" or k % 2 == 1 else None
            for k, h in enumerate(hs[1:])]


def build(case: Case, seed: int = 0):
    """The case's network and feedback (float64), a batch, and the feedback noise."""
    gen = torch.Generator().manual_seed(seed)
    layers = _network(case, gen)
    feedback = _feedback(case, layers, gen)
    x = _randn(gen, case.batch, case.c_in, *case.image)
    y = (_randn(gen, case.batch, CLASSES) if case.loss == "mse"
         else torch.randint(CLASSES, (case.batch,), generator=gen))
    return layers, feedback, x, y, _noise(case, layers, x, gen)


def _reference_tp(case, layers, feedback, x, y):
    return reference.conv_tp_train_step(layers, list(feedback.weights), list(feedback.biases),
                                        list(feedback.activations), x, y, beta=case.beta, loss=case.loss,
                                        difference=case.difference)


def _reference_feedback(layers, feedback, x, noise):
    return reference.conv_feedback_grads(layers, list(feedback.weights), list(feedback.biases),
                                         list(feedback.activations), x, noise)


def _config(case):
    return TPConfig(beta=case.beta, loss=case.loss, difference=case.difference)


def _cast(layers, feedback, dtype):
    cast = lambda t: None if t is None else t.to(dtype)
    return ([replace(layer, weight=cast(layer.weight), bias=cast(layer.bias)) for layer in layers],
            Feedback([cast(q) for q in feedback.weights], [cast(c) for c in feedback.biases], feedback.activations))


def _compare_tp(out, ref, **tol):
    assert_all_close(out.targets, ref.targets, name="targets", **tol)
    assert_all_close(out.activities, ref.activities, name="activities", **tol)
    assert_all_close(out.weight_grads, ref.weight_grads, name="weight grads", **tol)
    assert_all_close(out.bias_grads, ref.bias_grads, name="bias grads", **tol)
    assert_close(out.loss, ref.loss, name="loss", **tol)
    assert_close(out.local_loss, ref.local_loss, name="local loss", **tol)


def _compare_feedback(out, ref, **tol):
    assert_all_close(out.weight_grads, ref.weight_grads, name="feedback weight grads", **tol)
    assert_all_close(out.bias_grads, ref.bias_grads, name="feedback bias grads", **tol)
    assert_close(out.loss, ref.loss, name="reconstruction loss", **tol)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv_tp_grads_equal_reference(case):
    layers, feedback, x, y, _ = build(case)
    ref = _reference_tp(case, layers, feedback, x, y)
    out = conv_tp_grads(layers, feedback, x, y, _config(case))
    _compare_tp(out, ref, **TIGHT)
    if case.beta > 0 or not case.difference:  # else ĥ = h and every gradient is zero
        assert max(float(g.abs().max()) for g in ref.weight_grads) > 1e-6


@pytest.mark.parametrize("case", CASES, ids=str)
def test_conv_feedback_grads_equal_reference(case):
    layers, feedback, x, _, noise = build(case)
    ref = _reference_feedback(layers, feedback, x, noise)
    out = conv_feedback_grads(layers, feedback, x, noise)
    _compare_feedback(out, ref, **TIGHT)
    assert max(float(g.abs().max()) for g in ref.weight_grads) > 1e-6


@pytest.mark.parametrize("case", CASES[:3], ids=str)
def test_float32(case):
    layers, feedback, x, y, noise = build(case, seed=3)
    ref_tp = _reference_tp(case, layers, feedback, x, y)
    ref_feedback = _reference_feedback(layers, feedback, x, noise)
    layers32, feedback32 = _cast(layers, feedback, torch.float32)
    x32, y32 = x.float(), (y.float() if case.loss == "mse" else y)
    noise32 = None if noise is None else [None if xi is None else xi.float() for xi in noise]
    out_tp = conv_tp_grads(layers32, feedback32, x32, y32, _config(case))
    out_feedback = conv_feedback_grads(layers32, feedback32, x32, noise32)
    assert out_tp.weight_grads[0].dtype == torch.float32 and out_tp.local_loss.dtype == torch.float32
    assert out_feedback.weight_grads[0].dtype == torch.float32
    _compare_tp(out_tp, ref_tp, dtype=torch.float32)
    _compare_feedback(out_feedback, ref_feedback, dtype=torch.float32)


@pytest.mark.parametrize("case", [case for case in CASES if case.pool is not None][:4], ids=str)
def test_channels_last_input(case):
    """An input in channels-last memory format keeps the conv activities in it, with the same numbers."""
    layers, feedback, x, y, noise = build(replace(case, c_in=3, c_hidden=3))
    x_last = x.contiguous(memory_format=torch.channels_last)
    out = conv_tp_grads(layers, feedback, x_last, y, _config(case))
    for h in (out.activities[0], out.targets[0]):
        assert h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous()
    _compare_tp(out, _reference_tp(case, layers, feedback, x, y), **TIGHT)
    _compare_feedback(conv_feedback_grads(layers, feedback, x_last, noise),
                      _reference_feedback(layers, feedback, x, noise), **TIGHT)


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_unpool_is_the_reference_unpool(stride):
    """υ as a gather equals the reference's repeat, crop and edge-replication, for crops and pads alike."""
    gen = torch.Generator().manual_seed(stride)
    for n in range(1, 5):
        v = _randn(gen, 2, 3, n, n + 1)
        for size in range(1, 3 * n + 3):
            expected = reference.unpool(v, stride, (size, size + 1))
            assert torch.equal(_unpool(v, stride, (size, size + 1)), expected), (n, size)


def test_uses_no_autograd(monkeypatch):
    case = CASES[3]
    layers, feedback, x, y, noise = build(case)
    ref_tp = _reference_tp(case, layers, feedback, x, y)
    ref_feedback = _reference_feedback(layers, feedback, x, noise)
    leaves = [replace(layer, weight=layer.weight.clone().requires_grad_(True)) for layer in layers]
    feedback_leaves = replace(feedback, weights=tuple(q.clone().requires_grad_(True) for q in feedback.weights))

    def forbidden(*args, **kwargs):
        raise AssertionError("autograd was called")

    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    monkeypatch.setattr(torch.autograd, "backward", forbidden)
    out_tp = conv_tp_grads(leaves, feedback_leaves, x, y, _config(case))
    out_feedback = conv_feedback_grads(leaves, feedback_leaves, x, noise)
    assert not any(g.requires_grad for g in out_tp.weight_grads + out_feedback.weight_grads)
    assert not out_tp.local_loss.requires_grad and not out_feedback.loss.requires_grad
    _compare_tp(out_tp, ref_tp, **TIGHT)
    _compare_feedback(out_feedback, ref_feedback, **TIGHT)


def test_readout_alone_has_no_feedback():
    """L = 1: TP is the readout's nudge alone; there is nothing to reconstruct."""
    gen = torch.Generator().manual_seed(9)
    layers = [_linear(gen, CLASSES, 2 * 7 * 9, True)]
    x, y = _randn(gen, 2, 2, 7, 9), _randn(gen, 2, CLASSES)
    feedback = Feedback([], [], [])
    ref = reference.conv_tp_train_step(layers, [], [], [], x, y, beta=0.5)
    _compare_tp(conv_tp_grads(layers, feedback, x, y, TPConfig(beta=0.5)), ref, **TIGHT)
    out = conv_feedback_grads(layers, feedback, x)
    assert out.weight_grads == [] and out.bias_grads == [] and float(out.loss) == 0.0


def test_bad_feedback_or_noise_raises():
    layers, feedback, x, y, _ = build(CASES[0])
    short = Feedback(feedback.weights[:-1], feedback.biases[:-1], feedback.activations[:-1])
    with pytest.raises(ValueError, match="feedback_weights"):
        conv_tp_grads(layers, short, x, y, TPConfig())
    wrong = replace(feedback, weights=(feedback.weights[0][..., :1],) + feedback.weights[1:])
    with pytest.raises(ValueError, match=r"feedback_weights\[0\]"):
        conv_feedback_grads(layers, wrong, x)
    with pytest.raises(ValueError, match="noise"):
        conv_feedback_grads(layers, feedback, x, [None])
    with pytest.raises(ValueError, match="readout"):
        conv_tp_grads(layers[:-1], short, x, y, TPConfig())
