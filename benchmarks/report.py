"""Turn a pytest-benchmark JSON into the ratio table (markdown + summary JSON).

    python benchmarks/report.py bench.json [--out benchmarks/results/cpu-2core]

For each algorithm × configuration: ms/step, GFLOP/s, fraction of the torch.matmul rate at the same
shapes, and the speed-up over the reference measured in the same run.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def table(rows: list[dict]) -> str:
    lines = ["| algo | config | provider | ms/step | GFLOP/s | % of GEMM rate | × vs reference |",
             "|---|---|---|---:|---:|---:|---:|"]
    ref = {(r["algo"], r["config"]): r["ms_per_step"] for r in rows if r["provider"] == "reference"}
    for r in sorted(rows, key=lambda r: (r["algo"], r["config"], r["ms_per_step"])):
        base = ref.get((r["algo"], r["config"]))
        speedup = f"{base / r['ms_per_step']:.2f}" if base else "—"
        lines.append(f"| {r['algo']} | {r['config']} | {r['provider']} | {r['ms_per_step']:.2f} | "
                     f"{r['gflops']:.1f} | {100 * r['fraction_of_gemm']:.0f}% | {speedup} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="write <out>.json and <out>.md")
    args = parser.parse_args()
    data = json.loads(args.json.read_text())
    rows = [b["extra_info"] for b in data["benchmarks"] if b.get("extra_info", {}).get("algo")]
    machine = rows[0]["machine"] if rows else "unknown"
    text = f"Machine: {machine}\n\n{table(rows)}\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, "results": rows}, indent=1))
        args.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
