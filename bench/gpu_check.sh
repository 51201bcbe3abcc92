#!/usr/bin/env bash
# The one script for a lent GPU machine: what this project can only learn there, most valuable
# first, inside the lease's limits.
#
#   bash bench/gpu_check.sh              # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --dry-run    # here, on CPU: every step's plumbing, CPU-sized
#   CRH_GPU_CHECK_DRY=1 bash bench/gpu_check.sh      # the same dry run
#
# Limits it is sized for: one call ≤ 600 s, 15 min of device time per session (start-up
# included), at most 8 files back from $OUT. Hence:
#   - a global deadline of 540 s (CRH_GPU_CHECK_DEADLINE to lower it): step i may run until
#     min(budget_1 + … + budget_i, deadline) seconds after the start, so a step that ends early
#     leaves its time to the next ones, a slow one cannot take theirs, and the budgets add up
#     to at most the deadline; a step with under 10 s left is skipped;
#   - steps by value: env → crh check → GPU table (autotuned) → Triton tests (one pinned config,
#     bench/gpu_pin.py, per-test timeout, no -x) → GPT-2-small Collector step → CUDA extension build → its tests
#     → its rows of the GPU table;
#   - until the CUDA extension steps, Python runs from a copy of the package without csrc/
#     (a staged tree), so no step before them can start a JIT build of an extension;
#   - the extension builds in $TORCH_EXTENSIONS_DIR (default /tmp/crh_torch_extensions, never
#     under $OUT); a lock left there by a killed build is removed before building;
#   - $OUT gets gpu_check.log (everything, in order), gpu_check.json (each step: budget, limit,
#     status, seconds), gpu_table.json, gpt2_step.json, gpu_table_cuda.json: 5 files.
# Dry run: CRH_TEST_DEVICE=cpu, TRITON_INTERPRET=1, each step the same command on CPU-sized
# inputs (crh check --device cpu, gpu_table --small, a slice of the Triton tests, the tiny
# transformer, the CPU extension (cpp backend) instead of the CUDA one); it writes the same files.
set -u
set -o pipefail

DRY=${CRH_GPU_CHECK_DRY:-0}
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry-run)" >&2; exit 2 ;;
  esac
done
[ "$DRY" = 1 ] || DRY=0

REPO=$PWD
OUT=${OUT:-/tmp/crh_gpu_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/gpu_check.json
DEADLINE=${CRH_GPU_CHECK_DEADLINE:-540}
MIN_STEP=10   # a step with less time than this is skipped
GRACE=5       # SIGTERM, then SIGKILL this much later: counted inside the step's limit
STAGE=${CRH_GPU_CHECK_STAGE:-/tmp/crh_gpu_stage}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/crh_torch_extensions}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/crh_triton_cache}
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 MAX_JOBS=${MAX_JOBS:-16}
# autotuning results on disk: the check, the table and the GPT-2 step meet the same shapes
export TRITON_CACHE_AUTOTUNING=1
export PYTHONDONTWRITEBYTECODE=1

# name budget_s: in order of value; the budgets add up to at most the deadline (540 s)
STEPS=(env check table triton_tests gpt2_step cuda_build cuda_tests cuda_table)
BUDGETS=(20 40 140 120 75 85 40 20)

if [ "$DRY" = 1 ]; then
  export CRH_TEST_DEVICE=cpu TRITON_INTERPRET=1
else
  export CRH_TEST_DEVICE=cuda CRH_CUDA_ARCHS=${CRH_CUDA_ARCHS:-9.0}
  unset TRITON_INTERPRET
fi

START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }

pytest_timeout() {  # the per-test limit, where pytest-timeout is installed (the GPU image has it)
  if python3 -c "import pytest_timeout" 2>/dev/null; then
    echo "--timeout=$1"
  else
    echo "gpu_check: pytest-timeout not installed: no per-test limit (the step's limit holds)" >&2
  fi
}

# ---- the steps (each runs in a subshell; output goes to the combined log) ----

step_env() {
  echo "mode: $([ "$DRY" = 1 ] && echo 'dry run (CPU)' || echo GPU); OUT=$OUT; deadline ${DEADLINE}s"
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  else
    echo "nvidia-smi: not here"
  fi
  echo "cpus $(nproc)"
  python3 - <<'PY'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
PY
}

stage_tree() {  # the package, tests and bench without csrc/ or built extensions
  rm -rf "$STAGE" && mkdir -p "$STAGE" || return 1
  cp -r "$REPO/crh_kernels" "$REPO/tests" "$REPO/bench" "$REPO/pyproject.toml" "$STAGE/" || return 1
  find "$STAGE" \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} + 2>/dev/null
  # where crh_kernels is installed editable (here, CI), its import finder would hand out the
  # checkout's built extensions: in the staged tree, crh_kernels comes from the stage alone
  cat >"$STAGE/sitecustomize.py" <<'PY'
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "crh_kernels" not in getattr(f, "__module__", "")]
PY
  [ ! -e "$STAGE/csrc" ] && [ ! -e "$STAGE/crh_kernels/_csrc" ]
}

in_stage() { (cd "$STAGE" && PYTHONPATH="$STAGE:$STAGE/bench" "$@"); }

step_check() {  # accuracy, not speed: one config (the table autotunes)
  if [ "$DRY" = 1 ]; then
    in_stage python3 bench/gpu_pin.py -m crh_kernels check --device cpu --n 128 --d 16
  else
    in_stage python3 bench/gpu_pin.py -m crh_kernels check --device cuda --n 16384 --d 1024
  fi
}

step_table() {
  if [ "$DRY" = 1 ]; then
    # the interpreter takes seconds a launch: the table's plumbing with the torch backend
    in_stage python3 bench/gpu_table.py --small --reps 1 --backends torch --json "$OUT/gpu_table.json"
  else
    in_stage python3 bench/gpu_table.py --json "$OUT/gpu_table.json"
  fi
}

step_triton_tests() {
  local tests=(tests/test_triton_interp.py tests/test_moments.py)
  [ "$DRY" = 1 ] && tests=("tests/test_triton_interp.py::test_interpreter_is_really_on_without_gpu"
                           "tests/test_triton_interp.py::test_row_stats[True-dtype0]")
  in_stage python3 -m pytest -q -rfE -p no:cacheprovider -p gpu_pin $(pytest_timeout 60) "${tests[@]}"
}

step_gpt2_step() {
  if [ "$DRY" = 1 ]; then
    in_stage python3 bench/gpu_pin.py bench/bench_step.py --size tiny --steps 1 --device cpu \
      --backend torch --json "$OUT/gpt2_step.json"
  else
    # GPT-2 small (124M parameters, 8×1024 tokens), all four streams on every block Linear
    in_stage python3 bench/gpu_pin.py bench/bench_step.py --device cuda --steps 5 \
      --json "$OUT/gpt2_step.json"
  fi
}

step_cuda_build() {
  mkdir -p "$TORCH_EXTENSIONS_DIR"
  # only this script builds here: any lock is one a killed build left, and would hang the build
  local lock
  while IFS= read -r lock; do
    echo "removed stale lock $lock"; rm -f "$lock"
  done < <(find "$TORCH_EXTENSIONS_DIR" -maxdepth 3 -name lock -type f 2>/dev/null)
  # the CUDA extension first (the one only this machine can build), then the CPU one that
  # tests/test_cuda.py's backend list loads too; the dry run has only the CPU one
  local kinds=(cuda cpu)
  [ "$DRY" = 1 ] && kinds=(cpu)
  (cd "$REPO" && python3 - "${kinds[@]}" <<'PY'
import sys, time
from crh_kernels.backends.cpp import load_extension
bad = 0
for kind in sys.argv[1:]:
    t0 = time.perf_counter()
    module, how = load_extension(kind)
    print(f"{kind} extension: {how} ({time.perf_counter() - t0:.1f} s)", flush=True)
    bad += module is None
sys.exit(1 if bad else 0)
PY
  )
}

step_cuda_tests() {
  local sel=(tests/test_cuda.py tests/test_moments.py -k cuda)  # the [cuda] backend cases
  [ "$DRY" = 1 ] && sel=(tests/test_cuda.py)
  (cd "$REPO" && python3 -m pytest -q -rfE -p no:cacheprovider $(pytest_timeout 60) "${sel[@]}")
}

step_cuda_table() {  # the extension's rows (the table step ran before it could be built)
  # the repository first on the path: the in-tree extension, whatever crh_kernels is installed
  if [ "$DRY" = 1 ]; then
    (cd "$REPO" && PYTHONPATH="$REPO:$REPO/bench" python3 bench/gpu_table.py --small --reps 1 --backends cpp --json "$OUT/gpu_table_cuda.json")
  else
    (cd "$REPO" && PYTHONPATH="$REPO:$REPO/bench" python3 bench/gpu_table.py --shapes 16384x1024,65536x128,4096x4096 --reps 10 --backends cuda \
      --json "$OUT/gpu_table_cuda.json")
  fi
}

# ---- the runner ----

main() {
  local i n=${#STEPS[@]} sched=0 total=0 failed=0
  for b in "${BUDGETS[@]}"; do total=$((total + b)); done
  local plan=""
  for i in "${!STEPS[@]}"; do plan+="${STEPS[$i]} ${BUDGETS[$i]}s, "; done
  echo "== plan: ${plan%, }; budgets ${total}s <= deadline ${DEADLINE}s"
  if (( total > 540 )); then echo "!! the budgets add up to ${total}s > 540s"; return 1; fi
  stage_tree || { echo "!! could not stage the tree in $STAGE"; return 1; }
  local rows=()
  for i in "${!STEPS[@]}"; do
    local name=${STEPS[$i]} budget=${BUDGETS[$i]}
    sched=$((sched + budget))
    local now; now=$(elapsed)
    local until=$(( sched < DEADLINE ? sched : DEADLINE ))
    local limit=$(( until - now - GRACE ))
    local status rc=-1 took=0
    if (( limit < MIN_STEP )); then
      status="skipped (deadline: ${limit}s left)"
      failed=1
      echo "== [$((i + 1))/$n] $name: $status"
    else
      echo "== [$((i + 1))/$n] $name (t=${now}s, limit ${limit}s, budget ${budget}s)"
      local t0; t0=$(date +%s)
      # export -f: `timeout` runs the step function in a fresh bash
      timeout --kill-after="$GRACE" "$limit" bash -c "step_$name"
      rc=$?
      took=$(( $(date +%s) - t0 ))
      case $rc in
        0) status=ok ;;
        124|137) status="TIMEOUT after ${took}s (limit ${limit}s)"; failed=1 ;;
        *) status="FAILED (rc $rc)"; failed=1 ;;
      esac
      echo "-- $name: $status in ${took}s"
    fi
    rows+=("$(printf '{"name": "%s", "budget_s": %d, "start_s": %d, "limit_s": %d, "grace_s": %d, "status": "%s", "rc": %d, "seconds": %d}' \
      "$name" "$budget" "$now" "$limit" "$GRACE" "$status" "$rc" "$took")")
  done
  echo "== summary (t=$(elapsed)s of ${DEADLINE}s)"
  local j=0
  for i in "${!STEPS[@]}"; do
    printf '%-13s %s\n' "${STEPS[$i]}" "$(sed -E 's/.*"status": "([^"]*)".*/\1/' <<<"${rows[$i]}")"
  done
  {
    printf '{"dry_run": %s, "deadline_s": %d, "budget_total_s": %d, "elapsed_s": %d, "steps": [\n' \
      "$([ "$DRY" = 1 ] && echo true || echo false)" "$DEADLINE" "$total" "$(elapsed)"
    for j in "${!rows[@]}"; do
      printf '  %s%s\n' "${rows[$j]}" "$([ "$j" -lt $((${#rows[@]} - 1)) ] && echo ,)"
    done
    printf ']}\n'
  } >"$SUMMARY"
  echo "== done: $([ $failed = 0 ] && echo 'every step ok' || echo 'some steps failed'); files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
  return $failed
}

export -f step_env step_check step_table step_triton_tests step_gpt2_step step_cuda_build \
  step_cuda_tests step_cuda_table stage_tree in_stage pytest_timeout
export DRY OUT REPO STAGE DEADLINE

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
