"""The ``triton`` TP/DTP kernels (``pcfast/ops/tp_targets.py``) equal ``pcfast.reference``: all targets,
activities, local gradients and losses, and the feedback reconstruction gradients, in float32 and
float64, under the Triton interpreter.

Sampled grid: every DTP/TP × bias × dtype combination twice, batch {1, 5, 33}, widths {1, 17, 64, 100},
depth 2–4, both losses and every activation dealt round-robin across them.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import itertools

import pytest
import torch

pytest.importorskip("triton")

from pcfast import functional as F
from pcfast import reference
from pcfast.ops import pc_relax
from pcfast.ops import triton as triton_backend
from pcfast.testing import assert_all_close, assert_close
from tests.conftest import random_batch, random_mlp

ACTS = ("tanh", "gelu", "relu", "sigmoid", "identity")
BATCHES = (1, 5, 33)
WIDTHS = (1, 17, 64, 100)
DEPTHS = (2, 3, 4)
DTYPES = {"f64": torch.float64, "f32": torch.float32}


def _cases():
    cases = []
    combos = list(itertools.product((True, False), (True, False), ("f64", "f32")))
    for shift in (0, 1):
        for i, (difference, bias, dtype) in enumerate(combos):
            j = i + len(combos) * shift
            cases.append(dict(batch=BATCHES[j % 3], width=WIDTHS[(i + shift) % 4], depth=DEPTHS[(j // 2) % 3],
                              difference=difference, bias=bias, dtype=dtype, loss="ce" if j % 3 == 1 else "mse",
                              act_offset=j))
    cases.append(dict(batch=33, width=100, depth=4, difference=True, bias=True, dtype="f32", loss="ce", act_offset=0))
    return cases


def _case_id(c):
    return (f"B{c['batch']}-W{c['width']}-L{c['depth']}-{'dtp' if c['difference'] else 'tp'}-"
            f"{'bias' if c['bias'] else 'nobias'}-{c['loss']}-{c['dtype']}")


def _network(case, seed=2):
    width, depth = case["width"], case["depth"]
    classes = 6 if case["loss"] == "ce" else 3
    dims = (8, *([width] * (depth - 1)), classes)
    if depth == 4:
        dims = (8, width, 17 if width != 17 else 5, width, classes)
    dtype = DTYPES[case["dtype"]]
    acts = [ACTS[(case["act_offset"] + l) % len(ACTS)] for l in range(depth - 1)]
    weights, biases, acts = random_mlp(dims, bias=case["bias"], activation=acts, dtype=dtype, seed=seed, scale=1.2)
    gen = torch.Generator().manual_seed(seed + 3)
    qs = [torch.randn(dims[l - 1], dims[l], generator=gen, dtype=dtype) / dims[l] ** 0.5 for l in range(2, depth + 1)]
    cs = [0.1 * torch.randn(dims[l - 1], generator=gen, dtype=dtype) if case["bias"] else None
          for l in range(2, depth + 1)]
    # ψ_l differs from φ_{l-1} on purpose in half the cases: the kernels take ψ from its own list.
    psis = acts if case["act_offset"] % 2 else [ACTS[(case["act_offset"] + l + 2) % len(ACTS)] for l in range(depth - 1)]
    return dims, weights, biases, acts, qs, cs, psis


def assert_same_tp(out, ref, dtype):
    assert_all_close(out.targets, ref.targets, dtype=dtype, name="targets")
    assert_all_close(out.activities, ref.activities, dtype=dtype, name="activities")
    assert_all_close(out.weight_grads, ref.weight_grads, dtype=dtype, name="weight grads")
    assert_all_close(out.bias_grads, ref.bias_grads, dtype=dtype, name="bias grads")
    assert_close(out.loss, ref.loss, dtype=dtype, name="loss")
    assert_close(out.local_loss, ref.local_loss, dtype=dtype, name="local loss")


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_tp_triton_equals_reference(case):
    dims, weights, biases, acts, qs, cs, psis = _network(case)
    dtype = DTYPES[case["dtype"]]
    x, y = random_batch(dims, case["batch"], case["loss"], dtype=dtype)
    kwargs = dict(beta=0.3, loss=case["loss"], difference=case["difference"])
    ref = reference.tp_train_step(weights, biases, acts, qs, cs, psis, x, y, **kwargs)
    out = triton_backend.tp_train_step(weights, biases, acts, qs, cs, psis, x, y, **kwargs)
    assert_same_tp(out, ref, dtype)


FEEDBACK_CASES = [
    dict(batch=5, width=17, depth=3, bias=True, dtype="f64", loss="mse", act_offset=0, difference=True),
    dict(batch=33, width=100, depth=4, bias=False, dtype="f32", loss="mse", act_offset=1, difference=True),
    dict(batch=1, width=1, depth=4, bias=True, dtype="f64", loss="mse", act_offset=2, difference=True),
]


@pytest.mark.parametrize("noisy", [False, True], ids=["clean", "noise"])
@pytest.mark.parametrize("case", FEEDBACK_CASES, ids=[f"B{c['batch']}-W{c['width']}-L{c['depth']}-{c['dtype']}" for c in FEEDBACK_CASES])
def test_feedback_grads_triton_equals_reference(case, noisy):
    dims, weights, biases, acts, qs, cs, psis = _network(case)
    dtype = DTYPES[case["dtype"]]
    x, _ = random_batch(dims, case["batch"], "mse", dtype=dtype)
    gen = torch.Generator().manual_seed(9)
    noise = [0.1 * torch.randn(case["batch"], dims[l - 1], generator=gen, dtype=dtype) for l in range(2, case["depth"] + 1)] \
        if noisy else None
    ref = reference.feedback_grads(weights, biases, acts, qs, cs, psis, x, noise)
    out = triton_backend.feedback_grads(weights, biases, acts, qs, cs, psis, x, noise)
    assert_all_close(out.weight_grads, ref.weight_grads, dtype=dtype, name="feedback weight grads")
    assert_all_close(out.bias_grads, ref.bias_grads, dtype=dtype, name="feedback bias grads")
    assert_close(out.loss, ref.loss, dtype=dtype, name="reconstruction loss")


def test_dtp_triton_ce_row_kernel_equals_reference(monkeypatch):
    """Output target ``f + β (onehot − softmax)`` through ``_ce_error_kernel`` (forced here)."""
    monkeypatch.setattr(pc_relax, "CE_FUSED_MAX_CLASSES", 0)
    case = dict(batch=33, width=17, depth=3, difference=True, bias=True, dtype="f64", loss="ce", act_offset=1)
    dims, weights, biases, acts, qs, cs, psis = _network(case)
    x, y = random_batch(dims, 33, "ce")
    kwargs = dict(beta=0.5, loss="ce", difference=True)
    assert_same_tp(triton_backend.tp_train_step(weights, biases, acts, qs, cs, psis, x, y, **kwargs),
                   reference.tp_train_step(weights, biases, acts, qs, cs, psis, x, y, **kwargs), torch.float64)


def test_dtp_triton_keeps_activities_when_targets_are_activities():
    """T2: β = 0 makes ĥ_L = f, and DTP then gives ĥ_l = h_l for every layer, for any feedback."""
    case = dict(batch=5, width=17, depth=4, difference=True, bias=True, dtype="f64", loss="mse", act_offset=0)
    dims, weights, biases, acts, qs, cs, psis = _network(case)
    x, y = random_batch(dims, 5, "mse")
    out = F.tp_train_step(weights, biases, acts, qs, cs, psis, x, y, beta=0.0, difference=True, backend="triton")
    assert_all_close(out.targets, out.activities, name="targets")
    assert all(float(g.abs().max()) <= 1e-12 for g in out.weight_grads)


# In-kernel noise: ξ drawn from a seed inside the kernels that read it, never stored.
def _noise_widths(dims):
    return list(dims[1:-1])


@pytest.mark.parametrize("case", FEEDBACK_CASES, ids=[f"B{c['batch']}-W{c['width']}-L{c['depth']}-{c['dtype']}" for c in FEEDBACK_CASES])
def test_in_kernel_noise_equals_reference_with_the_same_noise(case):
    """Oracle: ``reference.feedback_grads`` given the noise tensors ``gaussian_noise`` stores for the
    seed. Depth 3–4 checks that every layer draws its own block of the stream."""
    from pcfast.ops import tp_targets

    dims, weights, biases, acts, qs, cs, psis = _network(case)
    dtype = DTYPES[case["dtype"]]
    x, _ = random_batch(dims, case["batch"], "mse", dtype=dtype)
    seed, std = 1234, 0.3
    noise = tp_targets.gaussian_noise(seed, std, case["batch"], _noise_widths(dims), dtype=dtype, device=x.device)
    assert all(xi.shape == (case["batch"], w) for xi, w in zip(noise, _noise_widths(dims)))
    ref = reference.feedback_grads(weights, biases, acts, qs, cs, psis, x, noise)
    out = F.feedback_grads(weights, biases, acts, qs, cs, psis, x, noise_seed=seed, noise_std=std, backend="triton")
    assert_all_close(out.weight_grads, ref.weight_grads, dtype=dtype, name="feedback weight grads")
    assert_all_close(out.bias_grads, ref.bias_grads, dtype=dtype, name="feedback bias grads")
    assert_close(out.loss, ref.loss, dtype=dtype, name="reconstruction loss")
    clean = reference.feedback_grads(weights, biases, acts, qs, cs, psis, x)
    assert float((out.weight_grads[0] - clean.weight_grads[0]).abs().max()) > 1e-3, "the noise had no effect"


def test_in_kernel_noise_same_seed_same_result_other_seed_other_result():
    case = FEEDBACK_CASES[0]
    dims, weights, biases, acts, qs, cs, psis = _network(case)
    x, _ = random_batch(dims, 5, "mse")

    def run(seed):
        return F.feedback_grads(weights, biases, acts, qs, cs, psis, x, noise_seed=seed, noise_std=0.2, backend="triton")

    a, b, c = run(7), run(7), run(8)
    for ga, gb, gc in zip(a.weight_grads, b.weight_grads, c.weight_grads):
        assert torch.equal(ga, gb)
        assert not torch.allclose(ga, gc)
    assert float(a.loss) == float(b.loss) != float(c.loss)


def test_gaussian_noise_is_standard_normal_scaled():
    """200,000 draws: mean, standard deviation and the fraction within one σ of a N(0, σ²) sample
    (bounds: 6 standard errors), and distinct layers are uncorrelated."""
    from pcfast.ops import tp_targets

    std = 0.5
    first, second = tp_targets.gaussian_noise(99, std, 400, [250, 250], dtype=torch.float64, device=torch.device("cpu"))
    values = first.flatten()
    n = values.numel()
    assert abs(float(values.mean())) < 6 * std / n**0.5
    assert abs(float(values.std()) / std - 1) < 6 / (2 * n) ** 0.5
    within = float((values.abs() < std).double().mean())
    assert abs(within - 0.6827) < 6 * (0.6827 * 0.3173 / n) ** 0.5
    correlation = float(torch.corrcoef(torch.stack([values, second.flatten()]))[0, 1])
    assert abs(correlation) < 6 / n**0.5


def test_noise_seed_on_other_backends_draws_from_a_seeded_generator():
    """The torch backend draws ξ_l with ``torch.Generator().manual_seed(seed)`` in layer order."""
    case = FEEDBACK_CASES[0]
    dims, weights, biases, acts, qs, cs, psis = _network(case)
    x, _ = random_batch(dims, 5, "mse")
    gen = torch.Generator().manual_seed(5)
    noise = [torch.randn(5, w, generator=gen, dtype=x.dtype).mul_(0.2) for w in _noise_widths(dims)]
    seeded = F.feedback_grads(weights, biases, acts, qs, cs, psis, x, noise_seed=5, noise_std=0.2, backend="torch")
    explicit = F.feedback_grads(weights, biases, acts, qs, cs, psis, x, noise, backend="torch")
    assert_all_close(seeded.weight_grads, explicit.weight_grads, name="feedback weight grads")


@pytest.mark.parametrize("bad, error", [
    (dict(noise_seed=-1), ValueError), (dict(noise_seed=1.5), TypeError), (dict(noise_seed=True), TypeError),
    (dict(noise_seed=1, noise_std=float("nan")), ValueError), (dict(noise_seed=1, noise_std=-0.1), ValueError),
    (dict(noise_seed=1, noise="tensors"), ValueError)])
def test_noise_seed_bad_input_is_a_clear_error(bad, error):
    case = FEEDBACK_CASES[0]
    dims, weights, biases, acts, qs, cs, psis = _network(case)
    x, _ = random_batch(dims, 5, "mse")
    if bad.get("noise") == "tensors":
        bad = dict(bad, noise=[torch.zeros(5, w, dtype=x.dtype) for w in _noise_widths(dims)])
    with pytest.raises(error, match="noise"):
        F.feedback_grads(weights, biases, acts, qs, cs, psis, x, backend="triton", **bad)


def test_dtp_optimizer_on_triton_draws_seeds_and_resumes_bitwise():
    """With backend="triton" the optimizer passes a seed from its generator to the kernels: a run
    resumed from a state_dict continues bitwise like the uninterrupted one."""
    import copy

    import pcfast
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Linear(17, 17), nn.Tanh(), nn.Linear(17, 3)).double()

    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(5, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen))
               for _ in range(3)]
    straight_model = model()
    straight = pcfast.optim.DTP(straight_model, lr=0.05, feedback_noise=0.3, backend="triton", seed=4)
    for x, y in batches[:2]:
        straight.step(x, y)
    saved_model, saved_opt = copy.deepcopy(straight_model.state_dict()), copy.deepcopy(straight.state_dict())
    straight.step(*batches[2])
    resumed_model = model()
    resumed_model.load_state_dict(saved_model)
    resumed = pcfast.optim.DTP(resumed_model, lr=0.05, feedback_noise=0.3, backend="triton", seed=99)
    resumed.load_state_dict(saved_opt)
    resumed.step(*batches[2])
    for a, b in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.feedback_weights, resumed.feedback_weights):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", [
    dict(batch=5, width=17, depth=3, difference=True, bias=True, dtype="f64", loss="mse", act="tanh"),
    dict(batch=33, width=64, depth=5, difference=False, bias=False, dtype="f32", loss="ce", act="gelu"),
    dict(batch=1, width=100, depth=4, difference=True, bias=False, dtype="f64", loss="ce", act="sigmoid"),
    dict(batch=5, width=1, depth=4, difference=False, bias=True, dtype="f32", loss="mse", act="relu"),
], ids=lambda c: f"B{c['batch']}-W{c['width']}-L{c['depth']}-{'dtp' if c['difference'] else 'tp'}-{c['act']}-{c['dtype']}")
def test_tp_triton_stacked_local_gradients_equal_reference(case, monkeypatch):
    """Equal-width hidden layers with one activation: the local gradients of layers 2 … H in one launch."""
    depth, width = case["depth"], case["width"]
    classes = 6 if case["loss"] == "ce" else 3
    dims = (8, *([width] * (depth - 1)), classes)
    dtype = DTYPES[case["dtype"]]
    weights, biases, acts = random_mlp(dims, bias=case["bias"], activation=case["act"], dtype=dtype, seed=5, scale=1.2)
    gen = torch.Generator().manual_seed(6)
    qs = [torch.randn(dims[l - 1], dims[l], generator=gen, dtype=dtype) / dims[l] ** 0.5 for l in range(2, depth + 1)]
    cs = [0.1 * torch.randn(dims[l - 1], generator=gen, dtype=dtype) if case["bias"] else None for l in range(2, depth + 1)]
    x, y = random_batch(dims, case["batch"], case["loss"], dtype=dtype)
    kwargs = dict(beta=0.3, loss=case["loss"], difference=case["difference"])
    calls = []
    original = pc_relax.stacked_weight_grad
    monkeypatch.setattr(pc_relax, "stacked_weight_grad", lambda *a, **k: calls.append(1) or original(*a, **k))
    out = triton_backend.tp_train_step(weights, biases, acts, qs, cs, acts, x, y, **kwargs)
    assert calls == [1], "the stacked launch did not run"
    assert_same_tp(out, reference.tp_train_step(weights, biases, acts, qs, cs, acts, x, y, **kwargs), dtype)
