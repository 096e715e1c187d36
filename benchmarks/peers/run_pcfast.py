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
torch is imported), plus torch.set_num_threads(N) and torch.set_num_interop_threads(1). What the three
runners share (arguments, threads, case, update check, timing, JSON report) is _runner.py.
"""

from __future__ import annotations

import json
import os
import sys

from _runner import load_case, parse_args, report, set_threads, time_steps, update_error

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    a = parse_args("pcfast runner for the peer comparison", argv, backends=["auto", "torch", "cpp", "reference"])
    set_threads(a.threads)  # before torch (OpenMP) is loaded

    sys.path.insert(0, ROOT)
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

    case = load_case(a.case)
    x, y = torch.from_numpy(case.x), torch.from_numpy(case.y)
    acts = ["tanh"] * (case.depth - 1)

    def fresh():
        return [torch.from_numpy(W.copy()) for W in case.weights], [torch.from_numpy(b.copy()) for b in case.biases]

    def step(Ws, bs):
        r = pc_train_step(Ws, bs, acts, x, y, inference_steps=case.T, inference_lr=case.kappa,
                          schedule="jacobi", loss="mse", backend=a.backend)
        for W, g in zip(Ws, r.weight_grads):
            W.sub_(g, alpha=case.lr)
        for b, g in zip(bs, r.bias_grads):
            b.sub_(g, alpha=case.lr)
        return r

    with torch.inference_mode():
        # 1) energy after T from the given weights, and 2) the one-step update check
        Ws, bs = fresh()
        r = step(Ws, bs)
        e_T = float(r.energy)
        assert r.energy.dtype == torch.float32, r.energy.dtype
        upd = update_error(case, [W.numpy() for W in Ws], [b.numpy() for b in bs])

        # 3) timing
        Ws, bs = fresh()
        timing = time_steps(lambda: step(Ws, bs), a.warmup, a.repeats)

    head = {"peer": f"pcfast-{a.backend}", "version": f"{pcfast.__version__}+torch{torch.__version__}",
            "backend_resolved": resolved}
    threads = {"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"], "torch_num_threads": torch.get_num_threads()}
    notes = (
        f"pcfast.functional.pc_train_step(backend={a.backend!r} -> {resolved}), tanh hidden layers, "
        "Jacobi, MSE, energy summed over the batch; step = pc_train_step + in-place SGD on weights "
        "and biases (batch-mean grads); float32; CPU; torch.inference_mode."
    )
    print(json.dumps(report(head, case, e_T, upd, timing, a, threads=threads, notes=notes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
