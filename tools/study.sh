#!/usr/bin/env bash
# The stage-2 study on the shipped stage 1 (checkpoints/tallrec-smollm2, one pass over train), as a
# queue per CPU core: each line below is one run of tools/stage2.sh. Start (or continue, in a later
# sitting) with one queue per core:
#
#   tools/study.sh 0 &  tools/study.sh 1 &
#
# A run whose runs/NAME/metrics.json exists is done and skipped; an unfinished one resumes from its
# last.pt. Runs are chosen on valid AUC (tools/results.py --curves) and score only 16 test rows; the
# chosen ones are scored on the whole test split by tools/finish.sh. CoLLM-MF and CoLLM-DIN, frozen
# collaborative model, 500 steps: our stage-2 lr 1e-3 (warmup 20) against the reference's own for
# stage 2 on Qwen2, lr 1e-2 with 200 warmup steps; then a second seed of the setting valid chose for
# each (docs/RESULTS.md: the stage-2 study on the shipped stage 1). The earlier study, on the stage 1
# shipped until commit 5b944c8, is docs/RESULTS.md's "stage-2 study on lora-s1".
set -euo pipefail
cd "$(dirname "$0")/.."
core=$1
QUEUE='
0 pass-mf               --rec mf --rec-ckpt runs/mf/model.pt
1 pass-mf-lr1e-2        --rec mf --rec-ckpt runs/mf/model.pt --lr 1e-2 --warmup-steps 200
0 pass-din              --rec din --rec-ckpt runs/din/model.pt
1 pass-din-lr1e-2       --rec din --rec-ckpt runs/din/model.pt --lr 1e-2 --warmup-steps 200
0 pass-mf-s2024         --rec mf --rec-ckpt runs/mf/model.pt --seed 2024
1 pass-din-s2024        --rec din --rec-ckpt runs/din/model.pt --seed 2024
'
# the two collaborative models the runs read (collab.py's defaults, seed 0; one queue trains them,
# the other waits on the lock)
mkdir -p runs
flock runs/.collab.lock bash -c 'for m in mf din; do
  [ -f runs/$m/model.pt ] || OMP_NUM_THREADS=1 python collab.py --model $m --out runs/$m > runs/$m.log 2>&1
done'
echo "$QUEUE" | while read -r c name flags; do
  [ "$c" = "$core" ] || continue
  [ -f "runs/cie-$name/metrics.json" ] && continue
  echo "core $core: cie-$name"
  # shellcheck disable=SC2086  # the flags are words
  tools/stage2.sh "$core" "cie-$name" --test-rows 16 $flags
done
