"""One BP training step: ``pcfast.optim.BP`` against the plain PyTorch loop it stands for.

BP is the wall-clock baseline of every PC/TP/DTP comparison, so it must cost what a PyTorch user's
own loop costs. Providers, on 784-256-256-10 tanh at batch 64 (the README's size) and the anchor
784-512-512-10 at batch 128:

* ``torch-sgd``: ``opt.zero_grad()``, ``model(x)``, ``F.mse_loss`` against the one-hot labels,
  ``loss.backward()``, ``torch.optim.SGD.step()``;
* ``pcfast-bp``: ``opt.zero_grad()``, ``pcfast.optim.BP.step(x, labels)`` (batch checks, gradients,
  the all-or-nothing finiteness check, SGD);
* ``torch-sgd-momentum`` and ``pcfast-bp-momentum``: the same with momentum 0.9.

``test_bp_step`` times each provider on its own (pytest-benchmark rows with the FLOP model of
``conftest.record``). ``test_bp_step_ratio`` runs the four providers interleaved, round after round,
and records each one's median step time and its ratio to ``torch-sgd`` with the same momentum — the
median over rounds of the per-round ratio, so that load from other processes on a shared machine
falls on every provider alike. Step times are this thread's CPU time (``time.thread_time``): with
``OMP_NUM_THREADS=1`` every op and the autograd engine run on the calling thread, and the time other
processes hold the core is not the step's cost. Run with

    OMP_NUM_THREADS=1 pytest benchmarks/test_bench_bp.py -s --benchmark-json=bench_bp.json

(``-s`` prints the ratio table; ``-k readme`` or ``-k anchor`` selects a size).
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
from torch import nn

import pcfast
from pcfast.testing import make_batch, make_model

from .conftest import CONFIGS, Case, machine, record

SIZES = {"readme": ((784, 256, 256, 10), 64), "anchor": CONFIGS["anchor"]}
PROVIDERS = ["torch-sgd", "pcfast-bp", "torch-sgd-momentum", "pcfast-bp-momentum"]
LR = 0.01  # small enough that thousands of steps on one batch stay finite


def step_function(provider: str, dims: tuple[int, ...], size: int):
    """A zero-argument callable running one training step of ``provider`` on its own model."""
    model = make_model(dims, activation="tanh")  # PyTorch's default initialisation, seeded
    x, labels = make_batch(dims, size, targets="labels", inputs="uniform", dtype=torch.float32)
    momentum = 0.9 if provider.endswith("momentum") else 0.0
    if provider.startswith("torch-sgd"):
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=momentum)

        def run():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), nn.functional.one_hot(labels, dims[-1]).to(x.dtype))
            loss.backward()
            opt.step()
        return run
    opt = pcfast.optim.BP(model, lr=LR, momentum=momentum)

    def run():
        opt.zero_grad()
        opt.step(x, labels)
    return run


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bp_step(benchmark, provider, size):
    dims, batch = SIZES[size]
    run = step_function(provider, dims, batch)
    benchmark.group = f"bp-{size}"
    for _ in range(3):
        run()  # warm up (allocator, caches)
    benchmark.pedantic(run, rounds=30, iterations=5, warmup_rounds=1)
    record(benchmark, "bp", provider, size, Case(dims, batch))


def interleaved_step_times(runs: dict, rounds: int, steps: int) -> dict[str, list[float]]:
    """Per provider, the mean step time (thread CPU seconds) of each round; every round runs every
    provider for ``steps`` steps, one provider after the other."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.thread_time()
            for _ in range(steps):
                run()
            times[name].append((time.thread_time() - start) / steps)
    return times


@pytest.mark.parametrize("size", list(SIZES))
def test_bp_step_ratio(benchmark, size):
    dims, batch = SIZES[size]
    runs = {provider: step_function(provider, dims, batch) for provider in PROVIDERS}
    interleaved_step_times(runs, rounds=2, steps=3)  # warm up
    rounds = 40
    times = benchmark.pedantic(interleaved_step_times, args=(runs, rounds, 5), rounds=1, iterations=1)
    baseline = {provider: "torch-sgd-momentum" if provider.endswith("momentum") else "torch-sgd"
                for provider in PROVIDERS}
    ratios = {provider: statistics.median(a / b for a, b in zip(times[provider], times[baseline[provider]]))
              for provider in PROVIDERS}
    ms = {provider: 1e3 * statistics.median(times[provider]) for provider in PROVIDERS}
    benchmark.group = f"bp-ratio-{size}"
    benchmark.extra_info.update({
        "config": size, "dims": list(dims), "batch": batch, "rounds": rounds, "machine": machine(),
        "ms_per_step": ms, "ratio_to_torch_sgd": ratios,
    })
    print(f"\nBP step, {size} {'-'.join(map(str, dims))} B{batch}, {rounds} interleaved rounds ({machine()}):")
    for provider in PROVIDERS:
        print(f"  {provider:20s} {ms[provider]:7.2f} ms/step   × {ratios[provider]:.3f} vs {baseline[provider]}")
