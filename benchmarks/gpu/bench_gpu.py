"""One prepared GPU run: the Triton backend's equivalence checks on CUDA, then train-step timings.

    python benchmarks/gpu/bench_gpu.py                 # everything, < 8 minutes on an H100/H200
    python benchmarks/gpu/bench_gpu.py --skip-checks --cases mnist --precisions fp32
    python benchmarks/gpu/bench_gpu.py --self-check    # CPU only: the harness on a tiny case

1. **Checks** (fp32, tf32, bf16): the ``triton`` backend on CUDA against ``pcfast.reference`` —
   PC (both schedules, FPA on/off, MSE and CE; the stacked equal-width path; SGD fused into the
   gradient launches), TP/DTP and the feedback gradients (also with in-kernel seeded noise). fp32 (3xTF32 dot)
   must meet the float32 tolerance against a float64 reference; tf32 and bf16 follow the low-precision
   rule of ``pcfast.testing`` (fused error ≤ 2 × the torch backend's own error in that precision + atol).
   The CUDA-graph path must replay bit-for-bit what the eager launches compute, also after an
   in-place weight update.
2. **Timings**: one train step (gradients + an in-place SGD update) of PC (jacobi, T = 20, MSE) and
   DTP for providers ``reference`` (eager autograd), ``torch`` (explicit backend), ``compile``
   (``torch.compile`` of the torch backend), ``triton`` (eager launches) and ``triton+graph`` (CUDA graph
   replay), at (a) 784-256-256-10 batch 64 and (b) 784-4096×4-10 batch 1024. Reported: median ms/step
   (CUDA events), achieved TFLOP/s with the FLOP model below, and the percentage of the torch.matmul
   rate measured in the same run and precision (8192³).

FLOP models (multiply-add = 2 FLOPs), with M_l = d_l·d_{l-1}:
- PC: ``(4T + 2) · Σ_l B·M_l`` (DESIGN §7: two GEMMs per layer per step, the forward pass and the
  weight gradients);
- DTP: ``2B · (Σ_l M_l + Σ_l M_l + 2 Σ_{l≥2} M_l)`` (forward, local gradients, the feedback map on ĥ and h).

Every case runs under its own try/except and time limit; the run stops starting new cases when
``--budget`` seconds are used. Results: ``$PCFAST_BENCH_OUT`` (default ``benchmarks/results/gpu``)
gets ``bench_gpu.json`` and ``bench_gpu.md``.
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

from pcfast import reference
from pcfast.ops import torch_pc, torch_tp
from pcfast.testing import assert_close, assert_close_to_reference, tolerance


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
PRECISIONS = ("fp32", "tf32", "bf16")


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
# Precision, time limits
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def precision_mode(name: str):
    """torch.matmul's fp32 mode for the duration: TF32 only for ``tf32``."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    matmul.allow_tf32 = name == "tf32"
    try:
        yield torch.bfloat16 if name == "bf16" else torch.float32
    finally:
        matmul.allow_tf32 = saved


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


def network(dims, dtype, device, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    weights = [(torch.randn(b, a, generator=gen) / a**0.5).to(device, dtype) for a, b in itertools.pairwise(dims)]
    biases = [(0.1 * torch.randn(b, generator=gen)).to(device, dtype) if bias else None for b in dims[1:]]
    return weights, biases


def feedback(dims, dtype, device, seed=2, bias=True):
    gen = torch.Generator().manual_seed(seed)
    qs = [(torch.randn(dims[l - 1], dims[l], generator=gen) / dims[l] ** 0.5).to(device, dtype) for l in range(2, len(dims))]
    cs = [(0.1 * torch.randn(dims[l - 1], generator=gen)).to(device, dtype) if bias else None for l in range(2, len(dims))]
    return qs, cs


def inputs(dims, batch, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, dims[0], generator=gen).to(device, dtype)
    labels = torch.randint(0, dims[-1], (batch,), generator=gen).to(device)
    return x, labels, torch.nn.functional.one_hot(labels, dims[-1]).to(dtype)


def _triton_backend():
    """``pcfast.ops.triton``, imported on first use (the CPU self-check never needs triton)."""
    from pcfast.ops import triton as triton_backend

    return triton_backend


_compiled: dict[str, object] = {}


def step_function(algo: str, provider: str, case: Case, dtype, device):
    """A zero-argument callable running one train step (gradients + SGD update) for ``provider``."""
    dims, depth = case.dims, len(case.dims) - 1
    weights, biases = network(dims, dtype, device)
    x, _labels, onehot = inputs(dims, case.batch, dtype, device)
    acts = ["tanh"] * (depth - 1)
    lr = 1e-3

    if provider == "reference":
        pc_fn, tp_fn = reference.pc_train_step, reference.tp_train_step
    elif provider == "torch":
        pc_fn, tp_fn = torch_pc.pc_train_step, torch_tp.tp_train_step
    elif provider == "compile":
        if "pc" not in _compiled:
            _compiled["pc"] = torch.compile(torch_pc.pc_train_step, dynamic=False)
            _compiled["tp"] = torch.compile(torch_tp.tp_train_step, dynamic=False)
        pc_fn, tp_fn = _compiled["pc"], _compiled["tp"]
    elif provider in ("triton", "triton+graph"):
        backend = _triton_backend()
        backend.CUDA_GRAPHS = provider == "triton+graph"
        backend.clear_graphs()
        pc_fn, tp_fn = backend.pc_train_step, backend.tp_train_step
    else:
        raise ValueError(f"provider: expected one of {PROVIDERS}, got {provider!r}")

    def sgd(grads, bias_grads):
        with torch.no_grad():
            for w, g in zip(weights, grads):
                w.sub_(g, alpha=lr)
            for b, g in zip(biases, bias_grads):
                if b is not None:
                    b.sub_(g, alpha=lr)

    if algo == "pc":
        kwargs = dict(precisions=[1.0] * depth, inference_steps=case.steps, inference_lr=0.1, schedule="jacobi",
                      fpa=False, loss="mse")

        def run():
            out = pc_fn(weights, biases, acts, x, onehot, **kwargs)
            sgd(out.weight_grads, out.bias_grads)
        return run

    qs, cs = feedback(dims, dtype, device)

    def run():
        out = tp_fn(weights, biases, acts, qs, cs, acts, x, onehot, beta=0.1, loss="mse", difference=True)
        sgd(out.weight_grads, out.bias_grads)
    return run


# ---------------------------------------------------------------------------------------------
# Equivalence checks
# ---------------------------------------------------------------------------------------------

CHECK_DIMS = (33, 100, 64, 17, 7)
CHECK_BATCH = 33
CHECK_ACTS = ["tanh", "gelu", "relu"]


def _fields(result, names):
    out = []
    for name in names:
        value = getattr(result, name)
        if isinstance(value, list):
            out += [(f"{name}[{i}]", v) for i, v in enumerate(value) if v is not None]
        else:
            out.append((name, value))
    return out


def _compare(precision: str, fused, low, high, names) -> None:
    """fp32: the float32 tolerance against float64; tf32/bf16: fused error ≤ 2 × low error + atol."""
    fused_f, low_f, high_f = _fields(fused, names), _fields(low, names), _fields(high, names)
    for (name, a), (_, lo), (_, hi) in zip(fused_f, low_f, high_f):
        hi = hi.to(a.device)
        if precision == "fp32":
            assert_close(a, hi, dtype="float32", name=name)
        else:
            tol = tolerance("tf32" if precision == "tf32" else "bfloat16")
            scale = max(1.0, float(hi.double().abs().max()))
            assert_close_to_reference(a, lo, hi, atol=tol.atol * scale, name=name)


def _checks_for(precision: str, device: torch.device) -> list[tuple[str, callable]]:
    backend = _triton_backend()
    pc_names = ["latents", "errors", "weight_grads", "bias_grads", "energy", "loss"]
    tp_names = ["targets", "activities", "weight_grads", "bias_grads", "loss", "local_loss"]
    checks = []

    def net(dtype, seed=0):
        weights, biases = network(CHECK_DIMS, dtype, device, seed=seed)
        qs, cs = feedback(CHECK_DIMS, dtype, device)
        x, labels, onehot = inputs(CHECK_DIMS, CHECK_BATCH, dtype, device)
        return weights, biases, qs, cs, x, labels, onehot

    def as64(ts):
        return [None if t is None else t.double() for t in ts]

    for schedule in ("jacobi", "sequential"):
        for fpa in (False, True):
            for loss in ("mse", "ce"):
                def pc_check(schedule=schedule, fpa=fpa, loss=loss):
                    with precision_mode(precision) as dtype:
                        weights, biases, _, _, x, labels, onehot = net(dtype)
                        y = labels if loss == "ce" else onehot
                        kwargs = dict(precisions=[1.0, 2.0, 0.5, 0.8], inference_steps=5, inference_lr=0.2,
                                      schedule=schedule, fpa=fpa, loss=loss)
                        backend.CUDA_GRAPHS = False
                        fused = backend.pc_train_step(weights, biases, CHECK_ACTS, x, y, **kwargs)
                        low = torch_pc.pc_train_step(weights, biases, CHECK_ACTS, x, y, **kwargs)
                    y64 = y if loss == "ce" else y.double()
                    high = reference.pc_train_step(as64(weights), as64(biases), CHECK_ACTS, x.double(), y64, **kwargs)
                    _compare(precision, fused, low, high, pc_names)
                checks.append((f"pc-{schedule}-{'fpa' if fpa else 'nofpa'}-{loss}", pc_check))

    for difference in (True, False):
        for loss in ("mse", "ce"):
            def tp_check(difference=difference, loss=loss):
                with precision_mode(precision) as dtype:
                    weights, biases, qs, cs, x, labels, onehot = net(dtype)
                    y = labels if loss == "ce" else onehot
                    kwargs = dict(beta=0.3, loss=loss, difference=difference)
                    backend.CUDA_GRAPHS = False
                    fused = backend.tp_train_step(weights, biases, CHECK_ACTS, qs, cs, CHECK_ACTS, x, y, **kwargs)
                    low = torch_tp.tp_train_step(weights, biases, CHECK_ACTS, qs, cs, CHECK_ACTS, x, y, **kwargs)
                y64 = y if loss == "ce" else y.double()
                high = reference.tp_train_step(as64(weights), as64(biases), CHECK_ACTS, as64(qs), as64(cs), CHECK_ACTS,
                                               x.double(), y64, **kwargs)
                _compare(precision, fused, low, high, tp_names)
            checks.append((f"{'dtp' if difference else 'tp'}-{loss}", tp_check))

    def feedback_check():
        with precision_mode(precision) as dtype:
            weights, biases, qs, cs, x, _, _ = net(dtype)
            fused = backend.feedback_grads(weights, biases, CHECK_ACTS, qs, cs, CHECK_ACTS, x)
            low = torch_tp.feedback_grads(weights, biases, CHECK_ACTS, qs, cs, CHECK_ACTS, x)
        high = reference.feedback_grads(as64(weights), as64(biases), CHECK_ACTS, as64(qs), as64(cs), CHECK_ACTS, x.double())
        _compare(precision, fused, low, high, ["weight_grads", "bias_grads", "loss"])
    checks.append(("feedback-grads", feedback_check))

    def stacked_check():
        """Equal-width hidden layers (the stacked launches), with and without FPA, against reference."""
        dims, acts = (33, 64, 64, 64, 7), ["tanh"] * 3
        for fpa in (False, True):
            with precision_mode(precision) as dtype:
                weights, biases = network(dims, dtype, device)
                x, _, onehot = inputs(dims, CHECK_BATCH, dtype, device)
                kwargs = dict(precisions=[1.0, 1.0, 1.0, 0.5], inference_steps=5, inference_lr=0.2, schedule="jacobi",
                              fpa=fpa, loss="mse")
                backend.CUDA_GRAPHS = False
                assert backend._stack_plan(weights, biases, acts, kwargs["precisions"], "jacobi") is not None
                fused = backend.pc_train_step(weights, biases, acts, x, onehot, **kwargs)
                low = torch_pc.pc_train_step(weights, biases, acts, x, onehot, **kwargs)
            high = reference.pc_train_step(as64(weights), as64(biases), acts, x.double(), onehot.double(), **kwargs)
            _compare(precision, fused, low, high, pc_names)
    checks.append(("pc-stacked", stacked_check))

    def fused_sgd_check():
        """SGD with momentum, Nesterov and weight decay inside the gradient launches vs reference + SGD."""
        from pcfast.sgd import LayerSGD, layer_updates

        with precision_mode(precision) as dtype:
            weights, biases, _, _, x, _, onehot = net(dtype)
            steps = [LayerSGD(weight_lr=0.1, bias_lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True,
                              weight_buffer=torch.ones_like(w), bias_buffer=torch.ones_like(b))
                     for w, b in zip(weights, biases)]
            kwargs = dict(precisions=[1.0, 2.0, 0.5, 0.8], inference_steps=5, inference_lr=0.2, schedule="jacobi",
                          fpa=False, loss="mse")
            backend.CUDA_GRAPHS = False
            fused = backend.pc_train_step(weights, biases, CHECK_ACTS, x, onehot, sgd=steps, **kwargs)
            low = torch_pc.pc_train_step(weights, biases, CHECK_ACTS, x, onehot, **kwargs)
            low.sgd_updates = layer_updates(weights, biases, low.weight_grads, low.bias_grads, steps)
        high = reference.pc_train_step(as64(weights), as64(biases), CHECK_ACTS, x.double(), onehot.double(), **kwargs)
        steps64 = [LayerSGD(**{**vars(s), "weight_buffer": s.weight_buffer.double(), "bias_buffer": s.bias_buffer.double()})
                   for s in steps]
        high.sgd_updates = layer_updates(as64(weights), as64(biases), high.weight_grads, high.bias_grads, steps64)
        for result in (fused, low, high):
            result.new_params = [new for new, _ in result.sgd_updates]
            result.new_buffers = [buf for _, buf in result.sgd_updates]
        _compare(precision, fused, low, high, ["new_params", "new_buffers"])
    checks.append(("pc-fused-sgd", fused_sgd_check))

    def noise_check():
        """DTP feedback gradients with ξ drawn in the kernels: same seed, same result; vs reference
        given the same ξ (``gaussian_noise``)."""
        from pcfast.ops import tp_targets

        with precision_mode(precision) as dtype:
            weights, biases, qs, cs, x, _, _ = net(dtype)
            runs = [backend.feedback_grads(weights, biases, CHECK_ACTS, qs, cs, CHECK_ACTS, x, noise_seed=11,
                                           noise_std=0.1) for _ in range(2)]
            noise = tp_targets.gaussian_noise(11, 0.1, CHECK_BATCH, list(CHECK_DIMS[1:-1]), dtype=dtype, device=device)
            low = torch_tp.feedback_grads(weights, biases, CHECK_ACTS, qs, cs, CHECK_ACTS, x, noise)
        high = reference.feedback_grads(as64(weights), as64(biases), CHECK_ACTS, as64(qs), as64(cs), CHECK_ACTS,
                                        x.double(), as64(noise))
        for a, b in zip(runs[0].weight_grads, runs[1].weight_grads):
            assert torch.equal(a, b), "same seed, different feedback gradients"
        _compare(precision, runs[0], low, high, ["weight_grads", "bias_grads", "loss"])
    checks.append(("feedback-noise-seed", noise_check))

    def graph_check():
        """Replays equal eager launches bit for bit, also after the weights change in place."""
        with precision_mode(precision) as dtype:
            weights, biases, qs, cs, x, _labels, onehot = net(dtype)
            kwargs = dict(precisions=[1.0, 2.0, 0.5, 0.8], inference_steps=5, inference_lr=0.2, schedule="jacobi",
                          fpa=False, loss="mse")
            try:
                backend.clear_graphs()
                backend.CUDA_GRAPHS = True
                runs = [backend.pc_train_step(weights, biases, CHECK_ACTS, x, onehot, **kwargs) for _ in range(3)]
                dtp_runs = [backend.tp_train_step(weights, biases, CHECK_ACTS, qs, cs, CHECK_ACTS, x, onehot, beta=0.3,
                                                  loss="mse", difference=True) for _ in range(3)]
                with torch.no_grad():
                    for w in weights:
                        w.mul_(0.9)
                    x2 = x.flip(0).contiguous()  # a new input tensor: copied into the static buffer
                replay_after = backend.pc_train_step(weights, biases, CHECK_ACTS, x2, onehot, **kwargs)
                backend.CUDA_GRAPHS = False
                eager = backend.pc_train_step(weights, biases, CHECK_ACTS, x2, onehot, **kwargs)
            finally:
                backend.CUDA_GRAPHS = True
        for i, run in enumerate(runs[1:], 1):
            for (name, a), (_, b) in zip(_fields(run, pc_names), _fields(runs[0], pc_names)):
                assert torch.equal(a, b), f"pc call {i} (graph) differs from the eager call in {name}"
        for i, run in enumerate(dtp_runs[1:], 1):
            for (name, a), (_, b) in zip(_fields(run, tp_names), _fields(dtp_runs[0], tp_names)):
                assert torch.equal(a, b), f"dtp call {i} (graph) differs from the eager call in {name}"
        for (name, a), (_, b) in zip(_fields(replay_after, pc_names), _fields(eager, pc_names)):
            assert torch.equal(a, b), f"replay after an in-place weight update differs from eager in {name}"
    checks.append(("cuda-graph-replay", graph_check))
    return checks


def run_checks(precisions, device, budget) -> list[dict]:
    rows = []
    for precision in precisions:
        for name, check in _checks_for(precision, device):
            row = {"precision": precision, "check": name}
            if budget.left() < 30:
                rows.append(dict(row, status="skipped", detail="time budget"))
                continue
            start = time.perf_counter()
            try:
                with time_limit(min(60.0, budget.left())):
                    check()
                row.update(status="pass")
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                row.update(status="fail", detail=f"{type(exc).__name__}: {exc}"[:2000])
            row["seconds"] = round(time.perf_counter() - start, 2)
            print(f"  check {precision:<5} {name:<28} {row['status']:<5} {row['seconds']:.1f}s"
                  + (f"  {row.get('detail', '')[:300]}" if row["status"] != "pass" else ""), flush=True)
            rows.append(row)
    return rows


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


def markdown(machine: dict, checks: list[dict], rows: list[dict], peaks: dict) -> str:
    lines = [f"# GPU benchmark — {machine.get('gpu', 'no GPU')}", "",
             f"torch {machine['torch']}, triton {machine.get('triton')}, CUDA {machine.get('cuda')}", ""]
    if checks:
        passed = sum(c["status"] == "pass" for c in checks)
        lines += [f"Equivalence checks: {passed}/{len(checks)} pass", ""]
        lines += [f"- FAIL {c['precision']} {c['check']}: {c.get('detail', '')[:300]}" for c in checks if c["status"] == "fail"]
        lines.append("")
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
    parser.add_argument("--check-precisions", default="fp32,tf32,bf16")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (checks included)")
    parser.add_argument("--per-case", type=float, default=90.0, help="seconds one provider × case may take")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("PCFAST_BENCH_OUT", REPO / "benchmarks/results/gpu")))
    parser.add_argument("--self-check", action="store_true",
                        help="CPU: run the harness on the tiny case with the CPU providers (no checks)")
    args = parser.parse_args(argv)
    split = lambda s: [v for v in s.split(",") if v]
    args.cases, args.algos, args.providers = split(args.cases), split(args.algos), split(args.providers)
    args.precisions, args.check_precisions = split(args.precisions), split(args.check_precisions)
    for name, values, known in (("cases", args.cases, CASES), ("algos", args.algos, ALGOS),
                                ("providers", args.providers, PROVIDERS), ("precisions", args.precisions, PRECISIONS),
                                ("check-precisions", args.check_precisions, PRECISIONS)):
        unknown = [v for v in values if v not in known]
        if unknown:
            parser.error(f"--{name}: unknown {unknown}; expected some of {list(known)}")
    if args.self_check:
        args.cases, args.providers, args.precisions, args.skip_checks = ["tiny"], ["reference", "torch"], ["fp32"], True
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
    checks: list[dict] = []
    if not args.skip_checks:
        print("equivalence checks on CUDA:", flush=True)
        checks = run_checks(args.check_precisions, device, budget)
    print("timings:", flush=True)
    rows, peaks = run_timings([CASES[c] for c in args.cases], args.algos, args.providers, args.precisions, device,
                              budget, args.per_case)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_gpu_selfcheck" if args.self_check else "bench_gpu"
    report = {"machine": machine, "flop_models": {"pc": "(4T+2)·Σ B·d_l·d_{l-1}",
                                                  "dtp": "2B·(2Σ d_l·d_{l-1} + 2Σ_{l≥2} d_l·d_{l-1})"},
              "checks": checks, "matmul_peak": peaks, "results": rows,
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    text = markdown(machine, checks, rows, peaks)
    (args.out / f"{stem}.md").write_text(text)
    print("\n" + text)
    print(f"wrote {args.out / (stem + '.json')} and {stem}.md", flush=True)
    failed = [c for c in checks if c["status"] == "fail"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
