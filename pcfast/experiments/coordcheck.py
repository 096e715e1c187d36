"""Coordinate check for every algorithm variant × parametrization, as a figure and JSON.

Wraps :func:`pcfast.coord_check` with the settings of the core test
(``tests/mup/test_parametrize.py``): tanh 784-M-M-10, base width 64, batch 32 of pixel-like inputs,
lr 0.1, readout init × 0.1, two seeds, the optimizers' default hyperparameters (PC: T = 20, κ = 0.1).
The slope of log2 Δu_l (each weight's update) and of log2 RMS(b_l^(t) − b_l^(0)) (each bias's update)
against log2 width is reported per layer and step; under μP every slope must be ≈ 0 at every step
(|slope| ≤ 0.15, the test's bound) and under SP some layer's step-1 Δu slope must not (≥ 0.3).

With ``model="cnn"`` the network is :func:`pcfast.mup.make_cnn` (two tanh 3×3 conv layers with 2×2
max pooling, then the linear readout) on images of ``image_shape`` uniform in [0, 1], the width being
every conv layer's channels, and a conv layer's Δu_l is ``conv2d(h_{l-1}^(0), W_l^(t) − W_l^(0))``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .common import machine, machine_line, parse_variant, progress, pyplot, save_figure, write_json

MUP_FLAT = 0.15  # the core test's bound on every μP slope (weights and biases, every step)
SP_STEEP = 0.3  # ... and the least steep SP layer it requires


@dataclass
class CoordSettings:
    variants: tuple[str, ...] = ("bp", "pc", "pc:-1", "tp", "dtp")
    parametrizations: tuple[str, ...] = ("sp", "mup")
    widths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    steps: int = 3
    seeds: tuple[int, ...] = (0, 1)
    base_width: int = 64
    lr: float = 0.1
    batch_size: int = 32
    readout_scale: float = 0.1
    inference_steps: int = 20
    inference_lr: float = 0.1
    backend: str = "auto"
    model: str = "mlp"  # "mlp" (784-M-M-10) or "cnn" (pcfast.mup.make_cnn, M channels)
    image_shape: tuple[int, int, int] = (1, 8, 8)  # (C, H, W) of the conv net's images


CNN_WIDTHS = (32, 64, 128, 256)  # channels, for model="cnn" left at the MLP's default widths


def run_coordcheck(settings: CoordSettings, *, show_progress: bool = True, model: str | None = None) -> dict[str, Any]:
    """The coordinate check of every variant × parametrization in ``settings``; ``model``
    (``"mlp"`` or ``"cnn"``), when given, replaces ``settings.model``. A conv net with the default
    widths and base width is checked at ``CNN_WIDTHS`` channels, base width 32, lr 0.05."""
    from ..mup import coord_check
    from ..mup.coord import MODEL_KINDS

    if model is not None:
        if model not in MODEL_KINDS:
            raise ValueError(f"model: expected one of {MODEL_KINDS}, got {model!r}")
        settings = replace(settings, model=model)
    if settings.model == "cnn" and settings.widths == CoordSettings.widths and settings.base_width == 64:
        # the MLP's widths as channels would take hours on a CPU: the conv net's own (tests/mup/test_coord_cnn.py)
        settings = replace(settings, widths=CNN_WIDTHS, base_width=CNN_WIDTHS[0], lr=0.05)
    start = time.perf_counter()
    variants = [parse_variant(v) for v in settings.variants]
    jobs = [(v, p) for v in variants for p in settings.parametrizations]
    per_job = len(settings.widths) * len(settings.seeds)
    bar = progress(len(jobs) * per_job, "coordcheck", show_progress)
    panels = []
    for variant, preset in jobs:
        bar.set_postfix_str(f"{variant.name} {preset}")
        kwargs: dict[str, Any] = {}
        if variant.algo == "pc":
            kwargs = {"inference_steps": settings.inference_steps, "inference_lr": settings.inference_lr}
        if variant.algo != "bp":
            kwargs["backend"] = settings.backend
        result = coord_check(
            settings.widths, algo=variant.algo, preset=preset, base_width=settings.base_width,
            gamma_bar=variant.gamma_bar, lr=settings.lr, steps=settings.steps, seeds=settings.seeds,
            batch_size=settings.batch_size, readout_scale=settings.readout_scale, model=settings.model,
            image_shape=tuple(settings.image_shape), progress=lambda done, total: bar.update(),
            **kwargs)
        data = result.to_dict()
        data["variant"] = variant.name
        data["gamma_bar"] = variant.gamma_bar
        data["activation_slopes"] = {str(t): result.slopes("activation", t) for t in range(1, settings.steps + 1)}
        panels.append(data)
    bar.close()
    out = {"experiment": "coordcheck", "settings": asdict(settings), "machine": machine(), "panels": panels}
    out["checks"] = checks(out)
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Slopes against the parametrization table: under μP every weight's and every bias's slope is
    flat at every measured step (``value``: the steepest one); under SP some layer's step-1 Δu slope
    is not. (Under SP γ̄_L has no effect, so a ``pc:G`` panel repeats PC's.)"""
    out = []
    for panel in result["panels"]:
        slopes = panel["slopes"]["1"]
        if panel["preset"] == "mup":
            every = [s for step in panel["slopes"] for s in panel["slopes"][step]]
            every += [s for step in panel.get("bias_slopes", {}) for s in panel["bias_slopes"][step]]
            steepest = max(every, key=abs)
            out.append({"check": f"mup {panel['variant']}: every weight's and bias's slope within ±{MUP_FLAT} "
                                 f"at every step", "passed": abs(steepest) <= MUP_FLAT, "value": [steepest]})
        else:
            out.append({"check": f"sp {panel['variant']}: some layer's step-1 |slope| >= {SP_STEEP}",
                        "passed": max(abs(s) for s in slopes) >= SP_STEEP, "value": slopes})
    return out


def format_coordcheck(result: dict[str, Any]) -> str:
    lines = ["width slope of log2 Δu (weights) | of log2 bias step, per layer (first, hidden, …, last), by step"]
    for panel in result["panels"]:
        for step, slopes in panel["slopes"].items():
            line = f"{panel['variant']:<7}{panel['preset']:<5} step {step}: " + ", ".join(f"{s:+.2f}" for s in slopes)
            if step in panel.get("bias_slopes", {}):
                line += " | bias " + ", ".join(f"{s:+.2f}" for s in panel["bias_slopes"][step])
            lines.append(line)
    for c in result["checks"]:
        mark = {True: "PASS", False: "FAIL", None: "NOTE"}[c["passed"]]
        lines.append(f"[{mark}] {c['check']}: " + ", ".join(f"{s:+.2f}" for s in c["value"]))
    return "\n".join(lines)


def _label_125(value: float, _position: int) -> str:
    mantissa = f"{value:.1e}"[:3]
    return f"{value:.2g}" if mantissa in ("1.0", "2.0", "5.0") else ""


def plot_coordcheck(result: dict[str, Any], path: Path) -> Path:
    """Rows: variants. Columns: weight Δu under each parametrization, then the bias step, then the
    activation size. Log-log; colour = layer, line style = step."""
    plt = pyplot()
    from matplotlib import ticker

    settings = result["settings"]
    variants, presets = settings["variants"], settings["parametrizations"]
    panels = {(p["variant"], p["preset"]): p for p in result["panels"]}
    quantities = [("delta_u", "RMS Δu_l (weights)", "slopes", "Δu"),
                  ("bias_step", "RMS b_l^(t) − b_l^(0)", "bias_slopes", "bias"),
                  ("activation", "RMS h_l (f for the readout)", "activation_slopes", "h")]
    fig, axes = plt.subplots(len(variants), len(presets) * len(quantities),
                             figsize=(3.3 * len(presets) * len(quantities), 2.9 * len(variants)), squeeze=False)
    styles = ["-", "--", ":", "-."]
    colors = plt.get_cmap("tab10")
    for i, variant in enumerate(variants):
        for q, (quantity, ylabel, slope_key, short) in enumerate(quantities):
            for j, preset in enumerate(presets):
                ax = axes[i][q * len(presets) + j]
                panel = panels[(variant, preset)]
                if slope_key not in panel:  # a model without biases
                    ax.axis("off")
                    continue
                widths = panel["widths"]
                depth = len(panel["slopes"]["1"])
                steps = sorted({r["step"] for r in panel["records"]})
                for layer in range(1, depth + 1):
                    for s, step in enumerate(steps):
                        ys = []
                        for width in widths:
                            vals = [r[quantity] for r in panel["records"] if quantity in r
                                    and r["width"] == width and r["step"] == step and r["layer"] == layer]
                            ys.append(sum(vals) / len(vals) if vals else float("nan"))
                        ax.plot(widths, ys, styles[s % len(styles)], color=colors(layer - 1), lw=1.3, marker=".",
                                label=f"layer {layer}" if s == 0 else None)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                low, high = ax.get_ylim()
                if high / low < 20:  # under about a decade: label the 1-2-5 minor ticks too, plainly
                    ax.yaxis.set_minor_formatter(ticker.FuncFormatter(_label_125))
                    ax.yaxis.set_major_formatter(ticker.FuncFormatter(_label_125))
                else:
                    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
                ax.grid(alpha=0.3, which="both")
                first, last = panel[slope_key]["1"], panel[slope_key][str(steps[-1])]
                ax.set_title(f"{parse_variant(variant).label} · {'μP' if preset == 'mup' else 'SP'} · {short}\n"
                             f"slopes step 1: " + " ".join(f"{v:+.2f}" for v in first)
                             + (f"\nslopes step {steps[-1]}: " + " ".join(f"{v:+.2f}" for v in last)
                                if len(steps) > 1 else ""), fontsize=8.5)
                if i == len(variants) - 1:
                    ax.set_xlabel("width")
                if j == 0:
                    ax.set_ylabel(ylabel, fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    steps = sorted({r["step"] for r in result["panels"][0]["records"]})
    step_handles = [plt.Line2D([], [], color="0.3", ls=styles[s % len(styles)]) for s in range(len(steps))]
    fig.legend(handles + step_handles, labels + [f"step {t}" for t in steps], loc="upper right", ncol=2, fontsize=8)
    if settings.get("model", "mlp") == "cnn":
        channels, height, side = settings["image_shape"]
        network = f"tanh conv net, M channels × 2 conv layers, {channels}×{height}×{side} images"
    else:
        network = "tanh 784-M-M-10"
    fig.suptitle(
        f"Coordinate check: {network}, base width {settings['base_width']}, lr {settings['lr']:g}, "
        f"batch {settings['batch_size']}, {len(settings['seeds'])} seed(s), mean shown — weight Δu and bias steps flat in width under μP\n"
        f"{machine_line(result['machine'])}", fontsize=9, x=0.4)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return save_figure(plt, fig, path, dpi=100)


def write_coordcheck(result: dict[str, Any], out: Path) -> list[Path]:
    return [write_json(out / "coordcheck.json", result), plot_coordcheck(result, out / "coordcheck.png")]
