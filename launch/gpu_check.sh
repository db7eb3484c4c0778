#!/bin/bash
# The GPU-only paths CPU tests cannot reach, on one CUDA machine (about 6 minutes on one GPU; not a batch script:
# run it inside a job or on a GPU machine, from anywhere):
#
#   launch/gpu_check.sh OUT_DIR
#
# 1. python -m dlseg.gpu_check: fp32, fp16 (loss scaling) and bf16 training with channels_last and augmentation
#    on the device; save -> resume round trip in each precision (final weights within a stated tolerance of an
#    uninterrupted run); 2-process DDP when two GPUs are visible; prediction on the GPU vs the CPU.
# 2. launch/bench_gpu.sh --quick: python -m dlseg.bench all at full width (64, depth 4), 256 px, bf16.
#
# Writes OUT_DIR/gpu-check.json and OUT_DIR/gpu-check.md (every check, its figures and tolerances), the training
# runs' logs under OUT_DIR/work/, the benchmark under OUT_DIR/bench/.
# Exit status: 0 every check passed, 1 a check failed, 2 no CUDA device or unusable arguments.
set -euo pipefail

if (( $# != 1 )); then
    echo "usage: launch/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
if [[ -n ${DLSEG_ENV_SETUP:-} ]]; then eval "$DLSEG_ENV_SETUP"; fi   # e.g. "source ~/venvs/dlseg/bin/activate"
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device visible to torch; run it on a GPU machine" >&2
    exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || true

set +e
launch/bench_gpu.sh "$OUT/bench" --quick --patients 6 --train-epochs 2 --warmup-epochs 1 --memory-cases 2 8 \
    > "$OUT/bench.log" 2>&1
bench=$?
python -m dlseg.gpu_check "$OUT" --device cuda --bench-exit "$bench" --bench-json "$OUT/bench/bench-gpu.json"
status=$?
set -e
exit "$status"
