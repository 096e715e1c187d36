"""The coordinate check on conv nets: the width is the channels of every conv layer (DESIGN §2, conv)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import pcfast
from pcfast.mup import make_cnn
from pcfast.mup.coord import CoordCheckConfig

# Channel widths 32 … 256 (base 32) on 1×8×8 images, a fixed batch of 16, eight init seeds averaged:
# a single seed's slope scatters by about ±0.1–0.17 (sd) at these widths, so fewer seeds measure noise.
# lr 0.05: at 0.1 the readout's second step undoes most of its first (the cumulative step-2 readout
# update is ~0.3× step 1's, its size set by a near-cancellation), which measures that overshoot, not
# the update's scale with width.
WIDTHS = (32, 64, 128, 256)
CNN = dict(model="cnn", image_shape=(1, 8, 8), base_width=32, batch_size=16, lr=0.05, seeds=tuple(range(8)))


@pytest.mark.parametrize("algo", ["bp", "pc", "dtp"])
def test_cnn_coordinate_check_mup_is_channel_width_independent_and_sp_is_not(algo):
    """Under μP every conv and linear layer's Δu and every bias step has |slope| ≤ 0.15 in log2
    channels at steps 1–3; under SP some layer's step-1 Δu has |slope| ≥ 0.3 (measured: first conv
    ≈ −0.5, second conv ≈ +0.5 (BP, PC) or +1 (DTP), readout ≈ +1)."""
    mup = pcfast.coord_check(WIDTHS, algo=algo, preset="mup", steps=3, **CNN)
    sp = pcfast.coord_check(WIDTHS, algo=algo, preset="sp", steps=1, **CNN)
    for step in (1, 2, 3):
        weights, biases = mup.slopes("delta_u", step), mup.slopes("bias_step", step)
        print(f"{algo} step {step}: mup Δu slopes {[round(s, 3) for s in weights]}, "
              f"bias slopes {[round(s, 3) for s in biases]}")
        assert len(weights) == len(biases) == 3
        assert all(abs(s) <= 0.15 for s in weights), (step, weights)
        assert all(abs(s) <= 0.15 for s in biases), (step, biases)
    sp_slopes = sp.slopes("delta_u", 1)
    print(f"{algo} step 1: sp Δu slopes {[round(s, 3) for s in sp_slopes]}")
    assert max(abs(s) for s in sp_slopes) >= 0.3, sp_slopes


def test_cnn_delta_u_equals_the_modules_own_conv_of_the_weight_change():
    """Oracle: torch's own modules. Δu_l of each layer is the layer module, with weight
    W_l^(t) − W_l^(0) and zero bias, applied to its initial input h_{l-1}^(0) (the initial model's
    modules before it: activations, pooling, flatten); bias_step is RMS(b^(t) − b^(0))."""
    models = []

    def make_model(width):
        models.append(make_cnn((2, 6, 6), width, 4, pool="avg"))
        return models[-1]

    result = pcfast.coord_check((8,), algo="bp", preset="mup", base_width=4, lr=0.5, steps=2, seeds=(3,),
                                batch_size=5, num_classes=4, model="cnn", image_shape=(2, 6, 6),
                                make_model=make_model)
    trained = models[0]
    initial = copy.deepcopy(trained)
    pcfast.parametrize(initial, "mup", algo="bp", base_width=4, readout_scale=0.1,
                       generator=torch.Generator().manual_seed(3))  # the check's own draws
    gen = torch.Generator().manual_seed(1234)
    x = torch.rand(5, 2, 6, 6, generator=gen)  # the default batch
    positions = [k for k, m in enumerate(initial) if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [type(initial[k]) for k in positions] == [nn.Conv2d, nn.Conv2d, nn.Linear]
    with torch.no_grad():
        for l, k in enumerate(positions):
            h = initial[:k](x)
            change = copy.deepcopy(initial[k])
            change.weight.copy_(trained[k].weight - initial[k].weight)
            change.bias.zero_()
            record = next(r for r in result.records if r["layer"] == l + 1 and r["step"] == 2)
            expected = float(change(h).pow(2).mean().sqrt())
            assert expected > 0 and record["delta_u"] == pytest.approx(expected, rel=1e-5)
            bias_step = float((trained[k].bias - initial[k].bias).pow(2).mean().sqrt())
            assert record["bias_step"] == pytest.approx(bias_step, rel=1e-6)


def test_cnn_config_builds_make_cnn_on_its_images():
    seen = []
    result = pcfast.coord_check((4, 8), algo="dtp", base_width=4, steps=1, seeds=(0,), batch_size=3,
                                model="cnn", image_shape=(3, 5, 7), hidden_layers=3, pool="avg",
                                progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 2), (2, 2)] and result.depth == 4  # three conv layers and the readout
    config = CoordCheckConfig(model="cnn", image_shape=[3, 5, 7])
    assert config.image_shape == (3, 5, 7) and hash(config) == hash(CoordCheckConfig(model="cnn", image_shape=(3, 5, 7)))


@pytest.mark.parametrize("settings, message", [
    (dict(model="resnet"), r"model: expected one of \('mlp', 'cnn'\), got 'resnet'"),
    (dict(model="cnn", pool="min"), r"pool: expected one of \('max', 'avg'\), got 'min'"),
    (dict(model="cnn", image_shape=(8, 8)), r"image_shape: expected three positive ints \(C, H, W\)"),
    (dict(model="cnn", image_shape=(1, 0, 8)), r"image_shape: expected three positive ints \(C, H, W\)"),
], ids=["model", "pool", "image-rank", "image-size"])
def test_cnn_settings_are_checked_when_made(settings, message):
    with pytest.raises(ValueError, match=message):
        CoordCheckConfig(**settings)


def test_cnn_needs_image_data():
    x, y = torch.rand(4, 64), torch.eye(10)[:4]
    with pytest.raises(ValueError, match=r"data: model='cnn' needs images x of shape \(B, C, H, W\), got shape \(4, 64\)"):
        pcfast.coord_check((4, 8), model="cnn", base_width=4, data=(x, y))


def test_cnn_experiment_run_coordcheck_takes_model():
    """``run_coordcheck(settings, model="cnn")`` (the CLI's ``--model cnn``) measures the conv net:
    its panels hold the records of ``coord_check(model="cnn")`` with the same settings."""
    from pcfast.experiments.coordcheck import CoordSettings, run_coordcheck

    settings = CoordSettings(variants=("bp",), parametrizations=("mup",), widths=(4, 8), steps=1, seeds=(0,),
                             base_width=4, batch_size=3, image_shape=(1, 6, 6))
    result = run_coordcheck(settings, show_progress=False, model="cnn")
    assert result["settings"]["model"] == "cnn" and settings.model == "mlp"
    direct = pcfast.coord_check((4, 8), algo="bp", preset="mup", base_width=4, steps=1, seeds=(0,), batch_size=3,
                                model="cnn", image_shape=(1, 6, 6))
    assert result["panels"][0]["records"] == direct.records
    with pytest.raises(ValueError, match=r"model: expected one of \('mlp', 'cnn'\), got 'xx'"):
        run_coordcheck(settings, show_progress=False, model="xx")
