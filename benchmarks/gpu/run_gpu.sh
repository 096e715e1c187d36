#!/usr/bin/env bash
# One prepared GPU run (< 8 minutes on an H100/H200): the Triton backend's equivalence checks on CUDA
# (fp32, tf32, bf16), then PC/DTP train-step timings for reference, torch, torch.compile, triton and
# triton + CUDA graph, at 784-256-256-10 batch 64 and 784-4096x4-10 batch 1024, T = 20.
#
#   benchmarks/gpu/run_gpu.sh [bench_gpu.py options]      # e.g. --cases mnist --precisions fp32
#
# Results: $PCFAST_BENCH_OUT (default benchmarks/results/gpu)/bench_gpu.{json,md}, plus run_gpu.log.
# Exit status: 0 when every check passed, 1 when a check failed, 2 without a usable GPU/triton.
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

# 470 s for the harness (its own budget is 450 s and it stops starting cases in time); the outer
# timeout only catches a hang.
timeout --signal=INT --kill-after=20 470 "$PY" benchmarks/gpu/bench_gpu.py --budget 450 "$@" 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
