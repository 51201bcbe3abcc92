"""The row rule of docs/spec.md §1 on every backend available here, against tests/_ref.py's float64
reference: masks of any layout, and rows of any finite scale.

Backends: those of ``backends_under_test()``; the C++ one also with its first pass capped to
the portable code (``CRH_CPU_ISA=generic``) and to plain AVX-512 (``CRH_CPU_ISA=avx512``), where
the machine has it.
"""
import warnings

import numpy as np
import pytest
import torch

from crh_kernels import Moments, cross_moments

from ._ref import COV_TOL, MEAN_TOL, backends_under_test, device_under_test, ref_cross, ref_moments, rel_err


def _variants():
    out = []
    for name in backends_under_test():
        out += [name, f"{name}-avx512", f"{name}-generic"] if name == "cpp" else [name]
    return out


@pytest.fixture(params=_variants())
def backend(request, monkeypatch):
    name, _, isa = request.param.partition("-")
    if isa:
        monkeypatch.setenv("CRH_CPU_ISA", isa)
    else:
        monkeypatch.delenv("CRH_CPU_ISA", raising=False)
    return name


def _moments(backend, x, mask=None, normalize=True):
    m = Moments(x.shape[-1], normalize=normalize, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skipped-row warning
        m.update(x, mask)
    return m


def _check(m, x, mask=None, normalize=True, what=""):
    n, n_skipped, mean, c = ref_moments(x, mask, normalize)
    assert (m.n, m.n_skipped) == (n, n_skipped), f"{what}: (n, n_skipped)"
    if n == 0:
        return
    rms = np.sqrt(np.trace(c) / n + mean @ mean)
    err_c = rel_err(m.scatter, c, 1e-7 * rms ** 2 * n)
    assert err_c <= COV_TOL[x.dtype], f"{what}: scatter rel err {err_c:.2e}"
    assert rel_err(m.mean, mean, 0.1 * rms) <= MEAN_TOL, f"{what}: mean"


def _check_cross(out, g, h, mask=None, normalize=True, what=""):
    n, mg, mh, c = ref_cross(g, h, mask, normalize)
    assert out[0] == n, f"{what}: n"
    if n == 0:
        return
    assert rel_err(out[1], mg, 0.1) <= MEAN_TOL and rel_err(out[2], mh, 0.1) <= MEAN_TOL, what
    err = rel_err(out[3], c, 1e-7 * n)
    assert err <= COV_TOL[g.dtype], f"{what}: cross scatter rel err {err:.2e}"


# ------------------------------------------------------------------------ masks of any layout
def _mask_cases(gen):
    """(name, x, mask) with masks that are views with a stride other than 1, or expanded."""
    x = torch.randn(200, 24, generator=gen) + 1.0
    keep2d = torch.rand(200, 2, generator=gen) > 0.5
    yield "column of a 2-D mask", x, keep2d[:, 0]
    yield "every third entry", x, (torch.rand(600, generator=gen) > 0.5)[::3]
    yield "expanded True", x, torch.tensor([True]).expand(200)
    yield "expanded False", x, torch.tensor([False]).expand(200)
    x3 = torch.randn(8, 25, 24, generator=gen) - 0.5
    keep3 = torch.rand(8, 25, 2, generator=gen) > 0.4
    yield "3-D, a column of a 3-D mask", x3, keep3[..., 0]
    yield "3-D, transposed mask", x3, (torch.rand(25, 8, generator=gen) > 0.4).t()
    yield "3-D, expanded mask", x3, (torch.rand(8, 1, generator=gen) > 0.4).expand(8, 25)
    x3t = torch.randn(25, 8, 24, generator=gen).transpose(0, 1)
    yield "3-D transposed x, a column of a 3-D mask", x3t, keep3[..., 1]


def _all_mask_cases():
    gen = torch.Generator().manual_seed(12)
    dev = torch.device(device_under_test())
    out = []
    for name, x, mask in _mask_cases(gen):
        if dev.type != "cpu":  # moving a view copies it: make the same view on the device
            mask = torch.as_strided(mask._base.to(dev), mask.shape, mask.stride(),
                                    mask.storage_offset())
        assert not mask.is_contiguous(), name  # a strided or expanded view, not a copy
        out.append((name, x.to(dev), mask))
    return out


def test_masks_of_any_layout(backend):
    for name, x, mask in _all_mask_cases():
        for normalize in (True, False):
            _check(_moments(backend, x, mask, normalize), x, mask, normalize, f"{name}, normalize={normalize}")


def test_cross_moments_masks_of_any_layout(backend):
    gen = torch.Generator().manual_seed(13)
    for name, g, mask in _all_mask_cases():
        h = (torch.randn(*g.shape[:-1], 17, generator=gen) + 2.0).to(g.device)
        out = cross_moments(g, h, mask=mask, backend=backend)
        _check_cross(out, g, h, mask, True, name)


# ------------------------------------------------------------------------------ row scale
def _base_rows(n=64, d=33, seed=0):
    """Rows with a common mean, each with its largest entry of size 1 (float64)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) + 1.5
    return x / x.abs().amax(dim=1, keepdim=True)


def test_scale_invariance_fp32(backend):
    """Rows × 10^k (fp32 input) count whatever k, and cov is that of the unscaled rows within the
    fp32 bound, for k from -38 to 38; further down, only rows with 1/||x|| beyond fp32 (norm
    below 2^-128 ≈ 2.9e-39: every entry subnormal) are skipped."""
    base = _base_rows()
    dev = device_under_test()
    _, _, _, c0 = ref_moments(base)
    cov0 = c0 / base.shape[0]
    for k in range(-40, 39):
        x = (base * 10.0 ** k).to(torch.float32).to(dev)
        m = _moments(backend, x)
        _check(m, x, what=f"x 1e{k}")  # against the float64 reference of the same values
        if k >= -38:
            assert m.n == base.shape[0], f"x 1e{k}: a finite nonzero row was skipped"
            err = rel_err(m.cov(), cov0)
            assert err <= COV_TOL[torch.float32], f"x 1e{k}: cov differs from the unscaled rows' by {err:.2e}"
    # k = -40: entries of 1e-40 and below; norms of 1e-40..6e-40 are below 2^-128
    tiny = (base * 1e-40).to(torch.float32).to(dev)
    assert _moments(backend, tiny).n_skipped == base.shape[0]


@pytest.mark.parametrize("dtype,ks", [(torch.bfloat16, range(-30, 31)), (torch.float16, range(-4, 5))])
def test_scale_invariance_16bit(backend, dtype, ks):
    """bf16 has fp32's exponent range, fp16 its own: rows × 10^k over that range all count, and
    cov is within the dtype's bound of the float64 reference of the same values and of the
    unscaled rows."""
    base = _base_rows(seed=1)
    dev = device_under_test()
    b16 = base.to(dtype)
    _, _, _, c0 = ref_moments(b16)
    cov0 = c0 / base.shape[0]
    for k in ks:
        x = (base * 10.0 ** k).to(dtype).to(dev)
        m = _moments(backend, x)
        assert (m.n, m.n_skipped) == (base.shape[0], 0), f"{dtype} x 1e{k}"
        _check(m, x, what=f"{dtype} x 1e{k}")
        err = rel_err(m.cov(), cov0)
        assert err <= COV_TOL[dtype], f"{dtype} x 1e{k}: cov differs from the unscaled rows' by {err:.2e}"


def _mixed_batch(dtype=torch.float32):
    """One batch (every Triton block and C++ thread chunk mixed) of rows at scales from 1e-37 to
    1e37, with zero rows, non-finite rows, rows whose fp32 squared norm underflows to a subnormal
    (the 6e-22 of issue 12) and rows whose squares overflow although every entry is finite."""
    base = _base_rows(n=150, d=40, seed=2)
    scales = torch.tensor([1e-37, 1e-30, 6e-22, 1e-12, 1.0, 1e12, 1e19, 1e30, 1e37], dtype=torch.float64)
    x = base * scales[torch.arange(150) % len(scales)][:, None]
    x[7] = 0.0
    x[40] = 0.0
    x[11, 3] = float("nan")
    x[23, 0] = float("inf")
    x[61, 5] = -float("inf")
    x[99] = torch.finfo(torch.float32).max  # finite; its squares overflow
    x[100, :] = 0.0
    x[100, 4] = torch.finfo(torch.float32).tiny / 2 ** 20  # one subnormal entry: norm 2^-146
    return x.to(dtype)


def test_mixed_scales_in_one_batch(backend):
    dev = device_under_test()
    x = _mixed_batch().to(dev)
    gen = torch.Generator().manual_seed(3)
    mask = (torch.rand(150, generator=gen) > 0.2).to(dev)
    for normalize in (True, False):
        for mk in (None, mask):
            m = _moments(backend, x, mk, normalize)
            if normalize:
                _check(m, x, mk, normalize, f"mixed, normalize, mask={mk is not None}")
            else:
                # without normalizing the rows' own scale makes the scatter overflow fp32: only the
                # rule is checked (a non-finite *entry* skips a row, an overflowing square does not)
                n, n_skipped, _, _ = ref_moments(x, mk, normalize)
                assert (m.n, m.n_skipped) == (n, n_skipped)
    n, n_skipped, _, _ = ref_moments(x)
    assert n_skipped == 6  # 2 zero, 3 non-finite, the 2^-146 row; the FLT_MAX row counts
    assert ref_moments(x, normalize=False)[1] == 3


def test_normalize_false_rows_whose_squares_overflow(backend):
    """normalize=False: a row is skipped for a non-finite entry only, not for an overflowing
    squared norm (3e18 × 64 entries: Σx² ≈ 5.8e38 > FLT_MAX), nor for a tiny one."""
    dev = device_under_test()
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(8, 64, generator=gen, dtype=torch.float64) * 0.2 + 0.9
    big = (x * 3e18).to(torch.float32).to(dev)
    m = _moments(backend, big, normalize=False)
    assert (m.n, m.n_skipped) == (8, 0)
    _check(m, big, normalize=False, what="3e18 rows, normalize=False")
    small = (x * 1e-40).to(torch.float32).to(dev)
    assert _moments(backend, small, normalize=False).n == 8


def test_cross_moments_scale_invariance(backend):
    dev = device_under_test()
    g0, h0 = _base_rows(n=80, d=21, seed=5), _base_rows(n=80, d=30, seed=6)
    ref = ref_cross(g0.float(), h0.float())
    for kg, kh in ((-30, 30), (30, -30), (-20, 19), (0, -38)):
        g = (g0 * 10.0 ** kg).to(torch.float32).to(dev)
        h = (h0 * 10.0 ** kh).to(torch.float32).to(dev)
        out = cross_moments(g, h, backend=backend)
        _check_cross(out, g, h, what=f"g 1e{kg}, h 1e{kh}")
        assert out[0] == 80
        assert rel_err(out[3], ref[3]) <= COV_TOL[torch.float32], (kg, kh)
