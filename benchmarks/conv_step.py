#!/usr/bin/env python3
"""One PC and one BP train step of a VGG-5-like CNN at CIFAR-10 shape: pcfast's torch conv backend
(NCHW and channels-last), the reference, torch autograd BP, pcx (optional), conv-kernel rates and a
FLOP model, all timed in one interleaved run.

    OMP_NUM_THREADS=1 python3 benchmarks/conv_step.py --threads 1 --channels 64,128,256,256 \
        --rounds 3 --repeats 2 --pcx --reference --json benchmarks/results/cpu-conv-step.json
    python3 benchmarks/conv_step.py --markdown benchmarks/results/cpu-conv-step.json   # tables only

The net: input 3×32×32, batch 128; four blocks conv C_{i-1}→C_i k3 p1 (+bias) → ReLU → max pool 2/2,
then a linear readout C_4·2·2 → 10 (identity, MSE). PC: forward init, T = 7 Jacobi steps, γ = 1,
weight gradients at z_T, plain SGD. BP: nn.Sequential of the same layers, ½‖f − y‖²/B, loss.backward()
and torch.optim.SGD. Every provider's step includes its SGD update; weights keep evolving.

Providers, each timed ``--repeats`` times per round, the order rotated round by round:
  pc-nchw / pc-cl      ``pcfast.ops.torch_conv.conv_pc_grads`` with x (and the weights) contiguous /
                       channels-last, + SGD on the layers' tensors (on the CPU conv_pc_grads runs a
                       max-pooling net's state in channels-last either way: pc-nchw includes converting x)
  bp-nchw / bp-cl      autograd BP + torch.optim.SGD, model and x contiguous / channels-last
  pcx                  ``benchmarks/peers/run_pcx_cnn.py`` served from ``.peers/pcx`` (``--pcx``),
                       the same weights and batch (an .npz written here), checked before timing
  conv-fwd-*           ``nnf.conv2d`` of every layer (fwd-1: layer 1 only), the linear readout included
  conv-tr-*            ``nnf.conv_transpose2d`` of layers 2…4 (the top-down terms, as torch_conv does
                       them), + the readout's ``mm``
  conv-wgrad-*         ``torch.nn.grad.conv2d_weight`` of every layer (as torch_conv), + the readout's
  reference            ``pcfast.reference.conv.conv_pc_train_step`` (float32), round 1 only (``--reference``)

FLOP model (multiply–adds × 2; pooling, activations and elementwise updates not counted): F = Σ_l MACs
of layer l's forward map, F₂ = the same without layer 1 (whose prediction is constant). PC = F
(forward init) + T·2·F₂ (per step: the top-down transposed conv and the prediction conv of layers
2…L — what torch_conv runs) + F (weight gradients). BP = F + F₂ (input gradients of layers 2…L) + F
(weight gradients). Executed PC FLOPs: torch_conv's Jacobi steps skip a layer whose error and the
error above are still exactly 0 from the forward initialisation, so layer k ≥ 2's top-down and
prediction maps run in T − (L − k) of the T steps (4, 5, 6, 7 for blocks 2–4 and the readout at
T = 7); "time ÷ FLOP executed" divides by that count. CPU time: this process's, per step, for the
torch providers (robust to other jobs on the machine; pcx not measured). The check against pcx: pcx's F(z_T) from the given weights against pcfast's
``conv_pc_energy`` at ``conv_pc_grads``'s relaxed latents (float32) and at the float64 run's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PCX_PYTHON = os.path.join(ROOT, ".peers", "pcx", "bin", "python")
PCX_RUNNER = os.path.join(ROOT, "benchmarks", "peers", "run_pcx_cnn.py")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--channels", default="64,128,256,256")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--T", type=int, default=7)
    p.add_argument("--kappa", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--pcx", action="store_true", help="also time pcx (needs .peers/pcx)")
    p.add_argument("--reference", action="store_true", help="time the reference once (slow)")
    p.add_argument("--case", default=None, help="where the pcx case .npz goes (default .peers/cases/cnn-<channels>.npz)")
    p.add_argument("--json", default=None, help="merge this run's record into that JSON file")
    p.add_argument("--markdown", default=None, help="print the tables of that JSON file and exit")
    return p.parse_args(argv)


def set_threads(n: int) -> None:
    """Pin to the first n CPUs and set the OpenMP variables before torch is imported (as the peers)."""
    try:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])
    except (AttributeError, OSError):
        pass
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


# ------------------------------------------------------------------------------------------------
# FLOP model

def layer_macs(channels, batch, size=32, classes=10):
    """MACs of each layer's forward map: 4 convs k3 p1 at size, size/2, …; the readout."""
    macs, s = [], size
    for cin, cout in zip(channels[:-1], channels[1:]):
        macs.append(batch * cout * s * s * cin * 9)
        s //= 2
    macs.append(batch * classes * channels[-1] * s * s)
    return macs


def executed_steps(depth, T):
    """Per layer j = 2…L (1-based), in how many of the T Jacobi steps torch_conv runs its top-down and
    prediction maps: the output error comes down one layer per step from the forward initialisation
    (before it arrives a layer's update is exactly 0), so z_i first moves at step L − i and layer j,
    which reads z_{j-1}, runs in steps L − j + 1 … T."""
    return [max(0, T - (depth - j)) for j in range(2, depth + 1)]


def flop_model(channels, batch, T):
    macs = layer_macs(channels, batch)
    F, F2 = sum(macs), sum(macs[1:])
    pc = {"forward": 2 * F, "inference": 2 * T * 2 * F2, "weight_grads": 2 * F}
    bp = {"forward": 2 * F, "input_grads": 2 * F2, "weight_grads": 2 * F}
    steps = executed_steps(len(macs), T)
    executed = 2 * F + 2 * 2 * sum(m * n for m, n in zip(macs[1:], steps)) + 2 * F
    return {"layer_macs": macs, "pc_flops": pc, "bp_flops": bp, "pc_total": sum(pc.values()),
            "bp_total": sum(bp.values()), "pc_bp_flop_ratio": sum(pc.values()) / sum(bp.values()),
            "pc_executed_steps": steps, "pc_executed_total": executed,
            "pc_bp_executed_flop_ratio": executed / sum(bp.values())}


# ------------------------------------------------------------------------------------------------
# the net and the providers

def make_net(torch, channels, batch, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    weights, biases = [], []
    for cin, cout in zip(channels[:-1], channels[1:]):
        weights.append(torch.randn(cout, cin, 3, 3, generator=g, dtype=torch.float64) * (2.0 / (9 * cin)) ** 0.5)
        biases.append(torch.randn(cout, generator=g, dtype=torch.float64) * 0.1)
    d = channels[-1] * 2 * 2
    weights.append(torch.randn(10, d, generator=g, dtype=torch.float64) / d ** 0.5)
    biases.append(torch.randn(10, generator=g, dtype=torch.float64) * 0.1)
    x = torch.rand(batch, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 10, (batch,), generator=g), 10).to(torch.float64)
    return [w.to(dtype) for w in weights], [b.to(dtype) for b in biases], x.to(dtype), y.to(dtype)


def pc_layers(weights, biases, channels_last=False):
    import torch
    from pcfast.reference.conv import ConvLayer, LinearLayer

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    layers = [ConvLayer(w.clone().contiguous(memory_format=fmt), b.clone(), padding=1, activation="relu",
                        pool=("max", 2, 2)) for w, b in zip(weights[:-1], biases[:-1])]
    return layers + [LinearLayer(weights[-1].clone(), biases[-1].clone())]


def bp_model(weights, biases, channels_last=False):
    import torch
    from torch import nn

    mods = []
    for w, b in zip(weights[:-1], biases[:-1]):
        conv = nn.Conv2d(w.shape[1], w.shape[0], 3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        mods += [conv, nn.ReLU(), nn.MaxPool2d(2, 2)]
    lin = nn.Linear(weights[-1].shape[1], weights[-1].shape[0])
    with torch.no_grad():
        lin.weight.copy_(weights[-1])
        lin.bias.copy_(biases[-1])
    model = nn.Sequential(*mods, nn.Flatten(), lin)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def sgd_(layers, result, lr):
    for layer, gw, gb in zip(layers, result.weight_grads, result.bias_grads):
        layer.weight.sub_(gw, alpha=lr)
        layer.bias.sub_(gb, alpha=lr)


class PcxServer:
    """run_pcx_cnn.py --serve in .peers/pcx: checks and compiles once, then times n steps on request."""

    def __init__(self, case, threads, warmup):
        cmd = [PCX_PYTHON, PCX_RUNNER, case, "--threads", str(threads), "--warmup", str(warmup), "--serve"]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=os.path.dirname(PCX_RUNNER))
        self.head = json.loads(self.proc.stdout.readline())

    def time(self, n):
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["times_ms"]

    def close(self):
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


def main(argv=None):
    a = parse_args(argv)
    if a.markdown:
        print(markdown(json.load(open(a.markdown))))
        return 0
    set_threads(a.threads)
    sys.path.insert(0, ROOT)
    import numpy as np
    import torch
    import torch.nn.functional as nnf

    from pcfast.ops.torch_conv import conv_pc_grads
    from pcfast.reference.conv import conv_pc_energy, conv_pc_train_step
    from pcfast.types import PCConfig

    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    channels = [3] + [int(c) for c in a.channels.split(",")]
    B, T, kappa, lr = a.batch, a.T, a.kappa, a.lr
    config = PCConfig.of(5, None, inference_steps=T, inference_lr=kappa, schedule="jacobi", loss="mse")
    model = flop_model(channels, B, T)
    record = {"channels": channels, "batch": B, "T": T, "kappa": kappa, "lr": lr, "threads": a.threads,
              "rounds": a.rounds, "repeats": a.repeats, "warmup": a.warmup, "flop_model": model}

    # --- the case: float64 run of torch_conv (= the reference), float32 run, the pcx npz --------------
    w64, b64, x64, y64 = make_net(torch, channels, B, a.seed, torch.float64)
    layers64 = pc_layers(w64, b64)
    res64 = conv_pc_grads(layers64, x64, y64, config)
    e64 = float(conv_pc_energy(layers64, x64, y64, res64.latents))
    w32, b32, x, y = make_net(torch, channels, B, a.seed, torch.float32)
    check = pc_layers(w32, b32)
    res32 = conv_pc_grads(check, x, y, config)
    e32 = float(conv_pc_energy(check, x, y, res32.latents))
    with torch.no_grad():
        e_init = float(0.5 * ((bp_model(w64, b64).double()(x64) - y64) ** 2).sum())
    update_err = max(float(((w - lr * g).double() - (w0 - lr * g0)).abs().max() / (lr * g0).abs().max())
                     for w, g, w0, g0 in zip(w32 + b32, res32.weight_grads + res32.bias_grads, w64 + b64,
                                             res64.weight_grads + res64.bias_grads))
    record["energy"] = {"init_float64": e_init, "after_T_float64": e64, "after_T_float32": e32,
                        "float32_rel_diff": abs(e32 - e64) / abs(e64), "float32_update_rel_err": update_err}
    print(f"F(z_0) = {e_init:.6f}  F(z_T): float64 {e64:.6f}, float32 {e32:.6f}", file=sys.stderr)
    case = a.case or os.path.join(ROOT, ".peers", "cases", f"cnn-{'-'.join(map(str, channels[1:]))}.npz")
    arrays = {"x": x64.float().numpy(), "y": y64.float().numpy(), "channels": np.array(channels),
              "T": T, "kappa": kappa, "lr": lr, "ref_energy_after_T": e64}
    for i in range(len(layers64)):
        arrays[f"W{i + 1}"] = w32[i].numpy()
        arrays[f"b{i + 1}"] = b32[i].numpy()
        arrays[f"ref_W{i + 1}"] = (w64[i] - lr * res64.weight_grads[i]).numpy()
        arrays[f"ref_b{i + 1}"] = (b64[i] - lr * res64.bias_grads[i]).numpy()
    os.makedirs(os.path.dirname(case), exist_ok=True)
    np.savez(case, **arrays)

    # --- providers -----------------------------------------------------------------------------
    providers = {}
    inputs = {"nchw": x, "cl": x.contiguous(memory_format=torch.channels_last)}
    for fmt, xin in inputs.items():
        layers = pc_layers(w32, b32, channels_last=fmt == "cl")

        def pc_step(layers=layers, xin=xin):
            sgd_(layers, conv_pc_grads(layers, xin, y, config), lr)

        net = bp_model(w32, b32, channels_last=fmt == "cl")
        opt = torch.optim.SGD(net.parameters(), lr=lr)

        def bp_step(net=net, opt=opt, xin=xin):
            opt.zero_grad(set_to_none=True)
            loss = 0.5 * ((net(xin) - y) ** 2).sum() / B
            loss.backward()
            opt.step()

        providers[f"pc-{fmt}"] = pc_step
        providers[f"bp-{fmt}"] = bp_step

        # conv-kernel rates on the same shapes (the tensors torch_conv sees)
        mfmt = torch.channels_last if fmt == "cl" else torch.contiguous_format
        acts, outs, s = [], [], 32
        for cin, cout in zip(channels[:-1], channels[1:]):
            acts.append(torch.randn(B, cin, s, s).contiguous(memory_format=mfmt))
            outs.append(torch.randn(B, cout, s, s).contiguous(memory_format=mfmt))
            s //= 2
        wl = [w.contiguous(memory_format=mfmt) for w in w32[:-1]]
        a_lin, e_lin = torch.randn(B, w32[-1].shape[1]), torch.randn(B, 10)

        def fwd(first=0, last=4, acts=acts, wl=wl):
            for i in range(first, last):
                nnf.conv2d(acts[i], wl[i], b32[i], 1, 1)
            if last == 4:
                nnf.linear(a_lin, w32[-1], b32[-1])

        def tr(outs=outs, wl=wl):
            for i in range(1, 4):
                nnf.conv_transpose2d(outs[i], wl[i], None, 1, 1, (0, 0))
            torch.mm(e_lin, w32[-1])

        def wgrad(acts=acts, outs=outs, wl=wl):
            for i in range(4):
                torch.nn.grad.conv2d_weight(acts[i], wl[i].shape, outs[i], 1, 1)
            torch.mm(e_lin.T, a_lin)

        providers[f"conv-fwd-{fmt}"] = fwd
        providers[f"conv-fwd1-{fmt}"] = lambda fwd=fwd: fwd(0, 1)
        providers[f"conv-tr-{fmt}"] = tr
        providers[f"conv-wgrad-{fmt}"] = wgrad

    pcx = None
    if a.pcx:
        pcx = PcxServer(case, a.threads, a.warmup)
        head = pcx.head
        head["pcfast_float32_energy_after_T"] = e32
        head["rel_diff_vs_pcfast_float32"] = abs(head["energy_after_T"] - e32) / abs(e32)
        record["pcx_check"] = head
        print(f"pcx: F(z_T) {head['energy_after_T']:.6f} (rel diff {head['energy_rel_diff']:.2e} to float64, "
              f"{head['rel_diff_vs_pcfast_float32']:.2e} to pcfast float32), update err "
              f"{head['weight_update_rel_err']:.2e}", file=sys.stderr)

    # --- interleaved rounds ------------------------------------------------------------------------
    names = list(providers) + (["pcx"] if pcx else [])
    with torch.no_grad():
        for name, fn in providers.items():
            for _ in range(a.warmup):
                if name.startswith("bp"):
                    with torch.enable_grad():
                        fn()
                else:
                    fn()
    times = {n: [] for n in names}
    cpu = {n: [] for n in providers}  # this process's CPU time per step (pcx: not measured)
    loads = []
    for r in range(a.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            if name == "pcx":
                got = pcx.time(a.repeats)
            else:
                got, fn = [], providers[name]
                for _ in range(a.repeats):
                    with torch.set_grad_enabled(name.startswith("bp")):
                        t0, c0 = time.perf_counter(), time.process_time()
                        fn()
                        got.append((time.perf_counter() - t0) * 1e3)
                        cpu[name].append((time.process_time() - c0) * 1e3)
            times[name].append(got)
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}: " + ", ".join(f"{n} {statistics.median(times[n][-1]):.0f}" for n in names)
              + f" ms  (load {loads[-1]:.2f})", file=sys.stderr)
    if pcx:
        pcx.close()
    if a.reference:
        ref_layers = pc_layers(w32, b32)
        t0 = time.perf_counter()
        res = conv_pc_train_step(ref_layers, x, y, inference_steps=T, inference_lr=kappa, schedule="jacobi",
                                 loss="mse")
        with torch.no_grad():
            sgd_(ref_layers, res, lr)
        times["reference"] = [[(time.perf_counter() - t0) * 1e3]]
        print(f"reference: {times['reference'][0][0]:.0f} ms", file=sys.stderr)

    record["times_ms"] = times
    record["cpu_ms"] = cpu
    record["loadavg_1m_after_rounds"] = loads
    record["summary"] = summarize(record)
    record["machine"] = machine()
    record["command"] = "python3 benchmarks/conv_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record["torch"] = torch.__version__
    record["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    if a.json:
        data = json.load(open(a.json)) if os.path.exists(a.json) else {"runs": []}
        key = (record["channels"], record["threads"])
        data["runs"] = [r for r in data["runs"] if (r["channels"], r["threads"]) != key] + [record]
        with open(a.json, "w") as f:
            json.dump(data, f, indent=1)
    print(markdown({"runs": [record]}))
    return 0


def summarize(rec):
    """Per provider: median over all timed steps, best round median; the derived ratios."""
    out = {}
    for name, rounds in rec["times_ms"].items():
        flat = [t for r in rounds for t in r]
        out[name] = {"median_ms": statistics.median(flat), "best_round_median_ms": min(map(statistics.median, rounds)),
                     "round_medians_ms": [round(statistics.median(r), 1) for r in rounds]}
    fm, T = rec["flop_model"], rec["T"]
    macs = fm["layer_macs"]
    derived = {}
    for fmt in ("nchw", "cl"):
        med = lambda n: out[f"{n}-{fmt}"]["median_ms"]
        if f"pc-{fmt}" not in out:
            continue
        conv_rate = 2 * sum(macs) / med("conv-fwd") / 1e6  # GFLOP/s of the forward convs
        fwd2 = med("conv-fwd") - med("conv-fwd1")
        model_pc = med("conv-fwd") + T * (fwd2 + med("conv-tr")) + med("conv-wgrad")
        # the convolutions torch_conv runs (a layer's share of fwd2 + tr taken as its share of the MACs)
        share = sum(m * n for m, n in zip(macs[1:], fm["pc_executed_steps"])) / (T * sum(macs[1:]))
        model_pc_executed = med("conv-fwd") + T * share * (fwd2 + med("conv-tr")) + med("conv-wgrad")
        model_bp = med("conv-fwd") + med("conv-tr") + med("conv-wgrad")
        derived[fmt] = {
            "pc_bp_time_ratio": med("pc") / med("bp"),
            "pc_bp_flop_ratio": fm["pc_bp_flop_ratio"],
            "time_over_flop_ratio": med("pc") / med("bp") / fm["pc_bp_flop_ratio"],
            "time_over_executed_flop_ratio": med("pc") / med("bp") / fm["pc_bp_executed_flop_ratio"],
            "pc_bp_cpu_time_ratio": statistics.median(rec["cpu_ms"][f"pc-{fmt}"])
            / statistics.median(rec["cpu_ms"][f"bp-{fmt}"]),
            "pc_executed_gflops": fm["pc_executed_total"] / med("pc") / 1e6,
            "conv_fwd_gflops": conv_rate,
            "conv_tr_gflops": 2 * sum(macs[1:]) / med("conv-tr") / 1e6,
            "conv_wgrad_gflops": 2 * sum(macs) / med("conv-wgrad") / 1e6,
            "pc_gflops": fm["pc_total"] / med("pc") / 1e6,
            "bp_gflops": fm["bp_total"] / med("bp") / 1e6,
            "pc_fraction_of_conv_rate": fm["pc_total"] / med("pc") / 1e6 / conv_rate,
            "bp_fraction_of_conv_rate": fm["bp_total"] / med("bp") / 1e6 / conv_rate,
            "pc_kernel_model_ms": model_pc,
            "pc_executed_kernel_model_ms": model_pc_executed,
            "pc_executed_fraction_of_conv_rate": fm["pc_executed_total"] / med("pc") / 1e6 / conv_rate,
            "bp_kernel_model_ms": model_bp,
            "pc_share_in_inference_convs": T * (fwd2 + med("conv-tr")) / med("pc"),
        }
        if "pcx" in out:
            derived[fmt]["pcx_over_pc_time"] = out["pcx"]["median_ms"] / med("pc")
    out["derived"] = derived
    return out


def machine():
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU(s)", "Thread(s) per core", "Flags"):
                value = value.strip()
                if key.strip() == "Flags":
                    value = " ".join(f for f in value.split() if f.startswith(("avx", "fma")))
                info[key.strip()] = value
    except OSError:
        pass
    return info


def markdown(data):
    lines = []
    for rec in data["runs"]:
        s, fm = rec["summary"], rec["flop_model"]
        lines.append(f"### channels {'-'.join(map(str, rec['channels'][1:]))}, batch {rec['batch']}, T = {rec['T']}, "
                     f"{rec['threads']} thread(s)\n")
        lines.append(f"FLOP model: PC {fm['pc_total'] / 1e9:.2f} GFLOP, BP {fm['bp_total'] / 1e9:.2f} GFLOP, "
                     f"ratio {fm['pc_bp_flop_ratio']:.3f}. {rec['rounds']} rounds × {rec['repeats']} steps.\n")
        lines.append("| provider | median ms | best round median ms | round medians ms |")
        lines.append("| --- | --- | --- | --- |")
        for name, v in s.items():
            if name == "derived":
                continue
            lines.append(f"| {name} | {v['median_ms']:.1f} | {v['best_round_median_ms']:.1f} | "
                         f"{', '.join(f'{t:.0f}' for t in v['round_medians_ms'])} |")
        lines.append("")
        executed = "pc_executed_total" in fm
        if executed:
            lines.append(f"Executed (the Jacobi steps skip the layers the output error has not reached: layers "
                         f"2…L run in {fm['pc_executed_steps']} of the {rec['T']} steps): PC "
                         f"{fm['pc_executed_total'] / 1e9:.2f} GFLOP, PC/BP {fm['pc_bp_executed_flop_ratio']:.3f}.\n")
        lines.append("| layout | PC/BP time | PC/BP CPU time | PC/BP FLOP full / executed | time ÷ FLOP ratio full / "
                     "executed | PC GFLOP/s full / executed | BP GFLOP/s | conv fwd / tr / wgrad GFLOP/s | PC ÷ conv "
                     "rate (executed) | BP ÷ conv rate | kernel-model PC (executed) / BP ms | pcx ÷ pcfast PC |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for fmt, d in s["derived"].items():
            pcx = f"{d['pcx_over_pc_time']:.2f}×" if "pcx_over_pc_time" in d else "—"
            x = lambda key, f="{:.2f}": f.format(d[key]) if key in d else "—"
            exe = (lambda key, f="{:.2f}": " / " + x(key, f)) if executed else (lambda key, f="": "")
            flops = f"{d['pc_bp_flop_ratio']:.2f}" + (f" / {fm['pc_bp_executed_flop_ratio']:.2f}" if executed else "")
            lines.append(f"| {fmt} | {d['pc_bp_time_ratio']:.2f} | {x('pc_bp_cpu_time_ratio')} | {flops} | "
                         f"{d['time_over_flop_ratio']:.2f}{exe('time_over_executed_flop_ratio')} | "
                         f"{d['pc_gflops']:.1f}{exe('pc_executed_gflops', '{:.1f}')} | {d['bp_gflops']:.1f} | "
                         f"{d['conv_fwd_gflops']:.1f} / {d['conv_tr_gflops']:.1f} / {d['conv_wgrad_gflops']:.1f} | "
                         f"{x('pc_executed_fraction_of_conv_rate') if executed else x('pc_fraction_of_conv_rate')} | "
                         f"{d['bp_fraction_of_conv_rate']:.2f} | "
                         f"{x('pc_executed_kernel_model_ms', '{:.0f}') if executed else x('pc_kernel_model_ms', '{:.0f}')}"
                         f" / {d['bp_kernel_model_ms']:.0f} | {pcx} |")
        lines.append("")
        if "pcx_check" in rec:
            c = rec["pcx_check"]
            lines.append(f"pcx check: F(z_T) = {c['energy_after_T']:.6f}; pcfast float64 {c['ref_energy_after_T']:.6f} "
                         f"(rel diff {c['energy_rel_diff']:.1e}), pcfast float32 "
                         f"{c['pcfast_float32_energy_after_T']:.6f} ({c['rel_diff_vs_pcfast_float32']:.1e}); "
                         f"one SGD step's update error {c['weight_update_rel_err']:.1e} of the update size (pcfast float32: "
                         f"{rec['energy'].get('float32_update_rel_err', float('nan')):.1e}).\n")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
