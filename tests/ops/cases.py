"""Networks, settings and comparisons shared by the Triton op tests (``test_triton_pc``,
``test_triton_tp``, ``test_linear_epilogue``, ``test_local_grad``, …): small random MLPs with mixed
widths and activations, and whole-result comparisons against ``pcfast.reference``."""
from __future__ import annotations

import torch

from pcfast.testing import assert_all_close, assert_close
from tests.conftest import random_mlp

ACTS = ("tanh", "gelu", "relu", "sigmoid", "identity")
BATCHES = (1, 5, 33)
WIDTHS = (1, 17, 64, 100)
DEPTHS = (2, 3, 4)
STEPS = 3
DTYPES = {"f64": torch.float64, "f32": torch.float32}


def pc_network(case, seed=0):
    """(dims, weights, biases, activations) of a PC case: input 9, 7 classes for CE (else 3)."""
    width, depth = case["width"], case["depth"]
    classes = 7 if case["loss"] == "ce" else 3
    dims = (9, *([width] * (depth - 1)), classes)
    if depth == 4:
        dims = (9, width, 17 if width != 17 else 5, width, classes)  # mixed widths
    acts = [ACTS[(case["act_offset"] + l) % len(ACTS)] for l in range(depth - 1)]
    weights, biases, acts = random_mlp(dims, bias=case["bias"], activation=acts, dtype=DTYPES[case["dtype"]],
                                       seed=seed, scale=1.2)
    return dims, weights, biases, acts


def pc_kwargs(case, depth):
    return dict(precisions=[1.0, 2.5, 0.5, 1.5][: depth - 1] + [0.8], inference_steps=STEPS, inference_lr=0.2,
                schedule=case["schedule"], fpa=case["fpa"], loss=case["loss"], return_trajectory=True)


def assert_same_pc(out, ref, dtype):
    for t, (a, e) in enumerate(zip(out.trajectory, ref.trajectory)):
        assert_all_close(a, e, dtype=dtype, name=f"latents at step {t}")
    assert len(out.trajectory) == len(ref.trajectory)
    assert_all_close(out.latents, ref.latents, dtype=dtype, name="latents")
    assert_all_close(out.errors, ref.errors, dtype=dtype, name="errors")
    assert_all_close(out.weight_grads, ref.weight_grads, dtype=dtype, name="weight grads")
    assert_all_close(out.bias_grads, ref.bias_grads, dtype=dtype, name="bias grads")
    assert_close(out.energy, ref.energy, dtype=dtype, name="energy")
    assert_close(out.loss, ref.loss, dtype=dtype, name="loss")


def tp_network(case, seed=2):
    """(dims, weights, biases, activations, Q, c, ψ) of a TP case: input 8, 6 classes for CE (else 3)."""
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


# Feedback-gradient cases (TP networks), shared by the tests of the feedback step and of its noise.
FEEDBACK_CASES = [
    dict(batch=5, width=17, depth=3, bias=True, dtype="f64", loss="mse", act_offset=0, difference=True),
    dict(batch=33, width=100, depth=4, bias=False, dtype="f32", loss="mse", act_offset=1, difference=True),
    dict(batch=1, width=1, depth=4, bias=True, dtype="f64", loss="mse", act_offset=2, difference=True),
]


def feedback_id(case):
    return f"B{case['batch']}-W{case['width']}-L{case['depth']}-{case['dtype']}"


def count_calls(monkeypatch, module, name):
    """Record every call of ``module.name`` (still calling it) in the returned list."""
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls
