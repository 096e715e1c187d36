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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

ALGOS = ("bp", "pc", "tp", "dtp", "ipc")


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
    def parametrize_algo(self) -> str:
        """The ``algo`` of its parametrization: iPC takes PC's multipliers (``pcfast.optim.IPC``)."""
        return "pc" if self.algo == "ipc" else self.algo

    @property
    def label(self) -> str:
        """For figures."""
        if self.algo == "ipc":
            return "iPC"
        if self.algo == "pc":
            return f"PC (γ̄_L={self.gamma_bar:g})".replace("-", "−")
        return self.algo.upper()


def parse_variant(text: str) -> Variant:
    """``"bp"``, ``"tp"``, ``"dtp"``, ``"pc"``, ``"pc:G"`` (PC with γ̄_L = G ∈ [−1, 0]) or ``"ipc"``
    (incremental PC)."""
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


# What ``torch.optim`` update rule the optimizers apply (their ``optimizer=`` argument): SGD, their
# default, takes ``momentum``; Adam and AdamW run with torch's defaults for betas, eps and weight decay.
OPTIMIZERS = ("sgd", "adam", "adamw")


def update_rule(optimizer: str, momentum: float | None = None) -> dict[str, Any]:
    """The optimizer keywords that select the update rule ``optimizer`` (one of ``OPTIMIZERS``): for
    ``"sgd"`` only ``momentum`` (when given; the optimizers' default rule), otherwise
    ``optimizer=torch.optim.Adam`` or ``AdamW`` — whose μP multipliers the optimizers pick."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {optimizer!r}")
    if optimizer == "sgd":
        return {} if momentum is None else {"momentum": momentum}
    if momentum is not None:
        raise ValueError(f"momentum: SGD's momentum, but the optimizer is {optimizer} (it has betas instead); "
                         "leave momentum unset")
    return {"optimizer": {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]}


@dataclass(frozen=True)
class ModelSpec:
    """An MLP ``input_dim``-``width``-…-``num_classes`` with ``hidden_layers`` hidden layers — or, with
    ``model="cnn"``, a conv net (``pcfast.mup.make_cnn``) of ``hidden_layers`` conv layers of ``width``
    channels on images of ``image_shape`` (C, H, W) — and what its μP initialisation depends on
    (``build``'s keywords that are not the optimizer's)."""

    input_dim: int
    width: int
    num_classes: int
    base_width: int = 64
    hidden_layers: int = 2
    activation: str = "tanh"
    readout_scale: float = 1.0
    seed: int = 0
    dtype: torch.dtype = torch.float32
    model: str = "mlp"
    image_shape: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        from ..mup.coord import MODEL_KINDS

        if self.model not in MODEL_KINDS:
            raise ValueError(f"model: expected one of {MODEL_KINDS}, got {self.model!r}")
        if self.model == "cnn":
            shape = self.image_shape
            if shape is None or len(shape) != 3 or shape[0] * shape[1] * shape[2] != self.input_dim:
                raise ValueError(f"image_shape: model='cnn' needs the (C, H, W) of the {self.input_dim} input "
                                 f"features, got {shape!r}")

    def make(self) -> torch.nn.Module:
        """The model, freshly initialised by torch's defaults (``build`` re-initialises it)."""
        from ..mup import make_mlp
        from ..mup.coord import make_cnn

        if self.model == "cnn":
            return make_cnn(self.image_shape, self.width, self.num_classes, conv_layers=self.hidden_layers,
                            activation=self.activation)
        return make_mlp(self.input_dim, self.width, self.num_classes, hidden_layers=self.hidden_layers,
                        activation=self.activation)


MODEL_KEYWORDS = tuple(f.name for f in fields(ModelSpec) if f.name not in ("input_dim", "width", "num_classes"))
# Optimizer keywords that only some algorithms take; a sweep passes them all and each optimizer gets its own.
PC_KEYWORDS = ("inference_steps", "inference_lr", "schedule", "fpa")
PC_ONLY_KEYWORDS = ("inference_tol", "trace", "check_divergence")  # PC's inference control, not iPC's
TP_KEYWORDS = ("beta", "feedback_lr", "feedback_steps", "feedback_noise", "feedback_weight_decay", "seed")


def build(
    variant: Variant,
    preset: str,
    width: int,
    *,
    input_dim: int,
    num_classes: int,
    lr: float,
    device: torch.device | str = "cpu",
    **kwargs: Any,
):
    """``(model, parametrization, optimizer)`` for one configuration, the model on ``device``; the
    init (drawn on the CPU, so the same on every device) and TP/DTP's feedback noise depend only on
    ``seed``.

    ``kwargs`` holds the model's keywords (``MODEL_KEYWORDS``: ``base_width=64``,
    ``hidden_layers=2``, ``activation="tanh"``, ``readout_scale=1.0``, ``seed=0``,
    ``dtype=torch.float32``, ``model="mlp"`` or ``"cnn"`` with ``image_shape``; see ``ModelSpec``) and the optimizer's (``momentum``, ``loss``,
    ``backend``, ``optimizer=torch.optim.Adam``, …; those another algorithm takes are dropped)."""
    spec = ModelSpec(input_dim, width, num_classes, **{k: kwargs.pop(k) for k in MODEL_KEYWORDS if k in kwargs})
    return build_model(variant, preset, spec, lr=lr, device=device, **kwargs)


def build_model(variant: Variant, preset: str, spec: ModelSpec, *, lr: float, device: torch.device | str = "cpu",
                **optimizer_kwargs: Any):
    """``build`` for a ``ModelSpec``."""
    from ..mup import parametrize
    from ..mup.coord import make_optimizer

    torch.manual_seed(spec.seed)
    model = spec.make().to(spec.dtype)
    par = parametrize(model, preset, algo=variant.parametrize_algo, base_width=spec.base_width,
                      gamma_bar=variant.gamma_bar,
                      readout_scale=spec.readout_scale, generator=torch.Generator().manual_seed(spec.seed))
    model.to(device)
    return model, par, make_optimizer(variant.algo, model, par, lr, **_optimizer_kwargs(variant.algo, spec.seed,
                                                                                         optimizer_kwargs))


def _optimizer_kwargs(algo: str, seed: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` less the keywords ``algo``'s optimizer does not take."""
    kwargs = dict(kwargs)
    if algo == "bp":
        kwargs.pop("backend", None)
    for key in PC_KEYWORDS if algo not in ("pc", "ipc") else ():
        kwargs.pop(key, None)
    for key in PC_ONLY_KEYWORDS if algo != "pc" else ():
        kwargs.pop(key, None)
    for key in TP_KEYWORDS if algo not in ("tp", "dtp") else ():
        kwargs.pop(key, None)
    if algo in ("tp", "dtp"):
        kwargs.setdefault("seed", seed)  # the feedback-noise generator follows the run's seed too
    return kwargs


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
    x: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    seed: int = 0,
    scheduler: Any = None,
    on_step: Callable[[dict], None] | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    start_epoch: int = 0,
) -> dict[str, Any]:
    """Train epochs ``start_epoch … epochs − 1``; the batch order depends only on ``seed`` and the
    epoch, so every configuration of a sweep sees the same batches and a run resumed at
    ``start_epoch`` sees the batches the uninterrupted run would have. ``scheduler`` steps once per
    epoch (a per-batch schedule steps in ``on_step(stats)``, which runs after every step);
    ``on_epoch(epoch, mean_stats)`` runs after the epoch's scheduler step. Stops at the first
    ``DivergenceError`` (or non-finite loss, or torch's refusal of a step size beyond the
    parameters' dtype) and reports it instead of raising.

    Returns ``{"diverged": bool, "steps": int, "error": str | None, "mean_stats": {…}}``.
    """
    from ..data import iterate_batches

    steps = 0
    means: dict[str, float] = {}
    shard = _shard_of(opt, len(x), batch_size)
    for epoch in range(start_epoch, epochs):
        totals: dict[str, float] = {}
        count = 0
        # Reduced modulo 2^64, the range torch seeds take: any integer seed gives a valid batch order.
        generator = torch.Generator().manual_seed((seed * 1000 + epoch) % 2**64)
        for xb, yb in iterate_batches(x, labels, batch_size, generator=generator):
            if shard is not None:  # data parallel: this rank's rows; the optimizer averages the group's
                rank, ranks = shard
                xb, yb = xb.tensor_split(ranks)[rank], yb.tensor_split(ranks)[rank]
            stats, error = _guarded_step(opt, xb, yb)
            if error is not None:
                return {"diverged": True, "steps": steps, "error": error, "mean_stats": {}}
            steps += 1
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            count += 1
            if on_step is not None:
                on_step(stats)
        if scheduler is not None:
            scheduler.step()
        means = {k: v / max(count, 1) for k, v in totals.items()}
        if on_epoch is not None:  # after the scheduler's step: the state a resumed run starts from
            on_epoch(epoch, means)
    return {"diverged": False, "steps": steps, "error": None, "mean_stats": means}


def _guarded_step(opt, xb: torch.Tensor, yb: torch.Tensor) -> tuple[dict[str, float], str | None]:
    """One optimizer step: ``(stats, None)``, or ``({}, why)`` when it diverged."""
    from ..errors import DivergenceError

    opt.zero_grad()
    try:
        stats = opt.step(xb, yb)
    except DivergenceError as exc:
        return {}, str(exc)
    except RuntimeError as exc:
        if "without overflow" not in str(exc):
            raise
        # torch refuses a step size beyond the parameters' dtype (alpha = 1e308 on float32):
        # a learning rate that large diverges, and is reported as such.
        return {}, f"the update overflows the parameters' dtype, so it diverged ({exc})"
    if not all(math.isfinite(v) for v in stats.values()):
        return {}, f"non-finite statistics {stats}"
    return stats, None


def _shard_of(opt, rows: int, batch_size: int) -> tuple[int, int] | None:
    """(rank, ranks) when ``opt`` averages over a process group (data parallel, e.g. under
    ``torchrun``): every rank draws the same batches and steps on its contiguous share of each one,
    so the run equals the single-process run on whole batches. None for single-process training."""
    group = getattr(opt, "process_group", None)
    if group is None:
        return None
    rank, ranks = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    smallest = min(batch_size, rows) if rows % batch_size == 0 else rows % batch_size
    if smallest < ranks:
        raise ValueError(f"batch_size: a batch of {smallest} rows cannot be shared by {ranks} ranks (each needs "
                         f"at least one row); choose a batch size and training-set size whose batches have "
                         f"at least {ranks} rows")
    return rank, ranks


# A run is *collapsing* — not merely learning slowly — when, after an epoch, one of these holds:
CHANCE_FACTOR = 1.5  # test accuracy ≤ 1.5 / classes (chance level) from the second epoch and
CHANCE_MIN_STEPS = 100  # this many optimizer steps on (fewer is too short a run to judge by accuracy)
ACCURACY_DROP = 0.25  # test accuracy ≥ 0.25 below the best earlier epoch
LOSS_RISE = 2.0  # epoch-mean train loss ≥ 2 × the lowest earlier epoch mean
RECONSTRUCTION_RISE = 10.0  # TP/DTP: reconstruction loss ≥ 10 × its lowest earlier value while the loss rose


def collapse_symptoms(history: list[dict[str, Any]], num_classes: int) -> dict[str, str]:
    """What in a run's per-epoch log says that it is collapsing, as ``{kind: description}``;
    empty while it trains normally.

    ``history`` holds one entry per finished epoch with ``test_accuracy``, the optimizer ``steps``
    taken so far and the epoch means of the step statistics (``loss``; TP/DTP also
    ``reconstruction``). Kinds: ``"chance"`` (accuracy at chance level from the second epoch and
    ``CHANCE_MIN_STEPS`` steps on), ``"accuracy_drop"``, ``"loss_rise"`` and ``"reconstruction_rise"``
    (the feedback maps no longer invert the forward layers), with the thresholds ``CHANCE_FACTOR``,
    ``ACCURACY_DROP``, ``LOSS_RISE`` and ``RECONSTRUCTION_RISE``. A first epoch alone never counts:
    slow starters sit near chance there and recover.
    """
    if len(history) < 2:
        return {}
    *earlier, last = history
    found: dict[str, str] = {}
    accuracy = last.get("test_accuracy")
    if accuracy is not None:
        chance = 1.0 / num_classes
        if accuracy <= CHANCE_FACTOR * chance and last.get("steps", CHANCE_MIN_STEPS) >= CHANCE_MIN_STEPS:
            found["chance"] = f"test accuracy {accuracy:.3f}, chance is {chance:.3f}"
        best = max((e["test_accuracy"] for e in earlier if e.get("test_accuracy") is not None), default=None)
        if best is not None and accuracy <= best - ACCURACY_DROP:
            found["accuracy_drop"] = f"test accuracy fell from {best:.3f} to {accuracy:.3f}"
    losses = [e["loss"] for e in earlier if e.get("loss") is not None and math.isfinite(e["loss"])]
    loss = last.get("loss")
    if loss is not None and losses and not loss < LOSS_RISE * min(losses):  # a NaN loss counts too
        found["loss_rise"] = f"train loss rose from {min(losses):.4g} to {loss:.4g}"
    recon = [e["reconstruction"] for e in earlier if e.get("reconstruction") is not None]
    value = last.get("reconstruction")
    rose = loss is not None and earlier[-1].get("loss") is not None and not loss < earlier[-1]["loss"]
    if value is not None and recon and rose and not value < RECONSTRUCTION_RISE * min(recon):
        found["reconstruction_rise"] = f"reconstruction loss rose from {min(recon):.4g} to {value:.4g}"
    return found


def likely_cause(symptoms: dict[str, str], history: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """The setting most likely behind a collapse, with the value to try, from the symptoms and the
    run's settings (``algo``, ``lr``; for TP/DTP ``feedback_lr``, ``activation``, ``loss``, ``beta``)."""
    algo, lr = settings["algo"], settings["lr"]
    if algo in ("tp", "dtp") and "reconstruction_rise" in symptoms:
        cause = (f"--lr {lr:g} is too fast for the feedback weights (--feedback-lr {settings['feedback_lr']:g}) to "
                 f"keep inverting the forward layers: try --lr {lr / 4:g}")
    elif set(symptoms) == {"chance"} and history[-1].get("loss") is not None \
            and history[-1]["loss"] < history[0].get("loss", math.inf):
        cause = (f"--lr {lr:g} is too small to learn in this many epochs (the loss falls slowly: "
                 f"{history[0]['loss']:.4g} to {history[-1]['loss']:.4g}): try --lr {lr * 4:g}")
    else:
        cause = f"--lr {lr:g} is too high: try --lr {lr / 4:g}"
    also = []
    if algo in ("tp", "dtp") and settings.get("activation") == "relu":
        also.append("--activation relu (dead units leave the feedback inverses ill-posed; tanh is the tested setting)")
    if algo in ("tp", "dtp") and settings.get("loss") == "ce":
        also.append(f"--loss ce with --beta {settings.get('beta', 0.5):g} (targets follow the softmax gradient; "
                    "mse is the tested setting)")
    return cause + ("; also implicated: " + "; ".join(also) if also else "")


def collapse_warning(history: list[dict[str, Any]], num_classes: int, settings: dict[str, Any]) -> str | None:
    """One log line saying that the run in ``history`` is collapsing and which setting is most
    likely at fault, or ``None`` while it trains normally (see ``collapse_symptoms``)."""
    symptoms = collapse_symptoms(history, num_classes)
    if not symptoms:
        return None
    return (f"warning: {settings['algo']} is collapsing at epoch {len(history)} ({'; '.join(symptoms.values())}); "
            f"most likely {likely_cause(symptoms, history, settings)}")


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


# Figures are drawn for print: 150 dpi and fonts legible at 100% zoom.
FIGURE_DPI = 150
FIGURE_STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10,
                "ytick.labelsize": 10, "legend.fontsize": 10, "legend.title_fontsize": 10}


def save_figure(plt, fig, path: Path, **savefig_kwargs: Any) -> Path:
    """Save ``fig`` at ``path`` (its directory created) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, **savefig_kwargs)
    plt.close(fig)
    return path


def stack_legends_below(fig, legends: list[dict[str, Any]], gap: float = 0.006) -> list:
    """Figure legends (``fig.legend`` keyword sets) centred below the panels, one under the other.

    Each is anchored by its upper edge under the lowest of the axes and the legends before it,
    after a draw has fixed the layout; saving with ``bbox_inches="tight"`` then widens the canvas
    to hold them, so none overlaps a panel or another legend and none is clipped."""
    fig.canvas.draw()
    inverse = fig.transFigure.inverted()
    top = min(ax.get_tightbbox().transformed(inverse).y0 for ax in fig.axes) - gap
    placed = []
    for spec in legends:
        legend = fig.legend(loc="upper center", bbox_to_anchor=(0.5, top), frameon=True, **spec)
        fig.canvas.draw()
        top = legend.get_window_extent().transformed(inverse).y0 - gap
        placed.append(legend)
    return placed


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
