"""The conv-net specification (``pcfast.reference.conv``) against DESIGN's oracles, float64.

O1 and O2 (DESIGN §3) and T1, T2 (DESIGN §4) on convolutional networks — stride, padding,
dilation, max and avg pooling, with and without biases — plus the FPA dynamics, the forward pass and
BP against ``torch.nn`` modules, the MLP specification as the all-linear special case, shapes on odd
images, and the errors a bad network raises.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pcfast.reference.conv import (
    ConvLayer, LinearLayer, conv_bp_train_step, conv_feedback_grads, conv_forward, conv_gnt_targets,
    conv_pc_energy, conv_pc_train_step, conv_tp_train_step, layer_map, layer_output, unpool,
)
from pcfast import reference
from pcfast.testing import assert_all_close, assert_close, make_batch, make_feedback, make_net

DTYPE = torch.float64
TIGHT = {"atol": 1e-10, "rtol": 1e-10}


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=DTYPE)


def _conv(gen, c_out, c_in, k, *, bias=True, scale=1.3, **options):
    weight = scale * _randn(gen, c_out, c_in, k, k) / (c_in * k * k) ** 0.5
    return ConvLayer(weight, 0.1 * _randn(gen, c_out) if bias else None, **options)


def _linear(gen, d_out, d_in, *, bias=True, scale=1.3, activation="identity"):
    weight = scale * _randn(gen, d_out, d_in) / d_in**0.5
    return LinearLayer(weight, 0.1 * _randn(gen, d_out) if bias else None, activation)


def _batch(gen, batch, image, loss, classes):
    x = _randn(gen, batch, *image)
    y = _randn(gen, batch, classes) if loss == "mse" else torch.randint(classes, (batch,), generator=gen)
    return x, y


def _net_a(gen):
    """3×13×11 → conv k3 s2 p1 (tanh, max 2/2) → conv k3 d2 p2 no bias (gelu, avg 2/1) → linear 20→6
    (sigmoid) → linear 6→4."""
    return [
        _conv(gen, 4, 3, 3, stride=2, padding=1, activation="tanh", pool=("max", 2, 2)),
        _conv(gen, 5, 4, 3, bias=False, padding=2, dilation=2, activation="gelu", pool=("avg", 2, 1)),
        _linear(gen, 6, 20, activation="sigmoid"),
        _linear(gen, 4, 6, bias=False),
    ], (3, 13, 11)


def _net_b(gen):
    """2×9×9 → conv k5 p2 no bias (relu, avg 3/2) → conv k3 s2 (tanh) → linear 3→4."""
    return [
        _conv(gen, 6, 2, 5, bias=False, padding=2, activation="relu", pool=("avg", 3, 2)),
        _conv(gen, 3, 6, 3, stride=2, activation="tanh"),
        _linear(gen, 4, 3),
    ], (2, 9, 9)


NETS = {"a": _net_a, "b": _net_b}


def _modules(layers) -> nn.Sequential:
    """The same network as ``torch.nn`` modules, for an independent forward pass."""
    acts = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "identity": nn.Identity}
    modules, flat = [], False
    for layer in layers:
        w, b = layer.weight, layer.bias
        if isinstance(layer, ConvLayer):
            module = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), layer.stride, layer.padding,
                               layer.dilation, bias=b is not None, dtype=DTYPE)
        else:
            if not flat:
                modules.append(nn.Flatten())
                flat = True
            module = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=DTYPE)
        module.weight = nn.Parameter(w.clone())
        if b is not None:
            module.bias = nn.Parameter(b.clone())
        modules += [module, acts[layer.activation]()]
        pool = getattr(layer, "pool", None)
        if pool is not None:
            modules.append((nn.MaxPool2d if pool[0] == "max" else nn.AvgPool2d)(pool[1], pool[2]))
    return nn.Sequential(*modules)


def _written_out_activity_grads(layers, x, y, latents, gammas, loss):
    """``γ_l ε_l − γ_{l+1} J_l(z_l)ᵀ ε_{l+1}`` with the VJP of ``m_{l+1} ∘ π_l ∘ φ_l`` at z_l."""
    pre = [x] + [layer_output(layer, z) for layer, z in zip(layers, latents)]
    errors = [z - layer_map(layer, a) for z, layer, a in zip(latents, layers, pre)]
    f = layer_map(layers[-1], pre[-1])
    errors.append(y - f if loss == "mse" else
                  nn.functional.one_hot(y, f.shape[1]).to(DTYPE) - torch.softmax(f, 1))
    grads = []
    for l in range(len(layers) - 1):
        z = latents[l].detach().requires_grad_(True)
        mapped = layer_map(layers[l + 1], layer_output(layers[l], z))
        (top_down,) = torch.autograd.grad(mapped, z, grad_outputs=errors[l + 1])
        grads.append(gammas[l] * errors[l] - gammas[l + 1] * top_down)
    return grads, errors, pre


def _written_out_weight_grads(layers, errors, pre, gammas):
    """``−(γ_l/B) Σ_b ε_l ⋆ a_{l-1}`` (``torch.nn.grad.conv2d_weight``; ``ε_lᵀ flatten(a)`` for linear)."""
    batch = pre[0].shape[0]
    weights, biases = [], []
    for layer, eps, a, gamma in zip(layers, errors, pre, gammas):
        if isinstance(layer, ConvLayer):
            w = torch.nn.grad.conv2d_weight(a, layer.weight.shape, eps, layer.stride, layer.padding,
                                            layer.dilation)
            b = eps.sum((0, 2, 3))
        else:
            w, b = eps.T @ a.flatten(1), eps.sum(0)
        weights.append(-gamma * w / batch)
        biases.append(None if layer.bias is None else -gamma * b / batch)
    return weights, biases


# ------------------------------------------------------------------------------------------------
# O1

@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_o1_conv_gradients_equal_autograd_of_energy(net, loss):
    """O1: each Jacobi step is −(κ/γ_l) × autograd ∂F/∂z_l (and the written-out VJP form), and the
    weight gradients are autograd of F/B (and the written-out correlation form), ≤ 1e-10."""
    gen = torch.Generator().manual_seed(0)
    layers, image = NETS[net](gen)
    x, y = _batch(gen, 3, image, loss, layers[-1].weight.shape[0])
    gammas, kappa = [0.7, 1.3, 0.9, 1.6][: len(layers)], 0.2
    out = conv_pc_train_step(layers, x, y, precisions=gammas, inference_steps=4, inference_lr=kappa, loss=loss,
                             return_trajectory=True)
    assert len(out.trajectory) == 5
    moved = 0.0
    for before, after in zip(out.trajectory[:-1], out.trajectory[1:]):
        zs = [z.clone().requires_grad_(True) for z in before]
        energy = conv_pc_energy(layers, x, y, zs, precisions=gammas, loss=loss)
        expected = list(torch.autograd.grad(energy, zs))
        implied = [(b - a) * (-g / kappa) for a, b, g in zip(before, after, gammas)]
        assert_all_close(implied, expected, name="activity grad", **TIGHT)
        written, _, _ = _written_out_activity_grads(layers, x, y, before, gammas, loss)
        assert_all_close(expected, written, name="written-out activity grad", **TIGHT)
        moved = max(moved, max(float((b - a).abs().max()) for a, b in zip(before, after)))
    assert moved > 1e-3  # the relaxation moves the latents: the check above is not vacuous

    ws = [layer.weight.clone().requires_grad_(True) for layer in layers]
    bs = [None if layer.bias is None else layer.bias.clone().requires_grad_(True) for layer in layers]
    copies = [type(layer)(**{**vars(layer), "weight": w, "bias": b}) for layer, w, b in zip(layers, ws, bs)]
    energy = conv_pc_energy(copies, x, y, out.latents, precisions=gammas, loss=loss)
    params = ws + [b for b in bs if b is not None]
    expected = list(torch.autograd.grad(energy / x.shape[0], params))
    actual = out.weight_grads + [b for b in out.bias_grads if b is not None]
    assert_all_close(actual, expected, name="weight grad", **TIGHT)
    assert_close(out.energy, energy.detach(), name="energy", **TIGHT)
    _, errors, pre = _written_out_activity_grads(layers, x, y, out.latents, gammas, loss)
    assert_all_close(out.errors, errors, name="errors", **TIGHT)
    weights, biases = _written_out_weight_grads(layers, errors, pre, gammas)
    assert_all_close(out.weight_grads + out.bias_grads, weights + biases, name="written-out weight grad", **TIGHT)


# ------------------------------------------------------------------------------------------------
# O2

def _o2_net(gen, activation):
    """3×14×13 → conv k3 s2 p1 (φ, max 2/2) → conv k3 p1 no bias (φ, max 2/1) → linear 12→7 (φ)
    → linear 7→5."""
    return [
        _conv(gen, 4, 3, 3, stride=2, padding=1, activation=activation, pool=("max", 2, 2)),
        _conv(gen, 3, 4, 3, bias=False, padding=1, activation=activation, pool=("max", 2, 1)),
        _linear(gen, 7, 12, activation=activation),
        _linear(gen, 5, 7),
    ], (3, 14, 13)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_o2_conv_pc_equals_bp_under_fpa(activation, loss):
    """O2: forward init + FPA + sequential + T = 1 + κ = 1 gives γ_L × the BP gradients, with max pooling."""
    gen = torch.Generator().manual_seed(1)
    layers, image = _o2_net(gen, activation)
    x, y = _batch(gen, 5, image, loss, 5)
    gammas = [0.5, 2.0, 1.5, 0.3]
    pc = conv_pc_train_step(layers, x, y, precisions=gammas, inference_steps=1, inference_lr=1.0,
                            schedule="sequential", fpa=True, loss=loss)
    bp = conv_bp_train_step(layers, x, y, loss=loss)
    scaled = [None if g is None else gammas[-1] * g for g in bp.weight_grads + bp.bias_grads]
    assert_all_close(pc.weight_grads + pc.bias_grads, scaled, atol=1e-12, rtol=1e-10, name="O2")
    assert all(float(g.abs().max()) > 1e-4 for g in pc.weight_grads)  # every layer learns something


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_o2_conv_fails_without_fpa(activation):
    """O2's contrast: without FPA (inferred presynaptic activity) PC's gradients are not γ_L × BP's."""
    gen = torch.Generator().manual_seed(1)
    layers, image = _o2_net(gen, activation)
    x, y = _batch(gen, 5, image, "mse", 5)
    pc = conv_pc_train_step(layers, x, y, inference_steps=1, inference_lr=1.0, schedule="sequential", fpa=False)
    bp = conv_bp_train_step(layers, x, y)
    assert max(float((a - b).abs().max()) for a, b in zip(pc.weight_grads, bp.weight_grads)) > 1e-3


@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
def test_fpa_dynamics_freeze_predictions_and_routing(schedule):
    """Under FPA every step moves z_l by −(κ/γ_l)(γ_l (z_l − u_l) − γ_{l+1} J_l(u_l)ᵀ ε_{l+1}): the
    predictions, φ' and the max-pool routing stay at the feedforward state u (Jacobi: one state per
    step; sequential: the top layer's step is the same, later ones see the fresh ε_{l+1})."""
    gen = torch.Generator().manual_seed(1)
    layers, image = _o2_net(gen, "relu")
    x, y = _batch(gen, 4, image, "mse", 5)
    gammas, kappa = [0.5, 2.0, 1.5, 0.3], 0.4
    out = conv_pc_train_step(layers, x, y, precisions=gammas, inference_steps=3, inference_lr=kappa, fpa=True,
                             schedule=schedule, return_trajectory=True)
    us, _ = conv_forward(layers, x)
    for before, after in zip(out.trajectory[:-1], out.trajectory[1:]):
        state = list(before)
        for l in reversed(range(len(state))):
            eps = [z - u for z, u in zip(state, us)] + [y - us[-1]]
            u = us[l].detach().requires_grad_(True)
            mapped = layer_map(layers[l + 1], layer_output(layers[l], u))
            (top_down,) = torch.autograd.grad(mapped, u, grad_outputs=eps[l + 1])
            expected = state[l] - kappa / gammas[l] * (gammas[l] * eps[l] - gammas[l + 1] * top_down)
            if schedule == "sequential":
                state[l] = expected
            assert_close(after[l], expected, name=f"z_{l + 1}", **TIGHT)
    assert max(float((z - u).abs().max()) for z, u in zip(out.latents, us)) > 1e-3


def test_bp_equals_autograd_of_torch_modules():
    """BP and the forward pass against the same network built from ``torch.nn`` modules."""
    gen = torch.Generator().manual_seed(2)
    layers, image = _net_a(gen)
    x, y = _batch(gen, 4, image, "ce", 4)
    model = _modules(layers)
    f = model(x)
    assert_close(conv_forward(layers, x)[0][-1], f.detach(), name="f", **TIGHT)
    value = nn.functional.cross_entropy(f, y)
    expected = torch.autograd.grad(value, [m.weight for m in model if hasattr(m, "weight")])
    out = conv_bp_train_step(layers, x, y, loss="ce")
    assert_all_close(out.weight_grads, list(expected), name="bp weight grad", **TIGHT)
    assert_close(out.loss, value.detach(), name="loss", **TIGHT)


# ------------------------------------------------------------------------------------------------
# T1, T2 and the feedback loss

def _invertible_net(gen, channels, image):
    """1×1 convolutions with square, well-conditioned (C, C) matrices, identity activation, stride 1,
    no pooling; a square linear readout on the flattened C·H·W. Exact inverse feedback maps: the
    transposed 1×1 convolution with (W⁻¹)ᵀ and c = −W⁻¹b; the linear W⁻¹, c = −W⁻¹b."""
    eye = torch.eye(channels, dtype=DTYPE)
    layers, qs, cs = [], [], []
    for _ in range(2):
        w = _randn(gen, channels, channels) / channels**0.5 + 2 * eye
        layers.append(ConvLayer(w[:, :, None, None], 0.1 * _randn(gen, channels), activation="identity"))
    d = channels * image[0] * image[1]
    layers.append(LinearLayer(_randn(gen, d, d) / d**0.5 + 2 * torch.eye(d, dtype=DTYPE), 0.1 * _randn(gen, d)))
    for layer in layers[1:]:
        w = layer.weight.reshape(layer.weight.shape[0], -1)
        inverse = torch.linalg.inv(w)
        qs.append(inverse.T.reshape(layer.weight.shape) if isinstance(layer, ConvLayer) else inverse)
        cs.append(-(inverse @ layer.bias))
    return layers, qs, cs


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_t1_conv_dtp_with_exact_inverses_gives_gauss_newton_targets(loss):
    """T1: linear φ = ψ = id, invertible 1×1 convolutions and a square readout, feedback maps the exact
    inverses ⇒ the DTP targets are ``h_l + Δu_l`` with Δu_l the Gauss–Newton targets of
    ``pcfast.reference.gnt``'s definition (``Δu_l = β J_l⁺ ε_L``, J_l = ∂f/∂u_l) applied to the conv
    net; here h_l = u_l and J_l is invertible, so these are also the targets of exact inversion."""
    gen = torch.Generator().manual_seed(3)
    image = (2, 3)
    layers, qs, cs = _invertible_net(gen, 2, image)
    x, y = _batch(gen, 5, (2, *image), loss, 12)
    beta = 0.3
    out = conv_tp_train_step(layers, qs, cs, ["identity"] * 2, x, y, beta=beta, loss=loss, difference=True)
    deltas = conv_gnt_targets(layers, x, y, beta=beta, loss=loss)
    assert_all_close(out.targets, [h + d for h, d in zip(out.activities, deltas)], name="targets", **TIGHT)
    assert all(float(d.abs().max()) > 1e-3 for d in deltas)


def test_t1_exact_inverses_have_zero_reconstruction_loss():
    """The T1 feedback maps minimise the noisy reconstruction loss: value and gradients vanish, noise or not."""
    gen = torch.Generator().manual_seed(4)
    layers, qs, cs = _invertible_net(gen, 3, (3, 3))
    x, _ = _batch(gen, 4, (3, 3, 3), "mse", 27)
    noise = [0.5 * _randn(gen, 4, 3, 3, 3) for _ in range(2)]
    for xi in (None, noise):
        out = conv_feedback_grads(layers, qs, cs, ["identity"] * 2, x, noise=xi)
        assert float(out.loss) < 1e-20
        assert all(float(g.abs().max()) < 1e-10 for g in out.weight_grads + out.bias_grads)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("kernel", [2, 3])
@pytest.mark.parametrize("size", [(6, 6), (7, 9), (8, 11)])
def test_unpool_is_a_right_inverse_of_pooling(kind, kernel, size):
    """υ (the feedback's unpooling) is a right inverse of pooling with kernel = stride: π(υ(v)) = v,
    on sizes the stride divides and sizes it does not."""
    gen = torch.Generator().manual_seed(10)
    pool = nn.functional.max_pool2d if kind == "max" else nn.functional.avg_pool2d
    pooled = tuple((s - kernel) // kernel + 1 for s in size)
    v = _randn(gen, 2, 3, *pooled)
    up = unpool(v, kernel, size)
    assert tuple(up.shape) == (2, 3, *size)
    assert_close(pool(up, kernel, kernel), v, atol=1e-14, rtol=1e-14, name="π(υ(v))")


@pytest.mark.parametrize("net", sorted(NETS))
def test_t2_conv_dtp_keeps_targets_that_are_already_met(net):
    """T2: ĥ_l = h_l (β = 0) ⇒ DTP gives ĥ_{l-1} = h_{l-1} for any feedback map (pooling, strides,
    dilation, flatten included); the local gradients vanish. Plain TP does not."""
    gen = torch.Generator().manual_seed(5)
    layers, image = NETS[net](gen)
    x, y = _batch(gen, 3, image, "mse", layers[-1].weight.shape[0])
    qs = [_randn(gen, *l.weight.shape) if isinstance(l, ConvLayer) else _randn(gen, *l.weight.shape[::-1])
          for l in layers[1:]]
    cs = [_randn(gen, l.weight.shape[1]) for l in layers[1:]]
    out = conv_tp_train_step(layers, qs, cs, None, x, y, beta=0.0, difference=True)
    assert_all_close(out.targets, out.activities, atol=1e-12, rtol=0, name="targets")
    assert all(float(g.abs().max()) < 1e-12 for g in out.weight_grads)
    tp = conv_tp_train_step(layers, qs, cs, None, x, y, beta=0.0, difference=False)
    assert float((tp.targets[0] - tp.activities[0]).abs().max()) > 1e-3
    nudged = conv_tp_train_step(layers, qs, cs, None, x, y, beta=0.5, difference=True)
    assert all(float(g.abs().max()) > 1e-6 for g in nudged.weight_grads)


def test_conv_feedback_grads_equal_autograd_of_reconstruction_loss():
    """The feedback gradients are autograd of ½‖g_l(F_l(h_{l-1}+ξ)) − (h_{l-1}+ξ)‖² / B, written out
    here for net ``a``'s second layer (avg pool 2/1: υ edge-replicates 2×2 to 3×3)."""
    gen = torch.Generator().manual_seed(6)
    layers, image = _net_a(gen)
    x, _ = _batch(gen, 3, image, "mse", 4)
    qs = [_randn(gen, 5, 4, 3, 3) / 6, _randn(gen, 5 * 2 * 2, 6) / 3, _randn(gen, 6, 4) / 2]
    cs = [_randn(gen, 4), None, _randn(gen, 6)]
    psi = ["tanh", "identity", "sigmoid"]
    h1 = conv_forward(layers, x)[1][1]
    noise = [0.1 * _randn(gen, *h1.shape), None, 0.1 * _randn(gen, 3, 6)]
    out = conv_feedback_grads(layers, qs, cs, psi, x, noise=noise)
    h_in = h1 + noise[0]
    layer = layers[1]
    h_out = nn.AvgPool2d(2, 1)(nn.GELU()(nn.functional.conv2d(h_in, layer.weight, None, 1, 2, 2)))  # 5×2×2
    q = qs[0].clone().requires_grad_(True)
    c = cs[0].clone().requires_grad_(True)
    up = nn.ReplicationPad2d((0, 1, 0, 1))(h_out)
    rec = torch.tanh(nn.functional.conv_transpose2d(up, q, c, 1, 2, 0, 1, 2))
    value = 0.5 * ((rec - h_in) ** 2).sum() / 3
    expected = torch.autograd.grad(value, [q, c])
    assert_all_close([out.weight_grads[0], out.bias_grads[0]], list(expected), name="feedback grad", **TIGHT)
    assert out.bias_grads[1] is None and out.weight_grads[1].shape == qs[1].shape


@pytest.mark.parametrize("fpa", [False, True])
@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
def test_linear_layers_reproduce_the_mlp_reference(fpa, schedule):
    """A net of LinearLayers only is an MLP: PC, BP, DTP and the feedback gradients equal
    ``pcfast.reference``'s MLP specification."""
    net = make_net((5, 7, 6, 3), activation=["tanh", "gelu"], scale=1.5)
    x, y = make_batch((5, 7, 6, 3), 4, "ce")
    layers = [LinearLayer(w, b, a) for w, b, a in zip(net.weights, net.biases, [*net.activations, "identity"])]
    settings = dict(precisions=[0.7, 1.3, 0.9], inference_steps=3, inference_lr=0.3, schedule=schedule, fpa=fpa,
                    loss="ce")
    ours, mlp = conv_pc_train_step(layers, x, y, **settings), reference.pc_train_step(*net, x, y, **settings)
    assert_all_close(ours.latents + ours.errors + ours.weight_grads + ours.bias_grads,
                     mlp.latents + mlp.errors + mlp.weight_grads + mlp.bias_grads, name="pc", **TIGHT)
    assert_all_close([ours.energy, ours.loss], [mlp.energy, mlp.loss], name="pc energy", **TIGHT)
    bp, bp_mlp = conv_bp_train_step(layers, x, y, loss="ce"), reference.bp_train_step(*net, x, y, loss="ce")
    assert_all_close(bp.weight_grads + bp.bias_grads, bp_mlp.weight_grads + bp_mlp.bias_grads, name="bp", **TIGHT)
    qs, cs, psi = make_feedback((5, 7, 6, 3), activation=["sigmoid", "tanh"], seed=9, bias_scale=1.0)
    tp = conv_tp_train_step(layers, qs, cs, psi, x, y, beta=0.3, loss="ce")
    tp_mlp = reference.tp_train_step(*net, qs, cs, psi, x, y, beta=0.3, loss="ce", difference=True)
    assert_all_close(tp.targets + tp.weight_grads + tp.bias_grads, tp_mlp.targets + tp_mlp.weight_grads
                     + tp_mlp.bias_grads, name="dtp", **TIGHT)
    noise = [0.1 * torch.ones(4, 7, dtype=DTYPE), None]
    fb = conv_feedback_grads(layers, qs, cs, psi, x, noise=noise)
    fb_mlp = reference.feedback_grads(*net, qs, cs, psi, x, noise=noise)
    assert_all_close(fb.weight_grads + fb.bias_grads + [fb.loss], fb_mlp.weight_grads + fb_mlp.bias_grads
                     + [fb_mlp.loss], name="feedback", **TIGHT)


@pytest.mark.parametrize("fpa", [False, True])
@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
def test_linear_layers_reproduce_the_mlp_inference_control(fpa, schedule):
    """Oracle: the MLP specification. On a net of LinearLayers, adaptive stopping, the trace (NaN
    rows after the stop) and F before the last step equal ``pcfast.reference.pc_train_step``'s."""
    net = make_net((5, 7, 6, 3), activation=["tanh", "gelu"], scale=1.5)
    x, y = make_batch((5, 7, 6, 3), 4, "mse")
    layers = [LinearLayer(w, b, a) for w, b, a in zip(net.weights, net.biases, [*net.activations, "identity"])]
    for tol in (None, 0.3):
        settings = dict(precisions=[0.7, 1.3, 0.9], inference_steps=10, inference_lr=0.3, schedule=schedule,
                        fpa=fpa, inference_tol=tol, return_trace=True, check_divergence=True)
        ours, mlp = conv_pc_train_step(layers, x, y, **settings), reference.pc_train_step(*net, x, y, **settings)
        if tol is not None:
            assert int(ours.steps) == int(mlp.steps) < 10
        for name in ("energy", "grad_norm"):
            a, e = getattr(ours.trace, name), getattr(mlp.trace, name)
            assert torch.equal(torch.isnan(a), torch.isnan(e)), f"trace.{name}: NaN rows differ"
            assert_close(torch.nan_to_num(a), torch.nan_to_num(e), name=f"trace.{name}", **TIGHT)
        assert_all_close(ours.latents + ours.weight_grads, mlp.latents + mlp.weight_grads, name="pc", **TIGHT)
        assert_all_close([ours.energy, ours.energy_prev], [mlp.energy, mlp.energy_prev], name="energies", **TIGHT)


# ------------------------------------------------------------------------------------------------
# Shapes and errors

@pytest.mark.parametrize("size", [(7, 7), (9, 11)])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("channels", [1, 3, 7])
@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_conv_shapes_on_odd_images(size, batch, channels, kernel):
    """Every output has the shape of what it belongs to; the forward pass is ``torch.nn``'s."""
    gen = torch.Generator().manual_seed(7)
    layers = [
        _conv(gen, 7, channels, kernel, stride=2, padding=kernel // 2, activation="relu", pool=("avg", 2, 1)),
        _conv(gen, 3, 7, kernel, padding=kernel // 2, activation="tanh", pool=("max", 2, 2)),
    ]
    h = ((size[0] + 1) // 2 - 1) // 2, ((size[1] + 1) // 2 - 1) // 2  # stride 2, avg 2/1, max 2/2
    layers.append(_linear(gen, 4, 3 * h[0] * h[1]))
    x, y = _batch(gen, batch, (channels, *size), "ce", 4)
    us, hs = conv_forward(layers, x)
    assert_close(us[-1], _modules(layers)(x).detach(), name="f", **TIGHT)
    pc = conv_pc_train_step(layers, x, y, inference_steps=2, loss="ce", schedule="sequential")
    assert [tuple(z.shape) for z in pc.latents] == [tuple(u.shape) for u in us[:-1]]
    assert [tuple(e.shape) for e in pc.errors] == [tuple(u.shape) for u in us]
    assert [g.shape for g in pc.weight_grads] == [layer.weight.shape for layer in layers]
    assert [g.shape for g in pc.bias_grads] == [layer.bias.shape for layer in layers]
    qs = [_randn(gen, 3, 7, kernel, kernel), _randn(gen, 3 * h[0] * h[1], 4)]
    dtp = conv_tp_train_step(layers, qs, [None, None], None, x, y, beta=0.1, loss="ce")
    assert [t.shape for t in dtp.targets] == [a.shape for a in dtp.activities]
    assert [a.shape for a in dtp.activities] == [*[a.shape for a in hs[1:]], us[-1].shape]
    assert [g.shape for g in dtp.weight_grads] == [layer.weight.shape for layer in layers]
    fb = conv_feedback_grads(layers, qs, [None, None], None, x)
    assert [g.shape for g in fb.weight_grads] == [q.shape for q in qs]


def _error_case(name):
    gen = torch.Generator().manual_seed(8)
    x = _randn(gen, 2, 3, 6, 6)
    readout = _linear(gen, 2, 4 * 6 * 6)
    if name == "groups":
        return [ConvLayer(_randn(gen, 4, 3, 3, 3), padding=1, groups=2), readout], x, r"layers\[0\].*groups"
    if name == "kernel":
        return [ConvLayer(_randn(gen, 4, 3, 3, 3), padding=1), ConvLayer(_randn(gen, 4, 4, 9, 9), padding=1),
                readout], x, r"layers\[1\].*kernel spans 9.*padded input 8"
    if name == "dilated kernel":
        return [ConvLayer(_randn(gen, 4, 3, 3, 3), dilation=3), readout], x, r"layers\[0\].*kernel spans 7"
    if name == "channels":
        return [ConvLayer(_randn(gen, 4, 3, 3, 3), padding=1), ConvLayer(_randn(gen, 4, 5, 3, 3), padding=1),
                readout], x, r"layers\[1\].*5 input channels.*has 4"
    if name == "features":
        return [ConvLayer(_randn(gen, 4, 3, 3, 3)), readout], x, r"layers\[1\].*144 input features.*has 64"
    if name == "readout":
        return [ConvLayer(_randn(gen, 4, 3, 3, 3), padding=1)], x, r"layers\[0\].*readout"
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["groups", "kernel", "dilated kernel", "channels", "features", "readout"])
def test_conv_bad_network_raises_value_error_naming_the_layer(name):
    """groups ≠ 1, a kernel larger than the padded input, mismatched channels or features and a
    readout that is not linear: a ValueError naming the layer, from every entry point."""
    layers, x, pattern = _error_case(name)
    y = torch.zeros(x.shape[0], 2, dtype=DTYPE)
    with pytest.raises(ValueError, match=pattern):
        conv_forward(layers, x)
    with pytest.raises(ValueError, match=pattern):
        conv_pc_train_step(layers, x, y, inference_steps=1)
    with pytest.raises(ValueError, match=pattern):
        conv_bp_train_step(layers, x, y)
    qs = [torch.zeros(1, dtype=DTYPE)] * (len(layers) - 1)
    with pytest.raises(ValueError, match=pattern):
        conv_tp_train_step(layers, qs, [None] * len(qs), None, x, y)


def test_conv_bad_feedback_raises_value_error_naming_it():
    """A feedback weight of the wrong shape names its index and the layer it belongs to."""
    gen = torch.Generator().manual_seed(9)
    layers, image = _net_b(gen)
    x, y = _batch(gen, 2, image, "mse", 4)
    qs = [_randn(gen, 3, 6, 3, 3), _randn(gen, 4, 3)]  # the second should be (3, 4)
    with pytest.raises(ValueError, match=r"feedback_weights\[1\] \(layers\[2\]\).*\(3, 4\)"):
        conv_tp_train_step(layers, qs, [None, None], None, x, y)
