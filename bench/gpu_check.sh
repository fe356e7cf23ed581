#!/usr/bin/env bash
# The GPU check in one command (at most 5 minutes on one H200), writing one log:
#   1. the needs_cuda tests (CUDA against CPU for every op)
#   2. bench/gpu_check.py: CUDA against CPU at large shapes (float64 many-band, every fused
#      geometry of the released vgg config at fp32 / TF32 / bf16, tensors beyond 2^31
#      elements), a non-default stream behind a slow producer, CUDA-graph replay,
#      torch.compile, bf16 autocast, deterministic gradients
#   3. bench/bench_ops.py: fused forward+backward against cuDNN, TF32 off (fp32), TF32 on and
#      bf16, at vgg conv1_2 (1 x 64 x 321 x 321) and at conv5 (8 x 512 x 41 x 41)
#
#   bash bench/gpu_check.sh                 # on the GPU machine; log: gpu_check.log
#   SMOKE=1 bash bench/gpu_check.sh         # on a CPU machine, tiny sizes, under a minute:
#                                           # CPU paths and the CPU emulation of the kernels
# LOG=path sets the log; PYTHON=... the interpreter. The exit status is the number of failed
# steps.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${LOG:-gpu_check.log}
PYTHON=${PYTHON:-python}
SMOKE=${SMOKE:-0}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the compiled CPU loops build into a folder of this run (removed at its end) unless one is given
if [ -z "${SEGAWARE_CACHE:-}" ]; then
  SEGAWARE_CACHE=$(mktemp -d)
  export SEGAWARE_CACHE
  trap 'rm -rf "$SEGAWARE_CACHE"' EXIT
fi
: > "$LOG"
failed=()

step() {   # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc, $((SECONDS - start)) s" | tee -a "$LOG"
  if [ "$rc" -ne 0 ]; then failed+=("$name"); fi
}

echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) SMOKE=$SMOKE $(git rev-parse --short HEAD 2>/dev/null)" | tee -a "$LOG"
if [ "$SMOKE" = "1" ]; then
  step "needs_cuda tests (collected, skipped without a GPU)" 60 \
    "$PYTHON" -m pytest -q -p no:cacheprovider -m needs_cuda tests/kernels
  step "checks (tiny, CUDA paths emulated)" 120 "$PYTHON" bench/gpu_check.py --smoke
  step "benchmarks (tiny, CPU)" 120 "$PYTHON" bench/bench_ops.py --device cpu --quick \
    --threads 1 --size 17 --channels 8 --precisions fp32,bf16 --variants fused,conv2d \
    --modes train
else
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
    2>&1 | tee -a "$LOG"
  step "needs_cuda tests" 150 "$PYTHON" -m pytest -q -p no:cacheprovider -m needs_cuda tests
  step "checks" 120 "$PYTHON" bench/gpu_check.py
  step "benchmarks, vgg conv1_2 1x64x321x321" 90 "$PYTHON" bench/bench_ops.py --device cuda \
    --precisions fp32,tf32,bf16 --variants fused,conv2d --modes forward,train --repeats 5 \
    --inner 10 --json bench_conv1_2.json
  step "benchmarks, conv5 8x512x41x41" 60 "$PYTHON" bench/bench_ops.py --device cuda \
    --precisions fp32,tf32,bf16 --variants fused,conv2d --modes train --batch 8 --size 41 \
    --channels 512 --repeats 5 --inner 10 --json bench_conv5.json
fi
if [ ${#failed[@]} -eq 0 ]; then
  echo "gpu_check: all steps passed (log: $LOG)" | tee -a "$LOG"
else
  echo "gpu_check: failed steps: ${failed[*]} (log: $LOG)" | tee -a "$LOG"
fi
exit ${#failed[@]}
