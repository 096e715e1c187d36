"""Adaptive stopping against a fixed T on the embedded MNIST subset (an experiment with timings; not a test).

    OMP_NUM_THREADS=1 python benchmarks/adaptive_stopping.py [--tols 0.3 0.2] [--seeds 0 1 2] [--epochs 8]

The README's PC setting (tanh 784-256-256-10 under μP, SGD lr 0.03 with momentum 0.9, cosine schedule,
batch 64, T = 20, κ = 0.2, MSE), trained for ``--epochs`` with a fixed T = 20 and with
``inference_tol`` for each ``--tols`` value (T = 20 the cap), from the same init and batches per
seed. Reported per setting: the test accuracy on the 1,000 held-out images (mean over seeds, and
per seed), the steps taken per batch (mean and distribution) and the training time (thread CPU
seconds), as a ratio to the fixed T in the same run — the runs of one seed are interleaved epoch
by epoch so that machine noise hits them alike. Writes ``benchmarks/results/adaptive-stopping.md``
and ``.json``.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

import torch

from pcfast.experiments.common import evaluate, machine, machine_line, train_run
from pcfast.experiments.train import TrainConfig

RESULTS = Path(__file__).resolve().parent / "results"


def run(tols, seeds, epochs, backend):
    from pcfast.data import load_dataset

    data = load_dataset("mnist5k")
    settings = [None, *tols]
    rows = {tol: {"accuracy": [], "steps": collections.Counter(), "seconds": 0.0} for tol in settings}
    for seed in seeds:
        runs = {}
        for tol in settings:
            config = TrainConfig(("pc",), seed=seed, epochs=epochs, inference_tol=tol, backend=backend)
            model, _, opt = config.model_and_optimizer("pc", data, torch.device("cpu"))
            runs[tol] = (model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs))
        for epoch in range(epochs):
            for tol, (model, opt, scheduler) in runs.items():
                taken = rows[tol]["steps"]

                def count(stats, taken=taken):
                    taken[int(stats.get("inference_steps", 20))] += 1

                start = time.thread_time()
                outcome = train_run(opt, data.x_train, data.y_train, epochs=epoch + 1, batch_size=64, seed=seed,
                                    scheduler=scheduler, on_step=count, start_epoch=epoch)
                rows[tol]["seconds"] += time.thread_time() - start
                assert not outcome["diverged"], outcome["error"]
        for tol, (model, _, _) in runs.items():
            rows[tol]["accuracy"].append(evaluate(model, data.x_test, data.y_test)[1])
    return rows


def report(rows, seeds, epochs, backend) -> str:
    base = rows[None]
    lines = [
        "# Adaptive stopping against a fixed T (embedded MNIST subset, the README's PC setting)", "",
        f"`OMP_NUM_THREADS=1 python benchmarks/adaptive_stopping.py` — {epochs} epochs, seeds {list(seeds)}, "
        f"backend `{backend}`; {machine_line(machine())}, one thread.", "",
        "| setting | test accuracy (mean; per seed) | Δ accuracy vs T = 20 (pp) | steps per batch: mean (min–max) "
        "| training time vs T = 20 |", "|---|---|---|---|---|"]
    for tol, row in rows.items():
        steps = row["steps"]
        count = sum(steps.values())
        mean = sum(k * v for k, v in steps.items()) / count
        accuracy = statistics.mean(row["accuracy"])
        name = "fixed T = 20" if tol is None else f"inference_tol = {tol:g} (cap 20)"
        lines.append(f"| {name} | {accuracy:.4f}; " + ", ".join(f"{a:.3f}" for a in row["accuracy"])
                     + f" | {100 * (accuracy - statistics.mean(base['accuracy'])):+.2f} | {mean:.2f} "
                     f"({min(steps)}–{max(steps)}) | {row['seconds'] / base['seconds']:.3f} |")
    lines += ["", "Distribution of the steps taken per batch (all seeds and epochs):", ""]
    for tol, row in rows.items():
        if tol is None:
            continue
        total = sum(row["steps"].values())
        lines.append(f"- inference_tol = {tol:g}: " + ", ".join(
            f"{k}: {100 * v / total:.1f}%" for k, v in sorted(row["steps"].items())))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tols", nargs="+", type=float, default=[0.3, 0.2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "adaptive-stopping.md")
    args = parser.parse_args()
    rows = run(args.tols, args.seeds, args.epochs, args.backend)
    text = report(rows, args.seeds, args.epochs, args.backend)
    print(text)
    args.out.write_text(text)
    payload = {str(k): {**v, "steps": dict(v["steps"])} for k, v in rows.items()}
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "rows": payload}, indent=1))


if __name__ == "__main__":
    main()
