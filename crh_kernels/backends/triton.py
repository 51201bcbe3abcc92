"""Launchers for the Triton kernels: argument checks, grids, configs, and the backend.

Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before import
(then a single small config is used, and 16-bit operands are rounded then multiplied in fp32
because the interpreter's 16-bit ``tl.dot`` is wrong).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import _env
from ..kernels.cross import _cross_scatter_kernel
from ..kernels.row_stats import _row_stats_kernel
from ..kernels.syrk import _scatter_upper_kernel
from .base import ROW_SKIPPED, ROW_VALID, Backend, BatchStats, CrossStats, mirror_upper

INTERPRET = _env.triton_interpret()

_DOT_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# Interpreter: one config (autotuning needs a GPU). GPU: a few tile shapes, tuned per D and dtype.
_INTERP_MM = dict(BLOCK_M=64, BLOCK_K=32)
_INTERP_ROWS = dict(BLOCK_N=32, BLOCK_D=64)
# maxnreg: row_stats' rare second look (SPEC §1) would otherwise raise the registers of the
# whole kernel on sm_90 (fewer blocks per SM); capped, it needs no spills (tests/test_aot.py)
_GPU_ROWS = dict(BLOCK_N=32, BLOCK_D=128, num_warps=4, maxnreg=168)
# 16-bit operands: up to 64 KB of shared memory per stage set. fp32 operands are twice as
# wide, so shorter K chunks keep them under sm_80's 163 KB (checked by tests/test_aot.py).
_GPU_MM_CONFIGS = {
    16: [
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    ],
    32: [
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 16}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    ],
}
# the block of the split heuristic (the tuned BLOCK_M is unknown before the launch)
_SPLIT_BLOCK_M = 64 if INTERPRET else 128
_MAX_SPLIT_BYTES = 256 << 20


def _compiled(kernel, key):
    """The kernel per operand width: itself under the interpreter, autotuned on a GPU."""
    if INTERPRET:
        return {16: kernel, 32: kernel}
    return {bits: triton.autotune(configs=cfgs, key=key, reset_to_zero=["out_ptr"])(kernel)
            for bits, cfgs in _GPU_MM_CONFIGS.items()}


_syrk = _compiled(_scatter_upper_kernel, ["D", "INPUT_PRECISION", "USE_ATOMIC"])
_cross = _compiled(_cross_scatter_kernel, ["DG", "DH", "INPUT_PRECISION"])


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


def _num_splits(n: int, tiles: int, d_out: int, device: torch.device) -> int:
    """Enough (tile, split) programs to fill the machine twice, whole chunks per split,
    and a bounded partial buffer."""
    want = math.ceil(2 * _sm_count(device) / max(tiles, 1))
    by_rows = max(1, n // 256)
    by_mem = max(1, _MAX_SPLIT_BYTES // max(1, 4 * d_out))
    return max(1, min(want, by_rows, by_mem))


def row_stats(x: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool,
              gate: Optional[torch.Tensor] = None, with_sum: bool = True):
    """Per-row scale and status, and partial column sums of the scaled valid rows.

    x: (N, D) fp32/bf16/fp16, any strides; mask: (N,) bool or None, any stride (0 too);
    gate: (N,) fp32 or None
    (rows with gate == 0 do not count: they are skipped). Returns ``scale`` (N,) fp32 (0 for
    rows that do not count), ``status`` (N,) uint8 (ROW_MASKED 0, ROW_SKIPPED 1, ROW_VALID 2
    of :mod:`crh_kernels.backends.base`), ``psum`` (P, D) fp32.
    """
    _check_matrix(x, "x")
    n, d = x.shape
    if mask is not None and (mask.shape != (n,) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a bool tensor of shape ({n},), got {mask.dtype} {tuple(mask.shape)}")
    if gate is not None and (gate.shape != (n,) or gate.dtype != torch.float32):
        raise ValueError(f"gate must be a float32 tensor of shape ({n},), got {gate.dtype} {tuple(gate.shape)}")
    cfg = _INTERP_ROWS if INTERPRET else _GPU_ROWS
    programs = triton.cdiv(n, cfg["BLOCK_N"])
    scale = torch.empty(n, dtype=torch.float32, device=x.device)
    status = torch.empty(n, dtype=torch.uint8, device=x.device)
    psum = torch.empty(programs if with_sum else 1, d, dtype=torch.float32, device=x.device)
    # the interpreter cannot read a bool tensor through a pointer: pass uint8 (a view, with the
    # mask's own stride: a column of a 2-D mask or an expanded one is read where it lies)
    mask_arg = scale if mask is None else mask.view(torch.uint8)
    _row_stats_kernel[(programs,)](
        x, mask_arg, scale if gate is None else gate, scale, status, psum,
        n, d, x.stride(0), x.stride(1), 0 if mask is None else mask.stride(0),
        HAS_MASK=mask is not None, HAS_GATE=gate is not None, NORMALIZE=bool(normalize),
        WITH_SUM=with_sum, **cfg,
    )
    return scale, status, psum


def _dot_args(dtype: torch.dtype, fp32_precision: str):
    if fp32_precision not in ("ieee", "tf32"):
        raise ValueError(f"fp32_precision must be 'ieee' or 'tf32', got {fp32_precision!r}")
    return dict(DOT_DTYPE=_DOT_DTYPE[dtype],
                INPUT_PRECISION="ieee" if INTERPRET else fp32_precision,
                ROUND_ONLY=INTERPRET and dtype != torch.float32)


def syrk_update(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                fp32_precision: str = "ieee", atomic: Optional[bool] = None) -> torch.Tensor:
    """Upper triangle of ``Σ_i y_i y_iᵀ``, ``y_i = scale_i·x_i − shift`` on rows with scale ≠ 0.

    x: (N, D) fp32/bf16/fp16, any strides; scale: (N,) fp32; shift: (D,) fp32.
    Returns (D, D) fp32, exactly symmetric (upper triangle mirrored). fp32 accumulation;
    operands enter ``tl.dot`` in x's dtype (fp32: IEEE or TF32 per ``fp32_precision``).
    ``atomic`` (default ``CRH_TRITON_ATOMICS``) sums the row splits with atomics instead of a
    deterministic reduction.
    """
    _check_matrix(x, "x")
    n, d = x.shape
    if scale.shape != (n,) or scale.dtype != torch.float32:
        raise ValueError(f"scale must be float32 of shape ({n},), got {scale.dtype} {tuple(scale.shape)}")
    if shift.shape != (d,) or shift.dtype != torch.float32:
        raise ValueError(f"shift must be float32 of shape ({d},), got {shift.dtype} {tuple(shift.shape)}")
    atomic = _env.triton_atomics() if atomic is None else atomic
    nb = triton.cdiv(d, _SPLIT_BLOCK_M)
    splits = _num_splits(n, nb * (nb + 1) // 2, d * d, x.device)
    if atomic:
        out = torch.zeros(1, d, d, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(splits, d, d, dtype=torch.float32, device=x.device)

    def grid(meta):
        t = triton.cdiv(d, meta["BLOCK_M"])
        return (t * (t + 1) // 2, splits)

    extra = dict(_INTERP_MM) if INTERPRET else {}
    _syrk[_bits(x.dtype)][grid](x, scale, shift, out, n, d, x.stride(0), x.stride(1),
                USE_ATOMIC=bool(atomic), **_dot_args(x.dtype, fp32_precision), **extra)
    total = out[0] if out.shape[0] == 1 else out.sum(dim=0)
    return mirror_upper(total)


def cross_update(g, h, scale_g, scale_h, shift_g, shift_h, fp32_precision: str = "ieee") -> torch.Tensor:
    """``Σ_i (s_g,i g_i − K_g)(s_h,i h_i − K_h)ᵀ`` over rows where both scales are nonzero.

    g: (N, Dg), h: (N, Dh), same dtype; scales (N,) fp32; shifts fp32. Returns (Dg, Dh) fp32.
    """
    _check_matrix(g, "g")
    _check_matrix(h, "h")
    if g.shape[0] != h.shape[0] or g.dtype != h.dtype:
        raise ValueError(f"g and h must share N and dtype, got {tuple(g.shape)} {g.dtype} and "
                         f"{tuple(h.shape)} {h.dtype}")
    n, dg = g.shape
    dh = h.shape[1]
    tiles = triton.cdiv(dg, _SPLIT_BLOCK_M) * triton.cdiv(dh, _SPLIT_BLOCK_M)
    splits = _num_splits(n, tiles, dg * dh, g.device)
    out = torch.empty(splits, dg, dh, dtype=torch.float32, device=g.device)

    def grid(meta):
        return (triton.cdiv(dg, meta["BLOCK_M"]) * triton.cdiv(dh, meta["BLOCK_M"]), splits)

    extra = dict(_INTERP_MM) if INTERPRET else {}
    _cross[_bits(g.dtype)][grid](g, h, scale_g, scale_h, shift_g, shift_h, out, n, dg, dh,
                 g.stride(0), g.stride(1), h.stride(0), h.stride(1),
                 **_dot_args(g.dtype, fp32_precision), **extra)
    return out[0] if splits == 1 else out.sum(dim=0)


def _counts(status: torch.Tensor) -> torch.Tensor:
    """(2,) int64 on the device: valid rows, skipped rows (``n``, ``n_skipped``). No host sync."""
    per_status = torch.bincount(status.to(torch.int64), minlength=3)
    return torch.stack((per_status[ROW_VALID], per_status[ROW_SKIPPED]))


def _mean_from(psum: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    # zero rows give a zero mean (and then a zero scatter: every scale is 0), without a sync
    return psum.sum(dim=0, dtype=torch.float64) / n.clamp_min(1)


def _unshift_(c: torch.Tensor, n: torch.Tensor, mean_a, k_a, mean_b, k_b) -> torch.Tensor:
    """Σ(a−K_a)(b−K_b)ᵀ = C + n·(μ_a−K_a)(μ_b−K_b)ᵀ: remove the rounding-sized shift error."""
    d_a = (mean_a - k_a.double()).to(torch.float32)
    d_b = (mean_b - k_b.double()).to(torch.float32)
    return c.sub_(torch.outer(d_a, d_b) * n.to(torch.float32))


@torch.library.custom_op("crh_triton::moments", mutates_args=())
def moments_op(x: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool,
               fp32_precision: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch statistics of the fused update: ``counts`` (2,) int64 = (n, n_skipped),
    ``mean`` (D,) float64, ``scatter`` (D, D) float32 = Σ_valid (x̂ − μ)(x̂ − μ)ᵀ."""
    scale, status, psum = row_stats(x, mask, normalize)
    counts = _counts(status)
    mean = _mean_from(psum, counts[0])
    shift = mean.to(torch.float32)
    scatter = syrk_update(x, scale, shift, fp32_precision)
    return counts, mean, _unshift_(scatter, counts[0], mean, shift, mean, shift)


@moments_op.register_fake
def _(x, mask, normalize, fp32_precision):
    d = x.shape[1]
    return (x.new_empty(2, dtype=torch.int64), x.new_empty(d, dtype=torch.float64),
            x.new_empty(d, d, dtype=torch.float32))


@torch.library.custom_op("crh_triton::cross_moments", mutates_args=())
def cross_moments_op(g: torch.Tensor, h: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool,
                     fp32_precision: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``counts`` (2,), ``mean_g`` (Dg,), ``mean_h`` (Dh,) float64 and ``C_gh`` (Dg, Dh) float32;
    a row counts only when both its g and h rows are valid."""
    scale_h0, _, _ = row_stats(h, mask, normalize, with_sum=False)
    scale_g, status_g, psum_g = row_stats(g, mask, normalize, gate=scale_h0)
    scale_h, _, psum_h = row_stats(h, mask, normalize, gate=scale_g)
    counts = _counts(status_g)
    mean_g = _mean_from(psum_g, counts[0])
    mean_h = _mean_from(psum_h, counts[0])
    kg, kh = mean_g.to(torch.float32), mean_h.to(torch.float32)
    c = cross_update(g, h, scale_g, scale_h, kg, kh, fp32_precision)
    return counts, mean_g, mean_h, _unshift_(c, counts[0], mean_g, kg, mean_h, kh)


@cross_moments_op.register_fake
def _(g, h, mask, normalize, fp32_precision):
    return (g.new_empty(2, dtype=torch.int64), g.new_empty(g.shape[1], dtype=torch.float64),
            h.new_empty(h.shape[1], dtype=torch.float64), g.new_empty(g.shape[1], h.shape[1], dtype=torch.float32))


class TritonBackend(Backend):
    name = "triton"

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
        n, n_skipped = counts.tolist()  # the one host sync of an update
        return BatchStats(n, n_skipped, mean, scatter)

    def cross_stats(self, g, h, mask, normalize, fp32_precision="ieee"):
        counts, mean_g, mean_h, c = cross_moments_op(g, h, mask, bool(normalize), fp32_precision)
        n, n_skipped = counts.tolist()
        return CrossStats(n, n_skipped, mean_g, mean_h, c)
