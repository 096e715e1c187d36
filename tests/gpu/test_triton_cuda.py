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
