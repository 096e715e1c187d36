"""The ``triton`` backend's PC step (``pcfast/ops/triton_pc.py`` over the kernels of
``linear_epilogue``, ``pc_update`` and ``local_grad``) equals ``pcfast.reference`` over whole
T-step trajectories, in float32 and float64, under the Triton interpreter.

The grid is sampled, not the full product: every schedule × FPA × bias × dtype combination appears,
and batch {1, 5, 33}, widths {1, 17, 64, 100}, depth 2–4, both losses and every activation are dealt
across those cases so each value appears several times. The interpreter runs one 32×32×32 tile per
program (``INTERPRETER_BLOCKS``), so batch 33 and width 64/100 span several tiles and k-iterations.
"""
import functools
import itertools
import os

import pytest
import torch

pytest.importorskip("triton")

from pcfast import functional as F
from pcfast import reference
from pcfast.ops import pc_update
from pcfast.ops import triton as triton_backend
from pcfast.ops._triton_common import LayerTable
from pcfast.testing import assert_all_close, assert_close
from pcfast.types import Net, PCConfig
from tests.conftest import random_batch, random_mlp
from tests.ops.cases import BATCHES, DEPTHS, DTYPES, STEPS, WIDTHS, assert_same_pc, case_id, count_calls, pc_kwargs
from tests.ops.cases import pc_network

TRITON = triton_backend.TritonBackend()  # the options of the enclosing triton_backend.options() block


def _cases():
    """Two rounds over the 16 combinations of schedule × FPA × bias × dtype, with batch, width, depth,
    loss and the activations dealt round-robin (cycle lengths 3, 4, 3, 5, 5, shifted between rounds, so
    they mix), plus awkward extras."""
    cases = []
    combos = list(itertools.product(("jacobi", "sequential"), (False, True), (True, False), ("f64", "f32")))
    for shift in (0, 1):
        for i, (schedule, fpa, bias, dtype) in enumerate(combos):
            cases.append(dict(
                batch=BATCHES[(i + shift) % 3], width=WIDTHS[(i + 2 * shift) % 4], depth=DEPTHS[(i // 2 + shift) % 3],
                schedule=schedule, fpa=fpa, bias=bias, dtype=dtype,
                loss="ce" if (i + shift) % 5 in (1, 3) else "mse", act_offset=i + 3 * shift,
            ))
    # Width 1 between wide layers, batch 1 with CE, and the deepest net at the widest width in fp32.
    cases.append(dict(batch=5, width=1, depth=4, schedule="sequential", fpa=False, bias=True, dtype="f64", loss="ce", act_offset=2))
    cases.append(dict(batch=1, width=100, depth=3, schedule="jacobi", fpa=False, bias=True, dtype="f32", loss="ce", act_offset=1))
    cases.append(dict(batch=33, width=100, depth=4, schedule="jacobi", fpa=False, bias=True, dtype="f32", loss="mse", act_offset=0))
    return cases


def _case_id(c):
    return case_id(c, f"T{STEPS}", c["schedule"], "fpa" if c["fpa"] else "nofpa")


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_pc_triton_equals_reference(case):
    dims, weights, biases, acts = pc_network(case)
    dtype = DTYPES[case["dtype"]]
    x, y = random_batch(dims, case["batch"], case["loss"], dtype=dtype)
    kwargs = pc_kwargs(case, case["depth"])
    ref = reference.pc_train_step(weights, biases, acts, x, y, **kwargs)
    out = TRITON.pc_grads(Net(weights, biases, acts), x, y, PCConfig.of(len(weights), **kwargs))
    assert_same_pc(out, ref, dtype)


# The stacked path: equal-width hidden layers with one activation and one hidden precision share one
# launch per pass in a Jacobi step. Every (FPA, bias, dtype) combination, batch 1/5/33, widths
# 1/17/64/100, depth 3–5 (1–3 stacked layers), γ_L ≠ γ_hidden; each case also checks the stack ran.
STACKED_CASES = [
    dict(batch=b, width=w, depth=d, fpa=fpa, bias=bias, dtype=dt, loss=loss, act=act)
    for (b, w, d, loss, act), (fpa, bias, dt) in zip(
        [(5, 17, 3, "mse", "tanh"), (33, 64, 4, "ce", "gelu"), (1, 100, 3, "mse", "relu"), (5, 1, 5, "ce", "sigmoid"),
         (33, 17, 5, "mse", "tanh"), (1, 64, 4, "mse", "identity"), (5, 100, 4, "ce", "tanh"), (33, 1, 3, "mse", "gelu")],
        itertools.product((False, True), (True, False), ("f64", "f32")),
    )
]


def _stacked_id(c):
    return (f"B{c['batch']}-W{c['width']}-L{c['depth']}-{'fpa' if c['fpa'] else 'nofpa'}-"
            f"{'bias' if c['bias'] else 'nobias'}-{c['loss']}-{c['act']}-{c['dtype']}")


@pytest.mark.parametrize("case", STACKED_CASES, ids=[_stacked_id(c) for c in STACKED_CASES])
def test_pc_triton_stacked_hidden_layers_equal_reference(case, monkeypatch):
    depth, width = case["depth"], case["width"]
    classes = 7 if case["loss"] == "ce" else 3
    dims = (9, *([width] * (depth - 1)), classes)
    dtype = DTYPES[case["dtype"]]
    weights, biases, acts = random_mlp(dims, bias=case["bias"], activation=case["act"], dtype=dtype, seed=1, scale=1.2)
    # W_2 … W_H laid out in one buffer in reverse order: the offset table holds negative offsets.
    inner = weights[1:-1]
    block = torch.empty(len(inner) * width * width, dtype=dtype)
    for k, w in enumerate(inner):
        start = (len(inner) - 1 - k) * width * width
        weights[1 + k] = block[start:start + width * width].view(width, width).copy_(w)
    if len(inner) > 1:
        assert LayerTable.of(weights[1:-1]).offsets[1] < 0
    x, y = random_batch(dims, case["batch"], case["loss"], dtype=dtype)
    kwargs = dict(precisions=[1.3] * (depth - 1) + [0.6], inference_steps=STEPS, inference_lr=0.2, schedule="jacobi",
                  fpa=case["fpa"], loss=case["loss"], return_trajectory=True)
    launches = count_calls(monkeypatch, pc_update, "stacked_latent_update")
    out = TRITON.pc_grads(Net(weights, biases, acts), x, y, PCConfig.of(len(weights), **kwargs))
    assert len(launches) == STEPS, "the stacked path did not run"
    assert_same_pc(out, reference.pc_train_step(weights, biases, acts, x, y, **kwargs), dtype)


@pytest.mark.parametrize("change", ["activation", "precision", "width", "sequential", "one bias", "switched off"])
def test_pc_triton_stack_falls_back_to_per_layer_launches(change, monkeypatch):
    """Hidden layers that differ (or the sequential sweep, or ``options(stacked=False)``) run one
    launch per layer, with the same results."""
    dims = (9, 17, 17, 17, 3) if change != "width" else (9, 17, 16, 17, 3)
    weights, biases, acts = random_mlp(dims, activation="tanh", seed=2)
    precisions = [1.0, 1.0, 1.0, 0.5]
    schedule = "jacobi"
    if change == "activation":
        acts = ["tanh", "gelu", "tanh"]
    elif change == "precision":
        precisions[1] = 2.0
    elif change == "sequential":
        schedule = "sequential"
    elif change == "one bias":
        biases[2] = None
    x, y = random_batch(dims, 5, "mse")
    kwargs = dict(precisions=precisions, inference_steps=STEPS, inference_lr=0.2, schedule=schedule, fpa=False,
                  loss="mse", return_trajectory=True)
    launches = count_calls(monkeypatch, pc_update, "stacked_latent_update")
    with triton_backend.options(stacked=change != "switched off"):
        out = TRITON.pc_grads(Net(weights, biases, acts), x, y, PCConfig.of(len(weights), **kwargs))
    assert launches == []
    assert_same_pc(out, reference.pc_train_step(weights, biases, acts, x, y, **kwargs), torch.float64)


def test_pc_triton_through_functional_with_strided_weights():
    """``backend="triton"`` through the registry; weights that are transposed views (strides, not copies)."""
    dims = (6, 17, 5)
    _, biases, acts = random_mlp(dims, activation="tanh")
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(a, b, generator=gen, dtype=torch.float64).T / a**0.5 for a, b in itertools.pairwise(dims)]
    assert not weights[0].is_contiguous()
    x, y = random_batch(dims, 5, "mse")
    kwargs = dict(precisions=[1.0, 0.8], inference_steps=STEPS, inference_lr=0.2, return_trajectory=True)
    out = F.pc_train_step(weights, biases, acts, x, y, backend="triton", **kwargs)
    ref = F.pc_train_step(weights, biases, acts, x, y, backend="reference", **kwargs)
    assert_same_pc(out, ref, torch.float64)


def test_pc_triton_zero_inference_steps_is_forward_state():
    dims, weights, biases, acts = pc_network(dict(width=17, depth=3, loss="mse", bias=True, dtype="f64", act_offset=0))
    x, y = random_batch(dims, 5, "mse")
    for schedule in ("jacobi", "sequential"):
        out = TRITON.pc_grads(Net(weights, biases, acts), x, y,
                              PCConfig.of(len(weights), inference_steps=0, schedule=schedule))
        assert all(float(e.abs().max()) == 0.0 for e in out.errors[:-1])
        ref = reference.pc_train_step(weights, biases, acts, x, y, inference_steps=0, schedule=schedule)
        assert_all_close(out.weight_grads, ref.weight_grads, name="weight grads")


def test_pc_triton_equals_bp_under_fpa():
    """O2: forward init + FPA + sequential + T = 1 + κ = 1 ⇒ PC weight gradients = γ_L × BP gradients."""
    dims, weights, biases, acts = pc_network(dict(width=17, depth=4, loss="mse", bias=True, dtype="f64", act_offset=1))
    x, y = random_batch(dims, 5, "mse")
    gamma_out = 0.7
    config = PCConfig((1.0, 1.0, 1.0, gamma_out), inference_steps=1, inference_lr=1.0, schedule="sequential", fpa=True)
    out = TRITON.pc_grads(Net(weights, biases, acts), x, y, config)
    bp = reference.bp_train_step(weights, biases, acts, x, y, loss="mse")
    assert_all_close(out.weight_grads, [gamma_out * g for g in bp.weight_grads], name="weight grads")
    assert_all_close(out.bias_grads, [gamma_out * g for g in bp.bias_grads], name="bias grads")


def test_pc_triton_rejects_half_precision_on_cpu():
    dims, weights, biases, acts = pc_network(dict(width=17, depth=2, loss="mse", bias=False, dtype="f32", act_offset=0))
    x, y = random_batch(dims, 5, "mse", dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="float16"):
        TRITON.pc_grads(Net([w.half() for w in weights], biases, acts), x.half(), y.half(),
                        PCConfig((1.0, 1.0), inference_steps=1, inference_lr=0.1))


def test_import_pcfast_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, pcfast, pcfast.functional; assert 'triton' not in sys.modules, 'pcfast imported triton'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# Inference control (DESIGN §3) on the path that runs on CUDA: ``relax(..., host_stops=False)``
# never reads the host, so every one of the T steps launches and, from the stop on, the device gate
# turns them into no-ops. Oracle: ``pcfast.reference`` (its loop ends at the stop, its trajectory
# repeats the final state, its trace rows after the stop are NaN).
CONTROL_CASES = list(itertools.product(("jacobi", "sequential"), (False, True), ("mse", "ce")))


def _host_never_stops(monkeypatch):
    from pcfast.ops import torch_pc, triton_pc

    monkeypatch.setattr(triton_pc, "relax", functools.partial(torch_pc.relax, host_stops=False))


def _assert_same_control(out, ref, steps):
    assert out.steps is not None and int(out.steps) == int(ref.steps)
    for name in ("energy", "grad_norm"):
        a, e = getattr(out.trace, name), getattr(ref.trace, name)
        assert a.shape == e.shape and torch.equal(torch.isnan(a), torch.isnan(e)), f"trace.{name}: NaN rows differ"
        assert_close(torch.nan_to_num(a), torch.nan_to_num(e), name=f"trace.{name}")
    assert_close(out.energy_prev, ref.energy_prev, name="energy_prev")
    assert len(out.trajectory) == steps + 1
    assert_same_pc(out, ref, torch.float64)


@pytest.mark.parametrize("schedule,fpa,loss", CONTROL_CASES,
                         ids=[f"{s}-{'fpa' if f else 'nofpa'}-{lo}" for s, f, lo in CONTROL_CASES])
def test_pc_triton_gated_stop_equals_reference(schedule, fpa, loss, monkeypatch):
    """Adaptive stopping, trace and F before the last step with the device gate (no host stop):
    the steps taken, every trajectory state, the trace, gradients and energies equal the reference's,
    and every step still launched its updates."""
    dims = (6, 9, 7, 4)
    weights, biases, acts = random_mlp(dims, activation=["tanh", "gelu"], seed=3, scale=1.3)
    biases[1] = None
    x, y = random_batch(dims, 5, loss)
    steps = 16
    kwargs = dict(precisions=[1.0, 1.6, 0.7], inference_steps=steps, inference_lr=0.2, schedule=schedule, fpa=fpa,
                  loss=loss, inference_tol=0.5, return_trace=True, check_divergence=True, return_trajectory=True)
    ref = reference.pc_train_step(weights, biases, acts, x, y, **kwargs)
    assert 1 <= int(ref.steps) < steps, "the problem must stop before the cap"
    _host_never_stops(monkeypatch)
    launches = count_calls(monkeypatch, pc_update, "latent_update")
    out = TRITON.pc_grads(Net(weights, biases, acts), x, y, PCConfig.of(len(weights), **kwargs))
    assert len(launches) == steps * (len(dims) - 2), "the gated path must launch every step"
    _assert_same_control(out, ref, steps)


@pytest.mark.parametrize("fpa", [False, True], ids=["nofpa", "fpa"])
@pytest.mark.parametrize("host_stops", [False, True], ids=["gate", "host"])
def test_pc_triton_stacked_stop_and_trace_equal_reference(fpa, host_stops, monkeypatch):
    """The stacked path (dims 6-8-8-8-4: layers 1, 2 in one launch) with adaptive stopping, trace and
    F before the last step, through the device gate and through the host stop."""
    dims = (6, 8, 8, 8, 4)
    weights, biases, acts = random_mlp(dims, activation="tanh", seed=4, scale=1.3)
    x, y = random_batch(dims, 5, "mse")
    steps = 16
    kwargs = dict(precisions=[1.2, 1.2, 1.2, 0.7], inference_steps=steps, inference_lr=0.2, schedule="jacobi",
                  fpa=fpa, loss="mse", inference_tol=0.5, return_trace=True, check_divergence=True,
                  return_trajectory=True)
    ref = reference.pc_train_step(weights, biases, acts, x, y, **kwargs)
    assert 1 <= int(ref.steps) < steps, "the problem must stop before the cap"
    if not host_stops:
        _host_never_stops(monkeypatch)
    launches = count_calls(monkeypatch, pc_update, "stacked_latent_update")
    out = TRITON.pc_grads(Net(weights, biases, acts), x, y, PCConfig.of(len(weights), **kwargs))
    assert len(launches) == (steps if not host_stops else int(ref.steps)), "the stacked path did not run"
    _assert_same_control(out, ref, steps)
