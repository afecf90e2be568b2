#!/usr/bin/env bash
# One stage-2 run of the results study on ONE CPU core, continuing where an earlier sitting stopped.
#
#   tools/stage2.sh CORE NAME [train.py flags]   e.g.
#   tools/stage2.sh 0 cie-din --rec din --rec-ckpt runs/din/model.pt --tune-rec
#
# The run goes to runs/NAME (log: runs/NAME.log), pinned to core CORE with one thread: on a 2-core
# machine two runs side by side finish sooner than one run on both cores, whose threads wait on each
# other. If runs/NAME/last.pt exists the run is resumed (the flags are then those it started with),
# so the same line starts a run and continues it in a later sitting. Every run of the study shares
# the flags below: the shipped stage-1 checkpoint and the stage-2 budget chosen on valid (README:
# Results).
set -euo pipefail
cd "$(dirname "$0")/.."
core=$1 name=$2
shift 2
out=runs/$name
STAGE2=(--stage cie --ckpt "${STAGE1:-checkpoints/tallrec-smollm2}" --max-steps 500 --warmup-steps 20
        --eval-every 125 --compile)
if [ -f "$out/last.pt" ]; then
  args=(--resume "$out")
else
  args=("${STAGE2[@]}" --out "$out" "$@")
fi
mkdir -p runs
echo "$(date -u +%FT%TZ) python train.py ${args[*]}" >> "runs/$name.log"
OMP_NUM_THREADS=1 exec taskset -c "$core" python train.py "${args[@]}" >> "runs/$name.log" 2>&1
