"""The MLP structure pcfast trains, read off an ``nn.Sequential``, and input validation.

An MLP is ``Linear, act, Linear, act, …, Linear``: L linear layers, an activation after every hidden
one (two adjacent Linears mean the identity), and a linear readout. ``parse_mlp`` turns a module into
its linear layers and activation names, raising ``TypeError`` for anything else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from .activations import MODULE_NAMES, module_activation

LOSSES = ("mse", "ce")
SCHEDULES = ("jacobi", "sequential")


@dataclass(frozen=True)
class MLP:
    """The linear layers of a model and the activation after each hidden one."""

    linears: tuple[nn.Linear, ...]
    activations: tuple[str, ...]

    @property
    def depth(self) -> int:
        return len(self.linears)

    @property
    def widths(self) -> tuple[int, ...]:
        """(d_0, d_1, …, d_L)."""
        return (self.linears[0].in_features, *(lin.out_features for lin in self.linears))

    def weights(self) -> list[Tensor]:
        return [lin.weight for lin in self.linears]

    def biases(self) -> list[Tensor | None]:
        return [lin.bias for lin in self.linears]


def _supported() -> str:
    names = ", ".join(sorted(t.__name__ for t in MODULE_NAMES))
    return f"nn.Linear and the activations {names} (GELU with approximate='none')"


def parse_mlp(model: nn.Module) -> MLP:
    """Read the layers and activations of ``model`` (an ``nn.Sequential`` or a single ``nn.Linear``)."""
    if isinstance(model, nn.Linear):
        return MLP((model,), ())
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"model: expected an nn.Sequential of {_supported()}, got {type(model).__name__}"
        )
    linears: list[nn.Linear] = []
    activations: list[str] = []
    pending: str | None = None  # activation seen since the last Linear
    for index, module in enumerate(model):
        if isinstance(module, nn.Linear) and type(module) is nn.Linear:
            if linears:
                activations.append(pending or "identity")
                if module.in_features != linears[-1].out_features:
                    raise ValueError(
                        f"model[{index}]: Linear expects {module.in_features} inputs but the "
                        f"previous Linear gives {linears[-1].out_features}"
                    )
            elif pending not in (None, "identity"):
                raise TypeError(
                    f"model[{index - 1}]: an activation before the first Linear is not supported; "
                    "pcfast feeds the input x to the first layer unchanged"
                )
            linears.append(module)
            pending = None
            continue
        name = module_activation(module)
        if name is None:
            raise TypeError(
                f"model[{index}]: unsupported module {module!r}; pcfast supports {_supported()}"
            )
        if name == "identity":
            continue
        if pending is not None:
            raise TypeError(
                f"model[{index}]: two activations in a row ({pending}, {name}) are not supported"
            )
        pending = name
    if not linears:
        raise TypeError(f"model: contains no nn.Linear; pcfast supports {_supported()}")
    if pending is not None:
        raise TypeError(
            f"model: ends with an activation ({pending}); pcfast expects a linear readout — "
            "remove the last activation (use loss='ce' for classification)"
        )
    return MLP(tuple(linears), tuple(activations))


# --------------------------------------------------------------------------------------------------
# Input validation shared by the functional API and the optimizers.


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_params(weights: Sequence[Tensor], biases: Sequence[Tensor | None], activations: Sequence[str]) -> None:
    """Check that weights, biases and activations describe one MLP."""
    if len(weights) == 0:
        raise ValueError("weights: expected at least one layer, got none")
    if len(biases) != len(weights):
        raise ValueError(f"biases: expected {len(weights)} entries (None for no bias), got {len(biases)}")
    if len(activations) != len(weights) - 1:
        raise ValueError(
            f"activations: expected {len(weights) - 1} (one per hidden layer), got {len(activations)}"
        )
    ref = weights[0]
    if not ref.is_floating_point():
        raise TypeError(f"weights[0]: expected a floating-point tensor, got {ref.dtype}")
    for l, w in enumerate(weights):
        if w.dim() != 2:
            raise ValueError(f"weights[{l}]: expected a 2-D (out, in) matrix, got {_describe(w)}")
        if w.dtype != ref.dtype or w.device != ref.device:
            raise TypeError(f"weights[{l}]: expected dtype {ref.dtype} on {ref.device}, got {_describe(w)}")
        if l > 0 and w.shape[1] != weights[l - 1].shape[0]:
            raise ValueError(
                f"weights[{l}]: expected {weights[l - 1].shape[0]} input features to match "
                f"weights[{l - 1}], got {_describe(w)}"
            )
        b = biases[l]
        if b is not None and (b.shape != (w.shape[0],) or b.dtype != w.dtype or b.device != w.device):
            raise ValueError(
                f"biases[{l}]: expected shape ({w.shape[0]},), dtype {w.dtype} on {w.device}, got {_describe(b)}"
            )


def check_batch(
    x: Tensor,
    target: Tensor,
    weights: Sequence[Tensor],
    loss: str,
    *,
    check_finite: bool = True,
) -> Tensor:
    """Validate a batch against the network; return the target as the loss expects it.

    For ``loss="mse"`` the target may be a float (B, C) tensor or int64 class labels (B,), which are
    one-hot encoded. For ``loss="ce"`` it must be int64 class labels (B,).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    w0, wl = weights[0], weights[-1]
    d0, classes = w0.shape[1], wl.shape[0]
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"y: expected a torch.Tensor, got {type(target).__name__}")
    if x.dim() != 2 or x.shape[1] != d0 or x.shape[0] == 0:
        raise ValueError(f"x: expected shape (batch >= 1, {d0}), got {_describe(x)}")
    if x.dtype != w0.dtype:
        raise TypeError(f"x: expected dtype {w0.dtype} (the model's), got {x.dtype}")
    if x.device != w0.device:
        raise ValueError(f"x: expected device {w0.device} (the model's), got {x.device}")
    if target.device != w0.device:
        raise ValueError(f"y: expected device {w0.device} (the model's), got {target.device}")
    batch = x.shape[0]
    if target.is_floating_point():
        if loss == "ce":
            raise TypeError(f"y: loss='ce' expects int64 class labels of shape ({batch},), got {_describe(target)}")
        if target.shape != (batch, classes):
            raise ValueError(f"y: expected shape ({batch}, {classes}), got {_describe(target)}")
        if target.dtype != w0.dtype:
            raise TypeError(f"y: expected dtype {w0.dtype} (the model's), got {target.dtype}")
        if check_finite and not _all_finite(target):
            raise ValueError("y: contains NaN or infinite values")
    else:
        if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"y: expected int64 class labels or float targets, got dtype {target.dtype}")
        if target.shape != (batch,):
            raise ValueError(f"y: expected class labels of shape ({batch},), got {_describe(target)}")
        lo, hi = (int(v) for v in torch.aminmax(target))
        if lo < 0 or hi >= classes:
            raise ValueError(f"y: class labels must lie in [0, {classes - 1}], got values in [{lo}, {hi}]")
        target = target.long()
        if loss == "mse":
            target = torch.nn.functional.one_hot(target, classes).to(w0.dtype)
    if check_finite and not _all_finite(x):
        raise ValueError("x: contains NaN or infinite values")
    return target


def _all_finite(t: Tensor) -> bool:
    """Whether every element is finite: one summing pass (NaN and ±inf propagate into the sum),
    confirmed element-wise only when the sum is not finite (it can also overflow)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def resolve_precisions(precisions: Sequence[float] | float | None, depth: int) -> list[float]:
    """Per-layer precisions ``[γ_1 … γ_L]``: None means all ones, a number sets γ_L alone."""
    if precisions is None:
        return [1.0] * depth
    if isinstance(precisions, (int, float)):
        values = [1.0] * (depth - 1) + [float(precisions)]
    else:
        values = [float(p) for p in precisions]
    if len(values) != depth:
        raise ValueError(f"precisions: expected {depth} values (γ_1 … γ_L), got {len(values)}")
    for l, value in enumerate(values):
        if not (value > 0 and value < float("inf")):
            raise ValueError(f"precisions[{l}]: expected a finite positive number, got {value}")
    return values
