"""The ``triton`` backend compiled for CUDA against ``pcfast.reference``, in fp32, tf32 and bf16.

Run with ``pytest -m gpu tests/gpu`` (``benchmarks/gpu/run_gpu.sh`` does, before its timings): the
default run deselects these tests, and without CUDA they skip.

- PC (both schedules, FPA on/off, MSE and CE; the stacked equal-width path), TP/DTP and the feedback
  gradients (also with the noise drawn inside the kernels from a seed), through ``pcfast.functional``.
  fp32 (3xTF32 dot) must meet the float32 row of ``pcfast.testing.TOLERANCES`` against a float64
  reference; tf32 and bf16 follow the low-precision rule (fused error ≤ 2 × the ``torch`` backend's
  own error in that precision + atol, atol from the precision's row scaled by the reference's size).
- The CUDA-graph path replays bit for bit what the eager launches compute, also after the weights
  change in place and with a new input tensor.

Launch options are set through ``pcfast.testing.triton_options``; the stacked path is recognised
by ``stacks`` here.
"""
from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from pcfast import functional as F
from pcfast.testing import (
    PRECISIONS, assert_close, assert_close_to_reference, make_batch, make_feedback, make_net, precision_mode,
    precision_tolerance, triton_options,
)

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
DIMS = (33, 100, 64, 17, 7)  # odd widths: several tiles, ragged edges
BATCH = 33
ACTS = ["tanh", "gelu", "relu"]
GAMMAS = [1.0, 2.0, 0.5, 0.8]
PC_FIELDS = ["latents", "errors", "weight_grads", "bias_grads", "energy", "loss"]
TP_FIELDS = ["targets", "activities", "weight_grads", "bias_grads", "loss", "local_loss"]
FEEDBACK_FIELDS = ["weight_grads", "bias_grads", "loss"]


@pytest.fixture(autouse=True)
def _triton():
    pytest.importorskip("triton")


def stacks(net, precisions) -> bool:
    """Whether a Jacobi PC step of ``net`` runs its hidden layers as one stacked launch per pass."""
    from pcfast.ops import triton_pc
    from pcfast.types import PCConfig

    return triton_pc.stack_plan(*net, PCConfig.of(len(net.weights), precisions, schedule="jacobi")) is not None


def problem(dtype, dims=DIMS, activation=ACTS):
    """Network, feedback maps and batch (uniform inputs, labels and their one-hot rows) on CUDA."""
    net = make_net(dims, activation=activation, dtype=dtype, device=DEVICE)
    feedback = make_feedback(dims, activation=activation, dtype=dtype, device=DEVICE, seed=2)
    batch = make_batch(dims, BATCH, targets="onehot", inputs="uniform", dtype=dtype, device=DEVICE)
    return net, feedback, batch


def fields(result, names):
    out = []
    for name in names:
        value = getattr(result, name)
        if isinstance(value, list):
            out += [(f"{name}[{i}]", v) for i, v in enumerate(value) if v is not None]
        else:
            out.append((name, value))
    return out


def assert_matches_reference(precision: str, fused, low, high, names) -> None:
    """fp32: the float32 row against float64; tf32/bf16: fused error ≤ 2 × low error + atol."""
    pairs = list(zip(fields(fused, names), fields(low, names), fields(high, names), strict=True))
    for (name, a), (_, lo), (_, hi) in pairs:
        if precision == "fp32":
            assert_close(a, hi, dtype="float32", name=name)
        else:
            scale = max(1.0, float(hi.double().abs().max()))
            assert_close_to_reference(a, lo, hi, atol=precision_tolerance(precision).atol * scale, name=name)


def _target(batch, loss):
    return batch.labels if loss == "ce" else batch.y


def _target64(batch, loss):
    return batch.labels if loss == "ce" else batch.y.double()


PC_CASES = list(itertools.product(("jacobi", "sequential"), (False, True), ("mse", "ce")))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("schedule, fpa, loss", PC_CASES,
                         ids=[f"{s}-{'fpa' if f else 'nofpa'}-{lo}" for s, f, lo in PC_CASES])
def test_pc_triton_cuda_equals_reference(precision, schedule, fpa, loss):
    kwargs = dict(precisions=GAMMAS, inference_steps=5, inference_lr=0.2, schedule=schedule, fpa=fpa, loss=loss)
    with precision_mode(precision) as dtype, triton_options(cuda_graphs=False):
        net, _, batch = problem(dtype)
        fused = F.pc_train_step(*net, batch.x, _target(batch, loss), backend="triton", **kwargs)
        low = F.pc_train_step(*net, batch.x, _target(batch, loss), backend="torch", **kwargs)
    high = F.pc_train_step(*net.to(torch.float64), batch.x.double(), _target64(batch, loss), backend="reference",
                           **kwargs)
    assert_matches_reference(precision, fused, low, high, PC_FIELDS)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("fpa", [False, True], ids=["nofpa", "fpa"])
def test_pc_triton_cuda_stacked_hidden_layers_equal_reference(precision, fpa):
    """Equal-width hidden layers (the stacked launches) against the reference."""
    dims, acts = (33, 64, 64, 64, 7), ["tanh"] * 3
    kwargs = dict(precisions=[1.0, 1.0, 1.0, 0.5], inference_steps=5, inference_lr=0.2, schedule="jacobi",
                  fpa=fpa, loss="mse")
    with precision_mode(precision) as dtype, triton_options(cuda_graphs=False, stacked=True):
        net, _, batch = problem(dtype, dims, acts)
        assert stacks(net, kwargs["precisions"])
        fused = F.pc_train_step(*net, batch.x, batch.y, backend="triton", **kwargs)
        low = F.pc_train_step(*net, batch.x, batch.y, backend="torch", **kwargs)
    high = F.pc_train_step(*net.to(torch.float64), batch.x.double(), batch.y.double(), backend="reference", **kwargs)
    assert_matches_reference(precision, fused, low, high, PC_FIELDS)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("difference", [True, False], ids=["dtp", "tp"])
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_tp_triton_cuda_equals_reference(precision, difference, loss):
    kwargs = dict(beta=0.3, loss=loss, difference=difference)
    with precision_mode(precision) as dtype, triton_options(cuda_graphs=False):
        net, feedback, batch = problem(dtype)
        fused = F.tp_train_step(*net, *feedback, batch.x, _target(batch, loss), backend="triton", **kwargs)
        low = F.tp_train_step(*net, *feedback, batch.x, _target(batch, loss), backend="torch", **kwargs)
    high = F.tp_train_step(*net.to(torch.float64), *feedback.to(torch.float64), batch.x.double(),
                           _target64(batch, loss), backend="reference", **kwargs)
    assert_matches_reference(precision, fused, low, high, TP_FIELDS)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_feedback_grads_triton_cuda_equal_reference(precision):
    with precision_mode(precision) as dtype:
        net, feedback, batch = problem(dtype)
        fused = F.feedback_grads(*net, *feedback, batch.x, backend="triton")
        low = F.feedback_grads(*net, *feedback, batch.x, backend="torch")
    high = F.feedback_grads(*net.to(torch.float64), *feedback.to(torch.float64), batch.x.double(), backend="reference")
    assert_matches_reference(precision, fused, low, high, FEEDBACK_FIELDS)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_feedback_grads_triton_cuda_noise_from_seed(precision):
    """ξ drawn inside the kernels: the same seed gives the same gradients, and they equal the
    reference's given the same ξ (``tp_targets.gaussian_noise``)."""
    from pcfast.ops import tp_targets

    with precision_mode(precision) as dtype:
        net, feedback, batch = problem(dtype)
        runs = [F.feedback_grads(*net, *feedback, batch.x, noise_seed=11, noise_std=0.1, backend="triton")
                for _ in range(2)]
        noise = tp_targets.gaussian_noise(11, 0.1, BATCH, list(DIMS[1:-1]), dtype=dtype, device=DEVICE)
        low = F.feedback_grads(*net, *feedback, batch.x, noise, backend="torch")
    high = F.feedback_grads(*net.to(torch.float64), *feedback.to(torch.float64), batch.x.double(),
                            [xi.double() for xi in noise], backend="reference")
    for a, b in zip(runs[0].weight_grads, runs[1].weight_grads):
        assert torch.equal(a, b), "same seed, different feedback gradients"
    assert_matches_reference(precision, runs[0], low, high, FEEDBACK_FIELDS)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_cuda_graph_replays_the_eager_launches_bitwise(precision):
    """Captured and replayed steps equal the eager ones bit for bit, also after the weights change in
    place and with a new input tensor (copied into the static buffer)."""
    kwargs = dict(precisions=GAMMAS, inference_steps=5, inference_lr=0.2, schedule="jacobi", fpa=False, loss="mse")
    with precision_mode(precision) as dtype:
        net, feedback, batch = problem(dtype)
        with triton_options(cuda_graphs=True) as backend:
            backend.clear_graphs()
            runs = [F.pc_train_step(*net, batch.x, batch.y, backend="triton", **kwargs) for _ in range(3)]
            dtp_runs = [F.tp_train_step(*net, *feedback, batch.x, batch.y, beta=0.3, loss="mse", difference=True,
                                        backend="triton") for _ in range(3)]
            with torch.no_grad():
                for w in net.weights:
                    w.mul_(0.9)
            x2 = batch.x.flip(0).contiguous()
            replay_after = F.pc_train_step(*net, x2, batch.y, backend="triton", **kwargs)
            backend.clear_graphs()
        with triton_options(cuda_graphs=False):
            eager = F.pc_train_step(*net, x2, batch.y, backend="triton", **kwargs)
    for i, run in enumerate(runs[1:], 1):
        for (name, a), (_, b) in zip(fields(run, PC_FIELDS), fields(runs[0], PC_FIELDS)):
            assert torch.equal(a, b), f"pc call {i} (graph) differs from the first call in {name}"
    for i, run in enumerate(dtp_runs[1:], 1):
        for (name, a), (_, b) in zip(fields(run, TP_FIELDS), fields(dtp_runs[0], TP_FIELDS)):
            assert torch.equal(a, b), f"dtp call {i} (graph) differs from the first call in {name}"
    for (name, a), (_, b) in zip(fields(replay_after, PC_FIELDS), fields(eager, PC_FIELDS)):
        assert torch.equal(a, b), f"replay after an in-place weight update differs from eager in {name}"


# Inference control (DESIGN §3) on CUDA: the loop never reads the host; from the stop on the device
# gate turns the remaining steps of the captured graph into no-ops.
CONTROL_CASES = [("jacobi", False, False), ("sequential", False, False), ("sequential", True, False),
                 ("jacobi", True, True), ("jacobi", False, True)]


def _separated_tol(trace, kappa, gammas, first=5):
    """A tolerance under which the relaxation of ``trace`` (the reference's, no stop) stops at the
    first step t ≥ ``first`` whose ratio s_t / max_{u≤t} s_u falls 10 % below every earlier ratio:
    the geometric mean of the two, so float32 rounding cannot move the stop. Returns (tol, t)."""
    scale = torch.tensor([kappa / g for g in gammas[:-1]], dtype=trace.grad_norm.dtype, device=trace.grad_norm.device)
    sizes = (trace.grad_norm * scale).norm(dim=1)
    ratios = (sizes / torch.cummax(sizes, 0).values).tolist()
    for t in range(first - 1, len(ratios)):
        prior = min(ratios[:t])
        if ratios[t] < 0.9 * prior:
            return (ratios[t] * prior) ** 0.5, t + 1
    pytest.fail("the reference relaxation has no well-separated stop")


@pytest.mark.parametrize("schedule, fpa, stacked", CONTROL_CASES,
                         ids=[f"{s}-{'fpa' if f else 'nofpa'}{'-stacked' if st else ''}" for s, f, st in CONTROL_CASES])
def test_pc_triton_cuda_adaptive_stop_under_graph_replay_equals_reference(schedule, fpa, stacked):
    """Oracle: ``pcfast.reference`` in float64. Adaptive stopping with the trace and F before the last
    step, captured as a CUDA graph (the capture fails on any host sync in the loop) and replayed: the
    steps taken, the trace (NaN after the stop), latents, gradients and energies equal the reference's
    (float32 row); the replay itself runs with torch's sync debug mode set to error."""
    from pcfast.ops import cuda_graphs
    from pcfast.ops.triton import TritonBackend
    from pcfast.types import Net, PCConfig

    dims, acts, gammas = ((33, 64, 64, 64, 7), ["tanh"] * 3, [1.0, 1.0, 1.0, 0.5]) if stacked else (DIMS, ACTS, GAMMAS)
    steps, kappa = 30, 0.2
    kwargs = dict(precisions=gammas, inference_steps=steps, inference_lr=kappa, schedule=schedule, fpa=fpa, loss="mse",
                  return_trace=True)
    with precision_mode("fp32") as dtype:
        net, _, batch = problem(dtype, dims, acts)
        assert stacks(net, gammas) == stacked
        net64, x64, y64 = net.to(torch.float64), batch.x.double(), batch.y.double()
        untimed = F.pc_train_step(*net64, x64, y64, backend="reference", **kwargs)
        tol, stop = _separated_tol(untimed.trace, kappa, gammas)
        kwargs.update(inference_tol=tol, check_divergence=True)
        ref = F.pc_train_step(*net64, x64, y64, backend="reference", **kwargs)
        assert int(ref.steps) == stop < steps
        config = PCConfig.of(len(net.weights), **kwargs)
        with triton_options(cuda_graphs=True) as backend, warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns and runs eagerly
            backend.clear_graphs()
            fused = TritonBackend()
            eager, captured = (fused.pc_grads(Net(*net), batch.x, batch.y, config) for _ in range(2))
            assert any(isinstance(entry, tuple) for entry in cuda_graphs.graphs.entries.values()), "no graph captured"
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                replayed = fused.pc_grads(Net(*net), batch.x, batch.y, config)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            backend.clear_graphs()
    for out, how in ((eager, "eager"), (captured, "captured"), (replayed, "replayed")):
        assert int(out.steps) == stop, f"{how}: steps taken"
        for name in ("energy", "grad_norm"):
            a, e = getattr(out.trace, name), getattr(ref.trace, name)
            assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{how}: trace.{name} NaN rows differ"
            assert_close(torch.nan_to_num(a), torch.nan_to_num(e), dtype="float32", name=f"{how}: trace.{name}")
        for (name, a), (_, e) in zip(fields(out, PC_FIELDS), fields(ref, PC_FIELDS), strict=True):
            assert_close(a, e, dtype="float32", name=f"{how}: {name}")
        assert_close(out.energy_prev, ref.energy_prev, dtype="float32", name=f"{how}: energy_prev")


@pytest.mark.parametrize("schedule, stacked", [("jacobi", False), ("sequential", False), ("jacobi", True)],
                         ids=["jacobi", "sequential", "stacked"])
def test_pc_triton_cuda_adaptive_stop_does_not_sync_per_step(schedule, stacked):
    """Eager launches with adaptive stopping and the trace: the host syncs of one call (torch's sync
    debug mode, warn) do not grow with the number of inference steps."""
    from pcfast.ops.triton import TritonBackend
    from pcfast.types import Net, PCConfig

    dims, acts, gammas = ((33, 64, 64, 64, 7), ["tanh"] * 3, [1.0, 1.0, 1.0, 0.5]) if stacked else (DIMS, ACTS, GAMMAS)
    with precision_mode("fp32") as dtype, triton_options(cuda_graphs=False):
        net, _, batch = problem(dtype, dims, acts)
        assert stacks(net, gammas) == stacked
        net, fused = Net(*net), TritonBackend()

        def syncs(steps):
            config = PCConfig.of(net.depth, gammas, inference_steps=steps, inference_lr=0.2, schedule=schedule,
                                 inference_tol=0.01, return_trace=True, check_divergence=True)
            fused.pc_grads(net, batch.x, batch.y, config)  # compiled and tuned
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    fused.pc_grads(net, batch.x, batch.y, config)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            return sum("synchroniz" in str(w.message) for w in caught)

        assert syncs(24) == syncs(6)
