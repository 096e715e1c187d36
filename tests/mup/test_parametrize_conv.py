"""μP on conv nets (DESIGN §2, conv): a layer's width is its channels, a unit's fan-in C_in·k_h·k_w
(C·H·W for the first linear layer), with the MLP's exponents."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pcfast
from pcfast.mup import exponents, make_cnn
from pcfast.mup.presets import SP_B, bias_exponent
from pcfast.network import parse_mlp

IMAGE = (3, 8, 8)  # two 2×2 poolings: the first linear layer reads width · 2 · 2 features
ALGOS = ["bp", "pc", "tp", "dtp", "gnt"]


def _layers(model):
    return [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_fan_in_and_fan_out_are_recorded_per_conv_and_linear_layer():
    model = make_cnn(IMAGE, 48, 10)
    par = pcfast.parametrize(model, "mup", algo="pc", base_width=16)
    assert [(s.fan_in, s.fan_out) for s in par.layers] == [(3 * 9, 48), (48 * 9, 48), (48 * 2 * 2, 10)]
    assert [s.group for s in par.layers] == ["first", "hidden", "last"]
    assert [s.width_mult for s in par.layers] == [3.0, 3.0, 3.0]  # 48 channels / base 16


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("gamma_bar", [0.0, -1.0])
def test_init_std_and_lr_multipliers_follow_the_mlp_exponents(algo, gamma_bar):
    """σ_l = σ·fan_in^{-1/2}·m^{-(b_l − b_l^SP)}, drawn so (checked on the weights: ≥ 1280 entries
    each); weight lr m^{-c_l}, bias lr m^{-c_b}; PC's γ_L = γ·m^{-γ̄_L}."""
    width, base, sigma = 128, 16, 1.5
    model = make_cnn(IMAGE, width, 10)
    par = pcfast.parametrize(model, "mup", algo=algo, base_width=base, gamma_bar=gamma_bar, sigma=sigma,
                             gamma=2.0, generator=torch.Generator().manual_seed(0))
    b, c, gb = exponents("mup", algo, gamma_bar)
    m = width / base
    fans = [3 * 9, width * 9, width * 4]
    for layer, scale, group, fan in zip(_layers(model), par.layers, ("first", "hidden", "last"), fans):
        std = sigma * fan**-0.5 * m ** -(b[group] - SP_B[group])
        assert scale.init_std == pytest.approx(std, rel=1e-12), group
        assert layer.weight.numel() >= 1280
        assert float(layer.weight.detach().std()) == pytest.approx(std, rel=0.05), group  # really drawn so
        assert scale.lr_mult == pytest.approx(m ** -c[group]), group
        assert scale.bias_lr_mult == pytest.approx(m ** -bias_exponent(c, group)), group
        assert float(layer.bias.detach().abs().max()) == 0.0
    expected_gamma_l = 2.0 * m**-gb if algo == "pc" else 1.0
    assert par.precisions == pytest.approx([1.0, 1.0, expected_gamma_l])


def test_width_multiplier_of_a_layer_is_the_channels_it_reads():
    """Layers of different widths: the first layer's m is its output channels / base, every other
    layer's the previous layer's output channels (units) / base."""
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 64, 3, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(64 * 4 * 4, 80), nn.Tanh(), nn.Linear(80, 10))
    par = pcfast.parametrize(model, "mup", algo="bp", base_width=16)
    assert [s.width_mult for s in par.layers] == [2.0, 2.0, 4.0, 5.0]
    assert [s.fan_in for s in par.layers] == [9, 32 * 9, 64 * 16, 80]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("gamma_bar", [0.0, -1.0])
def test_mup_equals_sp_bitwise_at_base_width(algo, gamma_bar):
    a, b = make_cnn(IMAGE, 24, 10), make_cnn(IMAGE, 24, 10)
    pa = pcfast.parametrize(a, "mup", algo=algo, base_width=24, gamma_bar=gamma_bar,
                            generator=torch.Generator().manual_seed(7))
    pb = pcfast.parametrize(b, "sp", algo=algo, generator=torch.Generator().manual_seed(7))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert [(s.init_std, s.lr_mult, s.bias_lr_mult, s.precision) for s in pa.layers] == \
           [(s.init_std, s.lr_mult, s.bias_lr_mult, s.precision) for s in pb.layers]
    assert all(s.lr_mult == s.bias_lr_mult == s.precision == 1.0 for s in pa.layers)
    for rule in ("adam", "adamw"):
        assert all(w.lr_mult == w.eps_mult == w.weight_decay_mult == bias.lr_mult == bias.eps_mult == 1.0
                   for w, bias in pa.scales(rule))


@pytest.mark.parametrize("algo", ["bp", "pc", "dtp"])
@pytest.mark.parametrize("rule", ["adam", "adamw"])
def test_adam_scales_on_conv_layers(algo, rule):
    """Adam's multipliers (DESIGN §2): lr m^{-c^A} with c^A = (0, 1, 1), biases 1; ε m^{c_l − c^A_l};
    decoupled decay m^{c^A}, coupled decay m^{c_l − c^A_l + b_l} (b_first counted as 0); bias ε
    and coupled bias decay m^{c_b}."""
    width, base = 64, 16
    m = width / base
    par = pcfast.parametrize(make_cnn(IMAGE, width, 10), "mup", algo=algo, base_width=base)
    b, c, _ = exponents("mup", algo)
    c_adam = {"first": 0.0, "hidden": 1.0, "last": 1.0}
    for (weight, bias), group in zip(par.scales(rule), ("first", "hidden", "last")):
        g = c[group] - c_adam[group]
        assert weight.lr_mult == pytest.approx(m ** -c_adam[group])
        assert weight.eps_mult == pytest.approx(m**g)
        decay = c_adam[group] if rule == "adamw" else g + (0.0 if group == "first" else b[group])
        assert weight.weight_decay_mult == pytest.approx(m**decay)
        c_b = bias_exponent(c, group)
        assert (bias.lr_mult, bias.eps_mult) == pytest.approx((1.0, m**c_b))
        assert bias.weight_decay_mult == pytest.approx(1.0 if rule == "adamw" else m**c_b)


def test_init_false_keeps_the_weights_and_gives_the_same_parametrization():
    model = make_cnn(IMAGE, 32, 10)
    fresh = pcfast.parametrize(model, "mup", algo="dtp", base_width=16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # stand-in for training: every weight and bias moves off its init
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    attached = pcfast.parametrize(model, "mup", algo="dtp", base_width=16, init=False)
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    assert attached == fresh
    pcfast.parametrize(model, "mup", algo="dtp", base_width=16)  # init=True re-initialises
    assert not any(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("other", [
    lambda: make_cnn(IMAGE, 48, 10),  # other channels
    lambda: make_cnn((1, 8, 8), 32, 10),  # other input channels
    lambda: make_cnn((3, 12, 12), 32, 10),  # other image size: the first linear layer's fan-in
    lambda: nn.Sequential(nn.Conv2d(3, 32, 5, padding=2), nn.Tanh(), nn.MaxPool2d(2),  # other kernel
                          nn.Conv2d(32, 32, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 4, 10)),
    lambda: pcfast.mup.make_mlp(3 * 64, 32, 10),  # an MLP
], ids=["channels", "input-channels", "image-size", "kernel", "mlp"])
def test_check_matches_refuses_a_different_model(other):
    par = pcfast.parametrize(make_cnn(IMAGE, 32, 10), "mup", algo="pc", base_width=16)
    par.check_matches(parse_mlp(make_cnn(IMAGE, 32, 10)))  # the same shapes: accepted
    with pytest.raises(ValueError, match=r"parametrization: made for layers .* but the model has"):
        par.check_matches(parse_mlp(other()))
    with pytest.raises(ValueError, match=r"parametrization: made for layers"):  # and so does an optimizer
        pcfast.optim.PC(other(), par, lr=0.1)


def test_state_dict_round_trip_and_description():
    par = pcfast.parametrize(make_cnn(IMAGE, 32, 10), "mup", algo="tp", base_width=16)
    assert pcfast.Parametrization.from_state_dict(par.state_dict()) == par
    assert "layer 2 (hidden, 288->32)" in str(par) and "layer 3 (last, 128->10)" in str(par)
