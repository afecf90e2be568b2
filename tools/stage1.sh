#!/usr/bin/env bash
# One stage-1 (TALLRec) run of the backbone probe on one CPU core (or both), continuing where an
# earlier sitting stopped (issue: a stronger LLM half; docs/RESULTS.md: the backbone probe).
#
#   tools/stage1.sh CORE NAME [train.py flags]   e.g.
#   tools/stage1.sh 0 lora-gemma3 --llm gemma3-270m                    # the shipped recipe
#   tools/stage1.sh 1 lora-gemma3-pass --llm gemma3-270m --max-steps 4237   # one whole pass
#
# The run goes to runs/NAME (log: runs/NAME.log), pinned to core CORE with one thread; CORE 0,1 gives
# one run both cores (a thread each): the way to finish the last run once the other is done. If
# runs/NAME/last.pt exists the run is resumed with the flags it started with, so the same line starts
# a run and continues it in a later sitting. Valid AUC on the first 1,000 valid_small rows every 250
# steps (2,000 samples), as the shipped SmolLM2 stage 1 was measured; 16 test rows at the end (the
# chosen run is scored on the whole test split afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
core=$1 name=$2
shift 2
out=runs/$name
if [ -f "$out/last.pt" ]; then
  args=(--resume "$out")
else
  args=(--stage lora --test-rows 16 --out "$out" "$@")
fi
mkdir -p runs
echo "$(date -u +%FT%TZ) python train.py ${args[*]}" >> "runs/$name.log"
threads=$(tr , '\n' <<< "$core" | wc -l)
OMP_NUM_THREADS=$threads exec taskset -c "$core" python train.py "${args[@]}" >> "runs/$name.log" 2>&1
