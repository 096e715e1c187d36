"""``pcfast.optim.BP``'s fast step against its oracles (torch.optim.SGD + autograd, the reference, the
general out-of-place path) and ``pcfast.optim.GNT`` against ``functional.gnt_train_step`` + SGD."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import pcfast
from pcfast import testing
from pcfast import functional as F
from pcfast import reference
from pcfast.optim.base import LocalOptimizer

ACTS = ["tanh", "gelu"]


def make_model(width=24, dtype=torch.float64, bias=True, classes=4):
    return testing.make_model((10, width, width, classes), activation=["tanh", "gelu"], bias=bias, dtype=dtype)


def make_batches(n=5, batch=8, dtype=torch.float64, classes=4, seed=3):
    return [tuple(b) for b in testing.make_batches((10, 24, 24, classes), batch, n, "ce", dtype=dtype, seed=seed)]


def linears(model):
    return [m for m in model if isinstance(m, nn.Linear)]


def everything(model, opt):
    """Parameters, .grad and optimizer state, cloned."""
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} if p in opt.state else None for p in model.parameters()]
    return params, grads, state


def assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def general_step(opt, x, y):
    """The base class's out-of-place, per-tensor-checked step — the path BP's fast step must equal."""
    return LocalOptimizer.step(opt, x, y)


# ---------------------------------------------------------------- BP: oracles


SGD_SETTINGS = {
    "plain": {},
    "momentum": dict(momentum=0.9),
    "momentum-dampening": dict(momentum=0.9, dampening=0.3),
    "nesterov-weight-decay": dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
}


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("settings", list(SGD_SETTINGS), ids=list(SGD_SETTINGS))
def test_bp_equals_torch_sgd_and_autograd_over_five_steps(settings, loss):
    """At SP (every learning-rate multiplier 1) pcfast BP is the PyTorch training loop: same .grad,
    momentum buffers and parameters after each of 5 steps, in float64, to rounding."""
    kwargs = SGD_SETTINGS[settings]
    model = make_model()
    twin = copy.deepcopy(model)
    opt = pcfast.optim.BP(model, pcfast.parametrize(model, "sp", algo="bp", init=False), lr=0.05, loss=loss, **kwargs)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.05, **kwargs)
    for x, y in make_batches(5):
        opt.zero_grad()
        stats = opt.step(x, y)
        sgd.zero_grad()
        f = twin(x)
        if loss == "ce":
            value = nn.functional.cross_entropy(f, y)
        else:  # pcfast's MSE: ½‖y − f‖² per sample, averaged over the batch
            value = 0.5 * (nn.functional.one_hot(y, 4).to(f.dtype) - f).pow(2).sum(1).mean()
        value.backward()
        sgd.step()
        assert stats["loss"] == pytest.approx(value.item(), rel=1e-12)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)
            if kwargs.get("momentum"):
                torch.testing.assert_close(opt.state[p]["momentum_buffer"], sgd.state[q]["momentum_buffer"],
                                           rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_bp_step_writes_the_reference_gradients_bitwise(dtype, loss):
    model = make_model(dtype=dtype)
    opt = pcfast.optim.BP(model, lr=0.05, loss=loss)
    x, y = make_batches(1, dtype=dtype)[0]
    lins = linears(model)
    target = nn.functional.one_hot(y, 4).to(dtype) if loss == "mse" else y
    expected = reference.bp_train_step([m.weight.detach().clone() for m in lins], [m.bias.detach().clone() for m in lins],
                                       ACTS, x, target, loss=loss)
    stats = opt.step(x, y)
    assert stats["loss"] == float(expected.loss)
    for m, gw, gb in zip(lins, expected.weight_grads, expected.bias_grads):
        assert torch.equal(m.weight.grad, gw) and torch.equal(m.bias.grad, gb)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("settings", list(SGD_SETTINGS), ids=list(SGD_SETTINGS))
def test_bp_fast_step_equals_the_general_path_bitwise_under_mup(settings, bias):
    """With μP multipliers (a different rate per group) the in-place foreach update gives exactly the
    numbers of LocalOptimizer.step's out-of-place path: parameters, .grad, momentum, stats."""
    fast_model, slow_model = make_model(width=32, bias=bias), make_model(width=32, bias=bias)
    opts = []
    for model in (fast_model, slow_model):
        par = pcfast.parametrize(model, "mup", algo="bp", base_width=8, generator=torch.Generator().manual_seed(1))
        opts.append(pcfast.optim.BP(model, par, lr=0.05, **SGD_SETTINGS[settings]))
    fast, slow = opts
    assert len({g["lr"] * g["lr_mult"] for g in fast.param_groups}) > 1
    for x, y in make_batches(5):
        fast.zero_grad()
        slow.zero_grad()
        assert fast.step(x, y) == general_step(slow, x, y)
        assert_same(everything(fast_model, fast), everything(slow_model, slow))


def test_bp_bfloat16_step_equals_the_general_path_bitwise():
    """In bfloat16 the finiteness test reads the gradients' own norms (accumulated in float32)."""
    fast_model, slow_model = make_model(dtype=torch.bfloat16), make_model(dtype=torch.bfloat16)
    fast, slow = (pcfast.optim.BP(m, lr=0.05, momentum=0.9) for m in (fast_model, slow_model))
    for x, y in make_batches(3, dtype=torch.bfloat16):
        fast.zero_grad()
        slow.zero_grad()
        assert fast.step(x, y) == general_step(slow, x, y)
        assert_same(everything(fast_model, fast), everything(slow_model, slow))


# ---------------------------------------------------------------- BP: all-or-nothing on the fast path


def test_bp_update_that_overflows_raises_and_changes_nothing():
    """Finite loss and gradients, but θ − η·g overflows float32: the finiteness test cannot certify
    the step, and the general path raises DivergenceError with nothing written."""
    model = make_model(dtype=torch.float32)
    opt = pcfast.optim.BP(model, lr=0.05, momentum=0.9)
    batches = make_batches(3, dtype=torch.float32)
    for x, y in batches[:2]:
        opt.zero_grad()
        opt.step(x, y)
    for group in opt.param_groups:
        group["lr"] = 3e38  # finite, so only the update itself can overflow
    x, y = batches[2]
    target = 100.0 * nn.functional.one_hot(y, 4).float()  # gradients of size ~10: η·g ≈ 3e39
    before = everything(model, opt)
    with pytest.raises(pcfast.DivergenceError, match="update"):
        opt.step(x, target)
    assert_same(everything(model, opt), before)


@pytest.mark.parametrize("lr", [1e35, 1e36, 1e37, 1e38])
def test_bp_steps_near_overflow_match_the_general_path(lr):
    """Around the size where the norm bound stops certifying the step, the fast step still does what
    the general path does: the same new values, or the same DivergenceError with nothing changed."""
    fast_model, slow_model = make_model(dtype=torch.float32), make_model(dtype=torch.float32)
    fast, slow = (pcfast.optim.BP(m, lr=lr) for m in (fast_model, slow_model))
    x, y = make_batches(1, dtype=torch.float32)[0]
    target = 3.0 * nn.functional.one_hot(y, 4).float()
    outcomes = []
    for model, opt, step in ((fast_model, fast, opt_step), (slow_model, slow, general_step)):
        try:
            outcomes.append(step(opt, x, target))
        except pcfast.DivergenceError as error:
            outcomes.append(type(error))
    assert outcomes[0] == outcomes[1]
    assert_same(everything(fast_model, fast), everything(slow_model, slow))


def opt_step(opt, x, y):
    return opt.step(x, y)


@pytest.mark.parametrize("where", ["x", "y"])
def test_bp_non_finite_batch_raises_value_error_and_changes_nothing(where):
    """The fast step does not scan x and float targets itself (the norm test sees them); the error
    is still the ValueError naming the argument, with nothing changed."""
    model = make_model()
    opt = pcfast.optim.BP(model, lr=0.05, momentum=0.9)
    x, y = make_batches(1)[0]
    opt.step(x, y)
    target = nn.functional.one_hot(y, 4).double()
    if where == "x":
        x = x.clone()
        x[3, 7] = float("inf")
    else:
        target[2, 1] = float("nan")
    before = everything(model, opt)
    with pytest.raises(ValueError, match=f"^{where}: contains NaN or infinite values"):
        opt.step(x, target)
    assert_same(everything(model, opt), before)


def test_bp_parameter_hook_and_added_group_take_the_general_path():
    """A tensor hook on a parameter (which autograd on the live parameter would run) and a group
    added with add_param_group leave the fast path: the result is the general path's."""
    fast_model, slow_model = make_model(), make_model()
    fast, slow = (pcfast.optim.BP(m, lr=0.05, momentum=0.9) for m in (fast_model, slow_model))
    calls = []
    fast_model[0].weight.register_hook(lambda g: calls.append(1))
    extra_fast, extra_slow = (torch.zeros(3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    fast.add_param_group({"params": [extra_fast]})
    slow.add_param_group({"params": [extra_slow]})
    for x, y in make_batches(3):
        for extra in (extra_fast, extra_slow):
            extra.grad = torch.ones(3, dtype=torch.float64)
        assert fast.step(x, y) == general_step(slow, x, y)
    assert_same(everything(fast_model, fast), everything(slow_model, slow))
    assert torch.equal(extra_fast, extra_slow) and not calls


@pytest.mark.parametrize("hook", [False, True], ids=["live", "hooked"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("label", [4, -1, 2**40], ids=["classes", "negative", "huge"])
def test_bp_label_out_of_range_raises_value_error_and_changes_nothing(label, loss, hook):
    """Under MSE a label out of range takes the one-hot table's NaN row (no separate guard), under
    CE it is caught by the guard: either way the ValueError names y and nothing changes — also on
    the path a parameter hook takes (the reference's gradients on detached copies)."""
    model = make_model()
    opt = pcfast.optim.BP(model, lr=0.05, momentum=0.9, loss=loss)
    if hook:
        model[0].weight.register_hook(lambda g: g)
    x, y = make_batches(1)[0]
    opt.step(x, y)
    y = y.clone()
    y[5] = label
    before = everything(model, opt)
    with pytest.raises(ValueError, match=r"^y: class labels must lie in \[0, 3\]"):
        opt.step(x, y)
    assert_same(everything(model, opt), before)
    with pytest.raises(ValueError, match=r"^y: class labels must lie in \[0, 3\]"):
        opt.compute_gradients(x, y)
    assert_same(everything(model, opt), before)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_bp_settings_written_between_steps_take_effect():
    """Settings are derived from the groups once and reused until a group is written: every way of
    writing one (item assignment, update, setdefault, pop, a group replaced by a plain dict,
    load_state_dict, a scheduler) reaches the next step — the same steps as torch.optim.SGD with the
    same writes (the oracle), and the inner groups hold the new rates."""
    model = make_model()
    twin = copy.deepcopy(model)
    opt = pcfast.optim.BP(model, lr=0.05, momentum=0.5)
    sgd = torch.optim.SGD([{"params": [p]} for p in twin.parameters()], lr=0.05, momentum=0.5)
    saved = copy.deepcopy(opt.state_dict())

    def pop_and_setdefault(groups):
        groups[2].pop("nesterov")
        groups[2].setdefault("nesterov", True)

    writes = [
        lambda groups: groups[0].__setitem__("lr", 0.02),
        lambda groups: groups[1].update(lr=0.03, momentum=0.9),
        pop_and_setdefault,
        lambda groups: groups.__setitem__(3, dict(groups[3], lr=0.07)),
        lambda groups: groups[3].__setitem__("lr", 0.01),  # now a plain dict
    ]
    batches = make_batches(len(writes) + 3)
    for k, (x, y) in enumerate(batches):
        if k < len(writes):
            for optimizer in (opt, sgd):
                writes[k](optimizer.param_groups)
        elif k == len(writes):  # back to the saved state (rates 0.05, momentum 0.5, no buffers)
            opt.load_state_dict(saved)
            sgd.state.clear()
            for group in sgd.param_groups:
                group.update(lr=0.05, momentum=0.5, nesterov=False)
        elif k == len(writes) + 1:
            for optimizer in (opt, sgd):
                torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 0.5).step()
        opt.zero_grad()
        opt.step(x, y)
        sgd.zero_grad()
        f = twin(x)
        (0.5 * (nn.functional.one_hot(y, 4).to(f.dtype) - f).pow(2).sum(1).mean()).backward()
        sgd.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)
        for group, inner, theirs in zip(opt.param_groups, opt.inner_optimizer.param_groups, sgd.param_groups):
            assert inner["lr"] == group["lr"] * group["lr_mult"] == theirs["lr"]
            assert inner["momentum"] == theirs["momentum"] and inner["nesterov"] == theirs["nesterov"]


# ---------------------------------------------------------------- GNT


def gnt_opt(model, **kwargs):
    par = pcfast.parametrize(model, "mup", algo="gnt", base_width=8, generator=torch.Generator().manual_seed(1))
    return pcfast.optim.GNT(model, par, **kwargs)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_gnt_step_equals_functional_gnt_train_step_plus_sgd_by_hand(loss):
    model = make_model(width=16)
    opt = gnt_opt(model, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, beta=0.7, loss=loss)
    lins = linears(model)
    rates = [(0.05 * s.lr_mult, 0.05 * s.bias_lr_mult) for s in opt.parametrization.layers]
    assert len({r for pair in rates for r in pair}) > 1  # μP: the layers' rates differ
    lrs = [w for w, _ in rates] + [b for _, b in rates]
    buffers = None
    for x, y in make_batches(3):
        weights = [m.weight.detach().clone() for m in lins]
        biases = [m.bias.detach().clone() for m in lins]
        expected = F.gnt_train_step(weights, biases, ACTS, x, y, beta=0.7, loss=loss)
        params, grads = weights + biases, expected.weight_grads + expected.bias_grads
        # torch.optim.SGD's rule with momentum 0.9, Nesterov, weight decay 1e-3 / lr_mult (under μP the
        # shrink per step η_l λ_l = 0.05 · 1e-3 is the same in every layer), written out
        d = [g + 1e-3 * (0.05 / lr) * p for g, p, lr in zip(grads, params, lrs)]
        buffers = [t.clone() for t in d] if buffers is None else [0.9 * b + t for b, t in zip(buffers, d)]
        new = [p - lr * (t + 0.9 * b) for p, lr, t, b in zip(params, lrs, d, buffers)]
        weights, biases = new[:3], new[3:]
        opt.zero_grad()
        stats = opt.step(x, y)
        assert stats["loss"] == pytest.approx(float(expected.loss), rel=1e-12)
        for m, gw, gb, w, b in zip(lins, expected.weight_grads, expected.bias_grads, weights, biases):
            assert torch.equal(m.weight.grad, gw) and torch.equal(m.bias.grad, gb)
            torch.testing.assert_close(m.weight.detach(), w, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(m.bias.detach(), b, rtol=1e-12, atol=1e-14)


def test_gnt_trains_a_small_problem():
    """A 10-24-24-4 network fits 8 fixed samples: the loss falls to a small fraction of its start."""
    model = make_model()
    opt = gnt_opt(model, lr=0.1, momentum=0.5)
    x, y = make_batches(1)[0]
    losses = [opt.step(x, y)["loss"] for _ in range(40)]
    assert losses[-1] < 0.2 * losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(beta=-0.5), ValueError, r"beta: expected a finite number >= 0, got -0.5"),
    (dict(beta=float("nan")), ValueError, r"beta: expected a finite number >= 0, got nan"),
    (dict(beta=True), ValueError, r"beta: expected a finite number >= 0, got True"),
    (dict(backend="torch"), ValueError, r"backend: GNT has only the reference implementation.*got 'torch'"),
    (dict(loss="l1"), ValueError, r"loss: expected one of"),
    (dict(lr=0.0), ValueError, r"lr: expected a finite number > 0(\.0)?, got 0.0"),
], ids=["negative-beta", "nan-beta", "bool-beta", "backend", "loss", "lr"])
def test_gnt_rejects_bad_settings(kwargs, error, match):
    with pytest.raises(error, match=match):
        pcfast.optim.GNT(make_model(), **kwargs)


def test_gnt_rejects_a_parametrization_for_another_algorithm():
    model = make_model()
    with pytest.raises(ValueError, match=r"algo='pc'.*call pcfast.parametrize\(model, ..., algo='gnt'\)"):
        pcfast.optim.GNT(model, pcfast.parametrize(model, "mup", algo="pc", base_width=8))


@pytest.mark.parametrize("bad, match", [
    ("shape", r"x: expected shape \(batch >= 1, 10\)"),
    ("nan", r"x: contains NaN or infinite values"),
    ("label", r"y: class labels must lie in \[0, 3\]"),
])
def test_gnt_bad_batch_raises_and_changes_nothing(bad, match):
    model = make_model()
    opt = gnt_opt(model, lr=0.05, momentum=0.9)
    x, y = make_batches(1)[0]
    opt.step(x, y)
    if bad == "shape":
        x = x[:, :9]
    elif bad == "nan":
        x = x.clone()
        x[0, 0] = float("nan")
    else:
        y = y.clone()
        y[0] = 4
    before = everything(model, opt)
    with pytest.raises(ValueError, match=match):
        opt.step(x, y)
    assert_same(everything(model, opt), before)


def test_gnt_resume_from_state_dict_is_bitwise_identical():
    batches = make_batches(6)
    model = make_model()
    opt = gnt_opt(model, lr=0.05, momentum=0.9, beta=0.5)
    for x, y in batches:
        opt.zero_grad()
        opt.step(x, y)
    straight = [p.detach().clone() for p in model.parameters()]

    model = make_model()
    opt = gnt_opt(model, lr=0.05, momentum=0.9, beta=0.5)
    for x, y in batches[:3]:
        opt.zero_grad()
        opt.step(x, y)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    fresh = make_model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()  # loading, not luck, must restore the weights
    fresh_opt = pcfast.optim.GNT(fresh, lr=1.0, momentum=0.9, beta=2.0)
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["opt"])
    assert fresh_opt.parametrization == opt.parametrization
    assert fresh_opt.param_groups[0]["beta"] == 0.5
    for x, y in batches[3:]:
        fresh_opt.zero_grad()
        fresh_opt.step(x, y)
    for a, b in zip(fresh.parameters(), straight):
        assert torch.equal(a.detach(), b)
