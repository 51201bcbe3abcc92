"""The CUDA extension (`cuda` backend): the crh:: ops' CUDA kernels against the float64
reference, on hostile inputs, and through Moments.

GPU only: without a CUDA device (or without the CUDA extension) every test here skips with the
reason; bench/gpu_check.sh runs them on a GPU machine with CRH_TEST_DEVICE=cuda, where an
unavailable `cuda` backend fails them instead. The C++ extension's own tests are in
tests/test_cpp.py; both use the reference and inputs of tests/_cpp_ref.py.
"""
import os

import pytest
import torch

import crh_kernels
from crh_kernels import Moments

from ._cpp_ref import COV_TOL, DTYPES, MEAN_TOL, SHAPES, hostile, reference, reference_cross, rel


@pytest.fixture(scope="module")
def cuda_ops():
    """The crh:: ops with their CUDA kernels. Without a GPU these tests skip; on the GPU check
    (CRH_TEST_DEVICE=cuda) an unavailable `cuda` backend fails them."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (bench/gpu_check.sh runs these)")
    ok, why = crh_kernels.available_backends()["cuda"]
    if not ok:
        if os.environ.get("CRH_TEST_DEVICE") == "cuda":
            pytest.fail(f"the cuda backend is unavailable on this GPU machine: {why}")
        pytest.skip(f"cuda backend unavailable: {why}")
    return torch.ops.crh


def check_cuda(ops, x, mask=None, normalize=True):
    mean, scatter, counts = ops.batch_stats(x.cuda(), None if mask is None else mask.cuda(), normalize)
    assert mean.is_cuda and scatter.is_cuda
    mean, scatter = mean.cpu(), scatter.cpu()
    n, skipped, rmean, rc = reference(x, mask, normalize)
    assert counts.tolist() == [n, skipped]
    assert torch.equal(scatter, scatter.T), "scatter must be exactly symmetric"
    if n == 0:
        assert not mean.any() and not scatter.any()
        return
    assert rel(scatter, rc) <= COV_TOL[x.dtype], (rel(scatter, rc), x.dtype)
    assert rel(mean, rmean) <= MEAN_TOL


CUDA_SHAPES = SHAPES + [(5000, 300), (40000, 64), (3000, 2049)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", CUDA_SHAPES, ids=str)
@pytest.mark.parametrize("mean_ratio", [0.0, 100.0])
def test_cuda_batch_stats_hostile(cuda_ops, n, d, dtype, mean_ratio):
    gen = torch.Generator().manual_seed(n * 1009 + d)
    x = hostile(gen, n, d, mean_ratio=mean_ratio, dtype=dtype,
                zero=min(2, n // 3), bad=min(3, n // 4), overflow=min(1, n // 5))
    check_cuda(cuda_ops, x, None, True)
    check_cuda(cuda_ops, x, None, False)
    check_cuda(cuda_ops, x, torch.rand(n, generator=gen) > 0.25, True)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["transposed", "row_gap"])
def test_cuda_non_contiguous(cuda_ops, layout):
    gen = torch.Generator().manual_seed(11)
    for dtype in DTYPES:
        x = hostile(gen, 900, 61, mean_ratio=10.0, dtype=dtype, zero=3, bad=3, layout=layout)
        check_cuda(cuda_ops, x, None, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_cross_stats(cuda_ops, dtype):
    gen = torch.Generator().manual_seed(5)
    for dg, dh in [(1, 1), (37, 5), (130, 300)]:
        g = hostile(gen, 2500, dg, mean_ratio=30.0, dtype=dtype, zero=2, bad=2)
        h = hostile(gen, 2500, dh, mean_ratio=1.0, dtype=dtype, bad=3)
        mask = torch.rand(2500, generator=gen) > 0.3
        mg, mh, sc, counts = cuda_ops.cross_stats(g.cuda(), h.cuda(), mask.cuda(), True)
        rn, rk, rmg, rmh, rc = reference_cross(g, h, mask, True)
        assert counts.tolist() == [rn, rk]
        assert rel(sc.cpu(), rc) <= COV_TOL[dtype]
        assert rel(mg.cpu(), rmg) <= MEAN_TOL and rel(mh.cpu(), rmh) <= MEAN_TOL


@pytest.mark.gpu
def test_cuda_opcheck_and_moments(cuda_ops):
    x = torch.randn(300, 19, device="cuda")
    mask = torch.rand(300, device="cuda") > 0.3
    for args in [(x, None, True), (x.bfloat16(), mask, False), (x.half(), mask, True)]:
        result = torch.library.opcheck(cuda_ops.batch_stats.default, args)
        assert all(v == "SUCCESS" for v in result.values()), result
    m = Moments(19, backend="cuda").update(x).update(x[:7])
    n, _, mean, c = reference(torch.cat([x[:7], x]).cpu())
    assert m.n == n and rel(m.scatter.cpu(), c) <= 1e-4 and rel(m.mean.cpu(), mean) <= MEAN_TOL
