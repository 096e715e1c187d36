"""The MLP structure pcfast trains, read off a user's model; the losses; and input validation.

An MLP is ``Linear, act, Linear, act, …, Linear``: L linear layers, an activation after every hidden
one (two adjacent Linears mean the identity), and a linear readout. ``parse_mlp`` reads that chain
from an ``nn.Sequential`` (nested ones included), from a module whose ``forward`` runs such a chain,
or from inside a ``torch.compile`` wrapper, raising ``TypeError`` for anything else; ``resolve_loss``
turns a loss name or ``nn.CrossEntropyLoss()`` into pcfast's loss name.
"""
from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
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
    return (
        f"nn.Linear and the activations {names} (GELU with approximate='none'), "
        "plus nn.Dropout and nn.Flatten(), in an nn.Sequential or a module whose forward runs them in order"
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


def _is_leaf_layer(module: nn.Module) -> bool:
    """A module the chain may contain as it is: a Linear, a supported activation, Dropout or Flatten."""
    return (type(module) in (nn.Linear, nn.Dropout, nn.Flatten)) or module_activation(module) is not None


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
    if isinstance(module, nn.Linear):  # a subclass: parametrized (weight_norm, spectral_norm), LoRA, …
        raise TypeError(
            f"{name}: {type(module).__name__} is a subclass of nn.Linear (a parametrization such as "
            "weight_norm, or another layer whose forward pcfast cannot read); pcfast trains plain nn.Linear "
            "layers in place — use nn.Linear (torch.nn.utils.parametrize.remove_parametrizations removes "
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


def _check_forward(model: nn.Module, chain: list[tuple[str, nn.Module]], unread: list[str]) -> None:
    """Raise ``TypeError`` unless ``model(x)`` equals the chain on a small random batch.

    The probe runs in eval mode (Dropout off, restored afterwards) without gradients, on inputs from
    a private generator (the global random state is untouched). A faithful forward calls the same
    layers and matches bitwise; the dtype's tolerance (``pcfast.testing``) only admits rewrites of the
    same function that round differently (``x @ W.T + b`` for ``fc(x)``), while a different function
    differs by the size of the outputs.
    """
    from .testing import TOLERANCES, tolerance

    first = next(module for _, module in chain if type(module) is nn.Linear)
    gen = torch.Generator(device=first.weight.device).manual_seed(0)
    x = torch.randn(_PROBE_BATCH, first.in_features, generator=gen,
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


def _read_chain(chain: list[tuple[str, nn.Module]]) -> tuple[list[nn.Linear], list[str], list[str]]:
    """``(linears, activations, dropouts)`` of a chain ``_collect`` gathered: the Linears in order, the
    activation between each pair of them (``"identity"`` where there is none), and where the Dropouts
    with p > 0 are. Raises for a chain that is not ``Linear, act, …, Linear``."""
    linears: list[nn.Linear] = []
    activations: list[str] = []
    dropouts: list[str] = []
    pending: tuple[str, str] | None = None  # (where, name) of the activation seen since the last Linear
    for where, module in chain:
        if type(module) is nn.Linear:
            _check_linear(where, module, linears)
            if linears:
                activations.append(pending[1] if pending else "identity")
                _check_fits(where, module, linears[-1])
            elif pending is not None:
                raise TypeError(
                    f"{pending[0]}: an activation before the first Linear is not supported; "
                    "pcfast feeds the input x to the first layer unchanged — apply it to x before the step"
                )
            linears.append(module)
            pending = None
        elif not _is_pass_through(where, module, dropouts):
            name = module_activation(module)
            if name == "identity":
                continue
            if pending is not None:
                raise TypeError(
                    f"{where}: two activations in a row ({pending[1]}, {name}) are not supported; keep one"
                )
            pending = (where, name)
    if not linears:
        raise TypeError(f"model: contains no nn.Linear; pcfast supports {_supported()}")
    if pending is not None:
        raise TypeError(
            f"{pending[0]}: the model ends with an activation ({pending[1]}); pcfast expects a linear "
            "readout — remove the last activation (use loss='ce' for classification)"
        )
    return linears, activations, dropouts


def _check_linear(where: str, module: nn.Linear, earlier: list[nn.Linear]) -> None:
    """Raise ``TypeError`` unless ``module`` is a Linear of its own with plain ``nn.Parameter``s."""
    if any(module is lin for lin in earlier):
        raise TypeError(
            f"{where}: this nn.Linear appears earlier in the model too (shared weights); pcfast "
            "trains each layer's own weights — give every layer its own nn.Linear"
        )
    for key in ("weight", "bias"):
        value = getattr(module, key)
        if value is not None and not isinstance(value, nn.Parameter):
            raise TypeError(
                f"{where}: its {key} is a {type(value).__name__}, not an nn.Parameter (a "
                "reparametrisation such as weight_norm?); pcfast updates plain nn.Linear parameters "
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
    """Read the layers and activations of ``model``, keeping the user's own ``nn.Linear`` modules.

    Accepted: a single ``nn.Linear``; an ``nn.Sequential`` (nested ones are flattened) of ``nn.Linear``
    and supported activations ending in a linear readout; any module whose children, in the order
    they were registered, form such a chain and whose ``forward`` computes exactly that chain (for
    example ``self.net = nn.Sequential(...)`` with ``forward`` returning ``self.net(x)``) — checked by
    running ``model`` once on a probe batch of random inputs, as are modules with forward hooks; and
    a ``torch.compile`` wrapper of any of these (its ``_orig_mod``; nothing is compiled).

    ``nn.Dropout`` is the identity: the local rules train the deterministic network, the one
    ``model.eval()`` computes (a ``UserWarning`` says so when p > 0). ``nn.Flatten()`` is the identity
    on the (batch, features) inputs the optimizers take. Anything else — normalisation layers, other
    modules, activations at the ends, parameters outside the Linears — raises ``TypeError`` saying
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
    linears, activations, dropouts = _read_chain(chain)
    if unread:
        _check_forward(top, chain, unread)
    if dropouts:
        warnings.warn(
            f"{', '.join(dropouts)}: nn.Dropout is the identity for pcfast's optimizers — the local "
            "rules train the deterministic network that model.eval() computes, while model(x) in "
            "training mode still drops units; remove the Dropout (or set p=0) to silence this warning",
            UserWarning, stacklevel=2,
        )
    return MLP(tuple(linears), tuple(activations))


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


def check_params(weights: Sequence[Tensor], biases: Sequence[Tensor | None], activations: Sequence[str]) -> None:
    """Check that weights, biases and activations describe one MLP (types, shapes, dtypes, devices)."""
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
    for l, (w, b) in enumerate(zip(weights, biases)):
        check_tensor(f"weights[{l}]", w)
        check_tensor(f"biases[{l}]", b, optional=True)
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
                f"biases[{l}]: expected shape ({w.shape[0]},), dtype {w.dtype} on {w.device} (as weights[{l}]), "
                f"got {_describe(b)}"
            )
    for l, act in enumerate(activations):
        if not isinstance(act, str):
            raise TypeError(f"activations[{l}]: expected an activation name (str), got {type(act).__name__} {act!r}")


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
