"""What every pcfast optimizer shares: μP parameter groups, any torch.optim update rule, and
all-or-nothing steps.

A pcfast optimizer is a ``torch.optim.Optimizer`` over the linear layers of an MLP with one
parameter group per weight and per bias. The step has three parts:

1. the algorithm's local gradients (``pcfast.functional``; nothing is modified),
2. one finiteness flag for the whole step, read with the step's statistics in one host sync,
3. the update, by an inner ``torch.optim`` optimizer — ``torch.optim.SGD`` unless ``optimizer=``
   names another (``torch.optim.Adam``, ``AdamW``, any class or factory ``f(param_groups, lr=…,
   **kwargs)``), built over the same parameters with the extra keyword arguments.

Every group's ``lr`` is the base learning rate η (the same in every group) and its ``lr_mult`` the
layer's μP multiplier for the update rule (``Parametrization.scales``: SGD's table, or Adam's, which
also scales ε and the weight decay through ``eps_mult`` and ``weight_decay_mult``). Before each
update the inner optimizer's groups are set from these: ``lr · lr_mult``, ``eps · eps_mult``,
``weight_decay · weight_decay_mult`` and every other hyperparameter as it is, so any
``lr_scheduler`` — one that scales each group or one that writes a single rate (or momentum) into
every group — keeps the μP ratios. At multipliers of one every update is the plain torch.optim
update, bitwise.

``step(x, y)`` writes the batch's local gradients to ``.grad`` and updates; ``step()`` without a
batch updates from the ``.grad`` already there — so ``compute_gradients(x, y)`` (which adds into
``.grad`` as ``backward()`` does), then clipping or hooks, then ``step()`` also works.

All or nothing: a non-finite energy, gradient or update raises ``DivergenceError`` (a non-finite
input a ``ValueError`` naming it), and a corrupted state, a changed model or a mismatched
``state_dict`` a ``ValueError``, with parameters, ``.grad``, the inner optimizer's state and the
algorithm's state exactly as they were. SGD steps whose norms bound every new value far below the
dtype's range update in place at once; otherwise the parameters and state the update touches are
copied first and put back if a new value is not finite.

Data parallel (``pcfast.distributed``): with a process group (``process_group="auto"`` finds an
initialised default group of more than one rank) each rank passes its shard of the batch to
``step(x, y)``/``compute_gradients(x, y)``; the local gradients and statistics — batch means — are
averaged over the group's samples, weighted by shard size, in one all-reduce of one flat buffer per
step (TP/DTP add their feedback collectives), after which every rank checks and applies the same
values. A failure on one rank before the reduction is reported to all in the step's next
collective, so every rank raises, and none changes anything.
"""
from __future__ import annotations

import copy
import inspect
import math
import operator
from itertools import chain
import warnings
import weakref
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn
from torch.optim.sgd import sgd as functional_sgd

from .. import distributed
from ..errors import DivergenceError
from ..mup.presets import Parametrization, standard
from ..functional import as_net
from ..types import Net
from ..network import MLP, check_batch, labels_out_of_range, parse_mlp, resolve_loss

# Keys of the model's parameter groups beside ``defaults``.
_LAYER_KEYS = ("layer", "kind")
# Multipliers the parametrization sets per group (on lr, Adam's eps, the weight decay).
_MULTIPLIERS = ("lr_mult", "eps_mult", "weight_decay_mult")
# Keys every saved group must have (the others default to this optimizer's values on load).
_REQUIRED = ("lr", "lr_mult")
# New values are applied in place at once only when their norm bounds stay below finfo.max / _MARGIN:
# far beyond the rounding of the norms and of the few SGD operations on each element.
_MARGIN = 16.0
_LOW_PRECISION = (torch.float16, torch.bfloat16)
_ADAM_FAMILY = tuple(getattr(torch.optim, name) for name in ("Adam", "AdamW", "NAdam", "RAdam", "Adamax")
                     if hasattr(torch.optim, name))


# The state an update rule keeps per element of its parameter (checked against the parameter's shape).
_PER_ELEMENT_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_GUARD = "labels in range"  # the batch's guard among a step's checked values
_LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)  # check_batch's class labels


@dataclass
class _Step:
    """One step's batch and what the algorithm computed for it beyond gradients and statistics
    (``pending``: state to commit, bounds for the finiteness check), passed along explicitly."""

    x: Tensor
    y: Tensor
    target: Tensor
    pending: dict


_GROUP_WRITES = [0]  # how many writes into any _Group there have been (counted after each write)


class _Group(dict):
    """A parameter group the optimizer made: a dict that counts every write into it (item
    assignment, ``update``, ``setdefault``, ``pop``, …) in ``_GROUP_WRITES``, so that settings
    derived from the groups are known to be current without reading them again."""

    __slots__ = ()


def _counted(name: str) -> Callable:
    method = getattr(dict, name)

    def write(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        finally:
            _GROUP_WRITES[0] += 1

    write.__name__ = write.__qualname__ = name
    return write


for _name in ("__setitem__", "__delitem__", "__ior__", "update", "setdefault", "pop", "popitem", "clear"):
    setattr(_Group, _name, _counted(_name))


class _GroupSettings:
    """What a step reads from the parameter groups' settings, derived once per set of values:
    ``inner[i]``, the values ``_sync_inner`` writes into the inner optimizer's group ``i``;
    ``sgd[i]``, the group's (lr, momentum, dampening, weight decay, nesterov) for the certain SGD
    path (None where it does not apply); ``rates``, the dtypes every group's rates fit
    (``_check_rates``);
    ``synced``, whether the inner groups were set from it. ``groups`` and ``writes``: the groups it
    was derived from and ``_GROUP_WRITES`` before they were read — it is reused while the optimizer
    has the same groups and nothing was written into any ``_Group`` since (kept only when every group
    is a ``_Group`` and every setting immutable: a number, bool, string, None or tuple of those)."""

    __slots__ = ("groups", "writes", "inner", "sgd", "rates", "synced")

    def __init__(self, groups: tuple, writes: int, inner: list[dict], sgd: list[tuple | None]) -> None:
        self.groups, self.writes, self.inner, self.sgd = groups, writes, inner, sgd
        self.rates: set[torch.dtype] = set()
        self.synced = False


_SCALARS = (int, float, bool, str, type(None))


def _immutable(value: Any) -> bool:
    return type(value) in _SCALARS or (type(value) is tuple and all(type(v) in _SCALARS for v in value))


_LARGEST: dict[torch.dtype, float] = {}


def _largest(dtype: torch.dtype) -> float:
    """``torch.finfo(dtype).max``, looked up once per dtype."""
    if dtype not in _LARGEST:
        _LARGEST[dtype] = torch.finfo(dtype).max
    return _LARGEST[dtype]


def _check_number(name: str, value: Any, *, low: float = 0.0, inclusive: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if inclusive else value > low)
    if not ok:
        raise ValueError(f"{name}: expected a finite number {'>=' if inclusive else '>'} {low}, got {value!r}")


def _describe(t: Any) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def update_rule(inner: torch.optim.Optimizer) -> str | None:
    """The μP table an inner optimizer needs: ``"sgd"``, ``"adam"`` (coupled weight decay),
    ``"adamw"`` (decoupled), or None for an update rule pcfast has no table for."""
    if isinstance(inner, torch.optim.SGD):
        return "sgd"
    if isinstance(inner, torch.optim.AdamW) or (isinstance(inner, _ADAM_FAMILY)
                                                and inner.defaults.get("decoupled_weight_decay")):
        return "adamw"
    if isinstance(inner, _ADAM_FAMILY):
        return "adam"
    return None


def _check_sgd_settings(settings: dict[str, Any]) -> None:
    """``torch.optim.SGD``'s settings, with pcfast's messages (before torch sees them)."""
    for name in ("momentum", "dampening", "weight_decay"):
        if name in settings:
            _check_number(name, settings[name])
    if settings.get("nesterov") and (settings.get("momentum", 0) <= 0 or settings.get("dampening", 0) != 0):
        raise ValueError("nesterov: requires momentum > 0 and dampening = 0")


def _saved_value_fits(saved: Any, mine: Any) -> bool:
    """Whether a saved hyperparameter has the type of this optimizer's (numbers finite)."""
    if mine is None:  # an optional setting (None or a number: e.g. inference_tol); the options check its value
        return saved is None or isinstance(saved, bool) or (
            isinstance(saved, (int, float)) and math.isfinite(saved))
    if isinstance(mine, bool):
        return isinstance(saved, bool) or saved is None
    if isinstance(mine, (int, float)):
        return isinstance(saved, (int, float)) and not isinstance(saved, bool) and math.isfinite(saved)
    if isinstance(mine, (tuple, list)):
        return isinstance(saved, (tuple, list)) and len(saved) == len(mine) and all(
            _saved_value_fits(s, m) for s, m in zip(saved, mine))
    if isinstance(mine, Tensor):
        return isinstance(saved, (Tensor, int, float)) and not isinstance(saved, bool)
    return type(saved) is type(mine)


@dataclass(frozen=True)
class Options:
    """An algorithm's settings, checked once when made. The fields become keyword arguments of the
    optimizer's constructor and, except those in ``constructor_only``, settings of every parameter
    group (so that ``state_dict`` keeps them)."""

    loss: str = "mse"

    constructor_only: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "loss", resolve_loss(self.loss))  # a name, or nn.CrossEntropyLoss()

    def settings(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.constructor_only}


class LocalOptimizer(torch.optim.Optimizer):
    """Base class: parameter groups from a parametrization, an inner update rule, transactional steps.

    The contract every subclass shares:

    * ``param_groups[i]["lr"]`` is the base rate (shared), ``param_groups[i]["lr_mult"]`` the layer's
      μP multiplier; the inner optimizer steps with ``lr · lr_mult`` (and ``eps · eps_mult``,
      ``weight_decay · weight_decay_mult``). ``optimizer`` and its keyword arguments choose the
      update rule; ``inner_optimizer`` is that torch.optim optimizer and ``state`` its state.
    * A parameter with ``requires_grad=False`` is frozen, as with ``torch.optim``: the algorithm still
      uses it in the network, but no ``.grad`` is written for it and it is never updated (checked at
      every step, so freezing and unfreezing between steps works).
    * ``compute_gradients(x, y)`` adds the local gradients into ``.grad`` (creating it when None), as
      ``backward()`` does, so micro-batches accumulate; ``step(x, y)`` trains on one batch: it
      replaces ``.grad`` with that batch's gradients and applies them.
    * ``step()`` without a batch applies the update rule to ``.grad`` as it is; an algorithm other
      than BP warns once (``UserWarning``) if it finds a ``.grad`` that ``compute_gradients``/
      ``step(x, y)`` did not write (e.g. from ``loss.backward()``), since that step is then the plain
      update rule on those gradients.
    * ``add_param_group`` works as in ``torch.optim``: the added parameters (not the model's) are
      updated by the inner rule (``lr · lr_mult``, ``lr_mult`` 1 unless given) from their own
      ``.grad``, which the caller computes (e.g. with ``backward()``).
    * The model's layers and parameters are recorded when the optimizer is built; replacing a
      ``weight``/``bias`` Parameter or a module of the model afterwards raises ``ValueError`` at the
      next step (build a new optimizer for the changed model).
    * ``load_state_dict`` checks the whole state dict (algorithm, update rule, groups, the inner
      optimizer's state, parametrization, algorithm state) before changing anything.
    * ``process_group`` (``"auto"``, None or a ``ProcessGroup``; see ``pcfast.distributed``): with
      a group of more than one rank each rank steps on its shard of the batch and every rank applies
      the full batch's update; the first rank's model is copied to the others when the optimizer is
      built. ``state_dict`` is the same as without a group.
    """

    algo = "any"
    # The statistics ``_local_gradients`` returns, in order (batch means; data parallel reduces them).
    stat_names: tuple[str, ...] = ("loss",)
    # The algorithm's settings (an ``Options`` dataclass); ``backends``: those it runs on.
    options: ClassVar[type[Options]] = Options
    backends: ClassVar[tuple[str, ...] | None] = None
    # Whether a NaN in the target makes the statistics of ``_local_gradients`` non-finite (it does
    # not check the target itself): then class labels out of range are marked in the target.
    _target_guards_labels: ClassVar[bool] = False
    # Whether ``step()`` warns about a ``.grad`` that the optimizer did not write (not BP's, whose
    # gradients are autograd's, like the ``.grad`` that ``loss.backward()`` writes).
    _warns_foreign_grads: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give each optimizer the signature its keyword arguments make, for ``help`` and
        ``inspect.signature``: the shared ones, the algorithm's options, then the update rule's."""
        super().__init_subclass__(**kwargs)
        keyword = inspect.Parameter.KEYWORD_ONLY
        head = [inspect.Parameter("model", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                inspect.Parameter("parametrization", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
                inspect.Parameter("lr", keyword, default=0.1),
                inspect.Parameter("optimizer", keyword, default=torch.optim.SGD)]
        own = [inspect.Parameter(f.name, keyword, default=f.default) for f in fields(cls.options)]
        tail = [inspect.Parameter("backend", keyword, default="auto"),
                inspect.Parameter("process_group", keyword, default=distributed.AUTO),
                inspect.Parameter("optimizer_kwargs", inspect.Parameter.VAR_KEYWORD)]
        cls.__signature__ = inspect.Signature(head + own + tail)

    def __init__(
        self,
        model: nn.Module,
        parametrization: Parametrization | None = None,
        *,
        lr: float = 0.1,
        optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
        backend: str = "auto",
        process_group: Any = distributed.AUTO,
        **kwargs: Any,
    ) -> None:
        """See the class docstring; ``kwargs`` holds the algorithm's options (``options``' fields)
        and, after them, the update rule's keyword arguments."""
        names = {f.name for f in fields(self.options)}
        self.config = self.options(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
        optimizer_kwargs = kwargs
        _check_number("lr", lr, inclusive=False)
        from ..ops import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        if self.backends is not None and backend not in self.backends:
            raise ValueError(f"backend: {type(self).__name__} has only the reference implementation; expected one of "
                             f"{self.backends}, got {backend!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected the nn.Module to train (pcfast optimizers read its layers), got "
                            f"{type(model).__name__}; pass the model, not model.parameters()")
        self.mlp: MLP = parse_mlp(model)
        if self.mlp.is_conv and backend in ("cpp", "triton"):
            raise ValueError(f"backend={backend!r} runs MLPs only; conv nets run on backend='torch' (explicit, any "
                             "device), 'reference' (autograd, the specification) or 'auto' (which picks torch)")
        if parametrization is None:
            parametrization = standard(model)
        elif not isinstance(parametrization, Parametrization):
            raise TypeError(
                f"parametrization: expected the result of pcfast.parametrize(model, ...), got {type(parametrization).__name__}"
            )
        self._check_parametrization(parametrization, "parametrization")
        self.parametrization = parametrization
        layers = []  # (layer index, kind, parameter) in model order
        for l, lin in enumerate(self.mlp.linears):
            layers += [(l, kind, getattr(lin, kind)) for kind in ("weight", "bias") if getattr(lin, kind) is not None]
        inner = self._build_inner(optimizer, [p for _, _, p in layers], lr, optimizer_kwargs, sorted(names))
        self.update_rule = update_rule(inner)
        scales = self._scales(parametrization, type(inner).__name__)
        hyper = {k: v for k, v in inner.defaults.items() if k not in ("lr", "params")}
        groups = []
        for l, kind, p in layers:
            scale = scales[l][0 if kind == "weight" else 1]
            groups.append(_Group(params=[p], lr=lr, lr_mult=scale.lr_mult, eps_mult=scale.eps_mult,
                                 weight_decay_mult=scale.weight_decay_mult, layer=l, kind=kind))
        defaults = dict(lr=lr, lr_mult=1.0, eps_mult=1.0, weight_decay_mult=1.0, **hyper, backend=backend,
                        **self.config.settings())
        self._inner_keys = tuple(hyper)
        self._setting_names = tuple(defaults)  # torch may add keys to self.defaults later
        super().__init__(groups, defaults)
        self.inner_optimizer = inner
        self.state = inner.state  # one state: torch.optim's state_dict/load_state_dict see the inner's
        self._model_groups = len(groups)  # groups after these came from add_param_group
        # (module, its parameter name, the Parameter) per model parameter, in model order
        self._slots = [(lin, kind, getattr(lin, kind)) for lin in self.mlp.linears
                       for kind in ("weight", "bias") if getattr(lin, kind) is not None]
        self._slot_params = [p for _, _, p in self._slots]
        self._shapes = [p.shape for p in self._slot_params]
        self._weights = tuple(lin.weight for lin in self.mlp.linears)
        self._biases = tuple(lin.bias for lin in self.mlp.linears)
        # every module of the model that has children, with its children as they were
        self._structure = [(name, module, tuple(module._modules.values()))
                           for name, module in model.named_modules() if module._modules]
        self._written_grads: dict[Tensor, weakref.ref] = {}  # param -> the .grad tensor we last wrote
        self._warned_foreign_grads = False
        self.process_group = distributed.resolve_process_group(process_group)
        self._collectives: distributed.StepCollectives | None = None  # during a data-parallel step
        if self.process_group is not None:  # every rank starts from the first rank's model, as with DDP
            distributed.broadcast_from_first_rank([p for _, _, p in self._slots], self.process_group)

    @staticmethod
    def _build_inner(optimizer, params: list[Tensor], lr: float, kwargs: dict[str, Any],
                     options: list[str]) -> torch.optim.Optimizer:
        if not callable(optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer class or a factory "
                            f"f(param_groups, lr=..., **kwargs), got {type(optimizer).__name__}")
        if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.SGD):
            _check_sgd_settings(kwargs)
        name = getattr(optimizer, "__name__", type(optimizer).__name__)
        groups = [{"params": [p]} for p in params]
        try:
            inspect.signature(optimizer).bind(groups, lr=lr, **kwargs)
        except TypeError as error:
            raise TypeError(f"optimizer: {name} does not take the arguments {sorted(kwargs)} ({error}); the "
                            f"algorithm's own options are {options}") from None
        except ValueError:
            pass  # no signature to check (a builtin): the call says
        inner = optimizer(groups, lr=lr, **kwargs)
        if not isinstance(inner, torch.optim.Optimizer) or isinstance(inner, LocalOptimizer):
            raise TypeError(f"optimizer: expected a factory of torch.optim optimizers, got one that made a "
                            f"{type(inner).__name__}")
        if len(inner.param_groups) != len(params) or any(
                len(g["params"]) != 1 or g["params"][0] is not p for g, p in zip(inner.param_groups, params)):
            raise TypeError(f"optimizer: {name} must keep the groups it is given — one per weight and bias, in "
                            "order — since each carries its own μP multipliers; set per-group options on the "
                            "pcfast optimizer's param_groups instead")
        return inner

    def _scales(self, parametrization: Parametrization, name: str):
        """Per-layer (weight, bias) multipliers for this update rule; any rule under SP."""
        rule = self.update_rule
        if rule is None:
            if parametrization.preset == "mup":
                raise ValueError(
                    f"optimizer: pcfast has μP multipliers for SGD and the Adam family (Adam, AdamW, NAdam, "
                    f"RAdam, Adamax), not for {name}; use one of those, or parametrization=None or 'sp'"
                )
            rule = "sgd"  # multipliers of one under SP
        return parametrization.scales(rule)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "inner_optimizer"):  # after __init__: the inner optimizer updates them too
            self.inner_optimizer.add_param_group({"params": self.param_groups[-1]["params"]})

    # ------------------------------------------------------------------ hyperparameters

    def _setting(self, name: str) -> Any:
        """An algorithm-level setting (the same in every group; read from the first)."""
        return self.param_groups[0][name]

    def _params(self) -> tuple[list[Tensor], list[Tensor | None]]:
        """The model's weights and biases (``_check_ready`` has made sure they are still the model's)."""
        return list(self._weights), list(self._biases)

    def _net(self) -> Net:
        """The model as a checked ``Net``, made once: ``_check_ready`` has made sure that the model
        still holds the parameters it was made of (updates are in place)."""
        if getattr(self, "_net_value", None) is None:
            weights, biases = self._params()
            self._net_value = as_net(weights, biases, self.mlp.activations, self.mlp.geometry)
        return self._net_value

    def _check_batch(self, x: Tensor, y: Tensor) -> Tensor:
        """The target as the loss expects it. Nothing is read on the host: x and float targets are
        not scanned for NaN/inf (they make the step's statistics non-finite) and class labels are
        clamped into range; the step's one finiteness flag finds both (``_guards``,
        ``_raise_non_finite`` names the argument)."""
        weights, _ = self._params()
        target = check_batch(x, y, weights, self._setting("loss"), check_finite=False, check_labels=False)
        self._net().check_input(x)  # a conv net's images fit its layers
        return target

    def _guard(self, y: Tensor, like: Tensor) -> Tensor:
        """A 0-d tensor, NaN when the batch's class labels are out of range, read (and, with a process
        group, reduced) with the step's finiteness flag; 0 for float targets."""
        flag = labels_out_of_range(y, self.mlp.linears[-1].out_features)
        return like.new_zeros(()) if flag is None else flag.to(like.dtype)

    def _target_and_guard(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor | None]:
        """``_check_batch``'s target and the batch's label guard with fewer tensor operations (each
        costs about as much as the Python around it at the README's size): None when the target
        carries the guard itself. Class labels are clamped into range, as ``_check_batch`` does
        (MSE: their rows of a one-hot table, exactly ``_check_batch``'s one-hot rows), and guarded
        by one comparison with the clamped labels. Where ``_target_guards_labels``, class labels
        under MSE instead index the table with one extra row of NaN, which a label out of range
        gets: the loss, and so the step's statistics, inherit the NaN (``_raise_non_finite`` then
        names y), and no guard is needed. Batches that are not plainly valid go through
        ``_check_batch`` and ``_guard``, which raise the errors naming the argument."""
        w0 = self._weights[0]
        loss = self._setting("loss")
        if not ((loss == "mse" or loss == "ce") and type(x) is Tensor and type(y) is Tensor
                and x.layout == torch.strided and y.layout == torch.strided and x.dim() == 2 and y.dim() == 1
                and x.shape[0] == y.shape[0] and x.shape[0] > 0 and x.shape[1] == w0.shape[1]
                and x.dtype == w0.dtype and x.device == w0.device and y.device == x.device
                and y.dtype in _LABEL_DTYPES):
            target = self._check_batch(x, y)
            return target, self._guard(y, w0)
        classes = self._weights[-1].shape[0]
        labels = y if y.dtype == torch.int64 else y.long()
        if loss == "mse" and self._target_guards_labels:
            return self._one_hot_table(classes, w0)[labels.clamp(-1, classes)], None
        clamped = labels.clamp(0, classes - 1)
        target = self._one_hot_table(classes, w0)[clamped] if loss == "mse" else clamped
        zero, nan = self._guard_values(w0)
        return target, torch.where(torch.eq(clamped, labels).all(), zero, nan)

    def _one_hot_table(self, classes: int, like: Tensor) -> Tensor:
        """The rows of the ``classes`` one-hot targets and, last, a row of NaN (``like``'s dtype and
        device), made once."""
        tables = self.__dict__.setdefault("_tables", {})
        key = ("one-hot", classes, like.dtype, like.device)
        table = tables.get(key)
        if table is None:
            table = tables[key] = torch.cat([torch.eye(classes, dtype=like.dtype, device=like.device),
                                             torch.full((1, classes), math.nan, dtype=like.dtype, device=like.device)])
        return table

    def _guard_values(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """0-d 0 and NaN in ``like``'s dtype and device, made once: the values of a label guard."""
        tables = self.__dict__.setdefault("_tables", {})
        key = ("guard", like.dtype, like.device)
        values = tables.get(key)
        if values is None:
            values = tables[key] = (like.new_zeros(()), like.new_full((), math.nan))
        return values

    def _check_parametrization(self, parametrization: Parametrization, name: str) -> None:
        parametrization.check_matches(self.mlp)
        if parametrization.algo not in ("any", self.algo) and not (
            {parametrization.algo, self.algo} <= {"tp", "dtp"}
        ):
            raise ValueError(
                f"{name}: made for algo={parametrization.algo!r}, but this optimizer runs "
                f"{self.algo!r}; call pcfast.parametrize(model, ..., algo={self.algo!r})"
            )

    def _sync_inner(self, settings: _GroupSettings | None = None) -> None:
        """Set the inner optimizer's groups from ours: rates times their multipliers, the rest as is."""
        settings = settings or self._group_settings()
        for inner, values in zip(self.inner_optimizer.param_groups, settings.inner):
            inner.update(values)
        settings.synced = True

    def _group_settings(self) -> _GroupSettings:
        """The groups' settings as a step uses them (``_GroupSettings``), derived again only after a
        write into a group (schedulers and users write into ``param_groups`` directly) or a change
        of the groups themselves (``add_param_group``, ``load_state_dict``)."""
        groups = self.param_groups
        writes = _GROUP_WRITES[0]  # (read before the settings: a write after it invalidates them)
        cached = self.__dict__.get("_settings")
        if (cached is not None and cached.writes == writes and len(cached.groups) == len(groups)
                and all(map(operator.is_, cached.groups, groups))):
            return cached
        keys = ("lr", "lr_mult", *_MULTIPLIERS[1:], *self._inner_keys)
        values = tuple(chain.from_iterable(map(operator.itemgetter(*keys), groups)))
        sgd_rule = type(self.inner_optimizer) is torch.optim.SGD
        inner, sgd = [], []
        for outer, group in zip(self.param_groups, self.inner_optimizer.param_groups):
            values_i = {key: outer[key] for key in self._inner_keys}
            values_i["lr"] = outer["lr"] * outer["lr_mult"]
            for key in ("eps", "weight_decay"):  # numbers only (Adafactor's eps is a pair)
                current = values_i[key] if key in values_i else group.get(key)
                if isinstance(current, (int, float)) and not isinstance(current, bool):
                    values_i[key] = outer[key] * outer[f"{key}_mult"]
            inner.append(values_i)
            numbers = None
            if sgd_rule and not (values_i.get("maximize") or values_i.get("fused")):  # fused: its own arithmetic
                numbers = tuple(values_i.get(k) for k in ("lr", "momentum", "dampening", "weight_decay"))
                if all(type(v) in (int, float) and math.isfinite(v) for v in numbers):
                    numbers = (*numbers, bool(values_i.get("nesterov")))
                else:
                    numbers = None
            sgd.append(numbers)
        settings = _GroupSettings(tuple(groups), writes, inner, sgd)
        lasting = all(type(g) is _Group for g in groups) and all(map(_immutable, values))
        self.__dict__["_settings"] = settings if lasting else None
        return settings

    # ------------------------------------------------------------------ algorithm hook

    def _local_gradients(self, x: Tensor, target: Tensor) -> tuple[list[Tensor], list[Tensor | None], dict[str, Tensor], dict]:
        """The algorithm on a checked batch (``target`` as ``check_batch`` returns it): (weight grads,
        bias grads, stats as 0-d tensors, pending extra state to commit)."""
        raise NotImplementedError

    def _commit_extra(self, pending: dict) -> None:
        """Write algorithm state computed during the step (e.g. feedback weights)."""

    def _snapshot(self) -> Any:
        """State that computing gradients advances (e.g. a noise generator), to restore on failure."""
        return None

    def _restore(self, snapshot: Any) -> None:
        """Undo what computing gradients advanced, from ``_snapshot``."""

    def _check_extra_state(self) -> None:
        """Raise ValueError if algorithm state (e.g. feedback weights) no longer fits the model."""

    def _collective_plan(self) -> list[int]:
        """Payload sizes of a data-parallel step's all-reduces, in order (``StepCollectives``): here
        the last one, every model gradient and statistic; TP/DTP put their feedback ones first."""
        return [sum(p.numel() for _, _, p in self._slots) + len(self.stat_names) + 1]  # + the batch's guard

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def compute_gradients(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """Compute the local gradients for a batch and add them into ``.grad``; return stats.

        As ``loss.backward()`` does, the gradients are added to a ``.grad`` that exists (and set
        where it is None), so calling this on several micro-batches accumulates their gradients
        (each the mean over its micro-batch: divide by the number of micro-batches for the mean
        over all of them); ``zero_grad()`` starts afresh. Frozen parameters (``requires_grad=False``)
        get no ``.grad``.
        """
        snapshot = self._snapshot()
        try:
            weight_grads, bias_grads, stats, guarded, step = self._guarded_gradients(
                x, y, before=(self._check_ready, self._check_grads_fit,
                              lambda: self._warn_if_foreign_grads("compute_gradients")))
            grads = self._grads_by_param(weight_grads, bias_grads)
            values = self._read([*guarded.values(), *self._norms(list(grads.values()))])
            if not all(map(math.isfinite, values)):
                self._raise_non_finite(grads, dict(zip(guarded, values)), step)
                # (returned: a norm overflowed, every element is finite)
            pending = step.pending
        except BaseException:
            self._restore(snapshot)
            raise
        self._commit_extra(pending)
        for p, g in grads.items():
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)  # its shape and dtype were checked before the step (_check_grads_fit)
            self._written_grads[p] = weakref.ref(p.grad)
        return dict(zip(stats, values))

    @torch.no_grad()
    def step(self, x: Tensor | None = None, y: Tensor | None = None, closure=None) -> dict[str, float] | None:  # type: ignore[override]
        """One training step on batch ``(x, y)``; without a batch, update from the current ``.grad``.

        With a batch, ``.grad`` is replaced by the batch's local gradients, which are applied; the
        step's statistics (loss, energy, …) are returned as floats. Without a batch, ``.grad`` is
        applied as it is (parameters whose ``.grad`` is None are skipped, as in ``torch.optim``).
        """
        if closure is not None:
            raise TypeError("closure: pcfast optimizers compute their own gradients; call step(x, y)")
        if (x is None) != (y is None):
            raise TypeError("step: pass both x and y, or neither (to apply the current .grad)")
        if x is None:
            self._check_ready()
            self._warn_if_foreign_grads("step")
            self._update(None, {}, None)
            return None
        snapshot = self._snapshot()
        try:
            weight_grads, bias_grads, stats, guarded, step = self._guarded_gradients(x, y, before=(self._check_ready,))
            values = self._update(self._grads_by_param(weight_grads, bias_grads), guarded, step)
        except BaseException:
            self._restore(snapshot)
            raise
        self._commit_extra(step.pending)
        return dict(zip(stats, values))

    # ------------------------------------------------------------------ checks before a step

    def _check_ready(self) -> None:
        """Raise ValueError unless the model is the one the optimizer was built for and every
        momentum buffer and algorithm state still fits it (all before anything is computed)."""
        for name, module, children in self._structure:
            current = module._modules
            if len(current) != len(children) or not all(map(operator.is_, current.values(), children)):
                where = f"model.{name}" if name else "model"
                raise ValueError(
                    f"{where}: its submodules changed after the optimizer was built (a layer was replaced, "
                    "added or removed); the optimizer would train the old layers. Build a new optimizer for "
                    "the changed model"
                )
        slots = self._slots
        if all(map(operator.is_, [module._parameters.get(kind) for module, kind, _ in slots], self._slot_params)) and (
                [p.shape for p in self._slot_params] == self._shapes):
            slots = ()  # (the usual case, checked at once; else the parameter at fault is named)
        for (module, kind, param), shape in zip(slots, self._shapes):
            if module._parameters.get(kind) is not param:
                raise ValueError(
                    f"model: the {kind} Parameter of {self._layer_name(module)} was replaced after the optimizer "
                    "was built; the optimizer would train the old one. Build a new optimizer for the changed "
                    "model (or copy values in place: with torch.no_grad(): layer.weight.copy_(new))"
                )
            if param.shape != shape:
                raise ValueError(
                    f"model: the {kind} of {self._layer_name(module)} changed shape from {tuple(shape)} to "
                    f"{tuple(param.shape)} after the optimizer was built; build a new optimizer for the changed model"
                )
        for p, entry in self.state.items():
            for key, value in entry.items():
                # a tensor the update combines with the parameter element by element
                if key not in _PER_ELEMENT_STATE or value is None or (
                        isinstance(value, Tensor) and value.shape == p.shape and value.dtype == p.dtype
                        and value.device == p.device):
                    continue
                index = next((i for i, group in enumerate(self.param_groups) if any(q is p for q in group["params"])), None)
                name = "a parameter in no group" if index is None else self._group_name(index)
                what = "momentum buffer" if key == "momentum_buffer" else f"{key!r} state"
                raise ValueError(
                    f"optimizer state: the {what} of {name} has {_describe(value)}, "
                    f"expected {_describe(p)} (its parameter's); reset it with optimizer.state.clear() "
                    "or load a state_dict saved for this model"
                )
        self._check_extra_state()

    def _check_grads_fit(self) -> None:
        """Every ``.grad`` that compute_gradients would add into has its parameter's shape and dtype."""
        for module, kind, p in self._slots:
            g = p.grad
            if g is not None and p.requires_grad and (g.shape != p.shape or g.dtype != p.dtype or g.device != p.device):
                raise ValueError(f"{self._layer_name(module)} {kind}.grad: expected {_describe(p)} (the parameter's), "
                                 f"got {_describe(g)}")

    def _layer_name(self, module: nn.Module) -> str:
        for l, lin in enumerate(self.mlp.linears):
            if lin is module:
                return f"layer {l + 1}"
        return type(module).__name__

    def _group_name(self, index: int) -> str:
        group = self.param_groups[index]
        if index < self._model_groups:
            return f"layer {group['layer'] + 1} {group['kind']}"
        return f"param_groups[{index}] (added with add_param_group)"

    def _warn_if_foreign_grads(self, where: str) -> None:
        if not self._warns_foreign_grads or self._warned_foreign_grads:
            return
        for module, kind, p in self._slots:
            written = self._written_grads.get(p)
            if p.grad is not None and p.requires_grad and (written is None or written() is not p.grad):
                self._warned_foreign_grads = True
                name = type(self).__name__
                warnings.warn(
                    f"{name}.{where}(): the .grad of {self._layer_name(module)} {kind} was not written by "
                    f"{name}.compute_gradients or {name}.step(x, y) (e.g. it comes from loss.backward()); "
                    f"{'the plain update rule applies it' if where == 'step' else 'the local gradients are added to it'}, "
                    f"which is not {self.algo.upper()} training. Call optimizer.zero_grad() and "
                    "step(x, y) or compute_gradients(x, y). (Warned once per optimizer.)",
                    UserWarning, stacklevel=3,
                )
                return

    # ------------------------------------------------------------------ internals

    def _guarded_gradients(self, x, y, before=()):
        """(weight grads, bias grads, statistics, statistics with the batch's guard, ``_Step``),
        averaged over the process group if there is one: ``before`` (checks), the batch check and
        ``_local_gradients`` run first; with a group, a failure anywhere up to the last all-reduce
        is reported to every rank (``StepCollectives.abandon``), and the finiteness flag then sees
        the reduced values — a bad label on one rank included — the same on every rank."""
        group = self.process_group
        if group is None:
            for check in before:
                check()
            target, guard = self._target_and_guard(x, y)
            weight_grads, bias_grads, stats, pending = self._local_gradients(x, target)
            guarded = stats if guard is None else {**stats, _GUARD: guard}
            return weight_grads, bias_grads, stats, guarded, _Step(x, y, target, pending)
        self._collectives = collectives = distributed.StepCollectives(
            group, self._collective_plan(), self.mlp.linears[0].weight)
        try:
            for check in before:
                check()
            target = self._check_batch(x, y)
            weight_grads, bias_grads, stats, pending = self._local_gradients(x, target)
            if tuple(stats) != self.stat_names:
                raise RuntimeError(f"{type(self).__name__}: statistics {tuple(stats)} differ from stat_names "
                                   f"{self.stat_names} (an internal inconsistency)")
            depth = len(weight_grads)
            like = weight_grads[0]
            values = [torch.as_tensor(v, dtype=like.dtype, device=like.device) for v in stats.values()]
            reduced, _ = collectives.mean([*weight_grads, *bias_grads, *values, self._guard(y, like)], x.shape[0])
        except Exception as error:
            collectives.abandon(error)
        finally:
            self._collectives = None
        pending.pop("norm_terms", None)  # bounds of this rank's gradients, not of the reduced ones
        stats = dict(zip(self.stat_names, reduced[2 * depth:-1]))
        guarded = {**stats, _GUARD: reduced[-1]}
        return reduced[:depth], reduced[depth:2 * depth], stats, guarded, _Step(x, y, target, pending)

    def _grads_by_param(self, weight_grads, bias_grads) -> dict[Tensor, Tensor]:
        """The new gradient of every model parameter that trains (``requires_grad``), in model order."""
        grads = {}
        for w, b, gw, gb in zip(self._weights, self._biases, weight_grads, bias_grads):
            if w.requires_grad:
                grads[w] = gw
            if b is not None and b.requires_grad:
                grads[b] = gb
        return grads

    @staticmethod
    def _norms(tensors: list[Tensor]) -> list[Tensor]:
        """2-norms as 0-d tensors (no host sync yet), accumulated in float32 for float16/bfloat16."""
        if not tensors:
            return []
        low = tensors[0].dtype in _LOW_PRECISION
        return list(torch._foreach_norm(tensors, 2, dtype=torch.float32 if low else None))

    @staticmethod
    def _read(values: list[Tensor | float]) -> list[float]:
        """Floats of 0-d tensors (or numbers), with one host sync for all of them: one stack when
        they share a dtype and device, as a step's statistics and norms do."""
        if not values:
            return []
        try:  # the usual case: floating 0-d tensors on one device (stack promotes them exactly, to the widest)
            stacked = torch.stack(values)
        except (TypeError, RuntimeError):
            stacked = None
        if stacked is not None and stacked.dim() == 1 and all(map(Tensor.is_floating_point, values)):
            return stacked.tolist()  # (called under no_grad: nothing to detach)
        tensors = [v if isinstance(v, Tensor) else torch.tensor(float(v), dtype=torch.float64) for v in values]
        first = tensors[0]
        if all(t.dim() == 0 and t.dtype == first.dtype and t.device == first.device for t in tensors):
            return torch.stack(tensors).tolist()  # (called under no_grad: nothing to detach)
        device = next((t.device for t in tensors if t.device.type != "cpu"), first.device)
        return torch.stack([t.reshape(()).to(device, torch.float64) for t in tensors]).tolist()

    def _update(self, grads: dict[Tensor, Tensor] | None, stats: dict[str, Tensor], step: _Step | None) -> list[float]:
        """Write ``grads`` to ``.grad`` (None: keep ``.grad``) and apply the inner update rule, all or
        nothing: return the values of ``stats`` (the statistics and the batch's guard) as floats,
        read in the step's one host sync with its finiteness flag; on a non-finite value put back
        parameters, ``.grad`` and the inner state and raise."""
        count = len(stats)
        settings = self._group_settings()
        if not settings.synced:  # (set again before the inner optimizer itself steps)
            self._sync_inner(settings)
        stepped = self._stepped(grads)
        self._check_rates(stepped, settings)
        previous = []
        try:
            for p, g in (grads or {}).items():
                previous.append((p, p.grad))
                p.grad = g  # a fresh tensor from the algorithm; the inner update does not modify it
            values = self._certain_values(stepped, stats, step, settings)
            if values is not None:  # SGD with every new value certainly finite: in place at once
                self._sgd_in_place(stepped, settings)
                # the new norms' bounds (_certain_values), kept with the versions and addresses they hold for
                tensors, bounds = self.__dict__.pop("_new_bounds")
                if tensors is None:  # (the update made momentum buffers)
                    tensors = [p for _, p, _ in stepped] + [self.state[p]["momentum_buffer"] for i, p, _ in stepped
                                                            if settings.sgd[i][1]]
                self.__dict__["_norm_bounds"] = (tensors, [t._version for t in tensors], [t.data_ptr() for t in tensors],
                                                 bounds)
            else:
                self._sync_inner(settings)
                values = self._checked_update(stepped, stats, grads, step)
        except BaseException:
            for p, g in previous:
                p.grad = g
            raise
        if self._warns_foreign_grads:
            for p, _ in previous:
                self._written_grads[p] = weakref.ref(p.grad)
        return values[:count]

    def _stepped(self, grads) -> list[tuple[int, Tensor, Tensor]]:
        """(group index, parameter, gradient) of every parameter the update changes, checked to fit
        (the algorithm's gradients, in ``grads``, are checked when ``_update`` assigns them to
        ``.grad``, which refuses another shape, dtype or device before anything is updated)."""
        stepped = []
        model_groups = self._model_groups if grads is not None else 0
        for i, group in enumerate(self.param_groups):
            for p in group["params"]:
                if i < model_groups:
                    g = grads.get(p)
                    if g is not None and p.requires_grad:
                        stepped.append((i, p, g))
                    continue
                g = p.grad
                if g is None or not p.requires_grad:
                    continue
                if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                    raise ValueError(f"{self._group_name(i)} .grad: expected {_describe(p)} (the parameter's), "
                                     f"got {_describe(g)}")
                stepped.append((i, p, g))
        return stepped

    def _check_rates(self, stepped, settings: _GroupSettings | None = None) -> None:
        """A rate beyond the parameter dtype's range cannot give a finite update (and torch refuses
        to convert it): ``DivergenceError`` before anything is written. (The dtypes every group
        fits are kept with the settings they were found for.)"""
        settings = settings or self._group_settings()
        fine = settings.rates  # the dtypes in which no group's settings exceed the range
        for i, p, _ in stepped:
            dtype = p.dtype
            if dtype in fine:
                continue
            errors = [self._rate_error(j, dtype, group) for j, group in enumerate(settings.inner)]
            if errors[i] is not None:
                raise DivergenceError(errors[i])
            if all(error is None for error in errors):
                fine.add(dtype)

    def _rate_error(self, i: int, dtype: torch.dtype, group: dict) -> str | None:
        """The ``_check_rates`` message for group ``i`` (its inner settings ``group``) in ``dtype``, or None."""
        largest = _largest(dtype)
        for name in ("lr", "weight_decay", "momentum", "eps"):
            value = group.get(name)
            if isinstance(value, (int, float)) and abs(value) > largest:
                return (f"{self._group_name(i)} {name}: {value!r} exceeds the largest {dtype} ({largest:g}); the "
                        "update would not be finite; nothing was changed")
        dampening = group.get("dampening", 0)
        if isinstance(dampening, (int, float)) and abs(1 - dampening) > largest:
            return f"{self._group_name(i)} dampening: 1 - {dampening!r} exceeds the largest {dtype}; nothing was changed"
        return None

    def _certain_values(self, stepped, stats, step: _Step | None,
                        settings: _GroupSettings | None = None) -> list[float] | None:
        r"""For SGD: the statistics (and norms) if every gradient, new parameter and new momentum
        buffer is certainly finite, from tensor norms read with one host sync; else None.

        No element exceeds its tensor's 2-norm, and a NaN/inf makes a norm non-finite. With
        ``d = g + λθ``, ``‖d‖ ≤ ‖g‖ + |λ|‖θ‖``, ``‖buf'‖ ≤ |μ|‖buf‖ + |1 − τ|‖d‖`` (``‖d‖`` on the first
        step), ``‖d'‖ ≤ ‖d‖ + |μ|‖buf'‖`` (Nesterov) or ``‖buf'‖``, ``‖θ'‖ ≤ ‖θ‖ + |η|‖d'‖``. When every
        norm and bound is below ``finfo.max / 16`` nothing can overflow, and from finite inputs with
        only additions and multiplications nothing becomes NaN either. None is not a divergence, only
        "not certain": the caller then checks every new value after the update.

        The bounds of every ``‖θ'‖`` and ``‖buf'‖``, times ``1 + 8 ε`` for the rounding of the update
        (each new element is within ``(1 + ε/2)³`` of the exact one's bound), are kept with the
        tensors' versions and addresses after the update (``_update``): while every autograd version
        counter and address is unchanged — nothing wrote into any of them since, in place or by
        assignment — the next step takes those bounds for the norms and reads only the terms of its
        gradients' bounds. Kept bounds that fail the limit are dropped and the norms read. (A write
        that bypasses autograd's version counter, into ``.data`` or a NumPy view, is not seen.)"""
        if not stepped:
            return None
        settings = settings or self._group_settings()
        numbers, state = settings.sgd, self.state
        first = stepped[0][1]
        dtype, device = first.dtype, first.device
        rows, params, buffers, has_buffer = [], [], [], []
        for i, p, g in stepped:
            row = numbers[i]  # None unless torch.optim.SGD itself (a subclass may do anything) with plain settings
            if row is None or g.is_sparse or p.dtype != dtype or p.device != device:
                return None
            rows.append(row)
            params.append(p)
            entry = state.get(p) if row[1] else None
            buffer = None if entry is None else entry.get("momentum_buffer")
            has_buffer.append(buffer is not None)
            if buffer is not None:
                buffers.append(buffer)
        tensors, count = params + buffers, len(params)
        known = self.__dict__.pop("_norm_bounds", None)  # (tensors, versions, addresses, bounds) after the last update
        kept = (known is not None and len(known[0]) == len(tensors) and all(map(operator.is_, known[0], tensors))
                and known[1] == [t._version for t in tensors] and known[2] == [t.data_ptr() for t in tensors])
        terms, combine = self._grad_norm_terms(stepped, step)
        values = self._read([*stats.values(), *self._norms(terms if kept else tensors + terms)])
        if not all(map(math.isfinite, values)):
            return None
        found = values[len(stats):]
        norms = known[3] if kept else found
        param_norms, buffer_norms = norms[:count], iter(norms[count:len(tensors)])
        grad_norms = combine(found if kept else found[len(tensors):])
        limit, grow = _largest(dtype) / _MARGIN, 1 + 8 * torch.finfo(dtype).eps
        param_bounds, buffer_bounds = [], []
        for (rate, momentum, dampening, weight_decay, nesterov), buffered, p_norm, g_norm in zip(
                rows, has_buffer, param_norms, grad_norms):
            d_norm = g_norm + abs(weight_decay) * p_norm
            new_buffer = 0.0
            if momentum:
                new_buffer = abs(momentum) * next(buffer_norms) + abs(1 - dampening) * d_norm if buffered else d_norm
                d_norm = d_norm + abs(momentum) * new_buffer if nesterov else new_buffer
                buffer_bounds.append(new_buffer * grow)
            new_param = p_norm + abs(rate) * d_norm
            if not max(p_norm, g_norm, d_norm, new_param, new_buffer) <= limit:  # (all finite, none negative)
                return self._certain_values(stepped, stats, step, settings) if kept else None
            param_bounds.append(new_param * grow)
        # (kept by _update after the update, which keeps these tensors unless it makes momentum buffers)
        self.__dict__["_new_bounds"] = (tensors if len(buffer_bounds) == len(buffers) else None,
                                        param_bounds + buffer_bounds)
        return values

    def _grad_norm_terms(self, stepped, step: _Step | None) -> tuple[list[Tensor], Callable[[list[float]], list[float]]]:
        """Tensors whose 2-norms bound the stepped gradients' norms, and the function from those
        norms to one bound per gradient: here the gradients themselves (BP has cheaper bounds, which
        its ``_local_gradients`` leaves in ``step.pending["norm_terms"]``)."""
        return [g for _, _, g in stepped], lambda norms: norms

    def _sgd_in_place(self, stepped, settings: _GroupSettings | None = None) -> None:
        """``torch.optim.SGD``'s update, one foreach call per set of parameters that share their
        settings rather than one per group: the same arithmetic as the inner ``SGD.step()`` (its
        multi-tensor form, ``torch.optim.sgd._multi_tensor_sgd``, op for op where the settings are
        plain — no weight decay or Nesterov, every momentum buffer there — else its functional form
        ``torch.optim.sgd.sgd``), with less per-group overhead."""
        settings = settings or self._group_settings()
        numbers, state = settings.sgd, self.state
        batches: dict[tuple, tuple[list[Tensor], list[Tensor]]] = {}
        for i, p, g in stepped:
            params, grads = batches.setdefault(numbers[i], ([], []))
            params.append(p)
            grads.append(g)
        for (lr, momentum, dampening, weight_decay, nesterov), (params, grads) in batches.items():
            if not momentum and not weight_decay:
                torch._foreach_add_(params, grads, alpha=-lr)
                continue
            buffers = [state[p].get("momentum_buffer") if momentum and p in state else None for p in params]
            if momentum and not weight_decay and not nesterov and all(b is not None for b in buffers):
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, grads, alpha=1 - dampening)
                torch._foreach_add_(params, buffers, alpha=-lr)
                continue
            functional_sgd(params, grads, buffers, foreach=True, weight_decay=weight_decay, momentum=momentum, lr=lr,
                           dampening=dampening, nesterov=nesterov, maximize=False)
            if momentum:
                for p, buffer in zip(params, buffers):
                    state[p]["momentum_buffer"] = buffer

    def _inner_step(self, stepped) -> None:
        """The inner optimizer's step over ``stepped`` only: torch.optim updates every parameter with
        a ``.grad``, so the ``.grad`` of the others (frozen ones) is hidden for the call."""
        chosen = {id(p) for _, p, _ in stepped}
        hidden = [(p, p.grad) for group in self.inner_optimizer.param_groups for p in group["params"]
                  if p.grad is not None and id(p) not in chosen]
        for p, _ in hidden:
            p.grad = None
        try:
            self.inner_optimizer.step()
        finally:
            for p, g in hidden:
                p.grad = g

    def _checked_update(self, stepped, stats, grads, step: _Step | None) -> list[float]:
        """The inner update on copies' guard: parameters and their inner state are copied, the
        update runs in place, and one host sync reads the statistics and the norms of the gradients
        and new parameters; a non-finite one puts the copies back and raises."""
        params = [p for _, p, _ in stepped]
        saved = self._save_state(params)
        try:
            self._inner_step(stepped)
            values = self._read([*stats.values(), *self._norms([g for _, _, g in stepped]), *self._norms(params)])
        except BaseException:
            self._load_state(saved)
            raise
        if all(map(math.isfinite, values)):
            return values
        count = len(stepped)
        grad_norms, param_norms = values[len(stats):len(stats) + count], values[len(stats) + count:]
        finite_params = [math.isfinite(v) or bool(torch.isfinite(p).all()) for v, p in zip(param_norms, params)]
        finite_grads = [math.isfinite(v) or bool(torch.isfinite(g).all()) for v, (_, _, g) in zip(grad_norms, stepped)]
        if all(map(math.isfinite, values[:len(stats)])) and all(finite_params) and all(finite_grads):
            return values  # a norm overflowed; every element is finite
        self._load_state(saved)
        if step is None:
            bad = next(i for i, ok in enumerate(finite_grads) if not ok) if not all(finite_grads) else None
            if bad is not None:
                raise DivergenceError(f".grad of {self._group_name(stepped[bad][0])} is not finite; nothing was changed")
        else:
            self._raise_non_finite(grads or {}, dict(zip(stats, values)), step)
        index = next(i for i, ok in enumerate(finite_params) if not ok)
        raise DivergenceError(f"the update of {self._group_name(stepped[index][0])} is not finite: "
                              "the step diverged; nothing was changed")

    def _save_state(self, params: list[Tensor]) -> list[tuple[Tensor, Tensor, dict | None]]:
        saved = []
        for p in params:
            entry = self.state.get(p)
            kept = None if entry is None else {k: v.clone() if isinstance(v, Tensor) else copy.deepcopy(v)
                                               for k, v in entry.items()}
            saved.append((p, p.detach().clone(), kept))
        return saved

    def _load_state(self, saved) -> None:
        for p, value, kept in saved:
            p.copy_(value)
            if kept is None:
                self.state.pop(p, None)
                continue
            entry = self.state[p]
            for k in [k for k in entry if k not in kept]:
                del entry[k]
            for k, v in kept.items():
                old = entry.get(k)
                if isinstance(v, Tensor) and isinstance(old, Tensor) and old.shape == v.shape and old.dtype == v.dtype:
                    old.copy_(v)  # in place: its address (a CUDA graph input) stays
                else:
                    entry[k] = v

    def _raise_non_finite(self, grads, values: dict[str, float], step: _Step) -> None:
        """Raise for a step whose statistics, guard or gradients are not finite: ``ValueError``
        naming the batch argument or parameter at fault, else ``DivergenceError``. Returns when all
        are finite (the update is what overflowed)."""
        bad_stats = [name for name, v in values.items() if not math.isfinite(v)]
        bad_grads = [p for p, g in grads.items() if not bool(torch.isfinite(g).all())]
        if not bad_stats and not bad_grads:
            return
        self._raise_for_inputs(step)
        if bad_stats == [_GUARD]:
            raise ValueError("y: class labels out of range in another rank's batch; nothing was changed")
        hint = "(lower the learning rates or inference_lr)"
        if bad_stats:
            raise DivergenceError(f"{bad_stats[0]} is {values[bad_stats[0]]}: the step diverged; nothing was "
                                  f"changed {hint}")
        module, kind = next((m, k) for m, k, p in self._slots if p is bad_grads[0])
        raise DivergenceError(f"gradient of {self._layer_name(module)} {kind} is not finite: the step diverged; "
                              f"nothing was changed {hint}")

    def _raise_for_inputs(self, step: _Step) -> None:
        """The ``ValueError`` naming a batch argument or model parameter that is not valid and finite."""
        x, y, target = step.x, step.y, step.target
        check_batch(x, y, self.mlp.weights(), self._setting("loss"))  # the ValueError naming the argument
        for name, t in (("x", x), ("y", target)):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: contains NaN or infinite values")
        for module, kind, p in self._slots:
            if not bool(torch.isfinite(p).all()):
                raise ValueError(f"{self._layer_name(module)} {kind}: contains NaN or infinite values "
                                 "(the model was not finite before this step)")

    # ------------------------------------------------------------------ copies

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer keeps only defaults, state and param_groups; a pcfast optimizer also
        # needs its model view, inner optimizer, parametrization and algorithm state (copy.deepcopy, pickle).
        state = dict(self.__dict__)
        state.pop("_written_grads", None)  # weak references to .grad tensors: bookkeeping, not state
        state.pop("_settings", None)  # derived from the groups, made again on the next step
        state.pop("_tables", None)  # constant tensors, made again when needed
        for name in [k for k, v in state.items() if callable(v) and hasattr(type(self), k)]:
            del state[name]  # e.g. the step wrapper an lr_scheduler patches in, bound to this optimizer
        state.pop("_opt_called", None)
        # A process group cannot be copied: a copy reduces over the default group if it did, else none.
        group = state.get("process_group")
        state["process_group"] = (distributed.AUTO if group is not None and group is torch.distributed.group.WORLD
                                  else None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "mlp" in state:  # a copy (not torch.optim's load_state_dict, which passes state and groups only)
            state["_written_grads"] = {}
            state["process_group"] = distributed.resolve_process_group(state.get("process_group"))
            state.setdefault("_collectives", None)
        super().__setstate__(state)
        # groups torch.optim's load_state_dict made (plain dicts): as the optimizer's own, counted
        self.param_groups = [g if type(g) is _Group else _Group(g) for g in self.param_groups]
        inner = self.__dict__.get("inner_optimizer")
        if inner is not None:
            inner.state = self.state  # one state, also after torch.optim's load_state_dict

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["algo"] = self.algo
        state["optimizer"] = type(self.inner_optimizer).__name__
        state["parametrization"] = self.parametrization.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` of an optimizer of the same algorithm and update rule over a model
        of the same shape.

        The whole state dict is checked first — algorithm, update rule, parameter groups (count, sizes,
        layers, hyperparameters), the inner optimizer's state (shapes, dtypes), parametrization,
        algorithm state — and any mismatch raises ``ValueError``/``TypeError`` with nothing changed.
        Hyperparameters a saved group lacks (saved by an older pcfast) keep this optimizer's values.
        """
        self._check_state_dict(state_dict)
        state_dict = dict(state_dict)
        parametrization = Parametrization.from_state_dict(state_dict.pop("parametrization"))
        state_dict.pop("algo")
        state_dict.pop("optimizer", None)
        state_dict["param_groups"] = [{**{k: v for k, v in group.items() if k != "params"}, **saved}
                                      for group, saved in zip(self.param_groups, state_dict["param_groups"])]
        self._load_extra(state_dict)
        super().load_state_dict(state_dict)
        self.parametrization = parametrization

    def _check_state_dict(self, state_dict: Any) -> None:
        name = type(self).__name__
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict: expected a dict from {name}.state_dict(), got {type(state_dict).__name__}")
        missing = [k for k in ("state", "param_groups", "algo", "parametrization") if k not in state_dict]
        if missing:
            raise ValueError(f"state_dict: expected the state_dict() of a pcfast.optim.{name}, but it has no "
                             f"{missing} entries (saved by another optimizer, or by an older pcfast)")
        algo = state_dict["algo"]
        if algo != self.algo:
            raise ValueError(f"state_dict: saved by an optimizer running algo={algo!r}, but this {name} runs "
                             f"algo={self.algo!r}; load it into the optimizer that saved it")
        inner = type(self.inner_optimizer).__name__
        saved_rule = state_dict.get("optimizer", "SGD")  # older states: SGD, the only rule then
        if saved_rule != inner:
            raise ValueError(f"state_dict: saved by an optimizer updating with {saved_rule}, but this {name} "
                             f"updates with {inner}; build it with optimizer=torch.optim.{saved_rule}")
        saved_ids = self._check_saved_groups(state_dict["param_groups"])
        state = state_dict["state"]
        if not isinstance(state, dict):
            raise TypeError(f"state_dict['state']: expected a dict, got {type(state).__name__}")
        for pid, entry in state.items():
            where = f"state_dict['state'][{pid!r}]"
            if pid not in saved_ids:
                raise ValueError(f"{where}: no parameter group holds parameter id {pid!r}")
            self._check_saved_entry(where, entry, saved_ids[pid])
        try:
            parametrization = Parametrization.from_state_dict(state_dict["parametrization"])
        except (TypeError, KeyError, AttributeError, ValueError) as error:
            raise ValueError(f"state_dict['parametrization']: not a saved pcfast parametrization ({error})") from None
        self._check_parametrization(parametrization, "state_dict['parametrization']")
        self._check_extra(state_dict)

    def _check_saved_groups(self, saved_groups: Any) -> dict[Any, Tensor]:
        """Check the saved parameter groups against ours; return saved parameter id -> parameter."""
        if not isinstance(saved_groups, list) or not all(isinstance(g, dict) for g in saved_groups):
            raise TypeError("state_dict['param_groups']: expected a list of dicts")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict['param_groups']: has {len(saved_groups)} groups, this optimizer "
                             f"{len(self.param_groups)} (one per weight and bias, plus any add_param_group)")
        saved_ids: dict[Any, Tensor] = {}
        added_later = getattr(self.options, "added_later", ())  # absent from states saved before them
        algo_keys = [k for k in self._setting_names
                     if k not in self._inner_keys and k not in _MULTIPLIERS[1:] and k not in added_later]
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"state_dict['param_groups'][{i}]"
            required = ["params", *_REQUIRED, *algo_keys, *(_LAYER_KEYS if i < self._model_groups else ())]
            absent = [k for k in dict.fromkeys(required) if k not in saved]
            if absent:
                raise ValueError(f"{where}: has no {absent} entries")
            if not isinstance(saved["params"], list) or len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{where}['params']: expected {len(group['params'])} parameter ids, got "
                                 f"{saved['params']!r}")
            for key in ("layer", "kind"):
                if i < self._model_groups and saved[key] != group[key]:
                    raise ValueError(f"{where}['{key}']: expected {group[key]!r}, got {saved[key]!r}")
            for key in _REQUIRED:
                _check_number(f"{where}['{key}']", saved[key])
            for key in self._setting_names:
                if key in saved and not _saved_value_fits(saved[key], self.defaults[key]):
                    default = self.defaults[key]
                    kind = ("a bool" if isinstance(default, bool) else "None or a number" if default is None
                            else type(default).__name__)
                    raise TypeError(f"{where}['{key}']: expected {kind} like {self.defaults[key]!r}, got {saved[key]!r}")
            for pid, p in zip(saved["params"], group["params"]):
                if pid in saved_ids:
                    raise ValueError(f"{where}['params']: parameter id {pid!r} appears twice")
                saved_ids[pid] = p
        return saved_ids

    @staticmethod
    def _check_saved_entry(where: str, entry: Any, p: Tensor) -> None:
        """A saved inner-optimizer state entry: a dict whose per-element state (momentum buffers,
        Adam's moments) has the parameter's shape and dtype; other entries (step counts, NAdam's
        ``mu_product``, …) are the update rule's to read."""
        if not isinstance(entry, dict) or not all(isinstance(k, str) for k in entry):
            raise ValueError(f"{where}: expected a dict of named state tensors such as "
                             f"{{'momentum_buffer': tensor}}, got {entry!r:.200}")
        for key, value in entry.items():
            if value is None or key not in _PER_ELEMENT_STATE:
                continue
            if not isinstance(value, Tensor) or value.shape != p.shape or value.dtype != p.dtype:
                raise ValueError(f"{where}['{key}']: expected shape {tuple(p.shape)}, dtype {p.dtype} "
                                 f"(its parameter's), got {_describe(value)}")

    def _check_extra(self, state_dict: dict[str, Any]) -> None:
        """Raise ValueError/TypeError if the algorithm state in ``state_dict`` does not fit; change nothing."""

    def _load_extra(self, state_dict: dict[str, Any]) -> None:
        """Pop and load algorithm state (feedback weights, generators) from ``state_dict`` (checked
        by ``_check_extra`` before anything is loaded)."""

    def __repr__(self) -> str:
        keys = [k for k in self.defaults if k not in ("lr", *_MULTIPLIERS)]
        settings = ", ".join(f"{k}={self.param_groups[0][k]!r}" for k in keys)
        inner = type(self.inner_optimizer).__name__
        return f"{type(self).__name__}(lr={self.defaults['lr']}, optimizer={inner}, {settings}, layers={self.mlp.depth})"
