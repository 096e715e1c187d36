"""Quick timing of one PC train step: cpp vs torch vs reference, and the GEMM rate (not a test).

    python benchmarks/time_cpp_pc_step.py [--repeats 30] [--configs small anchor]

Prints per provider the time of ``pcfast.functional.pc_train_step`` (tanh, jacobi, T = 20, MSE),
the speed-up of cpp over each peer, and GFLOP/s under DESIGN §7's model ``(4T + 2) · Σ_l B·d_l·d_{l-1}``
as a fraction of the ``torch.matmul`` rate measured on the same layer shapes in the same run.
Providers are interleaved round by round so machine noise hits all alike. On a shared machine other
processes only ever add time, so the minimum over rounds is the headline and the median is shown too.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pcfast import functional as F
from pcfast import ops

CONFIGS = {"small": ((784, 128, 128, 10), 32), "anchor": ((784, 512, 512, 10), 128)}
STEPS = 20


def design_flops(dims, batch, steps=STEPS):
    """DESIGN §7: (4T + 2) · Σ_l B·d_l·d_{l-1}."""
    return (4 * steps + 2) * sum(batch * a * b for a, b in zip(dims[:-1], dims[1:]))


def actual_flops(dims, batch, steps=STEPS):
    """The GEMM work the engine does: forward and weight gradients over every layer, and per step a
    prediction and a top-down GEMM for layers 2 … L (layer 1's prediction is constant)."""
    macs = [batch * a * b for a, b in zip(dims[:-1], dims[1:])]
    return 4 * steps * sum(macs[1:]) + 4 * sum(macs)


def gemm_time(dims, batch):
    """Seconds for one torch.matmul pass over the layer shapes (B, d_{l-1}) @ (d_{l-1}, d_l)."""
    mats = [(torch.randn(batch, a), torch.randn(b, a).T.contiguous()) for a, b in zip(dims[:-1], dims[1:])]
    t0 = time.perf_counter()
    for a, w in mats:
        torch.matmul(a, w)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--providers", nargs="+", default=["cpp", "torch", "reference"])
    args = parser.parse_args()
    providers = [p for p in args.providers if ops.is_available(p)]
    info = ops._load("cpp").engine_info() if "cpp" in providers else "not built"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpp engine: {info}")
    for name in args.configs:
        dims, batch = CONFIGS[name]
        gen = torch.Generator().manual_seed(0)
        weights = [torch.randn(b, a, generator=gen) / a**0.5 for a, b in zip(dims[:-1], dims[1:])]
        biases = [torch.zeros(b) for b in dims[1:]]
        acts = ["tanh"] * (len(dims) - 2)
        x = torch.rand(batch, dims[0], generator=gen)
        y = torch.nn.functional.one_hot(torch.randint(0, dims[-1], (batch,), generator=gen), dims[-1]).float()

        def run(provider, weights=weights, biases=biases, acts=acts, x=x, y=y):
            F.pc_train_step(weights, biases, acts, x, y, inference_steps=STEPS, inference_lr=0.1,
                            schedule="jacobi", backend=provider)

        times = {p: [] for p in providers}
        for p in providers:
            run(p)
            run(p)
        repeats = max(3, args.repeats if name == "small" else args.repeats // 3)
        gemm_times = []
        for _ in range(repeats):
            for p in providers:
                t0 = time.perf_counter()
                run(p)
                times[p].append(time.perf_counter() - t0)
            gemm_times += [gemm_time(dims, batch) for _ in range(5)]
        work = 2 * sum(batch * a * b for a, b in zip(dims[:-1], dims[1:]))
        rate = work / min(gemm_times) / 1e9
        rate_median = work / statistics.median(gemm_times) / 1e9
        flops, needed = design_flops(dims, batch), actual_flops(dims, batch)
        print(f"\n{name}: dims {dims}, batch {batch}, T={STEPS}, tanh, jacobi, {repeats} rounds; "
              f"torch.matmul rate {rate:.1f} GFLOP/s (median {rate_median:.1f})")
        print(f"  FLOP: DESIGN model (4T+2)·Σ = {flops / 1e6:.1f} M; GEMM work actually needed = {needed / 1e6:.1f} M")
        best = {p: min(ts) for p, ts in times.items()}
        med = {p: statistics.median(ts) for p, ts in times.items()}
        for p in providers:
            gf, gf_needed = flops / best[p] / 1e9, needed / best[p] / 1e9
            line = (f"  {p:10s} min {best[p] * 1e3:8.3f} ms (median {med[p] * 1e3:8.3f})  model {gf:6.1f} GFLOP/s "
                    f"= {gf / rate:6.1%} of GEMM rate; needed work {gf_needed:6.1f} GFLOP/s = {gf_needed / rate:6.1%}")
            if p != "cpp" and "cpp" in best:
                line += f";  cpp {best[p] / best['cpp']:.2f}x faster (median {med[p] / med['cpp']:.2f}x)"
            print(line)


if __name__ == "__main__":
    main()
