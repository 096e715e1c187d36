"""``coord_check``'s settings: keywords and ``CoordCheckConfig`` are the same check; the config checks itself."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import pcfast
from pcfast.mup.coord import CoordCheckConfig

WIDTHS = (8, 16)
SMALL = dict(base_width=8, steps=2, seeds=(0, 1), batch_size=5, input_dim=7, num_classes=3)


@pytest.mark.parametrize("algo", ["bp", "pc", "tp", "dtp"])
def test_config_gives_the_records_of_the_same_keywords(algo):
    by_keywords = pcfast.coord_check(WIDTHS, algo=algo, **SMALL)
    by_config = pcfast.coord_check(WIDTHS, config=CoordCheckConfig(algo=algo, **SMALL))
    assert by_config.records == by_keywords.records
    assert (by_config.algo, by_config.preset) == (algo, "mup")


def test_config_forwards_the_other_keywords_to_the_optimizer():
    config = CoordCheckConfig(algo="pc", lr=1e-3, **SMALL)
    adam = dict(optimizer=torch.optim.Adam, weight_decay=1e-2, inference_steps=4)
    by_config = pcfast.coord_check(WIDTHS, config=config, **adam)
    by_keywords = pcfast.coord_check(WIDTHS, algo="pc", lr=1e-3, **SMALL, **adam)
    sgd = pcfast.coord_check(WIDTHS, config=config, inference_steps=4)
    assert by_config.records == by_keywords.records
    assert by_config.records != sgd.records
    with pytest.raises(TypeError, match=r"optimizer: SGD does not take the arguments \['stesp'\]"):
        pcfast.coord_check(WIDTHS, config=config, stesp=3)


def test_a_setting_in_config_and_as_a_keyword_is_refused():
    with pytest.raises(TypeError, match=r"coord_check: lr, steps given both in config and as keywords"):
        pcfast.coord_check(WIDTHS, config=CoordCheckConfig(**SMALL), steps=1, lr=0.5)


@pytest.mark.parametrize("settings, message", [
    (dict(preset="xx"), r"preset: expected one of \('sp', 'mup'\), got 'xx'"),
    (dict(algo="xx"), r"algo: expected one of \('bp', 'pc', 'tp', 'dtp', 'gnt'\), got 'xx'"),
    (dict(algo="gnt"), r"algo: expected one of \['bp', 'dtp', 'pc', 'tp'\], got 'gnt'"),
    (dict(gamma_bar=-1.5), r"gamma_bar: expected a value in \[-1, 0\]"),
], ids=["preset", "algo", "algo-without-optimizer", "gamma_bar"])
def test_config_checks_itself_when_made(settings, message):
    with pytest.raises(ValueError, match=message):
        CoordCheckConfig(**settings)
    with pytest.raises(ValueError, match=message):  # the keyword form raises the same, before any model
        pcfast.coord_check(WIDTHS, **settings, progress=lambda done, total: pytest.fail("built a model"))


def test_config_is_a_frozen_hashable_value():
    config = CoordCheckConfig(seeds=[2, 3])
    assert config.seeds == (2, 3)
    assert config == CoordCheckConfig(seeds=(2, 3)) and hash(config) == hash(CoordCheckConfig(seeds=(2, 3)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    assert dataclasses.replace(config, lr=0.5).lr == 0.5


def test_every_setting_is_documented():
    doc = CoordCheckConfig.__doc__
    missing = [f.name for f in dataclasses.fields(CoordCheckConfig) if f"    {f.name}: " not in doc]
    assert not missing, missing


def test_the_signature_names_every_setting_with_its_default():
    import inspect

    params = inspect.signature(pcfast.coord_check).parameters
    for f in dataclasses.fields(CoordCheckConfig):
        assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY and params[f.name].default == f.default, f.name
    assert list(params)[:2] == ["widths", "config"] and params["optimizer_kwargs"].kind is inspect.Parameter.VAR_KEYWORD
