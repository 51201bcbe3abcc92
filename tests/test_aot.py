"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, without a GPU.

On sm_90 the matrix loop must use wgmma (16-bit and TF32 operands), on sm_80 mma.sync; no
kernel may spill registers (LOCAL = 0), and every config fits the target's shared memory.
Registers per kernel are printed (run with -s, or see NOTES.md).
"""
import pytest

aot = pytest.importorskip("crh_kernels.backends.triton_aot", reason="triton not installed")

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
CFGS = aot.gpu_configs()


def _cfg(kernel, dtype, index):
    return CFGS[kernel][32 if dtype == "fp32" else 16][index]


# each kernel × operand type × target with the first (largest) config of its set ...
CASES = [(k, dt, prec, cc, 0)
         for k in ("row_stats", "syrk", "cross")
         for dt, prec in (("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "tf32"), ("fp32", "ieee"))
         if not (k == "row_stats" and prec == "tf32")
         for cc in (80, 90)]
# ... and every other autotune config of the main kernel on both targets
CASES += [("syrk", dt, prec, cc, i)
          for dt, prec in (("bf16", "ieee"), ("fp32", "tf32"))
          for i in range(1, len(CFGS["syrk"][32 if dt == "fp32" else 16]))
          for cc in (80, 90)]


@pytest.fixture(scope="module")
def compiled():
    results = aot.compile_many([(k, dt, cc, _cfg(k, dt, i), prec) for k, dt, prec, cc, i in CASES])
    return dict(zip(CASES, results))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_compiles_for_target(compiled, case):
    kernel, dtype, precision, cc, _ = case
    r = compiled[case]
    print(f"\n[aot] {r.kernel} {r.dtype} sm_{r.cc}: REG={r.registers} LOCAL={r.local_bytes} "
          f"SHARED={r.shared_bytes} wgmma={r.wgmma} mma.sync={r.mma_sync} ({r.config})")
    assert r.registers > 0
    assert r.local_bytes == 0, f"register spills: LOCAL={r.local_bytes}"
    assert r.shared_bytes <= SHARED_LIMIT[cc], f"shared memory {r.shared_bytes} > {SHARED_LIMIT[cc]}"
    if kernel != "row_stats":
        tensor_cores = not (dtype == "fp32" and precision == "ieee")
        if cc == 90:
            assert r.wgmma == tensor_cores, "sm_90 matrix loop must use wgmma"
        else:
            assert r.mma_sync == tensor_cores and not r.wgmma
