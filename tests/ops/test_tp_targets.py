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
