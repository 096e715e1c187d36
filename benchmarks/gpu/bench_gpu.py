"""GPU train-step timings of the PC and DTP providers (the equivalence checks are pytest tests:
``pytest -m gpu tests/gpu``; ``run_gpu.sh`` runs both).

    python benchmarks/gpu/bench_gpu.py                 # everything within --budget (210 s by default)
    python benchmarks/gpu/bench_gpu.py --cases mnist --precisions fp32
    python benchmarks/gpu/bench_gpu.py --self-check    # CPU only: the harness on a tiny case

One train step (gradients + an in-place SGD update) of PC (jacobi, T = 20, MSE) and DTP for
providers ``reference`` (eager autograd), ``torch`` (explicit backend), ``compile`` (``torch.compile``
of the torch backend), ``triton`` (eager launches) and ``triton+graph`` (CUDA graph replay), at
(a) 784-256-256-10 batch 64 and (b) 784-4096×4-10 batch 1024, in fp32, bf16 and tf32. Reported:
median ms/step (CUDA events), achieved TFLOP/s with the FLOP model below, and the percentage of the
torch.matmul rate measured in the same run and precision (8192³).

FLOP models (multiply-add = 2 FLOPs), with M_l = d_l·d_{l-1}:
- PC: ``(4T + 2) · Σ_l B·M_l`` (DESIGN §7: two GEMMs per layer per step, the forward pass and the
  weight gradients);
- DTP: ``2B · (Σ_l M_l + Σ_l M_l + 2 Σ_{l≥2} M_l)`` (forward, local gradients, the feedback map on ĥ and h).

Networks and batches come from ``pcfast.testing``. Every case runs under its own try/except and
time limit; the run stops starting new cases when ``--budget`` seconds are used. Results:
``$PCFAST_BENCH_OUT`` (default ``benchmarks/results/gpu``) gets ``bench_gpu.json`` and ``bench_gpu.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch

from pcfast import ops
from pcfast.testing import PRECISIONS, make_batch, make_feedback, make_net, precision_mode
from pcfast.types import Feedback, Net, PCConfig, TPConfig


@dataclass(frozen=True)
class Case:
    name: str
    dims: tuple[int, ...]
    batch: int
    steps: int

    @property
    def label(self) -> str:
        inner = self.dims[1:-1]
        if len(set(inner)) == 1 and len(inner) > 2:
            middle = f"{inner[0]}x{len(inner)}"
        else:
            middle = "-".join(map(str, inner))
        return f"{self.dims[0]}-{middle}-{self.dims[-1]} B{self.batch} T{self.steps}"


CASES = {
    "mnist": Case("mnist", (784, 256, 256, 10), 64, 20),
    "wide": Case("wide", (784, 4096, 4096, 4096, 4096, 10), 1024, 20),
    "tiny": Case("tiny", (16, 32, 32, 4), 8, 3),  # --self-check
}
ALGOS = ("pc", "dtp")
# Run order: the fused providers first, the slow-to-start ones (autograd, torch.compile) last, so a
# tight budget drops those.
PROVIDERS = ("torch", "triton", "triton+graph", "reference", "compile")


def macs(dims) -> list[int]:
    return [a * b for a, b in itertools.pairwise(dims)]


def flops(algo: str, dims, batch: int, steps: int) -> float:
    """FLOPs of one train step under the models in the module docstring."""
    m = macs(dims)
    if algo == "pc":
        return float((4 * steps + 2) * batch * sum(m))
    if algo == "dtp":
        return float(2 * batch * (2 * sum(m) + 2 * sum(m[1:])))
    raise ValueError(f"algo: expected one of {ALGOS}, got {algo!r}")


# ---------------------------------------------------------------------------------------------
# Time limits
# ---------------------------------------------------------------------------------------------


class TimeLimit(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ``TimeLimit`` in the main thread after ``seconds`` (Python-level; a hung kernel is not interrupted)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(signum, frame):
        raise TimeLimit(f"over {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, device: torch.device, *, warmup: int = 3, min_reps: int = 5, max_reps: int = 50,
               seconds: float = 3.0) -> dict:
    """Median and quantiles of one call of ``fn`` (ms), CUDA events on CUDA, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_reps or (len(samples) < max_reps and time.perf_counter() - start < seconds):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - t0))
    samples.sort()
    q = lambda p: samples[min(len(samples) - 1, int(p * len(samples)))]
    return {"ms": statistics.median(samples), "p20": q(0.2), "p80": q(0.8), "reps": len(samples)}


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int = 8192) -> dict:
    """torch.matmul rate (TFLOP/s) at size³ in the current precision mode."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    timing = time_steps(lambda: torch.matmul(a, b, out=out), device, warmup=2, min_reps=5, max_reps=20, seconds=2.0)
    return {"size": size, "ms": timing["ms"], "tflops": 2 * size**3 / (timing["ms"] * 1e-3) / 1e12}


# ---------------------------------------------------------------------------------------------
# Networks and providers
# ---------------------------------------------------------------------------------------------


_compiled: dict[str, object] = {}


def provider_grads(provider: str, device: torch.device) -> tuple:
    """(pc_grads, tp_grads) of ``provider``: a backend's methods, called with the value types."""
    if provider in ("reference", "torch"):
        backend = ops.get_backend(provider, "pc", device)
        return backend.pc_grads, backend.tp_grads
    if provider == "compile":
        if "pc" not in _compiled:
            backend = ops.get_backend("torch", "pc", device)
            _compiled["pc"] = torch.compile(backend.pc_grads, dynamic=False)
            _compiled["tp"] = torch.compile(backend.tp_grads, dynamic=False)
        return _compiled["pc"], _compiled["tp"]
    if provider in ("triton", "triton+graph"):
        from pcfast.ops import triton

        triton.clear_graphs()
        backend = triton.TritonBackend(triton.TritonOptions(cuda_graphs=provider == "triton+graph"))
        return backend.pc_grads, backend.tp_grads
    raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")


def step_function(algo: str, provider: str, case: Case, dtype, device):
    """A zero-argument callable running one train step (gradients + SGD update) for ``provider``."""
    dims, depth = case.dims, len(case.dims) - 1
    weights, biases, acts = make_net(case.dims, dtype=dtype, device=device)
    net = Net(weights, biases, acts)  # the parameters themselves: sgd updates them in place
    x, onehot = make_batch(dims, case.batch, targets="onehot", inputs="uniform", dtype=dtype, device=device)
    lr = 1e-3
    pc_grads, tp_grads = provider_grads(provider, device)

    def sgd(grads, bias_grads):
        with torch.no_grad():
            for w, g in zip(weights, grads):
                w.sub_(g, alpha=lr)
            for b, g in zip(biases, bias_grads):
                if b is not None:
                    b.sub_(g, alpha=lr)

    if algo == "pc":
        config = PCConfig((1.0,) * depth, inference_steps=case.steps, inference_lr=0.1, schedule="jacobi",
                          fpa=False, loss="mse")

        def run():
            out = pc_grads(net, x, onehot, config)
            sgd(out.weight_grads, out.bias_grads)
        return run

    qs, cs, _ = make_feedback(dims, dtype=dtype, device=device, seed=2)
    feedback, config = Feedback(qs, cs, acts), TPConfig(beta=0.1, loss="mse", difference=True)

    def run():
        out = tp_grads(net, feedback, x, onehot, config)
        sgd(out.weight_grads, out.bias_grads)
    return run


# ---------------------------------------------------------------------------------------------
# Timings
# ---------------------------------------------------------------------------------------------


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def run_timings(cases, algos, providers, precisions, device, budget, per_case_s: float) -> tuple[list[dict], dict]:
    rows, peaks = [], {}
    for precision in precisions:
        with precision_mode(precision) as dtype:
            try:
                peaks[precision] = matmul_peak(dtype, device, size=8192 if device.type == "cuda" else 512)
                print(f"  torch.matmul {precision}: {peaks[precision]['tflops']:.1f} TFLOP/s", flush=True)
            except Exception as exc:  # noqa: BLE001
                peaks[precision] = {"error": f"{type(exc).__name__}: {exc}"}
            for case in cases:
                for algo in algos:
                    for provider in providers:
                        row = {"precision": precision, "case": case.name, "config": case.label, "algo": algo,
                               "provider": provider, "flops": flops(algo, case.dims, case.batch, case.steps)}
                        if provider == "reference" and precision != "fp32":
                            continue  # the specification is timed once, in fp32
                        if provider.startswith("triton") and device.type != "cuda":
                            continue
                        if budget.left() < 20:
                            rows.append(dict(row, status="skipped", detail="time budget"))
                            continue
                        start = time.perf_counter()
                        try:
                            with time_limit(min(per_case_s, budget.left() - 10)):
                                fn = step_function(algo, provider, case, dtype, device)
                                timing = time_steps(fn, device, seconds=min(3.0, per_case_s / 4))
                            ms = timing["ms"]
                            tflops = row["flops"] / (ms * 1e-3) / 1e12
                            peak = peaks[precision].get("tflops")
                            row.update(status="ok", **timing, tflops=tflops,
                                       percent_of_matmul=100 * tflops / peak if peak else None)
                        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                            row.update(status="error", detail=f"{type(exc).__name__}: {exc}"[:1000])
                            if not isinstance(exc, TimeLimit):
                                traceback.print_exc(limit=3)
                        finally:
                            if device.type == "cuda":
                                with contextlib.suppress(Exception):
                                    torch.cuda.synchronize()
                                    torch.cuda.empty_cache()
                        row["seconds"] = round(time.perf_counter() - start, 1)
                        print("  " + format_row(row), flush=True)
                        rows.append(row)
    return rows, peaks


def format_row(row: dict) -> str:
    head = f"{row['precision']:<5} {row['config']:<28} {row['algo']:<4} {row['provider']:<13}"
    if row.get("status") != "ok":
        return f"{head} {row.get('status')}: {row.get('detail', '')[:200]}"
    pct = f"{row['percent_of_matmul']:.1f}%" if row.get("percent_of_matmul") is not None else "—"
    return f"{head} {row['ms']:9.3f} ms  {row['tflops']:8.3f} TFLOP/s  {pct:>6} of matmul  ({row['seconds']}s)"


def markdown(machine: dict, rows: list[dict], peaks: dict) -> str:
    lines = [f"# GPU benchmark — {machine.get('gpu', 'no GPU')}", "",
             f"torch {machine['torch']}, triton {machine.get('triton')}, CUDA {machine.get('cuda')}", ""]
    lines += ["torch.matmul (8192³): " + ", ".join(f"{p} {v['tflops']:.1f} TFLOP/s" for p, v in peaks.items() if "tflops" in v), ""]
    lines += ["| precision | config | algo | provider | ms/step | TFLOP/s | % of matmul | × vs torch |",
              "|---|---|---|---|---:|---:|---:|---:|"]
    base = {(r["precision"], r["case"], r["algo"]): r["ms"] for r in rows if r.get("status") == "ok" and r["provider"] == "torch"}
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['precision']} | {r['config']} | {r['algo']} | {r['provider']} | {r.get('status')} | | | |")
            continue
        ref = base.get((r["precision"], r["case"], r["algo"]))
        speed = f"{ref / r['ms']:.2f}" if ref else "—"
        pct = f"{r['percent_of_matmul']:.1f}" if r.get("percent_of_matmul") is not None else "—"
        lines.append(f"| {r['precision']} | {r['config']} | {r['algo']} | {r['provider']} | {r['ms']:.3f} | "
                     f"{r['tflops']:.3f} | {pct} | {speed} |")
    return "\n".join(lines) + "\n"


def machine_info(device: torch.device) -> dict:
    info = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "device": str(device)}
    with contextlib.suppress(Exception):
        import triton

        info["triton"] = triton.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sm=f"{props.major}{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count)
    else:
        info["gpu"] = "none (CPU self-check)"
    return info


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="mnist,wide", help=f"comma list of {sorted(CASES)}")
    parser.add_argument("--algos", default=",".join(ALGOS))
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--precisions", default="fp32,bf16,tf32", help="timed precisions, in this order")
    parser.add_argument("--budget", type=float, default=210.0, help="seconds for the whole run")
    parser.add_argument("--per-case", type=float, default=90.0, help="seconds one provider × case may take")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("PCFAST_BENCH_OUT", REPO / "benchmarks/results/gpu")))
    parser.add_argument("--self-check", action="store_true",
                        help="CPU: run the harness on the tiny case with the CPU providers")
    args = parser.parse_args(argv)
    split = lambda s: [v for v in s.split(",") if v]
    args.cases, args.algos, args.providers = split(args.cases), split(args.algos), split(args.providers)
    args.precisions = split(args.precisions)
    for name, values, known in (("cases", args.cases, CASES), ("algos", args.algos, ALGOS),
                                ("providers", args.providers, PROVIDERS), ("precisions", args.precisions, PRECISIONS)):
        unknown = [v for v in values if v not in known]
        if unknown:
            parser.error(f"--{name}: unknown {unknown}; expected some of {list(known)}")
    if args.self_check:
        args.cases, args.providers, args.precisions = ["tiny"], ["reference", "torch"], ["fp32"]
        args.budget = min(args.budget, 60.0)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.self_check:
        print("bench_gpu: no CUDA device; use --self-check to exercise the harness on CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda and not args.self_check else "cpu")
    budget = Budget(args.budget)
    machine = machine_info(device)
    print(f"machine: {machine}", flush=True)
    print("timings:", flush=True)
    rows, peaks = run_timings([CASES[c] for c in args.cases], args.algos, args.providers, args.precisions, device,
                              budget, args.per_case)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_gpu_selfcheck" if args.self_check else "bench_gpu"
    report = {"machine": machine, "flop_models": {"pc": "(4T+2)·Σ B·d_l·d_{l-1}",
                                                  "dtp": "2B·(2Σ d_l·d_{l-1} + 2Σ_{l≥2} d_l·d_{l-1})"},
              "matmul_peak": peaks, "results": rows,
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    text = markdown(machine, rows, peaks)
    (args.out / f"{stem}.md").write_text(text)
    print("\n" + text)
    print(f"wrote {args.out / (stem + '.json')} and {stem}.md", flush=True)
    return 0 if any(r.get("status") == "ok" for r in rows) else 1  # 1: nothing could be timed


if __name__ == "__main__":
    sys.exit(main())
