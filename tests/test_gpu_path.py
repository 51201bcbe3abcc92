"""The GPU update path, checked on the CPU (issue 14): no host sync, few launches.

* No host sync: ``Moments.update`` runs on *fake* CUDA tensors (``FakeTensorMode``, which
  refuses any read of a value: ``.item()``, ``.tolist()``, ``nonzero``, ``bincount`` without
  ``minlength`` raise ``DataDependentOutputException``) for the torch, triton and cuda backends,
  and traces under ``torch.compile(fullgraph=True)`` on the CPU, where any such read is a graph
  break, hence an error. ``strict=True`` reads the skipped count by design: shown to raise
  there, which also shows the check can fail.
* Launches: one ``Moments.update`` on the Triton path, under the interpreter, launches four
  Triton kernels and dispatches no torch op that would be a CUDA launch (only allocations and
  views), counted with a ``TorchDispatchMode`` that also steps into the Triton custom ops.
* The skipped-row warning off the CPU: deferred to the next host read, once, all or nothing.
"""
import importlib
import os
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from crh_kernels import Moments

from ._ref import COV_TOL, MEAN_TOL, make_rows, ref_moments, rel_err

# the module (crh_kernels.moments the attribute is the function of that name)
moments_mod = importlib.import_module("crh_kernels.moments")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _triton():
    return pytest.importorskip("crh_kernels.backends.triton", reason="triton not installed")


# ----------------------------------------------------------------------- FakeTensorMode
def _fake_updates(backend, d=24, **kw):
    """Two updates (fresh state, then allocated) of fake CUDA rows, with a mask and skipped
    rows' worth of data (values are unknown to fake tensors: nothing may depend on them)."""
    with FakeTensorMode():
        m = Moments(d, backend=backend, **kw)
        for n in (50, 33):
            x = torch.empty(n, d, device="cuda", dtype=torch.bfloat16)
            mask = torch.empty(n, device="cuda", dtype=torch.bool)
            m.update(x, mask)
        st = m._state
        assert st.device.type == "cuda"
        assert st.counts.device.type == "cuda" and st.counts.shape == (2,)
        assert st.mean.shape == (d,) and st.scatter.shape == (d, d) and st.mean.dtype == torch.float64
        with pytest.raises(DataDependentOutputException):
            m.n  # reading the count is the sync, and it comes only now
    return m


def test_torch_backend_update_on_fake_cuda():
    m = _fake_updates("torch")
    assert m._unchecked  # the skipped-row check waits for a host read


def test_triton_backend_update_on_fake_cuda(monkeypatch):
    tb = _triton()
    # the backend accepts CUDA tensors only without the interpreter: here it runs its fake op
    monkeypatch.setattr(tb.TritonBackend, "supports", lambda self, device: (True, ""))
    m = _fake_updates("triton")
    assert m._unchecked


def test_cuda_backend_stats_on_fake_cuda():
    """The cuda backend's methods over its ops' fake kernels (registered with the C++
    extension, which defines the op schemas)."""
    from crh_kernels.backends import cpp, cuda

    if cpp.cpu_extension() is None:
        pytest.skip("the C++ extension (it defines the crh:: ops) is not available")
    be = cuda.CudaBackend()
    with FakeTensorMode():
        x = torch.empty(40, 16, device="cuda", dtype=torch.float16)
        st = be.batch_stats(x, None, True)
        cs = be.cross_stats(x, torch.empty(40, 8, device="cuda", dtype=torch.float16), None, True)
        assert st.n.device.type == "cuda" and st.n.dim() == 0 and cs.n_skipped.device.type == "cuda"
        m = Moments(16)
        counts = moments_mod._batch_counts(st.n, st.n_skipped, x.device)
        new = m._merged(m._zeros(x.device, None), counts, st.mean, st.scatter, x.device, True)
        assert new.scatter.shape == (16, 16) and new.counts.device.type == "cuda"


def test_strict_reads_the_count_and_fake_tensors_catch_it():
    """strict=True must refuse before the commit, so it reads the skipped count: the one
    documented host sync of an update. FakeTensorMode reports it, and the state is unchanged."""
    with FakeTensorMode():
        m = Moments(8, backend="torch", strict=True, device="cuda")
        before = m._state
        with pytest.raises(DataDependentOutputException):
            m.update(torch.empty(10, 8, device="cuda"))
        assert m._state is before


# ------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_update_traces_under_torch_compile_fullgraph(compiler):
    """A whole update (checks, backend choice, batch statistics, the merge with device counts,
    the commit) is one graph on the CPU: no graph break, so no host read. Same state as eager;
    skipped rows are warned about at the next read of the counts."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(4)
    d = 12
    xs = [make_rows(gen, n, d, mean_ratio=3.0, zero_rows=z, bad_rows=b)
          for n, z, b in ((40, 0, 0), (25, 2, 1), (31, 0, 0))]
    masks = [None, torch.rand(25, generator=gen) > 0.2, None]
    eager = Moments(d, backend="torch")
    compiled = Moments(d, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, mask in zip(xs, masks):
            eager.update(x, mask)
    step = torch.compile(lambda x, mask: compiled.update(x, mask), fullgraph=True,
                         backend=compiler)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for x, mask in zip(xs, masks):
            step(x, mask)
    assert not seen, "a compiled update reads no count, so it cannot warn"
    k = eager.n_skipped
    assert k > 0
    with pytest.warns(RuntimeWarning, match=f"skipped {k} zero-norm or non-finite row"):
        assert compiled.n_skipped == k
    assert compiled.n == eager.n
    torch.testing.assert_close(compiled.mean, eager.mean, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(compiled.scatter, eager.scatter, rtol=1e-6, atol=1e-9)
    assert torch.equal(compiled.scatter, compiled.scatter.T)
    n, _, mean, c = ref_moments(torch.cat([x[m] if m is not None else x for x, m in zip(xs, masks)]))
    assert rel_err(compiled.scatter, c) <= COV_TOL[torch.float32] and rel_err(compiled.mean, mean) <= MEAN_TOL


# ------------------------------------------------------------------------------ launches
# torch ops that allocate or view: no kernel launch on a GPU
_NOT_LAUNCHES = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                 "detach", "lift_fresh"}
# torch ops that read a value on the host (a sync on a GPU)
_SYNCS = {"_local_scalar_dense", "item", "nonzero", "bincount", "unique", "_unique2",
          "masked_select", "equal", "is_nonzero"}


class _Count(TorchDispatchMode):
    """Every torch op dispatched, stepping into the Triton custom ops (whose implementation
    the dispatcher would otherwise hide)."""

    def __init__(self, impls):
        super().__init__()
        self.ops = []
        self.impls = impls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        self.ops.append(func)
        if name in self.impls:
            with self:
                return self.impls[name](*args, **kwargs)
        return func(*args, **kwargs)

    def launches(self):
        return [f for f in self.ops if f.namespace == "aten" and not f.is_view
                and f.overloadpacket.__name__ not in _NOT_LAUNCHES]

    def syncs(self):
        return [f for f in self.ops if f.overloadpacket.__name__ in _SYNCS]


@pytest.fixture
def triton_launches(monkeypatch):
    """Counts the Triton kernel launches (the interpreter's ``run``, behind ``kernel[grid]``);
    the torch ops the interpreter itself runs to emulate a launch are not the launcher's, so
    no dispatch mode sees them."""
    from torch.utils._python_dispatch import _disable_current_modes
    from triton.runtime.interpreter import InterpretedFunction

    launched = []
    run = InterpretedFunction.run

    def counting(self, *args, **kwargs):
        launched.append(self.fn.__name__)
        with _disable_current_modes():
            return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting)
    return launched


@pytest.mark.skipif(not INTERPRET, reason="counts launches under the Triton interpreter")
@pytest.mark.parametrize("atomics", ["0", "1"])
def test_one_update_is_four_launches_and_no_sync(monkeypatch, triton_launches, atomics):
    """One Moments.update on the Triton path, as on a GPU (the counts are not host-readable):
    pass 1, its totals, the main pass, the epilogue; every other torch op allocates or views,
    and none reads a value on the host. With atomics, the totals kernel zeroes the
    accumulator (no memset)."""
    tb = _triton()
    monkeypatch.setenv("CRH_TRITON_ATOMICS", atomics)
    monkeypatch.setattr(moments_mod, "host_reads_free", lambda t: False)
    gen = torch.Generator().manual_seed(9)
    d = 70
    m = Moments(d, backend="triton")
    m.update(make_rows(gen, 90, d, mean_ratio=2.0))  # the first one also allocates the state
    x = make_rows(gen, 150, d, mean_ratio=2.0, dtype=torch.bfloat16, zero_rows=2)
    mask = torch.rand(150, generator=gen) > 0.1
    before = (m.n, m.mean.clone(), m.scatter.clone())
    triton_launches.clear()
    count = _Count({"crh_triton::update": tb._update_impl, "crh_triton::moments": tb._moments_impl})
    with count:
        m.update(x, mask)
    assert triton_launches == ["_row_stats_kernel", "_batch_totals_kernel",
                               "_scatter_upper_kernel", "_epilogue_kernel"]
    assert [f.name() for f in count.ops if f.namespace == "crh_triton"] == ["crh_triton::update"]
    assert count.launches() == [], [str(f) for f in count.launches()]
    assert count.syncs() == []
    # and it computed the update: the same as a merge of the two batches' references
    allx = torch.cat([make_rows(torch.Generator().manual_seed(9), 90, d, mean_ratio=2.0), x[mask].float()])
    n, k, mean, c = ref_moments(allx)
    assert k > 0
    with pytest.warns(RuntimeWarning, match=f"skipped {k} "):
        assert (m.n, m.n_skipped) == (n, k)
    assert n == before[0] + int(mask.sum()) - k
    assert rel_err(m.scatter, c) <= COV_TOL[torch.bfloat16] and rel_err(m.mean, mean) <= MEAN_TOL


# ------------------------------------------------------- the deferred skipped-row warning
def _gpu_like(monkeypatch):
    """The counts of every state behave as on a GPU: not read on the host by an update."""
    monkeypatch.setattr(moments_mod, "host_reads_free", lambda t: False)


def _rows_with_skips(seed, d=9, n=30, skipped=2):
    gen = torch.Generator().manual_seed(seed)
    return make_rows(gen, n, d, mean_ratio=1.0, zero_rows=skipped)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_warning_deferred_to_the_next_read(monkeypatch, backend):
    if backend == "triton" and not INTERPRET:
        pytest.skip("the Triton backend on CPU tensors needs the interpreter")
    _gpu_like(monkeypatch)
    m = Moments(9, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the updates must not warn, hence not read
        m.update(_rows_with_skips(1))
        m.update(_rows_with_skips(2, skipped=1))
    with pytest.warns(RuntimeWarning, match=r"skipped 3 zero-norm or non-finite row\(s\) in "
                                            r"updates since the last read"):
        assert m.n == 57
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per Moments
        m.update(_rows_with_skips(3))
        assert m.n_skipped == 5


def test_deferred_warning_as_error_changes_nothing_and_comes_again(monkeypatch):
    """A read that raises the deferred warning as an error leaves the state as it is (a read
    changes nothing) and keeps the warning pending: the next read gives it."""
    _gpu_like(monkeypatch)
    m = Moments(9, backend="torch")
    m.update(_rows_with_skips(4))
    state = m._state
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="skipped 2"):
            m.n
    assert m._state is state
    with pytest.warns(RuntimeWarning, match="skipped 2"):
        repr(m)
    # counted only what came after the first unchecked update: a reset forgets everything
    m.reset()
    m.update(_rows_with_skips(5, skipped=0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert m.n_skipped == 0


def test_strict_off_the_cpu_still_refuses_before_the_commit(monkeypatch):
    _gpu_like(monkeypatch)
    m = Moments(9, backend="torch", strict=True)
    m.update(_rows_with_skips(6, skipped=0))
    state = m._state
    with pytest.raises(ValueError, match="strict=True refuses"):
        m.update(_rows_with_skips(7))
    assert m._state is state and not m._unchecked
