#!/usr/bin/env bash
# The --method runs of benchmarks/results/train/methods/: all-MiniLM-L6-v2 on the first
# 4096 sentences' worth of steps of wiki1m_subset.txt (64 steps of batch 64, max length
# 32), STS-B dev every 32 steps, two seeds, on the CPU. One run at a time.
# Usage: bash benchmarks/methods_runs.sh OUT_ROOT [RUN ...]   (default: every run, in order)
set -u
ROOT=${1:?usage: methods_runs.sh OUT_ROOT [RUN ...]}
shift
DATA=${FASTCL_DATA_DIR:-../shared/data}
PY=${PYTHON:-python}
COMMON=(--train-file "$DATA/unsup/wiki1m_subset.txt" --eval-data-dir "$DATA/sts" --batch-size 64 --max-length 32
        --max-steps 64 --eval-steps 32 --logging-steps 8 --no-progress --device cpu --overwrite)
declare -A ARGS=(
  [simcse-s42]="--method simcse --seed 42"
  [simcse-s43]="--method simcse --seed 43"
  [sgbert-s42]="--method sgbert --seed 42"
  [sgbert-s43]="--method sgbert --seed 43"
  [tacl-s42]="--method tacl --seed 42"
  [tacl-s43]="--method tacl --seed 43"
  [vascl-s42]="--method vascl --seed 42"
  [vascl-s43]="--method vascl --seed 43"
  [dclr-s42]="--method dclr --dclr-model $ROOT/simcse-s42 --seed 42"
  [dclr-s43]="--method dclr --dclr-model $ROOT/simcse-s42 --seed 43"
)
ORDER=(simcse-s42 sgbert-s42 tacl-s42 vascl-s42 dclr-s42 sgbert-s43 tacl-s43 vascl-s43 dclr-s43 simcse-s43)
RUNS=("$@")
[ ${#RUNS[@]} -eq 0 ] && RUNS=("${ORDER[@]}")
for run in "${RUNS[@]}"; do
  echo "$(date -u +%FT%TZ) start $run: $PY -m fastcl.train ${COMMON[*]} ${ARGS[$run]} --output-dir $ROOT/$run"
  # shellcheck disable=SC2086
  ( time "$PY" -m fastcl.train "${COMMON[@]}" ${ARGS[$run]} --output-dir "$ROOT/$run" ) > "$ROOT/$run.stderr.log" 2>&1
  echo "$(date -u +%FT%TZ) end $run: exit $?"
done
