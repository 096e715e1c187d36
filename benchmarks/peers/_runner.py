"""What the peer runners (run_pcfast.py, run_pcx.py, run_pydeepity.py) share: their command line, the
thread settings, the case file, the checked weight update, the timing loop and the JSON report.

Each runner runs in its own virtualenv, so this module uses numpy and the standard library only; the
runners import it from their own folder (Python puts a script's folder first on ``sys.path``). numpy
is imported inside the functions, never at import: its BLAS must load after ``set_threads``.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass


def parse_args(description: str, argv=None, *, backends: list[str] | None = None) -> argparse.Namespace:
    """``CASE.npz [--repeats 20] [--warmup 5] [--threads 2]`` (and ``--backend`` when ``backends``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("case")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    if backends:
        p.add_argument("--backend", default=backends[0], choices=backends)
    return p.parse_args(argv)


def set_threads(n: int, *, xla: bool = False) -> None:
    """Pin the process to the first n CPUs — the one limit every runtime honours (XLA sizes its thread
    pool from the affinity mask) — and tell OpenMP/OpenBLAS/MKL through their variables; ``xla``: XLA's
    flags too, and the CPU platform. Call before the library is imported."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cpus[:n])
    except (AttributeError, OSError):
        pass
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    if xla:
        flags = os.environ.get("XLA_FLAGS", "")
        flags += f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={n}"
        os.environ["XLA_FLAGS"] = flags.strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


@dataclass(frozen=True)
class Case:
    """A case written by make_case.py: float32 (out, in) weights, biases, batch x and one-hot y, the
    settings, and the float64 reference (``npz``: the file itself)."""

    npz: object
    weights: list
    biases: list
    x: object  # float32 numpy arrays
    y: object
    T: int
    kappa: float
    lr: float

    @property
    def depth(self) -> int:
        return len(self.weights)

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])

    @property
    def sizes(self) -> list[int]:
        return [self.weights[0].shape[1]] + [w.shape[0] for w in self.weights]

    @property
    def ref_energy(self) -> float:
        return float(self.npz["ref_energy_after_T"])


def load_case(path: str) -> Case:
    import numpy as np

    c = np.load(path)
    depth = sum(1 for k in c.files if k.startswith("W"))
    as32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)
    return Case(c, [as32(c[f"W{l}"]) for l in range(1, depth + 1)], [as32(c[f"b{l}"]) for l in range(1, depth + 1)],
                as32(c["x"]), as32(c["y"]), int(c["T"]), float(c["kappa"]), float(c["lr"]))


def update_error(case: Case, weights, biases) -> float:
    """max over layers of |W − W_ref| / |W_ref − W_0| (and the same for b): the error of one train
    step's update relative to its size, against the reference parameters after that step."""
    import numpy as np

    errors = []
    for i in range(case.depth):
        ref_w, ref_b = case.npz[f"ref_W{i + 1}"], case.npz[f"ref_b{i + 1}"]
        dw = np.abs(np.asarray(weights[i], dtype=np.float64) - ref_w).max()
        db = np.abs(np.asarray(biases[i], dtype=np.float64) - ref_b).max()
        errors.append(max(dw / max(np.abs(ref_w - case.weights[i]).max(), 1e-30),
                          db / max(np.abs(ref_b - case.biases[i]).max(), 1e-30)))
    return float(max(errors))


@dataclass(frozen=True)
class Timing:
    """Quartiles of the timed steps (ms) and the CPU seconds used per wall second while timing."""

    q25: float
    median: float
    q75: float
    cpu_util: float


def time_steps(step, warmup: int, repeats: int) -> Timing:
    """``warmup`` untimed calls of ``step``, then ``repeats`` calls timed one by one with perf_counter
    (``step`` waits for its own results)."""
    import numpy as np

    for _ in range(warmup):
        step()
    times = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    cpu_util = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    q = np.percentile(times, [25, 50, 75])
    return Timing(float(q[0]), float(q[1]), float(q[2]), cpu_util)


def report(head: dict, case: Case, energy: float, update_err: float, timing: Timing, args: argparse.Namespace, *,
           threads: dict, notes: str, energies: dict | None = None, timings: dict | None = None) -> dict:
    """The runner's JSON object: ``head`` (peer, version …), the energy after T against the reference
    (``energies``: more energies after it), the update error, the timing (``timings``: more after it),
    the case's settings, the load, the thread settings (affinity and OMP_WAIT_POLICY, then
    ``threads``), repeats, warmup and ``notes``."""
    ref = case.ref_energy
    return {
        **head,
        "energy_after_T": energy,
        **(energies or {}),
        "ref_energy_after_T": ref,
        "energy_rel_diff": abs(energy - ref) / abs(ref),
        "weight_update_rel_err": update_err,
        "ms_per_step_median": timing.median,
        "ms_q25": timing.q25,
        "ms_q75": timing.q75,
        **(timings or {}),
        "sizes": case.sizes,
        "batch": case.batch,
        "T": case.T,
        "kappa": case.kappa,
        "lr": case.lr,
        "cpu_seconds_per_wall_second": round(timing.cpu_util, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "threads": {
            "affinity": sorted(os.sched_getaffinity(0)),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
            **threads,
        },
        "repeats": args.repeats,
        "warmup": args.warmup,
        "notes": notes,
    }
