#!/usr/bin/env python3
"""Summarise .peers/results.jsonl (written by run_all.sh): per-runner table, pcfast ratio table,
and optionally benchmarks/results/peers.json + peers.md.  Main python3, stdlib only.

"best median" = the lowest per-round median; speed-up of pcfast over a peer = peer_ms / pcfast_ms
with pcfast_ms the best median of pcfast's fastest backend on that case."""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import subprocess

CASE_LABEL = {"small": "small 784-128-128-10, B=32", "anchor": "anchor 784-512-512-10, B=128"}


def machine():
    info = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        kv = {}
        for line in out.splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                kv.setdefault(k.strip(), v.strip())
        cores = int(kv.get("Core(s) per socket", "0") or 0) * int(kv.get("Socket(s)", "1") or 1)
        info = {"model_name": kv.get("Model name"), "cores": cores, "threads": int(kv.get("CPU(s)", "0")),
                "threads_per_core": int(kv.get("Thread(s) per core", "1")),
                "hypervisor": kv.get("Hypervisor vendor")}
    except (OSError, subprocess.CalledProcessError, ValueError):
        info = {"model_name": None, "cores": None, "threads": os.cpu_count()}
    try:
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    info["uname"] = " ".join(os.uname()[i] for i in (0, 2, 4))
    return info


def main():
    p = argparse.ArgumentParser()
    p.add_argument("jsonl")
    p.add_argument("--json")
    p.add_argument("--md")
    p.add_argument("--rounds")
    p.add_argument("--repeats")
    p.add_argument("--warmup")
    p.add_argument("--threads")
    p.add_argument("--idle-wait")
    a = p.parse_args()

    rows = [json.loads(l) for l in open(a.jsonl) if l.strip()]
    rows = [r for r in rows if "error" not in r]
    g = collections.defaultdict(list)
    for r in rows:
        g[(r["case"], r["peer"])].append(r)
    cases = [c for c in ("small", "anchor") if any(k[0] == c for k in g)]

    print(f"{'case':7s} {'peer':13s} {'version':22s} {'E_after_T':>12s} {'ref':>12s} {'rel_diff':>9s} "
          f"{'upd_err':>8s} {'best_med_ms':>11s} {'q25':>7s} {'q75':>7s} medians over rounds (busy before)")
    best = {}
    summary = []
    for (case, peer), rs in sorted(g.items()):
        b = min(rs, key=lambda r: r["ms_per_step_median"])
        best[(case, peer)] = b
        meds = ", ".join(f"{r['ms_per_step_median']:.2f} ({r['background_busy_before']:.2f})" for r in rs)
        print(f"{case:7s} {peer:13s} {b['version']:22s} {b['energy_after_T']:12.6f} "
              f"{b['ref_energy_after_T']:12.6f} {b['energy_rel_diff']:9.2e} {b['weight_update_rel_err']:8.1e} "
              f"{b['ms_per_step_median']:11.2f} {b['ms_q25']:7.2f} {b['ms_q75']:7.2f} [{meds}]")
        summary.append({"case": case, "peer": peer, "version": b["version"],
                        "energy_after_T": b["energy_after_T"], "ref_energy_after_T": b["ref_energy_after_T"],
                        "energy_rel_diff": b["energy_rel_diff"], "weight_update_rel_err": b["weight_update_rel_err"],
                        "best_median_ms": b["ms_per_step_median"], "q25_ms": b["ms_q25"], "q75_ms": b["ms_q75"],
                        "round_medians_ms": [r["ms_per_step_median"] for r in rs],
                        "background_busy_before": [r["background_busy_before"] for r in rs]})

    peers = sorted({k[1] for k in g if not k[1].startswith("pcfast-")})
    pcf = sorted({k[1] for k in g if k[1].startswith("pcfast-")})
    ratios = []
    print()
    hdr = ["case"] + [f"{n} ms" for n in pcf + peers] + ["pcfast best"] + [f"speed-up vs {n}" for n in peers]
    print(" | ".join(hdr))
    for case in cases:
        ms = {n: best[(case, n)]["ms_per_step_median"] for n in pcf + peers if (case, n) in best}
        pcf_here = [n for n in pcf if n in ms]
        if not pcf_here:
            continue
        bb = min(pcf_here, key=lambda n: ms[n])
        sp = {n: ms[n] / ms[bb] for n in peers if n in ms}
        ratios.append({"case": case, "ms": ms, "pcfast_best_backend": bb, "pcfast_best_ms": ms[bb],
                       "speedup_pcfast_over": sp})
        print(" | ".join([case] + [f"{ms[n]:.2f}" if n in ms else "-" for n in pcf + peers] + [bb]
                         + [f"{sp[n]:.2f}x" if n in sp else "-" for n in peers]))

    mach = machine()
    now = datetime.datetime.now(datetime.timezone.utc)
    settings = {"rounds": a.rounds, "repeats": a.repeats, "warmup": a.warmup, "threads": a.threads,
                "idle_wait_s": a.idle_wait,
                "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)")}
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"date_utc": now.isoformat(timespec="seconds"), "machine": mach, "settings": settings,
                       "summary": summary, "ratios": ratios, "rows": rows}, f, indent=1)
            f.write("\n")
    if a.md:
        versions = {r["peer"]: r["version"] for r in rows}
        L = []
        L.append("# pcfast vs peer PC libraries (pcx, pydeepity), CPU")
        L.append("")
        L.append(f"Date: {now.strftime('%Y-%m-%d %H:%M UTC')}. Machine: {mach.get('model_name')} "
                 f"({mach.get('cores')} cores, {mach.get('threads')} threads"
                 f"{', ' + mach['hypervisor'] + ' VM' if mach.get('hypervisor') else ''}), "
                 f"{mach.get('mem_gib')} GiB, {mach.get('uname')}.")
        L.append(f"Settings: rounds={a.rounds}, repeats={a.repeats}, warmup={a.warmup}, threads={a.threads}, "
                 f"IDLE_WAIT={a.idle_wait} s, OMP_WAIT_POLICY={settings['OMP_WAIT_POLICY']}. "
                 "Generated by `benchmarks/peers/run_all.sh` (raw rows in peers.json).")
        L.append("Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".")
        L.append("")
        L.append("One step = forward init + T=20 Jacobi inference steps (κ=0.1) + weight/bias gradients + SGD "
                 "(lr=0.01), tanh, MSE, float32. ms = best of the per-round medians; "
                 "speed-up = peer ms / pcfast ms (pcfast's fastest backend). Shared machine: see the round "
                 "medians below before trusting a ratio.")
        L.append("")
        L.append("| case | " + " | ".join(f"{n} ms" for n in pcf + peers) + " | pcfast best | "
                 + " | ".join(f"speed-up vs {n}" for n in peers) + " |")
        L.append("|" + " --- |" * (2 + len(pcf) + 2 * len(peers)))
        for rt in ratios:
            L.append(f"| {CASE_LABEL.get(rt['case'], rt['case'])} | "
                     + " | ".join(f"{rt['ms'][n]:.2f}" if n in rt["ms"] else "-" for n in pcf + peers)
                     + f" | {rt['pcfast_best_backend']} | "
                     + " | ".join(f"{rt['speedup_pcfast_over'][n]:.2f}×" if n in rt["speedup_pcfast_over"]
                                  else "-" for n in peers) + " |")
        L.append("")
        L.append("| case | runner | E(z_T) | ref | rel. diff | update err | best median ms | q25 | q75 | "
                 "round medians ms (CPU busy before) |")
        L.append("|" + " --- |" * 10)
        for s in summary:
            meds = ", ".join(f"{m:.2f} ({b:.2f})" for m, b in zip(s["round_medians_ms"], s["background_busy_before"]))
            L.append(f"| {s['case']} | {s['peer']} | {s['energy_after_T']:.6f} | {s['ref_energy_after_T']:.6f} | "
                     f"{s['energy_rel_diff']:.1e} | {s['weight_update_rel_err']:.1e} | {s['best_median_ms']:.2f} | "
                     f"{s['q25_ms']:.2f} | {s['q75_ms']:.2f} | {meds} |")
        L.append("")
        with open(a.md, "w") as f:
            f.write("\n".join(L))


if __name__ == "__main__":
    main()
