#!/usr/bin/env bash
# One prepared GPU run (< 8 minutes on an H100/H200):
#   1. the checks on CUDA: `pytest -m gpu tests/gpu` (the triton backend against the reference in fp32,
#      tf32 and bf16; CUDA-graph replay), then the DESIGN oracles on triton compiled for CUDA
#      (`pytest tests/reference -k triton`);
#   2. PC/DTP train-step timings (bench_gpu.py) for reference, torch, torch.compile, triton and
#      triton + CUDA graph, at 784-256-256-10 batch 64 and 784-4096x4-10 batch 1024, T = 20.
#
#   benchmarks/gpu/run_gpu.sh [bench_gpu.py options]      # e.g. --cases mnist --precisions fp32
#
# Results: $PCFAST_BENCH_OUT (default benchmarks/results/gpu)/bench_gpu.{json,md}, pytest_gpu.xml,
# pytest_oracles.xml, plus run_gpu.log. Exit status: 0 when every check passed and something was
# timed, 1 when a check failed (the timings still run) or nothing could be timed, 2 without a usable
# GPU/triton.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PCFAST_BENCH_OUT="${PCFAST_BENCH_OUT:-benchmarks/results/gpu}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
unset TRITON_INTERPRET  # compiled kernels on the GPU, never the interpreter
mkdir -p "$PCFAST_BENCH_OUT"
LOG="$PCFAST_BENCH_OUT/run_gpu.log"
PY="${PYTHON:-python}"

{
  echo "== $(date -u +%FT%TZ) pcfast GPU run at $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 || echo "nvidia-smi: unavailable"
  "$PY" - <<'PYCHECK'
import sys
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError as exc:
    print(f"triton missing ({exc}): pip install 'pcfast[triton]'")
    sys.exit(2)
sys.exit(0 if torch.cuda.is_available() else 2)
PYCHECK
} 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
  echo "run_gpu.sh: no usable CUDA device or triton; nothing measured" | tee -a "$LOG"
  exit 2
fi

# Checks: at most 180 s for tests/gpu (kernel compilation included) and 60 s for the oracles.
echo "== checks: pytest -m gpu tests/gpu" | tee -a "$LOG"
timeout --signal=INT --kill-after=20 180 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu \
  --junitxml="$PCFAST_BENCH_OUT/pytest_gpu.xml" 2>&1 | tee -a "$LOG"
checks=${PIPESTATUS[0]}
echo "== checks: pytest tests/reference -k triton" | tee -a "$LOG"
timeout --signal=INT --kill-after=20 60 "$PY" -m pytest -q -p no:cacheprovider tests/reference -k triton \
  --junitxml="$PCFAST_BENCH_OUT/pytest_oracles.xml" 2>&1 | tee -a "$LOG"
oracles=${PIPESTATUS[0]}

# Timings: 230 s for the harness (its own budget is 210 s and it stops starting cases in time); the
# outer timeout only catches a hang.
echo "== timings: bench_gpu.py" | tee -a "$LOG"
timeout --signal=INT --kill-after=20 230 "$PY" benchmarks/gpu/bench_gpu.py --budget 210 "$@" 2>&1 | tee -a "$LOG"
timings=${PIPESTATUS[0]}
if [ "$checks" -ne 0 ] || [ "$oracles" -ne 0 ] || [ "$timings" -ne 0 ]; then
  exit 1
fi
exit 0
