"""Backends behind ``pcfast.functional``.

A backend is a module exposing some of ``pc_train_step``, ``tp_train_step`` and ``feedback_grads``
with the signatures of ``pcfast.reference``:

- ``reference``: ``pcfast.reference``, autograd on the energy — the specification;
- ``torch``: explicit formulas, no autograd, preallocated buffers, any device (``torch_pc``, ``torch_tp``);
- ``cpp``: the C++ CPU engine ``pcfast._C`` (``pcfast.ops.cpp``), present when it was built;
- ``triton``: fused GPU kernels (``pcfast.ops.triton``), on CPU only under ``TRITON_INTERPRET=1``.

``auto`` picks triton on CUDA tensors, cpp on CPU when built, else torch — per op and dtype, falling
back to torch where the chosen backend does not implement the op or the dtype (``supports_dtype``).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType, SimpleNamespace

import torch

BACKENDS = ("auto", "reference", "torch", "cpp", "triton")
OPS = ("pc_train_step", "tp_train_step", "feedback_grads")

_loaded: dict[str, ModuleType | SimpleNamespace] = {}
_unavailable: dict[str, str] = {}


def _load(name: str):
    if name in _loaded:
        return _loaded[name]
    if name in _unavailable:
        return None
    try:
        if name == "reference":
            module = importlib.import_module("pcfast.reference")
        elif name == "torch":
            from . import torch_pc, torch_tp

            module = SimpleNamespace(
                pc_train_step=torch_pc.pc_train_step,
                tp_train_step=torch_tp.tp_train_step,
                feedback_grads=torch_tp.feedback_grads,
            )
        elif name == "cpp":
            module = importlib.import_module("pcfast.ops.cpp")
        elif name == "triton":
            module = importlib.import_module("pcfast.ops.triton")
        else:
            raise ValueError(name)
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


def supports_dtype(name: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether backend ``name`` computes in ``dtype`` on ``device``: ``cpp`` in float32 and float64;
    ``triton`` also in float16 and bfloat16 on CUDA (the interpreter: float32 and float64 only);
    ``reference`` and ``torch`` in every floating dtype torch has."""
    if name == "cpp":
        return dtype in (torch.float32, torch.float64)
    if name == "triton":
        wide = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        return dtype in (wide if device.type == "cuda" else (torch.float32, torch.float64))
    return dtype.is_floating_point


def _dtype_error(backend: str, dtype: torch.dtype, device: torch.device) -> TypeError:
    able = [name for name in BACKENDS[1:] if supports_dtype(name, dtype, device)]
    return TypeError(
        f"backend={backend!r} does not support dtype {dtype} on {device.type}; backends that do: "
        f"{', '.join(repr(name) for name in able)} (or backend='auto', which picks one)"
    )


def resolve(backend: str, op: str, device: torch.device, dtype: torch.dtype | None = None) -> tuple[str, object]:
    """The backend name and function that run ``op`` for ``backend`` on ``device`` (in ``dtype``,
    when given: ``auto`` then skips backends that do not support it)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        order = ["triton", "torch"] if device.type == "cuda" else ["cpp", "torch"]
        for name in order:
            if dtype is not None and not supports_dtype(name, dtype, device):
                continue
            if (name != "triton" or is_available(name)) and (module := _load(name)) is not None:
                fn = getattr(module, op, None)
                if fn is not None:
                    return name, fn
        raise RuntimeError(f"no backend implements {op}")  # unreachable: torch implements all
    module = _load(backend)
    if module is None or (backend == "triton" and not is_available("triton")):
        why = _unavailable.get(backend, "needs a CUDA device or TRITON_INTERPRET=1")
        hint = {
            "cpp": "reinstall pcfast with a C++ compiler (pip install --no-build-isolation .) to build pcfast._C",
            "triton": "install triton (pip install pcfast[triton]) and run on a CUDA device",
        }.get(backend, "")
        raise RuntimeError(f"backend={backend!r} is not available here ({why}); {hint}")
    fn = getattr(module, op, None)
    if fn is None:
        raise NotImplementedError(f"backend={backend!r} does not implement {op}; use backend='torch'")
    if dtype is not None and not supports_dtype(backend, dtype, device):
        raise _dtype_error(backend, dtype, device)
    return backend, fn
