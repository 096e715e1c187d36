"""Inside the relaxation: each layer's energy against the inference step, across widths, under SP
and μP — how close to equilibrium each layer gets in the T steps training uses.

Per parametrization and width: a PC model (tanh 784-M-M-10, the README's setting: lr 0.03, momentum
0.9, T = 20, κ = 0.2, MSE) trained for ``epochs`` on the embedded MNIST subset, then relaxed on the
first ``batch_size`` held-out images for ``relax_steps`` ≥ T steps with the trace on
(``pcfast.results.PCTrace``). Reported per layer: its energy per sample after every step, and the
step's size relative to the largest so far (the quantity ``inference_tol`` tests).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .common import Variant, build, machine, machine_line, progress, pyplot, save_figure, train_run, write_json


@dataclass
class TraceSettings:
    parametrizations: tuple[str, ...] = ("sp", "mup")
    widths: tuple[int, ...] = (64, 256, 1024)
    epochs: int = 1
    train_size: int = 4000
    batch_size: int = 64
    eval_batch: int = 256
    lr: float = 0.03
    momentum: float = 0.9
    inference_steps: int = 20
    inference_lr: float = 0.2
    relax_steps: int = 100
    base_width: int = 64
    seed: int = 0
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.relax_steps < self.inference_steps:
            raise ValueError(f"relax_steps: expected at least inference_steps ({self.inference_steps}), the T the "
                             f"figure marks, got {self.relax_steps}")


def _relative_steps(grad_norm: torch.Tensor, gammas: list[float], rate: float) -> list[float]:
    """s_t / max_{u≤t} s_u from a trace's activity-gradient norms (‖Δz_l‖ = (κ/γ_l) ‖∂F/∂z_l‖)."""
    scale = torch.tensor([rate / g for g in gammas[:-1]], dtype=grad_norm.dtype)
    sizes = (grad_norm.cpu() * scale).norm(dim=1)
    return (sizes / torch.cummax(sizes, 0).values).tolist()


def run_traces(settings: TraceSettings, *, show_progress: bool = True) -> dict[str, Any]:
    from ..data import load_dataset

    start = time.perf_counter()
    data = load_dataset("mnist5k")
    x, y = data.x_train[:settings.train_size], data.y_train[:settings.train_size]
    x_eval, y_eval = data.x_test[:settings.eval_batch], data.y_test[:settings.eval_batch]
    jobs = [(p, w) for p in settings.parametrizations for w in settings.widths]
    bar = progress(len(jobs), "traces", show_progress)
    panels = []
    for preset, width in jobs:
        bar.set_postfix_str(f"{preset} width {width}")
        model, par, opt = build(
            Variant("pc"), preset, width, input_dim=data.num_features, num_classes=data.num_classes, lr=settings.lr,
            base_width=settings.base_width, seed=settings.seed, momentum=settings.momentum,
            inference_steps=settings.inference_steps, inference_lr=settings.inference_lr, backend=settings.backend)
        outcome = train_run(opt, x, y, epochs=settings.epochs, batch_size=settings.batch_size, seed=settings.seed)
        # The relaxation of the trained model on held-out images, past the T of training.
        tracer = type(opt)(model, par, lr=settings.lr, inference_steps=settings.relax_steps,
                           inference_lr=settings.inference_lr, backend=settings.backend, trace=True,
                           check_divergence=False)
        model.zero_grad(set_to_none=True)
        tracer.compute_gradients(x_eval.to(next(model.parameters()).device), y_eval.to(next(model.parameters()).device))
        trace = tracer.last_trace
        energy = (trace.energy.double().cpu() / settings.eval_batch).tolist()
        panels.append({"preset": preset, "width": width, "diverged": outcome["diverged"],
                       "energy_per_sample": energy,
                       "grad_norm": trace.grad_norm.double().cpu().tolist(),
                       "relative_step": _relative_steps(trace.grad_norm.double(), list(par.precisions),
                                                        settings.inference_lr)})
        bar.update()
    bar.close()
    return {"experiment": "traces", "settings": asdict(settings), "machine": machine(), "panels": panels,
            "seconds": round(time.perf_counter() - start, 1)}


def format_traces(result: dict[str, Any]) -> str:
    t = result["settings"]["inference_steps"]
    lines = [f"per layer: energy per sample at step 0, at T = {t} and at the last step; relative step size at T"]
    for panel in result["panels"]:
        energy = panel["energy_per_sample"]
        cells = [f"{e0:.3g} → {et:.3g} → {el:.3g}" for e0, et, el in zip(energy[0], energy[t], energy[-1])]
        lines.append(f"{panel['preset']:<4} width {panel['width']:>5}: " + " | ".join(cells)
                     + f"; step size at T {panel['relative_step'][t - 1]:.3f}")
    return "\n".join(lines)


def plot_traces(result: dict[str, Any], path: Path) -> Path:
    """Rows: parametrizations. Columns: each layer's energy per sample against the inference step
    (log scale), then the relative step size; colour = width; the dashed line marks training's T."""
    plt = pyplot()
    settings = result["settings"]
    presets, widths = settings["parametrizations"], settings["widths"]
    panels = {(p["preset"], p["width"]): p for p in result["panels"]}
    depth = len(result["panels"][0]["energy_per_sample"][0])
    columns = depth + 1
    fig, axes = plt.subplots(len(presets), columns, figsize=(3.6 * columns, 3.2 * len(presets)), squeeze=False)
    colors = plt.get_cmap("viridis")
    names = [f"hidden layer {l + 1}" for l in range(depth - 1)] + ["output (γ_L ℓ)"]
    for i, preset in enumerate(presets):
        for k, width in enumerate(widths):
            panel = panels[(preset, width)]
            color = colors(k / max(len(widths) - 1, 1))
            energy = panel["energy_per_sample"]
            steps = list(range(1, len(energy)))  # from step 1: every hidden error starts at 0
            for l in range(depth):
                axes[i][l].plot(steps, [row[l] for row in energy[1:]], color=color, lw=1.6, label=f"width {width}")
            relative = panel["relative_step"]
            axes[i][depth].plot(range(1, len(relative) + 1), relative, color=color, lw=1.6)
        label = "μP" if preset == "mup" else "SP"
        for l in range(columns):
            ax = axes[i][l]
            ax.axvline(settings["inference_steps"], color="0.5", ls="--", lw=1)
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both")
            ax.set_title(f"{label} · " + (names[l] if l < depth else "step size / largest so far"), fontsize=10)
            if i == len(presets) - 1:
                ax.set_xlabel("inference step t")
        axes[i][0].set_ylabel("energy per sample", fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels + [], loc="lower center", ncol=len(widths) + 1, fontsize=9, frameon=False)
    axes[0][depth].plot([], [], color="0.5", ls="--", label=f"T = {settings['inference_steps']} (training)")
    axes[0][depth].legend(fontsize=8, loc="upper right")
    fig.suptitle(
        f"PC relaxation of a trained tanh 784-M-M-10 ({settings['epochs']} epoch(s) on the embedded MNIST subset, "
        f"lr {settings['lr']:g}, κ {settings['inference_lr']:g}), {settings['eval_batch']} held-out images\n"
        f"{machine_line(result['machine'])}", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.94))
    return save_figure(plt, fig, path, dpi=150)


def write_traces(result: dict[str, Any], out: Path) -> list[Path]:
    return [write_json(out / "traces.json", result), plot_traces(result, out / "traces.png")]
