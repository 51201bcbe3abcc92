#!/usr/bin/env bash
# CI: the install a user gets WITH pip's build isolation, in a throwaway venv.
#
#   clean venv -> torch (pinned by PIP_CONSTRAINT) first, as the README says -> `pip install .`
#
# In the isolated build env there is no torch (pyproject's build requires list none), so setup.py
# installs pure Python plus the C++ sources; the extension must then JIT-build at first use, load,
# agree with a float64 reference, and load from torch's cache without a rebuild message the second
# time. pip's logs must show no torch other than the pinned one: an unpinned torch in the build
# env or among the dependencies would pull a multi-GB CUDA build. Reuses pip's cache; 1-2 minutes
# on two cores (installing torch and the JIT build take most of it).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
export PIP_CONSTRAINT="${PIP_CONSTRAINT:-$repo/.ci/constraints.txt}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
pin=$(sed -n 's/^torch==//p' "$repo/.ci/constraints.txt")
[ -n "$pin" ] || { echo "install check: no torch== pin in .ci/constraints.txt" >&2; exit 1; }
start=$SECONDS
# the venv (~0.9 GB, ~10k files) in RAM where there is room: writing and deleting it on this
# kind of machine's disk takes about a minute each
base=${TMPDIR:-/tmp}
if [ -d /dev/shm ] && [ -w /dev/shm ] && [ "$(df -Pk /dev/shm | awk 'NR==2 {print $4}')" -gt 3000000 ]; then
  base=/dev/shm
fi
work=$(mktemp -d "$base/crh-install-check.XXXXXX")
trap 'rm -rf "$work"' EXIT

step() { echo "-- install check [$((SECONDS - start)) s]: $*"; }
fail() { echo "install check FAILED: $*" >&2; exit 1; }

step "copy of the checkout (its files as git sees them; no in-tree build products such as _C*.so)"
mkdir "$work/src"
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git -C "$repo" ls-files -z --cached --others --exclude-standard
else  # not a git checkout: everything but build products
  find . -type f ! -path './.git/*' ! -path './build/*' ! -path '*.egg-info/*' ! -name '*.so' \
    ! -path '*/__pycache__/*' -printf '%P\0'
fi | (cd "$repo" && python -c '
import os, shutil, sys
dest = sys.argv[1]
for f in sys.stdin.read().split("\0"):
    if f and os.path.isfile(f):  # tracked but deleted files are skipped
        os.makedirs(os.path.join(dest, os.path.dirname(f)), exist_ok=True)
        shutil.copy2(f, os.path.join(dest, f))
' "$work/src")

step "clean venv"
python -m venv "$work/venv"
py="$work/venv/bin/python"

step "pip install torch==$pin (first, as the README says)"
"$py" -m pip install "torch==$pin" >"$work/pip-torch.log" 2>&1 || { tail -30 "$work/pip-torch.log"; fail "installing torch"; }
tail -1 "$work/pip-torch.log"

step "pip install . (build isolation)"
"$py" -m pip install -v "$work/src" >"$work/pip-pkg.log" 2>&1 || { tail -40 "$work/pip-pkg.log"; fail "pip install ."; }
grep -E '^Successfully installed' "$work/pip-pkg.log" || true

step "pip's logs: one torch, the pinned one"
# any torch wheel named in either log (downloaded, processed, cached) must be the pinned one
others=$(grep -ohE 'torch-[0-9][^ /]*\.whl' "$work/pip-torch.log" "$work/pip-pkg.log" | grep -vE "^torch-${pin//./\\.}([+-]|\.whl)" | sort -u || true)
[ -z "$others" ] || fail "pip fetched another torch: $others"
! grep -E '^\s*Collecting torch([^a-z_-]|$)' "$work/pip-pkg.log" || fail "pip install . resolved torch again (build env or dependencies)"
grep -qE 'Requirement already satisfied: torch[ >=<]' "$work/pip-pkg.log" || fail "pip's log does not show the installed torch kept"
grep -q 'torch is not importable' "$work/pip-pkg.log" || fail "setup.py saw a torch in the isolated build env"
echo "ok: no torch other than $pin; the build env had none; the installed one was kept"

step "first use: JIT build of the C++ extension (fresh TORCH_EXTENSIONS_DIR)"
cat >"$work/use.py" <<'PY'
import importlib.util, os, sys
import torch, crh_kernels
from crh_kernels.backends.cpp import load_extension

assert not crh_kernels.__file__.startswith(os.environ["CRH_SRC"]), crh_kernels.__file__
assert importlib.util.find_spec("crh_kernels._C") is None, "a prebuilt extension was installed"
assert importlib.util.find_spec("triton") is None, "triton installed without the [triton] extra"
mod, how = load_extension("cpu")
assert mod is not None and how == "JIT-built", how
torch.manual_seed(0)
x = torch.randn(300, 9)
m = crh_kernels.Moments(9, backend="cpp").update(x)
u = (x / x.norm(dim=1, keepdim=True)).double()        # float64 reference: unit rows, covariance
ref = torch.cov(u.T, correction=0)
err = (m.cov().double() - ref).abs().max().item()
assert err < 1e-5, err
print(f"ok: {how} extension loaded from {crh_kernels._build.CSRC}; cov vs float64 {err:.1e}")
PY
export TORCH_EXTENSIONS_DIR="$work/ext" CRH_SRC="$work/src" CRH_REQUIRE_CPP=1
t0=$SECONDS
(cd "$work" && "$py" use.py 2>&1) | tee "$work/first.log"
grep -q 'JIT-building' "$work/first.log" || fail "the first use built without saying so"
echo "(first use took $((SECONDS - t0)) s)"

step "second use: the cached build, no build message"
(cd "$work" && "$py" use.py 2>&1) | tee "$work/second.log"
! grep -q 'JIT-building' "$work/second.log" || fail "the JIT message was printed for a cached build"

step "done in $((SECONDS - start)) s"
