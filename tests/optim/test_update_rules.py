"""Any torch.optim update rule inside a pcfast optimizer: SGD, Adam and AdamW equal their plain
torch.optim counterparts bitwise at the base width (oracle: ``torch.optim`` itself, fed the same
gradients), get Adam's μP multipliers on lr, ε and weight decay at other widths, round-trip their
state through ``state_dict``, and keep the all-or-nothing guarantee whatever the rule does."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import pcfast
from pcfast.optim.base import update_rule

from test_optimizers import OPTIMIZERS, assert_same_tensors, make_batches, make_model

ALGOS = ["pc", "bp", "tp", "dtp"]
RULES = {
    "sgd": (torch.optim.SGD, dict(momentum=0.9, weight_decay=1e-3, nesterov=True)),
    "adam": (torch.optim.Adam, dict(betas=(0.8, 0.95), eps=1e-6, weight_decay=1e-3)),
    "adam-amsgrad-foreach": (torch.optim.Adam, dict(amsgrad=True, foreach=True)),
    "adamw": (torch.optim.AdamW, dict(weight_decay=0.05)),
}
LR = {"sgd": 0.05, "adam": 1e-3, "adam-amsgrad-foreach": 1e-3, "adamw": 2e-3}


def everything(model, opt):
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    state = {i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
             for i, p in enumerate(model.parameters()) if p in opt.state}
    return params, grads, state, copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("algo", ALGOS)
def test_at_the_base_width_every_rule_is_plain_torch_optim_bitwise(algo, rule):
    """μP at its base width (every multiplier one): each step equals the plain torch.optim
    optimizer over ``model.parameters()`` given the same gradients, bitwise, parameters and state."""
    cls, kwargs = RULES[rule]
    model, twin = make_model(width=8), make_model(width=8)
    twin.load_state_dict(model.state_dict())
    par = pcfast.parametrize(model, "mup", algo=algo, base_width=8, init=False)
    opt = OPTIMIZERS[algo](model, par, lr=LR[rule], optimizer=cls, **kwargs)
    plain = cls(twin.parameters(), lr=LR[rule], **kwargs)
    assert all(g[k] == 1.0 for g in opt.param_groups for k in ("lr_mult", "eps_mult", "weight_decay_mult"))
    for x, y in make_batches(4):
        opt.zero_grad()
        opt.step(x, y)
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        plain.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)
            assert_same_tensors(opt.state[p], plain.state[q])


@pytest.mark.parametrize("algo", ALGOS)
def test_adam_gets_its_own_mup_multipliers_on_lr_eps_and_weight_decay(algo):
    """Width 32 at base width 8 (m = 4): the inner Adam groups step with ``lr · m^{-c^A}``,
    ``eps · m^{c − c^A}`` and ``weight_decay · m^{c − c^A + b}`` (DESIGN §2), and AdamW's decoupled
    decay with ``m^{c^A}``; SGD keeps its table."""
    model = make_model(width=32)
    par = pcfast.parametrize(model, "mup", algo=algo, base_width=8)
    b, c, _ = pcfast.mup.presets.exponents("mup", algo, 0.0)
    m = 4.0
    for cls, decoupled in ((torch.optim.Adam, False), (torch.optim.AdamW, True)):
        opt = OPTIMIZERS[algo](model, par, lr=1e-3, optimizer=cls, eps=1e-8, weight_decay=0.01)
        x, y = make_batches(1)[0]
        opt.step(x, y)
        for group, inner in zip(opt.param_groups, opt.inner_optimizer.param_groups):
            layer = par.layers[group["layer"]]
            name = layer.group
            if group["kind"] == "weight":
                c_adam = {"first": 0.0, "hidden": 1.0, "last": 1.0}[name]
                lr_exp, eps_exp = -c_adam, c[name] - c_adam
                wd_exp = c_adam if decoupled else c[name] - c_adam + (0.0 if name == "first" else b[name])
            else:
                c_b = c[name] if name == "first" else c[name] - 1.0
                lr_exp, eps_exp, wd_exp = 0.0, c_b, 0.0 if decoupled else c_b
            assert layer.width_mult == m
            assert inner["lr"] == pytest.approx(1e-3 * m**lr_exp)
            assert inner["eps"] == pytest.approx(1e-8 * m**eps_exp)
            assert inner["weight_decay"] == pytest.approx(0.01 * m**wd_exp)
            assert group["lr"] == 1e-3 and group["eps"] == 1e-8 and group["weight_decay"] == 0.01
    sgd = OPTIMIZERS[algo](model, par, lr=0.1)
    assert [g["lr_mult"] for g in sgd.param_groups] == [
        m for s in par.layers for m in (s.lr_mult, s.bias_lr_mult)]


def test_the_update_rule_is_recognised_and_unknown_rules_need_sp():
    model = make_model()
    assert update_rule(torch.optim.SGD(model.parameters(), lr=0.1)) == "sgd"
    assert update_rule(torch.optim.Adam(model.parameters())) == "adam"
    assert update_rule(torch.optim.AdamW(model.parameters())) == "adamw"
    assert update_rule(torch.optim.RMSprop(model.parameters())) is None
    par = pcfast.parametrize(model, "mup", algo="pc", base_width=8)
    with pytest.raises(ValueError, match="μP multipliers for SGD and the Adam family .* not for RMSprop"):
        pcfast.optim.PC(model, par, optimizer=torch.optim.RMSprop)
    opt = pcfast.optim.PC(model, lr=1e-3, optimizer=torch.optim.RMSprop, alpha=0.9)  # SP: any rule
    x, y = make_batches(1)[0]
    opt.step(x, y)
    assert opt.inner_optimizer.param_groups[0]["alpha"] == 0.9


@pytest.mark.parametrize("bad, error, match", [
    (dict(optimizer="adam"), TypeError, "optimizer: expected a torch.optim.Optimizer class or a factory"),
    (dict(optimizer=torch.optim.Adam, momentum=0.9), TypeError, r"optimizer: Adam does not take the arguments \['momentum'\]"),
    (dict(optimizer=lambda groups, lr: object()), TypeError, "made a object"),
    (dict(momentum=-1.0), ValueError, "momentum: expected a finite number >= 0"),
    (dict(nesterov=True), ValueError, "nesterov: requires momentum > 0 and dampening = 0"),
    (dict(optimizer=torch.optim.Adam, betas=(0.9, 1.5)), ValueError, "beta"),
])
def test_a_bad_update_rule_is_a_clear_error(bad, error, match):
    with pytest.raises(error, match=match):
        pcfast.optim.PC(make_model(), lr=0.1, **bad)


def test_a_factory_builds_the_inner_optimizer():
    model = make_model()
    made = []

    def factory(groups, lr, **kwargs):
        made.append(kwargs)
        return torch.optim.Adam(groups, lr=lr, **kwargs)

    opt = pcfast.optim.BP(model, lr=1e-3, optimizer=factory, betas=(0.5, 0.5))
    x, y = make_batches(1)[0]
    opt.step(x, y)
    assert made == [{"betas": (0.5, 0.5)}] and isinstance(opt.inner_optimizer, torch.optim.Adam)
    assert opt.update_rule == "adam" and "optimizer=Adam" in repr(opt)


@pytest.mark.parametrize("algo", ALGOS)
def test_adam_state_round_trips_and_is_checked(algo):
    batches = make_batches(6)
    model = make_model()
    opt = OPTIMIZERS[algo](model, lr=1e-3, optimizer=torch.optim.Adam, amsgrad=True)
    for x, y in batches[:3]:
        opt.step(x, y)
    saved = copy.deepcopy(opt.state_dict())
    twin = make_model()
    twin.load_state_dict(model.state_dict())
    fresh = OPTIMIZERS[algo](twin, lr=0.5, optimizer=torch.optim.Adam)  # other settings until loaded
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["amsgrad"] is True and fresh.param_groups[0]["lr"] == 1e-3
    assert fresh.inner_optimizer.state is fresh.state
    for x, y in batches[3:]:
        assert opt.step(x, y) == fresh.step(x, y)
    assert_same_tensors(everything(model, opt)[:3], everything(twin, fresh)[:3])
    sgd = OPTIMIZERS[algo](make_model(), lr=0.1)
    with pytest.raises(ValueError, match="updating with Adam, but this .* updates with SGD"):
        sgd.load_state_dict(saved)
    broken = copy.deepcopy(saved)
    broken["state"][0]["exp_avg"] = broken["state"][0]["exp_avg"][:, :3].clone()
    with pytest.raises(ValueError, match=r"\['state'\]\[0\]\['exp_avg'\]: expected shape"):
        fresh.load_state_dict(broken)


class Poisoned(torch.optim.Adam):
    """Adam whose update leaves a NaN in the first parameter after advancing its state."""

    def step(self, closure=None):
        super().step(closure)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = math.nan


class Raising(torch.optim.SGD):
    def step(self, closure=None):
        super().step(closure)
        raise RuntimeError("the update rule failed half way")


@pytest.mark.parametrize("algo", ALGOS)
def test_an_update_rule_that_goes_wrong_changes_nothing(algo):
    """Whatever the inner rule writes, a non-finite result or an exception puts back parameters,
    .grad and the inner state (Adam's moments and step counts) exactly."""
    model = make_model()
    opt = OPTIMIZERS[algo](model, lr=1e-3, optimizer=Poisoned)
    x, y = make_batches(1)[0]
    opt.param_groups[0]["params"][0].grad = torch.zeros_like(model[0].weight)
    before = everything(model, opt)
    with pytest.raises(pcfast.DivergenceError, match="the update of layer 1 weight is not finite"):
        opt.step(x, y)
    assert_same_tensors(everything(model, opt), before)
    model = make_model()
    opt = OPTIMIZERS[algo](model, lr=0.1, optimizer=Raising, momentum=0.9)
    before = everything(model, opt)
    with pytest.raises(RuntimeError, match="half way"):
        opt.step(x, y)
    assert_same_tensors(everything(model, opt), before)


@pytest.mark.parametrize("algo", ALGOS)
def test_adam_steps_that_diverge_or_get_bad_batches_change_nothing(algo):
    model = make_model(dtype=torch.float32)
    opt = OPTIMIZERS[algo](model, lr=1e-3, optimizer=torch.optim.Adam)
    batches = make_batches(2, dtype=torch.float32)
    opt.step(*batches[0])
    x, y = batches[1]
    before = everything(model, opt)
    bad_x = x.clone()
    bad_x[0, 0] = math.inf
    with pytest.raises(ValueError, match="^x: contains NaN or infinite values"):
        opt.step(bad_x, y)
    with pytest.raises(ValueError, match=r"^y: class labels must lie in \[0, 3\], got values in \[0, 7\]"):
        opt.step(x, torch.where(y == y[0], 7, y))
    assert_same_tensors(everything(model, opt), before)
    for group in opt.param_groups:
        group["lr"] = 1e39  # beyond float32
    with pytest.raises(pcfast.DivergenceError, match="exceeds the largest torch.float32"):
        opt.step(x, y)
    assert_same_tensors(everything(model, opt)[:3], before[:3])  # (the groups hold the new rate)


def test_schedulers_reach_the_inner_rule_with_the_mup_ratios():
    """OneCycleLR writes one rate and cycles Adam's β1 in every group; the inner Adam steps with the
    rate times each group's multiplier and the scheduled β1."""
    model = make_model(width=32)
    par = pcfast.parametrize(model, "mup", algo="pc", base_width=8)
    opt = pcfast.optim.PC(model, par, lr=1e-3, optimizer=torch.optim.Adam, inference_steps=3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    for x, y in make_batches(3):
        schedule.step()
        opt.step(x, y)
        for group, inner in zip(opt.param_groups, opt.inner_optimizer.param_groups):
            assert inner["lr"] == pytest.approx(group["lr"] * group["lr_mult"])
            assert inner["betas"] == group["betas"]
    assert opt.param_groups[0]["betas"][0] != 0.9  # the scheduler moved β1 (cycle_momentum)
    assert len({g["lr"] * g["lr_mult"] for g in opt.param_groups}) > 1


def test_sgd_weight_decay_is_scaled_inversely_to_the_rate():
    """Under μP, SGD's coupled decay shrinks every layer by the same η_l λ_l per step."""
    model = make_model(width=32)
    par = pcfast.parametrize(model, "mup", algo="bp", base_width=8)
    opt = pcfast.optim.BP(model, par, lr=0.1, weight_decay=1e-3)
    opt.step(*make_batches(1)[0])
    shrink = {inner["lr"] * inner["weight_decay"] for inner in opt.inner_optimizer.param_groups}
    assert max(shrink) == pytest.approx(min(shrink)) and min(shrink) == pytest.approx(1e-4)
    assert len({inner["lr"] for inner in opt.inner_optimizer.param_groups}) > 1


def test_bp_bounds_come_from_the_step_they_belong_to():
    """step() without a batch after compute_gradients must not bound the .grad by an earlier batch's
    layer errors: a NaN put into .grad is found, and nothing changes."""
    model = make_model()
    opt = pcfast.optim.BP(model, lr=0.1)
    opt.compute_gradients(*make_batches(1)[0])
    with torch.no_grad():
        model[0].weight.grad[0, 0] = math.nan
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(pcfast.DivergenceError, match="not finite"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params)) and not opt.state
    assert all(torch.allclose(p.grad, g, rtol=0, atol=0, equal_nan=True) for p, g in zip(model.parameters(), grads))
    copy.deepcopy((model, opt))  # nothing of a step is left on the optimizer


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_a_frozen_parameter_with_an_old_grad_is_not_updated(rule):
    cls, kwargs = RULES[rule]
    model = make_model()
    opt = pcfast.optim.PC(model, lr=LR[rule], optimizer=cls, inference_steps=3, **kwargs)
    batches = make_batches(3)
    opt.step(*batches[0])
    model[0].weight.requires_grad_(False)  # frozen, with the .grad of the first step still there
    frozen = model[0].weight.detach().clone()
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[model[0].weight].items()}
    opt.step(*batches[1])
    opt.step()
    assert torch.equal(model[0].weight, frozen)
    assert_same_tensors(dict(opt.state[model[0].weight]), state)


def test_a_copy_with_a_scheduler_attached_is_an_independent_twin():
    model = make_model()
    opt = pcfast.optim.PC(model, lr=0.1, inference_steps=3)
    torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    twin_model, twin = copy.deepcopy((model, opt))
    before = [p.detach().clone() for p in model.parameters()]
    twin.step(*make_batches(1)[0])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not all(torch.equal(p, q) for p, q in zip(twin_model.parameters(), before))


def test_nadam_keeps_scalar_state_and_round_trips():
    """NAdam's 0-d ``mu_product`` is its own business; in float32 (its dtype) the round trip is
    bitwise (torch.optim's load_state_dict casts such state to the parameters' dtype)."""
    model = make_model(dtype=torch.float32)
    opt = pcfast.optim.BP(model, lr=1e-3, optimizer=torch.optim.NAdam)
    batches = make_batches(4, dtype=torch.float32)
    for x, y in batches[:2]:
        opt.step(x, y)
    twin = make_model(dtype=torch.float32)
    twin.load_state_dict(model.state_dict())
    fresh = pcfast.optim.BP(twin, lr=1e-3, optimizer=torch.optim.NAdam)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    for x, y in batches[2:]:
        assert opt.step(x, y) == fresh.step(x, y)


@pytest.mark.parametrize("bad, error, match", [
    (dict(optimizer=lambda groups, lr, **kw: torch.optim.SGD([p for g in groups for p in g["params"]], lr=lr)),
     TypeError, "must keep the groups it is given"),
    (dict(optimizer=lambda groups, lr, **kw: torch.optim.SGD(groups[::-1], lr=lr)),
     TypeError, "must keep the groups it is given"),
    (dict(optimizer=torch.optim.Adam, betas=0.9), TypeError, "not subscriptable"),  # torch's own error, unwrapped
])
def test_factories_that_regroup_and_bad_values_are_clear_errors(bad, error, match):
    with pytest.raises(error, match=match):
        pcfast.optim.PC(make_model(), lr=0.1, **bad)


def test_the_model_not_its_parameters():
    model = make_model()
    with pytest.raises(TypeError, match=r"pass the model, not model.parameters\(\)"):
        pcfast.optim.PC(model.parameters(), lr=0.1)
