"""What every pcfast optimizer shares: μP parameter groups, SGD, and all-or-nothing steps.

A pcfast optimizer is a ``torch.optim.Optimizer`` over the linear layers of an MLP with one
parameter group per weight and per bias. Every group's ``lr`` is the base learning rate η (the same
in every group) and its ``lr_mult`` the layer's μP multiplier; the update uses ``lr · lr_mult``, so
any ``lr_scheduler`` — one that scales each group (StepLR, CosineAnnealingLR, ReduceLROnPlateau) or
one that writes a single rate into every group (OneCycleLR, CyclicLR with a scalar ``max_lr``) —
keeps the μP ratios between layers. ``step(x, y)`` computes the algorithm's local gradients, writes
them to ``.grad`` and applies SGD (momentum, dampening, Nesterov, weight decay as in
``torch.optim.SGD``). ``step()`` without a batch applies SGD to the ``.grad`` already there — so
``compute_gradients(x, y)`` (which adds into ``.grad`` as ``backward()`` does), then clipping or
hooks, then ``step()`` also works.

Everything new is computed out of place and checked before anything is written: a non-finite
energy, gradient or update raises ``DivergenceError``, and a corrupted momentum buffer, a changed
model or a mismatched ``state_dict`` a ``ValueError``, with parameters, ``.grad`` and optimizer state
exactly as they were.

Data parallel (``pcfast.distributed``): with a process group (``process_group="auto"`` finds an
initialised default group of more than one rank) each rank passes its shard of the batch to
``step(x, y)``/``compute_gradients(x, y)``; the local gradients and statistics — batch means — are
averaged over the group's samples, weighted by shard size, in one all-reduce of one flat buffer per
step (TP/DTP add their feedback collectives), after which every rank checks and applies the same
values. The checks come after the reduction and a failure on one rank is reported to all in the
step's next collective, so every rank raises, and none changes anything.
"""
from __future__ import annotations

import math
import operator
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from ..errors import DivergenceError
from ..mup.presets import Parametrization, standard
from ..network import MLP, check_batch, parse_mlp
from ..sgd import LayerSGD, sgd_update

# Keys of the model's parameter groups beside ``defaults`` (which hold ``lr_mult``).
_LAYER_KEYS = ("layer", "kind")
# The SGD hyperparameters every group carries, checked in ``load_state_dict``.
_SGD_NUMBERS = ("lr", "lr_mult", "momentum", "dampening", "weight_decay")


def _check_number(name: str, value: Any, *, low: float = 0.0, inclusive: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if inclusive else value > low)
    if not ok:
        raise ValueError(f"{name}: expected a finite number {'>=' if inclusive else '>'} {low}, got {value!r}")


def _describe(t: Any) -> str:
    if not isinstance(t, Tensor):
        return type(t).__name__
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


class LocalOptimizer(torch.optim.Optimizer):
    """Base class: parameter groups from a parametrization, SGD, transactional steps.

    The contract every subclass shares:

    * ``param_groups[i]["lr"]`` is the base rate (shared), ``param_groups[i]["lr_mult"]`` the layer's
      μP multiplier; SGD steps with ``lr · lr_mult``.
    * A parameter with ``requires_grad=False`` is frozen, as with ``torch.optim``: the algorithm still
      uses it in the network, but no ``.grad`` is written for it and it is never updated (checked at
      every step, so freezing and unfreezing between steps works).
    * ``compute_gradients(x, y)`` adds the local gradients into ``.grad`` (creating it when None), as
      ``backward()`` does, so micro-batches accumulate; ``step(x, y)`` trains on one batch: it
      replaces ``.grad`` with that batch's gradients and applies them.
    * ``step()`` without a batch applies SGD to ``.grad`` as it is; an algorithm other than BP warns
      once (``UserWarning``) if it finds a ``.grad`` that ``compute_gradients``/``step(x, y)`` did not
      write (e.g. from ``loss.backward()``), since that step is then plain SGD on those gradients.
    * ``add_param_group`` works as in ``torch.optim.SGD``: the added parameters (not the model's)
      are updated with plain SGD (``lr · lr_mult``, ``lr_mult`` 1 unless given) from their own
      ``.grad``, which the caller computes (e.g. with ``backward()``).
    * The model's layers and parameters are recorded when the optimizer is built; replacing a
      ``weight``/``bias`` Parameter or a module of the model afterwards raises ``ValueError`` at the
      next step (build a new optimizer for the changed model).
    * ``load_state_dict`` checks the whole state dict (algorithm, groups, momentum buffers,
      parametrization, algorithm state) before changing anything.
    * ``process_group`` (``"auto"``, None or a ``ProcessGroup``; see ``pcfast.distributed``): with
      a group of more than one rank each rank steps on its shard of the batch and every rank applies
      the full batch's update; the first rank's model is copied to the others when the optimizer is
      built. ``state_dict`` is the same as without a group.
    """

    algo = "any"
    # The statistics ``_local_gradients`` returns, in order (batch means; data parallel reduces them).
    stat_names: tuple[str, ...] = ("loss",)

    def __init__(
        self,
        model: nn.Module,
        parametrization: Parametrization | None,
        *,
        lr: float,
        momentum: float,
        dampening: float,
        weight_decay: float,
        nesterov: bool,
        backend: str,
        process_group: Any = distributed.AUTO,
        **algo_defaults: Any,
    ) -> None:
        _check_number("lr", lr, inclusive=False)
        _check_number("momentum", momentum)
        _check_number("dampening", dampening)
        _check_number("weight_decay", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov: requires momentum > 0 and dampening = 0")
        from ..ops import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.mlp: MLP = parse_mlp(model)
        if parametrization is None:
            parametrization = standard(model)
        elif not isinstance(parametrization, Parametrization):
            raise TypeError(
                f"parametrization: expected the result of pcfast.parametrize(model, ...), got {type(parametrization).__name__}"
            )
        self._check_parametrization(parametrization, "parametrization")
        self.parametrization = parametrization
        groups = []
        for l, (lin, scale) in enumerate(zip(self.mlp.linears, parametrization.layers)):
            groups.append({"params": [lin.weight], "lr": lr, "lr_mult": scale.lr_mult, "layer": l, "kind": "weight"})
            if lin.bias is not None:
                groups.append({"params": [lin.bias], "lr": lr, "lr_mult": scale.bias_lr_mult, "layer": l, "kind": "bias"})
        defaults = dict(lr=lr, lr_mult=1.0, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, backend=backend, **algo_defaults)
        self._setting_names = tuple(defaults)  # torch may add keys to self.defaults later
        super().__init__(groups, defaults)
        self._model_groups = len(groups)  # groups after these came from add_param_group
        # (module, its parameter name, the Parameter) per model parameter, in model order
        self._slots = [(lin, kind, getattr(lin, kind)) for lin in self.mlp.linears
                       for kind in ("weight", "bias") if getattr(lin, kind) is not None]
        self._shapes = [p.shape for _, _, p in self._slots]
        # every module of the model that has children, with its children as they were
        self._structure = [(name, module, tuple(module._modules.values()))
                           for name, module in model.named_modules() if module._modules]
        self._written_grads: dict[Tensor, weakref.ref] = {}  # param -> the .grad tensor we last wrote
        self._warned_foreign_grads = False
        self._stepping = False  # True inside step(x, y): see _layer_sgd
        self.process_group = distributed.resolve_process_group(process_group)
        self._collectives: distributed.StepCollectives | None = None  # during a data-parallel step
        if self.process_group is not None:  # every rank starts from the first rank's model, as with DDP
            distributed.broadcast_from_first_rank([p for _, _, p in self._slots], self.process_group)

    # ------------------------------------------------------------------ hyperparameters

    def _setting(self, name: str) -> Any:
        """An algorithm-level setting (the same in every group; read from the first)."""
        return self.param_groups[0][name]

    def _params(self) -> tuple[list[Tensor], list[Tensor | None]]:
        return [lin.weight for lin in self.mlp.linears], [lin.bias for lin in self.mlp.linears]

    def _check_batch(self, x: Tensor, y: Tensor) -> None:
        weights, _ = self._params()
        check_batch(x, y, weights, self._setting("loss"))

    def _check_parametrization(self, parametrization: Parametrization, name: str) -> None:
        parametrization.check_matches(self.mlp)
        if parametrization.algo not in ("any", self.algo) and not (
            {parametrization.algo, self.algo} <= {"tp", "dtp"}
        ):
            raise ValueError(
                f"{name}: made for algo={parametrization.algo!r}, but this optimizer runs "
                f"{self.algo!r}; call pcfast.parametrize(model, ..., algo={self.algo!r})"
            )

    # ------------------------------------------------------------------ algorithm hook

    def _local_gradients(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], list[Tensor | None], dict[str, Tensor], dict]:
        """The algorithm: (weight grads, bias grads, stats, pending extra state to commit)."""
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
        return [sum(p.numel() for _, _, p in self._slots) + len(self.stat_names)]

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
            weight_grads, bias_grads, stats, pending = self._guarded_gradients(
                x, y, before=(self._check_ready, self._check_grads_fit,
                              lambda: self._warn_if_foreign_grads("compute_gradients")))
        except BaseException:
            self._restore(snapshot)
            raise
        self._commit_extra(pending)
        self._write_grads(weight_grads, bias_grads, accumulate=True)
        return {k: float(v) for k, v in stats.items()}

    @torch.no_grad()
    def step(self, x: Tensor | None = None, y: Tensor | None = None, closure=None) -> dict[str, float] | None:  # type: ignore[override]
        """One training step on batch ``(x, y)``; without a batch, apply SGD to the current ``.grad``.

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
            weight_grads = [lin.weight.grad for lin in self.mlp.linears]
            bias_grads = [None if lin.bias is None else lin.bias.grad for lin in self.mlp.linears]
            updates = self._sgd_updates(weight_grads, bias_grads)
            self._commit_updates(updates)
            return None
        snapshot = self._snapshot()
        self._stepping = True  # lets _local_gradients ask the backend for the SGD step too (_layer_sgd)
        try:
            weight_grads, bias_grads, stats, pending = self._guarded_gradients(x, y, before=(self._check_ready,))
            updates = self._sgd_updates(weight_grads, bias_grads, pending.pop("sgd_updates", None))
        except BaseException:
            self._restore(snapshot)
            raise
        finally:
            self._stepping = False
        self._commit_extra(pending)
        self._write_grads(weight_grads, bias_grads, accumulate=False)
        self._commit_updates(updates)
        return {k: float(v) for k, v in stats.items()}

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
        for (module, kind, param), shape in zip(self._slots, self._shapes):
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
            buffer = entry.get("momentum_buffer")
            # (a buffer on another device fails inside the out-of-place update, before any write)
            if buffer is not None and not (isinstance(buffer, Tensor) and buffer.shape == p.shape
                                           and buffer.dtype == p.dtype):
                index = next((i for i, group in enumerate(self.param_groups) if any(q is p for q in group["params"])), None)
                name = "a parameter in no group" if index is None else self._group_name(index)
                raise ValueError(
                    f"optimizer state: the momentum buffer of {name} has {_describe(buffer)}, "
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
        if self.algo == "bp" or self._warned_foreign_grads:
            return
        for module, kind, p in self._slots:
            written = self._written_grads.get(p)
            if p.grad is not None and p.requires_grad and (written is None or written() is not p.grad):
                self._warned_foreign_grads = True
                name = type(self).__name__
                warnings.warn(
                    f"{name}.{where}(): the .grad of {self._layer_name(module)} {kind} was not written by "
                    f"{name}.compute_gradients or {name}.step(x, y) (e.g. it comes from loss.backward()); "
                    f"{'it is applied as plain SGD' if where == 'step' else 'the local gradients are added to it'}, "
                    f"which is not {self.algo.upper()} training. Call optimizer.zero_grad() and "
                    "step(x, y) or compute_gradients(x, y). (Warned once per optimizer.)",
                    UserWarning, stacklevel=3,
                )
                return

    # ------------------------------------------------------------------ internals

    def _guarded_gradients(self, x, y, before=()):
        """The batch's gradients, statistics and pending state, averaged over the process group if
        there is one, then checked: ``before`` (checks), the batch check and ``_local_gradients`` run
        first; with a group, a failure anywhere up to the last all-reduce is reported to every rank
        (``StepCollectives.abandon``), and the finiteness checks see the reduced values, the same on
        every rank."""
        group = self.process_group
        if group is None:
            for check in before:
                check()
            self._check_batch(x, y)
            weight_grads, bias_grads, stats, pending = self._local_gradients(x, y)
        else:
            self._collectives = collectives = distributed.StepCollectives(
                group, self._collective_plan(), self.mlp.linears[0].weight)
            try:
                for check in before:
                    check()
                self._check_batch(x, y)
                weight_grads, bias_grads, stats, pending = self._local_gradients(x, y)
                if tuple(stats) != self.stat_names:
                    raise RuntimeError(f"{type(self).__name__}: statistics {tuple(stats)} differ from stat_names "
                                       f"{self.stat_names} (an internal inconsistency)")
                depth = len(weight_grads)
                like = weight_grads[0]
                values = [torch.as_tensor(v, dtype=like.dtype, device=like.device) for v in stats.values()]
                reduced, _ = collectives.mean([*weight_grads, *bias_grads, *values], x.shape[0])
            except Exception as error:
                collectives.abandon(error)
            finally:
                self._collectives = None
            weight_grads, bias_grads = reduced[:depth], reduced[depth:2 * depth]
            stats = dict(zip(self.stat_names, reduced[2 * depth:]))
        for name, value in stats.items():
            if not bool(torch.isfinite(torch.as_tensor(value))):
                raise DivergenceError(f"{name} is {float(value)}: the step diverged; nothing was changed "
                                      "(lower the learning rates or inference_lr)")
        for l, (gw, gb) in enumerate(zip(weight_grads, bias_grads)):
            for kind, g in (("weight", gw), ("bias", gb)):
                if g is not None and not bool(torch.isfinite(g).all()):
                    raise DivergenceError(f"gradient of layer {l + 1} {kind} is not finite: the step diverged; "
                                          "nothing was changed")
        return weight_grads, bias_grads, stats, pending

    def _write_grads(self, weight_grads, bias_grads, *, accumulate: bool) -> None:
        for lin, gw, gb in zip(self.mlp.linears, weight_grads, bias_grads):
            for p, g in ((lin.weight, gw), (lin.bias, gb)):
                if p is None or not p.requires_grad:
                    continue
                grad = p.grad
                if grad is None or (not accumulate and (grad.shape != g.shape or grad.dtype != g.dtype)):
                    p.grad = g.clone()
                elif accumulate:
                    grad.add_(g)  # its shape and dtype were checked before the step (_check_grads_fit)
                else:
                    grad.copy_(g)
                self._written_grads[p] = weakref.ref(p.grad)

    def _layer_sgd(self) -> list[LayerSGD] | None:
        """Each layer's SGD step (``pcfast.sgd.LayerSGD``) for a backend to compute with the gradients
        — during ``step(x, y)`` only, and when a layer's weight and bias share their settings, no
        parameter is frozen and every value is finite (a non-finite rate must reach the
        DivergenceError check below)."""
        if not self._stepping or self.process_group is not None:  # data parallel: SGD after the reduction
            return None
        groups = self.param_groups
        steps = []
        index = 0
        for lin in self.mlp.linears:
            mine = [groups[index]] if lin.bias is None else [groups[index], groups[index + 1]]
            index += len(mine)
            keys = ("momentum", "dampening", "weight_decay", "nesterov")
            if any(g[k] != mine[0][k] for g in mine for k in keys):
                return None
            if not all(p.requires_grad for g in mine for p in g["params"]):
                return None
            rates = [g["lr"] * g["lr_mult"] for g in mine]
            if not all(math.isfinite(r) and r >= 0 for r in rates):
                return None
            first = mine[0]
            buffers = [self.state.get(p, {}).get("momentum_buffer") if first["momentum"] and p is not None else None
                       for p in (lin.weight, lin.bias)]  # .get: reading must not create state entries
            if lin.bias is not None and (buffers[0] is None) != (buffers[1] is None):
                return None  # one of them was frozen for a while: momentum starts afresh for one only
            steps.append(LayerSGD(
                weight_lr=rates[0], bias_lr=rates[-1] if lin.bias is not None else 0.0,
                momentum=first["momentum"], dampening=first["dampening"], weight_decay=first["weight_decay"],
                nesterov=first["nesterov"], weight_buffer=buffers[0], bias_buffer=buffers[1],
            ))
        return steps

    def _sgd_updates(self, weight_grads, bias_grads, computed=None) -> list[tuple[Tensor, Tensor, dict, Tensor | None]]:
        """New values (parameter, new parameter, state, new momentum buffer), all out of place;
        ``computed``: (new parameter, new buffer) per parameter in model order, from the backend.
        Parameters of groups added with ``add_param_group`` are updated from their own ``.grad``."""
        grads, done = {}, {}
        if computed is not None:
            done = dict(zip((p for _, _, p in self._slots), computed))
        for lin, gw, gb in zip(self.mlp.linears, weight_grads, bias_grads):
            grads[lin.weight] = gw
            if lin.bias is not None:
                grads[lin.bias] = gb
        updates = []
        for i, group in enumerate(self.param_groups):
            lr, momentum = group["lr"] * group["lr_mult"], group["momentum"]
            for p in group["params"]:
                g = grads.get(p) if i < self._model_groups else p.grad
                if g is None or not p.requires_grad:
                    continue
                if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                    raise ValueError(f"{self._group_name(i)} .grad: expected {_describe(p)} (the parameter's), "
                                     f"got {_describe(g)}")
                if p in done:
                    new, buf = done[p]
                else:
                    new, buf = sgd_update(
                        p, g, lr=lr, momentum=momentum, dampening=group["dampening"],
                        weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                        buffer=self.state.get(p, {}).get("momentum_buffer") if momentum else None,
                    )
                if not bool(torch.isfinite(new).all()):
                    raise DivergenceError(f"the update of {self._group_name(i)} is not finite: "
                                          "the step diverged; nothing was changed")
                updates.append((p, new, momentum != 0, buf))  # state is created on commit only
        return updates

    def _commit_updates(self, updates) -> None:
        for p, new, has_momentum, buf in updates:
            p.copy_(new)
            if has_momentum:
                state = self.state[p]
                old = state.get("momentum_buffer")
                if old is not None and old.shape == buf.shape and old.dtype == buf.dtype:
                    old.copy_(buf)  # in place, as torch.optim.SGD: its address (a CUDA graph input) stays
                else:
                    state["momentum_buffer"] = buf

    # ------------------------------------------------------------------ copies

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer keeps only defaults, state and param_groups; a pcfast optimizer also
        # needs its model view, parametrization and algorithm state (copy.deepcopy, pickle).
        state = dict(self.__dict__)
        state.pop("_written_grads", None)  # weak references to .grad tensors: bookkeeping, not state
        # A process group cannot be copied: a copy reduces over the default group if it did, else none.
        group = state.get("process_group")
        state["process_group"] = (distributed.AUTO if group is not None and group is torch.distributed.group.WORLD
                                  else None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["_written_grads"] = {}
        state["process_group"] = distributed.resolve_process_group(state.get("process_group"))
        state.setdefault("_collectives", None)
        super().__setstate__(state)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["algo"] = self.algo
        state["parametrization"] = self.parametrization.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``state_dict()`` of an optimizer of the same algorithm over a model of the same shape.

        The whole state dict is checked first — algorithm, parameter groups (count, sizes, layers,
        hyperparameters), momentum buffers (shape, dtype), parametrization, algorithm state — and any
        mismatch raises ``ValueError``/``TypeError`` with nothing changed.
        """
        self._check_state_dict(state_dict)
        state_dict = dict(state_dict)
        parametrization = Parametrization.from_state_dict(state_dict.pop("parametrization"))
        state_dict.pop("algo")
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
        saved_groups, state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved_groups, list) or not all(isinstance(g, dict) for g in saved_groups):
            raise TypeError("state_dict['param_groups']: expected a list of dicts")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict['param_groups']: has {len(saved_groups)} groups, this optimizer "
                             f"{len(self.param_groups)} (one per weight and bias, plus any add_param_group)")
        saved_ids: dict[Any, Tensor] = {}
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"state_dict['param_groups'][{i}]"
            required = ["params", *self._setting_names, *(_LAYER_KEYS if i < self._model_groups else ())]
            absent = [k for k in required if k not in saved]
            if absent:
                raise ValueError(f"{where}: has no {absent} entries")
            if not isinstance(saved["params"], list) or len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{where}['params']: expected {len(group['params'])} parameter ids, got "
                                 f"{saved['params']!r}")
            for key in ("layer", "kind"):
                if i < self._model_groups and saved[key] != group[key]:
                    raise ValueError(f"{where}['{key}']: expected {group[key]!r}, got {saved[key]!r}")
            for key in _SGD_NUMBERS:
                _check_number(f"{where}['{key}']", saved[key])
            if not isinstance(saved["nesterov"], bool):
                raise TypeError(f"{where}['nesterov']: expected a bool, got {saved['nesterov']!r}")
            for key in self._setting_names:
                mine = self.defaults[key]
                if key not in _SGD_NUMBERS and key != "nesterov" and type(saved[key]) is not type(mine):
                    raise TypeError(f"{where}['{key}']: expected a {type(mine).__name__}, got {saved[key]!r}")
            for pid, p in zip(saved["params"], group["params"]):
                if pid in saved_ids:
                    raise ValueError(f"{where}['params']: parameter id {pid!r} appears twice")
                saved_ids[pid] = p
        if not isinstance(state, dict):
            raise TypeError(f"state_dict['state']: expected a dict, got {type(state).__name__}")
        for pid, entry in state.items():
            where = f"state_dict['state'][{pid!r}]"
            if pid not in saved_ids:
                raise ValueError(f"{where}: no parameter group holds parameter id {pid!r}")
            if not isinstance(entry, dict) or set(entry) - {"momentum_buffer"}:
                raise ValueError(f"{where}: expected {{'momentum_buffer': tensor}}, got {entry!r:.200}")
            buffer, p = entry.get("momentum_buffer"), saved_ids[pid]
            if buffer is None:
                continue
            if not isinstance(buffer, Tensor) or buffer.shape != p.shape or buffer.dtype != p.dtype:
                raise ValueError(f"{where}['momentum_buffer']: expected shape {tuple(p.shape)}, dtype {p.dtype} "
                                 f"(its parameter's), got {_describe(buffer)}")
        try:
            parametrization = Parametrization.from_state_dict(state_dict["parametrization"])
        except (TypeError, KeyError, AttributeError, ValueError) as error:
            raise ValueError(f"state_dict['parametrization']: not a saved pcfast parametrization ({error})") from None
        self._check_parametrization(parametrization, "state_dict['parametrization']")
        self._check_extra(state_dict)

    def _check_extra(self, state_dict: dict[str, Any]) -> None:
        """Raise ValueError/TypeError if the algorithm state in ``state_dict`` does not fit; change nothing."""

    def _load_extra(self, state_dict: dict[str, Any]) -> None:
        """Pop and load algorithm state (feedback weights, generators) from ``state_dict`` (checked
        by ``_check_extra`` before anything is loaded)."""

    def __repr__(self) -> str:
        keys = [k for k in self.defaults if k not in ("lr", "lr_mult")]
        settings = ", ".join(f"{k}={self.param_groups[0][k]!r}" for k in keys)
        return f"{type(self).__name__}(lr={self.defaults['lr']}, {settings}, layers={self.mlp.depth})"
