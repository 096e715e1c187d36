"""The torch.optim contract: .grad, SGD, schedulers, state_dict round trips, all-or-nothing steps."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import pcfast
from pcfast import functional as F
from pcfast import testing

OPTIMIZERS = {"pc": pcfast.optim.PC, "bp": pcfast.optim.BP, "tp": pcfast.optim.TP, "dtp": pcfast.optim.DTP}


def make_model(width=24, dtype=torch.float64, bias=True):
    return testing.make_model((10, width, width, 4), activation=["tanh", "gelu"], bias=bias, dtype=dtype)


def make_batches(n=6, batch=8, dtype=torch.float64):
    return [tuple(b) for b in testing.make_batches((10, 24, 24, 4), batch, n, "ce", dtype=dtype, seed=3)]


def make_opt(algo, model, **kwargs):
    par = pcfast.parametrize(model, "mup", algo=algo, base_width=8, generator=torch.Generator().manual_seed(1))
    return OPTIMIZERS[algo](model, par, lr=0.05, momentum=0.9, weight_decay=1e-3, **kwargs)


def snapshot(model, opt):
    state = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return params, grads, state


def assert_same_tensors(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tensors(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_tensors(x, y)
    else:
        assert a == b


def test_pc_writes_local_gradients_to_grad_before_the_update():
    model = make_model()
    opt = pcfast.optim.PC(model, lr=0.1, inference_steps=7, inference_lr=0.15, loss="ce")
    x, y = make_batches(1)[0]
    weights = [p.detach().clone() for p in model.parameters()]
    expected = F.pc_train_step([weights[0], weights[2], weights[4]], [weights[1], weights[3], weights[5]],
                               ["tanh", "gelu"], x, y, inference_steps=7, inference_lr=0.15, loss="ce")
    stats = opt.step(x, y)
    grads = [m.weight.grad for m in model if isinstance(m, nn.Linear)]
    for g, e in zip(grads, expected.weight_grads):
        assert torch.equal(g, e)
    for p, w, g in zip(model.parameters(), weights, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(p.detach(), w - 0.1 * g, rtol=0, atol=1e-15)
    assert set(stats) == {"loss", "energy"} and stats["loss"] == pytest.approx(float(expected.loss))


def test_compute_gradients_then_clip_then_step():
    model = make_model()
    opt = pcfast.optim.PC(model, lr=0.1)
    x, y = make_batches(1)[0]
    opt.compute_gradients(x, y)
    before = [p.detach().clone() for p in model.parameters()]
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    clipped = [p.grad.clone() for p in model.parameters()]
    assert opt.step() is None
    for p, b, g in zip(model.parameters(), before, clipped):
        torch.testing.assert_close(p.detach(), b - 0.1 * g, rtol=0, atol=1e-15)


def test_bp_matches_torch_sgd_with_momentum_nesterov_and_weight_decay():
    model = make_model()
    twin = copy.deepcopy(model)
    opt = pcfast.optim.BP(model, lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True, loss="ce")
    sgd = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True)
    for x, y in make_batches(4):
        opt.zero_grad()
        opt.step(x, y)
        sgd.zero_grad()
        torch.nn.functional.cross_entropy(twin(x), y).backward()
        sgd.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_mup_learning_rates_are_parameter_groups_and_schedulers_scale_them():
    model = make_model(width=32)
    opt = make_opt("pc", model)
    mults = [g["lr"] * g["lr_mult"] / 0.05 for g in opt.param_groups if g["kind"] == "weight"]
    assert mults == pytest.approx([4.0, 1.0, 0.25])  # m = 32/8, c = (−1, 0, 1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = make_batches(1)[0]
    opt.step(x, y)
    sched.step()
    assert [g["lr"] * g["lr_mult"] / 0.025 for g in opt.param_groups if g["kind"] == "weight"] == pytest.approx(mults)


@pytest.mark.parametrize("algo", ["pc", "bp", "tp", "dtp"])
def test_resume_from_state_dict_is_bitwise_identical(algo):
    batches = make_batches(6)
    model = make_model()
    opt = make_opt(algo, model)
    for x, y in batches:
        opt.zero_grad()
        opt.step(x, y)
    straight = [p.detach().clone() for p in model.parameters()]

    model = make_model()
    opt = make_opt(algo, model)
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
            p.normal_()  # make sure loading, not luck, restores the state
    fresh_opt = OPTIMIZERS[algo](fresh, lr=1.0, momentum=0.9)
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["opt"])
    assert fresh_opt.parametrization == opt.parametrization
    for x, y in batches[3:]:
        fresh_opt.zero_grad()
        fresh_opt.step(x, y)
    for a, b in zip(fresh.parameters(), straight):
        assert torch.equal(a.detach(), b)
    if algo in ("tp", "dtp"):
        assert len(fresh_opt.feedback_weights) == 2


@pytest.mark.parametrize("algo", ["pc", "bp", "dtp"])
def test_divergent_step_raises_and_changes_nothing(algo):
    model = make_model()
    opt = make_opt(algo, model)
    batches = make_batches(3)
    for x, y in batches[:2]:
        opt.zero_grad()
        opt.step(x, y)  # momentum buffers and .grad now exist
    params, grads, state = snapshot(model, opt)
    for group in opt.param_groups:
        group["lr"] = float("inf")  # a scheduler gone wrong: every update becomes non-finite
    x, y = batches[2]
    with pytest.raises(pcfast.DivergenceError):
        opt.step(x, y)
    after_params, after_grads, after_state = snapshot(model, opt)
    assert_same_tensors(after_params, params)
    assert_same_tensors(after_grads, grads)
    for saved in (state, after_state):
        for group in saved["param_groups"]:
            group.pop("lr")
    assert_same_tensors(after_state, state)


def test_divergent_relaxation_raises_before_any_change():
    model = make_model()
    opt = pcfast.optim.PC(model, lr=0.1, inference_lr=50.0, inference_steps=200)
    x, y = make_batches(1)[0]
    params, grads, state = snapshot(model, opt)
    with pytest.raises(pcfast.DivergenceError, match="energy|gradient"):
        opt.step(x * 1e3, y)
    after = snapshot(model, opt)
    assert_same_tensors(after[0], params)
    assert_same_tensors(after[1], grads)


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpp") if pcfast.ops.is_available(b)])
@pytest.mark.parametrize("algo", ["pc", "bp", "dtp"])
def test_float32_overflow_is_a_divergence_on_every_cpu_backend(algo, backend):
    """Energies and losses past float32's range (accumulated in double by the C++ engine) must reach
    the DivergenceError check as inf, not fail inside a backend with another error."""
    model = make_model(dtype=torch.float32)
    opt = make_opt(algo, model, backend=backend, loss="mse")
    x = make_batches(1, dtype=torch.float32)[0][0]
    y = torch.full((x.shape[0], 4), 1e25)  # finite targets whose ½‖y − f‖² ≈ 1e50 does not fit in float32
    params, grads, state = snapshot(model, opt)
    with pytest.raises(pcfast.DivergenceError):
        opt.step(x, y)
    after = snapshot(model, opt)
    assert_same_tensors(after[0], params)
    assert_same_tensors(after[1], grads)
    assert_same_tensors(after[2], state)


def test_feedback_divergence_rolls_back_feedback_and_noise_generator():
    model = make_model()
    opt = pcfast.optim.DTP(model, lr=0.01, feedback_lr=1e300, feedback_noise=0.5)
    x, y = make_batches(1)[0]
    feedback = [q.clone() for q in opt.feedback_weights]
    rng = opt.generator.get_state()
    with pytest.raises(pcfast.DivergenceError):
        opt.step(x, y)
    assert_same_tensors(opt.feedback_weights, feedback)
    assert torch.equal(opt.generator.get_state(), rng)


def test_ridge_feedback_mode_trains():
    model = make_model()
    opt = pcfast.optim.DTP(model, lr=0.05, feedback="ridge", feedback_weight_decay=1e-2)
    losses = [opt.step(x, y)["loss"] for x, y in make_batches(6) * 5]
    assert losses[-1] < losses[0]
    assert opt.feedback_activations == ["identity", "identity"]
