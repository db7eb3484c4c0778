#!/usr/bin/env bash
# Stress check (minutes; not part of the suite): preempt a training run with SIGUSR1 at a random moment, resume it
# with --resume auto, and compare its final weights with an uninterrupted run's. Run it beside other work (a
# training, a CPU burner) to look for load-dependent resume differences:
#     N=12 bash tests/stress/preempt_resume.sh          # STORE defaults to the demo's synthetic store
# Prints one line per run with the largest weight difference (0.0 = bit-identical). Exit 1 if any run differed.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
STORE=${STORE:-runs/_synthetic/mr-p30-s0-v0.2/t1in.zarr}
WORK=${WORK:-$(mktemp -d)}; mkdir -p "$WORK"
[[ -d $STORE ]] || { echo "no store at $STORE: run the demo first (README) or set STORE" >&2; exit 2; }
ARGS=(--data "$STORE" --model.base_width 4 --model.depth 2 --loader.size 48 --loader.batch_size 4
      --loader.val_batch_size 8 --loader.workers 2 --loader.prefetch_factor 2 --optim.name adam --optim.lr 3e-3
      --sched.name step --sched.step_size 1 --sched.gamma 0.5 --sched.warmup_epochs 1 --loss.name focal
      --keep_last 1 --epochs 3)
$PY dlseg/train.py "${ARGS[@]}" --out "$WORK/ref" > "$WORK/ref.log" 2>&1 || { echo "reference run failed: $WORK/ref.log"; exit 1; }
failed=0
for i in $(seq 1 "${N:-10}"); do
    run="$WORK/run$i"
    delay=$($PY -c "import random; print(round(random.uniform(13, 42), 2))")   # after start-up, before the end
    $PY dlseg/train.py "${ARGS[@]}" --out "$run" > "$run.log" 2>&1 & pid=$!
    sleep "$delay"; kill -USR1 "$pid" 2>/dev/null; wait "$pid"; first=$?
    $PY dlseg/train.py "${ARGS[@]}" --out "$run" --resume auto >> "$run.log" 2>&1; second=$?
    diff=$($PY - "$WORK/ref" "$run" <<'PY'
import sys
from pathlib import Path
from safetensors.torch import load_file
a, b = (load_file(str(sorted(Path(r, "checkpoints").glob("step_*"))[-1] / "model.safetensors")) for r in sys.argv[1:])
print(max(float((a[k] - b[k]).abs().max()) for k in a))
PY
)
    echo "run $i: signal after ${delay}s, first exit $first, resume exit $second, max weight difference $diff," \
         "$(grep -o 'resumed from [^ ]*' "$run/train.log" | head -1 || echo 'finished before the signal')"
    [[ $diff == 0.0 && $second == 0 ]] || failed=1
done
exit $failed
