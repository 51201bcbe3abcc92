"""All-or-nothing state changes, by fault injection, and Moments under concurrent threads.

The harness :func:`inject` runs one state-changing call (update, update_staged, merge, reset,
load_packed, replace_state) many times, each time from a fresh copy of the same old state, and
raises an exception at the k-th traced line (k = 1, 2, ... until the call finishes without
one) of any frame whose file is in crh_kernels/. After every injected exception the state
(n, n_skipped, device, mean, scatter, bitwise) must be the old one or the new one (the same
call uninterrupted): never a mixture. Kernels in C++ are one step for the tracer, as they are
for a KeyboardInterrupt (Python delivers signals between bytecodes).

The tracer is harsher than a signal in one place: it can raise at the line event of a ``with``
statement's exit, before ``__exit__`` runs, where a signal cannot strike a C-level context
manager (a lock is released inside the C call). A Moments' lock may stay held then, so every
run starts from a fresh copy; module-level locks are kept off the paths under test, and the
code under test never switches autograd off (checked after every run).
"""
from __future__ import annotations

import copy
import importlib
import os
import sys
import threading
import warnings

import numpy as np
import pytest
import torch

import crh_kernels
from crh_kernels import Moments
from crh_kernels import moments as moments_mod

from ._ref import COV_TOL, MEAN_TOL, backends_under_test, make_rows, ref_moments, rel_err

PKG = os.path.dirname(os.path.abspath(crh_kernels.__file__)) + os.sep
BACKENDS = backends_under_test()
EXCEPTIONS = [RuntimeError, KeyboardInterrupt]


def _need(backend):
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend!r} unavailable here")


class _Injected(Exception):
    """Marker mixed into the injected exception types, so that the harness tells them apart."""


_KINDS = {RuntimeError: type("InjectedRuntimeError", (RuntimeError, _Injected), {}),
          KeyboardInterrupt: type("InjectedKeyboardInterrupt", (KeyboardInterrupt,), {})}


def snapshot(m: Moments):
    """Everything a caller can observe of the state, copied bitwise."""
    return (m.n, m.n_skipped, m.device, m.mean.detach().clone(), m.scatter.detach().clone())


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN equals NaN of the same bits)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def same(a, b) -> bool:
    return (a[0] == b[0] and a[1] == b[1] and a[2] == b[2] and bitwise_equal(a[3], b[3])
            and bitwise_equal(a[4], b[4]))


def _caused_by(e: BaseException, kind) -> bool:
    """Whether ``e`` is the injected exception or wraps it (the Triton interpreter re-raises
    what a kernel raises as its own InterpreterError)."""
    while e is not None:
        if isinstance(e, kind):
            return True
        e = e.__cause__ or e.__context__
    return False


def inject(make, call, exc, roots=(PKG,), quiet=True, max_k=100000):
    """Fault injection over one call. ``make()`` gives a fresh Moments in the old state,
    ``call(m)`` changes it. Returns ``(k, torn)``: how many lines were injected and where an
    injection left a state that is neither the old nor the new one."""
    kind = _KINDS[exc]
    old = snapshot(make())
    m = make()
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        call(m)
    new = snapshot(m)
    assert not same(old, new), "the call under test changes nothing: a useless case"
    torn = []
    k = 0
    while k < max_k:
        k += 1
        m = make()
        count = [0]
        where = []

        def local(frame, event, arg):
            if event == "line":
                count[0] += 1
                if count[0] == k:
                    where.append(f"{os.path.relpath(frame.f_code.co_filename, PKG)}:"
                                 f"{frame.f_lineno} ({frame.f_code.co_name})")
                    raise kind(where[0])
            return local

        def top(frame, event, arg):
            if frame.f_code.co_filename.startswith(roots):
                return local
            return None

        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            sys.settrace(top)
            try:
                call(m)
            except BaseException as e:  # noqa: B902 - only the injected one may come out
                if not _caused_by(e, kind):
                    raise
            finally:
                sys.settrace(None)
        grad_mode = torch.is_grad_enabled()
        torch.set_grad_enabled(True)
        # a `with torch.no_grad()` cut at its exit line would leave autograd off for everyone
        assert grad_mode, f"autograd left disabled after an exception at {where}"
        got = snapshot(m)
        if not where:  # ran to the end without an injection: must be the new state
            assert same(got, new), "the call run under the tracer gave another state"
            return k - 1, torn
        if not (same(got, old) or same(got, new)):
            torn.append(where[0])
    raise AssertionError(f"more than {max_k} traced lines")


def check_atomic(make, call, exc, min_lines=3):
    k, torn = inject(make, call, exc)
    assert k >= min_lines, f"only {k} traced lines: is the tracer on?"
    assert not torn, f"torn state after an exception at: {torn}"
    return k


# ------------------------------------------------------------------------- states and calls
def _template(backend, d=9, n=40, seed=0, dtype=torch.float64, strict=False):
    gen = torch.Generator().manual_seed(seed)
    m = Moments(d, backend=backend, dtype=dtype, strict=strict)
    m.update(make_rows(gen, n, d, mean_ratio=2.0))
    return m


def _batch(seed, d=9, n=30, nan=False, masked=False):
    gen = torch.Generator().manual_seed(100 + seed)
    x = make_rows(gen, n, d, mean_ratio=1.0)
    if nan:
        x[3, 1] = float("nan")
        x[5] = 0.0
    mask = (torch.rand(n, generator=gen) > 0.25) if masked else None
    if mask is not None:
        mask[3] = mask[5] = True
    return x, mask


def _maker(template):
    return lambda: copy.deepcopy(template)


_CASES = ["plain", "masked", "nan", "masked_nan", "first", "first_nan", "f32_nan"]
# the interpreter is slow: Triton gets the two cases that run every branch of update
_UPDATE_CASES = [(b, c) for b in ("cpp", "torch") for c in _CASES] + [
    ("triton", "masked_nan"), ("triton", "first_nan")]


@pytest.mark.parametrize("exc", EXCEPTIONS, ids=["RuntimeError", "KeyboardInterrupt"])
@pytest.mark.parametrize("backend,case", _UPDATE_CASES)
def test_update_is_all_or_nothing(backend, case, exc):
    _need(backend)
    d = 9 if backend != "triton" else 5
    if case.startswith("first"):
        template = Moments(d, backend=backend)
    else:
        template = _template(backend, d=d, dtype=torch.float32 if case == "f32_nan" else torch.float64)
    x, mask = _batch(1, d=d, n=30 if backend != "triton" else 12, nan="nan" in case,
                     masked="masked" in case)
    check_atomic(_maker(template), lambda m: m.update(x, mask), exc)


@pytest.mark.parametrize("exc", EXCEPTIONS, ids=["RuntimeError", "KeyboardInterrupt"])
@pytest.mark.parametrize("backend,case", [("torch", "masked_nan"), ("torch", "first_nan")])
def test_update_without_host_reads_is_all_or_nothing(monkeypatch, backend, case, exc):
    """As on a GPU: the update reads no count on the host (the skipped rows are recorded as
    unchecked, the warning deferred to the next read) and is still all or nothing. (That
    branch is the same for every backend; the Triton commit itself is covered above.)"""
    _need(backend)
    monkeypatch.setattr(importlib.import_module("crh_kernels.moments"), "host_reads_free",
                        lambda t: False)
    d = 9 if backend != "triton" else 5
    template = Moments(d, backend=backend) if case.startswith("first") else _template(backend, d=d)
    x, mask = _batch(1, d=d, n=30 if backend != "triton" else 12, nan=True, masked="masked" in case)
    check_atomic(_maker(template), lambda m: m.update(x, mask), exc)


@pytest.mark.parametrize("exc", EXCEPTIONS, ids=["RuntimeError", "KeyboardInterrupt"])
@pytest.mark.parametrize("case", ["plain", "nan", "first_nan"])
def test_update_staged_is_all_or_nothing(case, exc):
    _need("cpp")
    d = 9
    template = Moments(d, backend="cpp") if case == "first_nan" else _template("cpp", d=d)
    x, mask = _batch(2, d=d, n=30, nan="nan" in case, masked=True)
    backend = crh_kernels.backends.get("cpp")
    buf = torch.empty_like(x)
    scale = torch.empty(x.shape[0], dtype=torch.float32)
    status = torch.empty(x.shape[0], dtype=torch.uint8)
    sum_ = torch.zeros(d, dtype=torch.float64)
    backend.stage_rows(x, mask, True, buf, scale, status, sum_)
    keep = (buf.clone(), scale.clone(), status.clone(), sum_.clone())
    check_atomic(_maker(template), lambda m: m.update_staged(buf, scale, status, sum_), exc)
    # the staged rows are read, never changed
    for a, b in zip(keep, (buf, scale, status, sum_)):
        assert bitwise_equal(a, b)


@pytest.mark.parametrize("exc", EXCEPTIONS, ids=["RuntimeError", "KeyboardInterrupt"])
def test_row_stager_flush_is_all_or_nothing(exc):
    _need("cpp")
    from crh_kernels.collect.staging import RowStager

    template = _template("cpp")
    x, mask = _batch(3, nan=True, masked=True)

    def call(m):
        st = RowStager(64)
        st.feed(m, x, mask)
        st.flush()

    check_atomic(_maker(template), call, exc)


@pytest.mark.parametrize("exc", EXCEPTIONS, ids=["RuntimeError", "KeyboardInterrupt"])
@pytest.mark.parametrize("case", ["both", "into_empty", "skipped_only"])
def test_merge_is_all_or_nothing(case, exc):
    other = _template("torch", seed=5, n=25)
    if case == "skipped_only":
        other = Moments(9, backend="torch")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            other.update(torch.zeros(3, 9))
    template = Moments(9, backend="torch") if case == "into_empty" else _template("torch")
    check_atomic(_maker(template), lambda m: m.merge(other), exc)


@pytest.mark.parametrize("exc", EXCEPTIONS, ids=["RuntimeError", "KeyboardInterrupt"])
@pytest.mark.parametrize("call", ["reset", "load_packed", "replace_state"])
def test_reset_and_loads_are_all_or_nothing(call, exc):
    template = _template("torch")
    src = _template("torch", seed=7, n=33)
    sd = src.state_dict()
    calls = {
        "reset": lambda m: m.reset(),
        "load_packed": lambda m: m.load_packed(sd["mean"], sd["scatter_triu"]),
        "replace_state": lambda m: m.replace_state(src.n, 4, sd["mean"], sd["scatter_triu"]),
    }
    check_atomic(_maker(template), calls[call], exc)


def test_from_state_dict_under_injection_returns_a_whole_state_or_nothing():
    """from_state_dict builds a new Moments: an exception anywhere gives no object at all, and
    the state dict it reads is never changed."""
    src = _template("torch", seed=8)
    sd = src.state_dict()
    keep = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}
    for exc in EXCEPTIONS:
        kind = _KINDS[exc]
        k = 0
        while True:
            k += 1
            count = [0]
            fired = []

            def local(frame, event, arg):
                if event == "line":
                    count[0] += 1
                    if count[0] == k:
                        fired.append(1)
                        raise kind("injected")
                return local

            out = None
            sys.settrace(lambda f, e, a: local if f.f_code.co_filename.startswith(PKG) else None)
            try:
                out = Moments.from_state_dict(sd)
            except BaseException as e:  # noqa: B902
                if not isinstance(e, kind):
                    raise
            finally:
                sys.settrace(None)
            for key, v in keep.items():
                assert (torch.equal(v, sd[key]) if isinstance(v, torch.Tensor) else v == sd[key])
            if not fired:
                assert same(snapshot(out), snapshot(src))
                break
            assert out is None
        assert k > 5


# ------------------------------------------------------------------ warnings and strictness
@pytest.mark.parametrize("backend,staged", [(b, False) for b in BACKENDS]
                         + [("cpp", True)] * ("cpp" in BACKENDS))
def test_warning_as_error_leaves_state_unchanged(backend, staged):
    """staged: rows staged with pass 1 (the cpp backend's row staging), then flushed."""
    m = _template(backend)
    before = snapshot(m)
    x, mask = _batch(4, nan=True, masked=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # the Triton interpreter's numpy warns on the NaN row's products: not ours
        warnings.filterwarnings("ignore", module=r"triton\.")
        with pytest.raises(RuntimeWarning, match="skipped 2 zero-norm or non-finite row"):
            if staged:
                be = crh_kernels.backends.get("cpp")
                buf, scale = torch.empty_like(x), torch.empty(30, dtype=torch.float32)
                status, sum_ = torch.empty(30, dtype=torch.uint8), torch.zeros(9, dtype=torch.float64)
                be.stage_rows(x, mask, True, buf, scale, status, sum_)
                m.update_staged(buf, scale, status, sum_)
            else:
                m.update(x, mask)
    assert same(snapshot(m), before)
    # the warning was not shown, so it comes (once) with the next such batch; the rows count
    with pytest.warns(RuntimeWarning, match="skipped 2"):
        m.update(x, mask)
    n, k, mean, _ = ref_moments(x, mask)
    assert m.n == before[0] + n and m.n_skipped == before[1] + k == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_strict_refusal_leaves_state_unchanged(backend):
    m = _template(backend, strict=True)
    before = snapshot(m)
    x, mask = _batch(5, nan=True, masked=True)
    with pytest.raises(ValueError, match="strict=True refuses"):
        m.update(x, mask)
    assert same(snapshot(m), before)


# -------------------------------------------------------------------- the harness can fail
def _non_atomic_update(self, x, mask=None):
    """The order this test must catch: the batch merged into the scatter in place, then the
    skipped rows' warning, then the mean and the count."""
    x2 = x.reshape(-1, self.dim).double()
    valid = torch.isfinite(x2).all(dim=1) & (x2.abs().sum(dim=1) > 0)
    if mask is not None:
        valid &= mask.reshape(-1)
    y = x2[valid] / x2[valid].norm(dim=1, keepdim=True)
    n2 = y.shape[0]
    mean2 = y.mean(dim=0)
    c2 = (y - mean2).T @ (y - mean2)
    n1 = self.n
    delta = mean2 - self.mean
    self.scatter.add_(c2)
    self.scatter.add_(torch.outer(delta, delta), alpha=n1 * n2 / (n1 + n2))
    skipped = int((~valid).sum()) if mask is None else int((mask.reshape(-1) & ~valid).sum())
    if skipped:
        warnings.warn(f"skipped {skipped} row(s)", RuntimeWarning)
    self.mean.add_(delta, alpha=n2 / (n1 + n2))
    iu = torch.triu_indices(self.dim, self.dim)
    self.replace_state(n1 + n2, self.n_skipped + skipped, self.mean, self.scatter[iu[0], iu[1]])
    return self


@pytest.mark.parametrize("exc", EXCEPTIONS, ids=["RuntimeError", "KeyboardInterrupt"])
def test_harness_catches_a_non_atomic_update(monkeypatch, exc):
    """Mutation check: the same harness reports a deliberately non-atomic update."""
    monkeypatch.setattr(Moments, "update", _non_atomic_update)
    template = _template("torch")
    x, mask = _batch(6, nan=True, masked=True)
    k, torn = inject(_maker(template), lambda m: m.update(x, mask), exc,
                     roots=(PKG, os.path.abspath(__file__)))
    assert torn, "the harness did not notice a torn state"
    # and with warnings as errors, no tracer needed
    m = copy.deepcopy(template)
    before = snapshot(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning):
            m.update(x, mask)
    assert not same(snapshot(m), before)


# --------------------------------------------------------------------------------- threads
@pytest.fixture
def busy_switching():
    """Threads switch as often as the interpreter allows: a race shows up in every run."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def _in_threads(work, args_per_thread):
    start = threading.Barrier(len(args_per_thread))
    errors = []

    def run(*args):
        try:
            start.wait()
            work(*args)
        except BaseException as e:  # noqa: B902
            errors.append(e)

    ts = [threading.Thread(target=run, args=a) for a in args_per_thread]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("backend", [b for b in ("cpp", "torch") if b in BACKENDS])
def test_concurrent_updates_equal_one_pass(backend, busy_switching):
    """2 and 4 threads updating one Moments at once (two rounds each): the state equals the
    float64 reference of all their rows (each update is one step under the Moments' lock)."""
    d, per, batches = 256, 1024, 3  # kernels long enough to overlap (without the lock)
    for threads in (2, 4):
        for rnd in range(2):
            gen = torch.Generator().manual_seed(11 + 10 * threads + rnd)
            xs = [[make_rows(gen, per, d, mean_ratio=1.5 + t) for _ in range(batches)]
                  for t in range(threads)]
            m = Moments(d, backend=backend, device="cpu")
            _in_threads(lambda rows: [m.update(x) for x in rows], [(r,) for r in xs])
            n, _, mean, c = ref_moments(torch.cat([x for rows in xs for x in rows]))
            assert m.n == n == threads * per * batches
            err = rel_err(m.scatter, c)
            assert err <= COV_TOL[torch.float32], (threads, rnd, err)
            assert rel_err(m.mean, mean) <= MEAN_TOL, (threads, rnd)


def test_concurrent_merges_staging_and_reads_are_consistent(busy_switching):
    """Merges into one Moments from two threads, a third thread flushing staged rows into
    it, while a fourth reads second_moment(): every read sees a whole state (the trace of n
    unit rows' second moment is 1), and the end state is the reference of all rows."""
    from crh_kernels.collect.staging import RowStager

    d = 16
    gen = torch.Generator().manual_seed(12)
    parts = [make_rows(gen, 20, d, mean_ratio=1.0, dtype=torch.float64) for _ in range(300)]
    staged = [make_rows(gen, 30, d, mean_ratio=2.0) for _ in range(60)]
    states = [Moments(d, backend="torch").update(p) for p in parts]
    target = Moments(d, device="cpu")
    stop = threading.Event()
    bad = []

    def reader():
        while not stop.is_set():
            if target.n == 0:
                continue
            tr = float(torch.trace(target.second_moment()))
            if abs(tr - 1) > 1e-5:
                bad.append(tr)

    def merger(items):
        for s in items:
            target.merge(s)

    def stager(rows):
        st = RowStager(64)
        for x in rows:
            st.feed(target, x, None)
        st.flush()

    r = threading.Thread(target=reader)
    r.start()
    try:
        _in_threads(lambda kind, arg: merger(arg) if kind == "merge" else stager(arg),
                    [("merge", states[0::2]), ("merge", states[1::2]), ("stage", staged)])
    finally:
        stop.set()
        r.join()
    assert not bad, bad[:3]
    allx = torch.cat([p.float() for p in parts] + staged)
    n, _, mean, c = ref_moments(allx)
    assert target.n == n and rel_err(target.scatter, c) < 1e-5 and rel_err(target.mean, mean) < 1e-6
