"""The C++ extension (`cpp` backend): ops, fake kernels, accuracy on hostile inputs, loading.

The reference is float64 numpy written from docs/spec.md §2 (tests/_cpp_ref.py, shared with
tests/test_cuda.py, which holds the CUDA extension's tests). tests/test_moments.py runs the
shared backend matrix on `cpp` as well; this file covers what is specific to the extension:
both inner kernels (AVX-512 and portable), the chunk/thread boundaries of the blocked driver and
its last-chunk help (with a test-hooks build), the row-status encoding, the op registration and
fake kernels, the build's source lists, and the CRH_REQUIRE_CPP rule (with it set, a missing
extension fails these tests instead of skipping).
"""
import ast
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import crh_kernels
from crh_kernels import Moments, cross_moments
from crh_kernels import _env
from crh_kernels.backends import cpp as cpp_mod

from ._cpp_ref import (COV_TOL, DTYPES, MEAN_TOL, SHAPES, hostile, reference, reference_cross, rel,
                       valid_rows)


def require_or_skip(ok: bool, why: str) -> None:
    """Skip when the extension is missing, unless CRH_REQUIRE_CPP=1: then fail."""
    if ok:
        return
    if _env.require_cpp():
        pytest.fail(f"CRH_REQUIRE_CPP=1 but the cpp backend is unavailable: {why}")
    pytest.skip(f"cpp backend unavailable: {why}")


@pytest.fixture(scope="module")
def ops():
    ok, why = crh_kernels.available_backends()["cpp"]
    require_or_skip(ok, why)
    return torch.ops.crh


@pytest.fixture(params=["native", "avx512", "generic"])
def isa(request, monkeypatch):
    """Every inner kernel this machine can run: its best (AVX-512 with the BF16 dot product for
    bf16 inputs, where the CPU has it), plain AVX-512 fp32 (CRH_CPU_ISA=avx512), and the
    portable C++ one (CRH_CPU_ISA=generic). Levels the CPU lacks fall back to the next one."""
    if request.param == "native":
        monkeypatch.delenv("CRH_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("CRH_CPU_ISA", request.param)
    return request.param


def check_batch(ops, x, mask=None, normalize=True):
    mean, scatter, counts = ops.batch_stats(x, mask, normalize)
    n, skipped, rmean, rc = reference(x, mask, normalize)
    assert counts.tolist() == [n, skipped]
    assert mean.dtype == torch.float64 and scatter.dtype == torch.float32
    assert mean.shape == (x.shape[1],) and scatter.shape == (x.shape[1],) * 2
    assert torch.equal(scatter, scatter.T), "scatter must be exactly symmetric"
    if n == 0:
        assert not mean.any() and not scatter.any()
        return 0.0, 0.0
    e_c, e_m = rel(scatter, rc), rel(mean, rmean)
    assert e_c <= COV_TOL[x.dtype], f"cov rel err {e_c:.2e} > {COV_TOL[x.dtype]:.0e} ({x.dtype})"
    assert e_m <= MEAN_TOL, f"mean rel err {e_m:.2e} > {MEAN_TOL:.0e}"
    return e_c, e_m


# ---------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", SHAPES, ids=str)
@pytest.mark.parametrize("mean_ratio", [0.0, 100.0])
def test_batch_stats_hostile(ops, isa, n, d, dtype, mean_ratio):
    gen = torch.Generator().manual_seed(n * 1009 + d)
    x = hostile(gen, n, d, mean_ratio=mean_ratio, dtype=dtype,
                zero=min(2, n // 3), bad=min(3, n // 4), overflow=min(1, n // 5))
    check_batch(ops, x, None, True)
    check_batch(ops, x, None, False)
    mask = torch.rand(n, generator=gen) > 0.25
    check_batch(ops, x, mask, True)


@pytest.mark.parametrize("layout", ["transposed", "row_gap"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous(ops, isa, layout, dtype):
    gen = torch.Generator().manual_seed(7)
    x = hostile(gen, 900, 61, mean_ratio=10.0, dtype=dtype, zero=3, bad=3, layout=layout)
    assert not x.is_contiguous()
    check_batch(ops, x, None, True)
    check_batch(ops, x, torch.rand(900, generator=gen) > 0.5, False)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n,d", [(2047, 96), (5000, 40), (1100, 300)])
def test_threads_and_chunks(ops, threads, n, d):
    """Row splits across threads, partial chunks and both C layouts (private copies per thread
    for large N, one shared C for small N) give the same result within fp32 rounding."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        x = hostile(gen, n, d, mean_ratio=100.0, dtype=torch.float32, zero=5, bad=5)
        check_batch(ops, x, None, True)
        check_batch(ops, x[: n // 7], None, True)  # fewer rows than a chunk per thread
    finally:
        torch.set_num_threads(prev)


def test_degenerate_batches(ops):
    x = torch.randn(40, 9)
    # every row masked: counts nowhere
    mean, sc, counts = ops.batch_stats(x, torch.zeros(40, dtype=torch.bool), True)
    assert counts.tolist() == [0, 0] and not mean.any() and not sc.any()
    # every row zero: all skipped with normalize, all valid without
    z = torch.zeros(40, 9)
    assert ops.batch_stats(z, None, True)[2].tolist() == [0, 40]
    mean, sc, counts = ops.batch_stats(z, None, False)
    assert counts.tolist() == [40, 0] and not mean.any() and not sc.any()
    # masked non-finite rows are not "skipped": they count nowhere
    y = x.clone()
    y[:5] = float("nan")
    mask = torch.ones(40, dtype=torch.bool)
    mask[:5] = False
    assert ops.batch_stats(y, mask, True)[2].tolist() == [35, 0]
    assert ops.batch_stats(y, None, True)[2].tolist() == [35, 5]
    # no rows at all
    mean, sc, counts = ops.batch_stats(torch.empty(0, 4), None, True)
    assert counts.tolist() == [0, 0] and sc.shape == (4, 4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dg,dh", [(1, 1), (37, 5), (64, 200), (130, 33)])
def test_cross_stats(ops, isa, dtype, dg, dh):
    gen = torch.Generator().manual_seed(dg * 31 + dh)
    n = 1500
    g = hostile(gen, n, dg, mean_ratio=30.0, dtype=dtype, zero=2, bad=2)
    h = hostile(gen, n, dh, mean_ratio=1.0, dtype=dtype, bad=3, layout="transposed")
    for mask in (None, torch.rand(n, generator=gen) > 0.3):
        for normalize in (True, False):
            mg, mh, sc, counts = ops.cross_stats(g, h, mask, normalize)
            rn, rk, rmg, rmh, rc = reference_cross(g, h, mask, normalize)
            assert counts.tolist() == [rn, rk]
            assert sc.shape == (dg, dh) and sc.dtype == torch.float32
            assert rel(sc, rc) <= COV_TOL[dtype]
            assert rel(mg, rmg) <= MEAN_TOL and rel(mh, rmh) <= MEAN_TOL


def test_moments_through_backend(ops):
    """Moments(backend='cpp') over several batches (merged) against one float64 pass."""
    gen = torch.Generator().manual_seed(3)
    xs = [hostile(gen, n, 50, mean_ratio=100.0, dtype=torch.float32, zero=1, bad=1)
          for n in (700, 1, 2100, 33)]
    m = Moments(50, backend="cpp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for x in xs:
            m.update(x)
    n, skipped, mean, c = reference(torch.cat(xs))
    assert (m.n, m.n_skipped) == (n, skipped)
    assert rel(m.scatter, c) <= 1e-4 and rel(m.mean, mean) <= MEAN_TOL
    cm = cross_moments(xs[0], xs[0][:, :7], backend="cpp")
    assert cm.n == reference_cross(xs[0], xs[0][:, :7])[0]


def _merge64(parts):
    """Chan merge, in float64, of reference() results of row blocks: the state after them."""
    n, mean, c = 0, None, None
    for n2, _, m2, c2 in parts:
        if n2 == 0:
            continue
        if n == 0:
            n, mean, c = n2, m2.copy(), c2.copy()
            continue
        d = m2 - mean
        c = c + c2 + np.outer(d, d) * (n * n2 / (n + n2))
        mean = mean + d * (n2 / (n + n2))
        n += n2
    return n, mean, c


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 37, 130])
def test_batch_update_merges_into_state(ops, isa, state_dtype, dtype, d):
    """crh::batch_update_ (the batch merged in the kernel's last pass; the mean and the counts
    in the same call) against float64 Chan merges of independently computed blocks: a fresh
    state, then blocks whose means drift (mean ≫ spread), a block with no valid row, masks,
    zero and non-finite rows."""
    gen = torch.Generator().manual_seed(d)
    counts = torch.zeros(2, dtype=torch.int64)
    mean = torch.full((d,), float("nan"), dtype=state_dtype)  # fresh: must be overwritten
    scatter = torch.full((d, d), float("nan"), dtype=state_dtype)
    parts, skipped = [], 0
    for i, (n, ratio) in enumerate([(300, 50.0), (1, 50.0), (700, 60.0), (3, 0.0), (1100, 55.0)]):
        x = hostile(gen, n, d, mean_ratio=ratio, dtype=dtype, zero=n // 100, bad=n // 300)
        mask = torch.rand(n, generator=gen) > 0.2 if i % 2 else None
        if i == 3:
            x = torch.zeros(n, d, dtype=dtype)  # no valid row: mean and scatter untouched
        ref = reference(x, mask)
        before = (mean.clone(), scatter.clone())
        n1 = int(counts[0])
        mb, counts_b = ops.batch_update_(x, mask, True, False, counts, mean, scatter)
        assert counts_b.tolist() == [ref[0], ref[1]]
        skipped += ref[1]
        assert counts.tolist() == [n1 + ref[0], skipped], "the state's counts, in the same call"
        if ref[0] == 0:
            for a, b in zip(before, (mean, scatter)):
                assert torch.equal(a, b) or (n1 == 0 and b.isnan().all())
            continue
        assert rel(mb, ref[2]) <= MEAN_TOL
        parts.append(ref)
        assert torch.equal(scatter, scatter.T), "the state must stay exactly symmetric"
        n_ref, mean_ref, c_ref = _merge64(parts)
        assert int(counts[0]) == n_ref
        assert rel(scatter, c_ref) <= COV_TOL[dtype], (i, rel(scatter, c_ref))
        assert rel(mean, mean_ref) <= MEAN_TOL, (i, rel(mean, mean_ref))
        if n1 > 0:  # μ1 + (μ_b − μ1)·n_b/n in float64, rounded once: Moments' Python formula
            m1 = before[0].double()
            want = (m1 + (mb - m1) * (ref[0] / (n1 + ref[0]))).to(state_dtype)
            assert torch.allclose(mean, want, rtol=0, atol=4 * torch.finfo(state_dtype).eps)


def test_batch_update_matches_the_two_step_path(ops):
    """Moments.update through the fused op and through batch_stats + the Python merge agree
    (to fp32 rounding), for float32 and float64 states."""
    gen = torch.Generator().manual_seed(11)
    xs = [hostile(gen, n, 64, mean_ratio=20.0, dtype=torch.float32) for n in (500, 2, 900, 64)]

    class TwoStep(cpp_mod.CppBackend):
        fused_update = False  # hides the fused path: batch_stats + the Python merge

    for sd in (torch.float32, torch.float64):
        a, b = Moments(64, backend="cpp", dtype=sd), Moments(64, backend="cpp", dtype=sd)
        for x in xs:
            a.update(x)
        real = crh_kernels.backends.resolve
        try:
            crh_kernels.backends.resolve = lambda *args, **kw: TwoStep()
            for x in xs:
                b.update(x)
        finally:
            crh_kernels.backends.resolve = real
        assert a.n == b.n
        tol = 1e-5 if sd == torch.float32 else 1e-6
        assert rel(a.scatter, b.scatter.double().numpy()) <= tol
        assert rel(a.mean, b.mean.double().numpy()) <= 1e-6


# ------------------------------------------- the last-chunk help, with a test-hooks build
# The help is checked with a thread delayed before its last chunk (CRH_CPU_SLOW_THREAD), a
# hook compiled only into a test variant of the extension (-DCRH_TEST_HOOKS; the regular build
# has no such branch in its hot loop). That variant is JIT-built once (torch's extension
# cache, its own name) and run in a subprocess: two extensions that both define the crh:: ops
# cannot share a process.
_HOOKS_NAME = "crh_kernels_cpu_test_hooks"

_HOOKS_CHECK = r"""
import json, os, sys, time
sys.modules["crh_kernels._C"] = None  # never the regular extension here: both define crh::
import torch
from torch.utils.cpp_extension import load

build = json.loads(sys.argv[1])
sys.path.insert(0, build["root"])
from tests._cpp_ref import COV_TOL, hostile, reference, rel

load(name=build["name"], sources=build["sources"], extra_cflags=build["cflags"],
     extra_ldflags=build["ldflags"], is_python_module=True, verbose=False)
threads = build["threads"]
if threads == 0:  # build only
    sys.exit(0)
ops = torch.ops.crh
torch.set_num_threads(threads)
gen = torch.Generator().manual_seed(threads)
for n, d, dtype in [(4096, 64, torch.float32), (3000, 130, torch.bfloat16),
                    (2049, 256, torch.float32)]:
    x = hostile(gen, n, d, mean_ratio=30.0, dtype=dtype, zero=5, bad=3)
    mask = torch.rand(n, generator=gen) > 0.1
    runs, took = {}, {}
    for mode in ("off", "on", "slow0", "slow_last"):
        os.environ["CRH_CPU_HELP"] = "0" if mode == "off" else "1"
        os.environ.pop("CRH_CPU_SLOW_THREAD", None)
        if mode.startswith("slow"):
            os.environ["CRH_CPU_SLOW_THREAD"] = "0" if mode == "slow0" else str(threads - 1)
        t0 = time.perf_counter()
        _, sc, _ = ops.batch_stats(x, mask, True)
        took[mode] = time.perf_counter() - t0
        mu, st = torch.ones(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)
        ops.batch_update_(x, mask, True, False, torch.tensor([7, 0]), mu, st)
        runs[mode] = (sc, st)
    for mode, (sc, st) in runs.items():
        assert torch.equal(sc, runs["off"][0]) and torch.equal(st, runs["off"][1]), mode
    ref = reference(x, mask)
    assert rel(runs["slow0"][0], ref[3]) <= COV_TOL[dtype]
    # the hook is in this build: thread 0 slept 30 ms before its last chunk
    assert took["slow0"] >= 0.03, took
print("ok")
"""


def _run_hooks_check(threads: int, timeout: float):
    from crh_kernels import _build

    build = dict(name=_HOOKS_NAME, root=str(Path(__file__).resolve().parent.parent),
                 sources=[str(_build.CSRC / f) for f in _build.CPU_SOURCES],
                 cflags=_build.cpu_cflags(test_hooks=True), ldflags=_build.cpu_ldflags(),
                 threads=threads)
    env = {k: v for k, v in os.environ.items() if k not in ("CRH_CPU_HELP", "CRH_CPU_SLOW_THREAD")}
    return subprocess.run([sys.executable, "-c", _HOOKS_CHECK, json.dumps(build)], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def hooks_build(ops):
    """The test-hooks variant of the extension, built (or found in torch's cache) once. A
    failed build skips, or fails under CRH_REQUIRE_CPP=1 (CI), as a missing extension does."""
    out = _run_hooks_check(0, timeout=1200)
    tail = (out.stderr or out.stdout).strip().splitlines()[-15:]
    require_or_skip(out.returncode == 0, "the test-hooks build failed:\n" + "\n".join(tail))


@pytest.mark.parametrize("threads", [2, 3])
def test_last_chunk_help_changes_no_bit(hooks_build, threads):
    """A thread done with its rows computes bands of another thread's last chunk
    (CRH_CPU_SLOW_THREAD=t delays thread t before its last chunk, so the others take all of
    it): batch_stats and batch_update_ give bit-for-bit the results of the unhelped kernel
    (CRH_CPU_HELP=0), and the float64 reference. Runs the test-hooks build in a subprocess."""
    out = _run_hooks_check(threads, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.strip().splitlines()[-1] == "ok"


def test_hooks_absent_from_the_regular_build(ops):
    """The test-only delay is compiled out of the regular extension (its hot loop has no such
    branch): the binary does not even hold the variable's name."""
    path = Path(cpp_mod.cpu_extension().__file__)
    assert b"CRH_CPU_SLOW_THREAD" not in path.read_bytes(), path


def test_batch_update_strict_and_bad_state(ops):
    """strict: a batch with a skipped row leaves the state bitwise unchanged and raises;
    a state of the wrong dtype, shape, layout or device is refused before anything runs."""
    gen = torch.Generator().manual_seed(5)
    m = Moments(9, backend="cpp", strict=True, dtype=torch.float32)
    m.update(torch.randn(40, 9, generator=gen))
    sd = m.state_dict()
    bad = torch.randn(30, 9, generator=gen)
    bad[4] = 0.0
    with pytest.raises(ValueError, match="strict"):
        m.update(bad)
    after = m.state_dict()
    assert m.n == 40 and all(torch.equal(sd[k], after[k]) for k in sd if isinstance(sd[k], torch.Tensor))
    x = torch.randn(5, 4, generator=gen)
    mean, sc = torch.zeros(4), torch.zeros(4, 4)
    cases = [
        ((mean, sc.half()), "float32 or float64"),
        ((mean.double(), sc), "dtype of state_scatter"),
        ((mean, torch.zeros(4, 5)), r"contiguous \(4, 4\)"),
        ((mean, torch.zeros(4, 8)[:, ::2]), r"contiguous \(4, 4\)"),
        ((torch.zeros(3), sc), r"contiguous \(4,\)"),
    ]
    counts = torch.tensor([3, 1])
    cases += [
        ((mean, sc), "state_counts must be a contiguous int64", counts.int()),
        ((mean, sc), "state_counts must be a contiguous int64", torch.tensor([3, 1, 0])),
        ((mean, sc), "state_counts must be a contiguous int64", torch.tensor([[3, 1]])),
        ((mean, sc), "state_counts must be >= 0", torch.tensor([-1, 0])),
        ((mean, sc), "state_counts must be >= 0", torch.tensor([2, -5])),
    ]
    for case in cases:
        (mu, s), msg = case[:2]
        c = case[2] if len(case) > 2 else counts
        keep = (c.clone(), mu.clone(), s.clone())
        with pytest.raises(RuntimeError, match=msg):
            ops.batch_update_(x, None, True, False, c, mu, s)
        assert all(torch.equal(a, b) for a, b in zip(keep, (c, mu, s))), "refused: untouched"
    # strict with a skipped row: counts, mean and scatter untouched
    mu, s = torch.randn(4, generator=gen), torch.eye(4)
    keep = (counts.clone(), mu.clone(), s.clone())
    xb = x.clone()
    xb[1, 2] = float("nan")
    _, cb = ops.batch_update_(xb, None, True, True, counts, mu, s)
    assert cb.tolist() == [4, 1]
    assert all(torch.equal(a, b) for a, b in zip(keep, (counts, mu, s)))
    # not strict: the skipped row is counted, the others merged
    ops.batch_update_(xb, None, True, False, counts, mu, s)
    assert counts.tolist() == [7, 2] and not torch.equal(mu, keep[1])


# ------------------------------------------------------- staging: pass 1 at copy time
def _stage(ops, blocks, d, dtype, normalize=True):
    """Stage (x, mask) blocks one after another into one buffer, as RowStager does."""
    rows = sum(b[0].shape[0] for b in blocks)
    buf = torch.full((rows, d), float("nan"), dtype=dtype)
    scale = torch.full((rows,), -1.0)
    status = torch.full((rows,), 7, dtype=torch.uint8)
    sum_ = torch.zeros(d, dtype=torch.float64)
    at = 0
    for x, mask in blocks:
        r = x.shape[0]
        ops.stage_rows_(x, mask, normalize, buf[at:at + r], scale[at:at + r], status[at:at + r], sum_)
        at += r
    return buf, scale, status, sum_


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [1, 37, 130])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "row_gap"])
def test_stage_rows_is_pass_one(ops, isa, dtype, d, layout):
    """crh::stage_rows_ copies the rows exactly and gives each row the status and scale of the
    row rule, and Σ s_i x_i over the valid rows, against float64 numpy; blocks of 1 to 700 rows,
    masks, zero, non-finite and fp32-overflowing rows, mean ≫ spread, strided inputs."""
    gen = torch.Generator().manual_seed(d)
    blocks = []
    for i, n in enumerate((1, 300, 2, 700)):
        x = hostile(gen, n, d, mean_ratio=80.0, dtype=dtype, zero=n // 50, bad=n // 100,
                    overflow=n // 150, layout=layout)
        mask = torch.rand(n, generator=gen) > 0.25 if i % 2 else None
        blocks.append((x, mask))
    for normalize in (True, False):
        buf, scale, status, sum_ = _stage(ops, blocks, d, dtype, normalize)
        x = torch.cat([b[0] for b in blocks])
        mask = torch.cat([b[1] if b[1] is not None else torch.ones(b[0].shape[0], dtype=torch.bool)
                          for b in blocks])
        assert torch.equal(buf.float().nan_to_num(0.5), x.float().nan_to_num(0.5))
        live, ok = valid_rows(x, mask, normalize)
        want = np.where(~live, 0, np.where(ok, 2, 1))
        assert status.numpy().tolist() == want.tolist()
        valid = live & ok
        rows = x.double().numpy()[valid]
        s_ref = 1.0 / np.linalg.norm(rows, axis=1) if normalize else np.ones(len(rows))
        assert np.allclose(scale.numpy()[valid], s_ref, rtol=1e-6, atol=0)
        assert (scale.numpy()[~valid] == 0).all()
        ref_sum = (rows * s_ref[:, None]).sum(axis=0)
        assert rel(sum_, ref_sum) <= 1e-6


def test_row_status_encoding_is_pythons(ops):
    """The C++ row status (csrc/row_status.h) is the vocabulary of crh_kernels.backends.base:
    a masked row, a zero row (normalizing) and a non-finite row, and a valid row."""
    from crh_kernels.backends.base import ROW_MASKED, ROW_SKIPPED, ROW_VALID

    x = torch.tensor([[1.0, 2.0], [0.0, 0.0], [float("nan"), 1.0], [3.0, -4.0]])
    mask = torch.tensor([False, True, True, True])
    status = torch.full((4,), 7, dtype=torch.uint8)
    ops.stage_rows_(x, mask, True, torch.empty(4, 2), torch.empty(4), status,
                    torch.zeros(2, dtype=torch.float64))
    assert status.tolist() == [ROW_MASKED, ROW_SKIPPED, ROW_SKIPPED, ROW_VALID]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_update_staged_merges_into_state(ops, isa, state_dtype, dtype):
    """Staged batches (several staged blocks each) merged by crh::batch_update_staged_ give the
    float64 Chan merge of the batches computed independently, and agree with crh::batch_update_
    on the same rows; a staged batch with no valid row leaves the state as it was."""
    d = 45
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros(2, dtype=torch.int64)
    mean, scatter = torch.zeros(d, dtype=state_dtype), torch.zeros(d, d, dtype=state_dtype)
    counts_b, mean_b, scatter_b = counts.clone(), mean.clone(), scatter.clone()
    parts = []
    for j, ratio in enumerate((40.0, 45.0, 0.0, 60.0)):
        blocks = []
        for i, n in enumerate((200, 1, 333)):
            x = hostile(gen, n, d, mean_ratio=ratio, dtype=dtype, zero=n // 40, bad=n // 90)
            if j == 2:
                x = torch.zeros(n, d, dtype=dtype)
            blocks.append((x, torch.rand(n, generator=gen) > 0.3 if i == 2 else None))
        buf, scale, status, sum_ = _stage(ops, blocks, d, dtype)
        x = torch.cat([b[0] for b in blocks])
        mask = torch.cat([b[1] if b[1] is not None else torch.ones(b[0].shape[0], dtype=torch.bool)
                          for b in blocks])
        ref = reference(x, mask)
        before = (mean.clone(), scatter.clone())
        staged = (buf.clone(), scale.clone(), status.clone(), sum_.clone())
        mb, cb = ops.batch_update_staged_(buf, scale, status, sum_, False, counts, mean, scatter)
        mb2, cb2 = ops.batch_update_(x, mask, True, False, counts_b, mean_b, scatter_b)
        assert cb.tolist() == cb2.tolist() == [ref[0], ref[1]]
        assert counts.tolist() == counts_b.tolist()
        for a, b in zip(staged, (buf, scale, status, sum_)):  # read, never written
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        if ref[0] == 0:
            assert torch.equal(mean, before[0]) and torch.equal(scatter, before[1])
            continue
        assert rel(mb, ref[2]) <= MEAN_TOL and rel(mb, mb2.numpy()) <= 1e-12
        parts.append(ref)
        assert torch.equal(scatter, scatter.T)
        n_ref, mean_ref, c_ref = _merge64(parts)
        assert int(counts[0]) == n_ref
        assert rel(scatter, c_ref) <= COV_TOL[dtype]
        assert rel(scatter, scatter_b.double().numpy()) <= 1e-5
        assert rel(mean, mean_ref) <= MEAN_TOL and rel(mean, mean_b.double().numpy()) <= 1e-6


def test_staged_strict_and_argument_checks(ops):
    """strict: a staged batch with a skipped row leaves the state bitwise unchanged (and
    Moments raises); bad buffers are refused, naming the argument, before anything is written."""
    gen = torch.Generator().manual_seed(8)
    m = Moments(6, backend="cpp", strict=True, dtype=torch.float32)
    m.update(torch.randn(20, 6, generator=gen))
    sd = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in m.state_dict().items()}
    x = torch.randn(10, 6, generator=gen)
    x[3] = 0.0
    buf, scale, status, sum_ = _stage(ops, [(x, None)], 6, torch.float32)
    with pytest.raises(ValueError, match="strict"):
        m.update_staged(buf, scale, status, sum_)
    after = m.state_dict()
    assert all(torch.equal(sd[k], after[k]) for k in sd if isinstance(sd[k], torch.Tensor))
    assert m.n == 20
    x = torch.randn(5, 4, generator=gen)
    good = dict(buf=torch.empty(5, 4), scale=torch.empty(5), status=torch.empty(5, dtype=torch.uint8),
                sum_=torch.zeros(4, dtype=torch.float64))
    cases = [
        ("buf", torch.empty(5, 4, dtype=torch.float64), "buf must be a Float"),
        ("buf", torch.empty(5, 3), "buf must be"),
        ("buf", torch.empty(4, 5).t(), "unit column stride"),
        ("scale", torch.empty(5, dtype=torch.float64), "scale must be"),
        ("scale", torch.empty(4), "scale must be"),
        ("status", torch.empty(5), "status must be"),
        ("sum_", torch.zeros(5, dtype=torch.float64), "sum must be"),
        ("sum_", torch.zeros(4), "sum must be"),
    ]
    for name, value, msg in cases:
        args = dict(good, **{name: value})
        keep = {k: v.clone() for k, v in args.items()}
        with pytest.raises(RuntimeError, match=msg):
            ops.stage_rows_(x, None, True, args["buf"], args["scale"], args["status"], args["sum_"])
        assert torch.equal(args["sum_"], keep["sum_"])
    with pytest.raises(RuntimeError, match="mask must have shape"):
        ops.stage_rows_(x, torch.ones(4, dtype=torch.bool), True, *good.values())
    with pytest.raises(RuntimeError, match="status must be"):
        ops.batch_update_staged_(x, good["scale"], torch.empty(4, dtype=torch.uint8), good["sum_"],
                                 False, torch.zeros(2, dtype=torch.int64), torch.zeros(4),
                                 torch.zeros(4, 4))


# ------------------------------------------------------------------ matmul_rows (g_b · W)
@pytest.mark.parametrize("n,k,m", [(1, 1, 1), (1, 37, 1000), (37, 5, 33), (300, 130, 70),
                                   (1030, 257, 96)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_matmul_rows(ops, isa, n, k, m, layout):
    """crh::matmul_rows against float64 numpy, fp32 accumulation over K: odd shapes (edge
    tiles in both directions, K not a multiple of the chunk), strided operands, zero rows and
    rows of mean ≫ spread."""
    gen = torch.Generator().manual_seed(n + k + m)
    x = torch.randn(n, k, generator=gen) + 30.0
    x[:: max(1, n // 3)] = 0.0
    w = torch.randn(k, m, generator=gen)
    if layout == "transposed":
        x, w = x.t().contiguous().t(), w.t().contiguous().t()
    out = ops.matmul_rows(x, w)
    ref = x.double().numpy() @ w.double().numpy()
    assert out.shape == (n, m) and out.dtype == torch.float32 and out.is_contiguous()
    # fp32 sums of K products: |error| ≤ ~K·eps·Σ|x||w| per entry
    bound = 4 * k * 1.2e-7 * (np.abs(x.double().numpy()) @ np.abs(w.double().numpy())) + 1e-30
    assert (np.abs(out.double().numpy() - ref) <= bound).all()
    assert (out[:: max(1, n // 3)] == 0).all()


def test_matmul_rows_checks_and_dispatch(ops):
    x, w = torch.randn(4, 3), torch.randn(3, 5)
    for a, b, msg in [(x.double(), w, "must be float32"), (x, w.half(), "must be float32"),
                      (x, torch.randn(4, 5), "w must have 3 rows"), (x[0], w, "must be 2-D")]:
        with pytest.raises(RuntimeError, match=msg):
            ops.matmul_rows(a, b)
    # the Python helper: the op where it applies, torch's matmul elsewhere (autograd, dtypes)
    assert torch.allclose(crh_kernels.backends.matmul_rows(x, w), x @ w, rtol=1e-5, atol=1e-6)
    xg = x.clone().requires_grad_()
    y = crh_kernels.backends.matmul_rows(xg, w)
    assert y.requires_grad and y.grad_fn is not None
    assert crh_kernels.backends.matmul_rows(x.double(), w.double()).dtype == torch.float64


def test_cpp_is_the_cpu_default(ops):
    from crh_kernels import backends

    if _env.backend():
        pytest.skip("CRH_BACKEND overrides the choice rule in this environment")
    assert backends.resolve(None, torch.device("cpu"), torch.float32).name == "cpp"


# ---------------------------------------------------------------- registration and fakes
def test_opcheck(ops):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 7, generator=gen)
    mask = torch.rand(50, generator=gen) > 0.3
    samples = [
        (ops.batch_stats.default, (x, None, True)),
        (ops.batch_stats.default, (x.bfloat16(), mask, False)),
        (ops.batch_stats.default, (x.t().contiguous().t().half(), mask, True)),
        (ops.cross_stats.default, (x, torch.randn(50, 3, generator=gen), mask, True)),
        (ops.batch_update_.default, (x, mask, True, False, torch.tensor([10, 2]),
                                     torch.randn(7, generator=gen), torch.eye(7))),
        (ops.batch_update_.default, (x.bfloat16(), None, True, True, torch.tensor([0, 0]),
                                     torch.zeros(7).double(), torch.zeros(7, 7).double())),
        (ops.stage_rows_.default, (x, mask, True, torch.empty(50, 7), torch.empty(50),
                                   torch.empty(50, dtype=torch.uint8),
                                   torch.zeros(7, dtype=torch.float64))),
        (ops.batch_update_staged_.default,
         (x, torch.rand(50, generator=gen), torch.full((50,), 2, dtype=torch.uint8),
          torch.randn(7, dtype=torch.float64, generator=gen), False, torch.tensor([5, 0]),
          torch.zeros(7), torch.eye(7))),
        (ops.matmul_rows.default, (x, torch.randn(7, 9, generator=gen))),
        (ops.matmul_rows.default, (x.t().contiguous().t(), torch.randn(9, 7, generator=gen).t())),
    ]
    for op, args in samples:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result


def test_fake_kernels(ops):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(10, 5, dtype=torch.bfloat16)
        mean, sc, counts = ops.batch_stats(x, None, True)
        assert (mean.shape, mean.dtype) == ((5,), torch.float64)
        assert (sc.shape, sc.dtype) == ((5, 5), torch.float32)
        assert (counts.shape, counts.dtype) == ((2,), torch.int64)
        g, h = torch.empty(10, 3), torch.empty(10, 4)
        out = ops.cross_stats(g, h, torch.empty(10, dtype=torch.bool), False)
        assert [t.shape for t in out] == [(3,), (4,), (3, 4), (2,)]
        mm = ops.matmul_rows(g, torch.empty(3, 8))
        assert (mm.shape, mm.dtype) == ((10, 8), torch.float32)
        mb, counts = ops.batch_update_staged_(x, torch.empty(10), torch.empty(10, dtype=torch.uint8),
                                              torch.empty(5, dtype=torch.float64), False,
                                              torch.empty(2, dtype=torch.int64), torch.empty(5),
                                              torch.empty(5, 5))
        assert (mb.shape, mb.dtype, counts.shape) == ((5,), torch.float64, (2,))
        mb, counts = ops.batch_update_(x, None, True, False, torch.empty(2, dtype=torch.int64),
                                       torch.empty(5), torch.empty(5, 5))
        assert (mb.shape, mb.dtype, counts.shape) == ((5,), torch.float64, (2,))


@pytest.mark.parametrize("bad", ["1d", "float64", "int", "mask_shape", "mask_dtype", "rows"])
def test_argument_checks(ops, bad):
    x, mask = torch.randn(8, 3), None
    if bad == "1d":
        x = torch.randn(8)
    elif bad == "float64":
        x = x.double()
    elif bad == "int":
        x = torch.ones(8, 3, dtype=torch.int32)
    elif bad == "mask_shape":
        mask = torch.ones(7, dtype=torch.bool)
    elif bad == "mask_dtype":
        mask = torch.ones(8)
    if bad == "rows":
        with pytest.raises(RuntimeError, match="same number of rows"):
            ops.cross_stats(x, torch.randn(9, 2), None, True)
        return
    with pytest.raises(RuntimeError, match="crh"):
        ops.batch_stats(x, mask, True)


def test_availability_reason(ops):
    ok, why = crh_kernels.available_backends()["cpp"]
    assert ok and "C++ extension" in why and "\n" not in why
    assert cpp_mod.cpu_extension().cpu_isa() in ("avx512+bf16", "avx512", "generic")


# -------------------------------------------------------------------------- loading rules
_MISSING = r"""
import sys
sys.modules["crh_kernels._C"] = None           # the prebuilt module is not importable
import crh_kernels._build as b
def broken(*a, **k):
    raise RuntimeError("no compiler on this machine")
b.jit_cpu = broken                              # and the JIT build fails
import crh_kernels
ok, why = crh_kernels.available_backends()["cpp"]
from crh_kernels import backends
print(ok)
print(why)
try:
    print(backends.resolve(None, "cpu", __import__("torch").float32).name)
except RuntimeError as exc:
    print("raised: " + str(exc).splitlines()[0])
"""


def _setup_py_lists():
    """The source and header lists of setup.py, read without running it."""
    tree = ast.parse((Path(__file__).resolve().parent.parent / "setup.py").read_text())
    return {t.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name) and t.id.endswith(("_SOURCES", "_HEADERS"))}


def test_build_source_lists():
    """setup.py and the JIT build (crh_kernels/_build.py) compile the same files, and every
    file of csrc/ is in their lists."""
    from crh_kernels import _build

    names = ("CPU_SOURCES", "CPU_HEADERS", "CUDA_SOURCES", "CUDA_HEADERS")
    ours = {k: getattr(_build, k) for k in names}
    assert _setup_py_lists() == ours
    listed = {f for files in ours.values() for f in files}
    assert listed == {p.name for p in _build.CSRC.iterdir() if p.suffix in (".h", ".cpp", ".cu")}


@pytest.mark.parametrize("required", [False, True])
def test_missing_extension_reason(required):
    env = dict(os.environ)
    env.pop("CRH_BACKEND", None)
    env["CRH_REQUIRE_CPP"] = "1" if required else "0"
    out = subprocess.run([sys.executable, "-c", _MISSING], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    ok, why, chosen = out.stdout.strip().splitlines()
    assert ok == "False"
    assert "no prebuilt crh_kernels._C" in why and "no compiler on this machine" in why
    assert ("CRH_REQUIRE_CPP=1" in why) == required
    if required:  # never a silent fallback: the choice itself raises with the reason
        assert chosen.startswith("raised: backend 'cpp' is unavailable") and "no compiler" in chosen
    else:
        assert chosen == "torch"


def test_require_flag_fails_instead_of_skipping(monkeypatch):
    monkeypatch.setenv("CRH_REQUIRE_CPP", "1")
    with pytest.raises(pytest.fail.Exception):
        require_or_skip(False, "missing")
    monkeypatch.setenv("CRH_REQUIRE_CPP", "0")
    with pytest.raises(pytest.skip.Exception):
        require_or_skip(False, "missing")
    require_or_skip(True, "")
