"""The ``triton`` backend: PC and TP/DTP train steps as a few fused Triton launches per layer.

Loaded by ``pcfast.ops`` on demand (``backend="triton"``, or ``auto`` on CUDA), so ``import pcfast``
never imports triton. Runs on CUDA tensors, and on CPU under ``TRITON_INTERPRET=1`` (tests).
``TritonBackend`` satisfies ``pcfast.ops.Backend``; the schedules (which kernel runs when) are
``triton_pc`` and ``triton_tp``, the kernels ``linear_epilogue``, ``pc_update``, ``local_grad`` and
``tp_targets``; the ``torch`` backend is the readable twin of the schedules. DTP's feedback noise is
drawn inside the kernels from a seed.

On CUDA the whole step is captured as a CUDA graph the second time a configuration is seen and
replayed afterwards (``cuda_graphs``). The ``PCConfig`` is part of the graph's key, inference control
included: adaptive stopping runs all ``inference_steps`` in the graph, those after the stop gated to
no-ops on the device (DESIGN §3), and the trace comes back cloned with the rest of the result.

Options (``TritonOptions``) belong to a ``TritonBackend``; one made without them (the one
``pcfast.ops.get_backend`` gives) uses the options of the enclosing ``with options(...)`` block::

    with pcfast.ops.triton.options(cuda_graphs=False, stacked=False):
        result = pcfast.functional.pc_train_step(..., backend="triton")   # eager, one launch per layer
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..results import FeedbackResult, PCResult, TPResult
from ..types import Feedback, Net, PCConfig, TPConfig
from . import cuda_graphs, linear_epilogue, triton_pc, triton_tp
from ._triton_common import as_contiguous, input_precision, kernel_layout
from .backend import CAPABILITIES, dtype_supported


@dataclass(frozen=True)
class TritonOptions:
    """How the ``triton`` backend runs (never what it computes).

    cuda_graphs: capture and replay train steps on CUDA (``cuda_graphs``).
    stacked: equal-width hidden layers share launches (Jacobi PC steps, TP's local gradients).
    graph_cache_size: configurations whose graphs are kept, least recently used dropped first.
    ce_fused_max_classes: widest class row whose CE error is formed in the prediction GEMM's
        epilogue; wider rows store the logits and run a row-wise kernel.
    """

    cuda_graphs: bool = True
    stacked: bool = True
    graph_cache_size: int = 8
    ce_fused_max_classes: int = linear_epilogue.CE_FUSED_MAX_CLASSES

    def __post_init__(self) -> None:
        for name in ("cuda_graphs", "stacked"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        for name in ("graph_cache_size", "ce_fused_max_classes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {value!r}")


_current = contextvars.ContextVar("pcfast_triton_options", default=TritonOptions())


def current_options() -> TritonOptions:
    """The options of the innermost ``with options(...)`` block (the defaults outside any)."""
    return _current.get()


@contextlib.contextmanager
def options(**changes) -> Iterator[TritonOptions]:
    """Run the block with these ``TritonOptions`` fields changed (for this thread or task only)."""
    token = _current.set(dataclasses.replace(_current.get(), **changes))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def clear_graphs() -> None:
    """Drop every captured CUDA graph (and its memory pool)."""
    cuda_graphs.graphs.clear()


def _check_dtype(x: Tensor) -> None:
    """The kernels' dtypes (``pcfast.ops.get_backend`` already refuses others; a direct call may not)."""
    if not dtype_supported("triton", x.dtype, x.device):
        where = "the Triton interpreter supports float32 and float64" if not x.is_cuda else "unsupported dtype"
        raise NotImplementedError(f"x: {where}, got {x.dtype}; use backend='torch'")


class TritonBackend:
    """Fused Triton kernels (``options``: fixed ones, or None for those of the enclosing ``options()``)."""

    name = "triton"
    capabilities = CAPABILITIES | {"seeded_noise"}

    def __init__(self, options: TritonOptions | None = None) -> None:
        self.options = options

    def supports_dtype(self, dtype: torch.dtype, device: torch.device) -> bool:
        return dtype_supported(self.name, dtype, device)

    def _options(self) -> TritonOptions:
        return self.options if self.options is not None else _current.get()

    @torch.no_grad()
    def pc_grads(self, net: Net, x: Tensor, target: Tensor, config: PCConfig) -> PCResult:
        _check_dtype(x)
        opts = self._options()
        x, target = as_contiguous(x), as_contiguous(target)
        net, copied = _kernel_net(net)
        # The stack plan (its offset tables are device tensors) is made by the first run that needs
        # it: a replayed graph needs none, and ``plan`` keeps the tables alive as long as the graph.
        plan: list = []

        def run(x_in: Tensor, target_in: Tensor) -> PCResult:
            if not plan:
                plan.append(triton_pc.stack_plan(*_params(net), config) if opts.stacked else None)
            return triton_pc.pc_step(net, x_in, target_in, config, plan[0], opts.ce_fused_max_classes)

        if not (opts.cuda_graphs and x.is_cuda and not config.return_trajectory) or copied:
            return run(x, target)
        key = ("pc", cuda_graphs.parameter_key(net.weights), cuda_graphs.parameter_key(net.biases), net.activations,
               _batch_key(x, target), config, opts, input_precision(x))
        return cuda_graphs.graphs.run(key, run, (x, target), capacity=opts.graph_cache_size, keep=plan)

    @torch.no_grad()
    def tp_grads(self, net: Net, feedback: Feedback, x: Tensor, target: Tensor, config: TPConfig) -> TPResult:
        _check_dtype(x)
        opts = self._options()
        x, target = as_contiguous(x), as_contiguous(target)
        net, copied = _kernel_net(net)
        feedback, copied_feedback = _kernel_net(feedback)

        def run(x_in: Tensor, target_in: Tensor) -> TPResult:
            return triton_tp.tp_step(net, feedback, x_in, target_in, config, stacked=opts.stacked,
                                     ce_fused_max_classes=opts.ce_fused_max_classes)

        if not (opts.cuda_graphs and x.is_cuda) or copied or copied_feedback:
            return run(x, target)
        key = ("tp", cuda_graphs.parameter_key(net.weights), cuda_graphs.parameter_key(net.biases),
               cuda_graphs.parameter_key(feedback.weights), cuda_graphs.parameter_key(feedback.biases),
               net.activations, feedback.activations, _batch_key(x, target), config, opts, input_precision(x))
        return cuda_graphs.graphs.run(key, run, (x, target), capacity=opts.graph_cache_size)

    @torch.no_grad()
    def feedback_grads(self, net: Net, feedback: Feedback, x: Tensor, *, noise: Sequence[Tensor | None] | None = None,
                       noise_seed: int | None = None, noise_std: float = 0.0) -> FeedbackResult:
        """ξ is ``noise`` (tensors), or with ``noise_seed`` drawn inside the kernels, or zero."""
        _check_dtype(x)
        net, _ = _kernel_net(net)
        feedback, _ = _kernel_net(feedback)
        return triton_tp.feedback_step(net, feedback, as_contiguous(x), noise, noise_seed, noise_std)


def _kernel_net(net: Net | Feedback) -> tuple[Net | Feedback, bool]:
    """``net`` with its parameters as the kernels read them (``kernel_layout``), and whether any had
    to be copied; the same object, unchecked again, when none had."""
    weights, biases, copied = kernel_layout(net.weights, net.biases)
    return (dataclasses.replace(net, weights=weights, biases=biases) if copied else net), copied


def _params(net: Net) -> tuple:
    return net.weights, net.biases, net.activations


def _batch_key(x: Tensor, target: Tensor) -> tuple:
    return tuple(x.shape), x.dtype, x.device, tuple(target.shape), target.dtype
