"""The CUDA-graph cache of the Triton backend: a whole train step captured once and replayed.

A configuration (its key: shapes, dtypes, settings and the parameters' addresses) runs eagerly the
first time it is seen (autotuning and compiling every kernel), is captured the second time, and is
replayed afterwards: inputs are copied into the graph's static buffers, parameters are read in place
(the key holds their addresses, so an optimizer's in-place updates are seen), and results are
cloned out of the graph's pool. A capture that fails marks its key eager for good, with a warning.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

_WARM = "warm"  # seen once: the next call captures
_EAGER = "eager"  # capture failed: always launch eagerly


def clone_result(result):
    """A copy of ``result`` (a results dataclass) whose tensors live outside the graph's static pool,
    nested results (``PCResult.trace``) included."""
    return type(result)(**{name: _clone_value(value) for name, value in vars(result).items()})


def _clone_value(value):
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_value(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return clone_result(value)
    return value


def parameter_key(tensors: Sequence[Tensor | None]) -> tuple:
    """What a graph reading ``tensors`` in place depends on: shapes, strides, dtypes, addresses."""
    return tuple(
        None if t is None else (tuple(t.shape), t.stride(), t.dtype, t.data_ptr()) for t in tensors
    )


class GraphCache:
    """Captured graphs by key, the ``capacity`` most recently used kept."""

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple, object] = OrderedDict()

    def clear(self) -> None:
        """Drop every captured graph (and its memory pool)."""
        self.entries.clear()

    def run(self, key: tuple, run: Callable[..., object], inputs: tuple[Tensor, ...], *, capacity: int,
            keep: object = None):
        """``run(*inputs)`` through the graph cached under ``key``: eager on first sight, captured on
        the second, replayed from then on (``inputs`` are copied into the graph's static copies).
        ``keep`` (tensors the graph reads, made outside it, e.g. offset tables) lives as long as the graph."""
        entry = self.entries.get(key)
        if entry is None:
            self.entries[key] = _WARM
            while len(self.entries) > capacity:
                self.entries.popitem(last=False)
            return run(*inputs)
        self.entries.move_to_end(key)
        if entry is _EAGER:
            return run(*inputs)
        if entry is _WARM:
            entry = self._capture(key, run, inputs, keep)
            if entry is _EAGER:
                return run(*inputs)
        graph, static_inputs, static_out, _ = entry
        for static, new in zip(static_inputs, inputs):
            static.copy_(new)
        graph.replay()
        return clone_result(static_out)

    def _capture(self, key, run, inputs, keep):
        device = inputs[0].device
        static_inputs = tuple(t.clone() for t in inputs)
        try:
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                run(*static_inputs)  # capture needs compiled, tuned kernels and a warm allocator
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = run(*static_inputs)
        except RuntimeError as exc:  # capture is an optimisation: fall back to eager launches for good
            warnings.warn(f"pcfast triton backend: CUDA graph capture failed ({exc}); launching eagerly",
                          RuntimeWarning, stacklevel=4)
            self.entries[key] = _EAGER
            return _EAGER
        entry = (graph, static_inputs, static_out, keep)
        self.entries[key] = entry
        return entry


# The process's cache: graphs hold device memory, so every caller shares one.
graphs = GraphCache()
