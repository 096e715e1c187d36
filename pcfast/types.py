"""Small value types that travel together through pcfast's layers: a network, its feedback maps, and
the settings of a PC or TP/DTP step.

Each is a frozen dataclass that checks itself once, when it is made (with the checks of
``pcfast.network`` and ``pcfast.activations``), so the backends that receive one (``pcfast.ops``)
need not check it again. Sequences are stored as tuples.
"""
from __future__ import annotations

import inspect
from dataclasses import MISSING, dataclass, fields
from typing import Any, Callable, Sequence

from torch import Tensor

from .activations import check_activation
from .network import (
    LOSSES, ConvGeometry, check_int, check_number, check_params, check_pc_options, check_tp_options,
    resolve_precisions,
)

# Layer kinds a Net can hold: dense layers, and 2-D convolutions (with their ConvGeometry).
LAYER_KINDS = ("linear", "conv")


def _check_loss(loss) -> None:
    if not isinstance(loss, str) or loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")


@dataclass(frozen=True)
class Net:
    """A feedforward network: ``weights[l]`` and ``biases[l]`` (or None) of layer l+1, the activation
    after every hidden layer (L − 1 names for L layers), and each layer's ``geometry``: None for a
    linear layer (weight (out, in)), a ``ConvGeometry`` for a conv layer (weight (C_out, C_in, k_h,
    k_w), bias (C_out,); its stride, padding, dilation and the pooling after its activation). Conv
    layers come first; the first linear layer flattens the image; the readout is linear. ``kinds``
    follows from the geometry (``"conv"`` or ``"linear"`` per layer); empty geometry: every layer linear."""

    weights: tuple[Tensor, ...]
    biases: tuple[Tensor | None, ...]
    activations: tuple[str, ...]
    kinds: tuple[str, ...] = ()
    geometry: tuple[ConvGeometry | None, ...] = ()

    def __post_init__(self) -> None:
        check_params(self.weights, self.biases, self.activations, tuple(self.geometry) or None)
        geometry = tuple(self.geometry) or (None,) * len(self.weights)
        for l, act in enumerate(self.activations):
            check_activation(act, f"activations[{l}]")
        object.__setattr__(self, "weights", tuple(self.weights))
        object.__setattr__(self, "biases", tuple(self.biases))
        object.__setattr__(self, "activations", tuple(self.activations))
        implied = tuple("linear" if g is None else "conv" for g in geometry)
        kinds = tuple(self.kinds) or implied
        if len(kinds) != len(self.weights):
            raise ValueError(f"kinds: expected {len(self.weights)} entries, one per layer, got {len(kinds)}")
        for l, kind in enumerate(kinds):
            if kind not in LAYER_KINDS:
                raise ValueError(f"kinds[{l}]: expected one of {LAYER_KINDS}, got {kind!r}")
            if kind != implied[l]:
                raise ValueError(f"kinds[{l}]: {kind!r} disagrees with geometry[{l}] ({implied[l]!r} layer)")
        object.__setattr__(self, "kinds", kinds)
        object.__setattr__(self, "geometry", geometry if any(g is not None for g in geometry) else ())

    @property
    def depth(self) -> int:
        """L, the number of layers."""
        return len(self.weights)

    @property
    def is_conv(self) -> bool:
        """Whether the network has conv layers (then only the reference and torch backends run it)."""
        return bool(self.geometry)

    def layers(self) -> list:
        """The network as ``pcfast.reference.conv`` layers (``ConvLayer``/``LinearLayer``, each with
        its activation; the readout's is the identity), the conv backends' form; made once per Net
        (an optimizer's Net lives as long as the optimizer, its step reads them every time)."""
        cached = self.__dict__.get("_layers")
        if cached is None:
            from .reference.conv import ConvLayer, LinearLayer

            acts = (*self.activations, "identity")
            geometry = self.geometry or (None,) * self.depth
            cached = [LinearLayer(w, b, act) if g is None else
                      ConvLayer(w, b, g.stride, g.padding, g.dilation, act, g.pool)
                      for w, b, act, g in zip(self.weights, self.biases, acts, geometry)]
            self.__dict__["_layers"] = cached  # (a frozen dataclass: set past __setattr__)
        return list(cached)

    def check_input(self, x: Tensor) -> None:
        """``ValueError`` unless a conv net's layers fit images of ``x``'s size (its shape, dtype and
        device are checked with the batch); nothing for an MLP."""
        if self.is_conv:
            from .reference.conv import check_conv_net

            check_conv_net(self.layers(), x)


@dataclass(frozen=True)
class Feedback:
    """The feedback maps ``g_l(v) = ψ_l(v Q_lᵀ + c_l)`` of layers l = 2 … L: ``weights[k]`` is Q_{k+2}
    with shape (d_{k+1}, d_{k+2}) — for a conv layer a transposed convolution with W_{k+2}'s shape
    (C_out, C_in, k_h, k_w) — ``biases[k]`` is c_{k+2} (layer k+2's input units) or None,
    ``activations[k]`` is ψ_{k+2}."""

    weights: tuple[Tensor, ...]
    biases: tuple[Tensor | None, ...]
    activations: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.weights) != len(self.biases) or len(self.weights) != len(self.activations):
            raise ValueError(f"feedback: expected as many weights, biases and activations, got "
                             f"{len(self.weights)}, {len(self.biases)} and {len(self.activations)}")
        for k, act in enumerate(self.activations):
            if not isinstance(act, str):
                raise TypeError(f"feedback_activations[{k}]: expected an activation name (str), got "
                                f"{type(act).__name__}")
            check_activation(act, f"feedback_activations[{k}]")
        object.__setattr__(self, "weights", tuple(self.weights))
        object.__setattr__(self, "biases", tuple(self.biases))
        object.__setattr__(self, "activations", tuple(self.activations))


@dataclass(frozen=True)
class PCConfig:
    """The settings of one PC train step (DESIGN §3): ``precisions`` [γ_1 … γ_L], ``inference_steps``
    T, ``inference_lr`` κ, the ``schedule`` (``"jacobi"`` or ``"sequential"``), ``fpa``, the ``loss``
    (``"mse"`` or ``"ce"``), whether to return the latents after every step, ``inference_tol`` (stop
    the relaxation early: DESIGN §3, "Adaptive stopping"; None runs all T steps) and whether to
    return the step's trace (``PCTrace``: energy per layer and activity-gradient norms per step) and
    ``check_divergence`` (also return F before the last step, ``PCResult.energy_prev``, for the
    optimizers' divergence guard)."""

    precisions: tuple[float, ...]
    inference_steps: int = 20
    inference_lr: float = 0.1
    schedule: str = "jacobi"
    fpa: bool = False
    loss: str = "mse"
    return_trajectory: bool = False
    inference_tol: float | None = None
    return_trace: bool = False
    check_divergence: bool = False

    def __post_init__(self) -> None:
        check_pc_options(inference_steps=self.inference_steps, inference_lr=self.inference_lr,
                         schedule=self.schedule, fpa=self.fpa, return_trajectory=self.return_trajectory,
                         inference_tol=self.inference_tol, return_trace=self.return_trace,
                         check_divergence=self.check_divergence)
        if self.inference_tol is not None:
            object.__setattr__(self, "inference_tol", float(self.inference_tol))
        _check_loss(self.loss)
        if not isinstance(self.precisions, (list, tuple)):
            raise TypeError(f"precisions: expected a list or tuple of numbers, got {type(self.precisions).__name__}")
        object.__setattr__(self, "precisions", tuple(resolve_precisions(list(self.precisions), len(self.precisions))))
        object.__setattr__(self, "inference_lr", float(self.inference_lr))

    @classmethod
    def of(cls, depth: int, precisions: Sequence[float] | float | None = None, **settings) -> PCConfig:
        """The config of a ``depth``-layer net, with ``precisions`` as ``pcfast.functional`` takes them
        (None: all ones; a number: γ_L alone)."""
        return cls(tuple(resolve_precisions(precisions, depth)), **settings)


@dataclass(frozen=True)
class TPConfig:
    """The settings of one TP/DTP train step (DESIGN §4): the output nudge ``beta``, the ``loss``, and
    ``difference`` (DTP's difference correction, else plain TP)."""

    beta: float = 0.1
    loss: str = "mse"
    difference: bool = True

    def __post_init__(self) -> None:
        check_tp_options(beta=self.beta, difference=self.difference)
        _check_loss(self.loss)
        object.__setattr__(self, "beta", float(self.beta))



@dataclass(frozen=True)
class SeededNoise:
    """Feedback-training noise drawn from a seed: ξ_l ~ N(0, ``noise_std``²), from ``noise_seed``
    (None: no seeded noise)."""

    noise_seed: int | None = None
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_std", check_number("noise_std", self.noise_std, allow_zero=True))
        if self.noise_seed is not None:
            check_int("noise_seed", self.noise_seed)
            if self.noise_seed >= 2**63:
                raise ValueError(f"noise_seed: expected an int in [0, 2**63), got {self.noise_seed!r}")

def config_of(kind: type, settings: dict[str, Any], *, depth: int, where: str) -> PCConfig | TPConfig | SeededNoise:
    """The ``kind`` config of a call's keyword settings (``PCConfig`` takes ``precisions`` as
    ``pcfast.functional`` does: None, a number for γ_L, or one per layer); unknown names are a
    ``TypeError`` naming them and the settings there are."""
    names = [f.name for f in fields(kind)]
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise TypeError(f"{where}: unexpected keyword arguments {unknown}; its settings are {names}")
    if kind is PCConfig:
        settings = dict(settings)
        return PCConfig.of(depth, settings.pop("precisions", None), **settings)
    return kind(**settings)  # TPConfig, SeededNoise


def takes_settings(kind: type, *positional: str | tuple[str, Any], **keywords: Any) -> Callable[[Callable], Callable]:
    """Give a function of ``positional`` arguments (a name, or (name, default)), ``keywords`` and
    ``**settings`` of ``kind`` the signature it accepts — every setting of ``kind`` as a keyword with
    its default — for ``help`` and ``inspect.signature``."""
    def decorate(function: Callable) -> Callable:
        params = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) if isinstance(name, str) else
                  inspect.Parameter(name[0], inspect.Parameter.POSITIONAL_OR_KEYWORD, default=name[1])
                  for name in positional]
        for f in fields(kind):
            default = None if f.default is MISSING else f.default  # PCConfig.precisions: None = all ones
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default))
        params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in keywords.items()]
        function.__signature__ = inspect.Signature(params, return_annotation=inspect.signature(function).return_annotation)
        return function
    return decorate
