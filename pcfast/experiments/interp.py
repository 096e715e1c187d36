"""PC between gradient descent and Gauss–Newton: deep linear networks (DESIGN §3, O3/O5).

For a deep linear network (identity activations, no biases) under μP with output precision
``γ_L = γ · m^{-γ̄_L}``, relax PC's latents with ``pcfast.functional.pc_train_step`` (backend
``"torch"``, float64) and compare the resulting weight update, layer by layer, with the GD gradient
(``bp_train_step``) and the Gauss–Newton-target direction (``gnt_train_step``) by cosine similarity.

Theory: at equilibrium ``ε*_L = (I + C_γ)^{-1}(y − f_0)`` with ``C_γ = Σ_{i<L} (γ_L/γ_i) J_i J_iᵀ``.
Under μP ``J_i J_iᵀ`` shrinks like 1/m, so γ̄_L = 0 makes C_γ → 0 and PC → GD, while γ̄_L = −1 keeps
C_γ = Θ(1): PC stays between GD and the Gauss–Newton direction at every width.

The relaxation is a linear system; its Jacobi iteration ``z ← z − κ ∂F/∂z`` is stable for
``κ < 2/λ_max`` of the latent Hessian, which grows with ``γ_L ‖W_L‖²``. We pick
``κ = kappa_scale / (1 + max_l γ_{l+1} ‖W_{l+1}‖₂²)`` and check the relaxed update against the
equilibrium solved in closed form (``closed_form_pc_grads``); the relative difference is in the JSON.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .common import FIGURE_DPI, FIGURE_STYLE, machine, machine_line, progress, pyplot, save_figure, write_json


@dataclass
class InterpSettings:
    widths: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    gamma_bars: tuple[float, ...] = (0.0, -0.5, -1.0)
    gamma: float = 1.0
    base_width: int = 64
    hidden_layers: int = 2
    batch_size: int = 64
    input_dim: int | None = None  # None: the dataset's
    dataset: str = "mnist5k"
    inference_steps: int = 400
    kappa_scale: float = 0.9
    steps_curve: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 400)
    steps_curve_width: int = 256
    seeds: tuple[int, ...] = (0, 1)
    gamma_sweep: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)  # γ at the smallest width (m = 1 there)
    max_inference_steps: int = 20000  # the γ sweep relaxes for inference_steps · max(1, γ) steps, at most this
    backend: str = "torch"


def _cos(a: Tensor, b: Tensor) -> float:
    return float((a.flatten() @ b.flatten()) / (a.norm() * b.norm()).clamp_min(1e-300))


def closed_form_pc_grads(weights: list[Tensor], x: Tensor, y: Tensor, precisions: list[float]) -> list[Tensor]:
    """PC weight gradients of a bias-free linear network at the exact equilibrium (DESIGN O3).

    ``ε*_L = (I + C_γ)^{-1}(y − f_0)``, ``ε*_l = (γ_L/γ_l) ε*_L J_l``, ``z_l = W_l z_{l-1} + ε_l``
    from ``z_0 = x``, and ``∂F/∂W_l = −γ_l ε_lᵀ z_{l-1} / B``.
    """
    depth = len(weights)
    jacobians = [None] * depth  # J_l = W_L ⋯ W_{l+1}, shape (C, d_l)
    jacobians[-1] = torch.eye(weights[-1].shape[0], dtype=x.dtype)
    for l in range(depth - 2, -1, -1):
        jacobians[l] = jacobians[l + 1] @ weights[l + 1]
    f0 = x
    for w in weights:
        f0 = f0 @ w.T
    gamma_last = precisions[-1]
    c_gamma = sum((gamma_last / precisions[i]) * jacobians[i] @ jacobians[i].T for i in range(depth - 1))
    eye = torch.eye(c_gamma.shape[0], dtype=x.dtype)
    eps_last = torch.linalg.solve(eye + c_gamma, (y - f0).T).T  # (B, C)
    errors = [(gamma_last / precisions[l]) * eps_last @ jacobians[l] for l in range(depth - 1)] + [eps_last]
    z, grads = x, []
    for l, w in enumerate(weights):
        grads.append(-precisions[l] * errors[l].T @ z / x.shape[0])
        if l < depth - 1:
            z = z @ w.T + errors[l]
    return grads


def _spectral_norm_sq(w: Tensor, iterations: int = 50) -> float:
    """‖W‖₂²: exactly from the small Gram matrix when one side is small, else by power iteration
    (an SVD of a 4096² matrix costs seconds; this costs milliseconds)."""
    if min(w.shape) <= 128:
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        return float(torch.linalg.eigvalsh(gram)[-1])
    v = torch.randn(w.shape[1], dtype=w.dtype, generator=torch.Generator().manual_seed(0))
    value = 0.0
    for _ in range(iterations):
        u = w.T @ (w @ v)
        value = float(u.norm() / v.norm())
        v = u / u.norm()
    return value * 1.02  # power iteration approaches from below


def _inference_lr(weights: list[Tensor], precisions: list[float], scale: float) -> float:
    """κ = scale / (1 + max_l γ_{l+1} ‖W_{l+1}‖₂²): below the stability bound of the Jacobi
    relaxation, which the top-down term γ_{l+1} W_{l+1}ᵀ W_{l+1} dominates (hidden γ_l = 1)."""
    worst = max(precisions[l + 1] * _spectral_norm_sq(weights[l + 1]) for l in range(len(weights) - 1))
    return scale / (1.0 + worst)


def _one(settings: InterpSettings, x: Tensor, y: Tensor, width: int, gamma_bar: float, seed: int,
         curve: bool, gamma: float | None = None, inference_steps: int | None = None) -> dict[str, Any]:
    from .. import functional, parametrize
    from ..mup import make_mlp
    from ..network import parse_mlp
    from ..reference.pc import pc_weight_grads
    from ..types import Net, PCConfig

    model = make_mlp(x.shape[1], width, y.shape[1], hidden_layers=settings.hidden_layers, activation="identity",
                     bias=False).to(torch.float64)
    par = parametrize(model, "mup", algo="pc", base_width=settings.base_width, gamma_bar=gamma_bar,
                      gamma=settings.gamma if gamma is None else gamma, generator=torch.Generator().manual_seed(seed))
    mlp = parse_mlp(model)
    weights = [lin.weight.detach() for lin in mlp.linears]
    biases = [None] * len(weights)
    acts = list(mlp.activations)
    gammas = par.precisions
    kappa = _inference_lr(weights, gammas, settings.kappa_scale)
    main_steps = settings.inference_steps if inference_steps is None else inference_steps
    steps = max(main_steps, max(settings.steps_curve) if curve else 0)
    pc = functional.pc_train_step(weights, biases, acts, x, y, precisions=gammas, inference_steps=steps,
                                  inference_lr=kappa, backend=settings.backend, return_trajectory=curve)
    gd = functional.bp_train_step(weights, biases, acts, x, y).weight_grads
    gnt = functional.gnt_train_step(weights, biases, acts, x, y).weight_grads
    exact = closed_form_pc_grads(weights, x, y, gammas)
    relaxed = pc.weight_grads
    net, config = Net(weights, biases, acts), PCConfig(tuple(gammas))
    if curve and steps != main_steps:
        relaxed = pc_weight_grads(net, x, y, pc.trajectory[main_steps], config)[0]
    rel_err = max(float((a - b).norm() / b.norm()) for a, b in zip(relaxed, exact))

    def cosines(grads: list[Tensor]) -> dict[str, Any]:
        return {
            "gd": [_cos(g, h) for g, h in zip(grads, gd)],
            "gnt": [_cos(g, h) for g, h in zip(grads, gnt)],
        }

    j = [torch.eye(y.shape[1], dtype=x.dtype)]
    for w in reversed(weights[1:]):
        j.insert(0, j[0] @ w)
    c_gamma = sum((gammas[-1] / gammas[i]) * j[i] @ j[i].T for i in range(len(weights) - 1))
    eig = torch.linalg.eigvalsh(c_gamma)
    record = {
        "width": width, "gamma_bar": gamma_bar, "seed": seed, "gamma": par.gamma, "precision_last": gammas[-1],
        "inference_lr": kappa, "inference_steps": main_steps, "relaxed_vs_closed_form_rel_error": rel_err,
        "c_gamma_eig_min": float(eig.min()), "c_gamma_eig_max": float(eig.max()),
        "cos_pc": cosines(relaxed), "cos_pc_closed_form": cosines(exact),
        "cos_gd_gnt": [_cos(a, b) for a, b in zip(gd, gnt)],
    }
    if curve:
        record["curve"] = []
        for t in settings.steps_curve:
            grads = pc_weight_grads(net, x, y, pc.trajectory[t], config)[0]
            record["curve"].append({"steps": t, **cosines(grads)})
    return record


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def run_interp(settings: InterpSettings, *, show_progress: bool = True) -> dict[str, Any]:
    from ..data import load_dataset

    start = time.perf_counter()
    data = load_dataset(settings.dataset)
    x = data.x_train[: settings.batch_size].to(torch.float64)
    if settings.input_dim is not None:
        x = x[:, : settings.input_dim]
    y = torch.nn.functional.one_hot(data.y_train[: settings.batch_size], data.num_classes).to(torch.float64)
    jobs = [(w, g, s) for g in settings.gamma_bars for w in settings.widths for s in settings.seeds]
    bar = progress(len(jobs), "interp", show_progress)
    records = []
    for width, gamma_bar, seed in jobs:
        bar.set_postfix_str(f"width {width} gamma_bar {gamma_bar:g}")
        curve = width == settings.steps_curve_width and seed == settings.seeds[0]
        records.append(_one(settings, x, y, width, gamma_bar, seed, curve))
        bar.update()
    bar.close()
    # The γ sweep: at the smallest width, where every γ̄_L gives γ_L = γ when it is the base width.
    gamma_records = []
    bar = progress(len(settings.gamma_sweep) * len(settings.seeds), "interp gamma", show_progress)
    for gamma in settings.gamma_sweep:
        steps = int(min(settings.inference_steps * max(1.0, gamma), settings.max_inference_steps))
        for seed in settings.seeds:
            gamma_records.append(_one(settings, x, y, settings.widths[0], 0.0, seed, False, gamma=gamma,
                                      inference_steps=steps))
            bar.update()
    bar.close()
    gamma_summary = []
    for gamma in settings.gamma_sweep:
        mine = [r for r in gamma_records if r["gamma"] == gamma]
        entry = {"gamma": gamma, "width": settings.widths[0], "precision_last": mine[0]["precision_last"],
                 "inference_steps": mine[0]["inference_steps"]}
        for ref in ("gd", "gnt"):
            entry[f"cos_pc_{ref}"] = _mean([_mean(r["cos_pc"][ref]) for r in mine])
            entry[f"cos_pc_{ref}_closed_form"] = _mean([_mean(r["cos_pc_closed_form"][ref]) for r in mine])
        entry["max_rel_error_vs_closed_form"] = max(r["relaxed_vs_closed_form_rel_error"] for r in mine)
        gamma_summary.append(entry)
    # Per γ̄ and width: seed means of the per-layer cosines and of their layer average.
    summary = []
    for gamma_bar in settings.gamma_bars:
        for width in settings.widths:
            mine = [r for r in records if r["width"] == width and r["gamma_bar"] == gamma_bar]
            depth = len(mine[0]["cos_pc"]["gd"])
            entry = {"gamma_bar": gamma_bar, "width": width}
            for ref in ("gd", "gnt"):
                layers = [_mean([r["cos_pc"][ref][l] for r in mine]) for l in range(depth)]
                entry[f"cos_pc_{ref}_layers"] = layers
                entry[f"cos_pc_{ref}"] = _mean(layers)
            entry["cos_gd_gnt"] = _mean([_mean(r["cos_gd_gnt"]) for r in mine])
            entry["max_rel_error_vs_closed_form"] = max(r["relaxed_vs_closed_form_rel_error"] for r in mine)
            entry["c_gamma_eig_mean"] = _mean([0.5 * (r["c_gamma_eig_min"] + r["c_gamma_eig_max"]) for r in mine])
            summary.append(entry)
    result = {"experiment": "interp", "settings": asdict(settings), "machine": machine(),
              "data": {"dataset": data.name, "batch_size": x.shape[0], "input_dim": x.shape[1]},
              "records": records, "summary": summary, "gamma_records": gamma_records,
              "gamma_summary": gamma_summary}
    result["checks"] = checks(result)
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The acceptance checks of the theory on this run; each carries a ``hint`` naming the setting
    that usually makes a failed one pass (``pcfast interp`` prints it and exits 1)."""
    summary = result["summary"]
    widths = result["settings"]["widths"]
    out = []
    zero = [e for e in summary if e["gamma_bar"] == 0.0]
    if zero:
        series = [e["cos_pc_gd"] for e in zero]
        out.append({"check": "gamma_bar 0: cos(PC, GD) rises toward 1 with width (widest >= 0.99 and above the smallest)",
                    "passed": series[-1] >= 0.99 and series[-1] > series[0], "value": series,
                    "hint": "PC reaches GD only at large width: include wider networks (--widths up to 2048), "
                            "or a smaller --gamma"})
    minus = [e for e in summary if e["gamma_bar"] == -1.0 and e["width"] == widths[0]]
    if minus:
        e = minus[0]
        out.append({"check": "gamma_bar -1, smallest width: cos(PC, GNT) > cos(PC, GD)",
                    "passed": e["cos_pc_gnt"] > e["cos_pc_gd"],
                    "value": {"cos_pc_gnt": e["cos_pc_gnt"], "cos_pc_gd": e["cos_pc_gd"], "width": e["width"]},
                    "hint": "PC leans toward Gauss-Newton when the output precision dominates: raise --gamma "
                            "(e.g. 10), or keep the smallest width at or above --base-width"})
    worst = max(e["max_rel_error_vs_closed_form"] for e in summary + result.get("gamma_summary", []))
    out.append({"check": "relaxed PC update matches the closed-form equilibrium (relative error < 1e-3)",
                "passed": worst < 1e-3, "value": worst,
                "hint": "the relaxation has not settled: raise --inference-steps (e.g. 400), or --kappa-scale "
                        "toward 1"})
    return out


def format_interp(result: dict[str, Any]) -> str:
    lines = ["cosine of the PC weight update with GD and with GNT (mean over layers and seeds)",
             f"{'gamma_bar':>9} {'width':>6} {'cos(PC,GD)':>11} {'cos(PC,GNT)':>12} {'cos(GD,GNT)':>12} {'eig C_γ':>8}"]
    for e in result["summary"]:
        lines.append(f"{e['gamma_bar']:>9g} {e['width']:>6} {e['cos_pc_gd']:>11.4f} {e['cos_pc_gnt']:>12.4f} "
                     f"{e['cos_gd_gnt']:>12.4f} {e['c_gamma_eig_mean']:>8.3f}")
    for e in result.get("gamma_summary", []):
        lines.append(f"width {e['width']}, gamma_L {e['precision_last']:g} (T={e['inference_steps']}): "
                     f"cos(PC,GD) {e['cos_pc_gd']:.4f}, cos(PC,GNT) {e['cos_pc_gnt']:.4f}")
    for c in result["checks"]:
        lines.append(f"[{'PASS' if c['passed'] else 'FAIL'}] {c['check']}: {c['value']}")
        if not c["passed"] and c.get("hint"):
            lines.append(f"       hint: {c['hint']}")
    return "\n".join(lines)


def plot_interp(result: dict[str, Any], path: Path) -> Path:
    """Four panels: 1 − cos(PC, GD) against width; cos(PC, GNT) − cos(PC, GD) against width; both
    cosines against inference steps; per-layer cosines against the output precision γ_L.

    A function of ``result`` (the JSON ``run_interp`` writes) alone: ``pcfast plot interp.json``
    draws it again. Print resolution, legends under their panels, constrained layout (nothing
    clipped)."""
    plt = pyplot()
    with plt.rc_context(FIGURE_STYLE):
        return _plot_interp(plt, result, path)


def _plot_interp(plt, result: dict[str, Any], path: Path) -> Path:
    settings = result["settings"]
    gamma_bars = settings["gamma_bars"]
    colors = plt.get_cmap("plasma")([0.1 + 0.7 * k / max(len(gamma_bars) - 1, 1) for k in range(len(gamma_bars))])
    fig, grid = plt.subplots(2, 2, figsize=(13, 11), layout="constrained")
    axes = list(grid.flat)
    _distance_panel(axes[0], result, colors)
    _preference_panel(axes[1], result, colors)
    _steps_panel(axes[2], result, colors)
    _precision_panel(axes[3], result)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    data = result["data"]
    seeds = len(settings["seeds"])
    fig.suptitle(
        f"PC in deep linear networks: {settings['hidden_layers'] + 1} layers, {data['dataset']} batch "
        f"{data['batch_size']}, μP base width {settings['base_width']}, γ_L = {settings['gamma']:g}·m^(−γ̄_L)\n"
        f"T = {settings['inference_steps']} (checked against the closed-form equilibrium), {seeds} "
        f"seed{'s' if seeds != 1 else ''} — {machine_line(result['machine'])}")
    return save_figure(plt, fig, path, dpi=FIGURE_DPI)


# Every panel's legend sits under it.
_BELOW = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.15)}


def _distance_panel(ax, result: dict[str, Any], colors) -> None:
    """1 − cos(PC, GD) against width, a curve per γ̄_L, and 1 − cos(GD, GNT) for scale."""
    summary, gamma_bars = result["summary"], result["settings"]["gamma_bars"]
    for k, gb in enumerate(gamma_bars):
        mine = [e for e in summary if e["gamma_bar"] == gb]
        ax.plot([e["width"] for e in mine], [max(1.0 - e["cos_pc_gd"], 1e-12) for e in mine], "-o", color=colors[k],
                ms=4, label=f"γ̄_L={gb:g}")
    mine = [e for e in summary if e["gamma_bar"] == gamma_bars[0]]
    ax.plot([e["width"] for e in mine], [max(1.0 - e["cos_gd_gnt"], 1e-12) for e in mine], ":", color="0.4",
            label="1 − cos(GD, GNT)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width")
    ax.set_ylabel("1 − cosine (mean over layers, seeds)")
    ax.set_title("distance of the PC update from GD")
    ax.legend(ncols=2, **_BELOW)


def _preference_panel(ax, result: dict[str, Any], colors) -> None:
    """cos(PC, GNT) − cos(PC, GD) against width, a curve per γ̄_L."""
    summary = result["summary"]
    for k, gb in enumerate(result["settings"]["gamma_bars"]):
        mine = [e for e in summary if e["gamma_bar"] == gb]
        ax.plot([e["width"] for e in mine], [e["cos_pc_gnt"] - e["cos_pc_gd"] for e in mine], "-o", color=colors[k],
                ms=4, label=f"γ̄_L={gb:g}")
    ax.axhline(0.0, color="0.4", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width")
    ax.set_ylabel("cos(PC, GNT) − cos(PC, GD)")
    ax.set_title("> 0: PC closer to Gauss–Newton than to GD")
    ax.legend(ncols=3, **_BELOW)


def _steps_panel(ax, result: dict[str, Any], colors) -> None:
    """Both cosines against the inference steps T, at the steps-curve width."""
    gamma_bars = result["settings"]["gamma_bars"]
    for record in result["records"]:
        if "curve" not in record:
            continue
        k = gamma_bars.index(record["gamma_bar"])
        ts = [max(p["steps"], 0.5) for p in record["curve"]]
        ax.plot(ts, [_mean(p["gd"]) for p in record["curve"]], "-o", color=colors[k], ms=3,
                label=f"vs GD, γ̄_L={record['gamma_bar']:g}")
        ax.plot(ts, [_mean(p["gnt"]) for p in record["curve"]], "--s", color=colors[k], ms=3,
                label=f"vs GNT, γ̄_L={record['gamma_bar']:g}")
    settled = [v for record in result["records"] if "curve" in record for p in record["curve"] if p["steps"] >= 2
               for v in (_mean(p["gd"]), _mean(p["gnt"]))]
    if settled:  # T < L − 1 leaves some layers without an error (cosine 0): keep them off the scale
        low = min(settled)
        ax.set_ylim(low - 0.15 * (1.0 - low), 1.0 + 0.15 * (1.0 - low))
        ax.text(0.03, 0.04, "T = 0, 1: only the top layers have errors\n(mean cosine ⅓, ⅔; below the axis)",
                transform=ax.transAxes, fontsize=10)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("inference steps T (T = 0 drawn at 0.5)")
    ax.set_ylabel("cosine (mean over layers)")
    ax.set_title(f"relaxation, width {result['settings']['steps_curve_width']} (layer l learns from T ≥ L − l)")
    ax.legend(ncols=2, **_BELOW)


def _precision_panel(ax, result: dict[str, Any]) -> None:
    """Per-layer cosines with GD and GNT against the output precision γ_L (empty without a sweep)."""
    records = result.get("gamma_records", [])
    if not records:
        return
    gammas = list(result["settings"]["gamma_sweep"])
    depth = len(records[0]["cos_pc"]["gd"])
    styles = ["-", "--", ":", "-."]
    for layer in range(depth):
        for ref, color in (("gd", "tab:blue"), ("gnt", "tab:red")):
            ys = [_mean([r["cos_pc"][ref][layer] for r in records if r["gamma"] == g]) for g in gammas]
            name = "first" if layer == 0 else ("last" if layer == depth - 1 else f"hidden {layer + 1}")
            ax.plot(gammas, ys, styles[layer % len(styles)], color=color, marker="o", ms=3,
                    label=f"vs {ref.upper()}, layer {layer + 1} ({name})")
    ax.set_xscale("log")
    ax.set_xlabel("output precision γ_L")
    ax.set_ylabel("cosine per layer")
    ax.set_title(f"interpolation by γ_L, width {records[0]['width']} (last layer: GD = GNT)")
    ax.legend(ncols=2, **_BELOW)


def write_interp(result: dict[str, Any], out: Path) -> list[Path]:
    return [write_json(out / "interp.json", result), plot_interp(result, out / "interp.png")]
