"""Plot the committed benchmark results: ``benchmarks/results/performance.png``.

    python benchmarks/plot.py

Left: one PC train step per runner against the peer libraries (``results/peers.json``, one run).
Right: pcfast's providers per algorithm at the anchor configuration, as a fraction of the
``torch.matmul`` rate at the same shapes (``results/cpu-train-step.json``).
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    peers = json.loads((RESULTS / "peers.json").read_text())
    rows = peers["summary"] if "summary" in peers else peers["results"]
    cases = [c for c in ("small", "anchor") if any(r["case"] == c for r in rows)]
    runners = sorted({r["peer"] for r in rows})
    width = 0.8 / len(runners)
    ax = axes[0]
    for i, runner in enumerate(runners):
        values = []
        for case in cases:
            match = [r["best_median_ms"] for r in rows if r["case"] == case and r["peer"] == runner]
            values.append(match[0] if match else float("nan"))
        bars = ax.bar([j + i * width for j in range(len(cases))], values, width, label=runner)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([j + width * (len(runners) - 1) / 2 for j in range(len(cases))])
    ax.set_xticklabels(["small 784-128-128-10\nB=32, T=20", "anchor 784-512-512-10\nB=128, T=20"][: len(cases)])
    ax.set_yscale("log")
    ax.set_ylabel("ms per PC train step (lower is better)")
    ax.set_title("PC train step vs peers, same run")
    ax.legend(fontsize=8)

    ax = axes[1]
    bench = RESULTS / "cpu-train-step.json"
    if bench.exists():
        data = [r for r in json.loads(bench.read_text())["results"] if r["config"] == "anchor"]
        algos = ["pc", "tp", "dtp", "bp"]
        providers = [p for p in ("reference", "torch", "compile", "cpp") if any(r["provider"] == p for r in data)]
        width = 0.8 / max(len(providers), 1)
        for i, provider in enumerate(providers):
            values = []
            for algo in algos:
                match = [r["fraction_of_gemm"] for r in data if r["algo"] == algo and r["provider"] == provider]
                values.append(100 * match[0] if match else float("nan"))
            ax.bar([j + i * width for j in range(len(algos))], values, width, label=provider)
        ax.set_xticks([j + width * (len(providers) - 1) / 2 for j in range(len(algos))])
        ax.set_xticklabels([a.upper() for a in algos])
        ax.axhline(100, color="gray", lw=0.8, ls="--")
        ax.set_ylabel("% of torch.matmul rate at the same shapes")
        ax.set_title("anchor 784-512-512-10, B=128: providers")
        ax.legend(fontsize=8)
    fig.suptitle(f"{peers.get('machine', {}).get('model_name', 'CPU')} — 2 threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "performance.png", dpi=110)
    print(RESULTS / "performance.png")


if __name__ == "__main__":
    main()
