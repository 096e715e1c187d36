"""The ``triton`` PC kernels (``pcfast/ops/pc_relax.py``) equal ``pcfast.reference`` over whole
T-step trajectories, in float32 and float64, under the Triton interpreter.

The grid is sampled, not the full product: every schedule × FPA × bias × dtype combination appears,
and batch {1, 5, 33}, widths {1, 17, 64, 100}, depth 2–4, both losses and every activation are dealt
across those cases so each value appears several times. The interpreter runs one 32×32×32 tile per
program (``INTERPRETER_BLOCKS``), so batch 33 and width 64/100 span several tiles and k-iterations.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import contextlib
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
STEPS = 3
DTYPES = {"f64": torch.float64, "f32": torch.float32}


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
    return (f"B{c['batch']}-W{c['width']}-L{c['depth']}-T{STEPS}-{c['schedule']}-{'fpa' if c['fpa'] else 'nofpa'}-"
            f"{'bias' if c['bias'] else 'nobias'}-{c['loss']}-{c['dtype']}")


def _network(case, seed=0):
    width, depth = case["width"], case["depth"]
    classes = 7 if case["loss"] == "ce" else 3
    dims = (9, *([width] * (depth - 1)), classes)
    if depth == 4:
        dims = (9, width, 17 if width != 17 else 5, width, classes)  # mixed widths
    acts = [ACTS[(case["act_offset"] + l) % len(ACTS)] for l in range(depth - 1)]
    weights, biases, acts = random_mlp(dims, bias=case["bias"], activation=acts, dtype=DTYPES[case["dtype"]],
                                       seed=seed, scale=1.2)
    return dims, weights, biases, acts


def _pc_kwargs(case, depth):
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


CASES = _cases()


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_pc_triton_equals_reference(case):
    dims, weights, biases, acts = _network(case)
    dtype = DTYPES[case["dtype"]]
    x, y = random_batch(dims, case["batch"], case["loss"], dtype=dtype)
    kwargs = _pc_kwargs(case, case["depth"])
    ref = reference.pc_train_step(weights, biases, acts, x, y, **kwargs)
    out = triton_backend.pc_train_step(weights, biases, acts, x, y, **kwargs)
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


def _count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


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
        assert pc_relax.LayerTable.of(weights[1:-1]).offsets[1] < 0
    x, y = random_batch(dims, case["batch"], case["loss"], dtype=dtype)
    kwargs = dict(precisions=[1.3] * (depth - 1) + [0.6], inference_steps=STEPS, inference_lr=0.2, schedule="jacobi",
                  fpa=case["fpa"], loss=case["loss"], return_trajectory=True)
    launches = _count_calls(monkeypatch, pc_relax, "stacked_latent_update")
    out = triton_backend.pc_train_step(weights, biases, acts, x, y, **kwargs)
    assert len(launches) == STEPS, "the stacked path did not run"
    assert_same_pc(out, reference.pc_train_step(weights, biases, acts, x, y, **kwargs), dtype)


@pytest.mark.parametrize("change", ["activation", "precision", "width", "sequential", "one bias", "switched off"])
def test_pc_triton_stack_falls_back_to_per_layer_launches(change, monkeypatch):
    """Hidden layers that differ (or the sequential sweep, or STACKED = False) run one launch per layer,
    with the same results."""
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
    elif change == "switched off":
        monkeypatch.setattr(triton_backend, "STACKED", False)
    x, y = random_batch(dims, 5, "mse")
    kwargs = dict(precisions=precisions, inference_steps=STEPS, inference_lr=0.2, schedule=schedule, fpa=False,
                  loss="mse", return_trajectory=True)
    launches = _count_calls(monkeypatch, pc_relax, "stacked_latent_update")
    out = triton_backend.pc_train_step(weights, biases, acts, x, y, **kwargs)
    assert launches == []
    assert_same_pc(out, reference.pc_train_step(weights, biases, acts, x, y, **kwargs), torch.float64)


def test_stacked_update_refuses_to_write_errors_it_reads():
    """A stacked step that moves the errors must write them to another buffer: layer l reads ε_{l+1}
    while layer l+1 moves it."""
    z, e = torch.zeros(2, 3, 4, dtype=torch.float64), torch.zeros(2, 3, 4, dtype=torch.float64)
    table = pc_relax.LayerTable.of([torch.zeros(4, 4, dtype=torch.float64) for _ in range(2)])
    with pytest.raises(ValueError, match="errors_out"):
        pc_relax.stacked_latent_update(z, e, e, table, act="tanh", coefficient=1.0, kappa=0.1, fpa=True,
                                       update_error=True, preactivations=z, errors_out=e)


def test_layer_table_rejects_tensors_that_cannot_share_a_launch():
    a = torch.zeros(4, 4)
    assert pc_relax.LayerTable.of([a, torch.zeros(4, 5)]) is None
    assert pc_relax.LayerTable.of([a, torch.zeros(4, 4).T.contiguous().T]) is None  # other strides
    assert pc_relax.LayerTable.of([a, torch.zeros(4, 4, dtype=torch.float64)]) is None
    table = pc_relax.LayerTable.of([a, torch.zeros(4, 4)])
    assert table.offsets[0] == 0 and table.offsets.dtype == torch.int64


@pytest.mark.parametrize("schedule", ["jacobi", "sequential"])
def test_pc_triton_ce_row_kernel_equals_reference(schedule, monkeypatch):
    """Class rows wider than one tile: logits stored, then ``_ce_error_kernel`` (forced here)."""
    monkeypatch.setattr(pc_relax, "CE_FUSED_MAX_CLASSES", 0)
    case = dict(batch=5, width=17, depth=3, schedule=schedule, fpa=False, bias=True, dtype="f64", loss="ce", act_offset=0)
    dims, weights, biases, acts = _network(case)
    x, y = random_batch(dims, 5, "ce")
    kwargs = _pc_kwargs(case, 3)
    assert_same_pc(triton_backend.pc_train_step(weights, biases, acts, x, y, **kwargs),
                   reference.pc_train_step(weights, biases, acts, x, y, **kwargs), torch.float64)


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
    dims, weights, biases, acts = _network(dict(width=17, depth=3, loss="mse", bias=True, dtype="f64", act_offset=0))
    x, y = random_batch(dims, 5, "mse")
    for schedule in ("jacobi", "sequential"):
        out = triton_backend.pc_train_step(weights, biases, acts, x, y, precisions=[1.0, 1.0, 1.0], inference_steps=0,
                                           inference_lr=0.1, schedule=schedule, fpa=False, loss="mse")
        assert all(float(e.abs().max()) == 0.0 for e in out.errors[:-1])
        ref = reference.pc_train_step(weights, biases, acts, x, y, inference_steps=0, schedule=schedule)
        assert_all_close(out.weight_grads, ref.weight_grads, name="weight grads")


def test_pc_triton_equals_bp_under_fpa():
    """O2: forward init + FPA + sequential + T = 1 + κ = 1 ⇒ PC weight gradients = γ_L × BP gradients."""
    dims, weights, biases, acts = _network(dict(width=17, depth=4, loss="mse", bias=True, dtype="f64", act_offset=1))
    x, y = random_batch(dims, 5, "mse")
    gamma_out = 0.7
    out = triton_backend.pc_train_step(weights, biases, acts, x, y, precisions=[1.0, 1.0, 1.0, gamma_out],
                                       inference_steps=1, inference_lr=1.0, schedule="sequential", fpa=True, loss="mse")
    bp = reference.bp_train_step(weights, biases, acts, x, y, loss="mse")
    assert_all_close(out.weight_grads, [gamma_out * g for g in bp.weight_grads], name="weight grads")
    assert_all_close(out.bias_grads, [gamma_out * g for g in bp.bias_grads], name="bias grads")


def test_pc_triton_rejects_half_precision_on_cpu():
    dims, weights, biases, acts = _network(dict(width=17, depth=2, loss="mse", bias=False, dtype="f32", act_offset=0))
    x, y = random_batch(dims, 5, "mse", dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="float16"):
        triton_backend.pc_train_step([w.half() for w in weights], biases, acts, x.half(), y.half(), precisions=[1.0, 1.0],
                                     inference_steps=1, inference_lr=0.1, schedule="jacobi", fpa=False, loss="mse")


def test_import_pcfast_does_not_import_triton():
    import subprocess
    import sys

    code = "import sys, pcfast, pcfast.functional; assert 'triton' not in sys.modules, 'pcfast imported triton'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_cuda_graph_cache_runs_eager_then_captures_then_replays(monkeypatch):
    """The CUDA-graph cache's bookkeeping, with torch.cuda's graph API faked (no GPU here): first call
    eager, second captures (warm-up run, then capture, then replay), later calls copy the new inputs
    into the static buffers and replay; results are copies, never the graph's static buffers."""
    events = []

    class FakeGraph:
        def replay(self):
            events.append("replay")

    @contextlib.contextmanager
    def fake_graph(graph):
        events.append("capture")
        yield

    class FakeStream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake_graph)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    triton_backend.clear_graphs()

    def run(x, target):
        events.append("run")
        return reference.bp_train_step([torch.ones(2, 3, dtype=torch.float64)], [None], [], x, target, loss="mse")

    x1, x2, x3 = (torch.full((4, 3), float(v), dtype=torch.float64) for v in (1, 2, 3))
    target = torch.zeros(4, 2, dtype=torch.float64)
    first = triton_backend._graphed(("key",), run, (x1, target))
    assert events == ["run"]
    second = triton_backend._graphed(("key",), run, (x2, target))
    assert events == ["run", "run", "capture", "run", "replay"]
    assert_close(second.loss, run(x2, target).loss)
    _, (static_x, _), static_out, _ = triton_backend._graphs[("key",)]
    assert second.weight_grads[0].data_ptr() != static_out.weight_grads[0].data_ptr()
    events.clear()
    triton_backend._graphed(("key",), run, (x3, target))
    assert events == ["replay"] and torch.equal(static_x, x3)
    assert float(first.loss) != float(second.loss)
    triton_backend.clear_graphs()


# Fused SGD: the gradient launch also applies torch.optim.SGD's rule (pcfast.sgd) out of place.
def test_sgd_update_is_torch_optim_sgd():
    """Oracle: ``torch.optim.SGD`` over three steps, for each combination of its options."""
    from pcfast.sgd import sgd_update

    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    for momentum, dampening, decay, nesterov in [(0, 0, 0, False), (0.9, 0, 0, False), (0.9, 0.3, 0.01, False),
                                                 (0.8, 0, 0.05, True), (0, 0, 0.1, False)]:
        param = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        torch_param = param.clone().requires_grad_(True)
        opt = torch.optim.SGD([torch_param], lr=0.1, momentum=momentum, dampening=dampening, weight_decay=decay,
                              nesterov=nesterov)
        buffer = None
        for g in grads:
            torch_param.grad = g.clone()
            opt.step()
            param, buffer = sgd_update(param, g, lr=0.1, momentum=momentum, dampening=dampening, weight_decay=decay,
                                       nesterov=nesterov, buffer=buffer)
            assert torch.allclose(param, torch_param.detach(), rtol=1e-14, atol=1e-15)


SGD_CASES = [  # (momentum, dampening, weight decay, nesterov, with buffers, bias, dtype, depth)
    (0.0, 0.0, 0.0, False, False, True, "f64", 3),
    (0.9, 0.0, 0.0, False, False, True, "f32", 4),
    (0.9, 0.2, 0.01, False, True, False, "f64", 4),
    (0.8, 0.0, 0.05, True, True, True, "f32", 3),
]


@pytest.mark.parametrize("case", SGD_CASES, ids=[f"mom{c[0]}-damp{c[1]}-wd{c[2]}-{'nest' if c[3] else 'plain'}-"
                                                  f"{'buf' if c[4] else 'first'}-{'bias' if c[5] else 'nobias'}-{c[6]}-L{c[7]}"
                                                  for c in SGD_CASES])
def test_pc_triton_fused_sgd_equals_reference_then_sgd(case):
    """Oracle: ``reference.pc_train_step`` followed by ``pcfast.sgd.sgd_update`` per parameter. Equal
    widths, so the fused path also has to give up the stacked gradient launch."""
    from pcfast.sgd import LayerSGD, sgd_update

    momentum, dampening, decay, nesterov, buffered, bias, dt, depth = case
    dtype = DTYPES[dt]
    dims = (9, *([17] * (depth - 1)), 3)
    weights, biases, acts = random_mlp(dims, bias=bias, activation="tanh", dtype=dtype, seed=3)
    x, y = random_batch(dims, 33, "mse", dtype=dtype)
    gen = torch.Generator().manual_seed(4)
    steps = []
    for l, (w, b) in enumerate(zip(weights, biases)):
        buffers = (torch.randn(w.shape, generator=gen, dtype=dtype), None if b is None else torch.randn(b.shape, generator=gen, dtype=dtype))
        steps.append(LayerSGD(weight_lr=0.05 * (l + 1), bias_lr=0.02 * (l + 1), momentum=momentum, dampening=dampening,
                              weight_decay=decay, nesterov=nesterov,
                              weight_buffer=buffers[0] if buffered else None, bias_buffer=buffers[1] if buffered else None))
    kwargs = dict(precisions=[1.0] * (depth - 1) + [0.7], inference_steps=STEPS, inference_lr=0.2, schedule="jacobi",
                  fpa=False, loss="mse")
    before = [w.clone() for w in weights]
    out = F.pc_train_step(weights, biases, acts, x, y, sgd=steps, backend="triton", **kwargs)
    ref = reference.pc_train_step(weights, biases, acts, x, y, **kwargs)
    assert all(torch.equal(w, b) for w, b in zip(weights, before)), "the fused step must not modify parameters"
    expected = []
    for w, b, gw, gb, step in zip(weights, biases, ref.weight_grads, ref.bias_grads, steps):
        shared = dict(momentum=step.momentum, dampening=step.dampening, weight_decay=step.weight_decay, nesterov=step.nesterov)
        expected.append(sgd_update(w, gw, lr=step.weight_lr, buffer=step.weight_buffer, **shared))
        if b is not None:
            expected.append(sgd_update(b, gb, lr=step.bias_lr, buffer=step.bias_buffer, **shared))
    assert len(out.sgd_updates) == len(expected)
    for k, ((new, buf), (new_ref, buf_ref)) in enumerate(zip(out.sgd_updates, expected)):
        assert_close(new, new_ref, dtype=dtype, name=f"new parameter {k}")
        assert (buf is None) == (buf_ref is None)
        if buf is not None:
            assert_close(buf, buf_ref, dtype=dtype, name=f"new momentum buffer {k}")
    assert_all_close(out.weight_grads, ref.weight_grads, dtype=dtype, name="weight grads")


def test_pc_optimizer_on_triton_fuses_sgd_and_matches_the_torch_backend(monkeypatch):
    """PC with momentum, Nesterov, weight decay and a cosine schedule: five steps on ``triton`` (SGD
    inside the gradient launches — counted) equal five on ``torch`` (SGD after)."""
    import pcfast
    from torch import nn

    def run(backend):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Linear(17, 17), nn.Tanh(), nn.Linear(17, 3)).double()
        par = pcfast.parametrize(model, "mup", algo="pc", base_width=8, generator=torch.Generator().manual_seed(1))
        opt = pcfast.optim.PC(model, par, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3, inference_steps=4,
                              backend=backend)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5)
        gen = torch.Generator().manual_seed(2)
        for _ in range(5):
            opt.step(torch.randn(5, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen))
            schedule.step()
        return [p.detach() for p in model.parameters()], opt

    fused = []
    original = pc_relax.FusedSGD.prepare

    def counted(self, *args):
        fused.append(1)
        return original(self, *args)

    monkeypatch.setattr(pc_relax.FusedSGD, "prepare", counted)
    triton_params, triton_opt = run("triton")
    assert len(fused) == 5 * 3, "every layer of every step should run the fused SGD"
    torch_params, torch_opt = run("torch")
    assert_all_close(triton_params, torch_params, name="parameters after 5 steps")
    for p_t, p_r in zip(triton_opt.param_groups, torch_opt.param_groups):
        buf_t = triton_opt.state[p_t["params"][0]]["momentum_buffer"]
        buf_r = torch_opt.state[p_r["params"][0]]["momentum_buffer"]
        assert_close(buf_t, buf_r, name="momentum buffer")


def test_cuda_graph_cache_copies_every_input_into_the_static_buffers(monkeypatch):
    """Rates travel as a graph input (a float64 tensor): a replay with new rates must see them."""
    seen = []
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: type("G", (), {"replay": lambda self: seen.append("replay")})())
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())
    stream = type("S", (), {"__init__": lambda self, device=None: None, "wait_stream": lambda self, other: None})
    monkeypatch.setattr(torch.cuda, "Stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    triton_backend.clear_graphs()

    def run(x, target, hyper):
        return reference.bp_train_step([torch.ones(2, 3, dtype=torch.float64)], [None], [], x * hyper[0], target, loss="mse")

    x, target = torch.ones(4, 3, dtype=torch.float64), torch.zeros(4, 2, dtype=torch.float64)
    for rate in (1.0, 2.0, 3.0):
        triton_backend._graphed(("hyper",), run, (x, target, torch.tensor([rate], dtype=torch.float64)))
    _, (_, _, static_hyper), _, _ = triton_backend._graphs[("hyper",)]
    assert float(static_hyper[0]) == 3.0 and seen == ["replay", "replay"]
    triton_backend.clear_graphs()


def test_pc_triton_sgd_with_strided_weights_updates_after_the_step():
    """Parameters that are transposed views cannot take the fused store (it writes in the gradient's
    layout): the backend applies ``sgd_update`` after the step instead. Oracle: reference + sgd_update."""
    from pcfast.sgd import LayerSGD, sgd_update

    dims = (6, 17, 5)
    _, biases, acts = random_mlp(dims, activation="tanh")
    gen = torch.Generator().manual_seed(3)
    weights = [torch.randn(a, b, generator=gen, dtype=torch.float64).T / a**0.5 for a, b in itertools.pairwise(dims)]
    assert not weights[0].is_contiguous()
    x, y = random_batch(dims, 5, "mse")
    steps = [LayerSGD(weight_lr=0.1, bias_lr=0.05, momentum=0.9, weight_decay=0.01) for _ in weights]
    kwargs = dict(precisions=[1.0, 0.8], inference_steps=STEPS, inference_lr=0.2, schedule="jacobi", fpa=False, loss="mse")
    out = F.pc_train_step(weights, biases, acts, x, y, sgd=steps, backend="triton", **kwargs)
    ref = reference.pc_train_step(weights, biases, acts, x, y, **kwargs)
    expected = []
    for w, b, gw, gb, step in zip(weights, biases, ref.weight_grads, ref.bias_grads, steps):
        shared = dict(momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False, buffer=None)
        expected += [sgd_update(w, gw, lr=step.weight_lr, **shared), sgd_update(b, gb, lr=step.bias_lr, **shared)]
    assert len(out.sgd_updates) == len(expected)
    for k, ((new, buf), (new_ref, buf_ref)) in enumerate(zip(out.sgd_updates, expected)):
        assert_close(new, new_ref, name=f"new parameter {k}")
        assert_close(buf, buf_ref, name=f"new momentum buffer {k}")
