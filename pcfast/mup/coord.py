"""Coordinate check: does each layer's update stay the same size as the network widens?

For every width, build the model, parametrize it, take a few optimizer steps on one fixed batch and
record, per layer l and step t, the RMS size of ``Δu_l = h_{l-1}^{(0)} (W_l^{(t)} − W_l^{(0)})ᵀ`` (the
pre-activation change the weight update causes), of the bias step ``b_l^{(t)} − b_l^{(0)}`` (the
pre-activation change the bias update causes, the same for every sample) and of the activity
``h_l^{(t)}``. In a conv net (``model="cnn"``: the width is the channels of every conv layer) a conv
layer's Δu_l is ``conv2d(h_{l-1}^{(0)}, W_l^{(t)} − W_l^{(0)})`` with the layer's stride, padding and
dilation and no bias, h_{l-1}^{(0)} being the initial pooled activity, and RMS is over batch,
channels and pixels. Under a μP preset every layer's Δu and every bias step is width independent (slope ≈ 0
in log-log); under SP at least one grows or shrinks. The settings of a check are one
``CoordCheckConfig`` (or the keywords named like its fields).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from ..network import MLP
from ..reference.common import forward
from ..reference.conv import conv_forward
from ..types import Net
from .presets import exponents, parametrize

MODEL_KINDS = ("mlp", "cnn")  # a coordinate check's models: make_mlp or make_cnn
POOLS = ("max", "avg")
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


def make_cnn(image_shape: Sequence[int], width: int, num_classes: int, *, conv_layers: int = 2,
             activation: str = "tanh", pool: str = "max", bias: bool = True) -> nn.Sequential:
    """A conv net of ``width`` channels per conv layer: ``(Conv2d(·, width, 3, padding=1), act,
    Pool2d(2)) × conv_layers`` (the pooling where the image is still at least 2 pixels wide), then
    ``Flatten(), Linear(width · H' · W', num_classes)``. ``image_shape``: (C, H, W); ``pool``:
    ``"max"`` or ``"avg"``. Every hidden layer's width is ``width`` (its channels), so μP at
    ``base_width = width`` is SP."""
    channels, height, side = (int(v) for v in image_shape)
    if pool not in POOLS:
        raise ValueError(f"pool: expected 'max' or 'avg', got {pool!r}")
    if conv_layers < 1:
        raise ValueError(f"conv_layers: expected an int >= 1, got {conv_layers!r}")
    layers: list[nn.Module] = []
    for _ in range(conv_layers):
        layers += [nn.Conv2d(channels, width, 3, padding=1, bias=bias), MODULES[activation]()]
        if min(height, side) >= 2:
            layers.append(nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2))
            height, side = height // 2, side // 2
        channels = width
    layers += [nn.Flatten(), nn.Linear(width * height * side, num_classes, bias=bias)]
    return nn.Sequential(*layers)


# The algorithms with a pcfast optimizer, which a coordinate check steps.
_OPTIMIZER_ALGOS = ("bp", "pc", "tp", "dtp")


def _check_optimizer_algo(algo: str) -> None:
    if algo not in _OPTIMIZER_ALGOS:
        raise ValueError(f"algo: expected one of {sorted(_OPTIMIZER_ALGOS)}, got {algo!r}")


def make_optimizer(algo: str, model: nn.Module, par, lr: float, **kwargs: Any):
    """The pcfast optimizer for ``algo``."""
    from .. import optim

    if algo != "ipc":  # iPC (PC's parametrization) trains in sweeps; the coordinate check has no table for it
        _check_optimizer_algo(algo)
    classes = {"bp": optim.BP, "pc": optim.PC, "tp": optim.TP, "dtp": optim.DTP, "ipc": optim.IPC}
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


@dataclass(frozen=True)
class CoordCheckConfig:
    """Settings of a coordinate check: what is trained, how, and on which batch.

    Checked once, when made: ``preset``, ``algo`` and ``gamma_bar`` as :func:`parametrize` checks
    them, then that ``algo`` has a pcfast optimizer, then ``model``, ``pool`` and ``image_shape``
    (``ValueError`` naming the setting).

    Attributes:
        algo: ``"bp"``, ``"pc"``, ``"tp"`` or ``"dtp"`` — the optimizer stepped and the algorithm μP
            is computed for.
        preset: ``"sp"`` or ``"mup"``.
        base_width: the width at which μP equals SP (``parametrize``'s ``base_width``).
        gamma_bar: γ̄_L ∈ [−1, 0], PC's output-precision exponent (``parametrize``'s ``gamma_bar``).
        lr: the optimizer's learning rate η at the base width.
        steps: optimizer steps taken per model; every step is recorded (1 … steps).
        seeds: one model per width and seed; the seed drives ``parametrize``'s re-initialisation.
            Stored as a tuple.
        batch_size: samples in the default batch.
        readout_scale: factor on the readout init (see ``parametrize``). At the base width μP
            starts from SP's Θ(1) random output f_0, which then shrinks as m^{-1/2}; its pull on the
            first gradient makes Δu drift with width at small widths. 0.1 removes that transient
            without changing any exponent; pass 1.0 to see it.
        input_dim: features of the default batch's inputs (``model="mlp"``).
        num_classes: outputs of the default model and one-hot classes of the default batch's targets.
        hidden_layers: hidden layers of the default model: :func:`make_mlp`'s hidden layers, or
            :func:`make_cnn`'s conv layers.
        activation: activation of the default model: ``"tanh"``, ``"relu"``, ``"sigmoid"``,
            ``"gelu"`` or ``"identity"``.
        model: the default model, ``"mlp"`` (:func:`make_mlp`, the width its hidden units) or
            ``"cnn"`` (:func:`make_cnn`, the width the channels of every conv layer).
        image_shape: (C, H, W) of the default batch's images (``model="cnn"``). Stored as a tuple.
        pool: the pooling of the default conv net, ``"max"`` or ``"avg"`` (``model="cnn"``).
        dtype: dtype of the default batch and of every model.

    The default batch is ``batch_size`` pixel-like inputs uniform in [0, 1] — of ``input_dim``
    features, or images of ``image_shape`` for ``model="cnn"`` — with random one-hot targets over
    ``num_classes``, drawn from a generator seeded 1234; ``input_dim``, ``image_shape`` and
    ``batch_size`` are unused when :func:`coord_check` is given ``data`` (the default model then
    reads its input size from ``data``'s ``x``), and ``num_classes``, ``hidden_layers``,
    ``activation``, ``model`` and ``pool`` when it is given ``make_model``.
    """

    algo: str = "pc"
    preset: str = "mup"
    base_width: int = 64
    gamma_bar: float = 0.0
    lr: float = 0.1
    steps: int = 3
    seeds: Sequence[int] = (0, 1)
    batch_size: int = 32
    readout_scale: float = 0.1
    input_dim: int = 784
    num_classes: int = 10
    hidden_layers: int = 2
    activation: str = "tanh"
    model: str = "mlp"
    image_shape: Sequence[int] = (1, 8, 8)
    pool: str = "max"
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(self.seeds))
        exponents(self.preset, self.algo, self.gamma_bar)
        _check_optimizer_algo(self.algo)
        if self.model not in MODEL_KINDS:
            raise ValueError(f"model: expected one of {MODEL_KINDS}, got {self.model!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool: expected one of {POOLS}, got {self.pool!r}")
        shape = tuple(self.image_shape)
        if len(shape) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape):
            raise ValueError(f"image_shape: expected three positive ints (C, H, W), got {self.image_shape!r}")
        object.__setattr__(self, "image_shape", shape)


_SETTINGS = frozenset(f.name for f in fields(CoordCheckConfig))


def coord_check(
    widths: Sequence[int] = (64, 128, 256, 512, 1024, 2048),
    *,
    config: CoordCheckConfig | None = None,
    data: tuple[Tensor, Tensor] | None = None,
    make_model: Callable[[int], nn.Module] | None = None,
    progress: Callable[[int, int], None] | None = None,
    **kwargs: Any,
) -> CoordCheck:
    """Measure per-layer Δu, bias-step and activation sizes across ``widths`` for ``config.steps``
    optimizer steps.

    Each record holds ``delta_u`` (RMS of ``h_{l-1}^{(0)} (W_l^{(t)} − W_l^{(0)})ᵀ``; for a conv
    layer of ``conv2d(h_{l-1}^{(0)}, W_l^{(t)} − W_l^{(0)})``, no bias), ``bias_step`` (RMS of
    ``b_l^{(t)} − b_l^{(0)}``; only for layers with a bias) and ``activation`` (RMS of ``h_l^{(t)}``,
    a conv layer's pooled activity, the output f for the readout).

    The settings come either as ``config`` or as keywords named like its fields
    (``coord_check(widths, algo="tp", lr=0.05)`` is
    ``coord_check(widths, config=CoordCheckConfig(algo="tp", lr=0.05))``), not both.

    Args:
        widths: the hidden widths (a conv net's channels), one model each per seed.
        config: the settings (:class:`CoordCheckConfig`, which documents each); by default made from
            the keywords among ``kwargs`` that name its fields.
        data: a fixed batch ``(x, y)``; by default the config's (pixel-like inputs uniform in [0, 1]
            and random one-hot targets).
        make_model: ``width -> nn.Sequential``; by default :func:`make_mlp` (or, for
            ``model="cnn"``, :func:`make_cnn`) with the config's ``num_classes``, ``hidden_layers``,
            ``activation`` (and ``pool``).
        progress: called with (done, total) after every model.
        kwargs: without ``config``, the settings named like :class:`CoordCheckConfig` fields; every
            other keyword is passed to the optimizer (``optimizer``, ``weight_decay``,
            ``inference_steps``, ``beta``, ``loss`` …).
    """
    config, optimizer_kwargs = _settings(config, kwargs)
    x, y = _default_batch(config) if data is None else data
    result = CoordCheck(config.algo, config.preset, [int(w) for w in widths])
    total, done = len(widths) * len(config.seeds), 0
    for width in widths:
        for seed in config.seeds:
            model = (make_model(width) if make_model else _default_model(config, x, width)).to(config.dtype)
            opt = _parametrized_optimizer(model, seed, config, optimizer_kwargs)
            result.records += _measure(opt, x, y, config.steps, width=int(width), seed=int(seed))
            done += 1
            if progress is not None:
                progress(done, total)
    return result



def _signature() -> inspect.Signature:
    """``coord_check``'s signature as ``help()`` and ``inspect.signature`` show it: the widths, the
    config, every setting by name (``CoordCheckConfig``'s fields), the batch, model and progress
    hooks, then the optimizer's keywords."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    own = inspect.signature(coord_check)
    params = own.parameters
    settings = [inspect.Parameter(f.name, keyword, default=f.default, annotation=f.type)
                for f in fields(CoordCheckConfig)]
    return own.replace(parameters=[
        params["widths"], params["config"], *settings, params["data"], params["make_model"], params["progress"],
        inspect.Parameter("optimizer_kwargs", inspect.Parameter.VAR_KEYWORD),
    ])


coord_check.__signature__ = _signature()

def _settings(config: CoordCheckConfig | None, kwargs: dict[str, Any]) -> tuple[CoordCheckConfig, dict[str, Any]]:
    """The config and the optimizer's keywords, from ``coord_check``'s ``config`` and keywords."""
    settings = {key: value for key, value in kwargs.items() if key in _SETTINGS}
    optimizer_kwargs = {key: value for key, value in kwargs.items() if key not in _SETTINGS}
    if config is None:
        return CoordCheckConfig(**settings), optimizer_kwargs
    if settings:
        raise TypeError(
            f"coord_check: {', '.join(sorted(settings))} given both in config and as keywords; pass "
            "them in config (dataclasses.replace(config, ...) changes some) or leave config out"
        )
    return config, optimizer_kwargs


def _default_model(config: CoordCheckConfig, x: Tensor, width: int) -> nn.Sequential:
    """The config's model of ``width`` (hidden units, or channels) for inputs like ``x``'s."""
    if config.model == "cnn":
        if x.dim() != 4:
            raise ValueError(f"data: model='cnn' needs images x of shape (B, C, H, W), got shape {tuple(x.shape)}")
        return make_cnn(x.shape[1:], width, config.num_classes, conv_layers=config.hidden_layers,
                        activation=config.activation, pool=config.pool)
    return make_mlp(x.shape[1], width, config.num_classes, hidden_layers=config.hidden_layers,
                    activation=config.activation)


def _default_batch(config: CoordCheckConfig) -> tuple[Tensor, Tensor]:
    """``batch_size`` inputs uniform in [0, 1] (features, or images for a conv net) and one-hot
    targets, from a generator seeded 1234."""
    gen = torch.Generator().manual_seed(1234)
    shape = config.image_shape if config.model == "cnn" else (config.input_dim,)
    x = torch.rand(config.batch_size, *shape, generator=gen, dtype=config.dtype)
    labels = torch.randint(0, config.num_classes, (config.batch_size,), generator=gen)
    y = torch.nn.functional.one_hot(labels, config.num_classes).to(config.dtype)
    return x, y


def _parametrized_optimizer(model: nn.Module, seed: int, config: CoordCheckConfig,
                            optimizer_kwargs: dict[str, Any]):
    """Parametrize ``model`` by the config (re-initialised from ``seed``) and make its optimizer."""
    par = parametrize(model, config.preset, algo=config.algo, base_width=config.base_width,
                      gamma_bar=config.gamma_bar, readout_scale=config.readout_scale,
                      generator=torch.Generator().manual_seed(seed))
    return make_optimizer(config.algo, model, par, config.lr, **optimizer_kwargs)


def _measure(opt, x: Tensor, y: Tensor, steps: int, *, width: int, seed: int) -> list[dict]:
    """Take ``steps`` steps of ``opt`` on ``(x, y)``; one record per step and layer."""
    mlp: MLP = opt.mlp
    weights, biases = mlp.weights(), mlp.biases()
    with torch.no_grad():
        initial = [w.clone() for w in weights]
        initial_biases = [None if b is None else b.clone() for b in biases]
        _, inputs = _forward(mlp, x)
    records = []
    for step in range(1, steps + 1):
        opt.zero_grad()
        opt.step(x, y)
        with torch.no_grad():
            us, hs = _forward(mlp, x)
            for l, (w, w0) in enumerate(zip(weights, initial)):
                record = {"width": width, "seed": seed, "step": step, "layer": l + 1,
                          "delta_u": _rms(_weight_change_map(mlp, l, inputs[l], w - w0)),
                          "activation": _rms(hs[l + 1] if l + 1 < len(hs) else us[-1])}
                if biases[l] is not None:
                    record["bias_step"] = _rms(biases[l] - initial_biases[l])
                records.append(record)
    return records


def _forward(mlp: MLP, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Pre-activations ``[u_1 … u_L]`` and layer inputs ``[h_0 = x, h_1 … h_{L-1}]`` (a conv layer's
    pooled activity) of the model's current parameters."""
    weights, biases = mlp.weights(), mlp.biases()
    if not mlp.is_conv:
        return forward(weights, biases, mlp.activations, x)
    return conv_forward(Net(tuple(weights), tuple(biases), mlp.activations, geometry=mlp.geometry).layers(), x)


def _weight_change_map(mlp: MLP, l: int, h: Tensor, dw: Tensor) -> Tensor:
    """Layer ``l``'s map (0-based) of ``h`` with weight ``dw`` and no bias: ``h dwᵀ`` (the input
    flattened), or ``conv2d(h, dw)`` with the conv layer's stride, padding and dilation."""
    geometry = mlp.geometry[l] if mlp.geometry else None
    if geometry is None:
        return h.flatten(1) @ dw.T
    return nnf.conv2d(h, dw, None, geometry.stride, geometry.padding, geometry.dilation)


def _rms(t: Tensor) -> float:
    return float(t.pow(2).mean().sqrt())
