#!/usr/bin/env bash
# Before each run it waits (up to IDLE_WAIT s) until the machine's CPUs are < 15 % busy over 1 s,
# and records the busy fraction it saw ("background_busy_before").
#
# Make the two standard cases and run every peer on them, ROUNDS times, interleaved
# (peer A, peer B, peer A, ...), so that background load on the shared 2-core machine hits
# everyone alike.  Raw JSON lines go to .peers/results.jsonl; a summary table (best median over
# rounds, plus the spread of the medians) is printed at the end.
#
#   bash benchmarks/peers/setup_envs.sh
#   ROUNDS=3 REPEATS=20 THREADS=2 bash benchmarks/peers/run_all.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/benchmarks/peers"
PEERS="$ROOT/.peers"
ROUNDS="${ROUNDS:-3}"
REPEATS="${REPEATS:-20}"
WARMUP="${WARMUP:-5}"
THREADS="${THREADS:-2}"
IDLE_WAIT="${IDLE_WAIT:-120}"   # seconds to wait for a quiet machine before each run (0: don't wait)
OUT="$PEERS/results.jsonl"
mkdir -p "$PEERS/cases"
: > "$OUT"

python3 "$HERE/make_case.py" --sizes 784,128,128,10 --batch 32 --T 20 --seed 0 --kappa 0.1 --lr 0.01 \
  --out "$PEERS/cases/small.npz" >&2
python3 "$HERE/make_case.py" --sizes 784,512,512,10 --batch 128 --T 20 --seed 0 --kappa 0.1 --lr 0.01 \
  --out "$PEERS/cases/anchor.npz" >&2

for r in $(seq 1 "$ROUNDS"); do
  for case in small anchor; do
    for peer in pcx pydeepity; do
      py="$PEERS/$peer/bin/python"
      if [[ ! -x "$py" ]]; then echo "[run_all] missing $py: run setup_envs.sh" >&2; exit 1; fi
      busy="$(python3 "$HERE/_idle.py" --wait "$IDLE_WAIT")"
      echo "[run_all] round $r $case $peer (background busy $busy)" >&2
      "$py" "$HERE/run_$peer.py" "$PEERS/cases/$case.npz" --repeats "$REPEATS" --warmup "$WARMUP" \
        --threads "$THREADS" | python3 -c "import json,sys; d=json.load(sys.stdin); d['case']='$case'; d['round']=$r; d['background_busy_before']=$busy; print(json.dumps(d))" >> "$OUT"
    done
  done
done

python3 - "$OUT" <<'EOF'
import json, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1])]
g = collections.defaultdict(list)
for r in rows:
    g[(r["case"], r["peer"])].append(r)
print(f"{'case':7s} {'peer':10s} {'version':8s} {'E_after_T':>12s} {'ref':>12s} {'rel_diff':>9s} "
      f"{'upd_err':>8s} {'best_med_ms':>11s} {'q25':>7s} {'q75':>7s} {'medians over rounds (busy before)':s}")
for (case, peer), rs in sorted(g.items()):
    best = min(rs, key=lambda r: r["ms_per_step_median"])
    meds = ", ".join(f"{r['ms_per_step_median']:.2f} ({r['background_busy_before']:.2f})" for r in rs)
    print(f"{case:7s} {peer:10s} {best['version']:8s} {best['energy_after_T']:12.6f} "
          f"{best['ref_energy_after_T']:12.6f} {best['energy_rel_diff']:9.2e} {best['weight_update_rel_err']:8.1e} "
          f"{best['ms_per_step_median']:11.2f} {best['ms_q25']:7.2f} {best['ms_q75']:7.2f} [{meds}]")
EOF
