"""The Triton kernels themselves, launched directly (interpreter on CPU, or the GPU).

Shapes cross several tiles with ragged edges; the row splits, the atomic reduction and the
gate of the cross moment are exercised explicitly. These must run, not skip, in CI.
"""
import os

import numpy as np
import pytest
import torch

import crh_kernels

from ._ref import COV_TOL, device_under_test, expected_scale, make_rows, ref_moments, rel_err, row_ok

tb = pytest.importorskip("crh_kernels.backends.triton", reason="triton not installed")

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs a CUDA device or TRITON_INTERPRET=1")


def test_interpreter_is_really_on_without_gpu():
    # guards the claim that these tests ran: without a GPU they must use the interpreter
    if not torch.cuda.is_available():
        assert tb.INTERPRET


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize", [True, False])
def test_row_stats(dtype, normalize):
    gen = torch.Generator().manual_seed(1)
    x = make_rows(gen, 101, 150, mean_ratio=3.0, dtype=dtype, zero_rows=3, bad_rows=3,
                  layout="strided", device=device_under_test())
    mask = (torch.rand(101, generator=gen) > 0.25).to(x.device)
    scale, status, psum = tb.row_stats(x, mask, normalize)
    a = x.double().cpu().numpy()
    sq = (a * a).sum(1)
    ok = np.isfinite(sq) & ((sq > 0) if normalize else True)
    live = mask.cpu().numpy()
    # 2 valid, 1 skipped, 0 masked: the row status of csrc/ and crh_kernels.backends.base
    want_status = np.where(live & ok, 2, np.where(live, 1, 0))
    assert np.array_equal(status.cpu().numpy(), want_status)
    want_scale = np.where(live & ok, 1 / np.sqrt(np.where(ok, sq, 1)) if normalize else 1.0, 0.0)
    np.testing.assert_allclose(scale.cpu().numpy(), want_scale, rtol=1e-6)
    rows = np.where((live & ok)[:, None], np.nan_to_num(a) * want_scale[:, None], 0)
    assert psum.shape == (tb._row_config(150, 101, tb._sm_count(x.device))["programs"], 150)
    np.testing.assert_allclose(psum.double().sum(0).cpu().numpy(), rows.sum(0), rtol=1e-5, atol=1e-5)


def _ref_syrk(x, scale, shift):
    a = x.double().cpu().numpy()
    s = scale.double().cpu().numpy()
    y = np.where((s != 0)[:, None], np.nan_to_num(a) * s[:, None] - shift.double().cpu().numpy(), 0)
    return y.T @ y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d", [(1, 1), (33, 65), (257, 130), (100, 193)])
@pytest.mark.parametrize("atomic", [False, True])
def test_syrk_update_tiles_and_splits(dtype, n, d, atomic):
    gen = torch.Generator().manual_seed(n * d)
    x = make_rows(gen, n, d, mean_ratio=50.0, dtype=dtype, bad_rows=min(1, n - 1),
                  layout="transposed", device=device_under_test())
    scale = (torch.rand(n, generator=gen) + 0.5).to(x.device)
    scale[torch.randperm(n, generator=gen)[: n // 4]] = 0.0
    # rows with a non-finite entry must have scale 0, as row_stats guarantees
    bad = ~torch.isfinite(x.float()).all(1)
    scale[bad] = 0.0
    # a shift near (not at) the mean, as the contract allows
    y = torch.where(bad[:, None], 0.0, x.float() * scale[:, None])
    shift = (y.sum(0) / max(int((scale != 0).sum()), 1) + 0.1 * torch.randn(d, generator=gen).to(x.device))
    out = tb.syrk_update(x, scale, shift, atomic=atomic)
    ref = _ref_syrk(x, scale, shift)
    assert out.dtype == torch.float32 and out.shape == (d, d)
    assert torch.equal(out, out.T)
    assert rel_err(out, ref, 1e-12) <= COV_TOL[dtype]


def test_syrk_several_splits_actually_used(monkeypatch):
    # force many splits on a small problem: the deterministic reduction must be exact
    monkeypatch.setattr(tb, "_sm_count", lambda device: 64)
    gen = torch.Generator().manual_seed(0)
    n, d = 1200, 70
    x = make_rows(gen, n, d, device=device_under_test())
    assert tb._num_splits(n, tb._tiles(d, tb._INTERP_MM["BLOCK_M"] if tb.INTERPRET else 64), d * d,
                          tb._sm_count(x.device)) > 1
    scale = torch.ones(n, device=x.device)
    shift = x.mean(0)
    out = tb.syrk_update(x, scale, shift)
    assert rel_err(out, _ref_syrk(x, scale, shift)) <= 1e-5
    again = tb.syrk_update(x, scale, shift)
    assert torch.equal(out, again), "the split reduction must be deterministic"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_update(dtype):
    gen = torch.Generator().manual_seed(5)
    n = 150
    g = make_rows(gen, n, 67, mean_ratio=5.0, dtype=dtype, device=device_under_test())
    h = make_rows(gen, n, 130, mean_ratio=20.0, dtype=dtype, layout="strided", device=device_under_test())
    sg = torch.rand(n, generator=gen).to(g.device)
    sh = torch.rand(n, generator=gen).to(g.device)
    drop = torch.rand(n, generator=gen).to(g.device) < 0.2
    sg[drop] = 0
    sh[drop] = 0
    kg = (g.float() * sg[:, None]).mean(0)
    kh = (h.float() * sh[:, None]).mean(0)
    out = tb.cross_update(g, h, sg, sh, kg, kh)
    a = np.where(~drop.cpu().numpy()[:, None], g.double().cpu().numpy() * sg.double().cpu().numpy()[:, None] - kg.double().cpu().numpy(), 0)
    b = np.where(~drop.cpu().numpy()[:, None], h.double().cpu().numpy() * sh.double().cpu().numpy()[:, None] - kh.double().cpu().numpy(), 0)
    assert rel_err(out, a.T @ b) <= COV_TOL[dtype]


def test_launcher_argument_checks():
    x = torch.randn(10, 5, device=device_under_test())
    with pytest.raises(ValueError, match="2-D"):
        tb.syrk_update(x[None], torch.ones(10), torch.zeros(5))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        tb.syrk_update(x.double(), torch.ones(10), torch.zeros(5))
    with pytest.raises(ValueError, match="scale must be float32 of shape \\(10,\\)"):
        tb.syrk_update(x, torch.ones(9, device=x.device), torch.zeros(5, device=x.device))
    with pytest.raises(ValueError, match="shift"):
        tb.syrk_update(x, torch.ones(10, device=x.device), torch.zeros(4, device=x.device))
    with pytest.raises(ValueError, match="mask"):
        tb.row_stats(x, torch.ones(3, dtype=torch.bool, device=x.device), True)
    with pytest.raises(ValueError, match="fp32_precision"):
        tb.syrk_update(x, torch.ones(10, device=x.device), torch.zeros(5, device=x.device), fp32_precision="fast")


def test_ops_registered_with_torch_library():
    gen = torch.Generator().manual_seed(8)
    x = make_rows(gen, 70, 40, mean_ratio=2.0, device=device_under_test())
    h = make_rows(gen, 70, 20, device=device_under_test())
    mask = (torch.rand(70, generator=gen) > 0.3).to(x.device)
    assert torch.ops.crh_triton.moments.default is not None
    state = (torch.tensor([5, 1], device=x.device), torch.randn(40, dtype=torch.float64, device=x.device),
             torch.eye(40, dtype=torch.float64, device=x.device))
    for op, args in ((tb.moments_op, (x, mask, True, "ieee")),
                     (tb.update_op, (x, mask, True, "ieee", *state)),
                     (tb.cross_moments_op, (x, h, None, True, "ieee"))):
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result


def test_row_stats_rescues_and_strided_masks():
    """Rows whose fp32 squared norm is subnormal, underflows or overflows get their status and
    scale from the float64 second look (docs/spec.md §1): valid unless an entry is not finite
    (every finite nonzero row counts; a row of norm below 2^-100, the 1e-40 and 1e-38 rows here,
    gets the tiny-row scale −2^-64/||x||). A column of a 2-D mask and an expanded mask are read
    where they lie, not as contiguous bytes."""
    dev = device_under_test()
    gen = torch.Generator().manual_seed(21)
    n, d = 90, 45  # three interpreter blocks, each mixing the scales
    base = torch.rand(n, d, generator=gen, dtype=torch.float64) + 0.5
    scales = torch.tensor([1e-40, 1e-38, 1e-30, 6e-22, 1.0, 1e19, 1e30, 2e38], dtype=torch.float64)
    x = base * scales[torch.arange(n) % len(scales)][:, None]
    x[5] = 0.0
    x[9, 2] = float("nan")
    x = x.to(torch.float32).to(dev)
    keep = (torch.rand(n, 3, generator=gen) > 0.3).to(dev)
    a = x.double().cpu().numpy()
    norms = np.sqrt((a * a).sum(1))
    for mask in (None, keep[:, 1], torch.tensor([True], device=dev).expand(n),
                 torch.tensor([False], device=dev).expand(n)):
        live = np.ones(n, bool) if mask is None else mask.cpu().numpy()
        for normalize in (True, False):
            scale, status, psum = tb.row_stats(x, mask, normalize)
            ok = row_ok(x, a, normalize)
            want = np.where(live & ok, 2, np.where(live, 1, 0))
            assert np.array_equal(status.cpu().numpy(), want), (normalize, mask is None)
            want_scale = expected_scale(norms, live & ok, normalize)
            np.testing.assert_allclose(scale.cpu().double().numpy(), want_scale, rtol=1e-6)
            if normalize:
                rows = np.where((live & ok)[:, None], np.nan_to_num(a) / np.where(live & ok, norms, 1)[:, None], 0)
                np.testing.assert_allclose(psum.double().sum(0).cpu().numpy(), rows.sum(0),
                                           rtol=1e-5, atol=1e-5)
    scale, status, _ = tb.row_stats(x, None, True)
    assert (status.cpu()[:2] == 2).all() and (scale.cpu()[:2] < 0).all()  # 1e-40, 1e-38: tiny rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tiny_rows_through_the_wide_pass_one(monkeypatch, dtype):
    """Rows of norm below 2^-100 (the tiny-row scale, issue 12) mixed with ordinary ones, through
    pass 1's wide-row path (column chunks, the column sums in memory) and the main pass's
    second K loop: every finite nonzero row counts, the totals kernel raises the tiny flag, and
    the update and the cross moment are within the dtype's bound of the float64 reference."""
    from .test_rows import _check, _check_cross, _every_scale, _interpreted

    monkeypatch.setattr(tb, "_ONE_READ_MAX_D", 64)
    d = 150
    x = _every_scale(d, dtype, seed=5, interpreted=_interpreted("triton")).to(device_under_test())
    scale, status, psum, pcount = tb._pass1(x, None, True)
    assert not tb._row_config(d, x.shape[0], 2)["cfg"]["ONE_READ"]
    counts, _, _, tiny = tb._totals(psum, pcount, d)
    n_ref, k_ref, _, _ = ref_moments(x)
    assert counts.cpu().tolist() == [n_ref, k_ref] and tiny.item() == 1 and (scale < 0).any()
    m = crh_kernels.Moments(d, backend="triton")
    with pytest.warns(RuntimeWarning):  # the three rows that must be skipped
        m.update(x)
    _check(m, x, what=f"wide pass 1, {dtype}")
    h = x[:, ::7].contiguous()
    _check_cross(crh_kernels.cross_moments(x, h, backend="triton"), x, h, what=f"cross, {dtype}")


# ------------------------------------------------- pass 1: one read of x, totals, wide rows
def _loads_of(t: torch.Tensor):
    """Within it: ``counts`` of the interpreter's element loads that fall in ``t``'s memory,
    by byte address (every masked-in lane of every ``tl.load``)."""
    from triton.runtime import interpreter

    lo = t.data_ptr()
    hi = lo + (t.untyped_storage().nbytes() - t.storage_offset() * t.element_size())
    seen = []
    builder = interpreter.InterpreterBuilder
    orig_masked, orig_plain = builder.create_masked_load, builder.create_load

    def masked(self, ptrs, mask, other, *a):
        p = np.asarray(ptrs.data).ravel()
        m = np.broadcast_to(np.asarray(mask.data), np.asarray(ptrs.data).shape).ravel()
        seen.append(p[m & (p >= lo) & (p < hi)].copy())
        return orig_masked(self, ptrs, mask, other, *a)

    def plain(self, ptrs, *a):
        p = np.asarray(ptrs.data).ravel()
        seen.append(p[(p >= lo) & (p < hi)].copy())
        return orig_plain(self, ptrs, *a)

    class Ctx:
        def __enter__(self):
            builder.create_masked_load, builder.create_load = masked, plain
            return self

        def __exit__(self, *exc):
            builder.create_masked_load, builder.create_load = orig_masked, orig_plain

        def counts(self):
            addr = np.concatenate(seen) if seen else np.zeros(0, np.uint64)
            return np.unique(addr, return_counts=True)

    return Ctx()


def _expected_addresses(x):
    n, d = x.shape
    i, j = np.meshgrid(np.arange(n), np.arange(d), indexing="ij")
    return np.sort((x.data_ptr() + (i * x.stride(0) + j * x.stride(1)) * x.element_size()).ravel())


@pytest.mark.skipif(not tb.INTERPRET, reason="counts the interpreter's loads")
@pytest.mark.parametrize("layout,d,max_one_read,one_read", [
    ("contiguous", 150, None, True), ("contiguous", 150, 32, False),
    ("transposed", 40, None, True), ("transposed", 150, None, False)])
def test_row_stats_reads_x_once(monkeypatch, layout, d, max_one_read, one_read):
    """Pass 1 loads every element of x exactly once when a tile of whole rows fits, and
    exactly twice (norm loop, then column-sum loop) otherwise, the documented case: rows wider
    than the one-read bound, or a column-major view (its tiles need 32 rows to read coalesced)
    of more than 64 columns. The results do not depend on which. (A bad row's float64 second
    look reads its row again: rows here are all finite and of ordinary size.)"""
    gen = torch.Generator().manual_seed(31)
    n = 67
    x = make_rows(gen, n, d, mean_ratio=2.0, dtype=torch.bfloat16, layout=layout)
    mask = torch.rand(n, generator=gen) > 0.2
    want = tb.row_stats(x.contiguous(), mask, True)
    if max_one_read is not None:
        monkeypatch.setattr(tb, "_ONE_READ_MAX_D", max_one_read)
    column_major = layout == "transposed"
    assert tb._row_config(d, n, 2, column_major)["cfg"]["ONE_READ"] is one_read
    with _loads_of(x) as loads:
        scale, status, psum = tb.row_stats(x, mask, True)
    addr, times = loads.counts()
    assert np.array_equal(addr, _expected_addresses(x)), "every element, and nothing else"
    assert set(times.tolist()) == {1 if one_read else 2}
    # the same status; scales within the fp32 rounding of another summation order
    assert torch.equal(status, want[1])
    torch.testing.assert_close(scale, want[0], rtol=1e-6, atol=0)
    assert rel_err(psum.sum(0), want[2].sum(0)) <= 1e-6


@pytest.mark.parametrize("d", [1, 7, 150, 300])
def test_wide_rows_and_totals(monkeypatch, d):
    """Wide rows (chunked pass 1) and the totals kernel: counts, the float64 mean, the fp32
    shift, against the float64 reference, with skipped and masked rows and more partials than
    one BLOCK_P step of the totals; with ZERO the (D, D) accumulator is zeroed."""
    monkeypatch.setattr(tb, "_ONE_READ_MAX_D", 64)
    monkeypatch.setattr(tb, "_sm_count", lambda device: 16)  # more programs, more partials
    gen = torch.Generator().manual_seed(d)
    n = 2200
    x = make_rows(gen, n, d, mean_ratio=20.0, zero_rows=3, bad_rows=2, layout="strided",
                  device=device_under_test())
    mask = (torch.rand(n, generator=gen) > 0.1).to(x.device)
    scale, status, psum, pcount = tb._pass1(x, mask, True)
    assert pcount.shape[0] > tb._TOTALS["BLOCK_P"]
    acc = torch.full((1, d, d), 7.0, device=x.device)
    counts, mean, shift, tiny = tb._totals(psum, pcount, d, zero=acc)
    assert tiny.cpu().tolist() == [0]  # no row of norm below 2^-100
    assert torch.equal(acc, torch.zeros_like(acc))
    a = x.double().cpu().numpy()
    ok = row_ok(x, a, True)
    live = mask.cpu().numpy()
    assert counts.cpu().tolist() == [int((live & ok).sum()), int((live & ~ok).sum())]
    rows = np.nan_to_num(a[live & ok])
    want = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).mean(0)
    assert mean.dtype == torch.float64 and rel_err(mean, want) <= 1e-7
    assert torch.equal(shift, mean.float())
    m = crh_kernels.Moments(d, backend="triton")
    m.update(x, mask)
    n_ref, k_ref, mean_ref, c_ref = ref_moments(x, mask)
    assert (m.n, m.n_skipped) == (n_ref, k_ref)
    assert rel_err(m.scatter, c_ref) <= COV_TOL[torch.float32] and rel_err(m.mean, mean_ref) <= 1e-7


def test_no_valid_row_gives_zero_mean():
    x = torch.zeros(40, 9, device=device_under_test())
    scale, status, psum, pcount = tb._pass1(x, None, True)
    counts, mean, shift, _ = tb._totals(psum, pcount, 9)
    assert counts.cpu().tolist() == [0, 40] and not mean.any() and not shift.any()


# ----------------------------------------------------------------------------- epilogue
def _epilogue_case(gen, d, s, n1, n2, dtype):
    part = torch.randn(s, d, d, generator=gen)  # the lower triangle is garbage: never read
    mean_b = torch.randn(d, generator=gen, dtype=torch.float64) if n2 else torch.zeros(d, dtype=torch.float64)
    shift = (mean_b + 1e-3 * torch.randn(d, generator=gen, dtype=torch.float64)).float()
    counts_b = torch.tensor([n2, 3])
    c1 = torch.randn(d, d, generator=gen, dtype=torch.float64)
    c1 = torch.triu(c1 @ c1.T)
    c1 = (c1 + torch.triu(c1, diagonal=1).T).to(dtype)  # a state's scatter: exactly symmetric
    state = (torch.tensor([n1, 5]), torch.randn(d, generator=gen, dtype=torch.float64).to(dtype), c1)
    dev = device_under_test()
    return [t.to(dev) for t in (part, mean_b, shift, counts_b)], tuple(t.to(dev) for t in state)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("d,s", [(1, 1), (70, 3), (33, 1)])
@pytest.mark.parametrize("n1,n2", [(100, 40), (0, 40), (100, 0), (0, 0)])
def test_epilogue_against_float64_reference(dtype, d, s, n1, n2):
    """The epilogue kernel (split sum, unshift, mirror, merge into a new state) against its
    float64 reference: ragged tiles, several splits, a state with no row, a batch with no
    row; the state is only read; the result is exactly symmetric."""
    from crh_kernels.kernels.merge import epilogue_reference

    gen = torch.Generator().manual_seed(d * 10 + s + n1 + n2)
    (part, mean_b, shift, counts_b), state = _epilogue_case(gen, d, s, n1, n2, dtype)
    keep = [t.clone() for t in state]
    splits = torch.tensor([s], dtype=torch.int32, device=part.device)
    c, mean, counts = tb._epilogue(part, splits, d, dtype, (mean_b, shift, counts_b), state)
    rc, rmean, rcounts = epilogue_reference(part[:s], mean_b, shift, counts_b, state)
    assert all(torch.equal(a, b) for a, b in zip(keep, state)), "the state is only read"
    assert c.dtype == mean.dtype == dtype and torch.equal(c, c.T)
    assert torch.equal(counts, rcounts)
    tol = 1e-13 if dtype == torch.float64 else 1e-6
    assert rel_err(c, rc.cpu().numpy()) <= tol and rel_err(mean, rmean.cpu().numpy(), 1.0) <= tol
    if n2 == 0:  # no row in the batch: the state as it was, bit for bit
        assert torch.equal(c, state[2]) and torch.equal(mean, state[1])
    elif n1 == 0:
        assert torch.equal(mean, mean_b.to(dtype))
    # the batch alone (the moments op's epilogue): fp32, no merge
    cb = tb._epilogue(part, splits, d, torch.float32, (mean_b, shift, counts_b))
    assert cb.dtype == torch.float32 and torch.equal(cb, cb.T)
    assert rel_err(cb, epilogue_reference(part[:s], mean_b, shift, counts_b).cpu().numpy()) <= 1e-6


@pytest.mark.parametrize("atomic", [False, True])
def test_main_pass_reports_its_splits(monkeypatch, atomic):
    """The main pass writes the number of partials it produced (its S, or 1 with atomics), and
    the epilogue sums exactly those: here S > 1 and the buffer has spare rows of garbage."""
    monkeypatch.setattr(tb, "_sm_count", lambda device: 64)
    gen = torch.Generator().manual_seed(3)
    x = make_rows(gen, 1500, 40, mean_ratio=3.0, device=device_under_test())
    scale = torch.ones(1500, device=x.device)
    shift = x.mean(0)
    acc = torch.zeros(1, 40, 40, device=x.device) if atomic else None
    part, splits = tb._main(x, scale, shift, "ieee", atomic, acc)
    want = 1 if atomic else tb._num_splits(1500, tb._tiles(40, tb._INTERP_MM["BLOCK_M"] if tb.INTERPRET else 64), 1600, 64)
    if tb.INTERPRET:
        assert splits.item() == want and (atomic or want > 1)
    assert rel_err(tb._epilogue(part, splits, 40, torch.float32), _ref_syrk(x, scale, shift)) <= 1e-5


# ------------------------------------------------------------------- addressing and grids
def test_int64_decision():
    """Offsets go int64 exactly when an element offset of a view can reach 2^31: a transposed
    (N, D) view with (D − 1)·N ≥ 2^31 does, its contiguous twin with N·D < 2^31 does not."""
    n = 2 ** 16
    assert not tb._needs_int64((n, 2 ** 14), (2 ** 14, 1))  # 2^30 elements
    assert not tb._needs_int64((n, 2 ** 15), (1, n))  # (D−1)·N + N−1 = 2^31 − 1: the last fitting
    assert tb._needs_int64((n, 2 ** 15 + 1), (1, n))  # a transposed view: (D−1)·N = 2^31
    assert tb._needs_int64((40, 9), (1, 2 ** 28))  # a huge column stride on a few rows
    assert tb._needs_int64((2 ** 20 + 1, 8), (2 ** 11, 1))  # a row stride: 2^20·2^11 = 2^31
    assert not tb._needs_int64((2 ** 20, 8), (2 ** 11, 1))
    assert not tb._needs_int64((0, 2 ** 20), (2 ** 20, 1))  # empty: no offset at all
    assert not tb._needs_int64((2 ** 31, 1), (0, 1))  # expanded: every row at offset 0
    big = torch.empty(0, device="meta").as_strided((40, 9), (1, 2 ** 28))  # metadata only
    assert tb._int64_for(big) and not tb._int64_for(torch.empty(40, 9), None)


_INT64_SCRIPT = r"""
import sys, tempfile, torch
sys.path.insert(0, sys.argv[1])
import crh_kernels
from crh_kernels.backends import triton as tb
from tests._ref import ref_moments, rel_err
elements = 2 ** 31 + 2 ** 20
with tempfile.NamedTemporaryFile() as f:
    f.truncate(elements * 2)  # sparse: neither disk nor memory is used for the gaps
    big = torch.from_file(f.name, shared=False, size=elements, dtype=torch.bfloat16)
    x = big.as_strided((40, 9), (1, 2 ** 28))  # column j at element offset j·2^28 (> 2^31 for j ≥ 8)
    gen = torch.Generator().manual_seed(0)
    x.copy_(torch.randn(40, 9, generator=gen, dtype=torch.float64) + 2.0)
    assert tb._int64_for(x)
    m = crh_kernels.Moments(9, backend="triton").update(x)
    n, _, mean, c = ref_moments(x)
    assert m.n == n == 40, m.n
    assert rel_err(m.scatter, c) < 2e-2 and rel_err(m.mean, mean) < 1e-6, (rel_err(m.scatter, c), rel_err(m.mean, mean))
print("OK")
"""


@pytest.mark.skipif(not tb.INTERPRET, reason="a sparse file of 4 GiB, read through the interpreter")
def test_int64_offsets_end_to_end(tmp_path):
    """A bf16 view whose column offsets pass 2^31 elements (stride 2^28) goes through pass 1,
    the main pass and the epilogue and gives the reference moments. The 4 GiB storage is a
    sparse file mapped privately (almost nothing is touched); in a subprocess, since int32
    offsets would wrap to addresses outside it (a segfault, as before the int64 switch)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", TMPDIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", _INT64_SCRIPT, root], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), (r.returncode, r.stderr[-2000:])


@pytest.mark.parametrize("sms", [132, 108])
def test_splits_fill_whole_waves(sms):
    """The main pass's splits: whole waves where the bounds allow them (programs a multiple of
    the SM count once past one wave), else the least idle tail; below one wave, as many as the
    rows allow. Tile counts are those of BLOCK_M = 128 at D = 256, 1024, 2048, 4096."""
    big = 1 << 20  # rows: never the binding bound here
    for d in (256, 1024, 2048, 4096):
        tiles = tb._tiles(d, 128)
        s = tb._num_splits(big, tiles, d * d, sms)
        programs = tiles * s
        waves = -(-programs // sms)
        best_exact = [k for k in range(1, 1 + max(1, tb._MAX_WAVES * sms // tiles))
                      if (tiles * k) % sms == 0 and 4 * d * d * k <= tb._MAX_SPLIT_BYTES]
        if best_exact:
            assert s == best_exact[0] and programs % sms == 0, (d, tiles, s)
        else:
            assert programs / (waves * sms) >= 0.85, (d, tiles, s, programs / (waves * sms))
    # D = 1024 (36 tiles): 11 splits = 3 waves on 132 SMs, 3 splits = 1 wave on 108
    assert tb._num_splits(big, 36, 1024 ** 2, sms) == {132: 11, 108: 3}[sms]
    # few rows (at most 4 splits of 256): 3 splits, one wave, beat 4, two waves of which the
    # second is nearly empty; with 2 splits allowed, both are used (less than a wave)
    assert tb._num_splits(1024, 36, 1024 ** 2, sms) == 3
    assert tb._num_splits(512, 36, 1024 ** 2, sms) == 2
    # the partial buffer bound (not for atomics)
    assert tb._num_splits(big, 1, 8192 ** 2, sms) == 1
    assert tb._num_splits(big, 1, 8192 ** 2, sms, atomic=True) == sms
    # pass 1: at most four programs per SM, whole rows per program
    rc = tb._row_config(1024, 1 << 20, sms)
    assert rc["programs"] == 4 * sms and rc["rows"] % rc["cfg"]["BLOCK_N"] == 0


def _count_loops(monkeypatch):
    """Under the interpreter: how many times each K loop of kernels/syrk.py runs (programs ×
    entries); on a GPU the loops are compiled in and cannot be counted (empty dict)."""
    calls = {"fast": 0, "general": 0}
    if not tb.INTERPRET:
        return {}
    from crh_kernels.kernels import syrk

    for name, key in (("_fast_loop", "fast"), ("_scatter_loop", "general")):
        inner = getattr(syrk, name)

        def counted(*args, _inner=inner, _key=key, **kwargs):
            calls[_key] += 1
            return _inner(*args, **kwargs)

        monkeypatch.setattr(syrk, name, counted)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("atomic", [False, True])
def test_syrk_fast_and_general_loops(monkeypatch, dtype, atomic):
    """Splits whose rows all count run the fast K loop (no row mask, no select), the others and
    the ragged last chunk the general one: one batch mixing both against float64, on hostile
    rows (mean ≫ spread, zero rows with a scale, odd D)."""
    monkeypatch.setattr(tb, "_sm_count", lambda device: 64)
    calls = _count_loops(monkeypatch)
    gen = torch.Generator().manual_seed(14)
    n, d = 1100, 131
    x = make_rows(gen, n, d, mean_ratio=300.0, dtype=dtype, zero_rows=4, device=device_under_test())
    scale = (torch.rand(n, generator=gen) + 0.5).to(x.device)
    # one split (rows 288..575 of 4 splits of 288) holds a masked row and a skipped one
    x[400, 7] = float("nan")
    scale[400] = 0.0
    scale[500] = 0.0
    shift = (x.float() * scale[:, None]).nan_to_num().sum(0) / int((scale != 0).sum())
    shift = shift + 0.01 * torch.randn(d, generator=gen).to(x.device)
    assert tb._num_splits(n, tb._tiles(d, tb._INTERP_MM["BLOCK_M"] if tb.INTERPRET else 64), d * d,
                          tb._sm_count(x.device), atomic) == 4
    out = tb.syrk_update(x, scale, shift, atomic=atomic)
    assert torch.equal(out, out.T)
    assert rel_err(out, _ref_syrk(x, scale, shift), 1e-12) <= COV_TOL[dtype]
    if calls:
        tiles = tb._tiles(d, tb._INTERP_MM["BLOCK_M"])
        # three splits run the fast loop; every split runs the general one (maybe for no row)
        assert calls == {"fast": 3 * tiles, "general": 4 * tiles}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_fast_and_general_loops(monkeypatch, dtype):
    """The cross moment's K loops as in test_syrk_fast_and_general_loops: a row counts only when
    both its scales are nonzero (one split holds a row with s_h = 0 < s_g, another one with
    s_g = 0 < s_h)."""
    monkeypatch.setattr(tb, "_sm_count", lambda device: 64)
    calls = _count_loops(monkeypatch)
    gen = torch.Generator().manual_seed(41)
    n = 1100
    g = make_rows(gen, n, 67, mean_ratio=300.0, dtype=dtype, zero_rows=2, device=device_under_test())
    h = make_rows(gen, n, 130, mean_ratio=100.0, dtype=dtype, layout="strided", device=device_under_test())
    sg = (torch.rand(n, generator=gen) + 0.5).to(g.device)
    sh = (torch.rand(n, generator=gen) + 0.5).to(g.device)
    h[450, 3] = float("inf")
    sh[450] = 0.0
    g[700, 5] = float("nan")
    sg[700] = 0.0
    live = (sg != 0) & (sh != 0)
    kg = (g.float() * sg[:, None])[live].mean(0)
    kh = (h.float() * sh[:, None])[live].mean(0)
    blocks = tb._SPLIT_BLOCK_M
    tiles = tb.triton.cdiv(67, blocks) * tb.triton.cdiv(130, blocks)
    assert tb._num_splits(n, tiles, 67 * 130, tb._sm_count(g.device)) == 4
    out = tb.cross_update(g, h, sg, sh, kg, kh)
    keep = live.cpu().numpy()[:, None]
    a = np.where(keep, np.nan_to_num(g.double().cpu().numpy()) * sg.double().cpu().numpy()[:, None]
                 - kg.double().cpu().numpy(), 0)
    b = np.where(keep, np.nan_to_num(h.double().cpu().numpy()) * sh.double().cpu().numpy()[:, None]
                 - kh.double().cpu().numpy(), 0)
    assert rel_err(out, a.T @ b, 1e-12) <= COV_TOL[dtype]
    if calls:
        assert calls == {"fast": 2 * tiles, "general": 4 * tiles}


def test_syrk_splits_past_the_last_row_are_empty(monkeypatch):
    """Rows per split are rounded up to whole chunks, so the last splits can start past N
    (1100 rows in 8 splits of 160: the last one is empty): no row is counted twice."""
    monkeypatch.setattr(tb, "_num_splits", lambda *args, **kwargs: 8)
    gen = torch.Generator().manual_seed(8)
    x = make_rows(gen, 1100, 70, mean_ratio=3.0, device=device_under_test())
    scale = torch.ones(1100, device=x.device)
    shift = x.mean(0)
    out = tb.syrk_update(x, scale, shift)
    assert rel_err(out, _ref_syrk(x, scale, shift)) <= 1e-5
