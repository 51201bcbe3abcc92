"""The ``torch`` backend: the kernel contract in plain PyTorch, on any device.

Also the readable reference for the Triton and C++ paths (same row rule, same shift):
rows are scaled in fp32 (fp64 for fp64 input), centered at the batch mean *before*
the product, then ``yᵀy``. Accepts float64, which the other backends do not. No optional
capability (:mod:`crh_kernels.backends.base`): ``Moments`` merges its batch statistics.

No host sync: the counts come back as 0-d int64 tensors on the batch's device, and off the
CPU (or under ``torch.compile`` / ``FakeTensorMode``, on any device) the rescue of rows with an
unusable fp32 norm runs on every row and is selected, instead of gathering the few rows
(which needs their number on the host). On the CPU, in eager mode, reading a value costs
nothing, and the few rows are gathered.

(Inside this file ``torch`` is PyTorch: imports are absolute.)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .base import Backend, BatchStats, CrossStats, host_reads_free, mirror_upper


#: Squared norms (summed in the accumulation dtype) below this may have lost bits to subnormal
#: squares; such rows, and rows whose squared norm is zero or not finite, are re-measured by
#: :func:`_rescaled_rows` (docs/spec.md §1). 2^-100 for fp32 (2^26 above FLT_MIN: the subnormal squares
#: of up to 2^20 entries then cost less than 2^-30 of the sum), likewise for fp64.
SQ_TINY = {torch.float32: 2.0 ** -100, torch.float64: 2.0 ** -970}

#: A *tiny* row (normalizing, ``1/||x||`` above TINY_SCALE: its norm is below 2^-100 in fp32,
#: 2^-900 in fp64, and ``1/||x||`` may not fit the dtype) gets the scale ``-2^-PRE_EXP/||x||``:
#: the sign says "multiply the row by 2^PRE_EXP first", so that ``y = (x·2^PRE_EXP)·|s|``, both
#: factors exact (powers of two apart from ``1/||x||``), is the value ``x/||x||`` rounded once.
#: The same encoding on every backend (kernels/row_stats.py, csrc/).
TINY_SCALE = {torch.float32: 2.0 ** 100, torch.float64: 2.0 ** 900}
PRE_EXP = {torch.float32: 64, torch.float64: 512}

_BITS = {torch.float32: (torch.int32, 23, 127), torch.float64: (torch.int64, 52, 1023)}


def _pow2(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Exactly 2**k for integers k in the normal range of ``dtype`` (built from the bits)."""
    itype, mant, bias = _BITS[dtype]
    return ((k.to(itype) + bias) << mant).view(dtype)


def _rescaled_rows(xs: torch.Tensor, normalize: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(valid, scale)`` of rows (already in the accumulation dtype) whose squared norm was
    zero, tiny or not finite: the slow path of :func:`row_scale`, for a few rows.

    A row is valid when every entry is finite and, normalizing, nonzero. The norm is measured
    on the row times ``2^-e``, with ``2^e`` the power of two of its largest entry, so that no
    square under- or overflows; ``2^-e`` is applied as two exact factors (each within the
    normal range). A tiny row's scale is encoded negative (:data:`TINY_SCALE`)."""
    acc = xs.dtype
    finite = torch.isfinite(xs).all(dim=1)
    if not normalize:
        return finite, finite.to(acc)
    itype, mant, bias = _BITS[acc]
    top = torch.where(finite, xs.abs().amax(dim=1), 0.0)
    # exponent of the largest entry (a subnormal one counts as the smallest normal exponent)
    e = ((top.view(itype) >> mant) & (2 * bias + 1)).clamp_min(1) - bias
    f1 = _pow2(torch.div(-e, 2, rounding_mode="floor"), acc)
    f2 = _pow2(-e - torch.div(-e, 2, rounding_mode="floor"), acc)
    y = torch.where(finite.unsqueeze(1), xs, 0.0)
    sq = (y * f1.unsqueeze(1) * f2.unsqueeze(1)).square().sum(dim=1)  # in [1, 4·D) for a nonzero row
    r = sq.rsqrt()
    scale = r * f1 * f2  # inf where 1/||x|| exceeds the dtype's range
    # the tiny rows' 2^-PRE_EXP/||x|| (each factor exact; no underflow for them: e < -100)
    tiny = scale > TINY_SCALE[acc]
    scale = torch.where(tiny, -(r * 2.0 ** -PRE_EXP[acc] * f1 * f2), scale)
    valid = finite & (top > 0)
    return valid, torch.where(valid, scale, 0.0)


def row_scale(x: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row scale (1/||x|| or 1), validity (the valid rows), and the number of skipped rows
    (a 0-d int64 tensor on x's device).

    The row rule of docs/spec.md §1: a live row is valid when its entries are finite and, normalizing,
    not all zero: every finite nonzero row counts. The squared norm is summed once in the
    accumulation dtype (fp32; fp64 for fp64 input); the few rows where that sum is zero, tiny or
    not finite (an under- or overflowing sum, or a non-finite entry) are measured again,
    rescaled (:func:`_rescaled_rows`). A row of norm below 2^-100 (fp32; 2^-900 fp64) gets a
    negative scale: ``y = (x·2^PRE_EXP)·|scale|`` (:data:`TINY_SCALE`, :func:`apply_scale`).

    Masked and skipped rows get scale 0; callers must still *select* them away, since
    ``inf·0`` is NaN.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    sq = x.to(acc).square().sum(dim=1)
    live = torch.ones_like(sq, dtype=torch.bool) if mask is None else mask
    if normalize:
        ok = (sq >= SQ_TINY[acc]) & (sq < float("inf"))  # NaN fails both
        scale = torch.where(ok, sq.rsqrt(), torch.zeros_like(sq))
    else:
        ok = torch.isfinite(sq)
        scale = ok.to(acc)
    # logical_not and unsqueeze, not ~ and [:, None]: FakeTensorMode on a CPU build of torch
    # cannot run those on fake CUDA tensors (tests/test_gpu_path.py runs this path there)
    slow = live & ok.logical_not()
    if not host_reads_free(x):
        # every row measured again, the slow rows' results selected: no count on the host
        v, s = _rescaled_rows(x.to(acc), normalize)
        ok = torch.where(slow, v, ok)
        scale = torch.where(slow, s, scale)
    elif bool(slow.any()):
        rows = slow.nonzero().squeeze(1)
        v, s = _rescaled_rows(x.index_select(0, rows).to(acc), normalize)
        ok = ok.index_put((rows,), v)
        scale = scale.index_put((rows,), s)
    n_skipped = (live & ok.logical_not()).sum()
    valid = live & ok
    scale = torch.where(valid, scale, torch.zeros_like(scale))
    return scale, valid, n_skipped


def apply_scale(y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``y`` (rows in the accumulation dtype, zero where they do not count) times the scales of
    :func:`row_scale`, in place: ``y_i·s_i``, or ``(y_i·2^PRE_EXP)·|s_i|`` for a tiny row
    (``s_i < 0``). The pre-factor costs one more pass only where a tiny row may be present:
    on the CPU in eager mode when there is one, elsewhere always (no count on the host)."""
    acc = scale.dtype
    neg = scale < 0
    if not host_reads_free(scale) or bool(neg.any()):
        pre = torch.where(neg, torch.full_like(scale, 2.0 ** PRE_EXP[acc]), torch.ones_like(scale))
        y.mul_(pre.unsqueeze(1))
        scale = scale.abs()
    return y.mul_(scale.unsqueeze(1))


def _scaled(x, scale, valid):
    """Rows scaled in the accumulation dtype, exactly zero where they do not count.
    Selected before scaling: inf · 0 would be NaN."""
    acc = scale.dtype
    y = torch.where(valid.unsqueeze(1), x.to(acc), 0.0)
    return apply_scale(y, scale)


def _center_(y, valid, n):
    """Batch mean (float64), and y centered in place on the valid rows only; ``n`` (a 0-d
    tensor) may be 0: then y is zeros and so is the mean."""
    mean = y.sum(dim=0, dtype=torch.float64) / n.clamp_min(1)
    # rank-1 update in place: y_i −= valid_i · μ, keeping masked and skipped rows at zero
    y.addcmul_(valid.to(y.dtype).unsqueeze(1), mean.to(y.dtype).unsqueeze(0), value=-1)
    return mean


def _mm(a, b, fp32_precision):
    if a.dtype == torch.float32 and a.is_cuda:
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = fp32_precision == "tf32"
        try:
            return a @ b
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    return a @ b


class TorchBackend(Backend):
    name = "torch"
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

    def availability(self):
        return True, f"plain PyTorch {torch.__version__}, any device"

    def supports(self, device):
        return True, ""

    def batch_stats(self, x, mask, normalize, fp32_precision="ieee"):
        scale, valid, n_skipped = row_scale(x, mask, normalize)
        n = valid.sum()
        y = _scaled(x, scale, valid)
        mean = _center_(y, valid, n)
        scatter = mirror_upper(_mm(y.transpose(0, 1), y, fp32_precision))
        return BatchStats(n, n_skipped, mean, scatter)

    def cross_stats(self, g, h, mask, normalize, fp32_precision="ieee"):
        sg, vg, _ = row_scale(g, mask, normalize)
        sh, vh, _ = row_scale(h, mask, normalize)
        live = torch.ones_like(vg) if mask is None else mask
        valid = vg & vh
        n_skipped = (live & valid.logical_not()).sum()
        n = valid.sum()
        yg = _scaled(g, sg, valid)
        yh = _scaled(h, sh, valid)
        mg = _center_(yg, valid, n)
        mh = _center_(yh, valid, n)
        return CrossStats(n, n_skipped, mg, mh, _mm(yg.transpose(0, 1), yh, fp32_precision))
