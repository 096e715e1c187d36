"""The ``triton`` backend's TP/DTP step and feedback gradients (``pcfast/ops/triton_tp.py`` over the
kernels of ``linear_epilogue``, ``tp_targets`` and ``local_grad``) equal ``pcfast.reference``: all
targets, activities, local gradients and losses, and the feedback reconstruction gradients, in
float32 and float64, under the Triton interpreter.

Sampled grid: every DTP/TP × bias × dtype combination twice, batch {1, 5, 33}, widths {1, 17, 64, 100},
depth 2–4, both losses and every activation dealt round-robin across them.
"""
import itertools

import pytest
import torch

pytest.importorskip("triton")

from pcfast import functional as F
from pcfast import reference
from pcfast.ops import triton as triton_backend
from pcfast.testing import assert_all_close, assert_close
from pcfast.types import Feedback, Net, TPConfig
from tests.conftest import random_batch
from tests.ops.cases import BATCHES, DEPTHS, DTYPES, FEEDBACK_CASES, WIDTHS, assert_same_tp, case_id, feedback_id
from tests.ops.cases import tp_network

TRITON = triton_backend.TritonBackend()


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
    return case_id(c, "dtp" if c["difference"] else "tp")


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_tp_triton_equals_reference(case):
    dims, weights, biases, acts, qs, cs, psis = tp_network(case)
    dtype = DTYPES[case["dtype"]]
    x, y = random_batch(dims, case["batch"], case["loss"], dtype=dtype)
    kwargs = dict(beta=0.3, loss=case["loss"], difference=case["difference"])
    ref = reference.tp_train_step(weights, biases, acts, qs, cs, psis, x, y, **kwargs)
    out = TRITON.tp_grads(Net(weights, biases, acts), Feedback(qs, cs, psis), x, y, TPConfig(**kwargs))
    assert_same_tp(out, ref, dtype)


@pytest.mark.parametrize("noisy", [False, True], ids=["clean", "noise"])
@pytest.mark.parametrize("case", FEEDBACK_CASES, ids=[feedback_id(c) for c in FEEDBACK_CASES])
def test_feedback_grads_triton_equals_reference(case, noisy):
    dims, weights, biases, acts, qs, cs, psis = tp_network(case)
    dtype = DTYPES[case["dtype"]]
    x, _ = random_batch(dims, case["batch"], "mse", dtype=dtype)
    gen = torch.Generator().manual_seed(9)
    noise = [0.1 * torch.randn(case["batch"], dims[l - 1], generator=gen, dtype=dtype) for l in range(2, case["depth"] + 1)] \
        if noisy else None
    ref = reference.feedback_grads(weights, biases, acts, qs, cs, psis, x, noise)
    out = TRITON.feedback_grads(Net(weights, biases, acts), Feedback(qs, cs, psis), x, noise=noise)
    assert_all_close(out.weight_grads, ref.weight_grads, dtype=dtype, name="feedback weight grads")
    assert_all_close(out.bias_grads, ref.bias_grads, dtype=dtype, name="feedback bias grads")
    assert_close(out.loss, ref.loss, dtype=dtype, name="reconstruction loss")


def test_dtp_triton_keeps_activities_when_targets_are_activities():
    """T2: β = 0 makes ĥ_L = f, and DTP then gives ĥ_l = h_l for every layer, for any feedback."""
    case = dict(batch=5, width=17, depth=4, difference=True, bias=True, dtype="f64", loss="mse", act_offset=0)
    dims, weights, biases, acts, qs, cs, psis = tp_network(case)
    x, y = random_batch(dims, 5, "mse")
    out = F.tp_train_step(weights, biases, acts, qs, cs, psis, x, y, beta=0.0, difference=True, backend="triton")
    assert_all_close(out.targets, out.activities, name="targets")
    assert all(float(g.abs().max()) <= 1e-12 for g in out.weight_grads)
