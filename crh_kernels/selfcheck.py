"""A quick self-check: every available backend on sample data, accuracy against a float64
reference, and time per update. Used by ``crh check``. Also home of the plain-PyTorch
baselines of docs/spec.md §5 and of that float64 reference, which the benchmarks share.
"""
from __future__ import annotations

import time

import torch

from . import backends as _backends
from .moments import Moments


def pipeline(x: torch.Tensor) -> torch.Tensor:
    """docs/spec.md §5's baseline, plain PyTorch in x's dtype: x̂ = x/||x||, μ = mean, (x̂−μ)ᵀ(x̂−μ)."""
    xh = x / x.norm(dim=-1, keepdim=True)
    y = xh - xh.mean(0)
    return y.T @ y


def bare_mm(x: torch.Tensor) -> torch.Tensor:
    """The bare Gram xᵀx: the full-product cost the symmetric update halves."""
    return x.T @ x


def float64_scatter(x: torch.Tensor):
    """(μ, C) of the normalized rows of ``x`` (no zero rows), computed in float64."""
    a = x.double()
    a = a / a.norm(dim=1, keepdim=True)
    mu = a.mean(0)
    return mu, (a - mu).T @ (a - mu)


def run(n: int = 4096, d: int = 256, device: str = "cpu", repeats: int = 3, echo=print) -> list:
    """Rows with mean 100× their spread; for each backend usable on ``device`` and each dtype,
    the relative Frobenius error of the scatter and the best time of ``repeats`` updates."""
    gen = torch.Generator().manual_seed(0)
    x64 = torch.randn(n, d, generator=gen, dtype=torch.float64) + 100.0 * torch.ones(d, dtype=torch.float64) / d ** 0.5
    rows = []
    echo(f"crh_kernels self-check: N={n}, D={d}, device={device}, mean = 100 x spread")
    echo(f"{'backend':8s} {'dtype':9s} {'cov rel err':>12s} {'bound':>7s} {'ms/update':>10s}  ok")
    bounds = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
    for name, (ok, why) in _backends.available_backends().items():
        if not ok or not _backends.get(name).supports(torch.device(device))[0]:
            echo(f"{name:8s} {'-':9s} {'unavailable':>12s}  ({why})")
            continue
        for dtype, bound in bounds.items():
            x = x64.to(dtype).to(device)
            mu, c = float64_scatter(x.cpu())
            best = float("inf")
            for _ in range(repeats):
                m = Moments(d, backend=name, device=device)
                t0 = time.perf_counter()
                m.update(x)
                if x.is_cuda:
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            err = float((m.scatter.double().cpu() - c).norm() / c.norm())
            good = err <= bound
            rows.append(dict(backend=name, dtype=str(dtype).replace("torch.", ""), err=err, bound=bound,
                             ms=best * 1e3, ok=good))
            echo(f"{name:8s} {rows[-1]['dtype']:9s} {err:12.2e} {bound:7.0e} {best * 1e3:10.2f}  {'yes' if good else 'NO'}")
    return rows
