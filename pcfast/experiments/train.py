"""``pcfast train``: one training run per algorithm, logging loss, accuracy and energy per epoch;
checkpoints (``save``) that a later call resumes (``resume``) exactly where the run stopped."""
from __future__ import annotations

import json

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .common import (
    Variant,
    build,
    collapse_warning,
    evaluate,
    progress,
    resolve_device,
    train_run,
    update_rule,
)

CHECKPOINT_FORMAT = "pcfast.train-checkpoint"
CHECKPOINT_VERSION = 1


def join_torchrun(device: str) -> tuple[int, int] | None:
    """Under ``torchrun`` with more than one process (``WORLD_SIZE`` > 1 in the environment): join
    the default process group (NCCL for CUDA — each process on GPU ``LOCAL_RANK`` — gloo on the CPU)
    and return ``(rank, ranks)``; the optimizers then average over it (``process_group="auto"``) and
    ``train_run`` gives each rank its share of every batch. None for a single process."""
    try:
        ranks = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ValueError("WORLD_SIZE, RANK and LOCAL_RANK: expected integers (as torchrun sets them)") from None
    if ranks <= 1:
        return None
    if not torch.distributed.is_available():
        raise ValueError(f"WORLD_SIZE={ranks}, but this torch build has no torch.distributed")
    cuda = resolve_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return rank, ranks


def leave_torchrun() -> None:
    """Leave the process group ``join_torchrun`` joined (no-op otherwise)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` with ``torch.save`` atomically: a crash mid-write leaves the previous file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    torch.save(checkpoint, partial)
    os.replace(partial, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by ``run_train(save=...)`` (``torch.load`` with ``weights_only=True``:
    no code in the file is run); ``ValueError`` naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--resume: {path} is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torch file of another kind, a truncated file, anything unpickling rejects
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"--resume: {path} is not a pcfast train checkpoint "
                         f"({type(exc).__name__}{': ' + detail if detail else ''})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"--resume: {path} is not a pcfast train checkpoint (written by pcfast train --save)")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"--resume: {path} has checkpoint version {checkpoint.get('version')!r}; "
                         f"this pcfast reads version {CHECKPOINT_VERSION}")
    missing = [k for k in ("settings", "runs", "log") if k not in checkpoint]
    if missing:
        raise ValueError(f"--resume: {path} lacks {', '.join(missing)}")
    return checkpoint


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


# The update rule's defaults for the settings left unset (per model: the CNN's Adam takes 3e-3).
DEFAULT_LR = {"sgd": 0.03, "adam": 1e-3, "adamw": 1e-3}
MODEL_DEFAULT_LR = {"mlp": DEFAULT_LR, "cnn": {"sgd": 0.03, "adam": 3e-3, "adamw": 3e-3}}
DEFAULT_MOMENTUM = 0.9  # SGD's; Adam and AdamW have none

MODELS = ("mlp", "cnn")
# The defaults of the settings that depend on the model, for those left unset (None). The MLP's
# (784-256-256-10) are the README's; the CNN's (pcfast.mup.make_cnn: 3×3 convolutions of ``width``
# channels, each followed by tanh and 2×2 max pooling, then a linear readout) differ only where the
# MLP's fail on it, as measured on mnist5k (experiments/results/train_cnn.json):
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"width": 256, "base_width": 64, "inference_lr": 0.2, "feedback_lr": 0.1, "optimizer": "sgd"},
    "cnn": {
        "width": 32, "base_width": 32,  # channels; μP equals SP at the trained width
        # DTP's local losses, like the reconstruction loss, sum over every pixel: with SGD it learned
        # little at any stable rate (16 channels, 1,280 images, 2 epochs: 41% at best, diverging at
        # lr 0.03); Adam's per-weight step does not see that scale (95.2% in the committed run).
        # BP does as well with it as with SGD (95.7%; SGD at lr 0.05: 95.5%).
        "optimizer": "adam",
        # The activity Hessian's curvature grows with the conv weights (a 3×3 kernel's transposed
        # convolution adds up 9 taps per channel): κ = 0.2 makes the relaxation diverge in epoch 1.
        # Without FPA it keeps growing under training (Adam at 3e-3: layer 1's stable κ fell to 0.012
        # within 74 steps run at κ = 0.02, and κ = 0.05 diverged after 48), so PC trains this CNN with
        # ``fpa`` (95.8% in the committed run, BP's losses to 4 digits); without it only small SGD rates
        # stay stable (16 channels, lr 0.01, κ = 0.05: 84.7% after 4 epochs).
        "inference_lr": 0.05,
        # The reconstruction loss sums over every pixel of a feature map, so its gradients are
        # ~H·W times an MLP's: feedback_lr = 0.1 saturates the tanh feedback maps in one step.
        "feedback_lr": 0.001,
    },
}


@dataclass(frozen=True)
class TrainConfig:
    """What ``run_train`` trains: every setting that changes the result, stored in its checkpoints
    (``settings()``) and all a resumed run needs. ``algos`` are ``bp``, ``pc``, ``tp``, ``dtp``;
    ``gamma_bar`` is PC's; ``optimizer`` is the update rule (``common.OPTIMIZERS``). ``lr`` and
    ``momentum`` left unset take the update rule's defaults: 0.03 and 0.9 for SGD, 1e-3 and none
    for Adam and AdamW.

    ``model`` is ``"mlp"`` (``depth`` hidden layers of ``width`` units) or ``"cnn"`` (``depth`` conv
    layers of ``width`` channels, ``pcfast.mup.make_cnn``, trained on the dataset's images (N, C, H, W));
    ``width``, ``base_width``, ``inference_lr``, ``feedback_lr``, ``optimizer`` and ``lr`` left unset
    take the model's defaults (``MODEL_DEFAULTS``, ``MODEL_DEFAULT_LR``). ``fpa``: PC under the
    fixed-prediction assumption (predictions, φ' and the pooling's routing kept at their feedforward
    values during the relaxation; DESIGN §3)."""

    algos: tuple[str, ...]
    dataset: str = "mnist5k"
    root: str | None = None
    preset: str = "mup"
    base_width: int | None = None
    gamma_bar: float = 0.0
    width: int | None = None
    depth: int = 2
    activation: str = "tanh"
    epochs: int = 8
    batch_size: int = 64
    lr: float | None = None
    momentum: float | None = None
    loss: str = "mse"
    inference_steps: int = 20
    inference_lr: float | None = None
    fpa: bool = False
    inference_tol: float | None = None
    beta: float = 0.5
    feedback_lr: float | None = None
    backend: str = "auto"
    seed: int = 0
    train_size: int | None = None
    optimizer: str | None = None
    model: str = "mlp"  # checkpoints written before conv nets have none: they are MLPs

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model: expected one of {MODELS}, got {self.model!r}")
        object.__setattr__(self, "algos", tuple(self.algos))
        for key, value in MODEL_DEFAULTS[self.model].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        update_rule(self.optimizer, self.momentum)  # a ValueError for an unknown rule, or momentum with Adam
        if self.lr is None:
            object.__setattr__(self, "lr", MODEL_DEFAULT_LR[self.model][self.optimizer])
        if self.momentum is None and self.optimizer == "sgd":
            object.__setattr__(self, "momentum", DEFAULT_MOMENTUM)

    def settings(self) -> dict[str, Any]:
        """The checkpoint's ``settings``: plain values, ``algos`` a list."""
        return {**asdict(self), "algos": list(self.algos)}

    def model_and_optimizer(self, algo: str, data, device: torch.device, *, trace: bool = False):
        """``(model, parametrization, optimizer)`` for ``algo`` on ``data``'s shapes, on ``device``
        (PC keeps each step's trace with ``trace``)."""
        variant = Variant(algo, self.gamma_bar if algo == "pc" else 0.0)
        shape = {"model": "cnn", "image_shape": image_shape(data)} if self.model == "cnn" else {}
        return build(
            variant, self.preset, self.width, input_dim=data.num_features, num_classes=data.num_classes, lr=self.lr,
            base_width=self.base_width, hidden_layers=self.depth, activation=self.activation, seed=self.seed,
            loss=self.loss, inference_steps=self.inference_steps, inference_lr=self.inference_lr, beta=self.beta,
            **({"fpa": True} if self.fpa else {}),
            feedback_lr=self.feedback_lr, backend=self.backend, device=device, inference_tol=self.inference_tol,
            trace=trace, **shape, **update_rule(self.optimizer, self.momentum))

    def inputs(self, data, split: str) -> torch.Tensor:
        """``data``'s ``split`` as the model takes it: flat features (N, F) for an MLP, images
        (N, C, H, W) for a CNN (``ValueError`` when the dataset's image shape is unknown)."""
        if self.model == "cnn":
            image_shape(data)
            return data.images(split)
        return getattr(data, f"x_{split}")


def image_shape(data) -> tuple[int, int, int]:
    """``data``'s image shape (C, H, W); ``ValueError`` naming the dataset when it has none (a CNN needs it)."""
    if data.image_shape is None:
        from ..data.datasets import IMAGE_SHAPES

        raise ValueError(f"model: 'cnn' needs images, but no image shape is known for dataset {data.name!r} "
                         f"({data.num_features} features; known: {', '.join(IMAGE_SHAPES)}); use model 'mlp'")
    return data.image_shape


def run_train(
    algos: list[str] | None = None,
    *,
    config: TrainConfig | None = None,
    device: str = "auto",
    show_progress: bool = True,
    save: Path | None = None,
    resume: dict[str, Any] | None = None,
    trace: Path | None = None,
    say=print,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Train each algorithm with a cosine learning-rate schedule; return the per-epoch log.

    What is trained is ``config`` (a ``TrainConfig``), or ``TrainConfig(algos, **settings)``:
    ``run_train(["pc", "bp"], width=512, lr=0.05)``; ``optimizer="adam"`` trains with Adam.

    A diverged run (``DivergenceError``) ends early and its last log entry says so. A collapsing
    run (accuracy at chance, loss or reconstruction loss exploding: ``common.collapse_symptoms``)
    gets one ``warning:`` line naming the setting most likely at fault, also stored in that
    epoch's log entry under ``"warning"``.

    Every model and optimizer is built before any training, so a bad setting fails at once.
    With ``save``, a checkpoint is written (atomically) after every epoch: per algorithm the model's
    and optimizer's ``state_dict``, the scheduler's, the global RNG state and the epochs done,
    with the settings and the log so far. ``resume`` is such a checkpoint (``load_checkpoint``):
    its settings replace the arguments, finished algorithms are skipped and the others continue
    from their last finished epoch — with the batches and learning rates the uninterrupted run
    would have used, so the result equals it.

    With ``trace``, PC keeps the trace of every step (``pcfast.results.PCTrace``: each layer's energy
    after every inference step and the activity-gradient norms; one extra host read per step) and
    the traces are written to that JSON file (``write_traces``) when training ends.
    """
    if config is None:
        if algos is None:
            raise TypeError("run_train: give the algorithms to train (or config=TrainConfig(...))")
        config = TrainConfig(tuple(algos), **settings)
    elif algos is not None or settings:
        raise TypeError("run_train: give either config or the algorithms and settings, not both")
    if resume is not None:
        config = TrainConfig(**resume["settings"])
    trainer = _Trainer(config, resolve_device(device), save=save, resume=resume, show_progress=show_progress,
                       say=say, trace=trace is not None)
    runs = [run for run in map(trainer.prepare, config.algos) if run is not None]
    for run in runs:
        trainer.train(run)
    if trace is not None:
        write_traces(trace, config, trainer.traces)
        say(f"traces: {trace}")
    return trainer.log


def write_traces(path: Path, config: TrainConfig, traces: dict[str, list[dict[str, Any]]]) -> None:
    """The JSON file of ``run_train(trace=...)``: the settings and, per PC run, one entry per step
    (``epoch``, ``batch``, ``energy`` [t][l] = layer l's term of F after t inference steps, summed over
    the batch, ``grad_norm`` [t][l] = ‖∂F/∂z_l‖ used by step t + 1; null after a stop)."""
    from .common import _clean

    payload = {"format": "pcfast-trace", "version": 1, "settings": config.settings(),
               "units": "energy summed over the batch; grad_norm Frobenius over the batch", "runs": traces}
    path.write_text(json.dumps(_clean(payload)))


@dataclass
class _Run:
    """One algorithm's model, optimizer and schedule, built (or restored) before any training."""

    algo: str
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    scheduler: Any
    rng: torch.Tensor  # the global generator's state to train from
    start_epoch: int = 0
    warned: bool = False
    start: float = 0.0


class _Trainer:
    """One ``run_train`` call: the data, the log and the checkpoint's per-algorithm states."""

    def __init__(self, config: TrainConfig, where: torch.device, *, save: Path | None,
                 resume: dict[str, Any] | None, show_progress: bool, say, trace: bool = False):
        from ..data import load_dataset

        self.config, self.save, self.show_progress, self.say = config, save, show_progress, say
        self.trace, self.traces = trace, {}
        self.log: list[dict[str, Any]] = list(resume["log"]) if resume is not None else []
        self.states: dict[str, dict[str, Any]] = dict(resume["runs"]) if resume is not None else {}
        data = load_dataset(config.dataset, root=config.root)
        say(f"{data!r}")
        n = data.num_train if config.train_size is None else min(int(config.train_size), data.num_train)
        self.x_train, self.y_train = config.inputs(data, "train")[:n].to(where), data.y_train[:n].to(where)
        self.x_test, self.y_test = config.inputs(data, "test").to(where), data.y_test.to(where)
        if n < data.num_train:
            say(f"training on the first {n} of {data.num_train} training images")
        self.data, self.where = data, where
        self.steps_per_epoch = -(-n // config.batch_size)

    def checkpoint(self) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "settings": self.config.settings(),
                "runs": self.states, "log": self.log}

    def entries(self, algo: str) -> list[dict[str, Any]]:
        return [e for e in self.log if e["algo"] == algo]

    def prepare(self, algo: str) -> _Run | None:
        """``algo``'s run, restored from the checkpoint being resumed; None when it finished there."""
        epochs = self.config.epochs
        state = self.states.get(algo)
        if state is not None and state.get("finished"):
            self.say(f"{algo}: finished in the checkpoint, skipped")
            return None
        model, _, opt = self.config.model_and_optimizer(algo, self.data, self.where, trace=self.trace and algo == "pc")
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        run = _Run(algo, model, opt, scheduler, torch.get_rng_state())  # the generator after this build
        if state is not None:
            try:
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            except (KeyError, RuntimeError, ValueError, TypeError) as exc:
                raise ValueError(f"--resume: the checkpoint's {algo} state does not fit the model its settings "
                                 f"build ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
            run.rng, run.start_epoch = state["rng"], int(state["epochs_done"])
            self.say(f"{algo}: resuming after epoch {run.start_epoch} of {epochs}")
        return run

    def train(self, run: _Run) -> None:
        """Train ``run`` to the last epoch (or its divergence), logging and checkpointing each epoch."""
        c = self.config
        torch.set_rng_state(run.rng)
        bar = progress((c.epochs - run.start_epoch) * self.steps_per_epoch, run.algo, self.show_progress)
        write = bar.write if self.show_progress else self.say  # lines above the bar, or through ``say``
        run.start = time.perf_counter()
        run.warned = any(e.get("warning") for e in self.entries(run.algo))

        traces = self.traces.setdefault(run.algo, []) if self.trace and run.algo == "pc" else None
        done = run.start_epoch * self.steps_per_epoch

        def on_step(stats: dict) -> None:
            nonlocal done
            bar.update()
            bar.set_postfix_str(f"loss {stats['loss']:.3f}")
            if traces is not None:
                trace = run.opt.last_trace
                traces.append({"epoch": done // self.steps_per_epoch + 1, "batch": done % self.steps_per_epoch + 1,
                               "energy": trace.energy.tolist(), "grad_norm": trace.grad_norm.tolist()})
            done += 1

        outcome = train_run(run.opt, self.x_train, self.y_train, epochs=c.epochs, batch_size=c.batch_size,
                            seed=c.seed, scheduler=run.scheduler, on_step=on_step,
                            on_epoch=lambda epoch, means: self.end_epoch(run, epoch, means, write),
                            start_epoch=run.start_epoch)
        bar.close()
        self.report(run, outcome)

    def end_epoch(self, run: _Run, epoch: int, means: dict[str, float], write) -> None:
        """Log the finished ``epoch``, warn once if the run is collapsing, write the checkpoint."""
        c = self.config
        _, accuracy = evaluate(run.model, self.x_test, self.y_test, c.loss)
        entry = {"algo": run.algo, "epoch": epoch + 1, "test_accuracy": accuracy,
                 "steps": (epoch + 1) * self.steps_per_epoch, "seconds": time.perf_counter() - run.start, **means}
        self.log.append(entry)
        write(f"{run.algo:>4} epoch {epoch + 1:>2}/{c.epochs}: test accuracy {accuracy:.3f}, "
              + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
        if not run.warned:
            warning = collapse_warning(self.entries(run.algo), self.data.num_classes,
                                       {**c.settings(), "algo": run.algo})
            if warning is not None:
                entry["warning"] = warning
                write(warning)
                run.warned = True
        if self.save is not None:
            self.states[run.algo] = {
                "model": _to_cpu(run.model.state_dict()), "optimizer": _to_cpu(run.opt.state_dict()),
                "scheduler": run.scheduler.state_dict(), "rng": torch.get_rng_state(), "epochs_done": epoch + 1,
                "finished": epoch + 1 == c.epochs}
            save_checkpoint(self.save, self.checkpoint())

    def report(self, run: _Run, outcome: dict[str, Any]) -> None:
        """The run's last line: its final accuracy, or its divergence (logged and checkpointed)."""
        algo = run.algo
        if outcome["diverged"]:
            self.log.append({"algo": algo, "epoch": len(self.entries(algo)) + 1, "diverged": True,
                             "error": outcome["error"], "seconds": time.perf_counter() - run.start})
            self.say(f"{algo}: diverged after {outcome['steps']} steps ({outcome['error']}); try a smaller --lr")
            if self.save is not None:
                self.states[algo] = {**self.states.get(algo, {}), "finished": True}
                save_checkpoint(self.save, self.checkpoint())
            return
        last = self.entries(algo)[-1]
        note = " (collapsed: see the warning above)" if any(e.get("warning") for e in self.entries(algo)) else ""
        self.say(f"{algo}: final test accuracy {last['test_accuracy']:.3f} in {last['seconds']:.1f} s{note}")


def train_result(command: str, settings: dict[str, Any], log: list[dict[str, Any]]) -> dict[str, Any]:
    """A ``pcfast train`` run as a results file: the ``command`` that ran, its ``settings`` (the
    checkpoint's), the machine, each algorithm's final test accuracy and the per-epoch ``log``
    (the ``--json`` file). ``plot_train`` draws it."""
    from .common import machine

    final = {e["algo"]: e.get("test_accuracy") for e in log if not e.get("diverged")}
    return {"experiment": "train", "command": command, "settings": settings, "machine": machine(),
            "final_test_accuracy": final, "log": log}


def plot_train(result: dict[str, Any], path: Path) -> Path:
    """Test accuracy against epoch, one line per algorithm, the final value in the legend."""
    from .common import FIGURE_DPI, FIGURE_STYLE, machine_line, pyplot, save_figure

    plt = pyplot()
    s = result["settings"]
    with plt.rc_context(FIGURE_STYLE):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for algo in s["algos"]:
            entries = [e for e in result["log"] if e["algo"] == algo and e.get("test_accuracy") is not None]
            if entries:
                ax.plot([e["epoch"] for e in entries], [e["test_accuracy"] for e in entries], marker="o",
                        label=f"{algo.upper()}{' (FPA)' if algo == 'pc' and s.get('fpa') else ''}: "
                              f"{entries[-1]['test_accuracy']:.3f}")
        model = s.get("model", "mlp")
        what = (f"{model.upper()}, {s['depth']} {'conv ' if model == 'cnn' else 'hidden '}layers of {s['width']}"
                f"{' channels' if model == 'cnn' else ''}, {s['optimizer']} lr {s['lr']:g}")
        ax.set(xlabel="epoch", ylabel=f"test accuracy ({s['dataset']})", title=what)
        ax.grid(alpha=0.3)
        ax.legend(title="final test accuracy", loc="lower right")
        fig.text(0.01, 0.005, machine_line(result["machine"]), fontsize=7, color="0.4")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
    return save_figure(plt, fig, Path(path), dpi=FIGURE_DPI)
