"""bench/sass_model.py's arithmetic on hand-written SASS: which loops it models and how many
CTAs fit an SM (no compiler needed; tests/test_aot.py runs it on the compiled kernels)."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sm():
    spec = importlib.util.spec_from_file_location("sass_model", ROOT / "bench" / "sass_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sass(lines):
    """cuobjdump-style lines from (address, instruction) pairs."""
    return "\n".join(f"        /*{a:04x}*/                   {ins} ;" for a, ins in lines)


HGMMA = "HGMMA.64x128x16.F32.BF16 R24, R88, gdesc[UR8].tnspB, R24"


def _kernel(fast_body: int, general_body: int, wait0: bool = True):
    """An outer loop around a non-matrix loop, a fast matrix loop and a general matrix loop."""
    lines, a = [], 0x100
    outer = a
    lines.append((a, "IMAD R1, R1, 0x2, RZ"))
    a += 0x10
    scan = a
    lines += [(scan, "LDG.E R2, desc[UR4][R4.64]"), (scan + 0x10, f"BRA 0x{scan:x}")]
    a = scan + 0x20
    for body in (fast_body, general_body):
        top = a
        for k in range(body - 4):
            lines.append((a, "FFMA R3, R3, R4, -R5"))
            a += 0x10
        lines += [(a, "WARPGROUP.ARRIVE"), (a + 0x10, HGMMA + ", gsb0"),
                  (a + 0x20, "WARPGROUP.DEPBAR.LE gsb0, 0x0" if wait0 else "WARPGROUP.DEPBAR.LE gsb0, 0x1"),
                  (a + 0x30, f"BRA 0x{top:x}")]
        a += 0x40
    lines.append((a, f"BRA 0x{outer:x}"))
    return _sass(lines)


def test_every_innermost_matrix_loop_is_modeled_and_the_first_one_reported(sm):
    sass = _kernel(40, 100)
    loops = sm.matrix_loops(sm.parse(sass))
    # the scan loop holds no matrix instruction, the outer loop holds the other two: neither counts
    assert [len(body) for _, _, body in loops] == [40, 100]
    row = sm.model(dict(id="x", cc=90, registers=128, shared=83072), sass, num_warps=8)
    assert row["loop_instructions"] == 40 and [x["instructions"] for x in row["loops"]] == [40, 100]
    # one HGMMA.64x128x16 per warpgroup, two warpgroups: 2·64·128·16·2 flops at 4096 a clock
    assert row["tensor_cycles"] == 2 * 64 * 128 * 16 * 2 / 4096
    assert row["issue_cycles"] == 40 * 8 / 4
    assert row["ctas_per_sm"] == 2 and row["ceiling"] == min(1.0, 128 / 80)
    assert row["loops"][1]["ceiling"] == 128 / 200
    assert sm._others(row) == "100 → 0.64"
    # the first loop in address order is the one reported (kernels/syrk.py emits its fast loop
    # first), even where it is not the smallest
    row = sm.model(dict(id="x", cc=90, registers=128, shared=83072), _kernel(100, 40), num_warps=8)
    assert row["loop_instructions"] == 100 and sm._others(row) == "40 → 1.00"


def test_ctas_per_sm_count_the_shared_memory_the_driver_reserves(sm):
    sass = _kernel(40, 100)
    # 2 × 116,480 B fit in 228 KB, but not with the driver's 1 KB per CTA: one CTA, and a loop
    # that waits for its own wgmma then runs serially: T / (T + I)
    row = sm.model(dict(id="x", cc=90, registers=128, shared=116480), sass, num_warps=8)
    assert row["ctas_per_sm"] == 1 and row["waits_for_mma"]
    assert row["ceiling"] == 128 / (128 + 80)
    # registers bound it too: 129 rounds up to 136 a thread, 256 threads → one CTA
    assert sm.model(dict(id="x", cc=90, registers=129, shared=1024), sass, num_warps=8)["ctas_per_sm"] == 1
    # without the wait for its own wgmma the loop overlaps even alone
    row = sm.model(dict(id="x", cc=90, registers=200, shared=116480), _kernel(40, 100, wait0=False), num_warps=8)
    assert row["ctas_per_sm"] == 1 and not row["waits_for_mma"] and row["ceiling"] == 1.0


def test_no_matrix_loop(sm):
    sass = _sass([(0x100, "IMAD R1, R1, 0x2, RZ"), (0x110, "BRA 0x100")])
    row = sm.model(dict(id="x", cc=90, registers=32, shared=0), sass, num_warps=4)
    assert row["loop_instructions"] == 0 and row["ceiling"] != row["ceiling"]  # nan
