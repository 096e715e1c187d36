#!/usr/bin/env python3
"""pcx on the CNN case of ``benchmarks/conv_step.py``: the same PC train step, checked, then timed.

Runs INSIDE .peers/pcx (see setup_envs.sh):
    .peers/pcx/bin/python benchmarks/peers/run_pcx_cnn.py CASE.npz [--threads 1] [--repeats 3] [--warmup 1]
    .peers/pcx/bin/python benchmarks/peers/run_pcx_cnn.py CASE.npz --threads 1 --serve

CASE.npz is written by ``benchmarks/conv_step.py`` (keys below). Without ``--serve`` it prints one JSON
object (the check, then ``--repeats`` timed steps). With ``--serve`` it prints the check as one JSON
line, then reads commands from stdin — a number n: time n steps and print ``{"times_ms": [...]}``;
``quit``: exit — so that the caller can interleave pcx with its own providers round by round.

The network (the case's ``channels`` C_0 … C_4, ``classes``): four blocks conv C_{i-1}→C_i, k3, p1,
bias, ReLU, max pool 2/2, then a linear readout C_4·(H/16)·(W/16) → classes, MSE output, as
pcfast's ``ConvLayer`` / ``LinearLayer`` with ``pool=("max", 2, 2)``. Mapping onto pcfast's definition
(the MLP runner's, ``run_pcx.py``, with conv layers):
  * ``pxnn.Conv2d`` wraps ``equinox.nn.Conv``: per sample (C, H, W), weight (out, in, k, k), a
    cross-correlation as torch's conv2d; bias (out, 1, 1) — the npz's (out,) bias is reshaped.
    ``pxnn.Linear``: weight (out, in) on the flattened (C, H, W) activity, torch's flatten order.
  * Latents in PRE-activation space, as pcfast: ``z_l = vode_l(conv_l(a_{l-1}))`` and
    ``a_l = maxpool(relu(z_l))``; pcx's own VGG-5 example puts the vode after the pooling instead
    (post-activation, post-pool latents), a different energy.
  * se_energy on every vode (½(h − u)² summed over the node), the output vode's h clamped to y →
    ½‖y − f‖² (pcfast's MSE, γ = 1); per-sample energies ``jax.lax.psum``-ed over the batch → F summed
    over the batch as pcfast's (pcx's examples use pmean).
  * Forward init (STATUS.INIT), T Jacobi steps h ← h − κ ∂F/∂h (``optax.sgd(κ)``), then the weight
    gradient at z_T and ``optax.sgd(lr)`` with ``scale_by=1/B`` (batch-mean gradient, plain SGD).
  * T is unrolled inside one ``pxf.jit``; compile and warm-up are excluded from the timing;
    ``jax.block_until_ready`` on the energy and a weight.
Case keys: W1..W5, b1..b5 (float32, torch layouts), x (B, C, H, W), y (B, classes) one-hot, channels,
T, kappa, lr, ref_energy_after_T (pcfast's F at its relaxed state, float64), ref_W*/ref_b* (the
parameters after one SGD step, float64).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from _runner import set_threads


def main(argv=None):
    p = argparse.ArgumentParser(description="pcx CNN runner")
    p.add_argument("case")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--serve", action="store_true")
    a = p.parse_args(argv)
    set_threads(a.threads, xla=True)  # before jax is imported

    from importlib.metadata import version

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import pcx.functional as pxf
    import pcx.nn as pxnn
    import pcx.predictive_coding as pxc
    import pcx.utils as pxu

    c = np.load(a.case)
    f32 = lambda v: jnp.asarray(np.ascontiguousarray(v, dtype=np.float32))
    channels = [int(v) for v in c["channels"]]
    depth = len(channels)  # 4 conv layers + the readout
    weights = [f32(c[f"W{l}"]) for l in range(1, depth + 1)]
    biases = [f32(c[f"b{l}"]) for l in range(1, depth + 1)]
    x, y = f32(c["x"]), f32(c["y"])
    T, kappa, lr, B = int(c["T"]), float(c["kappa"]), float(c["lr"]), int(c["x"].shape[0])

    class PCCNN(pxc.EnergyModule):
        def __init__(self):
            super().__init__()
            self.convs = [pxnn.Conv2d(channels[i], channels[i + 1], kernel_size=(3, 3), padding=(1, 1))
                          for i in range(depth - 1)]
            self.pool = pxnn.MaxPool2d(kernel_size=2, stride=2)
            self.readout = pxnn.Linear(weights[-1].shape[1], weights[-1].shape[0])
            self.vodes = [pxc.Vode() for _ in range(depth)]  # se_energy everywhere
            self.vodes[-1].h.frozen = True  # the output node is clamped to y

        def __call__(self, x, y=None):
            a = x
            for conv, vode in zip(self.convs, self.vodes):
                z = vode(conv(a))  # z_l ~ conv(a_{l-1}) + b_l: pre-activation latent
                a = self.pool(jax.nn.relu(z))  # a_l = maxpool(relu(z_l))
            self.vodes[-1](self.readout(a.flatten()))
            if y is not None:
                self.vodes[-1].set("h", y)
            return self.vodes[-1].get("u")

    vmask = pxu.M(pxc.VodeParam | pxc.VodeParam.Cache).to((None, 0))

    @pxf.vmap(vmask, in_axes=(0, 0), out_axes=0)
    def forward(x, y, *, model):
        return model(x, y)

    @pxf.vmap(vmask, in_axes=(0,), out_axes=(None, 0), axis_name="batch")
    def energy(x, *, model):
        f = model(x, None)
        return jax.lax.psum(model.energy(), "batch"), f  # summed over the batch

    h_mask = pxu.M(pxc.VodeParam).hasnot(frozen=True).to([False, True])
    w_mask = pxu.M(pxnn.LayerParam).to([False, True])

    def settle(x, y, model, optim_h):
        with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
            forward(x, y, model=model)
        optim_h.init(pxu.M(pxc.VodeParam).hasnot(frozen=True)(model))
        for _ in range(T):  # Jacobi steps
            with pxu.step(model, clear_params=pxc.VodeParam.Cache):
                _, g = pxf.value_and_grad(h_mask, has_aux=True)(energy)(x, model=model)
            optim_h.step(model, g["model"])
        optim_h.clear()

    @pxf.jit()
    def energy_after_T(x, y, *, model, optim_h):
        settle(x, y, model, optim_h)
        with pxu.step(model, clear_params=pxc.VodeParam.Cache):
            e, _ = energy(x, model=model)
        return e

    @pxf.jit()
    def train_step(x, y, *, model, optim_h, optim_w):
        settle(x, y, model, optim_h)
        with pxu.step(model, clear_params=pxc.VodeParam.Cache):
            (e, _), g = pxf.value_and_grad(w_mask, has_aux=True)(energy)(x, model=model)
        optim_w.step(model, g["model"], scale_by=1.0 / B)  # batch-mean gradient, plain SGD
        return e

    model = PCCNN()
    layers = model.convs + [model.readout]

    def load_params():
        for i, lay in enumerate(layers):
            lay.nn.weight.set(weights[i])
            lay.nn.bias.set(biases[i].reshape(lay.nn.bias.get().shape))

    load_params()
    with pxu.step(model, pxc.STATUS.INIT, clear_params=pxc.VodeParam.Cache):
        forward(x, y, model=model)  # materialise the vodes before building the optimisers
    optim_h = pxu.Optim(lambda: optax.sgd(kappa))
    optim_w = pxu.Optim(lambda: optax.sgd(lr), pxu.M(pxnn.LayerParam)(model))

    t0 = time.perf_counter()
    e_T = float(jax.block_until_ready(energy_after_T(x, y, model=model, optim_h=optim_h)))
    t1 = time.perf_counter()
    e_T2 = float(jax.block_until_ready(train_step(x, y, model=model, optim_h=optim_h, optim_w=optim_w)))
    t2 = time.perf_counter()
    errors = []  # |W − W_ref| / |W_ref − W_0|: the update's error relative to its size
    for i, lay in enumerate(layers):
        for new, ref, old in ((lay.nn.weight.get(), c[f"ref_W{i + 1}"], c[f"W{i + 1}"]),
                              (lay.nn.bias.get(), c[f"ref_b{i + 1}"], c[f"b{i + 1}"])):
            new = np.asarray(new, np.float64).reshape(ref.shape)
            errors.append(float(np.abs(new - ref).max() / max(np.abs(ref - old).max(), 1e-30)))
    load_params()

    def step():
        e = train_step(x, y, model=model, optim_h=optim_h, optim_w=optim_w)
        jax.block_until_ready((e, layers[0].nn.weight.get()))

    def timed(n):
        times = []
        for _ in range(n):
            s = time.perf_counter()
            step()
            times.append((time.perf_counter() - s) * 1e3)
        return times

    for _ in range(a.warmup):
        step()
    ref = float(c["ref_energy_after_T"])
    head = {
        "peer": "pcx", "version": version("pcx"), "jax_version": jax.__version__,
        "energy_after_T": e_T, "energy_after_T_from_train_step": e_T2, "ref_energy_after_T": ref,
        "energy_rel_diff": abs(e_T - ref) / abs(ref), "weight_update_rel_err": max(errors),
        "compile_s": {"energy_after_T": round(t1 - t0, 2), "train_step": round(t2 - t1, 2)},
        "threads": {"affinity": sorted(os.sched_getaffinity(0)), "XLA_FLAGS": os.environ.get("XLA_FLAGS"),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "devices": [str(d) for d in jax.devices()],
    }
    if not a.serve:
        print(json.dumps({**head, "times_ms": timed(a.repeats)}), flush=True)
        return 0
    print(json.dumps(head), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if line == "quit" or not line:
            break
        print(json.dumps({"times_ms": timed(int(line))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
