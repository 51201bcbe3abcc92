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
def _base_rows(n=64, d=33, seed=0, floor=0.0):
    """Rows with a common mean, each with its largest entry of size 1 (float64); with ``floor``
    every entry is at least that large in magnitude."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) + 1.5
    x = x / x.abs().amax(dim=1, keepdim=True)
    if floor:
        x = torch.where(x.abs() < floor, torch.where(x < 0, -floor, floor), x)
    return x


#: the Triton interpreter converts bf16 subnormals to fp32 wrongly (triton/runtime/interpreter.py,
#: ``_convert_float``, renormalizes them into an exponent that then underflows; a GPU converts
#: them exactly): under it, bf16 rows keep normal entries (k ≥ -35, entries ≥ 2^-8 of the largest)
_INTERP_BF16 = dict(ks=range(-35, 39), floor=2.0 ** -8)


def _interpreted(backend):
    return backend == "triton" and device_under_test() == "cpu"


# every power of ten at which an fp32 / bf16 / fp16 row of largest entry 1 × 10^k has a finite
# nonzero entry (fp32: the smallest subnormal is 1.4e-45; bf16 9.2e-41; fp16 6e-8)
_KS = {torch.float32: range(-45, 39), torch.bfloat16: range(-40, 39), torch.float16: range(-7, 5)}
# where the entries still hold the dtype's precision: cov of the scaled rows is that of the
# unscaled ones within the dtype's bound (docs/usage.md, Guarantees)
_INVARIANT = {torch.float32: range(-38, 39), torch.bfloat16: range(-37, 39), torch.float16: range(-4, 5)}


def test_scale_invariance_fp32(backend):
    """Rows × 10^k (fp32 input) count whatever k, down to the smallest subnormal (k = -45): every
    finite nonzero row counts, a row of norm below 2^-100 through the tiny-row scale. The
    scatter is that of the float64 reference of the same values within the fp32 bound for every
    k, and cov that of the unscaled rows for k from -38 to 38 (below, the entries are subnormal
    and the input itself has lost bits)."""
    base = _base_rows()
    dev = device_under_test()
    _, _, _, c0 = ref_moments(base)
    cov0 = c0 / base.shape[0]
    for k in _KS[torch.float32]:
        x = (base * 10.0 ** k).to(torch.float32).to(dev)
        m = _moments(backend, x)
        assert (m.n, m.n_skipped) == (base.shape[0], 0), f"x 1e{k}: a finite nonzero row was skipped"
        _check(m, x, what=f"x 1e{k}")  # against the float64 reference of the same values
        if k in _INVARIANT[torch.float32]:
            err = rel_err(m.cov(), cov0)
            assert err <= COV_TOL[torch.float32], f"x 1e{k}: cov differs from the unscaled rows' by {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_scale_invariance_16bit(backend, dtype):
    """bf16 has fp32's exponent range, fp16 its own: rows × 10^k over that whole range, down to
    the smallest subnormal, all count, and cov is within the dtype's bound of the float64
    reference of the same values and, where the entries keep their precision, of the unscaled
    rows."""
    ks, floor = _KS[dtype], 0.0
    if dtype == torch.bfloat16 and _interpreted(backend):
        ks, floor = _INTERP_BF16["ks"], _INTERP_BF16["floor"]
    base = _base_rows(seed=1, floor=floor)
    dev = device_under_test()
    b16 = base.to(dtype)
    _, _, _, c0 = ref_moments(b16)
    cov0 = c0 / base.shape[0]
    for k in ks:
        x = (base * 10.0 ** k).to(dtype).to(dev)
        m = _moments(backend, x)
        assert (m.n, m.n_skipped) == (base.shape[0], 0), f"{dtype} x 1e{k}"
        _check(m, x, what=f"{dtype} x 1e{k}")
        if k in _INVARIANT[dtype]:
            err = rel_err(m.cov(), cov0)
            assert err <= COV_TOL[dtype], f"{dtype} x 1e{k}: cov differs from the unscaled rows' by {err:.2e}"


def _every_scale(d, dtype, seed, interpreted=False):
    """One batch: a row at each power of ten of ``_KS[dtype]`` (the tiny rows of norm < 2^-100
    among them), shuffled among as many ordinary rows, and three rows that must be skipped
    (zero, NaN, inf)."""
    ks, floor, small = _KS[dtype], 0.0, 1e-40
    if dtype == torch.bfloat16 and interpreted:
        ks, floor, small = _INTERP_BF16["ks"], _INTERP_BF16["floor"], 1e-35
    gen = torch.Generator().manual_seed(seed)
    k = torch.tensor(list(ks) + [0] * len(ks), dtype=torch.float64)
    base = _base_rows(n=len(k), d=d, seed=seed, floor=floor)
    x = base * (10.0 ** k)[:, None]
    x = torch.cat([x, torch.zeros(3, d, dtype=torch.float64)])
    x[-2, d // 2] = float("nan")
    x[-1, 0], x[-1, -1] = small, float("inf")  # the cross moment's h keeps its first column
    x = x[torch.randperm(x.shape[0], generator=gen)]
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [7, 33, 130, 1000])
def test_every_finite_nonzero_row_counts(backend, dtype, d):
    """Issue 12: rows at every scale the dtype holds (fp32 down to 1.4e-45, bf16 to 9e-41, whose
    1/||x|| exceeds fp32, and fp16's whole range), mixed with ordinary rows in one batch, odd D,
    through every entry point: the fused update (a fresh state, then a merge into it), the
    backend's batch statistics, the cross moment (the same rows against a shuffled copy) and,
    where offered, staging. Each counts every finite nonzero row (n), skips the three others,
    and is within the dtype's bound of the float64 reference of the same values."""
    from crh_kernels import backends

    if d == 1000 and _interpreted(backend):
        pytest.skip("D=1000 under the Triton interpreter takes minutes: D=130 here, the wide pass 1 "
                    "in test_triton_interp.py, D=1000 on a GPU (CRH_TEST_DEVICE=cuda)")
    dev = device_under_test()
    x = _every_scale(d, dtype, seed=d, interpreted=_interpreted(backend)).to(dev)
    n_ref, skipped_ref, _, _ = ref_moments(x)
    assert skipped_ref == 3 and n_ref == x.shape[0] - 3
    half = x.shape[0] // 2
    # the fused update: a fresh state, then a merge
    m = _moments(backend, x[:half])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m.update(x[half:])
    _check(m, x, what=f"update, {dtype}, D={d}")
    be = backends.get(backend)
    # the backend's own batch statistics (cpp and triton offer a fused update besides)
    st = be.batch_stats(x, None, True)
    _, _, mean, c = ref_moments(x)
    assert (int(st.n), int(st.n_skipped)) == (n_ref, 3), f"batch_stats, {dtype}, D={d}"
    assert rel_err(st.scatter, c) <= COV_TOL[dtype] and rel_err(st.mean, mean, 0.1) <= MEAN_TOL
    # the cross moment: every row against a row of another scale
    gen = torch.Generator().manual_seed(d + 1)
    h = x[torch.randperm(x.shape[0], generator=gen)][:, : max(3, d // 3)].contiguous()
    _check_cross(cross_moments(x, h, backend=backend), x, h, what=f"cross, {dtype}, D={d}")
    if be.row_staging:
        buf, scale = torch.empty_like(x), torch.empty(x.shape[0], device=x.device)
        status = torch.empty(x.shape[0], dtype=torch.uint8, device=x.device)
        sum_ = torch.zeros(d, dtype=torch.float64, device=x.device)
        be.stage_rows(x, None, True, buf, scale, status, sum_)
        ms = Moments(d, backend=backend)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ms.update_staged(buf, scale, status, sum_)
        _check(ms, x, what=f"staged, {dtype}, D={d}")


def test_torch_backend_device_path_counts_tiny_rows(monkeypatch):
    """The torch backend's path for a GPU, torch.compile or fake tensors (no value read on the
    host: every row measured again and the results selected, the tiny rows' pre-factor applied
    to every row) gives the same counts and the same accuracy as its CPU path."""
    import crh_kernels.backends.torch as tbk

    monkeypatch.setattr(tbk, "host_reads_free", lambda t: False)
    for dtype in (torch.float32, torch.bfloat16):
        x = _every_scale(33, dtype, seed=9)
        m = _moments("torch", x)
        _check(m, x, what=f"device path, {dtype}")
        h = x[:, ::3].contiguous()
        _check_cross(cross_moments(x, h, backend="torch"), x, h, what=f"device path cross, {dtype}")


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
    x[100, 4] = torch.finfo(torch.float32).tiny / 2 ** 20  # one subnormal entry: norm 2^-146 (tiny)
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
    assert n_skipped == 5  # 2 zero, 3 non-finite; the 2^-146 row and the FLT_MAX row count
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
