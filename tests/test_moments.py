"""Moments on every backend available here, against the float64 reference of tests/_ref.py."""
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crh_kernels
from crh_kernels import Moments

from ._ref import (COV_TOL, MEAN_TOL, backends_under_test, make_rows, ref_cross, ref_moments, rel_err,
                   device_under_test)

BACKENDS = backends_under_test()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PRIMES = [1, 2, 3, 5, 7, 13, 37, 61, 97, 127, 131, 257]
# the interpreter is slow: fewer, smaller draws for it (shapes still cross several tiles)
EXAMPLES = {"triton": 8}
MAX_N = {"triton": 1500}


def check_against_ref(m: Moments, x, mask=None, normalize=True):
    n, n_skipped, mean, c = ref_moments(x, mask, normalize)
    assert m.n == n
    assert m.n_skipped == n_skipped
    if n == 0:
        return
    rms = np.sqrt(np.trace(c) / n + mean @ mean)  # root-mean-square row norm
    err_c = rel_err(m.scatter, c, 1e-7 * rms ** 2 * n)
    # relative to the mean, unless it nearly cancels (e.g. ±1 rows at D = 1): then fp32
    # summation error is relative to the rows' size, not to their tiny mean
    err_m = rel_err(m.mean, mean, 0.1 * rms)
    dtype = x.dtype
    assert err_c <= COV_TOL[dtype], f"scatter rel err {err_c:.2e} > {COV_TOL[dtype]:.0e} ({dtype})"
    assert err_m <= MEAN_TOL, f"mean rel err {err_m:.2e}"
    sc = m.scatter
    assert torch.equal(sc, sc.T), "scatter must be exactly symmetric"


@st.composite
def cases(draw, backend):
    n = draw(st.one_of(st.integers(1, MAX_N.get(backend, 3000)), st.sampled_from([1, 2, 31, 64, 257])))
    d = draw(st.one_of(st.integers(1, 300), st.sampled_from(PRIMES)))
    return dict(
        n=n, d=d,
        dtype=draw(st.sampled_from(DTYPES)),
        mean_ratio=draw(st.sampled_from([0.0, 1.0, 100.0])),
        normalize=draw(st.booleans()),
        zero_rows=draw(st.integers(0, min(3, n))),
        bad_rows=draw(st.integers(0, min(2, n))),
        layout=draw(st.sampled_from(["contiguous", "transposed", "strided", "3d"])),
        masked=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matrix_hypothesis(backend):
    @settings(max_examples=EXAMPLES.get(backend, 40), deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(case=cases(backend))
    def run(case):
        gen = torch.Generator().manual_seed(case["seed"])
        x = make_rows(gen, case["n"], case["d"], mean_ratio=case["mean_ratio"], dtype=case["dtype"],
                      zero_rows=case["zero_rows"], bad_rows=case["bad_rows"], layout=case["layout"],
                      device=device_under_test())
        mask = None
        if case["masked"]:
            mask = (torch.rand(x.shape[:-1], generator=gen) > 0.3).to(x.device)
        m = Moments(case["d"], normalize=case["normalize"], backend=backend)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            m.update(x, mask)
        check_against_ref(m, x, mask, case["normalize"])

    run()


# deliberately odd fixed shapes, with the hostile mean-dominated data, on every backend
FIXED = [(1, 1), (1, 37), (2, 1), (37, 37), (300, 1), (129, 130), (1000, 37), (333, 257)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,n_d", [(dt, nd) for dt in DTYPES for nd in FIXED])
def test_backend_fixed_hostile(backend, dtype, n_d):
    n, d = n_d
    gen = torch.Generator().manual_seed(1000 * n + d)
    x = make_rows(gen, n, d, mean_ratio=100.0, dtype=dtype, device=device_under_test())
    m = crh_kernels.moments(x, backend=backend)
    check_against_ref(m, x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wide_d1000(backend):
    gen = torch.Generator().manual_seed(7)
    n = 64 if backend == "triton" else 700
    x = make_rows(gen, n, 1000, mean_ratio=100.0, layout="transposed", device=device_under_test())
    check_against_ref(crh_kernels.moments(x, backend=backend), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_and_nonfinite_rows_skipped_and_warned_once(backend):
    gen = torch.Generator().manual_seed(3)
    x = make_rows(gen, 200, 19, zero_rows=5, bad_rows=4, device=device_under_test())
    m = Moments(19, backend=backend)
    # on the CPU the update warns; on a GPU the first host read of the counts does (no sync
    # in the update): either way inside this block
    with pytest.warns(RuntimeWarning, match="skipped 9 "):
        m.update(x)
        m.n_skipped
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        m.update(x)
    assert not [w for w in seen if "skipped" in str(w.message)], "warned twice"
    assert m.n == 2 * 191 and m.n_skipped == 18
    assert torch.isfinite(m.scatter).all() and torch.isfinite(m.mean).all()
    # without normalisation zero rows are data, non-finite ones still are not
    m2 = Moments(19, normalize=False, backend=backend)
    with pytest.warns(RuntimeWarning, match="skipped 4 "):
        m2.update(x)
        m2.n_skipped
    check_against_ref(m2, x, normalize=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_masked_or_bad(backend):
    x = torch.zeros(10, 5, device=device_under_test())
    m = Moments(5, backend=backend)
    with pytest.warns(RuntimeWarning):
        m.update(x)
        m.n_skipped
    assert (m.n, m.n_skipped) == (0, 10)
    m.update(torch.ones(4, 5, device=device_under_test()), mask=torch.zeros(4, dtype=torch.bool, device=device_under_test()))
    assert (m.n, m.n_skipped) == (0, 10)
    with pytest.raises(ValueError, match="no rows"):
        m.cov()


@pytest.mark.parametrize("backend", BACKENDS)
def test_strict_raises_and_keeps_state(backend):
    gen = torch.Generator().manual_seed(5)
    m = Moments(11, strict=True, backend=backend)
    m.update(make_rows(gen, 50, 11, device=device_under_test()))
    before = m.state_dict()
    with pytest.raises(ValueError, match="strict"):
        m.update(make_rows(gen, 50, 11, bad_rows=1, device=device_under_test()))
    after = m.state_dict()
    assert before["n"] == after["n"] and torch.equal(before["scatter_triu"], after["scatter_triu"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_any_split_same_state(backend, dtype):
    """One call, random chunks, one row at a time, merges in any order: the same state."""
    gen = torch.Generator().manual_seed(11)
    n, d = (90, 70) if backend == "triton" else (400, 70)
    x = make_rows(gen, n, d, mean_ratio=100.0, dtype=dtype, zero_rows=2, device=device_under_test())
    whole = Moments(d, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        whole.update(x)
        cuts = sorted(torch.randperm(n - 1, generator=gen)[:6].add(1).tolist())
        parts = [Moments(d, backend=backend).update(c) for c in torch.tensor_split(x, cuts)]
        chunked = Moments(d, backend=backend)
        for c in torch.tensor_split(x, cuts):
            chunked.update(c)
        rows = Moments(d, backend=backend)
        for i in range(min(n, 60)):
            rows.update(x[i])  # 1-D input: one row
        rows_rest = Moments(d, backend=backend).update(x[60:])
    merged_fwd = Moments(d)
    for p in parts:
        merged_fwd.merge(p)
    merged_rev = Moments(d)
    for p in reversed(parts):
        merged_rev.merge(p)
    # tree order
    tree = [Moments.from_state_dict(p.state_dict()) for p in parts]
    while len(tree) > 1:
        tree = [tree[i].merge(tree[i + 1]) if i + 1 < len(tree) else tree[i] for i in range(0, len(tree), 2)]
    rows.merge(rows_rest)
    ref_c = whole.scatter.double().cpu().numpy()
    tol = 1e-5 if dtype == torch.float32 else COV_TOL[dtype]
    for other in (chunked, merged_fwd, merged_rev, tree[0], rows):
        assert other.n == whole.n and other.n_skipped == whole.n_skipped
        assert rel_err(other.scatter, ref_c) <= tol
        assert rel_err(other.mean, whole.mean.double().cpu().numpy()) <= 1e-6
    check_against_ref(merged_rev, x)


def test_state_dict_round_trip_exact():
    gen = torch.Generator().manual_seed(2)
    m = Moments(23)
    m.update(make_rows(gen, 300, 23, mean_ratio=5.0))
    with pytest.warns(RuntimeWarning):
        m.update(make_rows(gen, 10, 23, bad_rows=1))
    sd = m.state_dict()
    assert sd["scatter_triu"].shape == (23 * 24 // 2,)
    r = Moments.from_state_dict(sd)
    assert (r.n, r.n_skipped, r.dim, r.normalize) == (m.n, m.n_skipped, m.dim, m.normalize)
    assert torch.equal(r.scatter, m.scatter) and torch.equal(r.mean, m.mean)
    # through torch.save as a user would checkpoint it
    import io
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    r2 = Moments.from_state_dict(torch.load(buf))
    assert torch.equal(r2.scatter, m.scatter)
    # and it keeps accumulating identically
    more = make_rows(gen, 40, 23)
    assert torch.equal(r2.update(more).scatter, m.update(more).scatter)


def _good_sd(dim=4, n=10):
    gen = torch.Generator().manual_seed(3)
    return Moments(dim).update(make_rows(gen, n, dim)).state_dict()


def _with(**changes):
    sd = _good_sd()
    for k, v in changes.items():
        if v is _DROP:
            del sd[k]
        elif callable(v):
            sd[k] = v(sd[k])
        else:
            sd[k] = v
    return sd


_DROP = object()
_NAN = float("nan")


@pytest.mark.parametrize("changes,exc,field", [
    (dict(n=-100), ValueError, "'n'"),
    (dict(n=1.7), ValueError, "'n'"),
    (dict(n=2.0), ValueError, "'n'"),
    (dict(n=True), ValueError, "'n'"),
    (dict(n="10"), ValueError, "'n'"),
    (dict(n_skipped=-1), ValueError, "'n_skipped'"),
    (dict(n_skipped=0.5), ValueError, "'n_skipped'"),
    (dict(normalize="False"), TypeError, "'normalize'"),
    (dict(normalize=1), TypeError, "'normalize'"),
    (dict(dim=0), ValueError, "'dim'"),
    (dict(dim=4.0), ValueError, "'dim'"),
    (dict(dim=True), ValueError, "'dim'"),
    (dict(dim=5), ValueError, "'mean'"),
    (dict(dtype="float16"), ValueError, "'dtype'"),
    (dict(dtype=torch.float64), ValueError, "'dtype'"),
    (dict(mean=[0.0] * 4), TypeError, "'mean'"),
    (dict(mean=lambda t: t.long()), TypeError, "'mean'"),
    (dict(mean=lambda t: t[:3]), ValueError, "'mean'"),
    (dict(mean=lambda t: t.clone().index_fill_(0, torch.tensor([1]), _NAN)), ValueError, "'mean'"),
    (dict(scatter_triu=lambda t: t[:-1]), ValueError, "'scatter_triu'"),
    (dict(scatter_triu=lambda t: t.reshape(2, 5)), ValueError, "'scatter_triu'"),
    (dict(scatter_triu=lambda t: t.clone().index_fill_(0, torch.tensor([4]), float("inf"))),
     ValueError, "'scatter_triu'"),
    (dict(scatter_triu=lambda t: t.half()), TypeError, "'scatter_triu'"),
    (dict(n=0), ValueError, "'mean'"),  # n = 0 with a nonzero mean: not a state
    (dict(scatter_triu=_DROP), KeyError, "scatter_triu"),
])
def test_from_state_dict_refuses_bad_fields(changes, exc, field):
    """Every field is checked (type, bool type, int >= 0, shape, dtype, finite) and a bad one
    is a one-line error naming it (TypeError for a wrong type; ValueError for a bad value,
    an int field given a float included, as ``Moments(dim=2.5)``)."""
    with pytest.raises(exc) as info:
        Moments.from_state_dict(_with(**changes))
    msg = str(info.value)
    assert field in msg and "\n" not in msg, msg


def test_from_state_dict_checks_shapes_before_allocating(monkeypatch):
    """A state dict claiming dim = 20000 with small tensors is refused before any (dim, dim)
    tensor exists (that would be 3.2 GB)."""
    big = []
    for name in ("zeros", "empty", "full", "ones"):
        real = getattr(torch, name)

        def spy(*size, _real=real, **kw):
            dims = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
            if all(isinstance(v, int) for v in dims) and int(np.prod(dims or [1])) >= 10**7:
                big.append(tuple(dims))
                raise MemoryError(f"test: a {tuple(dims)} tensor")
            return _real(*size, **kw)

        monkeypatch.setattr(torch, name, spy)
    sd = _with(dim=20000)
    with pytest.raises(ValueError, match="'mean' must have shape \\(20000,\\)"):
        Moments.from_state_dict(sd)
    assert not big, big


def test_from_state_dict_accepts_what_state_dict_writes():
    """numpy integers and bools (what a round trip through numpy may give) are accepted; a
    float32 state keeps its dtype; a state with no row (n = 0, zeros) loads."""
    sd = _with(n=np.int64(10), n_skipped=np.int32(0), normalize=np.bool_(True))
    m = Moments.from_state_dict(sd)
    assert (m.n, m.n_skipped, m.normalize) == (10, 0, True) and type(m.n) is int
    empty = Moments(3, dtype=torch.float32).state_dict()
    r = Moments.from_state_dict(empty)
    assert r.n == 0 and r.dtype == torch.float32 and not r.scatter.any()


def test_load_packed_and_replace_state_check_first():
    """The internal loads refuse bad tensors and counts, naming them, and change nothing."""
    m = Moments(4).update(torch.randn(10, 4))
    before = _state(m)
    sd = _good_sd()
    bad = [
        (lambda: m.load_packed(sd["mean"][:3], sd["scatter_triu"]), ValueError, "'mean'"),
        (lambda: m.load_packed(sd["mean"], sd["scatter_triu"].long()), TypeError, "'scatter_triu'"),
        (lambda: m.load_packed(sd["mean"] * _NAN, sd["scatter_triu"]), ValueError, "'mean'"),
        (lambda: m.replace_state(-1, 0, sd["mean"], sd["scatter_triu"]), ValueError, "'n'"),
        (lambda: m.replace_state(3, 1.5, sd["mean"], sd["scatter_triu"]), ValueError,
         "'n_skipped'"),
        (lambda: m.replace_state(3, 0), ValueError, "needs a mean"),
        (lambda: m.replace_state(0, 0, sd["mean"], sd["scatter_triu"]), ValueError, "n=0"),
    ]
    for call, exc, field in bad:
        with pytest.raises(exc, match=field):
            call()
        assert _same(before, _state(m))
    m.replace_state(10, 2, sd["mean"], sd["scatter_triu"])
    r = Moments.from_state_dict(sd)
    assert (m.n, m.n_skipped) == (10, 2)
    assert torch.equal(m.mean, r.mean) and torch.equal(m.scatter, r.scatter)
    m.replace_state(0, 5)
    assert (m.n, m.n_skipped) == (0, 5) and not m.scatter.any() and m.device is not None
    u = Moments(4)
    u.replace_state(0, 1)
    assert u.device is None and u.n_skipped == 1


def test_views_match_definitions():
    gen = torch.Generator().manual_seed(9)
    x = make_rows(gen, 500, 13, mean_ratio=3.0)
    m = crh_kernels.moments(x)
    n, _, mean, c = ref_moments(x)
    assert rel_err(m.cov(), c / n) < 1e-5
    second = c / n + np.outer(mean, mean)
    assert rel_err(m.second_moment(), second) < 1e-5
    assert abs(m.mean_ratio() - (mean @ mean) / np.trace(second)) < 1e-6
    # normalized rows: trace of the second moment is exactly 1
    assert abs(np.trace(m.second_moment().numpy()) - 1) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_moments(backend, dtype):
    gen = torch.Generator().manual_seed(4)
    n = 150 if backend == "triton" else 900
    g = make_rows(gen, n, 45, mean_ratio=10.0, dtype=dtype, zero_rows=2, device=device_under_test())
    h = make_rows(gen, n, 71, mean_ratio=100.0, dtype=dtype, bad_rows=2, layout="transposed", device=device_under_test())
    mask = (torch.rand(n, generator=gen) > 0.2).to(g.device)
    out = crh_kernels.cross_moments(g, h, mask=mask, backend=backend)
    n_ref, mg, mh, c = ref_cross(g, h, mask)
    assert out.n == n_ref
    assert rel_err(out.mean_g, mg) <= MEAN_TOL and rel_err(out.mean_h, mh) <= MEAN_TOL
    assert out.C_gh.shape == (45, 71)
    assert rel_err(out.C_gh, c) <= COV_TOL[dtype]


# ---------------------------------------------------------------------------- bad input
def _state(m):
    sd = m.state_dict()
    return sd["n"], sd["n_skipped"], sd["mean"].clone(), sd["scatter_triu"].clone()


def _same(a, b):
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


@pytest.mark.parametrize("bad,match", [
    (lambda: torch.randn(10, 8), "last dimension 7"),
    (lambda: torch.randint(0, 5, (10, 7)), "float32, bfloat16 or float16"),
    (lambda: torch.randn(10, 7, device="meta"), "lives on cpu"),
    (lambda: torch.tensor(3.0), "shape \\(..., dim\\)"),
    (lambda: [[1.0] * 7], "torch.Tensor"),
])
def test_bad_input_raises_and_keeps_state(bad, match):
    m = Moments(7, device="cpu")
    m.update(torch.randn(20, 7))
    before = _state(m)
    with pytest.raises((TypeError, ValueError), match=match):
        m.update(bad())
    assert _same(before, _state(m))


@pytest.mark.parametrize("mask,match", [
    (torch.ones(9, dtype=torch.bool), "mask must have shape \\(10,\\)"),
    (torch.ones(10), "mask must be a bool tensor"),
    (torch.ones(2, 5, dtype=torch.bool), "mask must have shape"),
])
def test_bad_mask_raises_and_keeps_state(mask, match):
    m = Moments(7)
    m.update(torch.randn(20, 7))
    before = _state(m)
    with pytest.raises((TypeError, ValueError), match=match):
        m.update(torch.randn(10, 7), mask)
    assert _same(before, _state(m))


@pytest.mark.parametrize("dim", [0, -3, 2.5, True, "4"])
def test_bad_dim(dim):
    with pytest.raises(ValueError, match="dim must be a positive int"):
        Moments(dim)


def test_bad_backend_and_merge():
    with pytest.raises(ValueError, match="backend must be one of"):
        Moments(4, backend="nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        crh_kernels.moments(torch.randn(3, 4), backend="nope")
    a = Moments(4).update(torch.randn(5, 4))
    before = _state(a)
    with pytest.raises(ValueError, match="dim 5"):
        a.merge(Moments(5).update(torch.randn(5, 5)))
    with pytest.raises(ValueError, match="normalize"):
        a.merge(Moments(4, normalize=False).update(torch.randn(5, 4)))
    with pytest.raises(TypeError):
        a.merge(torch.randn(4))
    assert _same(before, _state(a))


def test_unavailable_backend_says_why(monkeypatch):
    avail = crh_kernels.available_backends()
    for name, (ok, why) in avail.items():
        assert isinstance(why, str) and why, f"backend {name} gives no reason"
    missing = [k for k, (ok, _) in avail.items() if not ok]
    for name in missing:
        with pytest.raises(RuntimeError, match=f"backend '{name}' is unavailable"):
            crh_kernels.moments(torch.randn(3, 4), backend=name)
    monkeypatch.setenv("CRH_BACKEND", "torch")
    assert crh_kernels.moments(torch.randn(30, 4)).n == 30


def test_empty_input_is_a_no_op():
    m = Moments(6)
    m.update(torch.randn(0, 6))
    m.update(torch.randn(3, 0, 6))
    assert m.n == 0 and m.device is None
    r = crh_kernels.cross_moments(torch.randn(0, 3), torch.randn(0, 5))
    assert r.n == 0 and r.C_gh.shape == (3, 5) and not r.C_gh.any()


def device_under_test_adopted_from_first_update():
    m = Moments(3)
    assert m.device is None
    m.update(torch.randn(4, 3))
    assert m.device == torch.device("cpu")
