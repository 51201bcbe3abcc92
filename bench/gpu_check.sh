#!/usr/bin/env bash
# One call on the lent GPU machine: installs nothing, runs the GPU tests, checks every kernel
# against the reference, prints a short table; full logs go under $OUT.
#   run from the repository root:  bash bench/gpu_check.sh
set -u
OUT=${OUT:-/tmp/crh_gpu_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CRH_TEST_DEVICE=cuda
export TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
status=0

step() {  # step NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.log, print the tail
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-15}" "$OUT/$name.log"
  [ $rc -eq 0 ] || { echo "!! $name failed (rc=$rc)"; status=1; }
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.log"

# the CUDA extension, when the tree has one and this torch can build it (JIT, cached in $OUT)
if [ -f csrc/moments_cuda.cu ]; then
  export TORCH_EXTENSIONS_DIR="$OUT/torch_extensions" CRH_CUDA_ARCHS="9.0"
  step build_cuda 240 python -c "import crh_kernels; print(crh_kernels.available_backends())"
fi

TAIL=6 step tests 300 python -m pytest -q -x -p no:cacheprovider tests/test_moments.py tests/test_triton_interp.py \
  $(ls tests/test_cpp.py tests/test_cuda.py 2>/dev/null)
TAIL=40 step table 240 python bench/gpu_table.py --json "$OUT/gpu_table.json"
TAIL=12 step check 60 python -m crh_kernels check --device cuda --n 16384 --d 1024
# GPT-2-small step (124M parameters, 8×1024 tokens), all four streams on every block Linear
TAIL=12 step gpt2_step 240 python bench/bench_step.py --device cuda --json "$OUT/gpt2_step.json"
echo "== done (status $status); logs in $OUT"
exit $status
