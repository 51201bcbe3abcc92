"""The Triton kernels themselves, launched directly (interpreter on CPU, or the GPU).

Shapes cross several tiles with ragged edges; the row splits, the atomic reduction and the
gate of the cross moment are exercised explicitly. These must run, not skip, in CI.
"""
import os

import numpy as np
import pytest
import torch

from ._ref import COV_TOL, device_under_test, make_rows, rel_err, row_ok

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
    assert psum.shape == (-(-101 // tb._INTERP_ROWS["BLOCK_N"]) if tb.INTERPRET else psum.shape[0], 150)
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
    assert tb._num_splits(n, 3, d * d, x.device) > 1
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
    for op, args in ((tb.moments_op, (x, mask, True, "ieee")),
                     (tb.cross_moments_op, (x, h, None, True, "ieee"))):
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result


def test_row_stats_rescues_and_strided_masks():
    """Rows whose fp32 squared norm is subnormal, underflows or overflows get their status and
    scale from the float64 second look (SPEC §1): valid unless an entry is not finite or,
    normalizing, 1/||x|| exceeds fp32 (the 1e-40 rows). A column of a 2-D mask and an expanded
    mask are read where they lie, not as contiguous bytes."""
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
            want_scale = np.where(live & ok, 1 / np.where(ok, norms, 1) if normalize else 1.0, 0.0)
            np.testing.assert_allclose(scale.cpu().double().numpy(), want_scale, rtol=1e-6)
            if normalize:
                rows = np.where((live & ok)[:, None], np.nan_to_num(a) * want_scale[:, None], 0)
                np.testing.assert_allclose(psum.double().sum(0).cpu().numpy(), rows.sum(0),
                                           rtol=1e-5, atol=1e-5)
    assert not row_ok(x, a, True)[0] and row_ok(x, a, True)[1]  # 1e-40 skipped, 1e-38 counts
