"""The certificate of BP's in-place SGD step: the norm bounds that let a step update in place at once.

Each certain step keeps the bounds of its new parameter and momentum-buffer norms, with the
tensors' autograd versions and addresses, and the next step takes them instead of reading those
norms. These tests check that the kept bounds are bounds (against the norms computed in float64),
that a write into a parameter or buffer makes the next step read the norms again, and that a step
that overflows still raises with parameters, ``.grad`` and optimizer state bitwise as they were —
with and without momentum, in float32 and float16."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import pcfast
from pcfast import testing
from pcfast.optim.base import LocalOptimizer

DTYPES = [torch.float32, torch.float16]
MOMENTA = [0.0, 0.9]


def make_model(dtype):
    return testing.make_model((10, 24, 24, 4), activation="tanh", dtype=dtype)


def batches(n, dtype, seed=3):
    """Batches with inputs in [0.1, 1.1): every first-layer pre-activation of an infinite first weight
    is +inf, so its tanh is 1 and the loss stays finite."""
    generator = torch.Generator().manual_seed(seed)
    return [((torch.rand(8, 10, generator=generator) + 0.1).to(dtype), torch.randint(0, 4, (8,), generator=generator))
            for _ in range(n)]


def everything(model, opt):
    """Parameters, .grad and optimizer state, cloned."""
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    state = [{k: v.clone() for k, v in opt.state[p].items()} if p in opt.state else None for p in model.parameters()]
    return params, grads, state


def bits(t):
    """The tensor's bits as integers (NaN and -0.0 compared exactly)."""
    return t.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.dtype.itemsize])


def assert_bitwise_same(a, b):
    params, grads, state = a
    assert len(params) == len(b[0]) and len(grads) == len(b[1]) and len(state) == len(b[2])
    for before, after in zip(params + grads, b[0] + b[1]):
        assert (before is None) == (after is None)
        assert before is None or (before.dtype == after.dtype and torch.equal(bits(before), bits(after)))
    for before, after in zip(state, b[2]):
        assert (before is None) == (after is None)
        assert before is None or (before.keys() == after.keys()
                                  and all(torch.equal(bits(before[k]), bits(after[k])) for k in before))


def trained(dtype, momentum, steps=3, **kwargs):
    """A model and optimizer after ``steps`` certain steps (the bounds of the last one kept)."""
    model = make_model(dtype)
    opt = pcfast.optim.BP(model, lr=0.05, momentum=momentum, **kwargs)
    for x, y in batches(steps, dtype):
        opt.zero_grad()
        opt.step(x, y)
    assert opt.__dict__.get("_norm_bounds") is not None  # the last step was certain
    return model, opt


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("settings", [dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.9, dampening=0.5),
                                      dict(momentum=0.9, nesterov=True, weight_decay=0.1)],
                         ids=["plain", "momentum", "dampening", "nesterov-weight-decay"])
def test_kept_bounds_are_at_least_the_float64_norms_over_many_steps(dtype, settings):
    """Oracle: ``torch.linalg.vector_norm`` in float64 of every parameter and momentum buffer after each
    of 150 steps (rates large enough that the norms move) is at most its kept bound, which is finite.
    Every step after the first reads only the terms of its gradients' bounds (BP in float32: the
    3 layers' δ and x; in float16: the 6 gradients) — or, when the kept bounds fail the limit (they only grow,
    and float16's limit is 65504 / 16), those terms and then, once more, every norm."""
    model = make_model(dtype)
    opt = pcfast.optim.BP(model, lr=0.2, **settings)
    count = 12 if settings["momentum"] else 6  # parameters and momentum buffers
    terms = 4 if dtype == torch.float32 else 6
    calls = []
    norms = LocalOptimizer._norms

    def counted(tensors):
        calls.append(len(tensors))
        return norms(tensors)

    opt._norms = counted
    for i, (x, y) in enumerate(batches(150, dtype)):
        opt.zero_grad()
        calls.clear()
        opt.step(x, y)
        assert calls == [terms + 6] if i == 0 else calls in ([terms], [terms, terms + count])  # (no buffer at first)
        if dtype == torch.float32:
            assert len(calls) == 1  # far below float32's limit
        tensors, _, _, bounds = opt.__dict__["_norm_bounds"]
        assert len(tensors) == len(bounds) == count
        for t, bound in zip(tensors, bounds):
            assert math.isfinite(bound)
            assert torch.linalg.vector_norm(t.double()).item() <= bound


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu", "gelu", ["relu", "tanh"]], ids=str)
@pytest.mark.parametrize("lr, scale, steps", [(0.2, 1.0, 40), (0.01, 20.0, 3)], ids=["large-rate", "large-inputs"])
def test_gradient_bounds_are_at_least_the_float64_gradient_norms(activation, lr, scale, steps):
    """Oracle: ``torch.linalg.vector_norm`` in float64 of every gradient BP writes to ``.grad`` is at most
    the bound its certificate took for it (``‖δ_l‖ ‖h_{l-1}‖``, ``√B ‖δ_l‖``; ``‖h‖`` read for ReLU and
    GELU, bounded by ``√(its size)`` for tanh and sigmoid), over 40 steps at a rate large enough
    that the weights grow and the tanh saturate (where ``‖g_W‖ ≤ ‖δ‖‖h‖`` is attained), and over 3
    steps with inputs 20 times larger (ReLU and GELU activities beyond 1). The bounds are of the exact values: the computed ones may exceed them by the rounding
    of float32 sums of at most B · width = 192 terms, a relative γ ≤ 192 ε (which the certificate's
    margin of 16 covers)."""
    model = testing.make_model((10, 24, 24, 4), activation=activation, dtype=torch.float32)
    opt = pcfast.optim.BP(model, lr=lr, momentum=0.9)
    taken = []
    terms_of = opt._grad_norm_terms

    def spy(stepped, step):
        terms, combine = terms_of(stepped, step)

        def combined(norms):
            taken.append(combine(norms))
            return taken[-1]

        return terms, combined

    opt._grad_norm_terms = spy
    for x, y in batches(steps, torch.float32):
        opt.zero_grad()
        taken.clear()
        opt.step(scale * x, 3.0 * nn.functional.one_hot(y, 4).float())
        assert len(taken) in (1, 2)  # (2: the kept bounds failed the limit, and the norms were read)
        for bounds in taken:
            for p, bound in zip(model.parameters(), bounds):  # (weights and biases in model order, as the slots)
                assert torch.linalg.vector_norm(p.grad.double()).item() <= bound * (1 + 192 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("momentum", MOMENTA)
def test_update_that_overflows_after_kept_bounds_raises_and_changes_nothing(dtype, momentum):
    """With the last step's bounds kept, a rate so large that ``θ − η·d`` overflows: the bounds fail
    the limit, the norms are read, the general path raises DivergenceError, nothing written."""
    model, opt = trained(dtype, momentum)
    for group in opt.param_groups:
        group["lr"] = 0.5 * torch.finfo(dtype).max  # finite, so only the update can overflow
    x, y = batches(4, dtype)[3]
    target = 100.0 * nn.functional.one_hot(y, 4).to(dtype)  # gradients of size ~10
    before = everything(model, opt)
    with pytest.raises(pcfast.DivergenceError):
        opt.step(x, target)
    assert_bitwise_same(everything(model, opt), before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("momentum", MOMENTA)
def test_loss_and_gradients_that_overflow_after_kept_bounds_raise_and_change_nothing(dtype, momentum):
    """Targets so large that the loss and the gradients overflow: DivergenceError, nothing written."""
    model, opt = trained(dtype, momentum)
    x, y = batches(4, dtype)[3]
    target = (0.25 * torch.finfo(dtype).max) * nn.functional.one_hot(y, 4).to(dtype)
    before = everything(model, opt)
    with pytest.raises(pcfast.DivergenceError, match="loss is inf"):
        opt.step(x, target)
    assert_bitwise_same(everything(model, opt), before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_infinite_momentum_buffer_written_in_place_raises_and_changes_nothing(dtype):
    """An element of a momentum buffer set to inf in place after a certain step: the buffer's version
    changed, so its kept bound is not used; its norm, read, is inf, and the update (θ − η·(μ·inf + g))
    is not finite — DivergenceError naming the layer, nothing written. With the kept bound taken
    instead, the step would have written -inf into the weight."""
    model, opt = trained(dtype, 0.9)
    weight = model[2].weight
    opt.state[weight]["momentum_buffer"][0, 0] = math.inf
    x, y = batches(4, dtype)[3]
    before = everything(model, opt)
    with pytest.raises(pcfast.DivergenceError, match="update of layer 2 weight is not finite"):
        opt.step(x, y)
    assert_bitwise_same(everything(model, opt), before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("momentum", MOMENTA)
@pytest.mark.parametrize("how", ["in-place", "assigned"])
def test_infinite_weight_written_after_kept_bounds_raises_and_changes_nothing(dtype, momentum, how):
    """A first-layer weight set to +inf after a certain step, in place or by assigning ``.data``: with
    inputs > 0 its pre-activations are +inf, tanh gives 1 and the loss and gradients stay finite, so
    only the parameter's norm shows it — read again because its version or address changed. The step
    takes the checked path, whose new weight is not finite: DivergenceError naming the weight, nothing
    written (with the kept bound taken instead it would have been certified and kept the inf)."""
    model, opt = trained(dtype, momentum)
    weight = model[0].weight
    if how == "in-place":
        with torch.no_grad():
            weight[0, 0] = math.inf
    else:
        value = weight.detach().clone()
        value[0, 0] = math.inf
        weight.data = value
    x, y = batches(4, dtype)[3]
    before = everything(model, opt)
    with pytest.raises(pcfast.DivergenceError, match="update of layer 1 weight is not finite"):
        opt.step(x, y)
    assert_bitwise_same(everything(model, opt), before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_momentum_buffer_loaded_from_a_state_dict_is_not_taken_for_the_kept_one(dtype):
    """A momentum buffer replaced by ``load_state_dict`` (a saved state whose first buffer holds inf)
    is another tensor: its norm is read, and the step raises DivergenceError, nothing written."""
    model, opt = trained(dtype, 0.9)
    state = opt.state_dict()
    buffer = next(iter(state["state"].values()))["momentum_buffer"]
    state["state"][0]["momentum_buffer"] = torch.full_like(buffer, math.inf)
    opt.load_state_dict(state)
    x, y = batches(4, dtype)[3]
    before = everything(model, opt)
    with pytest.raises(pcfast.DivergenceError, match="update of layer 1 weight is not finite"):
        opt.step(x, y)
    assert_bitwise_same(everything(model, opt), before)
