"""The network structure pcfast trains, read off a user's model; the losses; and input validation.

An MLP is ``Linear, act, Linear, act, …, Linear``: L linear layers, an activation after every hidden
one (two adjacent Linears mean the identity), and a linear readout. A conv net puts ``Conv2d`` layers
first, each followed by its activation and optionally a pooling (``MaxPool2d``/``AvgPool2d``), then an
``nn.Flatten()`` and linear layers up to the readout (``ConvGeometry`` records a conv layer's stride,
padding, dilation and pooling). ``parse_mlp`` reads that chain
from an ``nn.Sequential`` (nested ones included), from a module whose ``forward`` runs such a chain,
or from inside a ``torch.compile`` wrapper, raising ``TypeError`` for anything else; ``resolve_loss``
turns a loss name or ``nn.CrossEntropyLoss()`` into pcfast's loss name.
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor, nn

from .activations import MODULE_NAMES, module_activation

LOSSES = ("mse", "ce")
SCHEDULES = ("jacobi", "sequential")


def resolve_loss(loss: str | nn.Module) -> str:
    """pcfast's name for ``loss``: ``"mse"``, ``"ce"``, or ``"ce"`` for an ``nn.CrossEntropyLoss()``.

    pcfast's losses, per sample and averaged over the batch: ``"mse"`` is ``½‖y − f‖²`` (the paper's
    convention; its scale also sets PC's output error against the hidden errors) and ``"ce"`` is
    the cross-entropy of the logits f — exactly ``nn.CrossEntropyLoss()`` with its defaults, which is
    therefore accepted. Any other setting of it, and ``nn.MSELoss`` (whose mean over B·C elements of
    ``(y − f)²`` has 2/C times pcfast's gradient), would train a different loss than the object states,
    so they raise ``ValueError`` saying what to pass instead; other objects raise ``TypeError``.
    """
    if isinstance(loss, str):
        if loss in LOSSES:
            return loss
        raise ValueError(f"loss: expected one of {LOSSES} or nn.CrossEntropyLoss(), got {loss!r}")
    if type(loss) is nn.CrossEntropyLoss:
        differences = []
        if loss.reduction != "mean":
            differences.append(f"reduction={loss.reduction!r} (pcfast averages over the batch)")
        if loss.weight is not None:
            differences.append("class weights (pcfast weighs every class alike)")
        if loss.label_smoothing != 0:
            differences.append(f"label_smoothing={loss.label_smoothing} (pcfast uses the labels as given)")
        if loss.ignore_index >= 0:  # negative labels are refused anyway, so a negative index never applies
            differences.append(f"ignore_index={loss.ignore_index} (pcfast trains on every sample)")
        if differences:
            raise ValueError(
                f"loss: nn.CrossEntropyLoss with {', '.join(differences)} is not pcfast's 'ce', the batch "
                "mean of the per-sample cross-entropy; pass loss='ce' (equal to nn.CrossEntropyLoss() with "
                "its defaults)"
            )
        return "ce"
    if type(loss) is nn.MSELoss:
        per = {"mean": "(1/(B·C)) Σ (y − f)², whose gradient is 2/C times",
               "sum": "Σ (y − f)² over the batch, whose gradient is 2B times"}.get(loss.reduction)
        scale = f"is {per} pcfast's" if per else "is not"
        raise ValueError(
            f"loss: nn.MSELoss(reduction={loss.reduction!r}) {scale}: pcfast's 'mse' is ½‖y − f‖² per sample "
            "averaged over the batch (the paper's convention, which also sets the scale of PC's output "
            "error against its hidden errors), so this object would train a different loss than it states. "
            "Pass loss='mse' (for the BP step of nn.MSELoss(reduction='mean') at learning rate η, use "
            "lr = 2η/C with C outputs)"
        )
    raise TypeError(
        f"loss: expected one of {LOSSES} or nn.CrossEntropyLoss(), got {type(loss).__name__}; "
        "pcfast's local rules are derived for these two losses"
    )


Pool = tuple[str, int, int]  # ("max" | "avg", kernel, stride)


@dataclass(frozen=True)
class ConvGeometry:
    """What a conv layer applies besides its weight and bias: ``conv2d``'s ``stride``, ``padding`` and
    ``dilation`` (the same along both axes; groups = 1), and the ``pool`` after its activation, None
    or ``("max" | "avg", kernel, stride)``."""

    stride: int = 1
    padding: int = 0
    dilation: int = 1
    pool: Pool | None = None


@dataclass(frozen=True)
class MLP:
    """The parametrised layers of a model (``nn.Linear``, and ``nn.Conv2d`` first in a conv net), the
    activation after each hidden one and, per layer, its ``ConvGeometry`` (None for a linear layer;
    empty: every layer is linear)."""

    linears: tuple[nn.Module, ...]
    activations: tuple[str, ...]
    geometry: tuple[ConvGeometry | None, ...] = ()

    @property
    def layers(self) -> tuple[nn.Module, ...]:
        """The parametrised layers, in order (``linears``, whose name predates conv layers)."""
        return self.linears

    @property
    def depth(self) -> int:
        return len(self.linears)

    @property
    def is_conv(self) -> bool:
        return any(g is not None for g in self.geometry)

    @property
    def widths(self) -> tuple[int, ...]:
        """(d_0, d_1, …, d_L): features of a linear layer, channels of a conv layer."""
        return (fan_in_units(self.linears[0]), *(fan_out_units(layer) for layer in self.linears))

    def weights(self) -> list[Tensor]:
        return [lin.weight for lin in self.linears]

    def biases(self) -> list[Tensor | None]:
        return [lin.bias for lin in self.linears]


def fan_in_units(layer: nn.Module) -> int:
    """Input units of a layer: ``in_features``, or a conv layer's input channels."""
    return layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features


def fan_out_units(layer: nn.Module) -> int:
    """Output units of a layer: ``out_features``, or a conv layer's output channels (its width)."""
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def fan_in(layer: nn.Module) -> int:
    """The fan-in of one output unit: ``in_features``, or ``C_in · k_h · k_w`` for a convolution."""
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    return layer.in_features


def _supported() -> str:
    names = ", ".join(sorted(t.__name__ for t in MODULE_NAMES))
    return (
        f"nn.Linear and the activations {names} (GELU with approximate='none'), plus nn.Dropout and "
        "nn.Flatten(); before the Linears, nn.Conv2d (groups=1), each followed by its activation and "
        "optionally nn.MaxPool2d/nn.AvgPool2d (no padding), then nn.Flatten(); in an nn.Sequential or a "
        "module whose forward runs them in order"
    )


_TO_DO = "replace it with a supported layer, or train this model with a torch.optim optimizer"

# Normalisation layers: the local rules are written for Linear layers followed by element-wise
# activations (DESIGN §3-4); a normaliser couples the units of a layer (BatchNorm also the samples of
# a batch), and PC's energy and TP's targets have no term for it.
_NORMALISATION: tuple[type, ...] = tuple(
    t for t in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None), nn.LocalResponseNorm,
                nn.modules.batchnorm._NormBase)  # _NormBase: BatchNorm*d, SyncBatchNorm, InstanceNorm*d
    if t is not None
)

_PROBE_BATCH = 4


def _compiled_inner(module: nn.Module) -> nn.Module | None:
    """The module a ``torch.compile`` wrapper holds, or None. Reading it compiles nothing.

    ``torch._dynamo`` is looked up, not imported: a wrapper exists only once torch.compile loaded it.
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    wrapper = getattr(eval_frame, "OptimizedModule", None)
    if wrapper is not None and isinstance(module, wrapper):
        return module._orig_mod
    return None


_LEAVES = (nn.Linear, nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout, nn.Flatten)
_POOLS = {nn.MaxPool2d: "max", nn.AvgPool2d: "avg"}


def _is_leaf_layer(module: nn.Module) -> bool:
    """A module the chain may contain as it is: a Linear, a Conv2d, a pooling, a supported activation,
    Dropout or Flatten."""
    return type(module) in _LEAVES or module_activation(module) is not None


def _collect(module: nn.Module, name: str, chain: list[tuple[str, nn.Module]], unread: list[str]) -> None:
    """Append ``(name, layer)`` for each layer of the chain ``module`` computes, in order.

    A plain ``nn.Sequential``'s forward is known; any other container (a module with its own
    ``forward``, a Sequential subclass overriding it, a ModuleList) contributes its children in the
    order they were registered, and its name goes to ``unread`` — ``parse_mlp`` then checks with a
    probe that the model's forward really is that chain. So do modules with forward hooks.
    """
    inner = _compiled_inner(module)
    if inner is not None:
        _collect(inner, f"{name}._orig_mod", chain, unread)
        return
    if module._forward_hooks or module._forward_pre_hooks:
        unread.append(f"the forward hooks of {name}")
    if _is_leaf_layer(module):
        chain.append((name, module))
        return
    if isinstance(module, (nn.Linear, nn.Conv2d)):  # a subclass: parametrized (weight_norm), LoRA, …
        base = "nn.Linear" if isinstance(module, nn.Linear) else "nn.Conv2d"
        raise TypeError(
            f"{name}: {type(module).__name__} is a subclass of {base} (a parametrization such as "
            "weight_norm, or another layer whose forward pcfast cannot read); pcfast trains plain nn.Linear "
            f"and nn.Conv2d layers in place — use {base} (torch.nn.utils.parametrize.remove_parametrizations removes "
            "a parametrization), or train this model with a torch.optim optimizer"
        )
    if isinstance(module, _NORMALISATION):
        raise TypeError(
            f"{name}: {type(module).__name__} is not supported: PC's energy and TP's targets are defined "
            "for Linear layers followed by element-wise activations, and a normalisation layer couples "
            "the units of a layer (BatchNorm also the samples of a batch), which those local rules have "
            "no term for. Remove it (pcfast.parametrize's μP initialisation keeps the activations at "
            "scale), or train this model with a torch.optim optimizer"
        )
    children = [(key, child) for key, child in module._modules.items() if child is not None]  # repeats kept
    if not children:
        raise TypeError(f"{name}: unsupported module {module!r}; pcfast supports {_supported()} — {_TO_DO}")
    known = isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
    if not known:
        own = [key for key, value in module._parameters.items() if value is not None]
        if own:
            raise TypeError(
                f"{name}: {type(module).__name__} has parameters of its own ({', '.join(own)}) besides its "
                "submodules; pcfast trains only the nn.Linear layers of a chain — move the computation into "
                "supported layers, or train this model with a torch.optim optimizer"
            )
        unread.append(f"the forward of {name}")
    indexed = isinstance(module, (nn.Sequential, nn.ModuleList))
    for key, child in children:
        _collect(child, f"{name}[{key}]" if indexed else f"{name}.{key}", chain, unread)


def _probe_shape(parsed: MLP) -> tuple[int, ...]:
    """A sample's shape for the probe: (d_0,) for an MLP; for a conv net the smallest square image
    (C, s, s) whose flattened features after the conv layers fit the first linear layer."""
    first = parsed.linears[0]
    if not parsed.is_conv:
        return (first.in_features,)
    size = lambda n, k, s, p, d: (n + 2 * p - d * (k - 1) - 1) // s + 1
    conv_layers = [(lin, g) for lin, g in zip(parsed.linears, parsed.geometry) if g is not None]
    features = parsed.linears[len(conv_layers)].in_features
    for side in range(1, 1025):
        h = w = side
        for conv, g in conv_layers:
            h, w = (size(h, conv.kernel_size[0], g.stride, g.padding, g.dilation),
                    size(w, conv.kernel_size[1], g.stride, g.padding, g.dilation))
            if g.pool is not None and min(h, w) >= g.pool[1]:
                h, w = size(h, g.pool[1], g.pool[2], 0, 1), size(w, g.pool[1], g.pool[2], 0, 1)
            elif g.pool is not None:
                h = 0
            if min(h, w) < 1:
                break
        if min(h, w) >= 1 and conv_layers[-1][0].out_channels * h * w == features:
            return (first.in_channels, side, side)
    raise TypeError(f"model: no square image fits its first nn.Linear ({features} inputs) after its conv layers, "
                    "so pcfast cannot probe its forward; use an nn.Sequential")


def _check_forward(model: nn.Module, chain: list[tuple[str, nn.Module]], unread: list[str], parsed: MLP) -> None:
    """Raise ``TypeError`` unless ``model(x)`` equals the chain on a small random batch.

    The probe runs in eval mode (Dropout off, restored afterwards) without gradients, on inputs from
    a private generator (the global random state is untouched). A faithful forward calls the same
    layers and matches bitwise; the dtype's tolerance (``pcfast.testing``) only admits rewrites of the
    same function that round differently (``x @ W.T + b`` for ``fc(x)``), while a different function
    differs by the size of the outputs.
    """
    from .testing import TOLERANCES, tolerance

    first = parsed.linears[0]
    gen = torch.Generator(device=first.weight.device).manual_seed(0)
    x = torch.randn(_PROBE_BATCH, *_probe_shape(parsed), generator=gen,
                    device=first.weight.device, dtype=first.weight.dtype)
    layers = ", ".join(f"{key} ({type(module).__name__})" for key, module in chain)
    what = (f"model: {type(model).__name__}'s forward must compute exactly the chain pcfast reads from its "
            f"submodules in registration order — {layers} — since pcfast's optimizers train that chain "
            f"(it cannot read {', '.join(unread)}, so it ran the model once to compare)")
    advice = ("Define the model as nn.Sequential(...), or hold one (self.net = nn.Sequential(...)) and "
              "return self.net(x) from forward, with each activation a module (nn.Tanh(), not torch.tanh) "
              "and no forward hook that changes outputs")
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            try:
                out = model(x)
            except Exception as exc:
                raise TypeError(f"{what}; calling it on a probe batch of shape {tuple(x.shape)} raised "
                                f"{type(exc).__name__}: {exc}. {advice}") from exc
            expected = x
            for _, module in chain:
                expected = module.forward(expected)  # .forward: without hooks, which model(x) runs
    finally:
        for module, mode in modes:
            module.training = mode
    if not isinstance(out, Tensor) or out.shape != expected.shape:
        got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise TypeError(f"{what}; on a probe batch it returned {got}, the chain gives shape "
                        f"{tuple(expected.shape)}. {advice}")
    name = str(out.dtype).removeprefix("torch.")
    tol = tolerance(name) if name in TOLERANCES else tolerance("float32")
    if not torch.allclose(out, expected, rtol=tol.rtol, atol=tol.atol, equal_nan=True):
        gap = float((out.double() - expected.double()).abs().max())
        raise TypeError(f"{what}; on a probe batch of {_PROBE_BATCH} random inputs they differ by up to "
                        f"{gap:.3g} (a skip connection, a functional activation or another operation in "
                        f"forward?). {advice}")


def _uncompiled(model: nn.Module) -> nn.Module:
    """``model`` with every ``torch.compile`` wrapper around it taken off."""
    while (inner := _compiled_inner(model)) is not None:
        model = inner
    return model


def _pair(where: str, name: str, value) -> int:
    """One int from a conv or pooling setting given as an int or a pair of equal ints."""
    if isinstance(value, int):
        return value
    if isinstance(value, tuple) and len(value) == 2 and value[0] == value[1] and isinstance(value[0], int):
        return value[0]
    raise TypeError(f"{where}: {name}={value!r} is not supported; pcfast's conv layers take the same {name} along "
                    "both axes (an int)")


def _conv_geometry(where: str, conv: nn.Conv2d) -> ConvGeometry:
    """The stride, padding and dilation of ``conv``; ``TypeError`` for settings pcfast does not train."""
    if conv.groups != 1:
        raise TypeError(f"{where}: nn.Conv2d with groups={conv.groups} is not supported (only groups=1): the "
                        "feedback and top-down maps are written for dense convolutions")
    if conv.padding_mode != "zeros":
        raise TypeError(f"{where}: padding_mode={conv.padding_mode!r} is not supported (only 'zeros')")
    stride, dilation = _pair(where, "stride", conv.stride), _pair(where, "dilation", conv.dilation)
    padding = conv.padding
    if padding == "valid":
        padding = 0
    elif padding == "same":  # stride 1 (nn.Conv2d's rule); symmetric when dilation·(k − 1) is even
        spans = {dilation * (k - 1) for k in conv.kernel_size}
        if len(spans) != 1 or next(iter(spans)) % 2:
            raise TypeError(f"{where}: padding='same' with kernel {conv.kernel_size} pads unevenly; pcfast takes "
                            "symmetric padding — pass an int padding")
        padding = next(iter(spans)) // 2
    return ConvGeometry(stride, _pair(where, "padding", padding), dilation)


def _pool(where: str, module: nn.Module) -> Pool:
    """``("max" | "avg", kernel, stride)`` of a pooling module; ``TypeError`` for other settings."""
    kernel = _pair(where, "kernel_size", module.kernel_size)
    stride = kernel if module.stride is None else _pair(where, "stride", module.stride)
    plain = _pair(where, "padding", module.padding) == 0 and not module.ceil_mode
    if type(module) is nn.MaxPool2d:
        plain = plain and _pair(where, "dilation", module.dilation) == 1 and not module.return_indices
    else:
        plain = plain and module.divisor_override is None
    if not plain:
        raise TypeError(f"{where}: {module!r} is not supported; pcfast pools without padding, dilation, "
                        "ceil_mode, return_indices or divisor_override (kernel_size and stride only)")
    return (_POOLS[type(module)], kernel, stride)


class _ChainReader:
    """Reads a chain ``_collect`` gathered into layers, activations and conv geometry: ``Conv2d, act,
    [pool], …, Flatten, Linear, act, …, Linear``. Raises for a chain that is not of that form."""

    def __init__(self) -> None:
        self.layers: list[nn.Module] = []
        self.activations: list[str] = []
        self.geometry: list[ConvGeometry | None] = []
        self.dropouts: list[str] = []
        self.pending: tuple[str, str] | None = None  # (where, name) of the activation since the last layer
        self.pool: tuple[str, Pool] | None = None  # (where, pool) since the last layer
        self.flattened = False  # an nn.Flatten() since the last conv layer

    def read(self, chain: list[tuple[str, nn.Module]]) -> MLP:
        for where, module in chain:
            kind = type(module)
            if kind in (nn.Linear, nn.Conv2d):
                self.layer(where, module)
            elif kind in _POOLS:
                self.pooling(where, module)
            elif kind is nn.Flatten and self.geometry and self.geometry[-1] is not None:
                _is_pass_through(where, module, self.dropouts)  # checks its settings
                self.flattened = True
            elif not _is_pass_through(where, module, self.dropouts):
                self.activation(where, module_activation(module))
        return self.finish()

    def layer(self, where: str, module: nn.Module) -> None:
        _check_linear(where, module, self.layers)
        conv = type(module) is nn.Conv2d
        previous = self.layers[-1] if self.layers else None
        after_conv = previous is not None and self.geometry[-1] is not None
        if conv and previous is not None and not after_conv:
            raise TypeError(f"{where}: an nn.Conv2d after an nn.Linear is not supported; pcfast's conv nets put "
                            "every Conv2d before the flatten and the linear layers")
        if after_conv and not conv and not self.flattened:
            raise TypeError(f"{where}: an nn.Linear right after conv layers needs an nn.Flatten() before it "
                            "(nn.Linear alone would act on the last axis of the image)")
        if previous is None:
            if self.pending is not None:
                raise TypeError(f"{self.pending[0]}: an activation before the first {type(module).__name__} is not "
                                "supported; pcfast feeds the input x to the first layer unchanged — apply it to x "
                                "before the step")
        else:
            self.activations.append(self.pending[1] if self.pending else "identity")
            if after_conv and self.pool is not None:
                self.geometry[-1] = replace(self.geometry[-1], pool=self.pool[1])
            if conv and module.in_channels != previous.out_channels:
                raise ValueError(f"{where}: Conv2d expects {module.in_channels} input channels but the previous "
                                 f"Conv2d gives {previous.out_channels}")
            if not conv and not after_conv:
                _check_fits(where, module, previous)
        self.layers.append(module)
        self.geometry.append(_conv_geometry(where, module) if conv else None)
        self.pending, self.pool, self.flattened = None, None, False

    def pooling(self, where: str, module: nn.Module) -> None:
        if not self.geometry or self.geometry[-1] is None or self.flattened:
            raise TypeError(f"{where}: pooling is supported after a conv layer's activation, before the "
                            "nn.Flatten(); move it there")
        if self.pool is not None:
            raise TypeError(f"{where}: two poolings after one conv layer are not supported; keep one")
        self.pool = (where, _pool(where, module))

    def activation(self, where: str, name: str) -> None:
        if name == "identity":
            return
        if self.pending is not None:
            raise TypeError(f"{where}: two activations in a row ({self.pending[1]}, {name}) are not supported; "
                            "keep one")
        if self.pool is not None:
            raise TypeError(f"{where}: an activation after the pooling ({self.pool[0]}) is not supported; "
                            "pcfast applies a conv layer's activation, then its pooling — put the activation "
                            "first (for max pooling and a non-decreasing activation that is the same function)")
        if self.flattened:
            raise TypeError(f"{where}: an activation after the nn.Flatten() is not supported; put it before")
        self.pending = (where, name)

    def finish(self) -> MLP:
        if not self.layers:
            raise TypeError(f"model: contains no nn.Linear; pcfast supports {_supported()}")
        if self.geometry[-1] is not None:
            raise TypeError("model: ends with an nn.Conv2d; pcfast's conv nets end with nn.Flatten() and a "
                            "linear readout (an nn.Linear)")
        if self.pending is not None:
            raise TypeError(
                f"{self.pending[0]}: the model ends with an activation ({self.pending[1]}); pcfast expects a "
                "linear readout — remove the last activation (use loss='ce' for classification)"
            )
        geometry = tuple(self.geometry) if any(g is not None for g in self.geometry) else ()
        return MLP(tuple(self.layers), tuple(self.activations), geometry)


def _check_linear(where: str, module: nn.Module, earlier: list[nn.Module]) -> None:
    """Raise ``TypeError`` unless ``module`` is a layer of its own with plain ``nn.Parameter``s."""
    kind = type(module).__name__
    if any(module is lin for lin in earlier):
        raise TypeError(
            f"{where}: this nn.{kind} appears earlier in the model too (shared weights); pcfast "
            f"trains each layer's own weights — give every layer its own nn.{kind}"
        )
    for key in ("weight", "bias"):
        value = getattr(module, key)
        if value is not None and not isinstance(value, nn.Parameter):
            raise TypeError(
                f"{where}: its {key} is a {type(value).__name__}, not an nn.Parameter (a "
                "reparametrisation such as weight_norm?); pcfast updates plain layer parameters "
                "in place — remove the reparametrisation"
            )


def _check_fits(where: str, module: nn.Linear, previous: nn.Linear) -> None:
    """Raise ``ValueError`` unless ``module`` takes what ``previous`` gives."""
    if module.in_features != previous.out_features:
        raise ValueError(
            f"{where}: Linear expects {module.in_features} inputs but the "
            f"previous Linear gives {previous.out_features}"
        )


def _is_pass_through(where: str, module: nn.Module, dropouts: list[str]) -> bool:
    """Whether ``module`` is a Dropout or a Flatten, the identity for pcfast; a Dropout with p > 0 is
    noted in ``dropouts``, a Flatten other than ``nn.Flatten()`` raises ``TypeError``."""
    if type(module) is nn.Dropout:
        if module.p > 0:
            dropouts.append(f"{where} (p={module.p:g})")
        return True
    if type(module) is nn.Flatten:
        if (module.start_dim, module.end_dim) != (1, -1):
            raise TypeError(
                f"{where}: nn.Flatten(start_dim={module.start_dim}, end_dim={module.end_dim}) is not "
                "supported; pcfast takes x of shape (batch, features) and accepts nn.Flatten() with its "
                "defaults (the identity on such x) — flatten x yourself with x.flatten(1)"
            )
        return True
    return False


def parse_mlp(model: nn.Module) -> MLP:
    """Read the layers and activations of ``model``, keeping the user's own ``nn.Linear`` (and
    ``nn.Conv2d``) modules.

    Accepted: a single ``nn.Linear``; an ``nn.Sequential`` (nested ones are flattened) of ``nn.Linear``
    and supported activations ending in a linear readout; a conv net — ``nn.Conv2d`` layers (any
    kernel, stride, padding and dilation, the same along both axes; groups = 1; bias or not), each
    followed by its activation and optionally an ``nn.MaxPool2d`` or ``nn.AvgPool2d`` (kernel and
    stride only), then ``nn.Flatten()`` and linear layers up to the readout; any module whose children, in the order
    they were registered, form such a chain and whose ``forward`` computes exactly that chain (for
    example ``self.net = nn.Sequential(...)`` with ``forward`` returning ``self.net(x)``) — checked by
    running ``model`` once on a probe batch of random inputs, as are modules with forward hooks; and
    a ``torch.compile`` wrapper of any of these (its ``_orig_mod``; nothing is compiled).

    ``nn.Dropout`` is the identity: the local rules train the deterministic network, the one
    ``model.eval()`` computes (a ``UserWarning`` says so when p > 0). ``nn.Flatten()`` is the identity
    on the (batch, features) inputs of an MLP, and flattens a conv net's images before its first
    linear layer. Anything else — normalisation layers, other
    modules, activations at the ends or after a pooling, parameters outside the layers — raises ``TypeError`` saying
    what is supported and what to do.
    """
    top = _uncompiled(model)
    if not isinstance(top, (nn.Sequential, nn.Linear)) and not any(True for _ in top.children()):
        raise TypeError(
            f"model: expected an nn.Sequential of {_supported()}; got {type(top).__name__} — {_TO_DO}"
        )
    chain: list[tuple[str, nn.Module]] = []
    unread: list[str] = []
    _collect(model, "model", chain, unread)
    reader = _ChainReader()
    parsed = reader.read(chain)
    if unread:
        _check_forward(top, chain, unread, parsed)
    if reader.dropouts:
        warnings.warn(
            f"{', '.join(reader.dropouts)}: nn.Dropout is the identity for pcfast's optimizers — the local "
            "rules train the deterministic network that model.eval() computes, while model(x) in "
            "training mode still drops units; remove the Dropout (or set p=0) to silence this warning",
            UserWarning, stacklevel=2,
        )
    return parsed


# --------------------------------------------------------------------------------------------------
# Input validation shared by the functional API and the optimizers.


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_sequence(name: str, value, *, length: int | None = None) -> None:
    """``value`` is a list or tuple (of ``length`` entries when given)."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: expected a list or tuple, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name}: expected {length} entries, got {len(value)}")


def check_tensor(name: str, value, *, optional: bool = False) -> None:
    """``value`` is a dense ``torch.Tensor`` (or None when ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, Tensor):
        expected = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")
    if value.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {value.layout}")


def check_like(name: str, t: Tensor, like: Tensor, shape: tuple[int, ...], what: str = "the model's") -> None:
    """``t`` has ``shape`` and the dtype and device of ``like``."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {_describe(t)}")
    if t.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype} ({what}), got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} ({what}), got {t.device}")


def check_int(name: str, value, *, low: int = 0) -> int:
    """``value`` is an int (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int >= {low}, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` is a bool (``"false"``, 0 or None are not)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return value


def check_number(name: str, value, *, allow_zero: bool = False) -> float:
    """``value`` is a finite int or float (not a bool), > 0 (>= 0 with ``allow_zero``)."""
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a finite number {bound}, got {type(value).__name__} {value!r}")
    value = float(value)
    if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
        raise ValueError(f"{name}: expected a finite number {bound}, got {value}")
    return value


def check_pc_options(*, inference_steps, inference_lr, schedule, fpa, return_trajectory=False, inference_tol=None,
                     return_trace=False, check_divergence=False) -> None:
    """The scalar settings of a PC step, strictly typed — checked by ``pcfast.functional`` and by
    every backend's ``pc_train_step`` (which may be called directly)."""
    check_int("inference_steps", inference_steps)
    check_number("inference_lr", inference_lr)
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    check_bool("fpa", fpa)
    check_bool("return_trajectory", return_trajectory)
    if inference_tol is not None:
        check_number("inference_tol", inference_tol, allow_zero=True)
        if inference_tol >= 1:
            raise ValueError(f"inference_tol: expected a number in [0, 1) (a fraction of the largest step so far), "
                             f"got {inference_tol!r}")
    check_bool("return_trace", return_trace)
    check_bool("check_divergence", check_divergence)


def check_tp_options(*, beta, difference) -> None:
    """The scalar settings of a TP/DTP step (see ``check_pc_options``)."""
    check_number("beta", beta, allow_zero=True)
    check_bool("difference", difference)


def check_params(weights: Sequence[Tensor], biases: Sequence[Tensor | None], activations: Sequence[str],
                 geometry: Sequence[ConvGeometry | None] | None = None) -> None:
    """Check that weights, biases and activations describe one network (types, shapes, dtypes,
    devices): an MLP, or with ``geometry`` (one entry per layer: a ``ConvGeometry`` for a conv layer,
    None for a linear one) a conv net whose conv layers come first."""
    check_sequence("weights", weights)
    check_sequence("biases", biases)
    check_sequence("activations", activations)
    if len(weights) == 0:
        raise ValueError("weights: expected at least one layer, got none")
    if len(biases) != len(weights):
        raise ValueError(
            f"biases: expected {len(weights)} entries, one per layer of weights (None for no bias), got {len(biases)}"
        )
    if len(activations) != len(weights) - 1:
        raise ValueError(
            f"activations: expected {len(weights) - 1} (one per hidden layer), got {len(activations)}; "
            f"weights has {len(weights)} layers"
        )
    geometry = _check_geometry(geometry, len(weights))
    for l, (w, b) in enumerate(zip(weights, biases)):
        check_tensor(f"weights[{l}]", w)
        check_tensor(f"biases[{l}]", b, optional=True)
    ref = weights[0]
    if not ref.is_floating_point():
        raise TypeError(f"weights[0]: expected a floating-point tensor, got {ref.dtype}")
    for l, w in enumerate(weights):
        conv = geometry[l] is not None
        if w.dim() != (4 if conv else 2):
            expected = "a 4-D (C_out, C_in, k_h, k_w) conv weight" if conv else "a 2-D (out, in) matrix"
            raise ValueError(f"weights[{l}]: expected {expected}, got {_describe(w)}")
        if w.dtype != ref.dtype or w.device != ref.device:
            raise TypeError(f"weights[{l}]: expected dtype {ref.dtype} on {ref.device}, got {_describe(w)}")
        after_conv = l > 0 and geometry[l - 1] is not None
        if l > 0 and (conv or not after_conv) and w.shape[1] != weights[l - 1].shape[0]:
            what = "input channels" if conv else "input features"
            raise ValueError(
                f"weights[{l}]: expected {weights[l - 1].shape[0]} {what} to match "
                f"weights[{l - 1}], got {_describe(w)}"
            )
        b = biases[l]
        if b is not None and (b.shape != (w.shape[0],) or b.dtype != w.dtype or b.device != w.device):
            raise ValueError(
                f"biases[{l}]: expected shape ({w.shape[0]},), dtype {w.dtype} on {w.device} (as weights[{l}]), "
                f"got {_describe(b)}"
            )
    for l, act in enumerate(activations):
        if not isinstance(act, str):
            raise TypeError(f"activations[{l}]: expected an activation name (str), got {type(act).__name__} {act!r}")


def _check_geometry(geometry: Sequence[ConvGeometry | None] | None, depth: int) -> list[ConvGeometry | None]:
    """One entry per layer, conv layers (``ConvGeometry``) first, a linear readout; settings that are
    ints in range and a pooling of the form ``("max" | "avg", kernel, stride)``."""
    if geometry is None:
        return [None] * depth
    check_sequence("geometry", geometry, length=depth)
    for l, g in enumerate(geometry):
        if g is None:
            continue
        if not isinstance(g, ConvGeometry):
            raise TypeError(f"geometry[{l}]: expected a ConvGeometry or None, got {type(g).__name__}")
        if l > 0 and geometry[l - 1] is None:
            raise ValueError(f"geometry[{l}]: a conv layer after a linear one; conv layers come first")
        if l == depth - 1:
            raise ValueError(f"geometry[{l}]: the readout must be a linear layer (geometry None)")
        for name, low in (("stride", 1), ("padding", 0), ("dilation", 1)):
            check_int(f"geometry[{l}].{name}", getattr(g, name), low=low)
        pool = g.pool
        if pool is not None and not (isinstance(pool, tuple) and len(pool) == 3 and pool[0] in ("max", "avg")):
            raise ValueError(f"geometry[{l}].pool: expected None or ('max' | 'avg', kernel, stride), got {pool!r}")
        if pool is not None:
            check_int(f"geometry[{l}].pool kernel", pool[1], low=1)
            check_int(f"geometry[{l}].pool stride", pool[2], low=1)
    return list(geometry)


def check_batch(
    x: Tensor,
    target: Tensor,
    weights: Sequence[Tensor],
    loss: str,
    *,
    check_finite: bool = True,
    check_labels: bool = True,
) -> Tensor:
    """Validate a batch against the network; return the target as the loss expects it.

    For ``loss="mse"`` the target may be a float (B, C) tensor or int64 class labels (B,), which are
    one-hot encoded. For ``loss="ce"`` it must be int64 class labels (B,).

    ``check_finite=False`` skips the scans of x and float targets for NaN/inf, and
    ``check_labels=False`` the range check of class labels (both read values on the host): labels
    are then clamped into range, and the caller checks ``labels_out_of_range`` itself.
    """
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    w0, wl = weights[0], weights[-1]
    d0, classes = w0.shape[1], wl.shape[0]
    check_tensor("x", x)
    check_tensor("y", target)
    if w0.dim() == 4:  # a conv net: images (whose size the layers check, ``Net.check_input``)
        if x.dim() != 4 or x.shape[1] != d0 or x.shape[0] == 0:
            raise ValueError(f"x: expected images of shape (batch >= 1, {d0}, height, width), got {_describe(x)}")
    elif x.dim() != 2 or x.shape[1] != d0 or x.shape[0] == 0:
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
            raise ValueError(f"y: expected shape ({batch}, {classes}), got {_describe(target)} "
                             f"(one row per row of x, one column per output of weights[-1])")
        if target.dtype != w0.dtype:
            raise TypeError(f"y: expected dtype {w0.dtype} (the model's), got {target.dtype}")
        if check_finite and not _all_finite(target):
            raise ValueError("y: contains NaN or infinite values")
    else:
        if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"y: expected int64 class labels or float targets, got dtype {target.dtype}")
        if target.shape != (batch,):
            raise ValueError(f"y: expected class labels of shape ({batch},), got {_describe(target)} "
                             f"(one label per row of x)")
        if check_labels:
            lo, hi = (int(v) for v in torch.aminmax(target))
            if lo < 0 or hi >= classes:
                raise ValueError(f"y: class labels must lie in [0, {classes - 1}], got values in [{lo}, {hi}]")
            target = target.long()
            if loss == "mse":
                target = torch.nn.functional.one_hot(target, classes).to(w0.dtype)
        else:
            target = target.long().clamp(0, classes - 1)
            if loss == "mse":
                target = torch.zeros(batch, classes, dtype=w0.dtype, device=w0.device).scatter_(
                    1, target[:, None], 1.0)
    if check_finite and not _all_finite(x):
        raise ValueError("x: contains NaN or infinite values")
    return target


def labels_out_of_range(y: Tensor, classes: int) -> Tensor | None:
    """For class labels ``y``: a 0-d float tensor, 0 when every label lies in [0, classes) and NaN
    otherwise (no host sync; it joins a finiteness check). None for float targets."""
    if y.is_floating_point():
        return None
    bad = torch.logical_or(y < 0, y >= classes).any()
    return torch.where(bad, float("nan"), 0.0)


def _all_finite(t: Tensor) -> bool:
    """Whether every element is finite: one summing pass (NaN and ±inf propagate into the sum),
    confirmed element-wise only when the sum is not finite (it can also overflow)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def resolve_precisions(precisions: Sequence[float] | float | None, depth: int) -> list[float]:
    """Per-layer precisions ``[γ_1 … γ_L]``: None means all ones, a number sets γ_L alone."""
    if precisions is None:
        return [1.0] * depth
    if isinstance(precisions, (int, float)) and not isinstance(precisions, bool):
        values = [1.0] * (depth - 1) + [precisions]
        names = [f"precisions[{l}]" for l in range(depth - 1)] + ["precisions"]
    elif isinstance(precisions, (list, tuple)):
        values = list(precisions)
        names = [f"precisions[{l}]" for l in range(len(values))]
    else:
        raise TypeError(f"precisions: expected None, a number or a list of numbers, got {type(precisions).__name__}")
    if len(values) != depth:
        raise ValueError(f"precisions: expected {depth} values (γ_1 … γ_L), got {len(values)}")
    for name, value in zip(names, values):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: expected a finite positive number, got {type(value).__name__} {value!r}")
        if not (value > 0 and value < float("inf")):
            raise ValueError(f"{name}: expected a finite positive number, got {value}")
    values = [float(value) for value in values]
    return values
