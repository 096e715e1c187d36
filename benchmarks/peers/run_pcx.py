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
block_until_ready on the step's outputs. Arguments, threads, case, update check, timing and the JSON
report are shared with the other runners (_runner.py).
"""

from __future__ import annotations

import json
import os
import sys

from _runner import load_case, parse_args, report, set_threads, time_steps, update_error


def main(argv=None):
    a = parse_args("pcx peer runner", argv)
    set_threads(a.threads, xla=True)  # before jax is imported

    from importlib.metadata import version

    import jax
    import jax.numpy as jnp
    import optax
    import pcx
    import pcx.functional as pxf
    import pcx.nn as pxnn
    import pcx.predictive_coding as pxc
    import pcx.utils as pxu

    case = load_case(a.case)
    x, y = jnp.asarray(case.x), jnp.asarray(case.y)
    T, kappa, lr, B, sizes = case.T, case.kappa, case.lr, case.batch, case.sizes

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
            lay.nn.weight.set(jnp.asarray(case.weights[i]))
            lay.nn.bias.set(jnp.asarray(case.biases[i]))

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
    upd = update_error(case, [lay.nn.weight.get() for lay in model.layers], [lay.nn.bias.get() for lay in model.layers])

    # 3) timing: compile excluded (the call above compiled train_step), warmup, then repeats
    load_params()

    def step():
        e = train_step(T, x, y, model=model, optim_h=optim_h, optim_w=optim_w)
        jax.block_until_ready((e, model.layers[0].nn.weight.get()))

    timing = time_steps(step, a.warmup, a.repeats)

    head = {"peer": "pcx", "version": version("pcx"), "jax_version": jax.__version__}
    threads = {"XLA_FLAGS": os.environ["XLA_FLAGS"], "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"],
               "devices": [str(d) for d in jax.devices()]}
    notes = (
        "custom pcx EnergyModule: vode(Linear(tanh(h_prev))) so latents are PRE-activation (pcfast); "
        "pcx examples use vode(act(Linear(x))) = post-activation latents. se_energy, energy psum'ed over "
        "the batch (examples use pmean); forward init via STATUS.INIT; Jacobi h -= kappa*dF/dh with "
        "optax.sgd(kappa); weights: optax.sgd(lr) with scale_by=1/B (batch-mean grad) at the final "
        "state; T unrolled in one pxf.jit; float32; CPU."
    )
    print(json.dumps(report(head, case, e_T, upd, timing, a, threads=threads, notes=notes,
                            energies={"energy_after_T_from_train_step": e_T2})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
