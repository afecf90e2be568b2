#!/usr/bin/env bash
# After the stage-2 study (tools/study.sh): one chosen run scored on the whole test split, and
# the best run of a collaborative model shipped as an export folder in checkpoints/.
#
#   tools/finish.sh CORE RUN            score runs/RUN/best.pt on the test split (its metrics.json
#                                         gets the test entries eval.py --table reads)
#   tools/finish.sh CORE RUN SHIPNAME   export it to checkpoints/SHIPNAME (fp16), score the export on
#                                         the test split into runs/SHIPNAME, and the 32-row fp32 slice
#                                         tests/test_shipped.py rescores into runs/SHIPNAME-check
#
# One core, one thread, as the study's runs (CORE 0,1: both cores, a thread each). Then
# checkpoints/checks.json takes the slice and
#   python tools/results.py --table runs/mf ... runs/SHIPNAME ... --json checkpoints/results.json
# lists every run of the results table (README: Shipped checkpoints).
set -euo pipefail
cd "$(dirname "$0")/.."
core=$1 run=$2 ship=${3:-}
pin=(env OMP_NUM_THREADS="$(tr , '\n' <<< "$core" | wc -l)" taskset -c "$core")
log=runs/$run.finish.log
if [ -z "$ship" ]; then
  "${pin[@]}" python tools/use.py --ckpt "runs/$run/best.pt" --split test >> "$log" 2>&1
  exit
fi
[ -f "checkpoints/$ship/collm_export.json" ] ||
  "${pin[@]}" python tools/use.py --ckpt "runs/$run/best.pt" --export "checkpoints/$ship" --export-dtype fp16 >> "$log" 2>&1
[ -f "runs/$ship/metrics.json" ] ||
  "${pin[@]}" python tools/use.py --ckpt "checkpoints/$ship" --split test --out "runs/$ship" >> "$log" 2>&1
[ -f "runs/$ship-check/metrics.json" ] ||
  "${pin[@]}" python tools/use.py --ckpt "checkpoints/$ship" --split test --rows 32 --dtype fp32 --no-compile \
    --out "runs/$ship-check" >> "$log" 2>&1
