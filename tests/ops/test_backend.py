"""The ``Backend`` protocol (``pcfast/ops/backend.py``), ``pcfast.ops.get_backend`` and the value types
of ``pcfast/types.py``: every available backend satisfies the protocol and computes what
``pcfast.reference`` computes from the same ``Net``/``Feedback``/config; ``get_backend`` picks by
device and dtype and names what it cannot run; the value types refuse what ``pcfast.functional``
refuses; the Triton backend's options are explicit values."""
import dataclasses

import pytest
import torch

from pcfast import ops, reference
from pcfast.ops.backend import Backend, draw_noise
from pcfast.testing import assert_all_close, assert_close
from pcfast.types import Feedback, Net, PCConfig, TPConfig
from tests.conftest import random_batch, random_mlp

NAMES = [name for name in ("reference", "torch", "cpp", "triton") if ops.is_available(name)]
DIMS = (6, 17, 17, 4)


def _problem(loss="mse"):
    weights, biases, acts = random_mlp(DIMS, activation=["tanh", "gelu"], seed=3, scale=1.2)
    gen = torch.Generator().manual_seed(4)
    qs = [torch.randn(DIMS[l - 1], DIMS[l], generator=gen, dtype=torch.float64) / DIMS[l] ** 0.5
          for l in range(2, len(DIMS))]
    cs = [0.1 * torch.randn(DIMS[l - 1], generator=gen, dtype=torch.float64) for l in range(2, len(DIMS))]
    x, y = random_batch(DIMS, 5, loss)
    return Net(weights, biases, acts), Feedback(qs, cs, ["tanh", "sigmoid"]), x, y


@pytest.mark.parametrize("name", NAMES)
def test_every_backend_satisfies_the_protocol(name):
    backend = ops.get_backend(name, "pc", torch.device("cpu"), torch.float64)
    assert isinstance(backend, Backend) and backend.name == name
    assert {"pc", "tp", "feedback"} <= backend.capabilities
    assert ("seeded_noise" in backend.capabilities) == (name == "triton")
    assert backend.supports_dtype(torch.float64, torch.device("cpu"))
    assert backend.supports_dtype(torch.bfloat16, torch.device("cpu")) == (name in ("reference", "torch"))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_every_backend_equals_reference_from_value_types(name, loss):
    net, feedback, x, y = _problem(loss)
    backend = ops.get_backend(name, "pc", x.device, x.dtype)
    config = PCConfig.of(net.depth, [1.0, 2.0, 0.5], inference_steps=3, inference_lr=0.2, loss=loss,
                         return_trajectory=True)
    pc = backend.pc_grads(net, x, y, config)
    ref = reference.pc_train_step(list(net.weights), list(net.biases), list(net.activations), x, y,
                                  precisions=[1.0, 2.0, 0.5], inference_steps=3, inference_lr=0.2, loss=loss,
                                  return_trajectory=True)
    for t, (a, e) in enumerate(zip(pc.trajectory, ref.trajectory)):
        assert_all_close(a, e, name=f"latents at step {t}")
    assert_all_close(pc.weight_grads, ref.weight_grads, name="pc weight grads")
    assert_close(pc.energy, ref.energy, name="energy")
    tp = backend.tp_grads(net, feedback, x, y, TPConfig(beta=0.3, loss=loss, difference=True))
    tp_ref = reference.tp_train_step(list(net.weights), list(net.biases), list(net.activations),
                                     list(feedback.weights), list(feedback.biases), list(feedback.activations), x, y,
                                     beta=0.3, loss=loss, difference=True)
    assert_all_close(tp.targets, tp_ref.targets, name="targets")
    assert_all_close(tp.weight_grads, tp_ref.weight_grads, name="tp weight grads")
    assert_close(tp.local_loss, tp_ref.local_loss, name="local loss")


@pytest.mark.parametrize("name", NAMES)
def test_every_backend_takes_a_noise_seed(name):
    """Without in-kernel noise a backend draws ξ with ``draw_noise`` (a seeded ``torch.Generator``);
    triton draws it in its kernels (``tp_targets.gaussian_noise`` stores the same numbers). Either
    way the result is the reference given that noise, and the caller passes only the seed."""
    net, feedback, x, _ = _problem()
    backend = ops.get_backend(name, "feedback", x.device, x.dtype)
    widths = [w.shape[0] for w in net.weights[:-1]]
    if name == "triton":
        from pcfast.ops import tp_targets

        noise = tp_targets.gaussian_noise(7, 0.2, x.shape[0], widths, dtype=x.dtype, device=x.device)
    else:
        noise = draw_noise(7, 0.2, x, widths)
    got = backend.feedback_grads(net, feedback, x, noise_seed=7, noise_std=0.2)
    ref = reference.feedback_grads(list(net.weights), list(net.biases), list(net.activations), list(feedback.weights),
                                   list(feedback.biases), list(feedback.activations), x, noise)
    assert_all_close(got.weight_grads, ref.weight_grads, name="feedback weight grads")
    assert_close(got.loss, ref.loss, name="reconstruction loss")
    given = backend.feedback_grads(net, feedback, x, noise=noise)
    assert_all_close(given.weight_grads, ref.weight_grads, name="feedback weight grads, noise given")


def test_draw_noise_is_what_functional_draws_for_a_seed():
    """The numbers of ``pcfast.functional.feedback_grads(..., noise_seed=)`` on a backend without
    in-kernel noise: one ``torch.Generator`` seeded once, layers in order, scaled by the std."""
    x = torch.zeros(5, 3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(5)
    expected = [torch.randn(5, w, generator=gen, dtype=x.dtype).mul_(0.2) for w in (4, 2)]
    assert all(torch.equal(a, b) for a, b in zip(draw_noise(5, 0.2, x, [4, 2]), expected))


def test_get_backend_picks_by_device_and_dtype():
    cpu = torch.device("cpu")
    fast = "cpp" if ops.is_available("cpp") else "torch"
    for op in ops.OPS:
        assert ops.get_backend("auto", op, cpu, torch.float32).name == fast
        assert ops.get_backend("auto", op, cpu).name == fast
        for dtype in (torch.bfloat16, torch.float16):
            assert ops.get_backend("auto", op, cpu, dtype).name == "torch"
        for name in NAMES:
            assert ops.get_backend(name, op, cpu, torch.float64) is ops.get_backend(name, "pc", cpu)
    with pytest.raises(ValueError, match="backend: expected one of"):
        ops.get_backend("fast", "pc", cpu)
    with pytest.raises(ValueError, match="op: expected one of"):
        ops.get_backend("torch", "pc_train_step", cpu)


@pytest.mark.parametrize("name", [n for n in ("cpp", "triton") if n in NAMES])
def test_get_backend_dtype_error_names_the_backends_that_support_it(name):
    with pytest.raises(TypeError, match=rf"backend='{name}' does not support dtype torch.bfloat16 on cpu; "
                                        r"backends that do: 'reference', 'torch'"):
        ops.get_backend(name, "pc", torch.device("cpu"), torch.bfloat16)


def test_value_types_check_themselves_once():
    net, feedback, _, _ = _problem()
    assert net.kinds == ("linear",) * 3 and isinstance(net.weights, tuple) and net.depth == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        net.weights = ()
    with pytest.raises(ValueError, match="activations: expected 2"):
        Net(net.weights, net.biases, ["tanh"])
    with pytest.raises(ValueError, match=r"activations\[1\]: expected one of"):
        Net(net.weights, net.biases, ["tanh", "swish"])
    with pytest.raises(ValueError, match=r"weights\[1\]: expected 17 input features"):
        Net([net.weights[0], net.weights[1][:, :3], net.weights[2]], net.biases, net.activations)
    with pytest.raises(ValueError, match=r"kinds\[0\]: expected one of"):
        Net(net.weights, net.biases, net.activations, kinds=("conv2d", "linear", "linear"))
    with pytest.raises(ValueError, match=r"feedback_activations\[0\]: expected one of"):
        Feedback(feedback.weights, feedback.biases, ["swish", "tanh"])
    with pytest.raises(TypeError, match="inference_steps: expected an int >= 0, got float 2.0"):
        PCConfig((1.0, 1.0), inference_steps=2.0)
    with pytest.raises(ValueError, match="schedule: expected one of"):
        PCConfig((1.0,), schedule="gauss-seidel")
    with pytest.raises(ValueError, match=r"precisions\[1\]: expected a finite positive number"):
        PCConfig((1.0, 0.0))
    with pytest.raises(ValueError, match="precisions: expected 3 values"):
        PCConfig.of(3, [1.0, 1.0])
    assert PCConfig.of(3, 0.5).precisions == (1.0, 1.0, 0.5) and PCConfig.of(2).precisions == (1.0, 1.0)
    with pytest.raises(ValueError, match="loss: expected one of"):
        TPConfig(loss="l1")
    with pytest.raises(TypeError, match="difference: expected a bool, got int"):
        TPConfig(difference=1)
    assert hash(PCConfig((1.0,))) == hash(PCConfig([1.0]))  # hashable and normalised: a cache key


@pytest.mark.skipif("triton" not in NAMES, reason="triton is not available here")
def test_triton_options_are_explicit_values():
    from pcfast.ops import triton as triton_backend

    defaults = triton_backend.current_options()
    assert defaults == triton_backend.TritonOptions()
    with triton_backend.options(cuda_graphs=False, stacked=False) as inner:
        assert triton_backend.current_options() == inner == dataclasses.replace(defaults, cuda_graphs=False,
                                                                                 stacked=False)
        with triton_backend.options(graph_cache_size=2):
            assert triton_backend.current_options().graph_cache_size == 2
            assert not triton_backend.current_options().stacked
        assert triton_backend.current_options() == inner
    assert triton_backend.current_options() == defaults
    assert triton_backend.TritonBackend(triton_backend.TritonOptions(stacked=False))._options().stacked is False
    with pytest.raises(TypeError, match="stacked: expected a bool"):
        triton_backend.TritonOptions(stacked=1)
    with pytest.raises(ValueError, match="graph_cache_size: expected an int >= 0"):
        triton_backend.TritonOptions(graph_cache_size=-1)
    assert not hasattr(triton_backend, "CUDA_GRAPHS") and not hasattr(triton_backend, "STACKED")
