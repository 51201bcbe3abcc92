"""Every Triton kernel the GPU launcher can run compiles for sm_80 and sm_90, specialized as at
run time, without a GPU (crh_kernels/backends/triton_aot.py makes the cases).

A case is kernel × operands × variant (the launcher's flags: mask, normalize, gate, sums,
CRH_TRITON_ATOMICS) × autotune config × layout (aligned D = 1024; D = 1000; D = 1025 on 8191
rows) × target. Asserted per case: no spills (STACK = 0 and LOCAL = 0: spills show as STACK),
shared memory within the target's limit, the matrix loop on wgmma (sm_90) / mma.sync (sm_80)
for 16-bit and TF32 operands, and the specialization Triton's rule gives the launcher's
integers. Today's kernels spill in the cases of ``KNOWN_SPILLS`` (issue 14): those are strict
xfails, so this file turns red the day one of them stops spilling (remove it from the list
then) as well as the day any other case starts.

The static SASS model of bench/sass_model.py is checked on the main bf16 config (its flop count
against the tile's), and issue 14's target for it (a ceiling ≥ 0.70 of the tensor peak on
sm_90) is a strict xfail until the main loop is reworked.

Compiling every case takes ≈ 6 minutes on two cores the first time, ≈ 15 s from Triton's cache.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton not installed")

import triton  # noqa: E402

from crh_kernels.backends import triton_aot as aot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LISTING = aot.list_cases()
CASES = LISTING["cases"]
TRITON = ".".join(triton.__version__.split(".")[:2])

# issue 14: spills of today's kernels, per Triton version: "kernel-operands-variant-config" ->
# the "layout-target"s where it spills, with the STACK bytes of each in the same order
# (python -m crh_kernels.backends.triton_aot --rows)
UNALIGNED = ["D1000-sm80", "D1000-sm90", "D1025-sm80", "D1025-sm90"]
KNOWN_SPILLS = {
    "3.9": {
        "cross-bf16-128x32w4s3": UNALIGNED,  # STACK 256 128 328 176
        "cross-fp16-128x32w4s3": UNALIGNED,  # STACK 256 128 328 176
        "cross-fp32-ieee-128x16w8s4": ["D1025-sm80", "D1025-sm90"],  # STACK 216 32
        "cross-fp32-ieee-128x32w8s3": ["D1025-sm80"],  # STACK 384
        "cross-fp32-ieee-64x32w4s3": ["aligned-sm80", "D1025-sm80"],  # STACK 176 176
        "cross-fp32-tf32-128x16w8s4": ["D1000-sm80", "D1025-sm80"],  # STACK 376 376
        "cross-fp32-tf32-128x32w8s3": ["D1000-sm80", "D1025-sm80"],  # STACK 360 336
        "syrk-bf16-atomic-128x32w4s3": UNALIGNED + ["aligned-sm80"],  # STACK 1040 872 1072 880 912
        "syrk-bf16-atomic-128x32w8s4": UNALIGNED,  # STACK 72 72 72 72
        "syrk-bf16-atomic-128x64w8s3": UNALIGNED,  # STACK 96 96 96 96
        "syrk-bf16-det-128x32w4s3": UNALIGNED,  # STACK 328 128 360 160
        "syrk-bf16-det-128x64w8s3": ["D1000-sm80", "D1025-sm80"],  # STACK 112 112
        "syrk-fp16-atomic-128x32w4s3": UNALIGNED + ["aligned-sm80"],  # STACK 1040 872 1072 880 912
        "syrk-fp16-atomic-128x32w8s4": UNALIGNED,  # STACK 72 72 72 72
        "syrk-fp16-atomic-128x64w8s3": UNALIGNED,  # STACK 96 96 96 96
        "syrk-fp16-det-128x32w4s3": UNALIGNED,  # STACK 328 128 360 160
        "syrk-fp16-det-128x64w8s3": ["D1000-sm80", "D1025-sm80"],  # STACK 112 112
        "syrk-fp32-ieee-atomic-128x16w8s4": UNALIGNED,  # STACK 168 168 88 96
        "syrk-fp32-ieee-atomic-128x32w8s3": UNALIGNED,  # STACK 168 168 344 168
        "syrk-fp32-ieee-atomic-64x32w4s3": ["D1025-sm80"],  # STACK 184
        "syrk-fp32-ieee-det-128x32w8s3": ["D1025-sm80"],  # STACK 120
        "syrk-fp32-ieee-det-64x32w4s3": ["aligned-sm80", "D1025-sm80"],  # STACK 240 168
        "syrk-fp32-tf32-atomic-128x16w8s4": UNALIGNED,  # STACK 192 88 192 88
        "syrk-fp32-tf32-atomic-128x32w8s3": UNALIGNED,  # STACK 144 72 144 72
    },
    # the GPU machine's Triton (checked here with its wheel: same API, other register allocation)
    "3.6": {
        "cross-bf16-128x32w4s3": UNALIGNED,
        "cross-fp16-128x32w4s3": UNALIGNED,
        "cross-fp32-ieee-128x32w8s3": ["D1025-sm80", "D1025-sm90"],
        "cross-fp32-ieee-64x32w4s3": ["D1000-sm80", "D1000-sm90"],
        "syrk-bf16-atomic-128x32w4s3": UNALIGNED,
        "syrk-bf16-atomic-128x32w8s4": UNALIGNED,
        "syrk-bf16-atomic-128x64w8s3": UNALIGNED,
        "syrk-bf16-det-128x32w4s3": ["D1000-sm80"],
        "syrk-fp16-atomic-128x32w4s3": UNALIGNED,
        "syrk-fp16-atomic-128x32w8s4": UNALIGNED,
        "syrk-fp16-atomic-128x64w8s3": UNALIGNED,
        "syrk-fp16-det-128x32w4s3": ["D1000-sm80"],
        "syrk-fp32-ieee-atomic-128x16w8s4": UNALIGNED,
        "syrk-fp32-ieee-atomic-128x32w8s3": UNALIGNED,
        "syrk-fp32-tf32-atomic-128x16w8s4": UNALIGNED,
        "syrk-fp32-tf32-atomic-128x32w8s3": UNALIGNED,
    },
}
SPILLING = {f"{k}-{where}" for k, v in KNOWN_SPILLS.get(TRITON, {}).items() for where in v}


def _spill_param(case):
    if case.id in SPILLING:
        where = "at unaligned D" if case.layout != "aligned" else "at aligned D too"
        mark = pytest.mark.xfail(strict=True, reason=f"issue 14: spills {where} — kernels to be fixed")
        return pytest.param(case, marks=mark, id=case.id)
    if KNOWN_SPILLS and TRITON not in KNOWN_SPILLS:
        # spills recorded for other Triton versions only: a spill here is reported, not a surprise
        mark = pytest.mark.xfail(strict=False, reason=f"no spill list for Triton {TRITON}")
        return pytest.param(case, marks=mark, id=case.id)
    return pytest.param(case, id=case.id)


@pytest.fixture(scope="module")
def compiled():
    results = {r.id: r for r in aot.compile_cases()}
    assert set(results) == {c.id for c in CASES}
    return results


def test_the_spill_list_names_real_cases():
    ids = {c.id for c in CASES}
    for version, known in KNOWN_SPILLS.items():
        stale = {f"{k}-{w}" for k, v in known.items() for w in v} - ids
        assert not stale, f"KNOWN_SPILLS[{version!r}] names cases the launcher no longer has: {sorted(stale)}"


def test_every_kernel_is_compiled():
    """A kernel the launcher gains (an epilogue, say) must show up here, or it escapes the check."""
    assert LISTING["kernels"] == sorted({c.kernel for c in CASES})
    assert {c.layout for c in CASES} == set(aot.LAYOUTS) and {c.cc for c in CASES} == set(aot.CCS)
    for kernel in LISTING["kernels"]:
        mine = [c for c in CASES if c.kernel == kernel]
        specs = {lay: {c.spec for c in mine if c.layout == lay} for lay in aot.LAYOUTS}
        assert specs["aligned"].isdisjoint(specs["D1000"] | specs["D1025"]), \
            f"{kernel}: aligned and unaligned layouts should specialize differently"
        if any("N" in c.ints for c in mine):  # 8191 rows: N loses its divisibility too
            assert len({c.spec for c in mine}) >= 3, f"{kernel}: D1000 and D1025 should specialize differently"
    assert {c.variant for c in CASES if c.kernel == "syrk"} == {"det", "atomic"}


#: the kernels that read x (or g and h) through its strides; the others (pass 1's totals, the
#: epilogue) read the launcher's own contiguous buffers
READS_X = {"row_stats", "syrk", "cross"}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_specialized_as_at_run_time(case):
    """Triton's rule, applied by hand to the launcher's integer arguments: 1 becomes a constant,
    a multiple of 16 carries the divisibility hint; fresh allocations are 16-byte aligned."""
    consts, _, div16 = case.spec.partition("; 16 | ")
    if consts.startswith("16 | "):
        consts, div16 = "", consts[len("16 | "):]
    consts = dict(c.split("=") for c in consts.split())
    div16 = set(div16.split(",")) if div16 else set()
    for name, value in case.ints.items():
        assert (name in consts) == (value == 1), (name, value, case.spec)
        if value != 1:
            assert (name in div16) == (value % 16 == 0), (name, value, case.spec)
    pointers = {name for name in div16 if name.endswith("_ptr")}
    assert pointers and all(name.endswith("_ptr") for name in div16 - set(case.ints))
    n, d = aot.LAYOUTS[case.layout]
    widths = [v for k, v in case.ints.items() if k in ("D", "DG", "DH")]
    assert widths and all(w == d for w in widths)
    if case.kernel in READS_X:
        strides = [v for k, v in case.ints.items() if re.fullmatch(r"stride_[a-z]n", k)]
        assert strides and all(s == d for s in strides)  # contiguous rows: the row stride is D
        assert case.ints["N"] == n
    else:  # the kernels after the passes over x take D (and a count of partials), no strides
        assert not any(k.startswith("stride_") or k == "N" for k in case.ints), case.ints


@pytest.mark.parametrize("case", [_spill_param(c) for c in CASES])
def test_no_spills(compiled, case):
    r = compiled[case.id]
    assert r.registers > 0
    assert r.stack == 0 and r.local == 0, \
        f"register spills: STACK={r.stack} LOCAL={r.local} at {r.registers} registers [{r.spec}]"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_fits_and_feeds_the_matrix_units(compiled, case):
    r = compiled[case.id]
    assert 0 < r.shared <= aot.SHARED_LIMIT[r.cc], f"shared memory {r.shared} > {aot.SHARED_LIMIT[r.cc]}"
    if r.kernel not in ("syrk", "cross"):  # no matrix loop: pass 1, its totals, the epilogue
        assert not (r.wgmma or r.mma_sync), r.kernel
        return
    tensor_cores = not (r.dtype == "fp32" and r.precision == "ieee")
    if r.cc == 90:
        assert r.wgmma == tensor_cores, "sm_90: 16-bit and TF32 operands must use wgmma"
    else:
        assert r.mma_sync == tensor_cores and not r.wgmma, "sm_80: mma.sync, never wgmma"


def test_report_marks_every_spill():
    def case(dt, cc, layout, regs, stack=0):
        r = aot.AotResult(f"syrk-{dt}-det-x-{layout}-sm{cc}", "syrk", dt, "ieee", "det", "128x32 w4 s3",
                          layout, cc, registers=regs, stack=stack, local=0, shared=66560, wgmma=cc == 90,
                          mma_sync=cc == 80)
        return r

    same = [case(dt, cc, lay, 200, 296 if (cc, lay) == (90, "D1000") else 0)
            for dt in ("bf16", "fp16") for cc in aot.CCS for lay in aot.LAYOUTS]
    table = aot.markdown(same).splitlines()
    assert len(table) == 3 and "| bf16, fp16 |" in table[2]  # identical rows are merged
    assert table[2].count("**S296**") == 1 and "mma.sync / wgmma" in table[2]
    differ = same[:-1] + [case("fp16", 90, "D1025", 201)]
    table = aot.markdown(differ).splitlines()
    assert len(table) == 4 and sum(line.count("**S296**") for line in table) == 2
    assert "2 spill (syrk 2; STACK up to 296 B, LOCAL up to 0 B)" in aot.summary(differ)


# ----------------------------------------------------------------------------- SASS model

MAIN = next(c for c in CASES if (c.kernel, c.dtype, c.variant, c.layout, c.cc) == ("syrk", "bf16", "det", "aligned", 90))


@pytest.fixture(scope="module")
def main_loop():
    """bench/sass_model.py on the main bf16 config (the launcher's first) as it runs on sm_90."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sass_model.py"), "--json", "--only", MAIN.id],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout.strip().splitlines()[-1])
    return row


def test_sass_model_reads_the_main_loop(main_loop):
    bm, bk = (int(v) for v in MAIN.config.split()[0].split("x"))
    warps = int(MAIN.config.split()[1][1:])
    assert main_loop["id"] == MAIN.id and main_loop["warps"] == warps
    assert main_loop["mma_op"].startswith("HGMMA.64x") and main_loop["mma"] >= 1
    # the loop step's flops, counted from its HGMMA lines, are the tile's: 2·BM·BM·BK, at 4096 a clock
    assert main_loop["tensor_cycles"] == 2 * bm * bm * bk / 4096
    assert main_loop["issue_cycles"] == main_loop["loop_instructions"] * warps / 4
    assert 0 < main_loop["ceiling"] <= 1


@pytest.mark.xfail(strict=True, reason="issue 14: ceiling 0.33 today (≈ 519 instructions around 4 HGMMA, "
                                       "wait 0 after them, one CTA per SM) — main loop to be reworked")
def test_main_loop_can_feed_the_tensor_cores(main_loop):
    assert main_loop["ceiling"] >= 0.70, main_loop
