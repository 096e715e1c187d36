#!/usr/bin/env python3
"""Write one peer-benchmark case as an .npz, plus a float64 numpy reference.

Runs with the main python3 and needs only numpy.

The case holds (all float32 unless noted):
    W1..WL   (out, in) weights            b1..bL   (out,) biases
    x        (B, d_0) inputs in [0, 1)     y        (B, d_L) one-hot targets
    T (int), kappa, lr                     scalars
and the reference, computed here in float64 with pcfast's definition
(DESIGN.md §3: latents in pre-activation space, phi(z_0) := x, forward
initialisation z_l = u_l, Jacobi schedule, gamma = 1, MSE output):
    ref_energy_init       F at the forward-initialised state (= 1/2 ||y - f(x)||^2 summed over the batch)
    ref_energy_after_T    F after T Jacobi steps  z_l <- z_l - kappa dF/dz_l
    ref_W1..ref_WL, ref_b1..ref_bL   parameters after ONE plain-SGD PC train step
                                      (T steps, then W_l -= lr * dF/dW_l with the batch-MEAN
                                      gradient  -eps_l^T phi(z_{l-1}) / B  at the final state)

F(z) = sum_{l<L} 1/2 ||z_l - phi(z_{l-1}) W_l^T - b_l||^2 + 1/2 ||y - phi(z_{L-1}) W_L^T - b_L||^2,
summed over the batch.

Usage:
    python3 benchmarks/peers/make_case.py --sizes 784,128,128,10 --batch 32 --T 20 \
        --seed 0 --kappa 0.1 --lr 0.01 --out /tmp/case_small.npz
Prints a JSON summary (including the reference energies) to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def phi(a):
    return np.tanh(a)


def dphi(a):
    t = np.tanh(a)
    return 1.0 - t * t


def pc_reference(Ws, bs, x, y, T, kappa, lr):
    """float64 reference of pcfast's PC train step. Returns (E0, E_T, new_Ws, new_bs)."""
    Ws = [np.asarray(W, np.float64) for W in Ws]
    bs = [np.asarray(b, np.float64) for b in bs]
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    L = len(Ws)
    B = x.shape[0]

    def act(l, z):  # phi(z_l), with phi(z_0) := x
        return x if l == 0 else phi(z[l])

    def errors(z):
        # eps_l = z_l - phi(z_{l-1}) W_l^T - b_l  for l < L ;  eps_L = y - f
        eps = [None] * (L + 1)
        for l in range(1, L):
            eps[l] = z[l] - act(l - 1, z) @ Ws[l - 1].T - bs[l - 1]
        eps[L] = y - (act(L - 1, z) @ Ws[L - 1].T + bs[L - 1])
        return eps

    def energy(eps):
        return 0.5 * sum(float(np.sum(e * e)) for e in eps[1:])

    # forward initialisation: z_l = u_l
    z = [None] * L
    for l in range(1, L):
        z[l] = act(l - 1, z) @ Ws[l - 1].T + bs[l - 1]
    E0 = energy(errors(z))

    for _ in range(T):  # Jacobi: all layers from the same state
        eps = errors(z)
        znew = list(z)
        for l in range(1, L):
            grad = eps[l] - dphi(z[l]) * (eps[l + 1] @ Ws[l])
            znew[l] = z[l] - kappa * grad
        z = znew
    eps = errors(z)
    ET = energy(eps)

    new_Ws, new_bs = [], []
    for l in range(1, L + 1):
        gW = -(eps[l].T @ act(l - 1, z)) / B  # dF/dW_l, batch mean
        gb = -eps[l].sum(axis=0) / B
        new_Ws.append(Ws[l - 1] - lr * gW)
        new_bs.append(bs[l - 1] - lr * gb)
    return E0, ET, new_Ws, new_bs


def make_case(sizes, batch, T, seed, kappa, lr):
    rng = np.random.default_rng(seed)
    L = len(sizes) - 1
    arrays = {}
    for l in range(1, L + 1):
        fan_in, fan_out = sizes[l - 1], sizes[l]
        arrays[f"W{l}"] = (
            rng.standard_normal((fan_out, fan_in)) / np.sqrt(fan_in)
        ).astype(np.float32)
        arrays[f"b{l}"] = (0.1 * rng.standard_normal(fan_out)).astype(np.float32)
    arrays["x"] = rng.random((batch, sizes[0])).astype(np.float32)
    labels = rng.integers(0, sizes[-1], size=batch)
    arrays["y"] = np.eye(sizes[-1], dtype=np.float32)[labels]
    arrays["T"] = np.array(T, dtype=np.int64)
    arrays["kappa"] = np.array(kappa, dtype=np.float64)
    arrays["lr"] = np.array(lr, dtype=np.float64)

    Ws = [arrays[f"W{l}"] for l in range(1, L + 1)]
    bs = [arrays[f"b{l}"] for l in range(1, L + 1)]
    E0, ET, nW, nb = pc_reference(Ws, bs, arrays["x"], arrays["y"], T, kappa, lr)
    arrays["ref_energy_init"] = np.array(E0)
    arrays["ref_energy_after_T"] = np.array(ET)
    for l in range(1, L + 1):
        arrays[f"ref_W{l}"] = nW[l - 1]
        arrays[f"ref_b{l}"] = nb[l - 1]
    return arrays


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--sizes",
        default="784,128,128,10",
        help="comma-separated layer widths d_0..d_L",
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--T", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kappa", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")]
    if len(sizes) < 3:
        p.error("need at least one hidden layer")
    arrays = make_case(sizes, a.batch, a.T, a.seed, a.kappa, a.lr)
    np.savez(a.out, **arrays)
    print(
        json.dumps(
            {
                "case": a.out,
                "sizes": sizes,
                "batch": a.batch,
                "T": a.T,
                "seed": a.seed,
                "kappa": a.kappa,
                "lr": a.lr,
                "ref_energy_init": float(arrays["ref_energy_init"]),
                "ref_energy_after_T": float(arrays["ref_energy_after_T"]),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
