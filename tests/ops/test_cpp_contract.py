"""The C++ ops keep the custom-op contract of ``torch.library`` (pytorch/extension-cpp's): every op in
``torch.ops.pcfast`` passes ``torch.library.opcheck`` — schema (no undeclared mutation, no output
aliasing an input or another output), autograd registration (a "not differentiable" kernel), fake
kernel against the real one, and AOT dispatch with dynamic shapes — and a function calling the ops
compiles with ``torch.compile(fullgraph=True)``, with no graph break, to the same results as eager.

Compile tests use the ``aot_eager`` backend: it traces through the fake kernels and AOT dispatch, as
inductor does, without inductor's code generation (seconds on a CPU). Inputs are small and awkward:
batch 1 and 7, a hidden width of one, a network without hidden layers, float32 and float64, biases
on, off and mixed, both schedules, with and without FPA, MSE and CE.
"""
from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from pcfast import ops
from pcfast.types import Feedback, Net, PCConfig, TPConfig

from tests.conftest import random_batch, random_mlp

if not ops.is_available("cpp"):
    pytest.skip(f"pcfast._C is not built: {ops._unavailable.get('cpp', 'unknown reason')}", allow_module_level=True)

from pcfast.ops import cpp

pcfast_ops = torch.ops.pcfast
OPS = ("pc_train_step", "tp_train_step", "feedback_grads", "activation")
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static",
                 "test_aot_dispatch_dynamic")
DTYPES = {"f32": torch.float32, "f64": torch.float64}
ACTS = ("tanh", "gelu", "relu", "sigmoid", "identity")


def network(dims, bias, dtype, *, seed=0):
    """An MLP on ``dims`` whose parameters require grad (so opcheck tests the autograd registration);
    ``bias`` is True, False or "mixed" (every other layer)."""
    weights, biases, acts = random_mlp(dims, bias=True, activation=[ACTS[l % 5] for l in range(len(dims) - 2)],
                                       dtype=dtype, seed=seed)
    keep = [bias is True or (bias == "mixed" and l % 2 == 0) for l in range(len(weights))]
    biases = [b if k else None for b, k in zip(biases, keep)]
    return ([w.requires_grad_() for w in weights], [b.requires_grad_() if b is not None else None for b in biases],
            acts)


def feedback(dims, bias, dtype, *, seed=3):
    """Feedback maps Q_l (d_{l-1}, d_l), c_l and ψ_l for l = 2 … L."""
    gen = torch.Generator().manual_seed(seed)
    qs = [torch.randn(dims[l - 1], dims[l], generator=gen, dtype=dtype).div_(dims[l] ** 0.5).requires_grad_()
          for l in range(2, len(dims))]
    cs = [0.1 * torch.randn(dims[l - 1], generator=gen, dtype=dtype) if bias is True or (bias == "mixed" and l % 2)
          else None for l in range(2, len(dims))]
    return qs, cs, [ACTS[(l + 1) % 5] for l in range(2, len(dims))]


# (dims, batch, dtype, bias): a width of one, no hidden layer, batch 1.
SHAPES = [((11, 1, 6, 3), 7, "f64", True), ((11, 5, 3), 1, "f32", False), ((4, 3), 2, "f64", "mixed"),
          ((11, 7, 1, 5, 3), 3, "f32", "mixed")]


def shape_id(dims, batch, dtype, bias):
    return f"D{'x'.join(map(str, dims))}-B{batch}-{dtype}-{'bias' if bias is True else bias or 'nobias'}"


def pc_args(dims, batch, dtype, bias, *, schedule="jacobi", fpa=False, loss="mse", trajectory=True, steps=3,
            control=None):
    """The op's arguments; ``control`` = (inference_tol, return_trace, check_divergence), else left
    to the schema's defaults."""
    weights, biases, acts = network(dims, bias, DTYPES[dtype])
    x, y = random_batch(dims, batch, loss, dtype=DTYPES[dtype])
    gammas = [1.0 + 0.5 * l for l in range(len(weights))]
    return (weights, biases, acts, x, y, gammas, steps, 0.1, schedule, fpa, loss, trajectory, *(control or ()))


def tp_args(dims, batch, dtype, bias, *, loss="mse", difference=True):
    weights, biases, acts = network(dims, bias, DTYPES[dtype])
    qs, cs, psis = feedback(dims, bias, DTYPES[dtype])
    x, y = random_batch(dims, batch, loss, dtype=DTYPES[dtype])
    return (weights, biases, acts, qs, cs, psis, x, y, 0.5, loss, difference)


def feedback_args(dims, batch, dtype, bias, *, noise=True):
    weights, biases, acts = network(dims, bias, DTYPES[dtype])
    qs, cs, psis = feedback(dims, bias, DTYPES[dtype])
    x, _ = random_batch(dims, batch, "mse", dtype=DTYPES[dtype])
    gen = torch.Generator().manual_seed(9)
    xi = [torch.randn(batch, dims[l - 1], generator=gen, dtype=DTYPES[dtype]) if l % 2 == 0 else None
          for l in range(2, len(dims))] if noise else []
    return (weights, biases, acts, qs, cs, psis, x, xi)


def activation_args(shape, dtype, name):
    u = torch.linspace(-6, 6, torch.Size(shape).numel(), dtype=DTYPES[dtype]).reshape(shape)
    return (u.requires_grad_(), name)


# Every op, on cases that together cover both dtypes, biases on/off/mixed, both schedules, FPA, MSE/CE,
# the trajectory on and off, TP and DTP, noise and none.
OPCHECK_CASES = [
    *[pytest.param("pc_train_step", pc_args(*shape, schedule=schedule, fpa=fpa, loss=loss, trajectory=not fpa),
                   id=f"pc-{shape_id(*shape)}-{schedule}-{'fpa' if fpa else 'nofpa'}-{loss}")
      for shape, (schedule, fpa, loss) in zip(
          SHAPES * 2, [("jacobi", False, "mse"), ("sequential", True, "ce"), ("sequential", False, "mse"),
                       ("jacobi", True, "ce"), ("sequential", False, "ce"), ("jacobi", False, "ce"),
                       ("jacobi", True, "mse"), ("sequential", True, "mse")])],
    pytest.param("pc_train_step", pc_args((5, 4, 2), 3, "f32", True, steps=0), id="pc-T0"),
    # Inference control: adaptive stopping (the steps taken are data, not a shape), the trace and F
    # before the last step, alone and together. opcheck compares eager and AOT outputs with
    # assert_close, for which NaN ≠ NaN, so no traced case here stops early (NaN rows); the compile
    # test below runs that case with a NaN-aware comparison.
    *[pytest.param("pc_train_step", pc_args(*shape, schedule=schedule, fpa=fpa, steps=steps, control=control),
                   id=f"pc-{shape_id(*shape)}-{schedule}-{'fpa' if fpa else 'nofpa'}-T{steps}-tol{control[0]}-"
                      f"{'trace' if control[1] else 'notrace'}-{'check' if control[2] else 'nocheck'}")
      for shape, schedule, fpa, steps, control in [
          (SHAPES[0], "jacobi", False, 6, (0.5, False, True)),
          (SHAPES[1], "sequential", False, 4, (None, True, True)),
          (SHAPES[2], "sequential", True, 3, (0.0, False, True)),  # no hidden layer: stops after step 1
          (SHAPES[3], "jacobi", True, 5, (0.0, True, False)),
          (SHAPES[0], "sequential", False, 0, (0.2, True, True)),
      ]],
    *[pytest.param("tp_train_step", tp_args(*shape, loss=loss, difference=difference),
                   id=f"tp-{shape_id(*shape)}-{'dtp' if difference else 'tp'}-{loss}")
      for shape, (loss, difference) in zip(SHAPES, [("mse", True), ("ce", False), ("ce", True), ("mse", False)])],
    *[pytest.param("feedback_grads", feedback_args(*shape, noise=noise),
                   id=f"feedback-{shape_id(*shape)}-{'noise' if noise else 'nonoise'}")
      for shape, noise in zip(SHAPES, [True, False, True, True])],
    *[pytest.param("activation", activation_args(shape, dtype, name), id=f"activation-{name}-{dtype}-{len(shape)}d")
      for shape, dtype, name in [((7, 3), "f32", "gelu"), ((1,), "f64", "tanh"), ((2, 3, 5), "f64", "sigmoid"),
                                 ((4, 1), "f32", "relu"), ((3,), "f64", "identity")]],
]


def test_every_op_of_the_library_is_opchecked():
    """An op added to csrc/pcfast.cpp without a case here fails this test."""
    registered = {name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("pcfast::")}
    covered = {case.values[0] for case in OPCHECK_CASES}
    assert registered == covered == set(OPS)


@pytest.mark.parametrize("op_name, args", OPCHECK_CASES)
def test_opcheck(op_name, args):
    """Every test of ``torch.library.opcheck`` passes: its defaults (test_schema,
    test_autograd_registration, test_faketensor, test_aot_dispatch_dynamic) and test_aot_dispatch_static."""
    results = torch.library.opcheck(getattr(pcfast_ops, op_name).default, args, test_utils=OPCHECK_TESTS,
                                    raise_exception=False)
    failed = {test: result for test, result in results.items() if result != "SUCCESS"}
    assert not failed, f"{op_name}: {failed}"
    assert set(results) == set(OPCHECK_TESTS)


# ------------------------------------------------------------------------------------------------
# torch.compile: one graph, the ops in it, the same numbers as eager.


class GraphRecorder:
    """A torch.compile backend like aot_eager that keeps each Dynamo graph and each AOT forward graph
    (traced through the fake kernels, after functionalization)."""

    def __init__(self):
        self.graphs, self.forward_graphs = [], []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)

        def keep_forward(forward, _inputs):
            self.forward_graphs.append(forward)
            return make_boxed_func(forward)

        return aot_autograd(fw_compiler=keep_forward)(gm, example_inputs)

    def ops_traced(self):
        return {node.target for gm in self.forward_graphs for node in gm.graph.nodes if node.op == "call_function"}


def assert_same(got, expected, path="result"):
    """Bitwise equality through nested lists/tuples/dataclasses (the same kernels run in both); NaN
    where both have NaN (the trace's rows after a stop)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.shape == expected.shape and got.dtype == expected.dtype, path
        if expected.is_floating_point():
            nan = torch.isnan(expected)
            assert torch.equal(torch.isnan(got), nan), f"{path}: compiled has NaN elsewhere than eager"
            got, expected = got.masked_fill(nan, 0), expected.masked_fill(nan, 0)
        assert torch.equal(got, expected), f"{path}: compiled differs from eager"
    elif expected is None:
        assert got is None, path
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), path
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_same(g, e, f"{path}[{i}]")
    else:
        assert type(got) is type(expected), path
        for field in vars(expected):
            assert_same(getattr(got, field), getattr(expected, field), f"{path}.{field}")


def compiled(fn, recorder, **kwargs):
    torch._dynamo.reset()
    return torch.compile(fn, backend=recorder, fullgraph=True, **kwargs)


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_compiled_pc_and_tp_steps_match_eager_in_one_graph(dtype):
    """One function builds the value types and calls all four ops through pcfast.ops.cpp's CppBackend
    (named results included) and compiles with fullgraph=True — a graph break would raise — into one
    graph holding the four ops."""
    dims, batch = (11, 1, 6, 3), 7
    weights, biases, acts = network(dims, "mixed", DTYPES[dtype])
    qs, cs, psis = feedback(dims, True, DTYPES[dtype])
    x, labels = random_batch(dims, batch, "ce", dtype=DTYPES[dtype])

    backend = cpp.CppBackend()
    pc_config = PCConfig.of(len(weights), [1.0, 2.0, 0.5], inference_steps=4, inference_lr=0.2,
                            schedule="sequential", fpa=False, loss="ce", return_trajectory=True)
    tp_config = TPConfig(beta=0.3, loss="ce", difference=True)

    def step(weights, biases, qs, cs, x, labels):
        net, fb_maps = Net(weights, biases, acts), Feedback(qs, cs, psis)
        pc = backend.pc_grads(net, x, labels, pc_config)
        tp = backend.tp_grads(net, fb_maps, x, labels, tp_config)
        fb = backend.feedback_grads(net, fb_maps, x)
        act = cpp.activation(pc.latents[1], "gelu")
        return pc, tp, fb, act.value * act.slope

    recorder = GraphRecorder()
    got = compiled(step, recorder)(weights, biases, qs, cs, x, labels)
    assert_same(got, step(weights, biases, qs, cs, x, labels))
    assert len(recorder.graphs) == 1
    assert {getattr(pcfast_ops, name).default for name in OPS} <= recorder.ops_traced()


@pytest.mark.parametrize("schedule, fpa", [("jacobi", False), ("sequential", False), ("sequential", True)])
def test_compiled_pc_step_with_inference_control_matches_eager(schedule, fpa):
    """Adaptive stopping, the trace and F before the last step through CppBackend compile into one
    graph (the steps taken stay a tensor, never a Python int) with eager's numbers."""
    dims = (11, 1, 6, 3)
    weights, biases, acts = network(dims, True, torch.float64)
    x, labels = random_batch(dims, 7, "ce", dtype=torch.float64)
    backend = cpp.CppBackend()
    config = PCConfig.of(len(weights), [1.0, 2.0, 0.5], inference_steps=12, inference_lr=0.2, schedule=schedule,
                         fpa=fpa, loss="ce", return_trajectory=True, inference_tol=0.3, return_trace=True,
                         check_divergence=True)

    def step(weights, biases, x, labels):
        return backend.pc_grads(Net(weights, biases, acts), x, labels, config)

    recorder = GraphRecorder()
    got = compiled(step, recorder)(weights, biases, x, labels)
    expected = step(weights, biases, x, labels)
    assert_same(got, expected)
    assert 0 < int(expected.steps) < 12 and expected.trace.energy.shape == (13, 3)
    assert len(recorder.graphs) == 1


@pytest.mark.parametrize("schedule, fpa", [("jacobi", False), ("sequential", True)])
def test_compiled_pc_step_with_a_dynamic_batch_matches_eager(schedule, fpa):
    """dynamic=True: the fake kernels' shapes follow a symbolic batch; batches 2, 5 and 7 run one graph
    (Dynamo specialises sizes 0 and 1, so batch 1 would be a graph of its own)."""
    dims = (6, 1, 4, 3)  # no width equals a batch below, so duck sizing ties no sizes together
    weights, biases, acts = network(dims, True, torch.float32)

    def step(x, y):
        r = pcfast_ops.pc_train_step(weights, biases, acts, x, y, [1.0, 1.0, 1.0], 3, 0.1, schedule, fpa, "mse", True)
        return cpp.PCStepOutputs(*r)

    recorder = GraphRecorder()
    fn = compiled(step, recorder, dynamic=True)
    for batch in (2, 5, 7):
        x, y = random_batch(dims, batch, "mse", dtype=torch.float32, seed=batch)
        got = fn(x, y)
        assert got.trajectory[0].shape == (4, batch, 1)
        assert_same(got, step(x, y))
    assert len(recorder.graphs) == 1


# ------------------------------------------------------------------------------------------------
# What reaches the other dispatch keys is refused by name; results are named; nothing is recorded.


def test_meta_and_sparse_inputs_are_refused_with_the_argument_named():
    """Meta tensors reach the fake kernels and sparse ones the C++ checks: both raise ValueError naming
    the argument (not the dispatcher's "could not run ... with arguments from the ... backend")."""
    args = list(pc_args((5, 4, 2), 3, "f64", True))
    with pytest.raises(ValueError, match=r"x: the cpp backend runs on the CPU; expected a dense CPU tensor, got "
                                         r".*device meta"):
        pcfast_ops.pc_train_step(*args[:3], args[3].to("meta"), *args[4:])
    weights = [args[0][0].detach().to_sparse(), args[0][1]]
    with pytest.raises(ValueError, match=r"weights\[0\]: expected a dense \(strided\) tensor"):
        pcfast_ops.pc_train_step(weights, *args[1:])
    with pytest.raises(ValueError, match=r"u: expected a dense CPU tensor"):
        pcfast_ops.activation(torch.zeros(3, dtype=torch.float64).to_sparse(), "tanh")


def test_results_are_named_by_the_schema():
    """The named tuples carry the schema's return names, and each field is what its name says."""
    for name, outputs in [("pc_train_step", cpp.PCStepOutputs), ("tp_train_step", cpp.TPStepOutputs),
                          ("feedback_grads", cpp.FeedbackOutputs), ("activation", cpp.ActivationOutputs)]:
        assert outputs._fields == tuple(r.name for r in getattr(pcfast_ops, name).default._schema.returns)
    u = torch.linspace(-3, 3, 13, dtype=torch.float64)
    out = cpp.activation(u, "tanh")
    torch.testing.assert_close(out.value, torch.tanh(u))
    torch.testing.assert_close(out.slope, 1 - torch.tanh(u) ** 2)


def test_ops_record_no_graph_for_inputs_that_require_grad():
    """The autograd kernel is "not differentiable": outputs never require grad."""
    out = pcfast_ops.pc_train_step(*pc_args((5, 4, 2), 3, "f32", True))
    assert all(not t.requires_grad for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def test_engine_settings_are_module_functions_that_check_their_names():
    default = cpp.engine_info()
    with pytest.raises(ValueError, match=r"isa: expected 'baseline', 'avx2' or 'avx512', got 'sse'"):
        cpp.set_engine("sse")
    with pytest.raises(ValueError, match=r"gemm: expected 'blas' or 'aten', got 'mkl'"):
        cpp.set_engine(gemm="mkl")
    assert cpp.engine_info() == default
