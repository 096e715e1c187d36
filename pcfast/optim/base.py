"""What every pcfast optimizer shares: μP parameter groups, SGD, and all-or-nothing steps.

A pcfast optimizer is a ``torch.optim.Optimizer`` over the linear layers of an MLP with one
parameter group per weight and per bias, whose ``lr`` is the base learning rate times the layer's μP
multiplier (so ``lr_scheduler``s scale every layer alike). ``step(x, y)`` computes the algorithm's
local gradients, writes them to ``.grad`` and applies SGD (momentum, dampening, Nesterov, weight
decay as in ``torch.optim.SGD``). ``step()`` without a batch applies SGD to the ``.grad`` already
there — so ``compute_gradients(x, y)``, then clipping or hooks, then ``step()`` also works.

Everything new is computed out of place and checked before anything is written: a non-finite
energy, gradient or update raises ``DivergenceError`` with parameters, ``.grad`` and optimizer state
exactly as they were.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import DivergenceError
from ..mup.presets import Parametrization, standard
from ..network import MLP, check_batch, parse_mlp
from ..sgd import LayerSGD, sgd_update


def _check_number(name: str, value: Any, *, low: float = 0.0, inclusive: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if inclusive else value > low)
    if not ok:
        raise ValueError(f"{name}: expected a finite number {'>=' if inclusive else '>'} {low}, got {value!r}")


class LocalOptimizer(torch.optim.Optimizer):
    """Base class: parameter groups from a parametrization, SGD, transactional steps."""

    algo = "any"

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
        parametrization.check_matches(self.mlp)
        if parametrization.algo not in ("any", self.algo) and not (
            {parametrization.algo, self.algo} <= {"tp", "dtp"}
        ):
            raise ValueError(
                f"parametrization: made for algo={parametrization.algo!r}, but this optimizer runs "
                f"{self.algo!r}; call pcfast.parametrize(model, ..., algo={self.algo!r})"
            )
        self.parametrization = parametrization
        groups = []
        for l, (lin, scale) in enumerate(zip(self.mlp.linears, parametrization.layers)):
            groups.append({"params": [lin.weight], "lr": lr * scale.lr_mult, "layer": l, "kind": "weight"})
            if lin.bias is not None:
                groups.append({"params": [lin.bias], "lr": lr * scale.bias_lr_mult, "layer": l, "kind": "bias"})
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, backend=backend, **algo_defaults)
        super().__init__(groups, defaults)
        self._stepping = False  # True inside step(x, y): see _layer_sgd

    # ------------------------------------------------------------------ hyperparameters

    def _setting(self, name: str) -> Any:
        """An algorithm-level setting (the same in every group; read from the first)."""
        return self.param_groups[0][name]

    def _params(self) -> tuple[list[Tensor], list[Tensor | None]]:
        return [lin.weight for lin in self.mlp.linears], [lin.bias for lin in self.mlp.linears]

    def _check_batch(self, x: Tensor, y: Tensor) -> None:
        weights, _ = self._params()
        check_batch(x, y, weights, self._setting("loss"))

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

    # ------------------------------------------------------------------ public API

    @torch.no_grad()
    def compute_gradients(self, x: Tensor, y: Tensor) -> dict[str, float]:
        """Compute the local gradients for a batch and write them to ``.grad``; return stats."""
        snapshot = self._snapshot()
        try:
            weight_grads, bias_grads, stats, pending = self._guarded_gradients(x, y)
        except BaseException:
            self._restore(snapshot)
            raise
        self._commit_extra(pending)
        self._write_grads(weight_grads, bias_grads)
        return {k: float(v) for k, v in stats.items()}

    @torch.no_grad()
    def step(self, x: Tensor | None = None, y: Tensor | None = None, closure=None) -> dict[str, float] | None:  # type: ignore[override]
        """One training step on batch ``(x, y)``; without a batch, apply SGD to the current ``.grad``.

        Returns the step's statistics (loss, energy, …) as floats when a batch is given.
        """
        if closure is not None:
            raise TypeError("closure: pcfast optimizers compute their own gradients; call step(x, y)")
        if (x is None) != (y is None):
            raise TypeError("step: pass both x and y, or neither (to apply the current .grad)")
        if x is None:
            weight_grads = [lin.weight.grad for lin in self.mlp.linears]
            bias_grads = [None if lin.bias is None else lin.bias.grad for lin in self.mlp.linears]
            updates = self._sgd_updates(weight_grads, bias_grads)
            self._commit_updates(updates)
            return None
        snapshot = self._snapshot()
        self._stepping = True  # lets _local_gradients ask the backend for the SGD step too (_layer_sgd)
        try:
            weight_grads, bias_grads, stats, pending = self._guarded_gradients(x, y)
            updates = self._sgd_updates(weight_grads, bias_grads, pending.pop("sgd_updates", None))
        except BaseException:
            self._restore(snapshot)
            raise
        finally:
            self._stepping = False
        self._commit_extra(pending)
        self._write_grads(weight_grads, bias_grads)
        self._commit_updates(updates)
        return {k: float(v) for k, v in stats.items()}

    # ------------------------------------------------------------------ internals

    def _guarded_gradients(self, x, y):
        self._check_batch(x, y)
        weight_grads, bias_grads, stats, pending = self._local_gradients(x, y)
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

    def _write_grads(self, weight_grads, bias_grads) -> None:
        for lin, gw, gb in zip(self.mlp.linears, weight_grads, bias_grads):
            for p, g in ((lin.weight, gw), (lin.bias, gb)):
                if p is None:
                    continue
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)

    def _layer_sgd(self) -> list[LayerSGD] | None:
        """Each layer's SGD step (``pcfast.sgd.LayerSGD``) for a backend to compute with the gradients
        — during ``step(x, y)`` only, and when a layer's weight and bias share their settings and
        every value is finite (a non-finite rate must reach the DivergenceError check below)."""
        if not self._stepping:
            return None
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        steps = []
        for lin in self.mlp.linears:
            groups = [group_of[id(p)] for p in (lin.weight, lin.bias) if p is not None]
            keys = ("momentum", "dampening", "weight_decay", "nesterov")
            if any(g[k] != groups[0][k] for g in groups for k in keys):
                return None
            first = groups[0]
            if not all(math.isfinite(g["lr"]) and g["lr"] >= 0 for g in groups):
                return None
            buffers = [self.state.get(p, {}).get("momentum_buffer") if first["momentum"] and p is not None else None
                       for p in (lin.weight, lin.bias)]  # .get: reading must not create state entries
            steps.append(LayerSGD(
                weight_lr=first["lr"], bias_lr=groups[-1]["lr"] if lin.bias is not None else 0.0,
                momentum=first["momentum"], dampening=first["dampening"], weight_decay=first["weight_decay"],
                nesterov=first["nesterov"], weight_buffer=buffers[0], bias_buffer=buffers[1],
            ))
        return steps

    def _sgd_updates(self, weight_grads, bias_grads, computed=None) -> list[tuple[Tensor, Tensor, dict, Tensor | None]]:
        """New values (parameter, new parameter, state, new momentum buffer), all out of place;
        ``computed``: (new parameter, new buffer) per parameter in model order, from the backend."""
        grads, done = {}, {}
        params = [p for lin in self.mlp.linears for p in (lin.weight, lin.bias) if p is not None]
        if computed is not None:
            done = dict(zip(params, computed))
        for lin, gw, gb in zip(self.mlp.linears, weight_grads, bias_grads):
            grads[lin.weight] = gw
            if lin.bias is not None:
                grads[lin.bias] = gb
        updates = []
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                g = grads.get(p)
                if g is None:
                    continue
                if p in done:
                    new, buf = done[p]
                else:
                    new, buf = sgd_update(
                        p, g, lr=lr, momentum=momentum, dampening=group["dampening"],
                        weight_decay=group["weight_decay"], nesterov=group["nesterov"],
                        buffer=self.state[p].get("momentum_buffer") if momentum else None,
                    )
                if not bool(torch.isfinite(new).all()):
                    raise DivergenceError(f"the update of layer {group['layer'] + 1} {group['kind']} is not finite: "
                                          "the step diverged; nothing was changed")
                updates.append((p, new, self.state[p] if momentum else None, buf))
        return updates

    @staticmethod
    def _commit_updates(updates) -> None:
        for p, new, state, buf in updates:
            p.copy_(new)
            if state is not None:
                old = state.get("momentum_buffer")
                if old is not None and old.shape == buf.shape and old.dtype == buf.dtype:
                    old.copy_(buf)  # in place, as torch.optim.SGD: its address (a CUDA graph input) stays
                else:
                    state["momentum_buffer"] = buf

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["parametrization"] = self.parametrization.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        par = state_dict.pop("parametrization", None)
        self._load_extra(state_dict)
        super().load_state_dict(state_dict)
        if par is not None:
            parametrization = Parametrization.from_state_dict(par)
            parametrization.check_matches(self.mlp)
            self.parametrization = parametrization

    def _load_extra(self, state_dict: dict[str, Any]) -> None:
        """Pop and load algorithm state (feedback weights, generators) from ``state_dict``."""

    def __repr__(self) -> str:
        keys = [k for k in self.defaults if k not in ("lr",)]
        settings = ", ".join(f"{k}={self.param_groups[0][k]!r}" for k in keys)
        return f"{type(self).__name__}(lr={self.defaults['lr']}, {settings}, layers={self.mlp.depth})"
