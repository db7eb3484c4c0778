#!/bin/bash
# The dlseg benchmark on one GPU: full-width U-Net (base width 64, depth 4) at 256×256, bf16, channels_last,
# augmentation on the device, every stage against its baselines (python -m dlseg.bench all).
#
#   launch/bench_gpu.sh OUT_DIR [more python -m dlseg.bench options, which win]      (from the repository root)
#
# Writes OUT_DIR/bench-gpu.json (all figures, machine, settings) and OUT_DIR/bench-gpu.log (the printed tables).
# The synthetic cohort (20 MR patients) is generated and preprocessed once under OUT_DIR/cache and reused by a
# second run. Sized to finish within 6 minutes on one GPU, cohort generation included.
# Exit status: that of python -m dlseg.bench (0 measured, 1 a stage failed, 2 unusable arguments).
set -euo pipefail

OUT=${1:?usage: launch/bench_gpu.sh OUT_DIR [dlseg.bench options]}
shift
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
if [[ -n ${DLSEG_ENV_SETUP:-} ]]; then eval "$DLSEG_ENV_SETUP"; fi   # e.g. "source ~/venvs/dlseg/bin/activate"

CORES=$(nproc)
WORKERS=$(( CORES > 8 ? 8 : CORES ))           # loader / case-loading / preprocessing workers
python - <<'PY' || { echo "bench_gpu.sh: no CUDA device visible to torch" >&2; exit 2; }
import sys, torch
sys.exit(0 if torch.cuda.is_available() else 1)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>/dev/null || true

set +e
python -m dlseg.bench all \
    --device cuda --size 256 --base-width 64 --depth 4 --mixed-precision bf16 --channels-last \
    --batch-size 32 --predict-batch-size 128 --train-epochs 5 --warmup-epochs 1 \
    --workers "$WORKERS" --predict-workers "$WORKERS" --preprocess-workers "$WORKERS" --augment-on device \
    --patients 20 --memory-cases 10 40 \
    --cache-dir "$OUT/cache" --json "$OUT/bench-gpu.json" "$@" 2>&1 | tee "$OUT/bench-gpu.log"
status=${PIPESTATUS[0]}
rm -rf "$OUT"/cache/*/scratch-* 2>/dev/null
exit "$status"
