"""``pcfast train``: one training run per algorithm, logging loss, accuracy and energy per epoch."""
from __future__ import annotations

import time
from typing import Any

import torch

from .common import Variant, build, evaluate, progress, resolve_device, train_run


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
    say=print,
) -> list[dict[str, Any]]:
    """Train each algorithm with a cosine learning-rate schedule; return the per-epoch log.

    A diverged run (``DivergenceError``) ends early and its last log entry says so.
    """
    from ..data import load_dataset

    where = resolve_device(device)
    data = load_dataset(dataset, root=root)
    say(f"{data!r}")
    n = data.num_train if train_size is None else min(int(train_size), data.num_train)
    x_train, y_train = data.x_train[:n].to(where), data.y_train[:n].to(where)
    x_test, y_test = data.x_test.to(where), data.y_test.to(where)
    if n < data.num_train:
        say(f"training on the first {n} of {data.num_train} training images")
    log: list[dict[str, Any]] = []
    for algo in algos:
        variant = Variant(algo, gamma_bar if algo == "pc" else 0.0)
        model, _, opt = build(
            variant, preset, width, input_dim=data.num_features, num_classes=data.num_classes, lr=lr,
            base_width=base_width, hidden_layers=depth, activation=activation, seed=seed, momentum=momentum,
            loss=loss, inference_steps=inference_steps, inference_lr=inference_lr, beta=beta,
            feedback_lr=feedback_lr, backend=backend, device=where)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        steps_per_epoch = -(-n // batch_size)
        bar = progress(epochs * steps_per_epoch, algo, show_progress)
        start = time.perf_counter()

        # Defaults bind this iteration's objects (the callbacks run within it anyway).
        def on_step(stats: dict, bar=bar) -> None:
            bar.update()
            bar.set_postfix_str(f"loss {stats['loss']:.3f}")

        def on_epoch(epoch: int, means: dict, bar=bar, model=model, algo=algo, start=start) -> None:
            _, accuracy = evaluate(model, x_test, y_test, loss)
            entry = {"algo": algo, "epoch": epoch + 1, "test_accuracy": accuracy,
                     "seconds": time.perf_counter() - start, **means}
            log.append(entry)
            bar.write(f"{algo:>4} epoch {epoch + 1:>2}/{epochs}: test accuracy {accuracy:.3f}, "
                      + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))

        outcome = train_run(opt, model, x_train, y_train, epochs=epochs, batch_size=batch_size, seed=seed,
                            scheduler=scheduler, on_step=on_step, on_epoch=on_epoch)
        bar.close()
        if outcome["diverged"]:
            log.append({"algo": algo, "epoch": len([e for e in log if e["algo"] == algo]) + 1, "diverged": True,
                        "error": outcome["error"], "seconds": time.perf_counter() - start})
            say(f"{algo}: diverged after {outcome['steps']} steps ({outcome['error']}); try a smaller --lr")
        else:
            last = log[-1]
            say(f"{algo}: final test accuracy {last['test_accuracy']:.3f} in {last['seconds']:.1f} s")
    return log
