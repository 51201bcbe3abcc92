"""The float64 reference and the hostile inputs of the kernel tests (tests/test_cpp.py,
tests/test_cuda.py, and the test-hooks build's check that test_cpp.py runs in a subprocess).

Written here in float64 numpy from docs/spec.md §2 (no import of the package's own reference, and no
import of crh_kernels at all: the subprocess must not load the regular extension). The row rule
is docs/spec.md §1's: a row is skipped when an entry is not finite or, normalizing, when it is the
zero row; every other row counts (finite rows whose fp32 squared norm overflows or underflows,
and rows of norm below 2^-128 whose 1/||x|| exceeds fp32, too).
"""
import numpy as np
import torch

COV_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
MEAN_TOL = 1e-6
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (1, 37), (2, 1), (3, 37), (257, 1), (600, 37), (1300, 33), (700, 128), (300, 1000)]


def valid_rows(x: torch.Tensor, mask, normalize):
    a = x.detach().double().numpy()
    ok = np.isfinite(a).all(axis=1)
    if normalize:
        # every finite nonzero row counts (docs/spec.md §1), whatever its scale
        ok &= np.abs(np.where(ok[:, None], a, 0.0)).max(axis=1, initial=0.0) > 0
    live = np.ones(x.shape[0], bool) if mask is None else mask.numpy().copy()
    return live, ok


def reference(x: torch.Tensor, mask=None, normalize=True):
    """(n, n_skipped, mean, C) in float64 from the values of x (N, D)."""
    live, ok = valid_rows(x, mask, normalize)
    rows = x.detach().double().numpy()[live & ok]
    if normalize:
        rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    n = rows.shape[0]
    if n == 0:
        d = x.shape[1]
        return 0, int((live & ~ok).sum()), np.zeros(d), np.zeros((d, d))
    mean = rows.mean(axis=0)
    y = rows - mean
    return n, int((live & ~ok).sum()), mean, y.T @ y


def reference_cross(g, h, mask=None, normalize=True):
    live, okg = valid_rows(g, mask, normalize)
    _, okh = valid_rows(h, None, normalize)
    valid = live & okg & okh
    a = g.detach().double().numpy()[valid]
    b = h.detach().double().numpy()[valid]
    if normalize:
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        b = b / np.linalg.norm(b, axis=1, keepdims=True)
    ma, mb = a.mean(axis=0), b.mean(axis=0)
    return int(valid.sum()), int((live & ~valid).sum()), ma, mb, (a - ma).T @ (b - mb)


def rel(out, ref):
    out = out.detach().double().numpy() if isinstance(out, torch.Tensor) else out
    den = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / den) if den > 0 else float(np.linalg.norm(out))


def hostile(gen, n, d, *, mean_ratio, dtype, zero=0, bad=0, overflow=0, layout="contiguous"):
    """Rows with mean = mean_ratio × spread, some zero / non-finite rows, and rows whose fp32
    squared norm overflows."""
    direction = torch.randn(d, generator=gen, dtype=torch.float64)
    direction *= np.sqrt(d) / direction.norm().clamp_min(1e-12)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) + mean_ratio * direction
    perm = torch.randperm(n, generator=gen)
    at = 0
    for count, fill in ((zero, "zero"), (bad, "bad"), (overflow, "big")):
        idx = perm[at:at + count]
        at += count
        if fill == "zero":
            x[idx] = 0.0
        elif fill == "bad":
            vals = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)
            x[idx, torch.randint(0, d, (len(idx),), generator=gen)] = vals[torch.arange(len(idx)) % 3]
        else:  # finite entries whose fp32 squared norm overflows (d ≥ 2): the row rule counts
            # it (docs/spec.md §1); no single square overflows, so without normalizing C fits fp32 too
            x[idx, :2] = 1.5e19 if dtype != torch.float16 else float("inf")
    x = x.to(dtype)
    if layout == "transposed":  # column stride N: the strided (portable) load path
        x = x.t().contiguous().t()
    elif layout == "row_gap":  # row stride > D, column stride 1
        wide = torch.zeros(n, d + 5, dtype=dtype)
        wide[:, 2:d + 2] = x
        x = wide[:, 2:d + 2]
    return x
