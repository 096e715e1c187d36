#!/usr/bin/env python3
"""Run one peer case with pcfast itself, so that it sits in the same table as the peers.

Runs with the MAIN python3 (pcfast importable from the repository root, which is put on sys.path):
    python3 benchmarks/peers/run_pcfast.py CASE.npz [--repeats 20] [--warmup 5] [--threads 2] [--backend auto]

CASE.npz comes from make_case.py. Prints one JSON object to stdout, same shape as run_pcx.py /
run_pydeepity.py (peer = "pcfast-<backend>").

What is computed (pcfast's own definition, the one make_case.py's float64 reference implements):
  * energy_after_T: pcfast.functional.pc_train_step(weights, biases, ["tanh"]*(L-1), x, y,
    inference_steps=T, inference_lr=kappa, schedule="jacobi", loss="mse", backend=...).energy
    = F at z_T, SUMMED over the batch (PCResult docstring; make_case.py uses the same sum).
  * one train step = that pc_train_step call + plain SGD  W -= lr * dF/dW, b -= lr * dF/db
    (weight_grads / bias_grads are batch-mean gradients, as in make_case.py); checked once against
    the reference parameters (weight_update_rel_err, same metric as the peers).
  * timing: warmup untimed steps, then repeats timed steps (time.perf_counter around step + update);
    weights keep evolving under SGD, as for the peers.
Threads: same as the peer runners (affinity to the first N CPUs, OMP/OPENBLAS/MKL_NUM_THREADS=N before
torch is imported), plus torch.set_num_threads(N) and torch.set_num_interop_threads(1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _set_threads(n: int) -> None:
    # Same as run_pcx.py / run_pydeepity.py.
    try:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cpus[:n])
    except (AttributeError, OSError):
        pass
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def main(argv=None):
    p = argparse.ArgumentParser(description="pcfast runner for the peer comparison")
    p.add_argument("case")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cpp", "reference"])
    a = p.parse_args(argv)
    _set_threads(a.threads)  # before torch (OpenMP) is loaded

    sys.path.insert(0, ROOT)
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass

    import pcfast
    import pcfast.ops as ops
    from pcfast.functional import pc_train_step

    if a.backend == "cpp" and not ops.is_available("cpp"):
        print(json.dumps({"peer": "pcfast-cpp", "error": "cpp backend not available (pcfast._C not built)"}))
        return 2
    resolved = ops.get_backend(a.backend, "pc", torch.device("cpu")).name

    c = np.load(a.case)
    L = sum(1 for k in c.files if k.startswith("W"))
    W0 = [np.asarray(c[f"W{l}"], dtype=np.float32) for l in range(1, L + 1)]
    b0 = [np.asarray(c[f"b{l}"], dtype=np.float32) for l in range(1, L + 1)]
    x = torch.from_numpy(np.ascontiguousarray(c["x"], dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(c["y"], dtype=np.float32))
    T, kappa, lr = int(c["T"]), float(c["kappa"]), float(c["lr"])
    B = int(x.shape[0])
    sizes = [W0[0].shape[1]] + [W.shape[0] for W in W0]
    acts = ["tanh"] * (L - 1)

    def fresh():
        return ([torch.from_numpy(W.copy()) for W in W0], [torch.from_numpy(b.copy()) for b in b0])

    def step(Ws, bs):
        r = pc_train_step(Ws, bs, acts, x, y, inference_steps=T, inference_lr=kappa,
                          schedule="jacobi", loss="mse", backend=a.backend)
        for W, g in zip(Ws, r.weight_grads):
            W.sub_(g, alpha=lr)
        for b, g in zip(bs, r.bias_grads):
            b.sub_(g, alpha=lr)
        return r

    with torch.inference_mode():
        # 1) energy after T from the given weights, and 2) the one-step update check
        Ws, bs = fresh()
        r = step(Ws, bs)
        e_T = float(r.energy)
        assert r.energy.dtype == torch.float32, r.energy.dtype
        upd = []
        for i in range(L):
            ref_W, ref_b = c[f"ref_W{i + 1}"], c[f"ref_b{i + 1}"]
            dW = np.abs(Ws[i].numpy().astype(np.float64) - ref_W).max()
            db = np.abs(bs[i].numpy().astype(np.float64) - ref_b).max()
            upd.append(max(dW / max(np.abs(ref_W - W0[i]).max(), 1e-30),
                           db / max(np.abs(ref_b - b0[i]).max(), 1e-30)))

        # 3) timing
        Ws, bs = fresh()
        for _ in range(a.warmup):
            step(Ws, bs)
        ts = []
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            step(Ws, bs)
            ts.append((time.perf_counter() - t0) * 1e3)
        cpu_util = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    q = np.percentile(ts, [25, 50, 75])

    ref = float(c["ref_energy_after_T"])
    out = {
        "peer": f"pcfast-{a.backend}",
        "version": f"{pcfast.__version__}+torch{torch.__version__}",
        "backend_resolved": resolved,
        "energy_after_T": e_T,
        "ref_energy_after_T": ref,
        "energy_rel_diff": abs(e_T - ref) / abs(ref),
        "weight_update_rel_err": float(max(upd)),
        "ms_per_step_median": float(q[1]),
        "ms_q25": float(q[0]),
        "ms_q75": float(q[2]),
        "sizes": sizes,
        "batch": B,
        "T": T,
        "kappa": kappa,
        "lr": lr,
        "cpu_seconds_per_wall_second": round(cpu_util, 2),
        "loadavg_1m_after": round(os.getloadavg()[0], 2),
        "threads": {
            "affinity": sorted(os.sched_getaffinity(0)),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
            "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"],
            "torch_num_threads": torch.get_num_threads(),
        },
        "repeats": a.repeats,
        "warmup": a.warmup,
        "notes": (
            f"pcfast.functional.pc_train_step(backend={a.backend!r} -> {resolved}), tanh hidden layers, "
            "Jacobi, MSE, energy summed over the batch; step = pc_train_step + in-place SGD on weights "
            "and biases (batch-mean grads); float32; CPU; torch.inference_mode."
        ),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
