"""The torch.optim contract where a PyTorch user relies on it without reading the docs: failed steps
change nothing, frozen and replaced parameters, copies, added parameter groups, every scheduler,
gradient accumulation and gradients that the optimizer did not compute."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import pcfast

from test_optimizers import OPTIMIZERS, assert_same_tensors, make_batches, make_model, make_opt

ALGOS = ["pc", "bp", "tp", "dtp"]


def everything(model, opt):
    """Parameters, .grad and the whole optimizer state (momentum, groups, feedback maps, generator)."""
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    raw_state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(model.parameters())
                 if p in opt.state}
    return params, grads, raw_state, copy.deepcopy(opt.state_dict())


def trained(algo, steps=2, **kwargs):
    model = make_model()
    opt = make_opt(algo, model, **kwargs)
    for x, y in make_batches(steps):
        opt.zero_grad()
        opt.step(x, y)  # momentum buffers, .grad, trained feedback maps and an advanced generator exist
    return model, opt


def weight_groups(opt):
    return [g for g in opt.param_groups if g.get("kind") == "weight"]


# ---------------------------------------------------------------- a failed step changes nothing


@pytest.mark.parametrize("with_batch", [True, False], ids=["step(x,y)", "step()"])
@pytest.mark.parametrize("algo", ALGOS)
def test_step_with_a_corrupted_momentum_buffer_raises_and_changes_nothing(algo, with_batch):
    """A buffer of the wrong shape that still broadcasts (so the update computes) must be found
    before anything — weights, .grad, momentum, feedback maps, generator — is written."""
    model, opt = trained(algo)
    last = model[4].bias
    opt.state[last]["momentum_buffer"] = torch.zeros(2, *last.shape, dtype=last.dtype)
    before = everything(model, opt)
    x, y = make_batches(3)[2]
    with pytest.raises(ValueError, match=r"momentum buffer of layer 3 bias has shape \(2, 4\)"):
        opt.step(x, y) if with_batch else opt.step()
    assert_same_tensors(everything(model, opt), before)


@pytest.mark.parametrize("algo", ["tp", "dtp"])
def test_step_with_corrupted_feedback_weights_raises_and_changes_nothing(algo):
    model, opt = trained(algo)
    opt.feedback_weights[1] = torch.zeros(24, 5, dtype=torch.float64)
    before = everything(model, opt)
    with pytest.raises(ValueError, match=r"feedback_weights\[1\]: expected shape \(24, 4\)"):
        opt.step(*make_batches(1)[0])
    assert_same_tensors(everything(model, opt), before)


# ---------------------------------------------------------------- frozen and replaced parameters


@pytest.mark.parametrize("algo", ALGOS)
def test_frozen_parameters_are_neither_updated_nor_given_grad(algo):
    model = make_model()
    opt = make_opt(algo, model)
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    others = [p.detach().clone() for p in list(model.parameters())[1:]]
    for x, y in make_batches(2):
        opt.zero_grad()
        opt.step(x, y)
    assert torch.equal(model[0].weight, frozen)
    assert model[0].weight.grad is None and model[0].weight not in opt.state
    assert all(not torch.equal(p, q) for p, q in zip(list(model.parameters())[1:], others))
    model[0].weight.requires_grad_(True)  # unfreezing between steps trains it again
    opt.step(*make_batches(3)[2])
    assert model[0].weight.grad is not None and not torch.equal(model[0].weight, frozen)


def test_frozen_layer_leaves_the_other_layers_training_as_bp_with_that_layer_frozen():
    """Oracle: torch.optim.SGD over the same model whose first weight does not require grad."""
    model = make_model()
    twin = copy.deepcopy(model)
    model[0].weight.requires_grad_(False)
    twin[0].weight.requires_grad_(False)
    opt = pcfast.optim.BP(model, lr=0.05, momentum=0.9, loss="ce")
    sgd = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    for x, y in make_batches(3):
        opt.zero_grad()
        opt.step(x, y)
        sgd.zero_grad()
        nn.functional.cross_entropy(twin(x), y).backward()
        sgd.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("change", ["weight Parameter", "Linear module", "activation module", "appended module"])
def test_a_model_changed_after_the_optimizer_was_built_raises_saying_to_rebuild(algo, change):
    model, opt = trained(algo)
    if change == "weight Parameter":
        model[2].weight = nn.Parameter(model[2].weight.detach().clone())
    elif change == "Linear module":
        model[2] = nn.Linear(24, 24, dtype=torch.float64)
    elif change == "activation module":
        model[1] = nn.ReLU()
    else:
        model.append(nn.Identity())
    before = everything(model, opt)
    for call in (lambda: opt.step(*make_batches(1)[0]), opt.step, lambda: opt.compute_gradients(*make_batches(1)[0])):
        with pytest.raises(ValueError, match="new optimizer"):
            call()
    assert_same_tensors(everything(model, opt), before)


# ---------------------------------------------------------------- copies


@pytest.mark.parametrize("algo", ALGOS)
def test_deepcopy_of_model_and_optimizer_trains_identically(algo):
    model, opt = trained(algo)
    model_copy, opt_copy = copy.deepcopy((model, opt))
    assert opt_copy.mlp.linears[0] is model_copy[0] and opt_copy.param_groups[0]["params"][0] is model_copy[0].weight
    batches = make_batches(6)[3:]
    for x, y in batches:  # the copy first: training it must not touch the original
        opt_copy.zero_grad()
        opt_copy.step(x, y)
    for x, y in batches:
        opt.zero_grad()
        opt.step(x, y)
    assert_same_tensors([p.detach() for p in model_copy.parameters()], [p.detach() for p in model.parameters()])
    assert_same_tensors(opt_copy.state_dict(), opt.state_dict())


def test_deepcopy_of_the_optimizer_alone_works():
    model, opt = trained("dtp")
    alone = copy.deepcopy(opt)
    assert alone.mlp.linears[0] is not model[0]
    assert_same_tensors(alone.state_dict(), opt.state_dict())


# ---------------------------------------------------------------- add_param_group


@pytest.mark.parametrize("algo", ALGOS)
def test_add_param_group_updates_the_added_parameters_as_torch_sgd(algo):
    model = make_model()
    opt = make_opt(algo, model)  # momentum 0.9, weight decay 1e-3
    extra = nn.Parameter(torch.linspace(-1, 1, 5, dtype=torch.float64))
    twin = nn.Parameter(extra.detach().clone())
    opt.add_param_group({"params": [extra], "lr": 0.2})
    sgd = torch.optim.SGD([twin], lr=0.2, momentum=0.9, weight_decay=1e-3)
    for k, (x, y) in enumerate(make_batches(3)):
        for p, o in ((extra, opt), (twin, sgd)):
            o.zero_grad()
            (p**3).sum().backward()
        opt.step(x, y) if k % 2 == 0 else opt.step()  # both ways of stepping update the added group
        sgd.step()
    assert torch.equal(extra.detach(), twin.detach())
    assert torch.equal(opt.state[extra]["momentum_buffer"], sgd.state[twin]["momentum_buffer"])


# ---------------------------------------------------------------- schedulers keep the μP ratios


def effective_rates(opt):
    return [g["lr"] * g["lr_mult"] for g in opt.param_groups]


def mup_opt(algo="bp", momentum=0.9):
    model = make_model(width=32)
    par = pcfast.parametrize(model, "mup", algo=algo, base_width=8, generator=torch.Generator().manual_seed(1))
    return model, OPTIMIZERS[algo](model, par, lr=0.05, momentum=momentum)


def assert_mup_ratios(opt, mults):
    rates = effective_rates(opt)
    assert [r / rates[0] for r in rates] == pytest.approx([m / mults[0] for m in mults], rel=1e-12)


@pytest.mark.parametrize("scheduler", ["OneCycleLR", "CyclicLR"])
def test_single_rate_schedulers_keep_every_groups_mup_ratio_through_a_whole_cycle(scheduler):
    model, opt = mup_opt()
    mults = [g["lr_mult"] for g in opt.param_groups]
    assert [m for m in mults[::2]] == pytest.approx([4.0, 1.0, 0.25])  # weights: m = 32/8, c = (−1, 0, 1)
    total = 12
    if scheduler == "OneCycleLR":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total)
    else:
        sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.001, max_lr=0.1, step_size_up=total // 2)
    base_rates = []
    for x, y in (make_batches(total // 2) * 2)[:total]:
        assert_mup_ratios(opt, mults)
        base_rates.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        opt.step(x, y)
        sched.step()
    assert max(base_rates) == pytest.approx(0.1, rel=0.05) and min(base_rates) < 0.01  # a whole cycle was run


@pytest.mark.parametrize("algo", ALGOS)
def test_the_update_uses_base_rate_times_multiplier(algo):
    model, opt = mup_opt(algo, momentum=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stepping the schedule alone, to a rate mid-cycle
        for _ in range(3):
            sched.step()
    params = [p.detach().clone() for p in model.parameters()]
    for k, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, 1.0 + k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hand-written .grad: the foreign-gradient warning is expected
        opt.step()
    for p, before, group in zip(model.parameters(), params, opt.param_groups):
        assert group["params"][0] is p
        assert torch.equal(p.detach(), before.add(p.grad, alpha=-(group["lr"] * group["lr_mult"])))


@pytest.mark.parametrize("scheduler", ["StepLR", "CosineAnnealingLR", "ReduceLROnPlateau"])
def test_per_group_schedulers_scale_the_base_rate_and_round_trip_through_state_dict(scheduler):
    def build():
        model, opt = mup_opt()
        sched = {"StepLR": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
                 "CosineAnnealingLR": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
                 "ReduceLROnPlateau": lambda: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0,
                                                                                          factor=0.5)}[scheduler]()
        return model, opt, sched

    def advance(opt, sched, batches):
        for x, y in batches:
            opt.zero_grad()
            opt.step(x, y)
            sched.step(1.0) if scheduler == "ReduceLROnPlateau" else sched.step()  # a flat metric: plateau

    batches = make_batches(6)
    model, opt, sched = build()
    mults = [g["lr_mult"] for g in opt.param_groups]
    advance(opt, sched, batches[:3])
    assert opt.param_groups[0]["lr"] < 0.05
    assert_mup_ratios(opt, mults)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    advance(opt, sched, batches[3:])
    straight = [p.detach().clone() for p in model.parameters()]

    model, opt, sched = build()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    advance(opt, sched, batches[3:])
    assert_same_tensors([p.detach() for p in model.parameters()], straight)
    assert_mup_ratios(opt, mults)


# ---------------------------------------------------------------- gradients: accumulation and foreign .grad


@pytest.mark.parametrize("algo", ["bp", "pc"])
def test_compute_gradients_accumulates_micro_batches_like_backward(algo):
    """Per-sample gradients are independent (PC relaxes every sample on its own), so the mean of the
    two half-batch gradients equals the full batch's."""
    x, y = make_batches(1, batch=8)[0]
    model = make_model()
    opt = make_opt(algo, model)
    opt.compute_gradients(x, y)
    full = [p.grad.clone() for p in model.parameters()]
    opt.zero_grad()
    opt.compute_gradients(x[:4], y[:4])
    opt.compute_gradients(x[4:], y[4:])
    for p, g in zip(model.parameters(), full):
        torch.testing.assert_close(p.grad / 2, g)  # float64 defaults: rounding only


def test_step_with_a_batch_trains_on_that_batch_alone():
    model = make_model()
    opt = make_opt("bp", model)
    x, y = make_batches(1)[0]
    expected = pcfast.functional.bp_train_step([m.weight.detach().clone() for m in model[::2]],
                                               [m.bias.detach().clone() for m in model[::2]], ["tanh", "gelu"], x, y)
    opt.compute_gradients(*make_batches(2)[1])  # a stale .grad that step(x, y) replaces
    opt.step(x, y)
    for m, g in zip(model[::2], expected.weight_grads):
        assert torch.equal(m.weight.grad, g)


def backprop_grads(model, x, y):
    model.zero_grad()
    nn.functional.mse_loss(model(x), nn.functional.one_hot(y, 4).to(x.dtype)).backward()


@pytest.mark.parametrize("algo", ["pc", "tp", "dtp"])
def test_step_after_backward_warns_once_that_it_applies_foreign_gradients(algo):
    model = make_model()
    opt = make_opt(algo, model)
    x, y = make_batches(1)[0]
    backprop_grads(model, x, y)
    with pytest.warns(UserWarning, match=r"\.grad of layer 1 weight was not written by"):
        opt.step()
    backprop_grads(model, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once per optimizer


def test_compute_gradients_then_clip_then_step_does_not_warn_nor_does_bp_after_backward():
    x, y = make_batches(1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = make_model()
        opt = make_opt("pc", model)
        for _ in range(2):
            opt.zero_grad()
            opt.compute_gradients(x, y)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-2)
            opt.step()
        opt.zero_grad(set_to_none=False)
        opt.compute_gradients(x, y)
        opt.step()
        model = make_model()
        opt = make_opt("bp", model)
        backprop_grads(model, x, y)
        opt.step()


def test_compute_gradients_into_backward_gradients_warns():
    model = make_model()
    opt = make_opt("pc", model)
    x, y = make_batches(1)[0]
    backprop_grads(model, x, y)
    with pytest.warns(UserWarning, match="compute_gradients.*added to it"):
        opt.compute_gradients(x, y)
