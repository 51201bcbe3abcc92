"""Plain PyTorch backend: the kernel contract in its simplest form, on any device.

Also the readable reference for the Triton and C++ paths (same row rule, same shift):
rows are scaled in fp32 (fp64 for fp64 input), centered at the batch mean *before*
the product, then ``yᵀy``. Accepts float64, which the other backends do not.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .base import Backend, BatchStats, CrossStats, mirror_upper


def row_scale(x: torch.Tensor, mask: Optional[torch.Tensor], normalize: bool
              ) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Per-row scale (1/||x|| or 1), validity, and the number of skipped rows.

    Invalid rows get scale 0; callers must still *select* them away, since ``inf·0`` is NaN.
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


def _centered(x, scale, valid, mean):
    acc = scale.dtype
    y = x.to(acc) * scale[:, None]
    y = y - mean.to(acc)
    return torch.where(valid[:, None], y, torch.zeros((), dtype=acc, device=x.device))


def _mean(x, scale, valid, n):
    if n == 0:
        return torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    acc = scale.dtype
    y = torch.where(valid[:, None], x.to(acc) * scale[:, None],
                    torch.zeros((), dtype=acc, device=x.device))
    return y.sum(dim=0, dtype=torch.float64) / n


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
        mean = _mean(x, scale, valid, n)
        y = _centered(x, scale, valid, mean)
        scatter = mirror_upper(_mm(y.transpose(0, 1), y, fp32_precision))
        return BatchStats(n, n_skipped, mean, scatter)

    def cross_stats(self, g, h, mask, normalize, fp32_precision="ieee"):
        sg, vg, _ = row_scale(g, mask, normalize)
        sh, vh, _ = row_scale(h, mask, normalize)
        live = torch.ones_like(vg) if mask is None else mask
        valid = vg & vh
        n_skipped = int((live & ~valid).sum())
        n = int(valid.sum())
        mg = _mean(g, sg, valid, n)
        mh = _mean(h, sh, valid, n)
        yg = _centered(g, sg, valid, mg)
        yh = _centered(h, sh, valid, mh)
        return CrossStats(n, n_skipped, mg, mh, _mm(yg.transpose(0, 1), yh, fp32_precision))
