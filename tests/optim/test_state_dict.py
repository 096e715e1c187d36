"""``load_state_dict`` checks the whole state dict before it changes anything: algorithm, groups,
momentum buffers, parametrization and the TP/DTP feedback maps; a mismatch raises with the optimizer
exactly as it was."""
from __future__ import annotations

import copy

import pytest
import torch

from test_optimizer_contract import ALGOS, everything, trained
from test_optimizers import OPTIMIZERS, assert_same_tensors, make_batches, make_model, make_opt


def assert_load_fails_and_changes_nothing(model, opt, state, error, match):
    before = everything(model, opt)
    with pytest.raises(error, match=match):
        opt.load_state_dict(state)
    assert_same_tensors(everything(model, opt), before)
    assert opt.parametrization.state_dict() == before[3]["parametrization"]


@pytest.mark.parametrize("source, target", [(s, t) for s in ALGOS for t in ALGOS if s != t])
def test_a_state_saved_by_another_algorithm_is_refused(source, target):
    _, saved_by = trained(source)
    model, opt = trained(target)
    assert_load_fails_and_changes_nothing(model, opt, saved_by.state_dict(), ValueError,
                                          f"algo='{source}'.*runs algo='{target}'")


@pytest.mark.parametrize("algo", ALGOS)
def test_a_wider_models_state_is_refused_before_any_buffer_changes(algo):
    wide = make_model(width=16)
    wide_opt = make_opt(algo, wide)
    for x, y in make_batches(2):
        wide_opt.step(x, y)
    model = make_model(width=8)
    opt = make_opt(algo, model)
    for x, y in make_batches(2):
        opt.step(x, y)
    assert_load_fails_and_changes_nothing(model, opt, wide_opt.state_dict(), ValueError,
                                          r"momentum_buffer'\]: expected shape \(8, 10\)")


def corrupt(state, algo, what):
    state = copy.deepcopy(state)
    buffers = [entry["momentum_buffer"] for entry in state["state"].values()]
    if what == "buffer shape":
        state["state"][0]["momentum_buffer"] = buffers[0][:, :3].clone()
    elif what == "buffer dtype":
        state["state"][1]["momentum_buffer"] = buffers[1].float()
    elif what == "buffer type":
        state["state"][1]["momentum_buffer"] = buffers[1].tolist()
    elif what == "unknown parameter id":
        state["state"][99] = {"momentum_buffer": buffers[0]}
    elif what == "one group fewer":
        state["param_groups"].pop()
    elif what == "group size":
        state["param_groups"][0]["params"] = [0, 1]
    elif what == "group layer":
        state["param_groups"][2]["layer"] = 0
    elif what == "learning rate":
        state["param_groups"][0]["lr"] = float("nan")
    elif what == "setting type":
        state["param_groups"][0]["nesterov"] = "false"
    elif what == "no algorithm":
        del state["algo"]
    elif what == "no multiplier (older format)":
        for group in state["param_groups"]:
            del group["lr_mult"]
    elif what == "parametrization shape":
        state["parametrization"]["layers"][1]["fan_out"] = 16
    elif what == "parametrization garbage":
        state["parametrization"] = {"preset": "mup"}
    return state


CORRUPTIONS = {
    "buffer shape": r"\['state'\]\[0\]\['momentum_buffer'\]: expected shape \(24, 10\)",
    "buffer dtype": r"\['state'\]\[1\]\['momentum_buffer'\]: expected shape \(24,\), dtype torch.float64 .*float32",
    "buffer type": r"\['state'\]\[1\]\['momentum_buffer'\]: expected .* got list",
    "unknown parameter id": r"no parameter group holds parameter id 99",
    "one group fewer": r"has 5 groups, this optimizer 6",
    "group size": r"\['param_groups'\]\[0\]\['params'\]: expected 1 parameter ids",
    "group layer": r"\['param_groups'\]\[2\]\['layer'\]: expected 1, got 0",
    "learning rate": r"\['param_groups'\]\[0\]\['lr'\]: expected a finite number",
    "setting type": r"\['param_groups'\]\[0\]\['nesterov'\]: expected a bool",
    "no algorithm": r"no \['algo'\] entries",
    "no multiplier (older format)": r"has no \['lr_mult'\] entries",
    "parametrization shape": r"parametrization.*made for layers",
    "parametrization garbage": r"state_dict\['parametrization'\]: not a saved pcfast parametrization",
}


@pytest.mark.parametrize("what", list(CORRUPTIONS))
@pytest.mark.parametrize("algo", ALGOS)
def test_a_mismatched_state_dict_raises_naming_the_entry_and_changes_nothing(algo, what):
    _, saved_by = trained(algo, steps=3)
    model, opt = trained(algo)
    state = corrupt(saved_by.state_dict(), algo, what)
    error = TypeError if what == "setting type" else ValueError
    assert_load_fails_and_changes_nothing(model, opt, state, error, CORRUPTIONS[what])


FEEDBACK_CORRUPTIONS = {
    "weight shape": (lambda f: f["weights"].__setitem__(0, f["weights"][0][:, :5].clone()),
                     r"\['feedback'\]\['weights'\]\[0\]: expected shape \(24, 24\)"),
    "weight dtype": (lambda f: f["weights"].__setitem__(1, f["weights"][1].float()),
                     r"\['feedback'\]\['weights'\]\[1\]: expected shape \(24, 4\), dtype torch.float64"),
    "missing bias": (lambda f: f["biases"].__setitem__(1, None),
                     r"\['feedback'\]\['biases'\]\[1\]: expected shape \(24,\)"),
    "one map fewer": (lambda f: f["weights"].pop(), r"\['feedback'\]\['weights'\]: expected 2 entries"),
    "activation": (lambda f: f["activations"].__setitem__(0, "softplus"),
                   r"\['feedback'\]\['activations'\]\[0\]: expected one of"),
    "generator": (lambda f: f.__setitem__("generator", torch.zeros(3)), r"\['feedback'\]\['generator'\]"),
}


@pytest.mark.parametrize("what", list(FEEDBACK_CORRUPTIONS))
@pytest.mark.parametrize("algo", ["tp", "dtp"])
def test_mismatched_feedback_state_raises_and_changes_nothing(algo, what):
    _, saved_by = trained(algo, steps=3)
    model, opt = trained(algo)
    state = copy.deepcopy(saved_by.state_dict())
    change, match = FEEDBACK_CORRUPTIONS[what]
    change(state["feedback"])
    assert_load_fails_and_changes_nothing(model, opt, state, ValueError, match)


@pytest.mark.parametrize("algo", ALGOS)
def test_a_good_state_dict_loads_whole_into_a_fresh_optimizer(algo):
    _, saved_by = trained(algo, steps=3)
    saved = copy.deepcopy(saved_by.state_dict())
    model = make_model()
    opt = OPTIMIZERS[algo](model, lr=1.0)  # other settings and an SP parametrization until loaded
    opt.load_state_dict(saved)
    assert_same_tensors(opt.state_dict(), saved)
    assert opt.parametrization == saved_by.parametrization
    assert opt.state[model[0].weight]["momentum_buffer"].shape == model[0].weight.shape


def test_added_param_group_round_trips_and_must_exist_to_load():
    _, opt = trained("bp")
    extra = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt.add_param_group({"params": [extra], "lr": 0.2})
    extra.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    model, fresh = trained("bp")
    assert_load_fails_and_changes_nothing(model, fresh, saved, ValueError, "has 7 groups, this optimizer 6")
    other = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    fresh.add_param_group({"params": [other]})
    fresh.load_state_dict(saved)
    assert fresh.param_groups[-1]["lr"] == 0.2
    assert torch.equal(fresh.state[other]["momentum_buffer"], opt.state[extra]["momentum_buffer"])
