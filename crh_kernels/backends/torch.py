"""The ``torch`` backend: the kernel contract in plain PyTorch, on any device.

Also the readable reference for the Triton and C++ paths (same row rule, same shift):
rows are scaled in fp32 (fp64 for fp64 input), centered at the batch mean *before*
the product, then ``yᵀy``. Accepts float64, which the other backends do not. No optional
capability (:mod:`crh_kernels.backends.base`): ``Moments`` merges its batch statistics.

(Inside this file ``torch`` is PyTorch: imports are absolute.)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .base import Backend, BatchStats, CrossStats, mirror_upper


def row_scale(x: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool
              ) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Per-row scale (1/||x|| or 1), validity (the valid rows), and the number of skipped rows.

    Masked and skipped rows get scale 0; callers must still *select* them away, since
    ``inf·0`` is NaN.
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    sq = x.to(acc).square().sum(dim=1)
    ok = torch.isfinite(sq)
    if normalize:
        ok &= sq > 0
    live = torch.ones_like(ok) if mask is None else mask
    n_skipped = int((live & ~ok).sum())
    valid = live & ok
    if normalize:
        scale = torch.where(valid, sq.rsqrt(), torch.zeros_like(sq))
    else:
        scale = valid.to(acc)
    return scale, valid, n_skipped


def _scaled(x, scale, valid):
    """Rows scaled in the accumulation dtype, exactly zero where they do not count.
    Selected before scaling: inf · 0 would be NaN."""
    acc = scale.dtype
    y = torch.where(valid[:, None], x.to(acc), torch.zeros((), dtype=acc, device=x.device))
    return y.mul_(scale[:, None])


def _center_(y, valid, n):
    """Batch mean (float64), and y centered in place on the valid rows only."""
    if n == 0:
        return torch.zeros(y.shape[1], dtype=torch.float64, device=y.device)
    mean = y.sum(dim=0, dtype=torch.float64) / n
    # rank-1 update in place: y_i −= valid_i · μ, keeping masked and skipped rows at zero
    y.addr_(valid.to(y.dtype), mean.to(y.dtype), alpha=-1)
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
        n = int(valid.sum())
        y = _scaled(x, scale, valid)
        mean = _center_(y, valid, n)
        scatter = mirror_upper(_mm(y.transpose(0, 1), y, fp32_precision))
        return BatchStats(n, n_skipped, mean, scatter)

    def cross_stats(self, g, h, mask, normalize, fp32_precision="ieee"):
        sg, vg, _ = row_scale(g, mask, normalize)
        sh, vh, _ = row_scale(h, mask, normalize)
        live = torch.ones_like(vg) if mask is None else mask
        valid = vg & vh
        n_skipped = int((live & ~valid).sum())
        n = int(valid.sum())
        yg = _scaled(g, sg, valid)
        yh = _scaled(h, sh, valid)
        mg = _center_(yg, valid, n)
        mh = _center_(yh, valid, n)
        return CrossStats(n, n_skipped, mg, mh, _mm(yg.transpose(0, 1), yh, fp32_precision))
