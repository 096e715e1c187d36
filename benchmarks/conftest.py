"""Shared pieces of the benchmark suites: configurations, FLOP models and the GEMM-rate yardstick.

Every benchmark records in ``extra_info`` its FLOP count, achieved GFLOP/s and the fraction of the
``torch.matmul`` rate measured at the same GEMM shapes in the same run, so results read as ratios
rather than absolute times (these machines are shared and noisy). ``benchmarks/report.py`` turns a
``--benchmark-json`` file into the ratio table.
"""
from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

CONFIGS = {
    "small": ((784, 128, 128, 10), 32),
    "anchor": ((784, 512, 512, 10), 128),
    "wide": ((784, 2048, 2048, 2048, 10), 256),
}
INFERENCE_STEPS = 20


@dataclass(frozen=True)
class Case:
    dims: tuple[int, ...]
    batch: int
    steps: int = INFERENCE_STEPS

    @property
    def gemm_macs(self) -> int:
        """Σ_l B·d_l·d_{l-1}: multiply-adds of one pass through every layer."""
        return sum(self.batch * a * b for a, b in zip(self.dims[:-1], self.dims[1:]))


def flops(algo: str, case: Case) -> float:
    """FLOP model of one train step: the GEMM work each algorithm needs (2 FLOP per multiply-add)."""
    macs = case.gemm_macs
    if algo == "pc":
        # The GEMMs PC needs: forward and weight gradients over every layer, plus per step a prediction
        # and a top-down GEMM for layers 2 … L (layer 1's prediction is constant and x never moves).
        # DESIGN §7's (4T + 2)·Σ also counts layer 1 in every step; this is the work actually required.
        upper = macs - case.batch * case.dims[0] * case.dims[1]
        return 4 * case.steps * upper + 4 * macs
    if algo == "bp":
        return 6 * macs  # forward, input gradients, weight gradients
    # TP/DTP: forward + feedback maps on targets (DTP: also on activities) + local gradients, plus one
    # feedback-training step (forward through layer l, feedback map, its gradient).
    feedback = sum(case.batch * a * b for a, b in zip(case.dims[1:-1], case.dims[2:]))
    maps = (2 if algo == "dtp" else 1) * feedback
    return 2 * (macs + maps + macs) + 2 * 3 * feedback


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


@lru_cache(maxsize=None)
def gemm_gflops(dims: tuple[int, ...], batch: int, dtype=torch.float32, repeats: int = 20) -> float:
    """torch.matmul rate (GFLOP/s) over this network's layer GEMMs (B×d_{l-1} @ d_{l-1}×d_l)."""
    mats = [(torch.randn(batch, a, dtype=dtype), torch.randn(a, b, dtype=dtype)) for a, b in zip(dims[:-1], dims[1:])]
    outs = [torch.empty(batch, b, dtype=dtype) for _, b in zip(dims[:-1], dims[1:])]
    for (x, w), o in zip(mats, outs):
        torch.mm(x, w, out=o)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            for (x, w), o in zip(mats, outs):
                torch.mm(x, w, out=o)
        best = min(best, time.perf_counter() - start)
    total = 2 * sum(batch * a * b for a, b in zip(dims[:-1], dims[1:])) * repeats
    return total / best / 1e9


def record(benchmark, algo: str, provider: str, config: str, case: Case) -> None:
    """Attach the throughput model to a finished benchmark."""
    seconds = benchmark.stats.stats.median
    rate = flops(algo, case) / seconds / 1e9
    peak = gemm_gflops(case.dims, case.batch)
    benchmark.extra_info.update({
        "algo": algo, "provider": provider, "config": config, "dims": list(case.dims), "batch": case.batch,
        "inference_steps": case.steps, "ms_per_step": seconds * 1e3, "gflops": rate,
        "gemm_gflops": peak, "fraction_of_gemm": rate / peak, "machine": machine(),
    })
