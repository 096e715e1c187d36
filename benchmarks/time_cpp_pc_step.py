"""Quick timing of one PC train step: cpp vs torch vs reference, and the GEMM rate (not a test).

    python benchmarks/time_cpp_pc_step.py [--repeats 30] [--configs small anchor]

Prints per provider the median time of ``pcfast.functional.pc_train_step`` (tanh, jacobi, T = 20,
MSE), the speed-up of cpp over each peer, and GFLOP/s under DESIGN §7's model
``(4T + 2) · Σ_l B·d_l·d_{l-1}`` as a fraction of the ``torch.matmul`` rate measured on the same
layer shapes in the same run. Providers are interleaved round by round so machine noise hits all alike.
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


def gemm_rate(dims, batch, repeats):
    """GFLOP/s of torch.matmul over the layer shapes (B, d_{l-1}) @ (d_{l-1}, d_l), one pass each."""
    mats = [(torch.randn(batch, a), torch.randn(b, a).T.contiguous()) for a, b in zip(dims[:-1], dims[1:])]
    work = 2 * sum(batch * a * b for a, b in zip(dims[:-1], dims[1:]))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for a, w in mats:
            torch.matmul(a, w)
        times.append(time.perf_counter() - t0)
    return work / statistics.median(times) / 1e9


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

        def run(provider):
            F.pc_train_step(weights, biases, acts, x, y, inference_steps=STEPS, inference_lr=0.1,
                            schedule="jacobi", backend=provider)

        times = {p: [] for p in providers}
        for p in providers:
            run(p)
            run(p)
        repeats = max(3, args.repeats if name == "small" else args.repeats // 3)
        rates = []
        for _ in range(repeats):
            for p in providers:
                t0 = time.perf_counter()
                run(p)
                times[p].append(time.perf_counter() - t0)
            rates.append(gemm_rate(dims, batch, 5))
        rate = statistics.median(rates)
        flops = design_flops(dims, batch)
        print(f"\n{name}: dims {dims}, batch {batch}, T={STEPS}, tanh, jacobi; torch.matmul rate {rate:.1f} GFLOP/s")
        med = {p: statistics.median(ts) for p, ts in times.items()}
        for p in providers:
            gf = flops / med[p] / 1e9
            line = f"  {p:10s} {med[p] * 1e3:9.3f} ms  {gf:7.1f} GFLOP/s  {gf / rate:6.1%} of GEMM rate"
            if p != "cpp" and "cpp" in med:
                line += f"   cpp is {med[p] / med['cpp']:.2f}x faster"
            print(line)


if __name__ == "__main__":
    main()
