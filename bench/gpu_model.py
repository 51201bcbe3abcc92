"""Predicted H200 times of the moment update, from byte and flop counts (no GPU needed).

Owns: the predictions that NOTES.md records and that ``bench/gpu_table.py`` prints beside
each measurement, so the first lent device checks a model instead of a guess.

    python bench/gpu_model.py            # the NOTES.md table (markdown)

Model (each line an assumption the measurement can refute):

- H200: dense bf16/fp16 989 TFLOP/s, TF32 494, fp32 FMA 67; HBM 4.3 TB/s (what a
  device-to-device copy reached on these machines, not the 4.8 of the data sheet); 132 SMs;
  60 MB of L2. ``torch.mm`` reaches 80 % of the tensor peak when compute-bound (788 TFLOP/s
  was measured at 8192³ bf16 on these machines) and the HBM rate when not.
- Host: 5 µs per PyTorch op launched, 10 µs per Triton launch (argument binding, autotuner
  lookup), 10 µs per host sync beyond the wait. A segment between two syncs costs the larger
  of its host time and its GPU time (work is queued ahead); a sync drains the queue.
- The symmetric update (``triton`` backend) as the code stands (``today``): row stats read
  x twice (norm loop, then the column-sum loop), P = N/32 partial sums (fp32) summed in fp64;
  the main pass computes nb(nb+1)/2 tiles of 128 × 128 (nb = ⌈D/128⌉) at a ceiling of 33 % of
  the tensor peak (bench/sass_model.py on the sm_90 SASS: 519 instructions per loop step
  around 4 HGMMA, `wait 0`, one CTA per SM), in whole waves of 132 programs; x comes from HBM once when
  it fits in half the L2, else once per two tile columns; the S row splits write S·D² fp32
  partials that torch sums (read, then the sum written and read again); mirror and unshift
  pass over D² fp32 six times; ≈ 22 launches (2 Triton)
  and 3 syncs (bincount's min/max, ``counts.tolist()``) per update.
- ``target``: issue 14's goals: row stats read x once, ≤ 4 launches, no sync, a main-loop
  ceiling of 70 %, splits in whole waves, one epilogue (the S partials read once, the D²
  result written once and read once by the merge).
- The docs/spec.md §5 pipeline (x/‖x‖, mean, subtract, ``y.T @ y``): 8 passes of N·D elements
  (norm, divide read+write, mean, subtract read+write, the product's two operands) and
  ``torch.mm``'s flops, 5 launches.
- fp32 rows: ``torch.mm`` and ours both IEEE fp32 on the FMA units (67 TFLOP/s, the same
  ceilings); ``triton/tf32`` in gpu_table.py uses the TF32 peak.
- TFLOP/s are "effective": 2·N·D² / t for every row, as in gpu_table.py, so the symmetric
  update can exceed the hardware rate.
"""
from __future__ import annotations

import math

PEAK = {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}
HBM = 4.3e12
SMS = 132
L2 = 60e6
MM_EFF = 0.80
HOST_OP, HOST_TRITON, HOST_SYNC = 5e-6, 10e-6, 10e-6
BLOCK_M = 128
BYTES = {"bf16": 2, "fp16": 2, "tf32": 4, "fp32": 4}

SCENARIOS = {
    "today": dict(row_reads=2, ceiling=0.33, torch_ops=20, triton=2, syncs=3, partial_reads=2,
                  d2_passes=6, whole_waves=False),
    "target": dict(row_reads=1, ceiling=0.70, torch_ops=1, triton=3, syncs=0, partial_reads=1,
                   d2_passes=2, whole_waves=True),
}
#: the shapes of gpu_table.py
SHAPES = [(16384, 1024), (65536, 128), (4096, 4096), (65536, 4096)]


def _splits(n: int, tiles: int, d_out: int) -> int:
    """The launcher's row-split rule (backends/triton.py ``_num_splits``)."""
    want = math.ceil(2 * SMS / max(tiles, 1))
    return max(1, min(want, max(1, n // 256), max(1, (256 << 20) // max(1, 4 * d_out))))


def mm_time(n: int, d: int, kind: str) -> float:
    """``x.T @ x``: compute- or HBM-bound, plus one launch."""
    b = BYTES[kind]
    flops = 2 * n * d * d
    return max(flops / (MM_EFF * PEAK[kind]), (2 * n * d * b + d * d * b) / HBM) + HOST_OP


def pipeline_time(n: int, d: int, kind: str) -> float:
    b = BYTES[kind]
    passes = 6 * n * d * b / HBM  # the elementwise passes; the product's reads are in mm_time
    return passes + mm_time(n, d, kind) + 4 * HOST_OP


def ours_time(n: int, d: int, kind: str, scenario: str = "today") -> dict:
    """Predicted parts of one ``batch_stats`` on the Triton path (seconds)."""
    s = SCENARIOS[scenario]
    b = BYTES[kind]
    x_bytes = n * d * b
    nb = math.ceil(d / BLOCK_M)
    tiles = nb * (nb + 1) // 2
    splits = _splits(n, tiles, d * d)
    # row stats: reads of x, P partial rows written and read back (fp32)
    p_rows = math.ceil(n / 32)
    t_rows = (s["row_reads"] * x_bytes + 2 * p_rows * d * 4) / HBM
    # main pass: whole waves of one program per SM; compute at the ceiling or HBM
    programs = tiles * splits
    wave_eff = 1.0 if s["whole_waves"] else programs / (math.ceil(programs / SMS) * SMS)
    flops = 2 * n * BLOCK_M * BLOCK_M * tiles
    t_compute = flops / (s["ceiling"] * PEAK[kind] * wave_eff)
    main_bytes = x_bytes * (1 if x_bytes <= L2 / 2 else max(1, nb / 2))
    t_main = max(t_compute, main_bytes / HBM)
    # epilogue: partials written, read (and, today, the summed copy written and read again),
    # mirror and unshift over D² fp32
    t_epi = ((1 + s["partial_reads"]) * splits * d * d * 4 + s["d2_passes"] * d * d * 4) / HBM
    gpu = t_rows + t_main + t_epi
    host = s["torch_ops"] * HOST_OP + s["triton"] * HOST_TRITON
    total = max(gpu, host) + s["syncs"] * HOST_SYNC
    return dict(total=total, gpu=gpu, host=host, rows=t_rows, main=t_main, epilogue=t_epi,
                splits=splits, programs=programs, wave_eff=wave_eff)


def predictions(shapes=SHAPES, kinds=("bf16", "fp32")):
    """Rows of dicts: shape, operand kind, predicted ms and ratios, per scenario."""
    rows = []
    for n, d in shapes:
        for kind in kinds:
            mm, pipe = mm_time(n, d, kind), pipeline_time(n, d, kind)
            row = dict(n=n, d=d, kind=kind, mm_ms=mm * 1e3, pipeline_ms=pipe * 1e3)
            for sc in SCENARIOS:
                t = ours_time(n, d, kind, sc)
                row[sc] = dict(ms=t["total"] * 1e3, tflops=2 * n * d * d / t["total"] / 1e12,
                               vs_mm=mm / t["total"], vs_pipeline=pipe / t["total"],
                               bound="host" if t["host"] > t["gpu"] else
                               "compute" if t["main"] > t["rows"] + t["epilogue"] else "memory")
            rows.append(row)
    return rows


def predicted_ms(n: int, d: int, dtype: str, impl: str) -> float:
    """The prediction gpu_table.py prints beside a measurement (nan where there is none).
    ``dtype``: "bf16" or "fp32"; ``impl``: "mm", "pipeline", "triton", "triton/tf32"."""
    kind = {"bf16": "bf16", "fp16": "fp16"}.get(dtype, "fp32")
    # torch.mm in fp32 stays IEEE (torch's default: allow_tf32 off)
    if impl == "mm":
        return mm_time(n, d, kind) * 1e3
    if impl == "pipeline":
        return pipeline_time(n, d, kind) * 1e3
    if impl == "triton":
        return ours_time(n, d, kind)["total"] * 1e3
    if impl == "triton/tf32":
        return ours_time(n, d, "tf32")["total"] * 1e3
    return float("nan")


def markdown() -> str:
    lines = ["| N × D | operands | torch.mm µs | pipeline µs | ours today: µs, TFLOP/s, × mm, × pipeline, bound "
             "| ours at issue 14's targets: µs, TFLOP/s, × mm, × pipeline, bound |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in predictions():
        cells = []
        for sc in SCENARIOS:
            p = r[sc]
            cells.append(f"{p['ms'] * 1e3:,.0f}, {p['tflops']:,.0f}, {p['vs_mm']:.2f}×, "
                         f"{p['vs_pipeline']:.2f}×, {p['bound']}")
        lines.append(f"| {r['n']} × {r['d']} | {r['kind']} | {r['mm_ms'] * 1e3:,.0f} | "
                     f"{r['pipeline_ms'] * 1e3:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
