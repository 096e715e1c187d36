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


# Widths 64 … 2048, as the parametrization table was measured; seeds averaged; step 1.
WIDTHS = (64, 128, 256, 512, 1024, 2048)


@pytest.mark.parametrize("algo", ["bp", "pc", "tp", "dtp"])
def test_coordinate_check_mup_is_width_independent_and_sp_is_not(algo):
    mup = pcfast.coord_check(WIDTHS, algo=algo, preset="mup", base_width=64, steps=1)
    sp = pcfast.coord_check(WIDTHS, algo=algo, preset="sp", base_width=64, steps=1)
    mup_slopes, sp_slopes = mup.slopes(step=1), sp.slopes(step=1)
    print(f"{algo}: mup slopes {[round(s, 3) for s in mup_slopes]}, sp slopes {[round(s, 3) for s in sp_slopes]}")
    assert all(abs(s) <= 0.15 for s in mup_slopes), mup_slopes
    assert max(abs(s) for s in sp_slopes) >= 0.3, sp_slopes


def test_coordinate_check_records_pc_gamma_bar_minus_one():
    """γ̄_L = −1 is transitional at finite width (DESIGN §2): record, don't assert the limit."""
    result = pcfast.coord_check((64, 256, 1024), algo="pc", preset="mup", gamma_bar=-1.0, steps=2, seeds=(0,))
    data = result.to_dict()
    assert set(data["slopes"]) == {"1", "2"} and len(data["slopes"]["1"]) == 3
    assert all(r["delta_u"] > 0 and r["activation"] > 0 for r in data["records"])
