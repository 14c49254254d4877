#!/usr/bin/env bash
# The one command a GPU session runs for issue 3's benchmark. NOT YET RUN ON A GPU:
# written and checked on a CPU machine (the stages' bench.py options run there at tiny
# sizes with GPU_BENCH_DRY=1), so the first GPU run is also its test.
#
# Before the call, where pip reaches PyPI:   bash benchmarks/peer_wheels.sh
# The device call (one command, well under its 10 minutes):
#   run(command="bash benchmarks/gpu_bench.sh", carry=[".whl"], timeout_s=600)
# It installs the carried peer wheels into /tmp/site, runs bench.py stage by stage, and
# leaves in $OUT: gpu-results.tgz (every stage's JSON, markdown and plots, in one folder
# benchmarks/results/gpu-<date>/; unpack it there with
#   tar -xzf <files_at>/gpu-results.tgz -C benchmarks/results), summary.md (all stages'
# tables) and gpu_bench.log.
#
# Stages, in priority order (name some as arguments to run only those):
#   main   bf16, D=768, N=M=4096,16384,65536: every implementation (issue 2's first
#          bench; issue 3's 65536 and >= 16384 targets)
#   hard   bf16, D=768, supervised shape (one shared hard negative per anchor, M=2N)
#   small  bf16, D=768, N=M=256,1024: fastcl against the dense and compiled losses
#   fp32   fp32 inputs at tf32 precision (torch.set_float32_matmul_precision("high"))
#   large  bf16, D=768, N=65536..1048576: fastcl, memeff and cut-cross-entropy (inf-cl
#          left out: 12.9 s a call at 262144 in DESIGN.md, a third of the stage)
#   dims   bf16, N=16384, D=128..2048
# Each stage has a time budget (bench.py starts no case after it) and a hard stop
# (SIGINT: bench.py saves what it measured); the whole script stays under
# GPU_BENCH_TOTAL_S (default 530 s). A stage that no longer fits is skipped and logged;
# run it in a second call: bash benchmarks/gpu_bench.sh dims
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

START=$(date +%s)
TOTAL=${GPU_BENCH_TOTAL_S:-530}
PY=${PYTHON:-python3}
STAMP=$(date -u +%Y%m%d-%H%M%S)
RUN_DIR=${GPU_BENCH_RUN_DIR:-benchmarks/results/gpu-$STAMP}
DEST=${OUT:-$RUN_DIR}
mkdir -p "$RUN_DIR" "$DEST"
LOG=$DEST/gpu_bench.log
STAGES=("$@")
((${#STAGES[@]})) || STAGES=(main hard small fp32 large dims)

log() { echo "[gpu_bench $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# --- the peers: carried wheels (benchmarks/peer_wheels.sh), installed outside the image
if compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl >>"$LOG" 2>&1; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        log "installed peer wheels: $(cd .whl && ls -- *.whl | tr '\n' ' ')"
    else
        log "peer wheels failed to install (see above); peers will be reported as not installed"
    fi
else
    log "no .whl/ carried: peers will be reported as not installed (run benchmarks/peer_wheels.sh here, carry .whl)"
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
        --format=csv 2>&1 || echo "nvidia-smi not available"
    "$PY" - <<'EOF' 2>&1
import importlib, platform
import torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("triton", "memeff", "inf_cl", "cut_cross_entropy", "matplotlib", "numpy"):
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '?')} from {m.__file__}")
    except Exception as exc:
        print(f"  {name}: not importable ({type(exc).__name__}: {exc})")
EOF
} | tee -a "$LOG"

# --- the stages: name, budget in seconds, bench.py options
stage_budget() {
    case $1 in
        main) echo 160 ;; hard) echo 80 ;; small) echo 50 ;; fp32) echo 70 ;; large) echo 120 ;; dims) echo 60 ;; *) echo 0 ;;
    esac
}
stage_args() {
    case $1 in
        main)  echo "--sizes 4096,16384,65536 --dim 768 --dtype bf16" ;;
        small) echo "--sizes 256,1024 --dim 768 --dtype bf16 --impls fastcl,fastcl-triton,dense,compiled" ;;
        hard)  echo "--hard --sizes 4096,16384,65536 --dim 768 --dtype bf16 --impls fastcl,dense,compiled,memeff,inf-cl,cce" ;;
        fp32)  echo "--sizes 4096,16384,65536 --dim 768 --dtype fp32 --fp32-precision high --impls fastcl,dense,compiled,memeff,inf-cl,cce" ;;
        large) echo "--sizes 65536,262144,1048576 --dim 768 --dtype bf16 --impls fastcl,memeff,cce --min-repeats 3 --max-call-s 15" ;;
        dims)  echo "--sizes 16384 --dim 128,256,384,1024,2048 --dtype bf16 --impls fastcl,dense,memeff,inf-cl,cce" ;;
    esac
}

DRY=${GPU_BENCH_DRY:-0}  # 1: run every stage's options on the CPU at tiny sizes (a check of this script)
for stage in "${STAGES[@]}"; do
    budget=$(stage_budget "$stage")
    if [[ $budget == 0 ]]; then
        log "unknown stage '$stage' (main hard small fp32 large dims)"; continue
    fi
    left=$(( TOTAL - ($(date +%s) - START) ))
    if (( left < 45 )); then
        log "stage $stage skipped: ${left}s left of ${TOTAL}s; run it in another call: bash benchmarks/gpu_bench.sh $stage"
        continue
    fi
    (( budget > left - 30 )) && budget=$(( left - 30 ))
    # shellcheck disable=SC2207
    args=($(stage_args "$stage"))
    if [[ $DRY == 1 ]]; then
        args+=(--device cpu --sizes 32,64 --dim 32 --repeats 2 --min-repeats 2 --warmup 1 --no-plots)
        [[ $stage == dims ]] && args+=(--dim 16,32)
        [[ $stage == fp32 ]] && args+=(--fp32-precision highest)
    fi
    log "stage $stage: budget ${budget}s: bench.py ${args[*]}"
    # The budget stops new cases; SIGINT 45 s later stops the one in flight (bench.py saves
    # on interrupt); SIGKILL 20 s after that if it still has not returned.
    timeout -s INT -k 20 $(( budget + 45 )) \
        "$PY" benchmarks/bench.py "${args[@]}" --time-budget-s "$budget" --case-budget-s 2 \
        --out "$RUN_DIR" --tag "$stage" 2>&1 | tee -a "$LOG"
    log "stage $stage exit ${PIPESTATUS[0]}"
done

# --- what comes back: the run folder as one archive, the tables, the log
for md in "$RUN_DIR"/*.md; do
    [[ -e $md ]] && { cat "$md"; echo; } >>"$DEST/summary.md"
done
if [[ $DEST != "$RUN_DIR" ]]; then
    tar -czf "$DEST/gpu-results.tgz" -C "$(dirname "$RUN_DIR")" "$(basename "$RUN_DIR")"
fi
log "done: $(ls "$RUN_DIR" | wc -l) files in $RUN_DIR; in $DEST: $(ls "$DEST" | tr '\n' ' ')"
