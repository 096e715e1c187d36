"""Conv nets on CUDA (the ``torch`` backend: cuDNN convolutions) against ``pcfast.reference.conv``.

Run with ``pytest -m gpu tests/gpu`` (``benchmarks/gpu/run_gpu.sh`` does); the default run deselects
these tests, and without CUDA they skip. The oracle is the float64 reference on the CPU; CUDA runs in
float64 (tight: the same formulas, other summation orders) and float32 with cuDNN's TF32 off (the
float32 row of ``pcfast.testing.TOLERANCES``), NCHW and channels-last.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import pcfast
from pcfast import reference
from pcfast.network import parse_mlp
from pcfast.testing import assert_close
from pcfast.types import Net

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")


@pytest.fixture(autouse=True)
def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


def _model(pool: str) -> nn.Sequential:
    torch.manual_seed(0)
    pooling = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), pooling, nn.Conv2d(16, 24, 3, stride=2),
                         nn.Tanh(), nn.Flatten(), nn.Linear(24 * 3 * 3, 32), nn.Tanh(), nn.Linear(32, 10))


def _layers(model: nn.Module, dtype=torch.float64, device="cpu"):
    parsed = parse_mlp(model)
    cast = lambda t: None if t is None else t.detach().to(device, dtype)
    return Net([cast(m.weight) for m in parsed.linears], [cast(m.bias) for m in parsed.linears], parsed.activations,
               geometry=parsed.geometry).layers()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("pool, schedule, fpa, loss", [("max", "jacobi", False, "mse"), ("avg", "sequential", True, "ce"),
                                                       ("max", "sequential", False, "ce")])
def test_conv_pc_on_cuda_equals_the_reference(dtype, memory_format, pool, schedule, fpa, loss):
    from pcfast.ops.torch_conv import conv_pc_grads
    from pcfast.types import PCConfig

    model = _model(pool)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(17, 3, 15, 15, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (17,), generator=gen)
    target = torch.nn.functional.one_hot(y, 10).double() if loss == "mse" else y
    settings = dict(inference_steps=7, inference_lr=0.1, schedule=schedule, fpa=fpa, loss=loss)
    expected = reference.conv_pc_train_step(_layers(model), x, target, **settings)
    xd = x.to(DEVICE, dtype).contiguous(memory_format=memory_format)
    td = target.to(DEVICE, dtype) if loss == "mse" else target.to(DEVICE)
    got = conv_pc_grads(_layers(model, dtype, DEVICE), xd, td, PCConfig.of(4, None, **settings))
    for a, b in zip(got.weight_grads + got.bias_grads, expected.weight_grads + expected.bias_grads):
        assert_close(a.cpu().double(), b, dtype=dtype)
    assert_close(got.energy.cpu().double(), expected.energy, dtype=dtype)


@pytest.mark.parametrize("algo", ["PC", "DTP", "BP"])
def test_conv_optimizers_step_on_cuda_as_on_the_cpu(algo):
    """One float64 optimizer step on CUDA equals the same step on the CPU."""
    x = torch.rand(9, 3, 15, 15, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.randint(0, 10, (9,), generator=torch.Generator().manual_seed(3))
    params = []
    for device in ("cpu", DEVICE):
        model = _model("max").double().to(device)
        opt = getattr(pcfast.optim, algo)(model, lr=0.05, **({"feedback_noise": 0.0} if algo == "DTP" else {}))
        opt.step(x.to(device), y.to(device))
        params.append([p.detach().cpu() for p in model.parameters()])
    for a, b in zip(*params):
        assert_close(a, b, dtype=torch.float64)
