"""What every experiment shares: algorithm variants, building a model + optimizer, one training run,
and writing results (JSON, CSV) with the machine named.

An *algorithm variant* is an algorithm plus the settings that change its μP: ``"pc"`` is PC with
γ̄_L = 0 and ``"pc:-1"`` is PC with γ̄_L = −1; ``"bp"``, ``"tp"`` and ``"dtp"`` have none.
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ALGOS = ("bp", "pc", "tp", "dtp")


@dataclass(frozen=True)
class Variant:
    """An algorithm and, for PC, its output-precision exponent γ̄_L."""

    algo: str
    gamma_bar: float = 0.0

    @property
    def name(self) -> str:
        """The spelling used on the command line and in result files: ``pc``, ``pc:-1``."""
        if self.algo == "pc" and self.gamma_bar != 0.0:
            return f"pc:{self.gamma_bar:g}"
        return self.algo

    @property
    def label(self) -> str:
        """For figures."""
        if self.algo == "pc":
            return f"PC (γ̄_L={self.gamma_bar:g})".replace("-", "−")
        return self.algo.upper()


def parse_variant(text: str) -> Variant:
    """``"bp"``, ``"tp"``, ``"dtp"``, ``"pc"`` or ``"pc:G"`` (PC with γ̄_L = G ∈ [−1, 0])."""
    algo, _, rest = text.partition(":")
    if algo not in ALGOS:
        raise ValueError(f"algorithm {text!r}: expected one of {ALGOS}, or pc:G for PC with gamma_bar G")
    if not rest:
        return Variant(algo)
    if algo != "pc":
        raise ValueError(f"algorithm {text!r}: only pc takes a gamma_bar (pc:-1)")
    try:
        gamma_bar = float(rest)
    except ValueError:
        raise ValueError(f"algorithm {text!r}: gamma_bar {rest!r} is not a number") from None
    if not -1.0 <= gamma_bar <= 0.0:
        raise ValueError(f"algorithm {text!r}: gamma_bar must lie in [-1, 0], got {gamma_bar:g}")
    return Variant("pc", gamma_bar)


def build(
    variant: Variant,
    preset: str,
    width: int,
    *,
    input_dim: int,
    num_classes: int,
    lr: float,
    base_width: int = 64,
    hidden_layers: int = 2,
    activation: str = "tanh",
    readout_scale: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    **optimizer_kwargs: Any,
):
    """``(model, parametrization, optimizer)`` for one configuration, the model on ``device``; the
    init (drawn on the CPU, so the same on every device) and TP/DTP's feedback noise depend only on
    ``seed``."""
    from ..mup import make_mlp, parametrize
    from ..mup.coord import make_optimizer

    torch.manual_seed(seed)
    model = make_mlp(input_dim, width, num_classes, hidden_layers=hidden_layers, activation=activation).to(dtype)
    par = parametrize(model, preset, algo=variant.algo, base_width=base_width, gamma_bar=variant.gamma_bar,
                      readout_scale=readout_scale, generator=torch.Generator().manual_seed(seed))
    model.to(device)
    kwargs = dict(optimizer_kwargs)
    if variant.algo == "bp":
        kwargs.pop("backend", None)
    for key in ("inference_steps", "inference_lr", "schedule", "fpa"):
        if variant.algo != "pc":
            kwargs.pop(key, None)
    for key in ("beta", "feedback_lr", "feedback_steps", "feedback_noise", "feedback_weight_decay", "seed"):
        if variant.algo not in ("tp", "dtp"):
            kwargs.pop(key, None)
    if variant.algo in ("tp", "dtp"):
        kwargs.setdefault("seed", seed)  # the feedback-noise generator follows the run's seed too
    return model, par, make_optimizer(variant.algo, model, par, lr, **kwargs)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor, loss: str = "mse") -> tuple[float, float]:
    """Mean loss (``½‖y − f‖²`` per sample for MSE) and accuracy of the feedforward pass."""
    f = model(x)
    if loss == "mse":
        target = torch.nn.functional.one_hot(labels, f.shape[1]).to(f.dtype)
        value = 0.5 * float(((target - f) ** 2).sum(1).mean())
    else:
        value = float(torch.nn.functional.cross_entropy(f, labels))
    return value, float((f.argmax(1) == labels).float().mean())


def train_run(
    opt,
    model: torch.nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    scheduler: Any = None,
    scheduler_per_step: bool = False,
    on_step: Callable[[dict], None] | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> dict[str, Any]:
    """Train for ``epochs``; the batch order depends only on ``seed`` and the epoch, so every
    configuration of a sweep sees the same batches. ``scheduler`` steps once per epoch, or once
    per batch with ``scheduler_per_step``. Stops at the first ``DivergenceError`` (or
    non-finite loss) and reports it instead of raising.

    Returns ``{"diverged": bool, "steps": int, "error": str | None, "mean_stats": {…}}``.
    """
    from ..data import iterate_batches
    from ..errors import DivergenceError

    steps = 0
    for epoch in range(epochs):
        totals: dict[str, float] = {}
        count = 0
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        for xb, yb in iterate_batches(x, labels, batch_size, generator=generator):
            opt.zero_grad()
            try:
                stats = opt.step(xb, yb)
            except DivergenceError as exc:
                return {"diverged": True, "steps": steps, "error": str(exc), "mean_stats": {}}
            if not all(math.isfinite(v) for v in stats.values()):
                return {"diverged": True, "steps": steps, "error": f"non-finite statistics {stats}", "mean_stats": {}}
            steps += 1
            if scheduler is not None and scheduler_per_step:
                scheduler.step()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            count += 1
            if on_step is not None:
                on_step(stats)
        if scheduler is not None and not scheduler_per_step:
            scheduler.step()
        means = {k: v / max(count, 1) for k, v in totals.items()}
        if on_epoch is not None:
            on_epoch(epoch, means)
    return {"diverged": False, "steps": steps, "error": None, "mean_stats": means if epochs else {}}


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (the GPU when there is one, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} asked for, but torch sees no CUDA device here; use --device cpu")
    return device


def machine() -> dict[str, Any]:
    """Where a result was measured: CPU model, core count, threads, OS, Python and torch versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
        "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def machine_line(info: dict[str, Any]) -> str:
    return f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}" + (f", {info['gpu']}" if info["gpu"] else "")


def _clean(value: Any) -> Any:
    """JSON has no inf/nan: write them as null; floats keep 7 significant digits."""
    if isinstance(value, float):
        return float(f"{value:.7g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _shallow(value: Any) -> bool:
    """A scalar, or a container holding scalars and lists of scalars only."""
    if not isinstance(value, (dict, list)):
        return True
    items = value.values() if isinstance(value, dict) else value
    return all(not isinstance(v, dict) and (not isinstance(v, list) or not any(isinstance(u, (dict, list)) for u in v))
               for v in items)


def _dumps(value: Any, indent: int = 0) -> str:
    """Indented JSON whose innermost records and lists sit on one line each (small, still diffable)."""
    flat = json.dumps(value, ensure_ascii=False)
    if len(flat) <= 100 or _shallow(value):
        return flat
    pad, inner = " " * indent, " " * (indent + 1)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {_dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    return "[\n" + ",\n".join(f"{inner}{_dumps(v, indent + 1)}" for v in value) + f"\n{pad}]"


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_dumps(_clean(payload)) + "\n")
    return path


def write_csv(path: Path, rows: Iterable[dict[str, Any]], columns: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v))
                             for k, v in row.items()})
    return path


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or a clear error if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("pcfast: figures need matplotlib: pip install matplotlib (or pip install 'pcfast[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def progress(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr, or a do-nothing stand-in."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc, unit="run", leave=False, dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            pass
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def write(self, s: str) -> None: print(s)
    def close(self) -> None: ...
