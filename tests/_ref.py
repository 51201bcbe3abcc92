"""Independent float64 references and input generators for the tests.

Written from docs/spec.md §1–2 directly with numpy, sharing no code with crh_kernels, so that a bug
in the package cannot hide in its own reference.
"""
from __future__ import annotations

import os

import numpy as np
import torch


def device_under_test() -> str:
    return os.environ.get("CRH_TEST_DEVICE", "cpu")


def backends_under_test():
    """Every backend that can run on the test device; backends CI requires must be there."""
    import crh_kernels
    from crh_kernels import backends

    dev = torch.device(device_under_test())
    out = []
    for name, (ok, why) in crh_kernels.available_backends().items():
        if ok and backends.get(name).supports(dev)[0]:
            out.append(name)
    required = ["torch"]
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        required.append("triton")
    if dev.type == "cpu" and os.environ.get("CRH_REQUIRE_CPP") == "1":
        required.append("cpp")
    if dev.type == "cuda":
        required.append("triton")
    missing = [r for r in required if r not in out]
    if missing:
        raise RuntimeError(f"backends {missing} are required on {dev} but unavailable: "
                           f"{ {m: crh_kernels.available_backends()[m] for m in missing} }")
    return out


def _row_norms(a: np.ndarray) -> np.ndarray:
    """Euclidean norms of the rows of a float64 array, measured on the rows divided by their
    largest entry: no square under- or overflows (inf/NaN for a row holding one)."""
    top = np.abs(a).max(axis=1, initial=0.0)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        safe = np.where((top > 0) & np.isfinite(top), top, 1.0)
        return np.sqrt(((a / safe[:, None]) ** 2).sum(axis=1)) * np.where(top > 0, top, 0.0)


def row_ok(x: torch.Tensor, a: np.ndarray, normalize: bool) -> np.ndarray:
    """docs/spec.md §1's row rule for the rows ``a`` (float64) of ``x``: every entry finite and, when
    normalizing, not all zero: every finite nonzero row counts, whatever its scale."""
    finite = np.isfinite(a).all(axis=1)
    if not normalize:
        return finite
    return finite & (np.abs(np.where(finite[:, None], a, 0.0)).max(axis=1, initial=0.0) > 0)


def expected_scale(norms, valid, normalize):
    """The scale pass 1 must store (float64): 0 unless valid; 1 without normalizing; 1/||x||,
    or for a tiny row (norm below 2^-100) its encoding −2^-64/||x|| (backends/torch.py
    TINY_SCALE: the row is multiplied by 2^64 first), the same on every backend."""
    if not normalize:
        return np.where(valid, 1.0, 0.0)
    safe = np.where(valid, norms, 1.0)
    return np.where(valid, np.where(safe < 2.0 ** -100, -(2.0 ** -64) / safe, 1 / safe), 0.0)


def _normalized(rows: np.ndarray) -> np.ndarray:
    return rows / _row_norms(rows)[:, None]


def ref_moments(x: torch.Tensor, mask=None, normalize=True):
    """(n, n_skipped, mean, C) in float64 from the values of ``x`` (any shape (..., D))."""
    d = x.shape[-1]
    a = x.detach().to("cpu", torch.float64).numpy().reshape(-1, d)
    live = np.ones(a.shape[0], bool) if mask is None else mask.detach().cpu().numpy().reshape(-1)
    ok = row_ok(x, a, normalize)
    valid = live & ok
    n_skipped = int((live & ~ok).sum())
    rows = a[valid]
    if normalize:
        rows = _normalized(rows)
    n = rows.shape[0]
    if n == 0:
        return 0, n_skipped, np.zeros(d), np.zeros((d, d))
    mean = rows.mean(axis=0)
    c = (rows - mean).T @ (rows - mean)
    return n, n_skipped, mean, c


def ref_cross(g, h, mask=None, normalize=True):
    dg, dh = g.shape[-1], h.shape[-1]
    a = g.detach().to("cpu", torch.float64).numpy().reshape(-1, dg)
    b = h.detach().to("cpu", torch.float64).numpy().reshape(-1, dh)
    live = np.ones(a.shape[0], bool) if mask is None else mask.detach().cpu().numpy().reshape(-1)
    valid = live & row_ok(g, a, normalize) & row_ok(h, b, normalize)
    ra, rb = a[valid], b[valid]
    if normalize:
        ra, rb = _normalized(ra), _normalized(rb)
    n = ra.shape[0]
    if n == 0:
        return 0, np.zeros(dg), np.zeros(dh), np.zeros((dg, dh))
    ma, mb = ra.mean(axis=0), rb.mean(axis=0)
    return n, ma, mb, (ra - ma).T @ (rb - mb)


def rel_err(out, ref, scale=None) -> float:
    """||out − ref||_F / ||ref||_F; ``scale`` replaces a vanishing denominator."""
    out = np.asarray(out.detach().cpu().double() if isinstance(out, torch.Tensor) else out, np.float64)
    ref = np.asarray(ref, np.float64)
    den = np.linalg.norm(ref)
    if scale is not None:
        den = max(den, scale)
    num = np.linalg.norm(out - ref)
    return float(num / den) if den > 0 else float(num)


# docs/spec.md §2 accuracy bounds on the covariance, by operand dtype
COV_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float64: 1e-10}
MEAN_TOL = 1e-6


def make_rows(gen: torch.Generator, n: int, d: int, *, mean_ratio: float = 0.0, dtype=torch.float32,
              zero_rows: int = 0, bad_rows: int = 0, layout: str = "contiguous", device="cpu"):
    """Rows with a common mean ``mean_ratio`` × their spread; optional zero and non-finite rows.

    layout: "contiguous" (N, D); "transposed" (non-contiguous view of a (D, N) tensor);
    "strided" (every other column of (N, 2D)); "3d" (a (n1, n2, D) tensor with n1·n2 = N).
    """
    base = torch.randn(d, generator=gen, dtype=torch.float64)
    base = base / base.norm().clamp_min(1e-12) * np.sqrt(d)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) + mean_ratio * base
    if zero_rows:
        idx = torch.randperm(n, generator=gen)[:zero_rows]
        x[idx] = 0
    if bad_rows:
        idx = torch.randperm(n, generator=gen)[:bad_rows]
        cols = torch.randint(0, d, (len(idx),), generator=gen)
        vals = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
        x[idx, cols] = vals[torch.arange(len(idx)) % 3]
    x = x.to(dtype)
    if layout == "transposed":
        x = x.t().contiguous().t()
    elif layout == "strided":
        wide = torch.zeros(n, 2 * d, dtype=dtype)
        wide[:, ::2] = x
        x = wide[:, ::2]
    elif layout == "3d":
        n1 = next(k for k in range(int(np.sqrt(n)), 0, -1) if n % k == 0)
        x = x.reshape(n1, n // n1, d)
    return x.to(device)
