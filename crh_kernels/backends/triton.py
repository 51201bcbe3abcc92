"""Launchers for the Triton kernels: argument checks, grids, configs, the custom ops, the backend.

Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before import
(then a single small config is used, and 16-bit operands are rounded then multiplied in fp32
because the interpreter's 16-bit ``tl.dot`` is wrong).

One update (``crh_triton::update``, :meth:`TritonBackend.update_state`) is four launches and no
host sync: pass 1 (``_row_stats_kernel``: status, scales, per-program counts and column sums,
x read once), its totals (``_batch_totals_kernel``: counts, batch mean, shift; it also zeroes
the atomic accumulator), the main pass (``_scatter_upper_kernel``) and the epilogue
(``_epilogue_kernel``: split sum, unshift, mirror, merge into a new state). The counts stay on
the device; the custom ops have fake kernels, so the path runs under ``FakeTensorMode`` and
``torch.compile``. Every other torch call here allocates (``torch.empty``) or views.

Configs: the main pass and the cross kernel autotune over the configs :func:`mm_configs`
admits for the launch's class (:class:`MMCase`: target, alignment of x, atomics, int64
offsets), one autotuner per class; ``tests/test_aot.py`` compiles every config each class can
pick, for sm_80 and sm_90, and asserts that none spills registers.

Grids: pass 1 runs at most four programs per SM (a whole number of waves once N is large); the
main pass's row splits are chosen by :func:`_wave_splits` so that its programs fill whole waves
of one CTA per SM (the sm_90 main configs run two: half-waves there). Offsets are int32 unless
an element offset of an input can reach 2^31 (:func:`_needs_int64`), then int64 (no copy of the
input).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _env
from ..kernels.cross import _cross_scatter_kernel
from ..kernels.merge import _epilogue_kernel
from ..kernels.row_stats import _batch_totals_kernel, _row_stats_kernel
from ..kernels.syrk import _scatter_upper_kernel
from .base import ROW_SKIPPED, ROW_VALID, Backend, BatchStats, CrossStats, MergedState

INTERPRET = _env.triton_interpret()

_DOT_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# Interpreter: one config (autotuning needs a GPU). GPU: a few tile shapes, tuned per D and dtype.
_INTERP_MM = dict(BLOCK_M=64, BLOCK_K=32)
# Pass 1 keeps a tile of BLOCK_N whole rows (BLOCK_D = D rounded up to a power of two) in
# registers when BLOCK_D <= _ONE_READ_MAX_D: BLOCK_N·BLOCK_D = _ROW_TILE_PER_THREAD elements
# per thread (more raise the registers past what the cap below holds without spills, see
# tests/test_aot.py); wider rows go in chunks of _WIDE_BLOCK_D columns, BLOCK_N = _WIDE_BLOCK_N.
_ROW_TILE_PER_THREAD = 16
_ONE_READ_MAX_D = 4096
_WIDE_BLOCK_N = 8
_WIDE_BLOCK_D = 64 if INTERPRET else 512
_MAX_BLOCK_N = 64
# a column-major view (a transposed x: unit row stride) is read coalesced along the rows: its
# tiles take at least this many rows, so it is read once only for D up to _ROW_TILE/32, and
# otherwise in chunks of _COLUMN_MAJOR_BLOCK_D columns
_COLUMN_MAJOR_ROWS = 32
_COLUMN_MAJOR_BLOCK_D = 64 if INTERPRET else 128
# maxnreg: row_stats' rare second look (docs/spec.md §1) would otherwise raise the registers of the
# whole kernel on sm_90 (fewer blocks per SM); capped, it needs no spills (tests/test_aot.py)
_GPU_ROWS = dict(maxnreg=168)
# pass 1's programs: at most this many per SM
_ROW_PROGRAMS_PER_SM = 4
# pass 1 totals: BLOCK_P partials × BLOCK_D columns per step (float64)
_TOTALS = dict(BLOCK_P=32, BLOCK_D=64)
# the epilogue's tile: it must divide every BLOCK_M of the main pass (64, 128); 8 warps keep
# its float64 tiles (sum, old state, merged) in registers at unaligned D
_EPILOGUE_BLOCK = 32
_GPU_EPILOGUE = dict(num_warps=8)


class MMCase(NamedTuple):
    """What the matrix kernels' configs depend on (:func:`mm_configs`): one launch's class.

    ``kernel`` "syrk" or "cross"; ``bits`` the operand width (16: bf16/fp16, 32: fp32);
    ``precision`` "ieee" or "tf32" (fp32 operands); ``cc`` the compute capability (80 for
    sm_80); ``aligned``: every operand is a row-major view whose width, row stride and base
    address are multiples of 16 (elements, elements, bytes: what Triton's specialization
    marks divisible, so the loads vectorize), else unaligned; ``atomic``: the main pass sums
    its row splits with atomics (``CRH_TRITON_ATOMICS``; False for cross); ``int64``: int64
    offsets (the ``INT64`` constexpr)."""

    kernel: str
    bits: int
    precision: str
    cc: int
    aligned: bool
    atomic: bool
    int64: bool


# Where a config runs without register spills (STACK = LOCAL = 0 in ptxas' report, for Triton
# 3.9 and 3.6, sm_80 and sm_90: tests/test_aot.py compiles every config each class can pick).
# At unaligned D the loads do not vectorize: one address and one mask per element raise the
# registers of every tile shape, and the atomic variant's masked per-element adds more; ptxas
# then also trades a few spilled registers for occupancy in the small configs (STACK 8 at 64
# or 80 registers) unless ``maxnreg`` fixes its register budget.


def _anywhere(c: MMCase) -> bool:
    return True


def _aligned(c: MMCase) -> bool:
    return c.aligned


def _aligned_or_syrk_det(c: MMCase) -> bool:
    return c.aligned or (c.kernel == "syrk" and not c.atomic)


def _syrk_sm90_aligned(c: MMCase) -> bool:
    return c.kernel == "syrk" and c.cc >= 90 and c.aligned and not c.int64


def _syrk_sm90_aligned_tf32(c: MMCase) -> bool:
    return _syrk_sm90_aligned(c) and c.precision == "tf32"


def _mm(block_m: int, block_k: int, warps: int, stages: int, where, maxnreg: Optional[int] = None):
    cfg = triton.Config({"BLOCK_M": block_m, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages,
                        maxnreg=maxnreg)
    return cfg, where


# The main pass's autotune configs per operand width, each with where it may run
# (:func:`mm_configs`); the first that runs is the class's main config (bench/gpu_pin.py pins
# it), the last runs everywhere. 16-bit operands: up to 64 KB of shared memory per stage set;
# fp32 operands are twice as wide, so shorter K chunks keep them under sm_80's 163 KB (checked
# by tests/test_aot.py). Every 16-bit and TF32 config feeds the matrix units (wgmma on
# sm_90, mma.sync on sm_80; asserted there too).
_GPU_MM_CONFIGS = {
    16: [
        # the main config of the symmetric pass on sm_90: 128 registers × 256 threads and 83 KB
        # of shared memory, 2 CTAs per SM (one CTA's wgmma wait overlaps the other's issue)
        _mm(128, 32, 8, 2, _syrk_sm90_aligned, maxnreg=128),
        _mm(128, 64, 8, 3, _aligned),  # the main config elsewhere
        _mm(128, 32, 8, 4, _aligned_or_syrk_det),
        _mm(64, 64, 4, 3, _aligned),
        _mm(64, 32, 8, 3, _anywhere),  # ≤ 130 registers: the margin for unaligned D and atomics
    ],
    32: [
        # TF32 on sm_90, as the 16-bit main config: 128 registers, 2 CTAs per SM
        _mm(128, 16, 8, 2, _syrk_sm90_aligned_tf32, maxnreg=128),
        _mm(128, 32, 8, 3, _aligned),
        _mm(128, 16, 8, 4, _aligned),
        # IEEE fp32 runs on the FMA units and takes every register it is given (≈ 255 at
        # 64 × 32): 64 × 16 stays near 200; maxnreg=255 keeps ptxas from trading spills for
        # occupancy (STACK 8 at 64 registers without it)
        _mm(64, 16, 8, 3, _anywhere, maxnreg=255),
    ],
}


def mm_configs(case: MMCase) -> List[triton.Config]:
    """The autotune configs the main pass (``case.kernel`` "syrk") or the cross kernel may run
    with for a launch of class ``case``: the entries of ``_GPU_MM_CONFIGS[case.bits]`` whose
    rule admits it, in their order. The one pruning rule: the launcher builds each class's
    autotuner from it and ``backends/triton_aot.py`` compiles what it returns. Targets other
    than sm_80 and sm_90 (not compiled ahead of time) take sm_90's rules from cc 90 on, sm_80's
    below."""
    return [cfg for cfg, where in _GPU_MM_CONFIGS[case.bits] if where(case)]


# the cross moment's row splits are chosen before autotuning picks BLOCK_M: for this one
_SPLIT_BLOCK_M = 64 if INTERPRET else 128
_MAX_SPLIT_BYTES = 256 << 20
# a split of the main pass takes at least this many rows
_MIN_SPLIT_ROWS = 256
# and the main pass at most this many waves (split partials cost memory traffic)
_MAX_WAVES = 8


_MM_KERNELS = {
    "syrk": (_scatter_upper_kernel, ["D", "INPUT_PRECISION", "USE_ATOMIC", "INT64"]),
    "cross": (_cross_scatter_kernel, ["DG", "DH", "INPUT_PRECISION", "INT64"]),
}
_TUNERS: dict = {}


def _tuner(case: MMCase):
    """The kernel to launch for ``case``: itself under the interpreter (one config, autotuning
    needs a GPU), else an autotuner over :func:`mm_configs` (one per class, built once; they
    share the kernel's compile cache)."""
    kernel, key = _MM_KERNELS[case.kernel]
    if INTERPRET:
        return kernel
    tuner = _TUNERS.get(case)
    if tuner is None:
        configs = mm_configs(case)
        if not configs:
            raise RuntimeError(f"no main-pass config admits {case} (backends/triton.py _GPU_MM_CONFIGS)")
        tuner = _TUNERS[case] = triton.autotune(configs=configs, key=key, reset_to_zero=["out_ptr"])(kernel)
    return tuner


def _capability(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _aligned_view(x: torch.Tensor) -> bool:
    """Row-major with width, row stride and base address multiples of 16 (elements, elements,
    bytes). A fake tensor (FakeTensorMode) has address 0: its view offset stands for it, as
    the AOT check's stand-ins do."""
    from torch._subclasses.fake_tensor import is_fake

    address = x.storage_offset() * x.element_size() if is_fake(x) else x.data_ptr()
    return x.stride(1) == 1 and x.shape[1] % 16 == 0 and x.stride(0) % 16 == 0 and address % 16 == 0


def _mm_case(kernel: str, views, fp32_precision: str, atomic: bool, int64: bool) -> MMCase:
    x = views[0]
    cc = _capability(x.device) if x.is_cuda else 0
    return MMCase(kernel, _bits(x.dtype), fp32_precision if x.dtype == torch.float32 else "ieee", cc,
                  all(_aligned_view(v) for v in views), bool(atomic) and kernel == "syrk", bool(int64))


def _bits(dtype: torch.dtype) -> int:
    return 32 if dtype == torch.float32 else 16


def _check_matrix(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.dtype not in _DOT_DTYPE:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if not (x.is_cuda or (INTERPRET and x.device.type == "cpu")):
        raise ValueError(f"{name} must be a CUDA tensor (or a CPU tensor under TRITON_INTERPRET=1), "
                         f"got device {x.device}")


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


_INT32_LIMIT = 2 ** 31


def _needs_int64(shape, strides) -> bool:
    """Whether an element offset ``Σ_k (shape_k − 1)·stride_k`` of a view can reach 2^31, so
    that the kernels must compute offsets in int64 (the ``INT64`` constexpr). Torch strides are
    never negative; an empty view has no offset."""
    if any(n == 0 for n in shape):
        return False
    return sum((n - 1) * abs(st) for n, st in zip(shape, strides)) >= _INT32_LIMIT


def _int64_for(*views) -> bool:
    return any(v is not None and _needs_int64(v.shape, v.stride()) for v in views)


def _wave_splits(tiles: int, sms: int, max_splits: int) -> int:
    """Row splits ``s`` in ``[1, max_splits]`` for ``tiles`` output tiles on ``sms`` SMs, one
    program per SM at a time: the smallest ``s`` that minimizes the modeled time
    ``⌈tiles·s / sms⌉ / s`` (waves, each 1/s of the rows). A program count that is a multiple
    of ``sms`` reaches the bound ``tiles/sms``; below one wave, the most splits allowed win."""
    best, best_t = 1, math.inf
    for s in range(1, max(1, max_splits) + 1):
        t = math.ceil(tiles * s / sms) / s
        if t < best_t * (1 - 1e-12):
            best, best_t = s, t
    return best


def _num_splits(n: int, tiles: int, d_out: int, sms: int, atomic: bool = False) -> int:
    """The main pass's row splits for ``n`` rows and ``tiles`` output tiles on ``sms`` SMs:
    :func:`_wave_splits` within the bounds of at least ``_MIN_SPLIT_ROWS`` rows per split, at
    most ``_MAX_WAVES`` waves and (deterministic reduction) ``_MAX_SPLIT_BYTES`` of fp32
    partials of ``d_out`` entries each."""
    limit = min(max(1, n // _MIN_SPLIT_ROWS), max(1, _MAX_WAVES * sms // max(tiles, 1)))
    if not atomic:
        limit = min(limit, max(1, _MAX_SPLIT_BYTES // max(1, 4 * d_out)))
    return _wave_splits(tiles, sms, limit)


def _tiles(d: int, block_m: int) -> int:
    nb = triton.cdiv(d, block_m)
    return nb * (nb + 1) // 2


def _block_ms(case: MMCase) -> List[int]:
    """The BLOCK_M of every config the main pass may launch with for ``case``."""
    if INTERPRET:
        return [_INTERP_MM["BLOCK_M"]]
    return sorted({c.kwargs["BLOCK_M"] for c in mm_configs(case)})


def _row_config(d: int, n: int, sms: int, column_major: bool = False) -> dict:
    """Pass 1's constexprs and grid for rows of width ``d``: one read of x when a whole row
    fits ``_ONE_READ_MAX_D`` (and, ``column_major``, a tile of ``_COLUMN_MAJOR_ROWS`` such rows
    fits the registers), else chunks; ``ROWS`` rows per program, at most
    ``_ROW_PROGRAMS_PER_SM`` programs per SM."""
    block_d = max(16, triton.next_power_of_2(d))
    num_warps = 4 if block_d <= 512 else 8
    tile = _ROW_TILE_PER_THREAD * 32 * num_warps
    min_rows = _COLUMN_MAJOR_ROWS if column_major else 1
    if block_d <= _ONE_READ_MAX_D and tile // block_d >= min_rows:
        one_read = True
        block_n = max(1, min(_MAX_BLOCK_N, tile // block_d))
    elif column_major:
        one_read, block_n, block_d, num_warps = False, _COLUMN_MAJOR_ROWS, _COLUMN_MAJOR_BLOCK_D, 4
    else:
        one_read, block_n, block_d, num_warps = False, _WIDE_BLOCK_N, _WIDE_BLOCK_D, 4
    tiles = triton.cdiv(max(n, 1), block_n)
    per_program = triton.cdiv(tiles, min(tiles, _ROW_PROGRAMS_PER_SM * sms))
    rows = per_program * block_n
    cfg = dict(ONE_READ=one_read, BLOCK_N=block_n, BLOCK_D=block_d)
    if not INTERPRET:
        cfg.update(_GPU_ROWS, num_warps=num_warps)
    return dict(cfg=cfg, rows=rows, programs=triton.cdiv(max(n, 1), rows))


def _pass1(x: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool,
           gate: Optional[torch.Tensor] = None, with_sum: bool = True):
    """Launch pass 1: ``scale`` (N,) fp32, ``status`` (N,) uint8, ``psum`` (P, D) float64 and
    ``pcount`` (P, 3) int32 (valid rows, skipped rows, 1 when a tiny row), P programs."""
    _check_matrix(x, "x")
    n, d = x.shape
    if mask is not None and (mask.shape != (n,) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a bool tensor of shape ({n},), got {mask.dtype} {tuple(mask.shape)}")
    if gate is not None and (gate.shape != (n,) or gate.dtype != torch.float32):
        raise ValueError(f"gate must be a float32 tensor of shape ({n},), got {gate.dtype} {tuple(gate.shape)}")
    rc = _row_config(d, n, _sm_count(x.device), column_major=x.stride(0) == 1 and x.stride(1) != 1)
    p = rc["programs"]
    scale = torch.empty(n, dtype=torch.float32, device=x.device)
    status = torch.empty(n, dtype=torch.uint8, device=x.device)
    psum = torch.empty(p if with_sum else 1, d, dtype=torch.float64, device=x.device)
    pcount = torch.empty(p, 3, dtype=torch.int32, device=x.device)
    # the interpreter cannot read a bool tensor through a pointer: pass uint8 (a view, with the
    # mask's own stride: a column of a 2-D mask or an expanded one is read where it lies)
    mask_arg = scale if mask is None else mask.view(torch.uint8)
    _row_stats_kernel[(p,)](
        x, mask_arg, scale if gate is None else gate, scale, status, psum, pcount,
        n, d, rc["rows"], x.stride(0), x.stride(1), 0 if mask is None else mask.stride(0),
        HAS_MASK=mask is not None, HAS_GATE=gate is not None, NORMALIZE=bool(normalize),
        WITH_SUM=with_sum, INT64=_int64_for(x, mask), **rc["cfg"],
    )
    return scale, status, psum, pcount


def row_stats(x: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool,
              gate: Optional[torch.Tensor] = None, with_sum: bool = True):
    """Per-row scale and status, and partial column sums of the scaled valid rows.

    x: (N, D) fp32/bf16/fp16, any strides; mask: (N,) bool or None, any stride (0 too);
    gate: (N,) fp32 or None
    (rows with gate == 0 do not count: they are skipped). Returns ``scale`` (N,) fp32 (0 for
    rows that do not count; negative, −2^-64/||x||, for a tiny row: kernels/row_stats.py),
    ``status`` (N,) uint8 (ROW_MASKED 0, ROW_SKIPPED 1, ROW_VALID 2
    of :mod:`crh_kernels.backends.base`), ``psum`` (P, D) float64 (its rows sum to
    Σ_valid scale_i·x_i).
    """
    scale, status, psum, _ = _pass1(x, mask, normalize, gate, with_sum)
    return scale, status, psum


def _totals(psum: torch.Tensor, pcount: torch.Tensor, d: int,
            zero: Optional[torch.Tensor] = None):
    """Launch pass 1's totals: ``counts`` (2,) int64, ``mean`` (D,) float64, ``shift`` (D,) fp32,
    ``tiny`` (1,) int32 (nonzero when a row is tiny); ``zero`` (D, D) fp32 (the atomic main
    pass's accumulator) is zeroed on the way."""
    dev = psum.device
    counts = torch.empty(2, dtype=torch.int64, device=dev)
    mean = torch.empty(d, dtype=torch.float64, device=dev)
    shift = torch.empty(d, dtype=torch.float32, device=dev)
    tiny = torch.empty(1, dtype=torch.int32, device=dev)
    _batch_totals_kernel[(triton.cdiv(d, _TOTALS["BLOCK_D"]),)](
        psum, pcount, mean, shift, counts, tiny, mean if zero is None else zero, pcount.shape[0], d,
        WITH_SUM=True, ZERO=zero is not None, **_TOTALS)
    return counts, mean, shift, tiny


def _dot_args(dtype: torch.dtype, fp32_precision: str):
    if fp32_precision not in ("ieee", "tf32"):
        raise ValueError(f"fp32_precision must be 'ieee' or 'tf32', got {fp32_precision!r}")
    return dict(DOT_DTYPE=_DOT_DTYPE[dtype],
                INPUT_PRECISION="ieee" if INTERPRET else fp32_precision,
                ROUND_ONLY=INTERPRET and dtype != torch.float32)


def _check_syrk_args(x, scale, shift):
    _check_matrix(x, "x")
    n, d = x.shape
    if scale.shape != (n,) or scale.dtype != torch.float32:
        raise ValueError(f"scale must be float32 of shape ({n},), got {scale.dtype} {tuple(scale.shape)}")
    if shift.shape != (d,) or shift.dtype != torch.float32:
        raise ValueError(f"shift must be float32 of shape ({d},), got {shift.dtype} {tuple(shift.shape)}")


def _main(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, fp32_precision: str,
          atomic: bool, acc: Optional[torch.Tensor] = None, tiny: Optional[torch.Tensor] = None):
    """Launch the main pass: ``(part, splits)``, the partial upper tiles (S, D, D) fp32 and a
    (1,) int32 that the kernel sets to the S it ran with (the autotuner picks BLOCK_M, and the
    splits follow it); with ``atomic``, ``acc`` (1, D, D), zeroed, takes every split. ``tiny``
    (1,) int32: nonzero when a scale may be negative (a tiny row, kernels/syrk.py); None: found
    from the scales (torch ops: not on the fused path, whose totals kernel writes it)."""
    n, d = x.shape
    sms = _sm_count(x.device)
    dot = _dot_args(x.dtype, fp32_precision)
    int64 = _int64_for(x)
    case = _mm_case("syrk", (x,), fp32_precision, atomic, int64)
    if tiny is None:
        tiny = (scale < 0).any().to(torch.int32).reshape(1)

    def splits_for(block_m):
        return _num_splits(n, _tiles(d, block_m), d * d, sms, atomic)

    if atomic:
        out = acc
    else:
        out = torch.empty(max(splits_for(b) for b in _block_ms(case)), d, d,
                          dtype=torch.float32, device=x.device)
    splits = torch.empty(1, dtype=torch.int32, device=x.device)

    def grid(meta):
        return (_tiles(d, meta["BLOCK_M"]), splits_for(meta["BLOCK_M"]))

    extra = dict(_INTERP_MM) if INTERPRET else {}
    _tuner(case)[grid](x, scale, shift, tiny, out, splits, n, d, x.stride(0), x.stride(1),
                       USE_ATOMIC=bool(atomic), INT64=int64, **dot, **extra)
    return out, splits


def _epilogue(part, splits, d: int, out_dtype: torch.dtype, unshift=None, state=None):
    """Launch the epilogue (:mod:`crh_kernels.kernels.merge`): the new scatter (D, D) of
    ``out_dtype``; with ``unshift = (mean_b, shift, counts_b)`` the shift is removed; with
    ``state = (counts, mean, scatter)`` the batch is merged into it and the new
    ``(scatter, mean, counts)`` returned (the state is read, never written)."""
    dev = part.device
    out = torch.empty(d, d, dtype=out_dtype, device=dev)
    mean_b, shift, counts_b = unshift if unshift is not None else (out, out, splits)
    if state is not None:
        c1, m1, s1 = state
        new_mean = torch.empty_like(m1)
        new_counts = torch.empty_like(c1)
    else:
        c1 = m1 = s1 = new_mean = new_counts = out
    _epilogue_kernel[(_tiles(d, _EPILOGUE_BLOCK),)](
        part, splits, mean_b, shift, counts_b, c1, m1, s1, out, new_mean, new_counts, d,
        UNSHIFT=unshift is not None, MERGE=state is not None, BLOCK=_EPILOGUE_BLOCK,
        **({} if INTERPRET else _GPU_EPILOGUE))
    if state is None:
        return out
    return out, new_mean, new_counts


def syrk_update(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                fp32_precision: str = "ieee", atomic: Optional[bool] = None) -> torch.Tensor:
    """Upper triangle of ``Σ_i y_i y_iᵀ``, ``y_i = scale_i·x_i − shift`` on rows with scale ≠ 0
    (a negative scale: a tiny row, ``y_i = (x_i·2^64)·|scale_i| − shift``).

    x: (N, D) fp32/bf16/fp16, any strides; scale: (N,) fp32; shift: (D,) fp32.
    Returns (D, D) fp32, exactly symmetric (upper triangle mirrored). fp32 accumulation;
    operands enter ``tl.dot`` in x's dtype (fp32: IEEE or TF32 per ``fp32_precision``).
    ``atomic`` (default ``CRH_TRITON_ATOMICS``) sums the row splits with atomics instead of a
    deterministic reduction.
    """
    _check_syrk_args(x, scale, shift)
    atomic = _env.triton_atomics() if atomic is None else atomic
    d = x.shape[1]
    acc = torch.zeros(1, d, d, dtype=torch.float32, device=x.device) if atomic else None
    part, splits = _main(x, scale, shift, fp32_precision, atomic, acc)
    return _epilogue(part, splits, d, torch.float32)


def cross_update(g, h, scale_g, scale_h, shift_g, shift_h, fp32_precision: str = "ieee",
                 tiny: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``Σ_i (s_g,i g_i − K_g)(s_h,i h_i − K_h)ᵀ`` over rows where both scales are nonzero.

    g: (N, Dg), h: (N, Dh), same dtype; scales (N,) fp32 (negative: a tiny row, as in
    :func:`syrk_update`); shifts fp32; ``tiny`` (1,) int32, nonzero when a scale may be negative
    (None: found from the scales). Returns (Dg, Dh) fp32.
    """
    _check_matrix(g, "g")
    _check_matrix(h, "h")
    if g.shape[0] != h.shape[0] or g.dtype != h.dtype:
        raise ValueError(f"g and h must share N and dtype, got {tuple(g.shape)} {g.dtype} and "
                         f"{tuple(h.shape)} {h.dtype}")
    n, dg = g.shape
    dh = h.shape[1]
    tiles = triton.cdiv(dg, _SPLIT_BLOCK_M) * triton.cdiv(dh, _SPLIT_BLOCK_M)
    splits = _num_splits(n, tiles, dg * dh, _sm_count(g.device))
    out = torch.empty(splits, dg, dh, dtype=torch.float32, device=g.device)

    def grid(meta):
        return (triton.cdiv(dg, meta["BLOCK_M"]) * triton.cdiv(dh, meta["BLOCK_M"]), splits)

    if tiny is None:
        tiny = ((scale_g < 0).any() | (scale_h < 0).any()).to(torch.int32).reshape(1)
    extra = dict(_INTERP_MM) if INTERPRET else {}
    dot = _dot_args(g.dtype, fp32_precision)
    int64 = _int64_for(g, h)
    case = _mm_case("cross", (g, h), fp32_precision, False, int64)
    _tuner(case)[grid](g, h, scale_g, scale_h, shift_g, shift_h, tiny, out, n, dg, dh,
                       g.stride(0), g.stride(1), h.stride(0), h.stride(1), INT64=int64, **dot, **extra)
    return out[0] if splits == 1 else out.sum(dim=0)


def _counts(status: torch.Tensor) -> torch.Tensor:
    """(2,) int64 on the device: valid rows, skipped rows (``n``, ``n_skipped``). No host sync
    (``torch.bincount`` on CUDA reads its input's min and max on the host)."""
    return torch.stack(((status == ROW_VALID).sum(), (status == ROW_SKIPPED).sum()))


def _fused(x, mask, normalize: bool, fp32_precision: str, state, out_dtype):
    """Pass 1, its totals, the main pass, the epilogue: four launches."""
    _check_matrix(x, "x")
    _dot_args(x.dtype, fp32_precision)  # checks the precision before any launch
    d = x.shape[1]
    atomic = _env.triton_atomics()
    acc = torch.empty(1, d, d, dtype=torch.float32, device=x.device) if atomic else None
    scale, _, psum, pcount = _pass1(x, mask, normalize)
    counts_b, mean_b, shift, tiny = _totals(psum, pcount, d, zero=acc)
    part, splits = _main(x, scale, shift, fp32_precision, atomic, acc, tiny)
    return counts_b, mean_b, _epilogue(part, splits, d, out_dtype, (mean_b, shift, counts_b), state)


def _moments_impl(x, mask, normalize, fp32_precision):
    counts, mean, scatter = _fused(x, mask, normalize, fp32_precision, None, torch.float32)
    return counts, mean, scatter


def _update_impl(x, mask, normalize, fp32_precision, counts, mean, scatter):
    counts_b, _, (new_scatter, new_mean, new_counts) = _fused(
        x, mask, normalize, fp32_precision, (counts, mean, scatter), scatter.dtype)
    return new_counts, new_mean, new_scatter, counts_b


@torch.library.custom_op("crh_triton::moments", mutates_args=())
def moments_op(x: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool,
               fp32_precision: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch statistics: ``counts`` (2,) int64 = (n, n_skipped), ``mean`` (D,) float64,
    ``scatter`` (D, D) float32 = Σ_valid (x̂ − μ)(x̂ − μ)ᵀ, exactly symmetric."""
    return _moments_impl(x, mask, normalize, fp32_precision)


@moments_op.register_fake
def _(x, mask, normalize, fp32_precision):
    d = x.shape[1]
    return (x.new_empty(2, dtype=torch.int64), x.new_empty(d, dtype=torch.float64),
            x.new_empty(d, d, dtype=torch.float32))


@torch.library.custom_op("crh_triton::update", mutates_args=())
def update_op(x: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool, fp32_precision: str,
              counts: torch.Tensor, mean: torch.Tensor, scatter: torch.Tensor
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch merged into the state ``(counts (2,) int64, mean (D,), scatter (D, D))``,
    float32 or float64, all on x's device: returns the new ``counts``, ``mean``, ``scatter``
    (the state's dtypes; new tensors, the state is only read) and the batch's ``counts``
    (2,) int64 = (n_b, n_skipped_b)."""
    return _update_impl(x, mask, normalize, fp32_precision, counts, mean, scatter)


@update_op.register_fake
def _(x, mask, normalize, fp32_precision, counts, mean, scatter):
    return (torch.empty_like(counts), torch.empty_like(mean), torch.empty_like(scatter),
            x.new_empty(2, dtype=torch.int64))


def _unshift_(c: torch.Tensor, n: torch.Tensor, mean_a, k_a, mean_b, k_b) -> torch.Tensor:
    """Σ(a−K_a)(b−K_b)ᵀ = C + n·(μ_a−K_a)(μ_b−K_b)ᵀ: remove the rounding-sized shift error."""
    d_a = (mean_a - k_a.double()).to(torch.float32)
    d_b = (mean_b - k_b.double()).to(torch.float32)
    return c.sub_(torch.outer(d_a, d_b) * n.to(torch.float32))


def _mean_from(psum: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    # zero rows give a zero mean (and then a zero scatter: every scale is 0), without a sync
    return psum.sum(dim=0, dtype=torch.float64) / n.clamp_min(1)


@torch.library.custom_op("crh_triton::cross_moments", mutates_args=())
def cross_moments_op(g: torch.Tensor, h: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool,
                     fp32_precision: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``counts`` (2,), ``mean_g`` (Dg,), ``mean_h`` (Dh,) float64 and ``C_gh`` (Dg, Dh) float32;
    a row counts only when both its g and h rows are valid."""
    scale_h0, _, _ = row_stats(h, mask, normalize, with_sum=False)
    scale_g, _, psum_g, pcount_g = _pass1(g, mask, normalize, gate=scale_h0)
    scale_h, _, psum_h, pcount_h = _pass1(h, mask, normalize, gate=scale_g)
    counts = pcount_g[:, :2].sum(dim=0, dtype=torch.int64)
    # the main pass's tiny-row switch (kernels/syrk.py): some g or h row of the batch is tiny
    tiny = torch.maximum(pcount_g[:, 2].amax(), pcount_h[:, 2].amax()).reshape(1)
    mean_g = _mean_from(psum_g, counts[0])
    mean_h = _mean_from(psum_h, counts[0])
    kg, kh = mean_g.to(torch.float32), mean_h.to(torch.float32)
    c = cross_update(g, h, scale_g, scale_h, kg, kh, fp32_precision, tiny)
    return counts, mean_g, mean_h, _unshift_(c, counts[0], mean_g, kg, mean_h, kh)


@cross_moments_op.register_fake
def _(g, h, mask, normalize, fp32_precision):
    return (g.new_empty(2, dtype=torch.int64), g.new_empty(g.shape[1], dtype=torch.float64),
            h.new_empty(h.shape[1], dtype=torch.float64), g.new_empty(g.shape[1], h.shape[1], dtype=torch.float32))


class TritonBackend(Backend):
    """The Triton kernels on CUDA tensors (or CPU tensors under the interpreter). Offers
    ``fused_update``: :meth:`update_state` builds the merged state aside in four launches
    (no host sync) and returns it for the caller to commit."""

    name = "triton"
    fused_update = True
    fused_precision = True

    def availability(self):
        if INTERPRET:
            return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1): CPU tensors, slow"
        if torch.cuda.is_available():
            return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
        return False, "no CUDA device (set TRITON_INTERPRET=1 before import to run on CPU tensors)"

    def supports(self, device):
        if device.type == "cuda" and not INTERPRET:
            return True, ""
        if device.type == "cpu" and INTERPRET:
            return True, ""
        return False, ("CPU tensors need TRITON_INTERPRET=1 set before import" if device.type == "cpu"
                       else f"{device.type} tensors are not supported")

    def batch_stats(self, x, mask, normalize, fp32_precision="ieee"):
        counts, mean, scatter = moments_op(x, mask, bool(normalize), fp32_precision)
        # 0-d views of the counts on the device: no host sync
        return BatchStats(*counts.unbind(), mean, scatter)

    def cross_stats(self, g, h, mask, normalize, fp32_precision="ieee"):
        counts, mean_g, mean_h, c = cross_moments_op(g, h, mask, bool(normalize), fp32_precision)
        return CrossStats(*counts.unbind(), mean_g, mean_h, c)

    def update_state(self, x, mask, normalize, strict, counts, mean, scatter,
                     fp32_precision="ieee"):
        """The batch merged into the state, built aside (:class:`MergedState`; ``strict`` is
        the caller's to apply: nothing is written here). None for a state the kernels do not
        take (another device, a dtype other than float32/float64, counts not int64 (2,))."""
        if not (counts.device == mean.device == scatter.device == x.device
                and scatter.dtype in (torch.float32, torch.float64) and mean.dtype == scatter.dtype
                and counts.dtype == torch.int64 and counts.shape == (2,)
                and scatter.is_contiguous() and mean.is_contiguous()):
            return None
        new_counts, new_mean, new_scatter, counts_b = update_op(
            x, mask, bool(normalize), fp32_precision, counts, mean, scatter)
        return MergedState(new_counts, new_mean, new_scatter, counts_b)
