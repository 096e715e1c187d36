"""Backends behind ``pcfast.functional``: objects satisfying the ``Backend`` protocol (``backend.py``).

- ``reference``: ``pcfast.reference``, autograd on the energy — the specification;
- ``torch``: explicit formulas, no autograd, preallocated buffers, any device (``torch_pc``, ``torch_tp``);
- ``cpp``: the C++ CPU engine ``pcfast._C`` (``pcfast.ops.cpp``), present when it was built;
- ``triton``: fused GPU kernels (``pcfast.ops.triton``), on CPU only under ``TRITON_INTERPRET=1``.

``auto`` picks triton on CUDA tensors, cpp on CPU when built, else torch — per op and dtype, falling
back to torch where the chosen backend does not implement the op or the dtype (``supports_dtype``),
and torch for conv nets (``reference`` and ``torch`` are the backends that run them).
A backend is chosen once, then called with value types that checked themselves::

    from pcfast.ops import get_backend
    from pcfast.types import Feedback, Net, PCConfig, TPConfig

    net = Net(weights, biases, activations)
    backend = get_backend("auto", "pc", x.device, x.dtype)
    result = backend.pc_grads(net, x, target, PCConfig.of(net.depth, precisions, inference_steps=20))
    feedback = Feedback(feedback_weights, feedback_biases, feedback_activations)
    result = get_backend("auto", "tp", x.device, x.dtype).tp_grads(net, feedback, x, target, TPConfig(beta=0.1))
    grads = get_backend("auto", "feedback", x.device, x.dtype).feedback_grads(
        net, feedback, x, noise_seed=seed, noise_std=0.1)   # noise drawn in-kernel or from a seeded generator
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from .backend import Backend, dtype_supported

BACKENDS = ("auto", "reference", "torch", "cpp", "triton")
OPS = ("pc", "tp", "feedback")
# Each backend's module and the class in it that satisfies Backend.
_HOMES = {
    "reference": ("pcfast.ops.backend", "ReferenceBackend"),
    "torch": ("pcfast.ops.torch_tp", "TorchBackend"),
    "cpp": ("pcfast.ops.cpp", "CppBackend"),
    "triton": ("pcfast.ops.triton", "TritonBackend"),
}
_HINTS = {
    "cpp": "reinstall pcfast with a C++ compiler (pip install --no-build-isolation .) to build pcfast._C",
    "triton": "install triton (pip install pcfast[triton]) and run on a CUDA device",
}

_loaded: dict[str, ModuleType] = {}
_unavailable: dict[str, str] = {}
_backends: dict[str, Backend] = {}


def _load(name: str) -> ModuleType | None:
    """The module of backend ``name`` (see ``_HOMES``), or None when it cannot be imported here."""
    if name in _loaded:
        return _loaded[name]
    if name in _unavailable:
        return None
    try:
        module = importlib.import_module(_HOMES[name][0])
    except (ImportError, OSError, RuntimeError) as exc:
        _unavailable[name] = f"{type(exc).__name__}: {exc}"
        return None
    _loaded[name] = module
    return module


def is_available(name: str) -> bool:
    """Whether backend ``name`` can run here."""
    if name == "triton" and not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return _load(name) is not None


def available_backends() -> list[str]:
    """The backends that can run here, besides ``auto``."""
    return [name for name in BACKENDS[1:] if is_available(name)]


supports_dtype = dtype_supported


def _dtype_error(backend: str, dtype: torch.dtype, device: torch.device) -> TypeError:
    able = [name for name in BACKENDS[1:] if supports_dtype(name, dtype, device)]
    return TypeError(
        f"backend={backend!r} does not support dtype {dtype} on {device.type}; backends that do: "
        f"{', '.join(repr(name) for name in able)} (or backend='auto', which picks one)"
    )


def _backend(name: str) -> Backend:
    """The one ``Backend`` object of an available backend ``name``."""
    if name not in _backends:
        _backends[name] = getattr(_load(name), _HOMES[name][1])()
    return _backends[name]


def get_backend(name: str, op: str, device: torch.device, dtype: torch.dtype | None = None, *,
                conv: bool = False) -> Backend:
    """The ``Backend`` that runs ``op`` (one of ``OPS``: ``"pc"``, ``"tp"``, ``"feedback"``) for backend
    ``name`` (one of ``BACKENDS``) on ``device`` (in ``dtype``, when given: ``auto`` then skips the
    backends that do not support it; an explicit backend that does not raises TypeError naming those
    that do), for a conv net when ``conv`` (only backends with the ``"conv"`` capability run one:
    ``auto`` picks ``torch``, others raise ``NotImplementedError`` saying which do)."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    if name == "auto":
        for candidate in ("triton", "torch") if device.type == "cuda" else ("cpp", "torch"):
            if dtype is not None and not supports_dtype(candidate, dtype, device):
                continue
            if not is_available(candidate):
                continue
            able = _backend(candidate).capabilities
            if op in able and (not conv or "conv" in able):
                return _backend(candidate)
        raise RuntimeError(f"no backend implements {op}")  # unreachable: torch implements all
    if not is_available(name):
        why = _unavailable.get(name, "needs a CUDA device or TRITON_INTERPRET=1")
        raise RuntimeError(f"backend={name!r} is not available here ({why}); {_HINTS.get(name, '')}")
    backend = _backend(name)
    if op not in backend.capabilities:
        raise NotImplementedError(f"backend={name!r} does not implement {op}; use backend='torch'")
    if conv and "conv" not in backend.capabilities:
        raise NotImplementedError(f"backend={name!r} runs MLPs only; conv nets run on backend='torch' (explicit, "
                                  "any device) or 'reference' (autograd, the specification), or 'auto'")
    if dtype is not None and not supports_dtype(name, dtype, device):
        raise _dtype_error(name, dtype, device)
    return backend
