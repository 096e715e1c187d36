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


def case_id(case, *variant: str) -> str:
    """``B5-W17-L3-<variant…>-bias-mse-f64``: a case's readable test id."""
    return "-".join([f"B{case['batch']}", f"W{case['width']}", f"L{case['depth']}", *variant,
                     "bias" if case["bias"] else "nobias", case["loss"], case["dtype"]])


def _assert_same_fields(out, ref, dtype, sequences, scalars):
    """Every field named in ``sequences`` (lists of tensors) and ``scalars`` of ``out`` equals ``ref``'s."""
    for field in sequences:
        assert_all_close(getattr(out, field), getattr(ref, field), dtype=dtype, name=field.replace("_", " "))
    for field in scalars:
        assert_close(getattr(out, field), getattr(ref, field), dtype=dtype, name=field.replace("_", " "))


def assert_same_pc(out, ref, dtype):
    for t, (a, e) in enumerate(zip(out.trajectory, ref.trajectory)):
        assert_all_close(a, e, dtype=dtype, name=f"latents at step {t}")
    assert len(out.trajectory) == len(ref.trajectory)
    _assert_same_fields(out, ref, dtype, ("latents", "errors", "weight_grads", "bias_grads"), ("energy", "loss"))


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
    _assert_same_fields(out, ref, dtype, ("targets", "activities", "weight_grads", "bias_grads"), ("loss", "local_loss"))


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
