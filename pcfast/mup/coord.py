"""Coordinate check: does each layer's update stay the same size as the network widens?

For every width, build the model, parametrize it, take a few optimizer steps on one fixed batch and
record, per layer l and step t, the RMS size of ``Δu_l = h_{l-1}^{(0)} (W_l^{(t)} − W_l^{(0)})ᵀ`` (the
pre-activation change the weight update causes), of the bias step ``b_l^{(t)} − b_l^{(0)}`` (the
pre-activation change the bias update causes, the same for every sample) and of the activity
``h_l^{(t)}``. Under a μP preset every layer's Δu and every bias step is width independent (slope ≈ 0
in log-log); under SP at least one grows or shrinks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..reference.common import forward
from .presets import parametrize

MODULES = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "identity": nn.Identity}


def make_mlp(input_dim: int, width: int, num_classes: int, *, hidden_layers: int = 2,
             activation: str = "tanh", bias: bool = True) -> nn.Sequential:
    """``Linear(input_dim, width), act, (Linear(width, width), act) × (hidden_layers − 1), Linear(width, num_classes)``."""
    layers: list[nn.Module] = []
    dims = [input_dim] + [width] * hidden_layers
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(a, b, bias=bias), MODULES[activation]()]
    layers.append(nn.Linear(dims[-1], num_classes, bias=bias))
    return nn.Sequential(*layers)


def make_optimizer(algo: str, model: nn.Module, par, lr: float, **kwargs: Any):
    """The pcfast optimizer for ``algo``."""
    from .. import optim

    classes = {"bp": optim.BP, "pc": optim.PC, "tp": optim.TP, "dtp": optim.DTP}
    if algo not in classes:
        raise ValueError(f"algo: expected one of {sorted(classes)}, got {algo!r}")
    return classes[algo](model, par, lr=lr, **kwargs)


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    lx = [math.log2(v) for v in xs]
    ly = [math.log2(max(v, 1e-300)) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


@dataclass
class CoordCheck:
    """Measurements of one coordinate check; ``records`` rows are plain dicts (ready for CSV/JSON)."""

    algo: str
    preset: str
    widths: list[int]
    records: list[dict] = field(default_factory=list)

    def series(self, quantity: str = "delta_u", step: int = 1, layer: int = 1) -> list[float]:
        """Mean over seeds of ``quantity`` at ``step`` for ``layer`` (1-based), one value per width."""
        out = []
        for width in self.widths:
            vals = [r[quantity] for r in self.records if r["width"] == width and r["step"] == step and r["layer"] == layer]
            out.append(sum(vals) / len(vals))
        return out

    @property
    def depth(self) -> int:
        return max(r["layer"] for r in self.records)

    def slopes(self, quantity: str = "delta_u", step: int = 1) -> list[float]:
        """Per layer, the slope of log2(quantity) against log2(width).

        ``quantity`` is ``"delta_u"`` (weights), ``"bias_step"`` (biases; layers without a bias are
        skipped) or ``"activation"``."""
        layers = [layer for layer in range(1, self.depth + 1)
                  if all(quantity in r for r in self.records if r["layer"] == layer)]
        return [_slope(self.widths, self.series(quantity, step, layer)) for layer in layers]

    @property
    def has_biases(self) -> bool:
        return any("bias_step" in r for r in self.records)

    def to_dict(self) -> dict:
        """Records and, per step, the slopes of Δu (``slopes``) and of the bias steps (``bias_slopes``)."""
        steps = sorted({r["step"] for r in self.records})
        out = {
            "algo": self.algo, "preset": self.preset, "widths": self.widths, "records": self.records,
            "slopes": {str(t): self.slopes("delta_u", t) for t in steps},
        }
        if self.has_biases:
            out["bias_slopes"] = {str(t): self.slopes("bias_step", t) for t in steps}
        return out


def coord_check(
    widths: Sequence[int] = (64, 128, 256, 512, 1024, 2048),
    *,
    algo: str = "pc",
    preset: str = "mup",
    base_width: int = 64,
    gamma_bar: float = 0.0,
    lr: float = 0.1,
    steps: int = 3,
    seeds: Sequence[int] = (0, 1),
    batch_size: int = 32,
    readout_scale: float = 0.1,
    input_dim: int = 784,
    num_classes: int = 10,
    hidden_layers: int = 2,
    activation: str = "tanh",
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    make_model: Callable[[int], nn.Module] | None = None,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[int, int], None] | None = None,
    **optimizer_kwargs: Any,
) -> CoordCheck:
    """Measure per-layer Δu, bias-step and activation sizes across ``widths`` for ``steps`` optimizer steps.

    Each record holds ``delta_u`` (RMS of ``h_{l-1}^{(0)} (W_l^{(t)} − W_l^{(0)})ᵀ``), ``bias_step``
    (RMS of ``b_l^{(t)} − b_l^{(0)}``; only for layers with a bias) and ``activation`` (RMS of
    ``h_l^{(t)}``, the output f for the readout).

    Args:
        algo: ``"bp"``, ``"pc"``, ``"tp"`` or ``"dtp"``; preset: ``"sp"`` or ``"mup"``.
        data: a fixed batch ``(x, y)``; by default pixel-like inputs uniform in [0, 1] and random
            one-hot targets.
        readout_scale: factor on the readout init (see ``parametrize``). At the base width μP
            starts from SP's Θ(1) random output f_0, which then shrinks as m^{-1/2}; its pull on the
            first gradient makes Δu drift with width at small widths. 0.1 removes that transient
            without changing any exponent; pass 1.0 to see it.
        make_model: ``width -> nn.Sequential``; by default :func:`make_mlp`.
        progress: called with (done, total) after every model.
        optimizer_kwargs: passed to the optimizer (``inference_steps``, ``beta``, ``loss`` …).
    """
    if data is None:
        gen = torch.Generator().manual_seed(1234)
        x = torch.rand(batch_size, input_dim, generator=gen, dtype=dtype)
        labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
        y = torch.nn.functional.one_hot(labels, num_classes).to(dtype)
    else:
        x, y = data
    result = CoordCheck(algo, preset, [int(w) for w in widths])
    total, done = len(widths) * len(seeds), 0
    for width in widths:
        for seed in seeds:
            model = (make_model(width) if make_model else make_mlp(
                x.shape[1], width, num_classes, hidden_layers=hidden_layers, activation=activation)).to(dtype)
            par = parametrize(model, preset, algo=algo, base_width=base_width,
                              gamma_bar=gamma_bar, readout_scale=readout_scale,
                              generator=torch.Generator().manual_seed(seed))
            opt = make_optimizer(algo, model, par, lr, **optimizer_kwargs)
            weights = [lin.weight for lin in opt.mlp.linears]
            biases = [lin.bias for lin in opt.mlp.linears]
            acts = opt.mlp.activations
            with torch.no_grad():
                initial = [w.clone() for w in weights]
                initial_biases = [None if b is None else b.clone() for b in biases]
                _, inputs = forward(weights, biases, acts, x)
            for step in range(1, steps + 1):
                opt.zero_grad()
                opt.step(x, y)
                with torch.no_grad():
                    us, hs = forward(weights, biases, acts, x)
                    for l, (w, w0) in enumerate(zip(weights, initial)):
                        delta = inputs[l] @ (w - w0).T
                        act = hs[l + 1] if l + 1 < len(hs) else us[-1]
                        record = {
                            "width": int(width), "seed": int(seed), "step": step, "layer": l + 1,
                            "delta_u": float(delta.pow(2).mean().sqrt()),
                            "activation": float(act.pow(2).mean().sqrt()),
                        }
                        if biases[l] is not None:
                            record["bias_step"] = float((biases[l] - initial_biases[l]).pow(2).mean().sqrt())
                        result.records.append(record)
            done += 1
            if progress is not None:
                progress(done, total)
    return result
