"""Static SASS model of the Triton main loop: an issue-bound ceiling per kernel × config.

Owns: reading the machine code that ``crh_kernels.backends.triton_aot`` compiles (the launcher's
own calls, specialized as at run time) and turning its main loop into a ceiling on the tensor
units, without a GPU. Issue 14 asks for ≥ 0.70 for the main bf16 config at D ≥ 1024 on sm_90.

    python bench/sass_model.py                     # matrix kernels, aligned D, sm_90 (markdown)
    python bench/sass_model.py --layout D1000 --cc 80
    python bench/sass_model.py --json --only syrk-bf16-det-128x32w8s2r128-aligned-sm90

Per case: a matrix loop is an innermost backward branch of the SASS whose body holds matrix
instructions (HGMMA on sm_90, HMMA on sm_80). kernels/syrk.py (and cross.py) have more than one:
the fast loop, which every split whose rows all count runs (no masked, skipped or tiny row),
and the general loop (such rows, the ragged last chunk; two copies, with and without the
pre-factor of tiny rows). Each is modeled; ``ceiling`` is the fast loop's (what an ordinary
batch runs: the first matrix loop in address order, as the kernel emits it first; its body has
no row select); ``loops`` lists every matrix loop in address order and the table prints the
others beside it. Per loop step of one CTA:

- tensor cycles T = the step's flops / the SM's dense rate per clock (sm_90: 4096 bf16/fp16,
  2048 TF32 flops per clock per SM, i.e. 989 / 494 TFLOP/s on 132 SMs at 1.83 GHz; sm_80:
  2048 / 1024, A100's 312 / 156 TFLOP/s on 108 SMs at 1.41 GHz). The step's flops: per HGMMA
  m×n×k, 2·m·n·k per warpgroup; per HMMA m×n×k, 2·m·n·k per warp.
- issue cycles I = loop instructions × warps of the CTA / 4 (four schedulers per SM, one
  instruction per clock each; every warp runs every instruction of the loop).
- CTAs per SM from registers (rounded up to 8 per thread; 65,536 per SM) and shared memory
  (228 KB per SM on sm_90, 164 KB on sm_80, of which the driver reserves 1 KB per CTA), at
  most 64 warps. Registers and shared memory are the kernel's (ptxas's maximum): every loop
  runs with them.
- ceiling: when the loop waits for its own MMAs (``WARPGROUP.DEPBAR.LE gsb0, 0x0``: wgmma
  ``wait 0``) and one CTA fills the SM, nothing overlaps the MMA: T / (T + I). Otherwise the
  issue of one CTA or warpgroup overlaps the MMA of another: min(1, T / I). (Two CTAs that
  each wait for their own wgmma overlap one's issue with the other's MMA only as far as the
  scheduler interleaves them: the bound assumes it does.)

Assumptions this cannot check: no memory stalls (operands arrive in time: the pipeline's
stages are full), no bank conflicts, every SASS instruction issues in one cycle, the MMA runs
at its dense peak. The ceiling is an upper bound of the fraction of tensor peak, not a time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

# run as a script from a checkout: the package lives one level up
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RATE = {(90, "16"): 4096, (90, "tf32"): 2048, (80, "16"): 2048, (80, "tf32"): 1024}
SMEM_PER_SM = {90: 228 * 1024, 80: 164 * 1024}
SMEM_RESERVED_PER_CTA = 1024  # the driver's, on sm_80 and later
# "/*55a0*/  @!P4 HGMMA.64x128x16.F32.BF16 R88, R152, gdesc[UR16].tnspB, R88 ;"
_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")


def sass_of(cubin: bytes) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def parse(sass: str):
    """[(address, opcode, operands)] of every instruction."""
    return [(int(m.group(1), 16), m.group(3), m.group(4).strip()) for m in _LINE.finditer(sass)]


def _mma_flops(op: str) -> int:
    """Flops of one matrix instruction per issuing unit (warpgroup for HGMMA, warp for HMMA)."""
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", op)
    if m:
        a, b, c = map(int, m.groups())
        return 2 * a * b * c
    m = re.match(r"HMMA\.16(8)(\d+)", op)  # HMMA.16816: m16 n8 k16; HMMA.1688: k8
    if m:
        return 2 * 16 * 8 * int(m.group(2))
    return 0


def matrix_loops(instrs):
    """Every innermost backward-branch loop whose body holds matrix instructions, in address
    order: [(start address, end address, [instructions])]."""
    found = []
    for addr, op, args in instrs:
        if not op.startswith("BRA"):
            continue
        m = re.match(r"(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))", args)
        if not m or m.group(1) is None:
            continue
        target = int(m.group(1), 16)
        if target >= addr:
            continue
        body = [i for i in instrs if target <= i[0] <= addr]
        if any(i[1].startswith(("HGMMA", "HMMA")) for i in body):
            found.append((target, addr, body))
    # innermost: no other matrix loop inside it
    inner = [f for f in found if not any(g is not f and f[0] <= g[0] and g[1] <= f[1] for g in found)]
    return sorted(inner, key=lambda f: f[0])


def main_loop(instrs):
    """The first matrix loop in address order (the fast loop of kernels/syrk.py): (start
    address, end address, [instructions]) or None."""
    loops = matrix_loops(instrs)
    return loops[0] if loops else None


def _loop_model(body, cc: int, num_warps: int, ctas: int) -> dict:
    body = [i for i in body if i[1] != "NOP"]
    mma = [i for i in body if i[1].startswith(("HGMMA", "HMMA"))]
    per_unit = num_warps // 4 if cc == 90 else num_warps  # warpgroups issue HGMMA, warps HMMA
    # in a warpgroup each of its 4 warps runs the HGMMA line: the SASS line is per warpgroup
    flops = sum(_mma_flops(i[1]) for i in mma) * per_unit
    kind = "tf32" if any(".TF32" in i[1] for i in mma) else "16"
    tensor = flops / RATE[(cc, kind)]
    issue = len(body) * num_warps / 4
    waits0 = any(i[1].startswith("WARPGROUP.DEPBAR") and i[2].endswith("0x0") for i in body)
    serial = waits0 and ctas <= 1
    ceiling = tensor / (tensor + issue) if serial else min(1.0, tensor / issue)
    ops = Counter(i[1].split(".")[0] for i in body)
    return dict(loop_instructions=len(body), mma=len(mma), mma_op=mma[0][1] if mma else "",
                tensor_cycles=tensor, issue_cycles=issue, waits_for_mma=waits0, ceiling=ceiling,
                top_ops=", ".join(f"{k} {v}" for k, v in ops.most_common(8)))


def model(result: dict, sass: str, num_warps: int) -> dict:
    """The ceiling of one compiled case (``result``: triton_aot's AotResult as a dict)."""
    cc = result["cc"]
    loops = matrix_loops(parse(sass))
    out = dict(id=result["id"], registers=result["registers"], shared=result["shared"], warps=num_warps)
    if not loops:
        return dict(out, loop_instructions=0, ceiling=float("nan"), note="no matrix loop found")
    regs = math.ceil(result["registers"] / 8) * 8
    ctas = min(65536 // (regs * 32 * num_warps),
               SMEM_PER_SM[cc] // (max(result["shared"], 0) + SMEM_RESERVED_PER_CTA), 64 // num_warps)
    each = [_loop_model(body, cc, num_warps, ctas) for _, _, body in loops]
    return dict(out, **each[0], ctas_per_sm=ctas,
                loops=[dict(instructions=r["loop_instructions"], mma=r["mma"], ceiling=r["ceiling"]) for r in each])


def run(only=None, layout="aligned", cc=90, kernels=("syrk", "cross"), dtypes=("bf16", "fp16", "fp32")):
    """Compile and model the selected cases (needs real ``triton.jit``: no TRITON_INTERPRET)."""
    from crh_kernels.backends import triton_aot as aot

    rows = []
    for job in aot.jobs():
        case = job[0]
        if only is not None:
            if case.id not in only:
                continue
        elif (case.kernel not in kernels or case.layout != layout or case.cc != cc or case.dtype not in dtypes
              or (case.dtype == "fp32" and case.precision != "tf32")):
            continue
        result, compiled = aot.build(job)
        row = model(vars(result), sass_of(compiled.asm["cubin"]), compiled.metadata.num_warps)
        rows.append(dict(row, kernel=case.kernel, dtype=case.dtype, precision=case.precision,
                         variant=case.variant, config=case.config, layout=case.layout, cc=case.cc))
    return rows


def _others(r) -> str:
    """The matrix loops after the modeled one: "instructions → ceiling", comma-separated."""
    return ", ".join(f"{x['instructions']} → {x['ceiling']:.2f}" for x in r.get("loops", ())[1:]) or "—"


def markdown(rows) -> str:
    lines = ["| kernel | operands | variant | config | loop instr. | MMA / step | REG | CTAs/SM | wait 0 "
             "| T cycles | I cycles | ceiling | other matrix loops (instr. → ceiling) | most frequent in the loop |",
             "| --- " * 14 + "|"]
    for r in rows:
        ops = r["dtype"] + (" (tf32)" if r["dtype"] == "fp32" else "")
        lines.append(f"| {r['kernel']} | {ops} | {r['variant'] or '—'} | {r['config']} | {r['loop_instructions']} "
                     f"| {r.get('mma', 0)} × {r.get('mma_op', '').split('.')[1] if r.get('mma_op') else '—'} "
                     f"| {r['registers']} | {r.get('ctas_per_sm', '—')} | {'yes' if r.get('waits_for_mma') else 'no'} "
                     f"| {r.get('tensor_cycles', 0):.0f} | {r.get('issue_cycles', 0):.0f} | {r['ceiling']:.2f} "
                     f"| {_others(r)} | {r.get('top_ops', '')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/sass_model.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", default="aligned", help="aligned, D1000 or D1025 (triton_aot.LAYOUTS)")
    p.add_argument("--cc", type=int, default=90, choices=(80, 90))
    p.add_argument("--only", help="comma-separated case ids of triton_aot (overrides the filters)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON (one line)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0"):
        p.error("unset TRITON_INTERPRET: the model compiles the GPU kernels")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    rows = run(only=set(args.only.split(",")) if args.only else None, layout=args.layout, cc=args.cc)
    if args.json:
        print(json.dumps(rows))
    else:
        import triton

        print(f"triton {triton.__version__}, sm_{args.cc}, layout {args.layout}: issue-bound ceiling of the "
              f"main loop as a fraction of the tensor peak (bench/sass_model.py's docstring)\n")
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
