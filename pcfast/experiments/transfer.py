"""μTransfer: does the optimal learning rate stay put as the network widens?

For every algorithm variant × parametrization (``sp``, ``mup``) × width × learning rate on a factor-2
grid, train a fresh MLP — or, with ``model="cnn"``, a conv net whose width is its channels
(``pcfast.mup.make_cnn``, trained on the dataset's (N, C, H, W) images) — for a few epochs, once per seed (the seed fixes the init and the batch order,
so every configuration sees the same batches), then record the final train loss (feedforward, over
the whole training subset) and the test accuracy, averaged over seeds. Runs that raise
``DivergenceError`` or end non-finite are kept and marked diverged (a configuration counts as
diverged when any of its seeds did). The summary gives, per
variant × parametrization, the optimal learning rate per width and its drift in grid steps between
the smallest and the largest width.

At the base width μP equals SP exactly, and under SP the PC output-precision exponent γ̄_L has no
effect (γ_L = γ at every width): such runs are identical, so each is trained once and shared.

Each distinct run is a *trial* (``pcfast.experiments.sweep``): ``run_trial`` is a pure function of
the settings and the trial, an executor (serial, or Ray tasks) maps trials to results, and a journal
next to the result files records every finished trial, so an interrupted sweep resumes where it
stopped and the files are built from the journal alone — the same bytes whichever executor ran it.
"""
from __future__ import annotations

import functools
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from .common import (
    FIGURE_DPI,
    FIGURE_STYLE,
    ModelSpec,
    Variant,
    build,
    evaluate,
    machine,
    machine_line,
    parse_variant,
    progress,
    pyplot,
    resolve_device,
    save_figure,
    stack_legends_below,
    train_run,
    update_rule,
    write_csv,
    write_json,
)
from .sweep import Journal, SerialExecutor, Trial, intra_op_threads

# Sensible factor-2 grids (log2 of the base learning rate) per variant, for momentum 0.9 and the
# embedded MNIST subset: they bracket the optimum at every width and reach the divergence edge.
DEFAULT_GRIDS = {"bp": (-8, -2), "pc": (-7, -1), "pc:-1": (-7, -1), "tp": (-9, -3), "dtp": (-8, -2),
                 "ipc": (-11, -2)}  # iPC updates T times per batch; under μP its optimum falls with width
# With Adam or AdamW (``optimizer``), whose step size does not follow the gradient's scale, one grid
# serves every variant: 2^-13 ≈ 1.2e-4 … 2^-4 ≈ 0.06 around torch's default 1e-3. On the quick preset
# the base-width optimum of BP and PC lies at 2^-8 … 2^-7, and from 2^-5 on the loss is about the zero
# output's (Adam's bounded steps rarely diverge), so the grid spans SP's smaller optimum at wide widths too.
ADAM_GRID = (-13, -4)
# The readout's init scale is a hyperparameter like the learning rate: chosen per algorithm at the base
# width (from {1, 0.1}; μP then transfers it). TP/DTP keep the standard readout scale b_L = 1/2, so
# their random initial output f_0 stays Θ(1) at every width; a 10× smaller one lets them train
# (base-width train loss 0.20 instead of 0.36 for DTP), while BP and PC do better with 1.
DEFAULT_READOUT_SCALES = {"bp": 1.0, "pc": 1.0, "tp": 0.1, "dtp": 0.1, "ipc": 1.0}


@dataclass
class TransferSettings:
    """Everything a sweep depends on; stored in the JSON next to the results."""

    name: str = "quick"
    dataset: str = "mnist5k"
    root: str | None = None
    fallback_dataset: str | None = None  # used, and said so, when ``dataset``'s files are missing
    variants: tuple[str, ...] = ("bp", "pc", "pc:-1", "tp", "dtp")
    parametrizations: tuple[str, ...] = ("sp", "mup")
    widths: tuple[int, ...] = (64, 256, 1024)
    grids: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(DEFAULT_GRIDS))
    train_size: int | None = 1024
    epochs: int = 2
    batch_size: int = 32
    momentum: float | None = 0.9  # SGD's; None with Adam and AdamW
    base_width: int = 64
    hidden_layers: int = 2
    activation: str = "tanh"
    loss: str = "mse"
    readout_scales: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_READOUT_SCALES))
    inference_steps: int = 5
    inference_lr: float = 0.2
    beta: float = 0.5
    feedback_lr: float = 0.1
    seeds: tuple[int, ...] = (0, 1)
    schedule: str = "cosine"  # "cosine": per-step decay from lr to 0, or "constant"
    backend: str = "auto"
    device: str = "auto"  # "auto": the GPU when there is one (with backend auto: the triton kernels)
    # Intra-op threads of every trial. Part of the result: the thread count changes how BLAS splits
    # its sums, hence the float rounding; and one thread per trial degrades gracefully on a shared machine.
    threads: int = 1
    # The update rule (``common.OPTIMIZERS``). Recorded in the results only when it is not SGD, so SGD
    # sweeps keep the files and journal hashes they had before the option existed.
    optimizer: str = "sgd"
    # "mlp", or "cnn": ``hidden_layers`` conv layers of ``width`` channels (3×3, each followed by a 2×2
    # max-pool while the image is at least 2 pixels wide), then a linear readout. Recorded in the
    # results only when it is not the MLP, so MLP sweeps keep their files and journal hashes.
    model: str = "mlp"

    def as_dict(self) -> dict[str, Any]:
        """The settings as stored in the JSON: every field, ``optimizer`` only when it is not SGD and
        ``model`` only when it is not the MLP."""
        values = asdict(self)
        if self.optimizer == "sgd":
            values.pop("optimizer")
        if self.model == "mlp":
            values.pop("model")
        return values

    def grid(self, variant: str) -> list[int]:
        """log2 learning rates for ``variant`` (integers: a factor-2 grid)."""
        lo, hi = self.grids.get(variant, self.grids.get(parse_variant(variant).algo, (-8, 0)))
        return list(range(int(lo), int(hi) + 1))

    def readout_scale(self, variant: str) -> float:
        return float(self.readout_scales.get(variant, self.readout_scales.get(parse_variant(variant).algo, 1.0)))


PRESETS: dict[str, TransferSettings] = {
    # ≤ 5 minutes on 2 idle CPU cores: 1,024 training images, 2 epochs (64 steps), PC T = 5, 2 seeds.
    "quick": TransferSettings(),
    # Six widths up to 2048 (a 32× range), twice the data (128 steps): about 25 minutes on 2 idle cores.
    "medium": TransferSettings(name="medium", widths=(64, 128, 256, 512, 1024, 2048), train_size=2048),
    # The paper's setting: 3-layer MLP, widths up to 4096, FashionMNIST (when its files exist), all
    # 60,000 images, 10 epochs, PC T = 20: days on 2 CPU cores; meant for a GPU.
    "full": TransferSettings(name="full", dataset="fashion_mnist", fallback_dataset="mnist5k", widths=(64, 128, 256, 512, 1024, 2048, 4096),
                             train_size=None, epochs=10, inference_steps=20, inference_lr=0.1),
}

# The same experiment on conv nets (``model="cnn"``), whose width is the channel count of every conv
# layer; the file stems say "cnn", so their results sit next to the MLP's without overwriting them.
CNN_GRIDS = {"bp": (-7, -1), "pc": (-7, -1), "dtp": (-8, -2)}
CNN_PRESETS: dict[str, TransferSettings] = {
    # ≤ 10 minutes on 2 CPU cores: scikit-learn's 8×8 digits (1×8×8 images), two conv layers of 8 … 64
    # channels (8×8 → 4×4 → 2×2, then the readout), 1,024 images, 3 epochs, PC T = 5, 2 seeds.
    "quick": TransferSettings(name="quick_cnn", model="cnn", dataset="digits", variants=("bp", "pc", "dtp"),
                              widths=(8, 16, 32, 64), base_width=8, grids=dict(CNN_GRIDS), epochs=3),
    # Sixteen-fold in width (8 … 128 channels), all 1,438 digits: 378 trainings, 11 minutes on one thread.
    "medium": TransferSettings(name="medium_cnn", model="cnn", dataset="digits", variants=("bp", "pc", "dtp"),
                               widths=(8, 16, 32, 64, 128), base_width=8, grids=dict(CNN_GRIDS), epochs=3,
                               train_size=None),
    # CIFAR-10 (3×32×32 images; its files under ``root``, no fallback: a sweep on other data would be
    # another experiment), three conv layers (32 → 16 → 8 → 4 pixels) of 16 … 256 channels, all 50,000
    # images, 10 epochs of batch 128, PC T = 20 at κ = 0.1, 2 seeds, every grid one step wider at the
    # top for the larger batch: 432 trainings, meant for a GPU (not run here).
    "full": TransferSettings(name="full_cnn", model="cnn", dataset="cifar10", variants=("bp", "pc", "dtp"),
                             widths=(16, 32, 64, 128, 256), base_width=16, hidden_layers=3,
                             grids={v: (lo, hi + 1) for v, (lo, hi) in CNN_GRIDS.items()}, train_size=None,
                             epochs=10, batch_size=128, inference_steps=20, inference_lr=0.1),
}
MODEL_PRESETS = {"mlp": PRESETS, "cnn": CNN_PRESETS}


def settings_for(preset: str, *, check_device: bool = True, model: str | None = None,
                 **overrides: Any) -> TransferSettings:
    """The preset's settings with ``overrides`` (``None`` values ignored), checked. ``model``
    (``"mlp"``, the default, or ``"cnn"``) picks the preset table: ``PRESETS`` or ``CNN_PRESETS``.
    ``check_device`` checks that this process can use ``device`` (not wanted when the trials run
    elsewhere, on Ray)."""
    model = "mlp" if model is None else model
    if model not in MODEL_PRESETS:
        raise ValueError(f"model: expected one of {sorted(MODEL_PRESETS)}, got {model!r}")
    presets = MODEL_PRESETS[model]
    if preset not in presets:
        raise ValueError(f"preset: expected one of {sorted(presets)}, got {preset!r}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("optimizer", presets[preset].optimizer) != "sgd":
        update_rule(overrides["optimizer"], overrides.get("momentum"))  # no momentum with Adam
        overrides = {"momentum": None, "grids": {v: ADAM_GRID for v in DEFAULT_GRIDS}, **overrides}
    settings = replace(presets[preset], **overrides)
    if model == "cnn":
        _check_image_dataset(settings.dataset, "dataset")
        if settings.fallback_dataset is not None:
            _check_image_dataset(settings.fallback_dataset, "fallback_dataset")
    update_rule(settings.optimizer, settings.momentum)
    if settings.schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule: expected 'cosine' or 'constant', got {settings.schedule!r}")
    if isinstance(settings.threads, bool) or not isinstance(settings.threads, int) or settings.threads < 1:
        raise ValueError(f"threads: expected a positive integer, got {settings.threads!r}")
    if check_device:
        resolve_device(settings.device)  # a clear error before any data is loaded
    return settings


def _check_image_dataset(name: str, what: str) -> None:
    """``ValueError`` unless the dataset ``name`` has images of a known (C, H, W) shape (a CNN's input)."""
    from ..data.datasets import IMAGE_SHAPES

    if str(name).lower().replace("-", "_") not in IMAGE_SHAPES:
        raise ValueError(f"{what}: model='cnn' trains on images of a known shape, from one of "
                         f"{', '.join(IMAGE_SHAPES)}; got {name!r}")


def _load_data(settings: TransferSettings, say) -> tuple[Any, str | None]:
    from ..data import DatasetError, load_dataset

    note = None
    try:
        data = load_dataset(settings.dataset, root=settings.root)
    except DatasetError as exc:
        if settings.fallback_dataset is None:
            raise
        note = (f"{settings.dataset} is not available here ({str(exc).splitlines()[0]}); "
                f"this run uses {settings.fallback_dataset} instead")
        say(f"note: {note}")
        data = load_dataset(settings.fallback_dataset)
    return data, note


def _run_key(variant: Variant, par, width: int, log2_lr: int, seed: int) -> tuple:
    """Runs with equal keys are the same computation (same init, multipliers, precisions, batches)."""
    layers = tuple((s.init_std, s.lr_mult, s.bias_lr_mult, s.precision) for s in par.layers)
    return (variant.algo, width, log2_lr, seed, layers)


def _planned_key(settings: TransferSettings, variant: Variant, preset: str, width: int, log2_lr: int, seed: int,
                 input_dim: int, num_classes: int, image_shape: tuple[int, int, int] | None = None) -> tuple:
    """``_run_key`` of a configuration without building it: the parametrization of a model whose
    parameters live on the meta device (no memory, no init), so a sweep knows before training
    which runs are shared and how many it will train. ``image_shape``: (C, H, W) of a CNN's input."""
    from ..mup import parametrize

    spec = ModelSpec(input_dim, width, num_classes, hidden_layers=settings.hidden_layers,
                     activation=settings.activation, model=settings.model,
                     image_shape=image_shape if settings.model == "cnn" else None)
    with torch.device("meta"):
        model = spec.make()
    par = parametrize(model, preset, algo=variant.parametrize_algo, base_width=settings.base_width,
                      gamma_bar=variant.gamma_bar,
                      readout_scale=settings.readout_scale(variant.name), init=False)
    return _run_key(variant, par, width, log2_lr, seed)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


@functools.lru_cache(maxsize=2)
def _trial_data(dataset: str, root: str | None, fallback: str | None, train_size: int | None, device: str,
                images: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(x, labels, x_test, y_test, num_classes)``, tensors on ``device``, loaded once per process (a
    Ray worker runs many trials); with ``images``, ``x`` and ``x_test`` are (N, C, H, W) images."""
    settings = TransferSettings(dataset=dataset, root=root, fallback_dataset=fallback)
    data, _ = _load_data(settings, say=lambda *a: None)
    n = data.num_train if train_size is None else min(train_size, data.num_train)
    x, x_test = (_images(data, "train"), _images(data, "test")) if images else (data.x_train, data.x_test)
    return x[:n].to(device), data.y_train[:n].to(device), x_test.to(device), data.y_test.to(device), data.num_classes


def _images(data, split: str) -> torch.Tensor:
    """``data.images(split)``: a CNN's (N, C, H, W) input, or ``ValueError`` naming the dataset."""
    if data.image_shape is None:
        raise ValueError(f"dataset: model='cnn' needs images, but no image shape is known for {data.name} "
                         f"({data.num_features} features)")
    return data.images(split)


def run_trial(settings: TransferSettings, device: str, trial: Trial) -> dict[str, Any]:
    """Train one configuration of the sweep and evaluate it: a pure function of ``settings``,
    ``device`` and ``trial`` (init, batch order and feedback noise follow ``trial.seed``), run on
    ``settings.threads`` intra-op threads.

    Returns ``{"train_loss", "test_accuracy", "diverged", "steps", "error"}``; the losses are
    ``None`` for a run that raised ``DivergenceError`` or ended non-finite."""
    x, labels, x_test, y_test, num_classes = _trial_data(settings.dataset, settings.root, settings.fallback_dataset,
                                                         settings.train_size, device, settings.model == "cnn")
    variant, n = parse_variant(trial.variant), x.shape[0]
    input_dim, image_shape = x[0].numel(), (tuple(x.shape[1:]) if settings.model == "cnn" else None)
    with intra_op_threads(settings.threads):
        model, par, opt = build(
            variant, trial.parametrization, trial.width, input_dim=input_dim, num_classes=num_classes,
            model=settings.model, image_shape=image_shape,
            lr=2.0**trial.log2_lr, base_width=settings.base_width, hidden_layers=settings.hidden_layers,
            activation=settings.activation, readout_scale=settings.readout_scale(variant.name), seed=trial.seed,
            loss=settings.loss, inference_steps=settings.inference_steps,
            inference_lr=settings.inference_lr, beta=settings.beta, feedback_lr=settings.feedback_lr,
            backend=settings.backend, device=device, **update_rule(settings.optimizer, settings.momentum))
        planned = _planned_key(settings, variant, trial.parametrization, trial.width, trial.log2_lr, trial.seed,
                               input_dim, num_classes, image_shape)
        if _run_key(variant, par, trial.width, trial.log2_lr, trial.seed) != planned:
            raise RuntimeError(f"transfer: planned and built parametrizations differ for {trial.label}")
        on_step = None
        if settings.schedule == "cosine":  # decays per step
            total = settings.epochs * -(-n // settings.batch_size)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda k, total=total: 0.5 * (1.0 + math.cos(math.pi * min(k, total) / total)))
            on_step = lambda _stats: scheduler.step()  # noqa: E731
        outcome = train_run(opt, x, labels, epochs=settings.epochs, batch_size=settings.batch_size,
                            seed=trial.seed, on_step=on_step)
        train_loss = test_accuracy = float("nan")
        if not outcome["diverged"]:
            train_loss, _ = evaluate(model, x, labels, settings.loss)
            _, test_accuracy = evaluate(model, x_test, y_test, settings.loss)
    diverged = outcome["diverged"] or not math.isfinite(train_loss)
    return {"train_loss": None if diverged else train_loss, "test_accuracy": None if diverged else test_accuracy,
            "diverged": diverged, "steps": outcome["steps"], "error": outcome["error"]}


def plan_trials(settings: TransferSettings, input_dim: int, num_classes: int,
                image_shape: tuple[int, int, int] | None = None):
    """The sweep's configurations (variant × parametrization × width × log2 lr, in table order), the
    trial each (configuration, seed) runs, and the distinct trials in order of first use: runs that
    are the same computation (see ``_run_key``) are one trial. ``image_shape``: (C, H, W) of a CNN's
    input."""
    variants = [parse_variant(v) for v in settings.variants]
    configs = [(v, p, w, e) for v in variants for p in settings.parametrizations
               for w in settings.widths for e in settings.grid(v.name)]
    first: dict[tuple, Trial] = {}
    trial_of: dict[tuple, Trial] = {}
    for variant, preset, width, log2_lr in configs:
        for seed in settings.seeds:
            key = _planned_key(settings, variant, preset, width, log2_lr, seed, input_dim, num_classes, image_shape)
            trial = first.setdefault(key, Trial(variant.name, preset, width, log2_lr, seed))
            trial_of[(variant.name, preset, width, log2_lr, seed)] = trial
    return configs, trial_of, list(first.values())


def journal_settings(settings: TransferSettings, device: str) -> dict[str, Any]:
    """What determines every trial's result: the settings less the file stem, with the device
    setting replaced by the kind of device the trials run on (``auto`` on a CPU machine and ``cpu``
    are the same computation)."""
    values = settings.as_dict()
    values.pop("name")
    values["device"] = device
    return values


def journal_path(out: Path, name: str) -> Path:
    return Path(out) / f"transfer_{name}.journal.jsonl"


def run_transfer(settings: TransferSettings, *, executor=None, journal: Path | str | None = None,
                 resume: bool = False, show_progress: bool = True, say=print) -> dict[str, Any]:
    """Run the sweep's trials on ``executor`` (default: ``SerialExecutor()``); return the JSON-ready
    result: settings, machine, ``rows`` (seed means, with the per-seed values; diverged if any seed
    diverged), summary, checks.

    With ``journal`` (a path), every finished trial is appended to that journal and the result is
    built from the journal alone; ``resume=True`` keeps the trials already journaled there and runs
    only the others (``JournalError`` if it was written with other settings), ``resume=False``
    starts it empty. The result is the same, number for number, whichever executor ran the trials
    and however often the sweep was interrupted and resumed; ``result["run"]`` (not written to the
    files) says how long this call took and how many trials it ran."""
    start = time.perf_counter()
    executor = executor if executor is not None else SerialExecutor()
    data, note = _load_data(settings, say)
    n = data.num_train if settings.train_size is None else min(settings.train_size, data.num_train)
    device = executor.device_for(settings.device)
    image_shape = tuple(_images(data, "train").shape[1:]) if settings.model == "cnn" else None
    configs, trial_of, trials = plan_trials(settings, data.num_features, data.num_classes, image_shape)
    book = Journal(journal, journal_settings(settings, device)) if journal is not None else None
    entries: dict[Trial, dict] = {}
    if book is not None and resume:
        entries = book.read()
        book.truncate_torn_tail()
    elif book is not None:
        book.start()
    todo = [t for t in trials if t not in entries]
    resumed = len(trials) - len(todo)
    # The bar counts distinct trials: a run shared with an identical one costs nothing.
    bar = progress(len(trials), f"transfer {settings.name}", show_progress)
    if resumed:
        bar.update(resumed)
    seconds = 0.0
    for trial, outcome, took, host in executor.map(run_trial, todo, settings, device):
        if book is not None:
            entries[trial] = book.append(trial, outcome, seconds=took, host=host)
        else:
            entries[trial] = json.loads(json.dumps({"result": outcome}, allow_nan=False))
        seconds += took
        bar.set_postfix_str(trial.label)
        bar.update()
    bar.close()
    if book is not None:
        entries = book.read()  # the tables and the figure are a function of the journal alone
    rows = _table_rows(settings, configs, trial_of, {t: entries[t]["result"] for t in trials})
    x, labels = data.x_train[:n], data.y_train[:n]
    zero_loss = evaluate(lambda t: torch.zeros(t.shape[0], data.num_classes, dtype=t.dtype), x, labels,
                         settings.loss)[0]
    here = {k: v for k, v in machine().items() if k not in ("date", "torch_threads")}  # not the result's
    result = {
        "experiment": "transfer", "settings": settings.as_dict(), "machine": {**here, "device": device},
        "data": {"dataset": data.name, "train_size": n, "test_size": data.num_test, "note": note,
                 **({"image_shape": list(image_shape)} if image_shape else {})},
        "zero_output_loss": zero_loss, "rows": rows,
    }
    result["summary"] = summarize(result)
    result["checks"] = checks(result["summary"])
    result["runs_trained"] = len(trials)
    result["run"] = {"seconds": round(time.perf_counter() - start, 1), "trial_seconds": round(seconds, 1),
                     "trials_run": len(todo), "trials_resumed": resumed, "executor": executor.describe()}
    return result


def _table_rows(settings: TransferSettings, configs, trial_of: dict[tuple, Trial],
                outcomes: dict[Trial, dict]) -> list[dict[str, Any]]:
    """One row per configuration, in table order: the seed means (a configuration diverged when any
    seed did) with the per-seed values; ``shared`` when every seed's trial was used before."""
    rows = []
    used: set[Trial] = set()
    for variant, preset, width, log2_lr in configs:
        mine = []
        for seed in settings.seeds:
            trial = trial_of[(variant.name, preset, width, log2_lr, seed)]
            mine.append({**outcomes[trial], "shared": trial in used})
            used.add(trial)
        diverged = any(r["diverged"] for r in mine)
        rows.append({
            "variant": variant.name, "algo": variant.algo, "gamma_bar": variant.gamma_bar, "parametrization": preset,
            "width": width, "log2_lr": log2_lr, "lr": 2.0**log2_lr,
            "train_loss": None if diverged else _mean([r["train_loss"] for r in mine]),
            "test_accuracy": None if diverged else _mean([r["test_accuracy"] for r in mine]),
            "diverged": diverged, "seeds_diverged": sum(r["diverged"] for r in mine),
            "train_loss_per_seed": [r["train_loss"] for r in mine],
            "test_accuracy_per_seed": [r["test_accuracy"] for r in mine],
            "steps_per_seed": [r["steps"] for r in mine],
            "shared": all(r["shared"] for r in mine),
            "error": next((r["error"] for r in mine if r["error"]), None),
        })
    return rows


def _optimum(rows: list[dict]) -> dict | None:
    finite = [r for r in rows if not r["diverged"]]
    return min(finite, key=lambda r: (r["train_loss"], r["log2_lr"])) if finite else None


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per variant × parametrization: the optimum per width, its drift and whether wider is better."""
    settings = result["settings"]
    widths = list(settings["widths"])
    out = []
    for variant in settings["variants"]:
        for preset in settings["parametrizations"]:
            mine = [r for r in result["rows"] if r["variant"] == variant and r["parametrization"] == preset]
            grid = sorted({r["log2_lr"] for r in mine})
            per_width = []
            for width in widths:
                opt = _optimum([r for r in mine if r["width"] == width])
                per_width.append({
                    "width": width,
                    "log2_lr": None if opt is None else opt["log2_lr"],
                    "train_loss": None if opt is None else opt["train_loss"],
                    "test_accuracy": None if opt is None else opt["test_accuracy"],
                    "at_grid_edge": opt is not None and opt["log2_lr"] in (grid[0], grid[-1]),
                    "diverged_lrs": [r["log2_lr"] for r in mine if r["width"] == width and r["diverged"]],
                })
            found = [p for p in per_width if p["log2_lr"] is not None]
            drift = spread = None
            wider_better = None
            if len(found) == len(widths) and found:
                drift = found[-1]["log2_lr"] - found[0]["log2_lr"]
                spread = max(p["log2_lr"] for p in found) - min(p["log2_lr"] for p in found)
                losses = [p["train_loss"] for p in found]
                wider_better = all(b <= a for a, b in pairwise(losses))
            entry = {
                "variant": variant, "parametrization": preset, "optimum": per_width,
                "drift_steps": drift, "spread_steps": spread, "wider_is_better": wider_better,
                "widest_better_than_smallest": (found[-1]["train_loss"] < found[0]["train_loss"])
                if len(found) == len(widths) and len(found) > 1 else None,
            }
            out.append(entry)
    # Under SP: what happens to the widest model at the learning rate μP found best for it.
    by = {(e["variant"], e["parametrization"]): e for e in out}
    for e in out:
        if e["parametrization"] != "sp" or (e["variant"], "mup") not in by:
            continue
        mup_best = by[(e["variant"], "mup")]["optimum"][-1]["log2_lr"]
        e["widest_at_mup_optimum"] = None
        if mup_best is not None:
            row = next((r for r in result["rows"] if r["variant"] == e["variant"] and r["parametrization"] == "sp"
                        and r["width"] == widths[-1] and r["log2_lr"] == mup_best), None)
            if row is not None:
                e["widest_at_mup_optimum"] = {"log2_lr": mup_best, "diverged": row["diverged"],
                                              "train_loss": row["train_loss"]}
    return out


def checks(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The acceptance criteria, evaluated on this sweep (recorded, never raised: they are findings
    about the sweep, not errors of the command, so they leave its exit status alone)."""
    by = {(e["variant"], e["parametrization"]): e for e in summary}
    out = []
    for variant in ("bp", "pc", "dtp"):
        e = by.get((variant, "mup"))
        if e is None:
            continue
        drift = e["drift_steps"]
        out.append({"check": f"mup {variant}: optimum moves by <= 1 grid step from smallest to largest width",
                    "passed": drift is not None and abs(drift) <= 1, "value": drift})
        out.append({"check": f"mup {variant}: wider is better at the optimum",
                    "passed": bool(e["wider_is_better"]),
                    "value": [p["train_loss"] for p in e["optimum"]]})
    e = by.get(("bp", "sp"))
    if e is not None:
        at = e.get("widest_at_mup_optimum")
        diverges = bool(at and at["diverged"])
        drift = e["drift_steps"]
        out.append({"check": "sp bp: optimum moves by >= 2 grid steps, or the widest model diverges at the muP optimum",
                    "passed": (drift is not None and abs(drift) >= 2) or diverges,
                    "value": {"drift_steps": drift, "widest_diverges_at_mup_optimum": diverges}})
    return out


def format_summary(result: dict[str, Any]) -> str:
    """The table printed at the end of a sweep."""
    widths = result["settings"]["widths"]
    lines = [("optimal log2 learning rate per width (train loss at the optimum); drift = largest − smallest width, "
              "in factor-2 grid steps"),
             f"{'variant':<8}{'param':<6}" + "".join(f"{w:>16}" for w in widths) + f"{'drift':>7}  wider better"]
    for e in result["summary"]:
        cells = []
        for p in e["optimum"]:
            if p["log2_lr"] is None:
                cells.append(f"{'all diverged':>16}")
            else:
                edge = "!" if p["at_grid_edge"] else " "
                cells.append(f"{p['log2_lr']:>6}{edge}({p['train_loss']:.4f})")
        drift = "—" if e["drift_steps"] is None else f"{e['drift_steps']:+d}"
        better = {True: "yes", False: "no", None: "—"}[e["wider_is_better"]]
        lines.append(f"{e['variant']:<8}{e['parametrization']:<6}" + "".join(cells) + f"{drift:>7}  {better}")
    lines.append("! = optimum at the edge of the grid (widen the grid to locate it)")
    if result["checks"]:
        lines.append("acceptance checks (findings of this sweep, also in the JSON; they do not change the exit status):")
    for c in result["checks"]:
        lines.append(f"[{'PASS' if c['passed'] else 'FAIL'}] {c['check']}: {c['value']}")
    return "\n".join(lines)


CSV_COLUMNS = ["variant", "algo", "gamma_bar", "parametrization", "width", "log2_lr", "lr", "train_loss",
               "test_accuracy", "diverged", "seeds_diverged", "train_loss_per_seed", "shared", "error"]


def plot_transfer(result: dict[str, Any], path: Path) -> Path:
    """One panel per variant × parametrization: train loss against log2 lr, a curve per width.

    A function of ``result`` (the JSON ``run_transfer`` writes) alone, so ``pcfast plot
    transfer_<name>.json`` draws it again without training. One legend, below the panels and outside
    them, names the widths and the markers; the layout is constrained so that no title, label or
    legend is clipped.
    """
    plt = pyplot()

    settings = result["settings"]
    variants, presets, widths = settings["variants"], settings["parametrizations"], settings["widths"]
    cap = result["zero_output_loss"]  # no better than predicting zero: shown at the cap
    with plt.rc_context(FIGURE_STYLE):
        colors = plt.get_cmap("viridis")([0.1 + 0.8 * k / max(len(widths) - 1, 1) for k in range(len(widths))])
        fig, axes = plt.subplots(len(variants), len(presets), figsize=(4.8 * len(presets) + 0.6, 3.1 * len(variants) + 1.8),
                                 squeeze=False, layout="constrained")
        summary = {(e["variant"], e["parametrization"]): e for e in result["summary"]}
        for i, variant in enumerate(variants):
            finite = [r["train_loss"] for r in result["rows"] if r["variant"] == variant and not r["diverged"]]
            low = min(finite, default=0.0)
            for j, preset in enumerate(presets):
                ax = axes[i][j]
                _draw_panel(ax, result, summary[(variant, preset)], colors, cap)
                _label_panel(ax, summary[(variant, preset)], (low, cap), first_column=j == 0,
                             last_row=i == len(variants) - 1)
        title = "width (channels)" if settings.get("model", "mlp") == "cnn" else "width"
        stack_legends_below(fig, _transfer_legends(widths, colors, cap, title))
        fig.suptitle(_transfer_title(result))
        save_figure(plt, fig, path, dpi=FIGURE_DPI, bbox_inches="tight", pad_inches=0.15)
    return path


def _draw_panel(ax, result: dict[str, Any], entry: dict[str, Any], colors, cap: float) -> None:
    """The curves of one variant × parametrization (``entry`` of the summary), a colour per width:
    loss as a line with dots, diverged runs as x and losses above ``cap`` as open triangles at the
    cap, the optimum as a star."""
    for k, width in enumerate(result["settings"]["widths"]):
        mine = sorted((r for r in result["rows"] if r["variant"] == entry["variant"]
                       and r["parametrization"] == entry["parametrization"] and r["width"] == width),
                      key=lambda r: r["log2_lr"])
        xs = [r["log2_lr"] for r in mine]
        ys = [cap if r["diverged"] else min(r["train_loss"], cap) for r in mine]
        ax.plot(xs, ys, "-", color=colors[k], lw=1.8)
        ok = [(a, b) for a, b, r in zip(xs, ys, mine) if not r["diverged"] and r["train_loss"] < cap]
        if ok:
            ax.plot(*zip(*ok), "o", color=colors[k], ms=4)
        big = [(a, cap) for a, r in zip(xs, mine) if not r["diverged"] and r["train_loss"] >= cap]
        if big:
            ax.plot(*zip(*big), "^", color=colors[k], ms=8, mfc="none", mew=1.5)
        bad = [(a, cap) for a, r in zip(xs, mine) if r["diverged"]]
        if bad:
            ax.plot(*zip(*bad), "x", color=colors[k], ms=9, mew=2.0)
        best = entry["optimum"][k]
        if best["log2_lr"] is not None:
            ax.plot([best["log2_lr"]], [min(best["train_loss"], cap)], "*", color=colors[k], ms=16,
                    mec="black", mew=0.9, zorder=5)


def _label_panel(ax, entry: dict[str, Any], limits: tuple[float, float], *, first_column: bool,
                 last_row: bool) -> None:
    """Drift box, limits from the variant's lowest loss ``limits[0]`` to the cap, title, axis labels."""
    from matplotlib import ticker

    low, cap = limits
    drift = entry["drift_steps"]
    text = "optimum drift: " + ("—" if drift is None else f"{drift:+d} step" + ("s" if abs(drift) != 1 else ""))
    ax.text(0.03, 0.05, text, transform=ax.transAxes, fontsize=10,
            bbox={"boxstyle": "round,pad=0.25", "fc": "white", "ec": "0.7"})
    ax.set_ylim(max(0.0, low - 0.08 * (cap - low)), cap + 0.1 * (cap - low))
    ax.axhline(cap, color="0.5", lw=1.0, ls=":")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    preset = entry["parametrization"]
    ax.set_title(f"{parse_variant(entry['variant']).label} · {'μP' if preset == 'mup' else 'SP'}")
    ax.grid(alpha=0.3, which="both")
    if last_row:
        ax.set_xlabel("log2 learning rate")
    if first_column:
        ax.set_ylabel("train loss")


def _transfer_legends(widths: list[int], colors, cap: float, title: str = "width") -> list[dict[str, Any]]:
    """The two legends below the panels: the widths (``title``: a CNN's are its channels), then the markers."""
    from matplotlib.lines import Line2D

    width_handles = [Line2D([], [], color=colors[k], lw=2.2, marker="o", ms=5, label=f"{w}")
                     for k, w in enumerate(widths)]
    key_handles = [
        Line2D([], [], ls="none", marker="*", ms=15, color="0.6", mec="black", mew=0.9,
               label="optimum (lowest loss per width)"),
        Line2D([], [], ls="none", marker="x", ms=9, mew=2.0, color="0.3", label="diverged (drawn at the cap)"),
        Line2D([], [], ls="none", marker="^", ms=8, mfc="none", mew=1.5, color="0.3",
               label=f"loss ≥ {cap:.2g} (drawn at the cap)"),
        Line2D([], [], ls=":", lw=1.2, color="0.5", label=f"cap: loss of the zero output, {cap:.2g}"),
    ]
    return [dict(handles=width_handles, title=title, ncols=len(widths)), dict(handles=key_handles, ncols=2)]


def _update_rule_label(settings: dict[str, Any]) -> str:
    """``momentum 0.9`` for SGD, else the optimizer's name."""
    rule = settings.get("optimizer", "sgd")
    if rule == "sgd":
        return f"momentum {settings['momentum']:g}"
    return {"adam": "Adam", "adamw": "AdamW"}.get(rule, rule)


def _model_line(result: dict[str, Any]) -> str:
    """The title's description of a CNN (``""`` for the MLP, whose title predates the option)."""
    settings, data = result["settings"], result["data"]
    if settings.get("model", "mlp") != "cnn":
        return ""
    shape = "×".join(str(v) for v in data.get("image_shape", ()))
    return (f"CNN: {settings['hidden_layers']} conv layers (3×3, {settings['activation']}, 2×2 max-pool) of "
            f"{'/'.join(str(w) for w in settings['widths'])} channels + linear readout, on {shape} images\n")


def _transfer_title(result: dict[str, Any]) -> str:
    settings, data = result["settings"], result["data"]
    seeds = len(settings["seeds"])
    return (
        f"μTransfer ({settings['name']}): train loss after {settings['epochs']} epochs against learning rate\n"
        f"{_model_line(result)}"
        f"{data['dataset']}, {data['train_size']} train images, batch {settings['batch_size']}, "
        f"{_update_rule_label(settings)}, base width {settings['base_width']}, PC T={settings['inference_steps']}, "
        f"mean of {seeds} seed{'s' if seeds != 1 else ''}\n{machine_line(result['machine'])}")


def write_transfer(result: dict[str, Any], out: Path) -> list[Path]:
    """``transfer_<name>.json``, ``.csv`` and ``.png`` under ``out``: functions of the trials' results
    and the settings only (no timings, dates or executor), so an interrupted and resumed sweep, or one
    run on Ray, writes the same bytes as an uninterrupted serial run on the same kind of machine. The
    journal holds each trial's wall time and host."""
    stem = out / f"transfer_{result['settings']['name']}"
    return [
        write_json(stem.with_suffix(".json"), {k: v for k, v in result.items() if k != "run"}),
        write_csv(stem.with_suffix(".csv"), [
            {**r, "train_loss_per_seed": ";".join("" if v is None else f"{v:.6g}" for v in r["train_loss_per_seed"])}
            for r in result["rows"]], CSV_COLUMNS),
        plot_transfer(result, stem.with_suffix(".png")),
    ]
