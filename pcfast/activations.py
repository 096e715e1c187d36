"""Activation functions φ and their derivatives φ', by name.

Every backend looks activations up here, so a name means the same function everywhere. GELU is
the exact (erf) form, matching ``nn.GELU()``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _tanh_grad(u: Tensor) -> Tensor:
    t = torch.tanh(u)
    return 1.0 - t * t


def _relu_grad(u: Tensor) -> Tensor:
    return (u > 0).to(u.dtype)


def _sigmoid_grad(u: Tensor) -> Tensor:
    s = torch.sigmoid(u)
    return s * (1.0 - s)


def _gelu(u: Tensor) -> Tensor:
    return torch.nn.functional.gelu(u)


def _gelu_grad(u: Tensor) -> Tensor:
    cdf = 0.5 * (1.0 + torch.erf(u * _SQRT_HALF))
    return cdf + u * torch.exp(-0.5 * u * u) * _INV_SQRT_2PI


def _identity(u: Tensor) -> Tensor:
    return u


def _identity_grad(u: Tensor) -> Tensor:
    return torch.ones_like(u)


ACTIVATIONS: dict[str, tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "tanh": (torch.tanh, _tanh_grad),
    "relu": (torch.relu, _relu_grad),
    "sigmoid": (torch.sigmoid, _sigmoid_grad),
    "gelu": (_gelu, _gelu_grad),
    "identity": (_identity, _identity_grad),
}

# Module types accepted in an nn.Sequential, and the name each stands for.
MODULE_NAMES: dict[type, str] = {
    nn.Tanh: "tanh",
    nn.ReLU: "relu",
    nn.Sigmoid: "sigmoid",
    nn.GELU: "gelu",
    nn.Identity: "identity",
}


def check_activation(name: str, argument: str = "activation") -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"{argument}: expected one of {sorted(ACTIVATIONS)}, got {name!r}")
    return name


def phi(name: str) -> Callable[[Tensor], Tensor]:
    """φ for ``name``."""
    return ACTIVATIONS[check_activation(name)][0]


def phi_grad(name: str) -> Callable[[Tensor], Tensor]:
    """φ' for ``name``."""
    return ACTIVATIONS[check_activation(name)][1]


def module_activation(module: nn.Module) -> str | None:
    """The activation name of ``module``, or None if it is not a supported activation."""
    if type(module) is nn.GELU and getattr(module, "approximate", "none") != "none":
        return None
    return MODULE_NAMES.get(type(module))
