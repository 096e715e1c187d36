"""Parametrizations (abc, normalised to a base width) for every algorithm — DESIGN §2.

A ``Parametrization`` records, per linear layer, its init std, its learning-rate multipliers and its
precision γ_l; ``parametrize`` computes it for a model and, by default, re-initialises the weights to
match (``init=False`` attaches it to trained weights without touching them, for resuming). The
optimizers turn it into parameter groups, and it survives ``state_dict``.

Width multiplier per layer: ``m = d_1 / base_width`` for the first layer (its fan-out is the width),
``m = d_{l-1} / base_width`` for the others (their fan-in is). With equal hidden widths M every layer
has ``m = M / base_width``. In a conv net a layer's width is its channels and a unit's fan-in is
``C_in · k_h · k_w`` (``C · H · W`` for the first linear layer): the exponents are the MLP's, since
every fan-in still grows in proportion to the width.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..network import MLP, check_bool, fan_in, fan_out_units, parse_mlp

ALGOS = ("bp", "pc", "tp", "dtp", "gnt")
PRESETS = ("sp", "mup")
GROUPS = ("first", "hidden", "last")
SP_B = {"first": 0.0, "hidden": 0.5, "last": 0.5}


def exponents(preset: str, algo: str, gamma_bar: float = 0.0) -> tuple[dict[str, float], dict[str, float], float]:
    """``(b, c, γ̄_L)`` for a preset and algorithm: init exponents, learning-rate exponents, and the
    exponent of the output precision ``γ_L = γ · m^{-γ̄_L}`` (PC only; 0 elsewhere)."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {PRESETS}, got {preset!r}")
    if algo not in ALGOS:
        raise ValueError(f"algo: expected one of {ALGOS}, got {algo!r}")
    if preset == "sp":
        return dict(SP_B), {"first": 0.0, "hidden": 0.0, "last": 0.0}, 0.0
    if algo == "bp":
        return {"first": 0.0, "hidden": 0.5, "last": 1.0}, {"first": -1.0, "hidden": 0.0, "last": 1.0}, 0.0
    if algo == "pc":
        gb = float(gamma_bar)
        if not -1.0 <= gb <= 0.0:
            raise ValueError(
                f"gamma_bar: expected a value in [-1, 0] (γ_L = γ·m^(-gamma_bar); below -1 PC is "
                f"unstable at large width), got {gamma_bar}"
            )
        c = {"first": -1.0 - gb, "hidden": -gb, "last": 1.0 - gb}
        return {"first": 0.0, "hidden": 0.5, "last": 1.0}, c, gb
    if algo in ("tp", "dtp"):  # the standard last-layer scale b_L = 1/2 is kept
        return {"first": 0.0, "hidden": 0.5, "last": 0.5}, {"first": 0.0, "hidden": 1.0, "last": 1.0}, 0.0
    return {"first": 0.0, "hidden": 0.5, "last": 1.0}, {"first": 0.0, "hidden": 1.0, "last": 1.0}, 0.0  # gnt


def bias_exponent(c: dict[str, float], group: str) -> float:
    """Learning-rate exponent of a layer's bias, from the scale of its own gradient.

    A bias is a weight on a constant input 1, so its gradient is the batch mean of the layer's local
    error δ_l (PC: ``−γ_l Σ_b ε_l / B``; BP: ∂L/∂u_l; TP/DTP/GNT: u_l − target_l), with no sum over
    a fan-in. The weight's one-step change is ``Δu_l = η_l δ_l ‖h_{l-1}‖²`` and
    ``‖h_{l-1}‖² = Θ(fan-in)``: Θ(1) for the first layer (the input dimension is fixed) and Θ(m)
    for hidden and output layers. Its exponent ``c_l`` makes that Θ(1), so the bias step
    ``η_b δ_l`` is Θ(1) with ``c_b = c_l`` for the first layer and ``c_b = c_l − 1`` for the others:
    hidden biases share the first layer's exponent (``c_hidden − 1 = c_first`` in every preset), and
    the output bias gets ``c_L − 1`` — 0 for BP, TP, DTP and GNT, and ``−γ̄_L`` for PC, whose output
    error carries ``γ_L = γ·m^{-γ̄_L}``.
    """
    return c[group] if group == "first" else c[group] - 1.0


# Update rules the parametrization has multipliers for: SGD, and the normalising rules of the Adam
# family, with coupled (L2 in the gradient) or decoupled (AdamW) weight decay. DESIGN §2.
UPDATE_RULES = ("sgd", "adam", "adamw")
# Adam's learning-rate exponents c^A: its update has entries Θ(η) whatever the gradient's scale, so
# Δu_l = ΔW_l h_{l-1} is Θ(η · fan-in): fan-in Θ(1) for the first layer, Θ(m) for the others.
ADAM_C = {"first": 0.0, "hidden": 1.0, "last": 1.0}


@dataclass(frozen=True)
class GroupScale:
    """Multipliers of one parameter group for one update rule: on the learning rate, on Adam's ε,
    and on the weight decay."""

    lr_mult: float
    eps_mult: float = 1.0
    weight_decay_mult: float = 1.0


def adam_scales(group: str, m: float, b: dict[str, float], c: dict[str, float],
                decoupled: bool) -> tuple[GroupScale, GroupScale]:
    """(weight, bias) multipliers of a layer in ``group`` at width multiplier ``m`` under Adam (DESIGN §2).

    Learning rates ``m^{-c^A}``: ``c^A = (0, 1, 1)`` for weights and 0 for biases (a bias step moves u_l
    by Θ(η) with no fan-in sum). ε tracks the gradient's entries, ``|g_l| ∝ m^{c_l − c^A_l}`` with
    ``c_l`` the SGD exponent (SGD's per-entry step ``m^{-c_l}|g_l|`` and Adam's ``m^{-c^A_l}`` give the
    same Δu), so that it stays as small relative to them as at the base width. Decoupled weight decay
    (AdamW) multiplies by ``m^{c^A}``, keeping the per-step decay ``η_l λ_l`` width-independent; coupled
    decay adds ``λ θ`` to the gradient, so ``λ_l ∝ |g_l| / |θ_l| = m^{c_l − c^A_l + b_l}`` (the init's
    entries are ``m^{-b_l}``, with b_first = 0); for a bias (zero at init, moving by Θ(1))
    ``λ ∝ |g_b| = m^{c_b}``."""
    c_b = bias_exponent(c, group)
    g_w = c[group] - ADAM_C[group]
    weight = GroupScale(m ** -ADAM_C[group], m**g_w,
                        m ** ADAM_C[group] if decoupled else m ** (g_w + (0.0 if group == "first" else b[group])))
    bias = GroupScale(1.0, m**c_b, 1.0 if decoupled else m**c_b)
    return weight, bias


@dataclass(frozen=True)
class LayerScale:
    """What the parametrization fixes for one layer."""

    group: str  # "first", "hidden" or "last"
    fan_in: int  # of one output unit: in_features, or C_in · k_h · k_w
    fan_out: int  # out_features, or output channels
    width_mult: float  # m
    init_std: float  # σ_l of W_l ~ N(0, σ_l²)
    lr_mult: float  # η_l / η for W_l
    bias_lr_mult: float  # η / η for b_l
    precision: float  # γ_l


@dataclass
class Parametrization:
    """Per-layer init std, learning-rate multipliers and precisions of one model."""

    preset: str
    algo: str
    base_width: int | None
    gamma_bar: float
    sigma: float
    gamma: float
    layers: list[LayerScale] = field(default_factory=list)

    @property
    def precisions(self) -> list[float]:
        return [layer.precision for layer in self.layers]

    @property
    def lr_mults(self) -> list[float]:
        return [layer.lr_mult for layer in self.layers]

    def scales(self, rule: str) -> list[tuple[GroupScale, GroupScale]]:
        """(weight, bias) multipliers per layer for an update rule (``UPDATE_RULES``). SGD's learning
        rates are the stored ``lr_mult``/``bias_lr_mult`` and its weight decay their inverse; under SP
        every multiplier is one."""
        if rule not in UPDATE_RULES:
            raise ValueError(f"rule: expected one of {UPDATE_RULES}, got {rule!r}")
        if rule == "sgd":  # coupled decay: η_l λ_l, the shrink per step, width-independent (as mup's MuSGD)
            return [(GroupScale(s.lr_mult, 1.0, 1.0 / s.lr_mult), GroupScale(s.bias_lr_mult, 1.0, 1.0 / s.bias_lr_mult))
                    for s in self.layers]
        if self.preset != "mup":
            return [(GroupScale(1.0), GroupScale(1.0)) for _ in self.layers]
        b, c, _ = exponents(self.preset, self.algo, self.gamma_bar)
        return [adam_scales(s.group, s.width_mult, b, c, rule == "adamw") for s in self.layers]

    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state["layers"] = [asdict(layer) for layer in self.layers]
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "Parametrization":
        state = dict(state)
        layers = [LayerScale(**layer) for layer in state.pop("layers")]
        return cls(**state, layers=layers)

    def check_matches(self, mlp: MLP) -> None:
        """Raise ValueError unless this parametrization was made for a model of ``mlp``'s shape."""
        shapes = [(fan_in(lin), fan_out_units(lin)) for lin in mlp.linears]
        mine = [(layer.fan_in, layer.fan_out) for layer in self.layers]
        if shapes != mine:
            raise ValueError(
                f"parametrization: made for layers {mine} (fan_in, fan_out) but the model has "
                f"{shapes}; call pcfast.parametrize(model, ...) on this model"
            )

    def __str__(self) -> str:
        head = f"Parametrization({self.preset}, algo={self.algo}, base_width={self.base_width}"
        if self.algo == "pc":
            head += f", gamma_bar={self.gamma_bar}"
        rows = [
            f"  layer {l + 1} ({s.group}, {s.fan_in}->{s.fan_out}): m={s.width_mult:g} "
            f"std={s.init_std:.4g} lr x{s.lr_mult:.4g} bias lr x{s.bias_lr_mult:.4g} gamma={s.precision:.4g}"
            for l, s in enumerate(self.layers)
        ]
        return "\n".join([head + ")"] + rows)


def standard(model: nn.Module) -> Parametrization:
    """Multipliers of one and unit precisions, leaving the weights as they are (no re-init)."""
    mlp = parse_mlp(model)
    depth = mlp.depth
    layers = [
        LayerScale(_group(l, depth), fan_in(lin), fan_out_units(lin), 1.0,
                   float(lin.weight.detach().float().std()) if lin.weight.numel() > 1 else 0.0, 1.0, 1.0, 1.0)
        for l, lin in enumerate(mlp.linears)
    ]
    return Parametrization("sp", "any", None, 0.0, 1.0, 1.0, layers)


def _group(l: int, depth: int) -> str:
    if l == depth - 1:
        return "last"
    return "first" if l == 0 else "hidden"


def parametrize(
    model: nn.Module,
    preset: str = "mup",
    *,
    algo: str = "pc",
    base_width: int | None = None,
    gamma_bar: float = 0.0,
    sigma: float = 1.0,
    gamma: float = 1.0,
    readout_scale: float = 1.0,
    init: bool = True,
    generator: torch.Generator | None = None,
) -> Parametrization:
    """Compute the parametrization of ``model`` and (with ``init=True``, the default) re-initialise
    its weights to it.

    ``W_l ~ N(0, σ_l²)`` with ``σ_l = sigma · fan_in^{-1/2} · m^{-(b_l − b_l^SP)}``, biases zero;
    learning-rate multipliers ``m^{-c_l}`` for weights and ``m^{-c_b}`` for biases (see
    :func:`bias_exponent`); PC output precision ``γ_L = gamma · m^{-gamma_bar}``.
    At ``m = 1`` every preset equals SP exactly (same init draws, multipliers one).

    **Re-initialisation.** ``init=True`` overwrites every weight and bias of ``model`` — call it on a
    fresh model, before training. To attach a parametrization to weights you want to keep (resuming
    from a checkpoint, fine-tuning), pass ``init=False``: the weights stay bitwise as they are and
    the returned multipliers and precisions are the same as with ``init=True`` (they depend on the
    shapes only). Resuming::

        model = make_model()
        model.load_state_dict(checkpoint["model"])
        par = pcfast.parametrize(model, "mup", algo="pc", base_width=64, init=False)
        opt = pcfast.optim.PC(model, par, lr=0.03)
        opt.load_state_dict(checkpoint["optimizer"])

    Args:
        model: an ``nn.Sequential`` of ``nn.Linear`` and Tanh/ReLU/Sigmoid/GELU/Identity, or a conv net
            (``nn.Conv2d`` layers with their activations and poolings, ``nn.Flatten()``, then linear
            layers; widths are channels there).
        preset: ``"sp"`` or ``"mup"``.
        algo: ``"bp"``, ``"pc"``, ``"tp"``, ``"dtp"`` or ``"gnt"`` — μP differs per algorithm.
        base_width: the width at which μP equals SP (where you tuned); required for ``"mup"``.
        gamma_bar: γ̄_L ∈ [−1, 0], PC's output-precision exponent.
        sigma, gamma: init gain σ and output precision γ at the base width.
        readout_scale: a width-independent factor on the readout's init std (σ_L); values below
            one shrink the random initial output f_0 (as zero-init readouts do in μP practice)
            without changing any width exponent.
        init: re-initialise the weights (``True``) or leave them untouched (``False``).
        generator: random generator for the re-initialisation.

    Example:
        >>> model = nn.Sequential(nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 10))
        >>> par = parametrize(model, "mup", algo="pc", base_width=64)
    """
    mlp = parse_mlp(model)
    check_bool("init", init)
    _, _, gb = exponents(preset, algo, gamma_bar)
    _check_settings(mlp.depth, preset, base_width, sigma=sigma, gamma=gamma, readout_scale=readout_scale)
    layers = _layer_scales(mlp, preset, algo, base_width, gamma_bar, sigma=sigma, gamma=gamma,
                           readout_scale=readout_scale)
    if init:
        _reinitialise(mlp, layers, generator)
    return Parametrization(preset, algo, base_width, gb, float(sigma), float(gamma), layers)


def _check_settings(depth: int, preset: str, base_width: int | None, **scales: float) -> None:
    """Raise ``ValueError`` for settings ``parametrize`` cannot use: μP on a model without a hidden
    layer or without ``base_width``, a ``base_width`` that is not a positive int, or a scale
    (``sigma``, ``gamma``, ``readout_scale``) that is not a finite number > 0."""
    if preset == "mup":
        if depth < 2:
            raise ValueError("model: μP needs at least one hidden layer (two nn.Linear); use preset='sp'")
        if base_width is None:
            raise ValueError(
                "base_width: required for preset='mup' — the hidden width at which μP equals SP "
                "(the width where the learning rate was tuned), e.g. base_width=64"
            )
    if base_width is not None and (isinstance(base_width, bool) or int(base_width) != base_width or base_width < 1):
        raise ValueError(f"base_width: expected a positive int, got {base_width!r}")
    for name, value in scales.items():
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: expected a finite number > 0, got {value}")


def _layer_scales(mlp: MLP, preset: str, algo: str, base_width: int | None, gamma_bar: float, *,
                  sigma: float, gamma: float, readout_scale: float) -> list[LayerScale]:
    """Each layer's width multiplier, init std, learning-rate multipliers and precision (the formulas
    of :func:`parametrize`), from the exponents of ``preset`` and ``algo``."""
    b, c, gb = exponents(preset, algo, gamma_bar)
    depth = mlp.depth
    layers = []
    for l, lin in enumerate(mlp.linears):
        group = _group(l, depth) if depth > 1 else "first"
        # the width: the first layer's output units, else the previous layer's (channels in a conv net)
        width = fan_out_units(lin) if group == "first" else fan_out_units(mlp.linears[l - 1])
        m = width / base_width if (preset == "mup" and base_width) else 1.0
        std = sigma * fan_in(lin)**-0.5 * m ** -(b[group] - SP_B[group])
        if l == depth - 1:
            std *= readout_scale
        precision = gamma * m**-gb if (algo == "pc" and group == "last") else 1.0
        bias_mult = m ** -bias_exponent(c, group)
        layers.append(LayerScale(group, fan_in(lin), fan_out_units(lin), m, std, m ** -c[group], bias_mult, precision))
    return layers


def _reinitialise(mlp: MLP, layers: list[LayerScale], generator: torch.Generator | None) -> None:
    """Draw every weight from N(0, σ_l²) (in layer order, from ``generator``) and zero every bias."""
    with torch.no_grad():
        for lin, scale in zip(mlp.linears, layers):
            lin.weight.normal_(0.0, scale.init_std, generator=generator)
            if lin.bias is not None:
                lin.bias.zero_()
