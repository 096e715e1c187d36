"""Backends behind ``pcfast.functional``: objects satisfying the ``Backend`` protocol (``backend.py``).

- ``reference``: ``pcfast.reference``, autograd on the energy — the specification;
- ``torch``: explicit formulas, no autograd, preallocated buffers, any device (``torch_pc``, ``torch_tp``);
- ``cpp``: the C++ CPU engine ``pcfast._C`` (``pcfast.ops.cpp``), present when it was built;
- ``triton``: fused GPU kernels (``pcfast.ops.triton``), on CPU only under ``TRITON_INTERPRET=1``.

``auto`` picks triton on CUDA tensors, cpp on CPU when built, else torch — per op and dtype, falling
back to torch where the chosen backend does not implement the op or the dtype (``supports_dtype``).
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

``resolve`` (the backend name and a module-level function with the positional signatures of
``pcfast.reference``) is the older entry point; both apply the same rules and raise the same errors.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType, SimpleNamespace

import torch

from .backend import Backend, dtype_supported

BACKENDS = ("auto", "reference", "torch", "cpp", "triton")
OPS = ("pc_train_step", "tp_train_step", "feedback_grads")
# The op names of get_backend (capabilities) and of resolve (module-level functions).
_CAPABILITY = {"pc_train_step": "pc", "tp_train_step": "tp", "feedback_grads": "feedback"}

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


supports_dtype = dtype_supported


def _dtype_error(backend: str, dtype: torch.dtype, device: torch.device) -> TypeError:
    able = [name for name in BACKENDS[1:] if supports_dtype(name, dtype, device)]
    return TypeError(
        f"backend={backend!r} does not support dtype {dtype} on {device.type}; backends that do: "
        f"{', '.join(repr(name) for name in able)} (or backend='auto', which picks one)"
    )


def _choose(backend: str, op: str, device: torch.device, dtype: torch.dtype | None):
    """The name and loaded namespace of the backend that runs ``op`` (a name in OPS)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        order = ["triton", "torch"] if device.type == "cuda" else ["cpp", "torch"]
        for name in order:
            if dtype is not None and not supports_dtype(name, dtype, device):
                continue
            if (name != "triton" or is_available(name)) and (module := _load(name)) is not None:
                if getattr(module, op, None) is not None:
                    return name, module
        raise RuntimeError(f"no backend implements {op}")  # unreachable: torch implements all
    module = _load(backend)
    if module is None or (backend == "triton" and not is_available("triton")):
        why = _unavailable.get(backend, "needs a CUDA device or TRITON_INTERPRET=1")
        hint = {
            "cpp": "reinstall pcfast with a C++ compiler (pip install --no-build-isolation .) to build pcfast._C",
            "triton": "install triton (pip install pcfast[triton]) and run on a CUDA device",
        }.get(backend, "")
        raise RuntimeError(f"backend={backend!r} is not available here ({why}); {hint}")
    if getattr(module, op, None) is None:
        raise NotImplementedError(f"backend={backend!r} does not implement {op}; use backend='torch'")
    if dtype is not None and not supports_dtype(backend, dtype, device):
        raise _dtype_error(backend, dtype, device)
    return backend, module


def resolve(backend: str, op: str, device: torch.device, dtype: torch.dtype | None = None) -> tuple[str, object]:
    """The backend name and module-level function that run ``op`` (one of ``OPS``) for ``backend``
    on ``device`` (in ``dtype``, when given: ``auto`` then skips backends that do not support it)."""
    name, module = _choose(backend, op, device, dtype)
    return name, getattr(module, op)


def get_backend(name: str, op: str, device: torch.device, dtype: torch.dtype | None = None) -> Backend:
    """The ``Backend`` that runs ``op`` (``"pc"``, ``"tp"`` or ``"feedback"``) for backend ``name``
    (one of ``BACKENDS``) on ``device`` in ``dtype``; the rules and errors of ``resolve``."""
    ops = {capability: op_name for op_name, capability in _CAPABILITY.items()}
    if op not in ops:
        raise ValueError(f"op: expected one of {tuple(ops)}, got {op!r}")
    chosen, _ = _choose(name, ops[op], device, dtype)
    if chosen not in _backends:
        _backends[chosen] = _new_backend(chosen)
    return _backends[chosen]


_backends: dict[str, Backend] = {}


def _new_backend(name: str) -> Backend:
    if name == "reference":
        from .backend import ReferenceBackend

        return ReferenceBackend()
    if name == "torch":
        from .torch_tp import TorchBackend

        return TorchBackend()
    return _load(name).CppBackend() if name == "cpp" else _load(name).TritonBackend()
