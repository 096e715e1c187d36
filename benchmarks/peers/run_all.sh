#!/usr/bin/env bash
# Before each run it waits (up to IDLE_WAIT s) until the machine's CPUs are < 15 % busy over 1 s,
# and records the busy fraction it saw ("background_busy_before").
#
# Make the two standard cases and run every peer AND pcfast on them, ROUNDS times, interleaved
# (pcx, pydeepity, pcfast-torch, pcfast-cpp if built, then again ...), so that background load on the
# shared 2-core machine hits everyone alike.  Raw JSON lines go to .peers/results.jsonl; a summary
# table (best median over rounds, plus the spread of the medians) and a ratio table
# (speed-up of pcfast's best backend = peer_ms / pcfast_ms) are printed at the end and written to
# benchmarks/results/peers.json and benchmarks/results/peers.md.
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
mkdir -p "$PEERS/cases" "$ROOT/benchmarks/results"
: > "$OUT"

# pcfast backends: torch always, cpp when pcfast._C is built (main python3, repo root on sys.path)
PCFAST_BACKENDS="${PCFAST_BACKENDS:-$(cd "$ROOT" && python3 -c "import pcfast.ops as o; print('torch cpp' if o.is_available('cpp') else 'torch')")}"
echo "[run_all] pcfast backends: $PCFAST_BACKENDS" >&2
RUNNERS="pcx pydeepity"
for b in $PCFAST_BACKENDS; do RUNNERS="$RUNNERS pcfast-$b"; done

python3 "$HERE/make_case.py" --sizes 784,128,128,10 --batch 32 --T 20 --seed 0 --kappa 0.1 --lr 0.01 \
  --out "$PEERS/cases/small.npz" >&2
python3 "$HERE/make_case.py" --sizes 784,512,512,10 --batch 128 --T 20 --seed 0 --kappa 0.1 --lr 0.01 \
  --out "$PEERS/cases/anchor.npz" >&2

for r in $(seq 1 "$ROUNDS"); do
  for case in small anchor; do
    for peer in $RUNNERS; do
      extra=()
      if [[ "$peer" == pcfast-* ]]; then
        py="python3"; script="$HERE/run_pcfast.py"; extra=(--backend "${peer#pcfast-}")
      else
        py="$PEERS/$peer/bin/python"; script="$HERE/run_$peer.py"
        if [[ ! -x "$py" ]]; then echo "[run_all] missing $py: run setup_envs.sh" >&2; exit 1; fi
      fi
      busy="$(python3 "$HERE/_idle.py" --wait "$IDLE_WAIT")"
      echo "[run_all] round $r $case $peer (background busy $busy)" >&2
      "$py" "$script" "$PEERS/cases/$case.npz" --repeats "$REPEATS" --warmup "$WARMUP" \
        --threads "$THREADS" "${extra[@]}" | python3 -c "import json,sys; d=json.load(sys.stdin); d['case']='$case'; d['round']=$r; d['background_busy_before']=$busy; print(json.dumps(d))" >> "$OUT"
    done
  done
done

python3 "$HERE/summarize.py" "$OUT" --rounds "$ROUNDS" --repeats "$REPEATS" --warmup "$WARMUP" \
  --threads "$THREADS" --idle-wait "$IDLE_WAIT" \
  --json "$ROOT/benchmarks/results/peers.json" --md "$ROOT/benchmarks/results/peers.md"
