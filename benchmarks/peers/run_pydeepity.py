#!/usr/bin/env python3
"""Run one peer case with pydeepity (C++ PC engine, `import deepity`, class SimplePCN).

Runs INSIDE .peers/pydeepity (see setup_envs.sh):
    .peers/pydeepity/bin/python benchmarks/peers/run_pydeepity.py CASE.npz [--repeats 20] [--warmup 5] [--threads 2]

CASE.npz comes from make_case.py. Prints one JSON object to stdout.

Mapping onto pcfast (verified numerically against make_case.py's float64 reference, see README.md):
  * deepity's SimplePCLayer k holds beliefs z_k (B, d_k), weights W (d_{k+1}, d_k) = (out, in), row-major,
    bias b (d_{k+1},), and predicts the layer above as  mu_k = act_k(z_k) W^T + b.  The activation is applied
    to the layer's OWN beliefs (the presynaptic side), so beliefs live in pre-activation space exactly like
    pcfast's z_l.  SimplePCN attaches the Activation that FOLLOWS a Linear(in, out) to the layer of size `in`.
    Hence pcfast's  x -> W1 -> tanh -> W2 -> tanh -> W3  is declared as
        Linear(784,H), Linear(H,H), TanH(), Linear(H,10), TanH()
    (layer0 = input, identity; layer1/layer2 = tanh; terminal layer = clamped to y).  The "natural-looking"
    Linear, TanH, Linear, TanH, Linear instead computes tanh(x) W1^T in layer 0 and a linear read-out.
  * Energy: 1/2 sum (z_k - mu_{k-1})^2 over all units AND the batch (no precision, no averaging);
    the clamped terminal layer makes the output term 1/2 ||y - phi(z_{L-1}) W_L^T - b_L||^2.  Same as pcfast.
  * Inference: calculate_state() computes every error and every mu from the current beliefs, then
    update_state() moves every unclamped layer by  z += ir * (phi'(z) * (e_above W) - e)  -> Jacobi, kappa = ir.
  * project_forward() = pcfast's forward initialisation.
  * update_weights() with optimizer "SGD" and lmbda = 0 (lmbda > 0 multiplies W by (1 - lmbda) first):
        W += lr/B * e_above^T act(z),  b += lr/B * sum_b e_above
    i.e. plain SGD on the batch-MEAN gradient, using the errors and act(z) cached by the LAST calculate_state().
  * The library's own loops differ from pcfast and are NOT used for the comparison:
      - SimplePCN.train_step: zero init (no forward init), returns the SUM of the energies of steps 0..T-1,
        and updates weights with the errors of state T-1 (no calculate_state after the last update_state);
      - C++ train_step_with_projection: forward init, but weight update also uses state T-1's errors and the
        returned energy is computed AFTER the weight update.
    We therefore compose the primitives: reset_state, clamp_input, clamp_state(y), project_forward,
    T x (calculate_state(False), update_state), calculate_state(True) [= energy at z_T, also refreshes errors],
    update_weights.  train_step_with_projection is timed as well ("native") for reference; it does the
    same arithmetic work.
Threads: OMP_NUM_THREADS / OPENBLAS_NUM_THREADS (the wheel bundles OpenMP OpenBLAS + libgomp).
Arguments, threads, case, update check, timing and the JSON report are shared with the other runners
(_runner.py).
"""

from __future__ import annotations

import json
import os
import sys

from _runner import load_case, parse_args, report, set_threads, time_steps, update_error


def main(argv=None):
    a = parse_args("pydeepity peer runner", argv)
    set_threads(a.threads)  # before the C++ extension (OpenMP/OpenBLAS) is loaded

    import deepity as dy

    case = load_case(a.case)
    x, y = case.x, case.y
    T, kappa, lr, B, sizes, L = case.T, case.kappa, case.lr, case.batch, case.sizes, case.depth

    # Architecture: identity on the input layer, tanh on every hidden layer (see module docstring).
    arch = [dy.Linear(sizes[0], sizes[1])]
    for l in range(1, L):
        arch += [dy.Linear(sizes[l], sizes[l + 1]), dy.TanH()]
    net = dy.SimplePCN(*arch, batch_size=B, device="cpu")
    net.configure(
        learning_rate=lr, inference_rate=kappa, lmbda=0.0, optimizer="SGD", seed=0
    )

    def load_params():
        for i in range(L):
            net.layers[i].set_weights(case.weights[i])
            net.layers[i].set_biases(case.biases[i])

    xf, yf = x.ravel(), y.ravel()

    def settle():
        net.reset_state()
        net.clamp_input(xf)
        net[-1].clamp_state(yf)
        net.project_forward()
        for _ in range(T):
            net.calculate_state(False)
            net.update_state()
        return net.calculate_state(
            True
        )  # energy at z_T; refreshes errors / act(z) for update_weights

    def train_step():
        E = settle()
        net.update_weights()
        net[-1].unclamp_state()
        return E

    def native_step():
        return net.train_step_with_projection(xf, yf, T, False)

    # 1) energy after T from the given weights, then one update to check the weight step.
    load_params()
    energy = float(settle())
    net.update_weights()
    net[-1].unclamp_state()
    upd = update_error(case, [net.layers[i].weights for i in range(L)], [net.layers[i].biases for i in range(L)])

    # 2) timings (weights evolve under SGD across repeats, as in training).
    def bench(fn):
        load_params()
        return time_steps(fn, a.warmup, a.repeats)

    timing = bench(train_step)
    native = bench(native_step)

    head = {"peer": "pydeepity", "version": dy.__version__}
    native_timings = {"native_train_step_with_projection_ms_median": native.median, "native_ms_q25": native.q25,
                      "native_ms_q75": native.q75}
    threads = {"OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"], "omp_max_threads": int(dy.omp_max_threads())}
    notes = (
        "SimplePCN(Linear(d0,d1), [Linear(dl,dl+1), TanH()]*) on CPU, SGD, lmbda=0, ir=kappa: "
        "tanh applied to each layer's own beliefs before W (pre-activation latents = pcfast). "
        "Energy 1/2*sum of squared errors summed over batch; Jacobi; project_forward = forward init; "
        "weight step = batch-mean gradient at the final state. Timed step composes the primitives "
        "(reset/clamp/project_forward/T x(calculate_state,update_state)/calculate_state/update_weights) "
        "because the library's own train_step loops update weights from state T-1; "
        "native_* = C++ train_step_with_projection (same work, state-(T-1) weight update)."
    )
    print(json.dumps(report(head, case, energy, upd, timing, a, threads=threads, notes=notes,
                            timings=native_timings)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
