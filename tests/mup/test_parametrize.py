"""μP presets: SP at the base width, init stds from the table, and the coordinate check."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pcfast
from pcfast.mup import exponents, make_mlp


@pytest.mark.parametrize("algo", ["bp", "pc", "tp", "dtp", "gnt"])
@pytest.mark.parametrize("gamma_bar", [0.0, -1.0])
def test_mup_equals_sp_bitwise_at_base_width(algo, gamma_bar):
    a, b = make_mlp(20, 32, 5), make_mlp(20, 32, 5)
    pa = pcfast.parametrize(a, "mup", algo=algo, base_width=32, gamma_bar=gamma_bar, generator=torch.Generator().manual_seed(7))
    pb = pcfast.parametrize(b, "sp", algo=algo, generator=torch.Generator().manual_seed(7))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert [(s.init_std, s.lr_mult, s.bias_lr_mult, s.precision) for s in pa.layers] == \
           [(s.init_std, s.lr_mult, s.bias_lr_mult, s.precision) for s in pb.layers]
    assert all(s.lr_mult == 1.0 and s.precision == 1.0 for s in pa.layers)


@pytest.mark.parametrize("algo, b_last, c", [
    ("bp", 1.0, (-1.0, 0.0, 1.0)), ("pc", 1.0, (-1.0, 0.0, 1.0)), ("tp", 0.5, (0.0, 1.0, 1.0)),
    ("dtp", 0.5, (0.0, 1.0, 1.0)), ("gnt", 1.0, (0.0, 1.0, 1.0)),
])
def test_init_std_and_lr_multipliers_follow_the_table(algo, b_last, c):
    width, base, d0 = 1024, 64, 100
    model = make_mlp(d0, width, 10)
    par = pcfast.parametrize(model, "mup", algo=algo, base_width=base, generator=torch.Generator().manual_seed(0))
    m = width / base
    expected_std = [d0**-0.5, width**-0.5, width**-0.5 * m ** -(b_last - 0.5)]
    linears = [mod for mod in model if isinstance(mod, nn.Linear)]
    for lin, scale, std, cl in zip(linears, par.layers, expected_std, c):
        assert scale.init_std == pytest.approx(std, rel=1e-12)
        assert float(lin.weight.detach().std()) == pytest.approx(std, rel=0.05)  # the weights really were drawn so
        assert scale.lr_mult == pytest.approx(m**-cl)
        assert float(lin.bias.detach().abs().max()) == 0.0


def test_pc_gamma_bar_sets_output_precision_and_learning_rates():
    model = make_mlp(10, 256, 3)
    par = pcfast.parametrize(model, "mup", algo="pc", base_width=64, gamma_bar=-1.0, gamma=2.0)
    assert par.precisions == pytest.approx([1.0, 1.0, 2.0 * 4.0])  # γ_L = γ m^{-γ̄}
    assert par.lr_mults == pytest.approx([1.0, 4.0**-1, 4.0**-2])  # c = (−1−γ̄, −γ̄, 1−γ̄)
    assert exponents("mup", "pc", -0.5)[1] == {"first": -0.5, "hidden": 0.5, "last": 1.5}


def test_parametrization_state_dict_round_trip():
    par = pcfast.parametrize(make_mlp(10, 96, 3), "mup", algo="dtp", base_width=32)
    assert pcfast.Parametrization.from_state_dict(par.state_dict()) == par
    assert "layer 3 (last, 96->3)" in str(par)



def _train(model, par, steps, x, y, opt_state=None):
    opt = pcfast.optim.PC(model, par, lr=0.05, momentum=0.9, inference_steps=5)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    for _ in range(steps):
        opt.zero_grad()
        opt.step(x, y)
    return opt


@pytest.mark.parametrize("algo, gamma_bar", [("pc", -1.0), ("bp", 0.0), ("dtp", 0.0)])
def test_parametrize_without_init_keeps_trained_weights_and_gives_the_same_multipliers(algo, gamma_bar):
    model = make_mlp(12, 48, 4)
    fresh = pcfast.parametrize(model, "mup", algo=algo, base_width=16, gamma_bar=gamma_bar,
                               generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # stand-in for training: every weight and bias moves off its init
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    attached = pcfast.parametrize(model, "mup", algo=algo, base_width=16, gamma_bar=gamma_bar, init=False)
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    assert attached == fresh  # multipliers, precisions and init stds depend on the shapes only
    pcfast.parametrize(model, "mup", algo=algo, base_width=16, gamma_bar=gamma_bar)  # init=True re-initialises
    assert not any(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_resuming_with_parametrize_init_false_continues_the_run_bitwise():
    gen = torch.Generator().manual_seed(5)
    x, y = torch.rand(8, 12, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    whole = make_mlp(12, 48, 4)
    _train(whole, pcfast.parametrize(whole, "mup", algo="pc", base_width=16, gamma_bar=-1.0,
                                     generator=torch.Generator().manual_seed(0)), 4, x, y)
    first = make_mlp(12, 48, 4)
    opt = _train(first, pcfast.parametrize(first, "mup", algo="pc", base_width=16, gamma_bar=-1.0,
                                           generator=torch.Generator().manual_seed(0)), 2, x, y)
    checkpoint = {"model": first.state_dict(), "optimizer": opt.state_dict()}
    resumed = make_mlp(12, 48, 4)
    resumed.load_state_dict(checkpoint["model"])
    par = pcfast.parametrize(resumed, "mup", algo="pc", base_width=16, gamma_bar=-1.0, init=False)
    _train(resumed, par, 2, x, y, opt_state=checkpoint["optimizer"])
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("init", ["false", 0, None])
def test_parametrize_init_must_be_a_bool(init):
    model = make_mlp(12, 48, 4)
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"init: expected a bool, got"):
        pcfast.parametrize(model, "mup", algo="pc", base_width=16, init=init)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))

# Widths 64 … 2048, as the parametrization table was measured; seeds averaged.
WIDTHS = (64, 128, 256, 512, 1024, 2048)
VARIANTS = [("bp", 0.0), ("pc", 0.0), ("pc", -0.5), ("pc", -1.0), ("tp", 0.0), ("dtp", 0.0)]


@pytest.mark.parametrize("algo, gamma_bar", VARIANTS, ids=[f"{a}{g:+g}" if a == "pc" else a for a, g in VARIANTS])
def test_coordinate_check_mup_is_width_independent_and_sp_is_not(algo, gamma_bar):
    """Under μP every weight's Δu and every bias's step stays flat in width for three steps;
    under SP some layer's step-1 Δu does not."""
    mup = pcfast.coord_check(WIDTHS, algo=algo, preset="mup", base_width=64, gamma_bar=gamma_bar, steps=3)
    sp = pcfast.coord_check(WIDTHS, algo=algo, preset="sp", base_width=64, gamma_bar=gamma_bar, steps=1)
    assert_flat_under_mup_and_not_under_sp(mup, sp, f"{algo} {gamma_bar:+g}")


def assert_flat_under_mup_and_not_under_sp(mup, sp, label: str) -> None:
    """Every weight's Δu and bias step has |slope| ≤ 0.15 at steps 1–3 under μP; some step-1 Δu
    slope under SP is ≥ 0.3."""
    for step in (1, 2, 3):
        weights, biases = mup.slopes("delta_u", step), mup.slopes("bias_step", step)
        print(f"{label} step {step}: mup Δu slopes {[round(s, 3) for s in weights]}, "
              f"bias slopes {[round(s, 3) for s in biases]}")
        assert len(weights) == len(biases) == 3
        assert all(abs(s) <= 0.15 for s in weights), (step, weights)
        assert all(abs(s) <= 0.15 for s in biases), (step, biases)
    sp_slopes = sp.slopes("delta_u", 1)
    assert max(abs(s) for s in sp_slopes) >= 0.3, sp_slopes


ADAM_VARIANTS = [(algo, gamma_bar, torch.optim.Adam) for algo, gamma_bar in VARIANTS] + [
    ("bp", 0.0, torch.optim.AdamW), ("pc", -1.0, torch.optim.AdamW)]


@pytest.mark.parametrize("algo, gamma_bar, optimizer", ADAM_VARIANTS,
                         ids=[f"{a}{g:+g}-{o.__name__}" if a == "pc" else f"{a}-{o.__name__}" for a, g, o in ADAM_VARIANTS])
def test_coordinate_check_with_adam_mup_is_width_independent_and_sp_is_not(algo, gamma_bar, optimizer):
    """Adam's own table (DESIGN §2: c^A = (0, 1, 1), biases 0, ε and weight decay scaled): under μP
    every weight's Δu and every bias's step stays flat in width for three steps, for every
    algorithm and γ̄_L; under SP with Adam some layer's step-1 Δu grows with width."""
    common = dict(algo=algo, base_width=64, gamma_bar=gamma_bar, lr=1e-3, optimizer=optimizer, weight_decay=1e-2)
    mup = pcfast.coord_check(WIDTHS, preset="mup", steps=3, **common)
    sp = pcfast.coord_check(WIDTHS, preset="sp", steps=1, **common)
    assert_flat_under_mup_and_not_under_sp(mup, sp, f"{algo} {gamma_bar:+g} {optimizer.__name__}")


def test_coordinate_check_records_bias_steps_per_layer():
    result = pcfast.coord_check((64, 128), algo="pc", preset="mup", gamma_bar=-1.0, steps=2, seeds=(0,))
    data = result.to_dict()
    assert set(data["slopes"]) == set(data["bias_slopes"]) == {"1", "2"}
    assert len(data["slopes"]["1"]) == len(data["bias_slopes"]["1"]) == 3
    assert all(r["delta_u"] > 0 and r["bias_step"] > 0 and r["activation"] > 0 for r in data["records"])
    unbiased = pcfast.coord_check((64, 128), algo="bp", preset="mup", steps=1, seeds=(0,),
                                  make_model=lambda width: make_mlp(784, width, 10, bias=False))
    assert not unbiased.has_biases and "bias_slopes" not in unbiased.to_dict()
    assert unbiased.slopes("bias_step", 1) == [] and len(unbiased.slopes("delta_u", 1)) == 3


@pytest.mark.slow
def test_coordinate_check_pc_gamma_bar_minus_one_to_width_4096():
    """γ̄_L = −1, where the output precision grows fastest, up to the width where an unscaled output
    bias made training diverge."""
    mup = pcfast.coord_check((64, 256, 1024, 4096), algo="pc", preset="mup", gamma_bar=-1.0, steps=3, seeds=(0,))
    for step in (1, 2, 3):
        for quantity in ("delta_u", "bias_step"):
            slopes = mup.slopes(quantity, step)
            assert all(abs(s) <= 0.15 for s in slopes), (step, quantity, slopes)


def _pc_output_bias_run(width, gamma_bar, steps=3):
    """μP PC on tanh 784-M-M-10 (base width 64, lr 0.1, batch 32): the output bias's first step
    (RMS of b_L^(1) − b_L^(0)) and the MSE loss of the feedforward pass before and after ``steps``."""
    gen = torch.Generator().manual_seed(1234)
    x = torch.rand(32, 784, generator=gen)
    y = torch.nn.functional.one_hot(torch.randint(0, 10, (32,), generator=gen), 10).float()
    model = make_mlp(784, width, 10)
    par = pcfast.parametrize(model, "mup", algo="pc", base_width=64, gamma_bar=gamma_bar, readout_scale=0.1,
                             generator=torch.Generator().manual_seed(0))
    opt = pcfast.optim.PC(model, par, lr=0.1, inference_steps=20, inference_lr=0.1)

    def loss():
        with torch.no_grad():
            return float(0.5 * (model(x) - y).pow(2).sum(1).mean())

    bias0, loss0 = model[-1].bias.detach().clone(), loss()
    for step in range(steps):
        opt.zero_grad()
        opt.step(x, y)
        if step == 0:
            bias_step = float((model[-1].bias.detach() - bias0).pow(2).mean().sqrt())
    return bias_step, loss0, loss()


def test_pc_output_bias_step_is_width_independent_at_gamma_bar_minus_one():
    """The output bias's PC gradient −γ_L·mean(ε_L) carries γ_L = γ·m^{-γ̄_L}; its multiplier m^{γ̄_L}
    cancels that, so its step does not grow with width and training at large width does not blow up."""
    widths = (64, 256, 1024)
    runs = [_pc_output_bias_run(w, -1.0) for w in widths]
    slope = pcfast.mup.coord._slope(widths, [r[0] for r in runs])
    assert abs(slope) <= 0.15, ([r[0] for r in runs], slope)
    for width, (_, before, after) in zip(widths, runs):
        assert after < before, (width, before, after)  # three steps reduce the loss at every width
