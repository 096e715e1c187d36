#!/usr/bin/env python3
"""Run one peer case with pcx (JAX predictive-coding library).

Runs INSIDE .peers/pcx (see setup_envs.sh):
    .peers/pcx/bin/python benchmarks/peers/run_pcx.py CASE.npz [--repeats 20] [--warmup 5] [--threads 2]

CASE.npz comes from make_case.py. Prints one JSON object to stdout.

pcx is a toolkit, not a fixed network: the user writes the model with `pxnn.Linear` layers and `pxc.Vode`
value nodes and drives inference / learning with optax optimisers. Mapping onto pcfast (checked numerically
against make_case.py's float64 reference, see README.md):
  * pxnn.Linear wraps equinox.nn.Linear: weight (out, in), per-sample  W @ x + b  (vmapped over the batch,
    so  x W^T + b  on a batch) -> the npz arrays load as they are.
  * A Vode stores u (the incoming prediction) and h (its value); se_energy = 1/2 (h - u)^2 summed over the
    node.  The pcx examples write  x = vode(act(layer(x)))  -> latents in POST-activation space.  To match
    pcfast (pre-activation latents) we instead write
        h1 = vode1(L1(x));  h_l = vode_l(L_l(tanh(h_{l-1})));  out = vode_L(L_L(tanh(h_{L-1})))
    and clamp the output vode's h to y (frozen), so its energy is 1/2 ||y - f||^2 = pcfast's MSE term.
  * Energy: model.energy() per sample (vmapped) and jax.lax.psum over the batch axis -> SUMMED over the
    batch, same as pcfast's F.  (The pcx MLP examples use pmean, which divides every activity gradient by B.)
  * Forward init: STATUS.INIT ruleset "h, u <- u".
  * Inference: value_and_grad of the summed energy w.r.t. all non-frozen VodeParams, then
    Optim(optax.sgd(kappa)).step -> h <- h - kappa dF/dh for all layers at once: Jacobi.
  * Learning: value_and_grad of the same summed energy w.r.t. LayerParams at the final state (weights and
    biases), Optim(optax.sgd(lr)).step(..., scale_by=1/B) -> plain SGD on the batch-MEAN gradient (pcfast).
  * T is a static Python loop inside one pxf.jit (unrolled), like the pcx examples.
Threads: XLA CPU runtime; XLA_FLAGS gets "--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads=N"
(and OMP/OPENBLAS vars are set for completeness).  Timing excludes compilation (warmup) and uses
block_until_ready on the step's outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _set_threads(n: int) -> None:
    # Pin the process to the first n CPUs: the one limit every runtime honours (XLA sizes its
    # thread pool from the affinity mask; OpenMP/OpenBLAS are also told through env vars).
    try:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cpus[:n])
    except (AttributeError, OSError):
        pass
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    flags = os.environ.get("XLA_FLAGS", "")
    flags += f" --xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={n}"
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv=None):
    p = argparse.ArgumentParser(description="pcx peer runner")
    p.add_argument("case")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    _set_threads(a.threads)  # before jax is imported

    from importlib.metadata import version

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import pcx
    import pcx.functional as pxf
    import pcx.nn as pxnn
    import pcx.predictive_coding as pxc
    import pcx.utils as pxu

    c = np.load(a.case)
    L = sum(1 for k in c.files if k.startswith("W"))
    Ws = [np.asarray(c[f"W{l}"], dtype=np.float32) for l in range(1, L + 1)]
    bs = [np.asarray(c[f"b{l}"], dtype=np.float32) for l in range(1, L + 1)]
    x = jnp.asarray(c["x"], dtype=jnp.float32)
    y = jnp.asarray(c["y"], dtype=jnp.float32)
    T, kappa, lr = int(c["T"]), float(c["kappa"]), float(c["lr"])
    B = int(x.shape[0])
    sizes = [Ws[0].shape[1]] + [W.shape[0] for W in Ws]

    class PCMLP(pxc.EnergyModule):
        def __init__(self, sizes, act_fn):
            super().__init__()
            self.act_fn = pcx.static(act_fn)
            self.layers = [
                pxnn.Linear(sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1)
            ]
            self.vodes = [
                pxc.Vode() for _ in range(len(sizes) - 1)
            ]  # se_energy everywhere
            self.vodes[-1].h.frozen = True  # output node is clamped to y

        def __call__(self, x, y=None):
            h = self.vodes[0](self.layers[0](x))  # z_1 ~ W1 x + b1   (phi(z_0) := x)
            for v, l in zip(self.vodes[1:], self.layers[1:]):
                h = v(
                    l(self.act_fn(h))
                )  # z_l ~ W_l tanh(z_{l-1}) + b_l  (pre-activation latents)
            if y is not None:
                self.vodes[-1].set("h", y)
            return self.vodes[-1].get("u")

    vmask = pxu.M(pxc.VodeParam | pxc.VodeParam.Cache).to((None, 0))

    @pxf.vmap(vmask, in_axes=(0, 0), out_axes=0)
    def forward(x, y, *, model):
        return model(x, y)

    @pxf.vmap(vmask, in_axes=(0,), out_axes=(None, 0), axis_name="batch")
    def energy(x, *, model):
        y_ = model(x, None)
        return jax.lax.psum(model.energy(), "batch"), y_  # summed over the batch

    h_mask = pxu.M(pxc.VodeParam).hasnot(frozen=True).to([False, True])
    w_mask = pxu.M(pxnn.LayerParam).to([False, True])

    def settle(T, x, y, model, optim_h):
        with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
            forward(x, y, model=model)  # forward initialisation, output clamped to y
        optim_h.init(
            pxu.M(pxc.VodeParam).hasnot(frozen=True)(model)
        )  # output h is clamped
        for _ in range(T):  # Jacobi steps
            with pxu.step(model, clear_params=pxc.VodeParam.Cache):
                _, g = pxf.value_and_grad(h_mask, has_aux=True)(energy)(x, model=model)
            optim_h.step(model, g["model"])
        optim_h.clear()

    @pxf.jit(static_argnums=0)
    def energy_after_T(T, x, y, *, model, optim_h):
        settle(T, x, y, model, optim_h)
        with pxu.step(model, clear_params=pxc.VodeParam.Cache):
            (e, _), _ = pxf.value_and_grad(w_mask, has_aux=True)(energy)(x, model=model)
        return e

    @pxf.jit(static_argnums=0)
    def train_step(T, x, y, *, model, optim_h, optim_w):
        settle(T, x, y, model, optim_h)
        with pxu.step(model, clear_params=pxc.VodeParam.Cache):
            (e, _), g = pxf.value_and_grad(w_mask, has_aux=True)(energy)(x, model=model)
        optim_w.step(
            model, g["model"], scale_by=1.0 / B
        )  # batch-mean gradient, plain SGD
        return e

    model = PCMLP(sizes, jax.nn.tanh)

    def load_params():
        for i, lay in enumerate(model.layers):
            lay.nn.weight.set(jnp.asarray(Ws[i]))
            lay.nn.bias.set(jnp.asarray(bs[i]))

    load_params()
    with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
        forward(x, y, model=model)  # materialise vode shapes before building optimisers
    optim_h = pxu.Optim(lambda: optax.sgd(kappa))
    optim_w = pxu.Optim(lambda: optax.sgd(lr), pxu.M(pxnn.LayerParam)(model))

    # 1) energy after T from the given weights (no update)
    e_T = float(
        jax.block_until_ready(energy_after_T(T, x, y, model=model, optim_h=optim_h))
    )

    # 2) one train step from the given weights: returned energy is pre-update; check the update
    e_T2 = float(
        jax.block_until_ready(
            train_step(T, x, y, model=model, optim_h=optim_h, optim_w=optim_w)
        )
    )
    upd = []
    for i, lay in enumerate(model.layers):
        ref_W, ref_b = c[f"ref_W{i + 1}"], c[f"ref_b{i + 1}"]
        dW = np.abs(np.asarray(lay.nn.weight.get(), dtype=np.float64) - ref_W).max()
        db = np.abs(np.asarray(lay.nn.bias.get(), dtype=np.float64) - ref_b).max()
        upd.append(
            max(
                dW / max(np.abs(ref_W - Ws[i]).max(), 1e-30),
                db / max(np.abs(ref_b - bs[i]).max(), 1e-30),
            )
        )

    # 3) timing: compile excluded (the call above compiled train_step), warmup, then repeats
    load_params()
    for _ in range(a.warmup):
        jax.block_until_ready(
            train_step(T, x, y, model=model, optim_h=optim_h, optim_w=optim_w)
        )
    ts = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        e = train_step(T, x, y, model=model, optim_h=optim_h, optim_w=optim_w)
        jax.block_until_ready((e, model.layers[0].nn.weight.get()))
        ts.append((time.perf_counter() - t0) * 1e3)
    cpu_util = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    q = np.percentile(ts, [25, 50, 75])

    ref = float(c["ref_energy_after_T"])
    out = {
        "peer": "pcx",
        "version": version("pcx"),
        "jax_version": jax.__version__,
        "energy_after_T": e_T,
        "energy_after_T_from_train_step": e_T2,
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
            "XLA_FLAGS": os.environ["XLA_FLAGS"],
            "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"],
            "devices": [str(d) for d in jax.devices()],
        },
        "repeats": a.repeats,
        "warmup": a.warmup,
        "notes": (
            "custom pcx EnergyModule: vode(Linear(tanh(h_prev))) so latents are PRE-activation (pcfast); "
            "pcx examples use vode(act(Linear(x))) = post-activation latents. se_energy, energy psum'ed over "
            "the batch (examples use pmean); forward init via STATUS.INIT; Jacobi h -= kappa*dF/dh with "
            "optax.sgd(kappa); weights: optax.sgd(lr) with scale_by=1/B (batch-mean grad) at the final "
            "state; T unrolled in one pxf.jit; float32; CPU."
        ),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
