"""RowStager: rows gathered per Moments give the state of one update per call (within fp32
rounding), with masks, overflowing calls, dtype changes and the byte budget."""
import numpy as np
import pytest
import torch

from crh_kernels import Moments
from crh_kernels.collect.staging import RowStager

from ._ref import ref_moments, rel_err


def _feed_all(stager, m, chunks):
    for x, mask in chunks:
        stager.feed(m, x, mask)


@pytest.mark.parametrize("rows", [7, 64, 1000])
def test_staged_equals_reference(rows):
    gen = torch.Generator().manual_seed(rows)
    chunks = []
    for n in (5, 30, 1, 90, 17, 64, 3):
        x = torch.randn(n, 11, generator=gen) + 4.0
        mask = torch.rand(n, generator=gen) > 0.3 if n % 2 else None
        chunks.append((x, mask))
    st = RowStager(rows)
    m = Moments(11)
    _feed_all(st, m, chunks)
    assert st.pending == sum(c[0].shape[0] for c in chunks) % rows  # full buffers went in
    st.flush()
    assert st.pending == 0
    x = torch.cat([c[0] for c in chunks])
    mask = torch.cat([c[1] if c[1] is not None else torch.ones(c[0].shape[0], dtype=torch.bool)
                      for c in chunks])
    n, _, mean, c = ref_moments(x, mask)
    assert m.n == n
    assert rel_err(m.scatter, c) < 1e-5 and rel_err(m.mean, mean) < 1e-6


def test_copies_rows_at_once():
    st = RowStager(100)
    m = Moments(4)
    x = torch.randn(10, 4)
    want = ref_moments(x.clone())
    st.feed(m, x, None)
    x.zero_()  # e.g. an in-place activation after the hook
    st.flush()
    assert rel_err(m.scatter, want[3]) < 1e-5


def test_dtype_change_flushes_and_large_calls_pass_through():
    st = RowStager(50)
    m = Moments(6)
    st.feed(m, torch.randn(10, 6), None)
    st.feed(m, torch.randn(10, 6).bfloat16(), None)   # new dtype: the fp32 rows go in first
    assert m.n == 10 and st.pending == 10
    st.feed(m, torch.randn(80, 6), None)               # ≥ rows: flush, then straight through
    assert m.n == 10 + 10 + 80 and st.pending == 0


def test_byte_budget_and_disabled():
    st = RowStager(100, max_bytes=100 * (6 * 4 + 1))
    a, b = Moments(6), Moments(6)
    st.feed(a, torch.randn(3, 6), None)
    st.feed(b, torch.randn(3, 6), None)                # no room for a second buffer
    assert (a.n, b.n, st.pending) == (0, 3, 3)
    # the budget counts row buffers (a mask buffer exists only for masked streams): two
    # buffers of exactly half the budget both fit, and a masked call still stages
    st2 = RowStager(100, max_bytes=2 * 100 * 6 * 4)
    st2.feed(a, torch.randn(3, 6), None)
    st2.feed(b, torch.randn(3, 6), torch.tensor([True, False, True]))
    assert (a.n, b.n, st2.pending) == (0, 3, 6)
    st2.flush()
    assert (a.n, b.n, st2.pending) == (3, 5, 0)
    off = RowStager(0)
    c = Moments(6)
    off.feed(c, torch.randn(3, 6), None)
    assert c.n == 3 and off.pending == 0
    with pytest.raises(ValueError, match="stage_rows"):
        RowStager(-1)


def test_collector_layers_read_flushes():
    from crh_kernels import Collector
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(inplace=True), torch.nn.Linear(7, 3))
    col = Collector(net, stage_rows=1000)
    col.start()
    net(torch.randn(20, 5)).sum().backward()
    assert col._stager.pending > 0
    assert col.layers["0"].H_b.n == 20 and col._stager.pending == 0
    col.stop()
    assert np.isfinite(col.layers["0"].H_b.cov().numpy()).all()


def _cpp_or_skip():
    import crh_kernels
    from crh_kernels import _env
    ok, why = crh_kernels.available_backends()["cpp"]
    if not ok:
        if _env.require_cpp():
            pytest.fail(f"CRH_REQUIRE_CPP=1 but the cpp backend is unavailable: {why}")
        pytest.skip(f"cpp backend unavailable: {why}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pass_one_at_staging_equals_plain_staging(dtype):
    """With the cpp backend the stager does pass 1 while copying (_StagedBuffer); the states
    equal those of the plain copies (_Buffer) and the float64 reference: masks, zero and
    non-finite rows, strided calls, several flushes."""
    _cpp_or_skip()
    from crh_kernels.collect import staging

    gen = torch.Generator().manual_seed(2)
    chunks = []
    for n in (5, 30, 1, 90, 17, 64, 3, 40):
        x = (torch.randn(n, 19, generator=gen) * 0.1 + 3.0).to(dtype)
        if n == 30:
            x[4] = 0.0
            x[7, 2] = float("nan")
        if n == 90:
            x = x.t().contiguous().t()
        chunks.append((x, torch.rand(n, generator=gen) > 0.3 if n % 2 else None))
    fast, plain = RowStager(64), RowStager(64)
    a, b = Moments(19, backend="cpp"), Moments(19, backend="cpp")
    with pytest.warns(RuntimeWarning, match="skipped [0-9]+ "):
        _feed_all(fast, a, chunks)
        fast.flush()
    assert isinstance(fast._bufs[id(a)], staging._StagedBuffer)
    plain._new_buffer = lambda m, x: staging._Buffer(m, x, plain.rows)
    with pytest.warns(RuntimeWarning, match="skipped [0-9]+ "):
        _feed_all(plain, b, chunks)
        plain.flush()
    assert isinstance(plain._bufs[id(b)], staging._Buffer)
    assert (a.n, a.n_skipped) == (b.n, b.n_skipped) and a.n_skipped == 2
    assert rel_err(a.scatter, b.scatter.double()) < 1e-6 and rel_err(a.mean, b.mean.double()) < 1e-9
    x = torch.cat([c[0].float() for c in chunks])
    mask = torch.cat([c[1] if c[1] is not None else torch.ones(c[0].shape[0], dtype=torch.bool)
                      for c in chunks])
    n, _, mean, c = ref_moments(x, mask)
    tol = 1e-5 if dtype == torch.float32 else 5e-3  # bf16: the products take bf16 operands
    assert a.n == n and rel_err(a.scatter, c) < tol and rel_err(a.mean, mean) < 1e-6


def test_staged_strict_failure_keeps_state():
    """A strict Moments whose staged rows hold a zero row raises at the flush; its state is
    the one before, and the stager is ready for the next rows."""
    _cpp_or_skip()
    st = RowStager(16)
    m = Moments(5, backend="cpp", strict=True)
    st.feed(m, torch.randn(16, 5), None)               # full: flushed, fine
    keep = m.scatter.clone()
    bad = torch.randn(6, 5)
    bad[2] = 0.0
    st.feed(m, bad, None)
    with pytest.raises(ValueError, match="strict"):
        st.flush()
    assert m.n == 16 and torch.equal(m.scatter, keep) and st.pending == 0
    st.feed(m, torch.randn(16, 5), None)
    assert m.n == 32
