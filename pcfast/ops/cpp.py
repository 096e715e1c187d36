"""The C++ CPU engine, ``pcfast._C``: the ``cpp`` backend.

Each function runs a whole train step in one call into C++ (``torch.ops.pcfast.*``, registered by
``csrc/pcfast.cpp``): the PC relaxation over all steps and layers plus the weight gradients, or the
TP/DTP targets plus the local gradients. Signatures and results are those of ``pcfast.ops.torch_pc``
and ``pcfast.ops.torch_tp``; the math is ``pcfast.reference``. CPU tensors, float32 or float64.

Importing this module raises ImportError when the extension was not built, which marks the backend
unavailable in ``pcfast.ops``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..network import check_pc_options, check_tp_options, resolve_precisions
from ..results import FeedbackResult, PCResult, TPResult

try:
    from .. import _C  # noqa: F401  (loading the library registers torch.ops.pcfast)
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "pcfast._C, the C++ CPU engine, is not built (" + str(exc) + "); reinstall pcfast with a C++ "
        "compiler and torch present: pip install --no-build-isolation -e ."
    ) from exc

_ops = torch.ops.pcfast

__all__ = ["engine_info", "feedback_grads", "pc_train_step", "set_engine", "tp_train_step"]


def engine_info() -> str:
    """``"<isa>/<gemm>"``: the instruction set of the elementwise kernels (``avx512``, ``avx2`` or
    ``baseline``) and how GEMMs are called (``blas``: straight to libtorch's BLAS; ``aten``: through
    the dispatcher)."""
    return _ops.engine_info()


def set_engine(isa: str | None = None, gemm: str | None = None) -> str:
    """Choose the kernels' instruction set (capped at what the CPU supports) and the GEMM path, for
    tests and benchmarks; returns the new :func:`engine_info`. The defaults are the fastest available.
    The environment variables ``PCFAST_CPP_ISA`` and ``PCFAST_CPP_GEMM=aten`` set them at load time."""
    return _ops.set_engine(isa or "", gemm or "")


def pc_train_step(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    x: Tensor,
    target: Tensor,
    *,
    precisions: Sequence[float] | float | None,
    inference_steps: int,
    inference_lr: float,
    schedule: str,
    fpa: bool,
    loss: str,
    return_trajectory: bool = False,
) -> PCResult:
    """PC relaxation and local gradients in C++; see :func:`pcfast.reference.pc_train_step`."""
    check_pc_options(inference_steps=inference_steps, inference_lr=inference_lr, schedule=schedule, fpa=fpa,
                     return_trajectory=return_trajectory)
    gammas = resolve_precisions(precisions, len(weights))
    latents, errors, weight_grads, bias_grads, energy, loss_value, stacked = _ops.pc_train_step(
        list(weights), list(biases), list(activations), x, target, gammas, int(inference_steps),
        float(inference_lr), schedule, bool(fpa), loss, bool(return_trajectory),
    )
    trajectory = None
    if return_trajectory:
        # One (T+1, B, d_l) block per hidden layer; step t is a list of views into them.
        per_layer = [block.unbind(0) for block in stacked]
        trajectory = [[steps[t] for steps in per_layer] for t in range(int(inference_steps) + 1)]
    return PCResult(
        latents=list(latents),
        errors=list(errors),
        weight_grads=list(weight_grads),
        bias_grads=list(bias_grads),
        energy=energy,
        loss=loss_value,
        trajectory=trajectory,
    )


def tp_train_step(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    feedback_weights: Sequence[Tensor],
    feedback_biases: Sequence[Tensor | None],
    feedback_activations: Sequence[str],
    x: Tensor,
    target: Tensor,
    *,
    beta: float,
    loss: str,
    difference: bool,
) -> TPResult:
    """TP/DTP targets and local gradients in C++; see :func:`pcfast.reference.tp_train_step`."""
    check_tp_options(beta=beta, difference=difference)
    targets, activities, weight_grads, bias_grads, loss_value, local_loss = _ops.tp_train_step(
        list(weights), list(biases), list(activations), list(feedback_weights), list(feedback_biases),
        list(feedback_activations), x, target, float(beta), loss, bool(difference),
    )
    return TPResult(
        targets=list(targets),
        activities=list(activities),
        weight_grads=list(weight_grads),
        bias_grads=list(bias_grads),
        loss=loss_value,
        local_loss=local_loss,
    )


def feedback_grads(
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None],
    activations: Sequence[str],
    feedback_weights: Sequence[Tensor],
    feedback_biases: Sequence[Tensor | None],
    feedback_activations: Sequence[str],
    x: Tensor,
    noise: Sequence[Tensor | None] | None = None,
) -> FeedbackResult:
    """Feedback reconstruction gradients in C++; see :func:`pcfast.reference.feedback_grads`."""
    weight_grads, bias_grads, loss_value = _ops.feedback_grads(
        list(weights), list(biases), list(activations), list(feedback_weights), list(feedback_biases),
        list(feedback_activations), x, [] if noise is None else list(noise),
    )
    return FeedbackResult(list(weight_grads), list(bias_grads), loss_value)
