"""``pcfast train``: one training run per algorithm, logging loss, accuracy and energy per epoch;
checkpoints (``save``) that a later call resumes (``resume``) exactly where the run stopped."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from .common import Variant, build, collapse_warning, evaluate, progress, resolve_device, train_run

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


def checkpoint_settings(algos: list[str], **settings: Any) -> dict[str, Any]:
    """The settings a checkpoint stores: every argument of ``run_train`` that changes what is trained."""
    return {"algos": list(algos), **settings}


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


def run_train(
    algos: list[str],
    *,
    dataset: str = "mnist5k",
    root: str | None = None,
    preset: str = "mup",
    base_width: int = 64,
    gamma_bar: float = 0.0,
    width: int = 256,
    depth: int = 2,
    activation: str = "tanh",
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 0.03,
    momentum: float = 0.9,
    loss: str = "mse",
    inference_steps: int = 20,
    inference_lr: float = 0.2,
    beta: float = 0.5,
    feedback_lr: float = 0.1,
    backend: str = "auto",
    seed: int = 0,
    train_size: int | None = None,
    device: str = "auto",
    show_progress: bool = True,
    save: Path | None = None,
    resume: dict[str, Any] | None = None,
    say=print,
) -> list[dict[str, Any]]:
    """Train each algorithm with a cosine learning-rate schedule; return the per-epoch log.

    A diverged run (``DivergenceError``) ends early and its last log entry says so. A collapsing
    run (accuracy at chance, loss or reconstruction loss exploding: ``common.collapse_symptoms``)
    gets one ``warning:`` line naming the setting most likely at fault, also stored in that
    epoch's log entry under ``"warning"``.

    Every model and optimizer is built before any training, so a bad setting fails at once.
    With ``save``, a checkpoint is written (atomically) after every epoch: per algorithm the model's
    and optimizer's ``state_dict``, the scheduler's, the global RNG state and the epochs done,
    with the settings above and the log so far. ``resume`` is such a checkpoint
    (``load_checkpoint``): its settings replace the arguments, finished algorithms are skipped and
    the others continue from their last finished epoch — with the batches and learning rates the
    uninterrupted run would have used, so the result equals it.
    """
    from ..data import load_dataset

    settings = checkpoint_settings(
        algos, dataset=dataset, root=root, preset=preset, base_width=base_width, gamma_bar=gamma_bar, width=width,
        depth=depth, activation=activation, epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum,
        loss=loss, inference_steps=inference_steps, inference_lr=inference_lr, beta=beta, feedback_lr=feedback_lr,
        backend=backend, seed=seed, train_size=train_size)
    if resume is not None:
        settings = dict(resume["settings"])
    s = settings
    where = resolve_device(device)
    data = load_dataset(s["dataset"], root=s["root"])
    say(f"{data!r}")
    n = data.num_train if s["train_size"] is None else min(int(s["train_size"]), data.num_train)
    x_train, y_train = data.x_train[:n].to(where), data.y_train[:n].to(where)
    x_test, y_test = data.x_test.to(where), data.y_test.to(where)
    if n < data.num_train:
        say(f"training on the first {n} of {data.num_train} training images")
    log: list[dict[str, Any]] = list(resume["log"]) if resume is not None else []
    states: dict[str, dict[str, Any]] = dict(resume["runs"]) if resume is not None else {}
    epochs = s["epochs"]

    runs = []
    for algo in s["algos"]:
        if states.get(algo, {}).get("finished"):
            say(f"{algo}: finished in the checkpoint, skipped")
            continue
        variant = Variant(algo, s["gamma_bar"] if algo == "pc" else 0.0)
        model, _, opt = build(
            variant, s["preset"], s["width"], input_dim=data.num_features, num_classes=data.num_classes, lr=s["lr"],
            base_width=s["base_width"], hidden_layers=s["depth"], activation=s["activation"], seed=s["seed"],
            momentum=s["momentum"], loss=s["loss"], inference_steps=s["inference_steps"],
            inference_lr=s["inference_lr"], beta=s["beta"], feedback_lr=s["feedback_lr"], backend=s["backend"],
            device=where)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        rng = torch.get_rng_state()  # what the global generator held after this build, restored before training
        start_epoch = 0
        if algo in states:
            state = states[algo]
            try:
                model.load_state_dict(state["model"])
                opt.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            except (KeyError, RuntimeError, ValueError, TypeError) as exc:
                raise ValueError(f"--resume: the checkpoint's {algo} state does not fit the model its settings "
                                 f"build ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
            rng, start_epoch = state["rng"], int(state["epochs_done"])
            say(f"{algo}: resuming after epoch {start_epoch} of {epochs}")
        runs.append((algo, model, opt, scheduler, rng, start_epoch))

    def checkpoint() -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "settings": settings,
                "runs": states, "log": log}

    for algo, model, opt, scheduler, rng, start_epoch in runs:
        torch.set_rng_state(rng)
        steps_per_epoch = -(-n // s["batch_size"])
        bar = progress((epochs - start_epoch) * steps_per_epoch, algo, show_progress)
        write = bar.write if show_progress else say  # lines above the bar, or through ``say``
        start = time.perf_counter()
        warned = any(e.get("warning") for e in log if e["algo"] == algo)
        run_settings = {**s, "algo": algo}

        # Defaults bind this iteration's objects (the callbacks run within it anyway).
        def on_step(stats: dict, bar=bar) -> None:
            bar.update()
            bar.set_postfix_str(f"loss {stats['loss']:.3f}")

        def on_epoch(epoch: int, means: dict, write=write, model=model, opt=opt, scheduler=scheduler, algo=algo,
                     start=start, run_settings=run_settings, steps_per_epoch=steps_per_epoch) -> None:
            nonlocal warned
            _, accuracy = evaluate(model, x_test, y_test, s["loss"])
            entry = {"algo": algo, "epoch": epoch + 1, "test_accuracy": accuracy,
                     "steps": (epoch + 1) * steps_per_epoch, "seconds": time.perf_counter() - start, **means}
            log.append(entry)
            write(f"{algo:>4} epoch {epoch + 1:>2}/{epochs}: test accuracy {accuracy:.3f}, "
                      + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
            if not warned:
                warning = collapse_warning([e for e in log if e["algo"] == algo], data.num_classes, run_settings)
                if warning is not None:
                    entry["warning"] = warning
                    write(warning)
                    warned = True
            if save is not None:
                states[algo] = {"model": _to_cpu(model.state_dict()), "optimizer": _to_cpu(opt.state_dict()),
                                "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "epochs_done": epoch + 1,
                                "finished": epoch + 1 == epochs}
                save_checkpoint(save, checkpoint())

        outcome = train_run(opt, model, x_train, y_train, epochs=epochs, batch_size=s["batch_size"], seed=s["seed"],
                            scheduler=scheduler, on_step=on_step, on_epoch=on_epoch, start_epoch=start_epoch)
        bar.close()
        if outcome["diverged"]:
            log.append({"algo": algo, "epoch": len([e for e in log if e["algo"] == algo]) + 1, "diverged": True,
                        "error": outcome["error"], "seconds": time.perf_counter() - start})
            say(f"{algo}: diverged after {outcome['steps']} steps ({outcome['error']}); try a smaller --lr")
            if save is not None:
                states[algo] = {**states.get(algo, {}), "finished": True}
                save_checkpoint(save, checkpoint())
        else:
            last = [e for e in log if e["algo"] == algo][-1]
            note = " (collapsed: see the warning above)" if any(
                e.get("warning") for e in log if e["algo"] == algo) else ""
            say(f"{algo}: final test accuracy {last['test_accuracy']:.3f} in {last['seconds']:.1f} s{note}")
    return log
