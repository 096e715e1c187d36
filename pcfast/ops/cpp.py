"""The C++ CPU engine, ``pcfast._C``: the ``cpp`` backend.

``CppBackend`` runs a whole train step in one call into C++ (``torch.ops.pcfast.*``, registered by
``csrc/pcfast.cpp``): the PC relaxation over all steps and layers plus the weight gradients, or the
TP/DTP targets plus the local gradients. Results are those of the ``torch`` backend
(``pcfast.ops.torch_pc``, ``pcfast.ops.torch_tp``); the math is ``pcfast.reference``. CPU tensors, float32 or float64.

The ops keep the custom-op contract of ``torch.library``: functional schemas (no input is mutated, no
output aliases an input), CPU kernels, a "not differentiable" autograd kernel (outputs carry no graph),
and the fake kernels below, which give each output's shape and dtype from the inputs' shapes alone, so
the ops trace under ``torch.compile`` without graph breaks and pass ``torch.library.opcheck``. No
output shape depends on tensor data. Each op returns a tuple whose fields the schema names; this
module reads it through a named tuple built from that schema (``PCStepOutputs``, …) and returns the
result types of ``pcfast.results``.

Importing this module raises ImportError when the extension was not built, which marks the backend
unavailable in ``pcfast.ops``.
"""
from __future__ import annotations

from collections import namedtuple
from typing import Sequence

import torch
from torch import Tensor

from ..results import FeedbackResult, PCResult, PCTrace, TPResult
from ..types import Feedback, Net, PCConfig, TPConfig
from .backend import HostNoiseBackend

try:
    from .. import _C  # noqa: F401  (loading the library registers torch.ops.pcfast)
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "pcfast._C, the C++ CPU engine, is not built (" + str(exc) + "); reinstall pcfast with a C++ "
        "compiler and torch present: pip install --no-build-isolation -e ."
    ) from exc

_ops = torch.ops.pcfast

__all__ = ["CppBackend", "activation", "engine_info", "set_engine"]


def _outputs_type(op_name: str, type_name: str) -> type:
    """A named tuple whose fields are the return names in ``pcfast::<op_name>``'s schema."""
    schema = getattr(_ops, op_name).default._schema
    return namedtuple(type_name, [ret.name for ret in schema.returns])


PCStepOutputs = _outputs_type("pc_train_step", "PCStepOutputs")
TPStepOutputs = _outputs_type("tp_train_step", "TPStepOutputs")
FeedbackOutputs = _outputs_type("feedback_grads", "FeedbackOutputs")
ActivationOutputs = _outputs_type("activation", "ActivationOutputs")


def engine_info() -> str:
    """``"<isa>/<gemm>"``: the instruction set of the elementwise kernels (``avx512``, ``avx2`` or
    ``baseline``) and how GEMMs are called (``blas``: straight to libtorch's BLAS; ``aten``: through
    the dispatcher)."""
    return _C.engine_info()


def set_engine(isa: str | None = None, gemm: str | None = None) -> str:
    """Choose the kernels' instruction set (capped at what the CPU supports) and the GEMM path, for
    tests and benchmarks; returns the new :func:`engine_info`. The defaults are the fastest available.
    The environment variables ``PCFAST_CPP_ISA`` and ``PCFAST_CPP_GEMM=aten`` set them at load time."""
    return _C.set_engine(isa or "", gemm or "")


def activation(u: Tensor, name: str) -> ActivationOutputs:
    """``(value, slope) = (φ(u), φ'(u))`` through the engine's kernels, for tests of the activation math."""
    return ActivationOutputs(*_ops.activation(u, name))


def _lists(params: Net | Feedback) -> tuple[list, list, list]:
    """Weights, biases and activation names as the ops' schemas take them."""
    return list(params.weights), list(params.biases), list(params.activations)


def _result(result_type: type, outputs: tuple, omit: Sequence[str] = (), **changes):
    """``result_type`` from an op's named ``outputs`` (their sequences as lists) but those in ``omit``,
    ``changes`` replacing fields."""
    fields = {name: list(value) if isinstance(value, (list, tuple)) else value
              for name, value in outputs._asdict().items() if name not in omit}
    return result_type(**{**fields, **changes})


class CppBackend(HostNoiseBackend):
    """The C++ CPU engine: a whole train step per call into ``torch.ops.pcfast``."""

    name = "cpp"

    def pc_grads(self, net: Net, x: Tensor, target: Tensor, config: PCConfig) -> PCResult:
        """PC relaxation and local gradients in C++; see :func:`pcfast.reference.pc_train_step`."""
        out = PCStepOutputs(*_ops.pc_train_step(
            *_lists(net), x, target, list(config.precisions), config.inference_steps, config.inference_lr,
            config.schedule, config.fpa, config.loss, config.return_trajectory, config.inference_tol,
            config.return_trace, config.check_divergence,
        ))
        trajectory = None
        if config.return_trajectory:
            # One (T+1, B, d_l) block per hidden layer; step t is a list of views into them.
            per_layer = [block.unbind(0) for block in out.trajectory]
            trajectory = [[steps[t] for steps in per_layer] for t in range(config.inference_steps + 1)]
        # The op returns every output; those not asked for (empty tensors, or the step count without
        # a tolerance) become None.
        return _result(PCResult, out, omit=("trace_energy", "trace_grad_norm"), trajectory=trajectory,
                       steps=out.steps if config.inference_tol is not None else None,
                       trace=PCTrace(out.trace_energy, out.trace_grad_norm) if config.return_trace else None,
                       energy_prev=out.energy_prev if config.check_divergence else None)

    def tp_grads(self, net: Net, feedback: Feedback, x: Tensor, target: Tensor, config: TPConfig) -> TPResult:
        """TP/DTP targets and local gradients in C++; see :func:`pcfast.reference.tp_train_step`."""
        out = TPStepOutputs(*_ops.tp_train_step(*_lists(net), *_lists(feedback), x, target, config.beta, config.loss,
                                                config.difference))
        return _result(TPResult, out)

    def reconstruction_grads(self, net: Net, feedback: Feedback, x: Tensor,
                             noise: Sequence[Tensor | None] | None) -> FeedbackResult:
        """Feedback reconstruction gradients in C++; see :func:`pcfast.reference.feedback_grads`."""
        out = FeedbackOutputs(*_ops.feedback_grads(*_lists(net), *_lists(feedback), x,
                                                   [] if noise is None else list(noise)))
        return _result(FeedbackResult, out)


# ------------------------------------------------------------------------------------------------
# Fake (meta) kernels: each output's shape and dtype from the inputs' shapes, no data read. They run
# under torch.compile's tracing (fake tensors) and for meta tensors; the C++ kernels check values.


def _describe(t: Tensor) -> str:
    layout = "" if t.layout == torch.strided else f", layout {t.layout}"
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}{layout}"


def _check_on_cpu(**groups: Tensor | Sequence[Tensor | None] | None) -> None:
    """The device check of the C++ kernels, for the tensors that reach a fake kernel instead (meta
    tensors; fake tensors of the CPU pass)."""
    for name, group in groups.items():
        tensors = [(name, group)] if isinstance(group, Tensor) else [
            (f"{name}[{i}]", t) for i, t in enumerate(group or ()) if t is not None]
        for label, t in tensors:
            if t.device.type != "cpu" or t.layout != torch.strided:
                raise ValueError(f"{label}: the cpp backend runs on the CPU; expected a dense CPU tensor, got "
                                 f"{_describe(t)} (use backend='torch' or 'triton' for other devices)")


def _widths(weights: Sequence[Tensor]) -> list:
    """(d_0, d_1, …, d_L) of a chain of (out, in) weights."""
    if len(weights) == 0:
        raise ValueError("weights: expected at least one layer, got none")
    for l, w in enumerate(weights):
        if w.dim() != 2:
            raise ValueError(f"weights[{l}]: expected a 2-D (out, in) matrix, got {_describe(w)}")
    return [weights[0].shape[1], *(w.shape[0] for w in weights)]


def _grads_like(params: Sequence[Tensor], biases: Sequence[Tensor | None]) -> tuple[list, list]:
    """Fresh gradients shaped like ``params`` and like each present bias (None where absent)."""
    return ([p.new_empty(p.shape) for p in params],
            [None if b is None else p.new_empty(p.shape[:1]) for p, b in zip(params, biases)])


@torch.library.register_fake("pcfast::pc_train_step")
def _pc_train_step_fake(weights, biases, activations, x, target, precisions, inference_steps, inference_lr,
                        schedule, fpa, loss, return_trajectory, inference_tol=None, return_trace=False,
                        check_divergence=False):
    _check_on_cpu(weights=weights, biases=biases, x=x, target=target)
    widths, batch, new = _widths(weights), x.shape[0], weights[0].new_empty
    weight_grads, bias_grads = _grads_like(weights, biases)
    hidden, depth = widths[1:-1], len(weights)
    trajectory = [new((inference_steps + 1, batch, d)) for d in hidden] if return_trajectory else []
    # The steps taken are data, not a shape: a 0-dim int64 tensor whatever the tolerance.
    steps = new((), dtype=torch.int64)
    trace_energy = new((inference_steps + 1, depth)) if return_trace else new((0,))
    trace_grad_norm = new((inference_steps, depth - 1)) if return_trace else new((0,))
    energy_prev = new(()) if check_divergence else new((0,))
    return ([new((batch, d)) for d in hidden], [new((batch, d)) for d in widths[1:]], weight_grads, bias_grads,
            new(()), new(()), trajectory, steps, trace_energy, trace_grad_norm, energy_prev)


@torch.library.register_fake("pcfast::tp_train_step")
def _tp_train_step_fake(weights, biases, activations, feedback_weights, feedback_biases, feedback_activations,
                        x, target, beta, loss, difference):
    _check_on_cpu(weights=weights, biases=biases, feedback_weights=feedback_weights,
                  feedback_biases=feedback_biases, x=x, target=target)
    widths, batch, new = _widths(weights), x.shape[0], weights[0].new_empty
    weight_grads, bias_grads = _grads_like(weights, biases)
    return ([new((batch, d)) for d in widths[1:]], [new((batch, d)) for d in widths[1:]], weight_grads,
            bias_grads, new(()), new(()))


@torch.library.register_fake("pcfast::feedback_grads")
def _feedback_grads_fake(weights, biases, activations, feedback_weights, feedback_biases, feedback_activations,
                         x, noise):
    _check_on_cpu(weights=weights, biases=biases, feedback_weights=feedback_weights,
                  feedback_biases=feedback_biases, x=x, noise=noise)
    _widths(weights)
    weight_grads, bias_grads = _grads_like(feedback_weights, feedback_biases)
    return weight_grads, bias_grads, weights[0].new_empty(())


@torch.library.register_fake("pcfast::activation")
def _activation_fake(u, activation):
    _check_on_cpu(u=u)
    return u.new_empty(u.shape), u.new_empty(u.shape)
