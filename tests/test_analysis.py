"""Tests of crh_kernels.analysis (docs/spec.md §3 alignments, §4 spectra/exponents/phases).

References are written here with numpy (np.corrcoef, np.linalg.svd/eigh, np.polyfit), sharing
no code with the package. Random inputs are fresh per run: seeds are drawn by hypothesis.
The phase tests build the matrices docs/spec.md §4 prescribes for every row of its table, so they check
the table itself (the relations of a row hold, α = 1, and the others do not) as well as the code.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crh_kernels import Moments
from crh_kernels.analysis import (FORWARD_SLOPE, LINES, PHASES, RELATIONS, alignment,
                                  classify_phase, commutation_error, effective_rank, eigh,
                                  fit_exponents, is_flat, line_distances, pairing_fit,
                                  phase_point, random_baseline, six_alignments)
from crh_kernels.analysis import spectra as spectra_mod

SEEDS = st.integers(0, 2**32 - 1)
FAST = settings(max_examples=10, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
# The per-phase tests run once per row of the table: fewer draws each keeps the file fast.
PER_PHASE = settings(FAST, max_examples=5)
F64 = torch.float64
POINT_PHASES = [ph for ph, v in PHASES.items() if v.point is not None]
FLAT_PHASES = ["1", "2", "3", "CRH"]


# ----------------------------------------------------------------------------- references
def np_alpha(a, b) -> float:
    return float(np.corrcoef(np.asarray(a).ravel(), np.asarray(b).ravel())[0, 1])


def gen(seed):
    return torch.Generator().manual_seed(int(seed))


def rand_orth(d, g):
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def rand_psd(d, g, rank=None):
    b = torch.randn(d, rank or d, generator=g, dtype=F64)
    return b @ b.T


def small_rotation(d, g, angle):
    k = torch.randn(d, d, generator=g, dtype=F64)
    k = (k - k.T) / 2
    return torch.linalg.matrix_exp(angle * k / torch.linalg.matrix_norm(k, 2))


class Stub:
    """A stand-in for crh_kernels.Moments with a fixed matrix."""

    def __init__(self, mat, n=1):
        self.mat, self.n = mat, n

    def cov(self):
        return self.mat

    def second_moment(self):
        return self.mat + 1.0  # a different matrix, to see that kind= selects it


class Layer:
    def __init__(self, W, H_a, G_a, H_b, G_b):
        self.W = W
        self.H_a, self.G_a, self.H_b, self.G_b = (None if m is None else Stub(m)
                                                  for m in (H_a, G_a, H_b, G_b))

    def Z_a(self):
        return None if self.W is None else self.W.T @ self.W

    def Z_b(self):
        return None if self.W is None else self.W @ self.W.T


def build_point_phase(p, q, d_out, d_in, seed, noise=0.0, angle=0.0):
    """docs/spec.md §4's construction: W = U S Vᵀ with distinct singular values over one decade (z over
    two), H_a = V z^p Vᵀ, G_a = V z^q Vᵀ, H_b = W H_a Wᵀ, G_b = U z^(q−1) Uᵀ. ``noise``:
    log-normal jitter of each spectrum; ``angle``: small random rotation of each basis."""
    g = gen(seed)
    r = min(d_out, d_in)
    U = rand_orth(d_out, g)[:, :r]
    V = rand_orth(d_in, g)[:, :r]
    s = torch.logspace(0, -1, r, dtype=F64) * float(torch.empty(1).uniform_(0.5, 2, generator=g))
    W = U @ torch.diag(s) @ V.T
    z = s * s

    def jit():
        return torch.exp(noise * torch.randn(r, generator=g, dtype=F64))

    def rot(B):
        return small_rotation(B.shape[0], g, angle) @ B if angle else B

    Va, Vg, Ug = rot(V), rot(V), rot(U)
    H_a = Va @ torch.diag(z**p * jit()) @ Va.T
    G_a = Vg @ torch.diag(z**q * jit()) @ Vg.T
    H_b = W @ H_a @ W.T
    G_b = Ug @ torch.diag(z ** (q - 1) * jit()) @ Ug.T
    return W, H_a, G_a, H_b, G_b


def build_flat_phase(phase, d, k, seed, jitter=0.0):
    """Z ∝ a rank-k projection (W = c·U_k V_kᵀ, singular values jittered by ``jitter``):
    phase 1: H_a = G_a = V_k M V_kᵀ (M generic), G_b = U_k M U_kᵀ / c²;
    phase 2: H_a = V_k V_kᵀ, G_b generic, G_a = Wᵀ G_b W;
    phase 3: G_b = U_k U_kᵀ, G_a = Wᵀ G_b W, H_a generic;  CRH: H_a = V_k V_kᵀ, G_b = U_k U_kᵀ.
    Always H_b = W H_a Wᵀ. "Generic" = random rank-2 PSD, far from a projection."""
    g = gen(seed)
    U, V = rand_orth(d, g)[:, :k], rand_orth(d, g)[:, :k]
    c = float(torch.empty(1).uniform_(0.5, 2, generator=g))
    s = c * (1 + jitter * torch.rand(k, generator=g, dtype=F64))
    W = U @ torch.diag(s) @ V.T
    if phase == "1":
        M = rand_psd(k, g, 2)
        H_a = V @ M @ V.T
        G_a = H_a.clone()
        G_b = U @ M @ U.T / c**2
    elif phase == "2":
        H_a = V @ V.T
        G_b = rand_psd(d, g, 2)
        G_a = W.T @ G_b @ W
    elif phase == "3":
        G_b = U @ U.T
        G_a = W.T @ G_b @ W
        H_a = rand_psd(d, g, 2)
    else:
        H_a = V @ V.T
        G_b = U @ U.T
        G_a = W.T @ G_b @ W
    return W, H_a, G_a, W @ H_a @ W.T, G_b


def np_fit(W, H, G):
    """Reference exponents: numpy SVD, quadratic forms, np.polyfit over all modes."""
    _, s, vh = np.linalg.svd(W.numpy(), full_matrices=False)
    z = s**2
    h = np.einsum("ri,ij,rj->r", vh, H.numpy(), vh)
    gg = np.einsum("ri,ij,rj->r", vh, G.numpy(), vh)
    keep = (z > 1e-6 * z.max()) & (h > 1e-6 * h.max()) & (gg > 1e-6 * gg.max())
    return (np.polyfit(np.log(z[keep]), np.log(h[keep]), 1)[0],
            np.polyfit(np.log(z[keep]), np.log(gg[keep]), 1)[0])


# ======================================================================= α (docs/spec.md §3, eq. 11)
@FAST
@given(seed=SEEDS, d=st.integers(2, 12))
def test_alignment_matches_corrcoef_and_is_symmetric(seed, d):
    g = gen(seed)
    A, B = rand_psd(d, g), torch.randn(d, d, generator=g, dtype=F64)
    a = alignment(A, B)
    assert isinstance(a, float)
    assert a == pytest.approx(np_alpha(A, B), abs=1e-12)
    assert a == pytest.approx(alignment(B, A), abs=1e-15)
    # float32 inputs are promoted: same α as their float64 values
    assert alignment(A.float(), B.float()) == pytest.approx(np_alpha(A.float().double(),
                                                                     B.float().double()), abs=1e-12)
    # numpy arrays are accepted too
    assert alignment(A.numpy(), B.numpy()) == pytest.approx(a, abs=1e-15)


@FAST
@given(seed=SEEDS, d=st.integers(2, 12), c=st.floats(1e-3, 1e3))
def test_alignment_scale_invariance(seed, d, c):
    g = gen(seed)
    A, B = rand_psd(d, g), rand_psd(d, g)
    a = alignment(A, B)
    assert alignment(c * A, B) == pytest.approx(a, abs=1e-12)
    assert alignment(A, c * B) == pytest.approx(a, abs=1e-12)
    assert alignment(-c * A, B) == pytest.approx(-a, abs=1e-12)


@FAST
@given(seed=SEEDS, d=st.integers(3, 12), c=st.floats(1e-3, 1e3))
def test_alignment_is_one_iff_proportional(seed, d, c):
    g = gen(seed)
    A = rand_psd(d, g)
    assert alignment(A, c * A) == pytest.approx(1.0, abs=1e-12)
    assert alignment(A, -c * A) == pytest.approx(-1.0, abs=1e-12)
    # any non-proportional change moves α away from 1
    E = torch.zeros(d, d, dtype=F64)
    E[0, 1] = E[1, 0] = 0.1 * float(A.abs().max())
    assert alignment(A, A + E) < 1 - 1e-6
    # Pearson is also blind to adding a constant (the spec's "α = ±1 iff A = cB" holds up to a shift)
    assert alignment(A, c * A + 5.0) == pytest.approx(1.0, abs=1e-12)


@FAST
@given(seed=SEEDS)
def test_alignment_near_zero_for_independent_matrices(seed):
    g = gen(seed)
    d = 64
    A = torch.randn(d, d, generator=g, dtype=F64)
    B = torch.randn(d, d, generator=g, dtype=F64)
    # d² = 4096 independent pairs: std(α) ≈ 1/64; 0.1 is > 6σ
    assert abs(alignment(A, B)) < 0.1
    # symmetric: d(d+1)/2 independent pairs, std ≈ 0.022; 0.15 is > 6σ
    assert abs(alignment(A + A.T, B + B.T)) < 0.15


def test_alignment_constant_matrix_is_nan_with_warning():
    A = torch.full((4, 4), 0.1, dtype=F64)
    B = torch.randn(4, 4, dtype=F64)
    with pytest.warns(RuntimeWarning, match=r"A is constant.*undefined"):
        assert math.isnan(alignment(A, B))
    with pytest.warns(RuntimeWarning, match=r"B is constant.*undefined"):
        assert math.isnan(alignment(B, A))
    with pytest.warns(RuntimeWarning, match=r"A and B are constant"):
        assert math.isnan(alignment(A, torch.zeros(4, 4)))


def test_alignment_errors():
    with pytest.raises(ValueError, match=r"same shape.*\(3, 3\).*\(4, 4\)"):
        alignment(torch.eye(3), torch.eye(4))
    bad = torch.eye(3, dtype=F64)
    bad[0, 1] = float("nan")
    with pytest.raises(ValueError, match=r"A has 1 non-finite"):
        alignment(bad, torch.eye(3))
    bad[0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"B has 1 non-finite"):
        alignment(torch.eye(3), bad)
    with pytest.raises(ValueError, match="non-empty"):
        alignment(torch.zeros(0, 0), torch.zeros(0, 0))
    with pytest.raises(TypeError):
        alignment(torch.eye(2, dtype=torch.complex128), torch.eye(2))


# ------------------------------------------------------------------------ six alignments
def test_six_alignments_with_real_moments(device):
    torch.manual_seed(0)
    d_in, d_out, n = 6, 5, 400
    W = torch.randn(d_out, d_in, dtype=F64, device=device)
    streams = {name: Moments(d).update(torch.randn(n, d, device=device))
               for name, d in (("H_a", d_in), ("G_a", d_in), ("H_b", d_out), ("G_b", d_out))}

    class L:
        H_a, G_a, H_b, G_b = (streams[k] for k in ("H_a", "G_a", "H_b", "G_b"))

        def Z_a(self):
            return W.T @ W

        def Z_b(self):
            return W @ W.T

    for kind in ("cov", "second_moment"):
        out = six_alignments(L(), kind=kind)
        assert list(out) == ["forward_RGA", "forward_RWA", "forward_GWA",
                             "backward_RGA", "backward_RWA", "backward_GWA"]
        m = {k: getattr(v, kind)().cpu().numpy() for k, v in streams.items()}
        za, zb = (W.T @ W).cpu().numpy(), (W @ W.T).cpu().numpy()
        ref = {"forward_RGA": np_alpha(m["H_b"], m["G_b"]), "forward_RWA": np_alpha(m["H_b"], zb),
               "forward_GWA": np_alpha(m["G_b"], zb), "backward_RGA": np_alpha(m["H_a"], m["G_a"]),
               "backward_RWA": np_alpha(m["H_a"], za), "backward_GWA": np_alpha(m["G_a"], za)}
        for k in ref:
            assert out[k] == pytest.approx(ref[k], abs=1e-10), (kind, k)


def test_six_alignments_kind_selects_the_view():
    g = gen(1)
    W = torch.randn(4, 4, generator=g, dtype=F64)
    mats = [rand_psd(4, g) for _ in range(4)]
    layer = Layer(W, *mats)
    cov, sm = six_alignments(layer), six_alignments(layer, kind="second_moment")
    assert cov["backward_RWA"] == pytest.approx(alignment(mats[0], W.T @ W))
    assert sm["backward_RWA"] == pytest.approx(alignment(mats[0] + 1.0, W.T @ W))
    with pytest.raises(ValueError, match="kind must be one of"):
        six_alignments(layer, kind="corr")


def test_six_alignments_missing_pieces_give_nan():
    g = gen(2)
    mats = [rand_psd(4, g) for _ in range(4)]
    layer = Layer(torch.randn(4, 4, generator=g, dtype=F64), *mats)
    layer.H_b = None                 # not recorded
    layer.G_a = Moments(4)           # recorded but saw no rows
    out = six_alignments(layer)
    nan = {"forward_RGA", "forward_RWA", "backward_RGA", "backward_GWA"}
    for k, v in out.items():
        assert math.isnan(v) == (k in nan), k
    no_weight = Layer(None, *mats)
    out = six_alignments(no_weight)
    for k, v in out.items():
        assert math.isnan(v) == k.endswith(("RWA", "GWA")), k
    assert six_alignments(object()) == {k: pytest.approx(float("nan"), nan_ok=True)
                                        for k in RELATIONS}


def test_six_alignments_shape_mismatch_names_the_relation():
    g = gen(3)
    layer = Layer(torch.randn(3, 4, generator=g, dtype=F64), rand_psd(4, g), rand_psd(4, g),
                  rand_psd(3, g), rand_psd(5, g))
    with pytest.raises(ValueError, match=r"forward_RGA.*H_b.*G_b"):
        six_alignments(layer)


# ---------------------------------------------------------------------------- baseline
@settings(max_examples=2, deadline=None)
@given(seed=SEEDS)
def test_random_baseline_reproduces_paper_value(seed):
    # The paper: ≈ 0.14 for rank 40 of 200. Per trial α has std ≈ 0.006, so the 20-trial
    # mean has std ≈ 0.0014 around 0.1415: a ±0.01 band is > 6σ wide.
    assert random_baseline(200, 40, seed=seed) == pytest.approx(0.14, abs=0.01)


def test_random_baseline_matches_numpy_reference():
    # Independent numpy draw of the documented method (exact covariance P Pᵀ, P = A Bᵀ).
    rng = np.random.default_rng(12345)
    vals = []
    for _ in range(40):
        cs = []
        for _ in range(2):
            P = rng.standard_normal((60, 12)) @ rng.standard_normal((60, 12)).T
            cs.append(P @ P.T)
        vals.append(np_alpha(*cs))
    ref = float(np.mean(vals))
    spread = float(np.std(vals))
    got = random_baseline(60, 12, trials=40, seed=7)
    # two independent 40-trial means: difference std = spread·√(2/40); allow 6σ
    assert abs(got - ref) < 6 * spread * math.sqrt(2 / 40)
    with pytest.raises(ValueError, match="rank must be at most"):
        random_baseline(10, 11)
    with pytest.raises(ValueError, match="trials must be a positive int"):
        random_baseline(10, 2, trials=0)


# ====================================================================== spectra (docs/spec.md §4)
@FAST
@given(seed=SEEDS, d=st.integers(1, 20))
def test_eigh_descending_and_correct(seed, d, device):
    g = gen(seed)
    A = torch.randn(d, d, generator=g, dtype=F64)
    w, v = eigh(A.to(device))
    assert w.dtype == v.dtype == F64 and w.device.type == device.type
    w, v = w.cpu(), v.cpu()
    S = ((A + A.T) / 2).numpy()               # eigh symmetrizes first
    ref = np.sort(np.linalg.eigvalsh(S))[::-1]
    np.testing.assert_allclose(w.numpy(), ref, atol=1e-10 * max(1, abs(ref).max()))
    assert bool((w[:-1] >= w[1:]).all())
    np.testing.assert_allclose((v.T @ v).numpy(), np.eye(d), atol=1e-10)
    np.testing.assert_allclose((v @ torch.diag(w) @ v.T).numpy(), S, atol=1e-9 * max(1, abs(S).max()))


def test_eigh_falls_back_to_cpu(monkeypatch):
    def broken(m):
        raise torch.linalg.LinAlgError("simulated device failure")

    monkeypatch.setattr(spectra_mod, "_eigh_on_device", broken)
    A = rand_psd(7, gen(4))
    with pytest.warns(RuntimeWarning, match="retrying with numpy on the CPU"):
        w, v = eigh(A)
    np.testing.assert_allclose(w.numpy(), np.linalg.eigvalsh(A.numpy())[::-1], rtol=1e-10)
    assert w.dtype == F64 and w.device == A.device

    def also_broken(m):
        raise np.linalg.LinAlgError("simulated CPU failure")

    monkeypatch.setattr(spectra_mod, "_eigh_cpu", also_broken)
    with pytest.warns(RuntimeWarning), pytest.raises(RuntimeError, match="and on the CPU"):
        eigh(A)


def test_eigh_errors():
    with pytest.raises(ValueError, match=r"M must be square.*\(2, 3\)"):
        eigh(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="M must be a 2-D matrix"):
        eigh(torch.zeros(3))
    for bad in (float("nan"), float("inf")):
        M = torch.eye(3, dtype=F64)
        M[1, 2] = bad
        with pytest.raises(ValueError, match="non-finite"):
            eigh(M)
        with pytest.raises(ValueError, match="non-finite"):
            effective_rank(M)


@FAST
@given(seed=SEEDS, d=st.integers(2, 16))
def test_effective_rank(seed, d):
    g = gen(seed)
    k = int(torch.randint(1, d + 1, (1,), generator=g))
    Q = rand_orth(d, g)[:, :k]
    assert effective_rank(Q @ Q.T) == pytest.approx(k, rel=1e-9)
    assert effective_rank(3.0 * torch.eye(d)) == pytest.approx(d, rel=1e-12)
    A = rand_psd(d, g)
    lam = np.clip(np.linalg.eigvalsh(A.numpy()), 0, None)
    pr = lam[lam > 0] / lam.sum()
    assert effective_rank(A) == pytest.approx(math.exp(-(pr * np.log(pr)).sum()), rel=1e-9)
    # negative eigenvalues are clipped: diag(1, 1, −1) has effective rank 2
    assert effective_rank(torch.diag(torch.tensor([1.0, 1.0, -1.0]))) == pytest.approx(2.0)
    assert effective_rank(torch.zeros(d, d)) == 0.0


# ----------------------------------------------------------------- exponents and phases
def _check_table_row(phase, W, H_a, G_a, H_b, G_b):
    """The relations of this row hold (α = 1), the others do not."""
    al = six_alignments(Layer(W, H_a, G_a, H_b, G_b))
    for rel in RELATIONS:
        if rel in PHASES[phase].relations:
            assert al[rel] == pytest.approx(1.0, abs=1e-9), (phase, rel, al)
        else:
            assert al[rel] < 0.99, (phase, rel, al)
    return al


@pytest.mark.parametrize("phase", POINT_PHASES)
@PER_PHASE
@given(seed=SEEDS, shape=st.sampled_from([(16, 16), (24, 24), (12, 20), (20, 12)]))
def test_point_phases_recovered_exactly(phase, seed, shape):
    p, q = phase_point(phase)
    W, H_a, G_a, H_b, G_b = build_point_phase(p, q, *shape, seed)
    _check_table_row(phase, W, H_a, G_a, H_b, G_b)

    fit = fit_exponents(W, H_a, G_a, H_b, G_b)
    assert fit.p.slope == pytest.approx(p, abs=1e-8)
    assert fit.q.slope == pytest.approx(q, abs=1e-8)
    rp, rq = np_fit(W, H_a, G_a)
    assert (fit.p.slope, fit.q.slope) == pytest.approx((rp, rq), abs=1e-8)
    assert fit.p.r2 == pytest.approx(1.0, abs=1e-9) and fit.q.r2 == pytest.approx(1.0, abs=1e-9)
    assert fit.p.n_modes >= min(shape) - 2        # only the floor may drop a mode or two
    expected = FORWARD_SLOPE[phase]
    if expected is None:                          # G_b flat: slope undefined
        assert math.isnan(fit.forward.slope)
    else:
        assert fit.forward.slope == pytest.approx(expected, abs=1e-8)
    assert fit.commutation < 1e-20
    assert not is_flat(fit.z)
    assert set(fit.pairing) == {"lambda_H", "lambda_G", "lambda_Hb", "lambda_Gb"}
    assert np.all(np.diff(fit.pairing["lambda_H"]) <= 0)
    json.dumps(fit.to_dict(), allow_nan=False)    # strict JSON (NaN → null)

    res = classify_phase(fit.p.slope, fit.q.slope)
    assert res.phase == phase, res.explanation
    assert set(res.holds) == set(PHASES[phase].relations)


@pytest.mark.parametrize("phase", POINT_PHASES)
@PER_PHASE
@given(seed=SEEDS)
def test_point_phases_robust_to_noise(phase, seed):
    p, q = phase_point(phase)
    # 5 % log-normal jitter of every spectrum and a 1e-3 rad rotation of every basis
    W, H_a, G_a, H_b, G_b = build_point_phase(p, q, 24, 24, seed, noise=0.05, angle=1e-3)
    fit = fit_exponents(W, H_a, G_a, H_b, G_b)
    assert fit.p.slope == pytest.approx(p, abs=0.1)
    assert fit.q.slope == pytest.approx(q, abs=0.1)
    if FORWARD_SLOPE[phase] is not None:
        assert fit.forward.slope == pytest.approx(FORWARD_SLOPE[phase], abs=0.2)
    assert 0 < fit.commutation < 1e-3
    assert classify_phase(fit.p.slope, fit.q.slope).phase == phase


@pytest.mark.parametrize("phase", FLAT_PHASES)
@PER_PHASE
@given(seed=SEEDS, jitter=st.sampled_from([0.0, 0.02]))
def test_flat_phases_from_alignments(phase, seed, jitter):
    W, H_a, G_a, H_b, G_b = build_flat_phase(phase, 20, 8, seed, jitter)
    if jitter == 0.0:
        al = _check_table_row(phase, W, H_a, G_a, H_b, G_b)
        threshold = 0.99
    else:  # a nearly flat z: the relations hold only approximately
        al = six_alignments(Layer(W, H_a, G_a, H_b, G_b))
        threshold = 0.9
    fit = fit_exponents(W, H_a, G_a, H_b, G_b)
    assert is_flat(fit.z)
    if jitter == 0.0:
        assert math.isnan(fit.p.slope) and math.isnan(fit.q.slope)
    res = classify_phase(fit.p.slope, fit.q.slope, z_flat=True, alignments=al,
                         alpha_threshold=threshold)
    assert res.phase == phase, (res.explanation, al)


# ------------------------------------------------------------------ the phase diagram
def test_lines_pass_through_exactly_their_phase_points():
    """docs/spec.md §4: each phase point lies on its relations' lines and ≥ 0.7 from the others."""
    for ph in POINT_PHASES:
        p, q = phase_point(ph)
        dist = line_distances(p, q)
        for rel, dd in dist.items():
            if rel in PHASES[ph].relations:
                assert dd == pytest.approx(0.0, abs=1e-15), (ph, rel)
            else:
                assert dd >= 0.7, (ph, rel, dd)
        fs = FORWARD_SLOPE[ph]
        if fs is None:
            assert q == 1.0                       # G_b ∝ z^(q−1) is flat
        else:
            assert fs == (p + 1) / (q - 1)         # H_b ∝ z^(p+1), G_b ∝ z^(q−1)


@FAST
@given(p=st.floats(-5, 5), q=st.floats(-5, 5))
def test_line_distances_reference(p, q):
    # independent: project (p, q) onto the line through two of its points
    pts = {"backward_RGA": ((0, 0), (1, 1)), "backward_RWA": ((1, 0), (1, 1)),
           "backward_GWA": ((0, 1), (1, 1)), "forward_RGA": ((0, 2), (1, 3)),
           "forward_RWA": ((0, 0), (0, 1)), "forward_GWA": ((0, 2), (1, 2))}
    dist = line_distances(p, q)
    assert set(dist) == set(LINES) == set(RELATIONS)
    for rel, (a, b) in pts.items():
        a, b, x = np.array(a, float), np.array(b, float), np.array([p, q])
        t = (b - a) / np.linalg.norm(b - a)
        ref = np.linalg.norm((x - a) - ((x - a) @ t) * t)
        assert dist[rel] == pytest.approx(ref, abs=1e-9)


def test_classify_phase_edges():
    # within tol of p = 1 and q = 1 but 0.28 from p = q: still backward CRH (two imply three)
    r = classify_phase(1.2, 0.8)
    assert r.phase == "backward CRH" and "backward_RGA" not in r.holds
    # on one line only: no phase
    r = classify_phase(0.5, 0.5)
    assert r.phase == "none" and r.holds == ["backward_RGA"]
    assert classify_phase(5.0, -3.0).phase == "none"
    # a tolerance large enough for several candidates picks the nearest phase point
    r = classify_phase(0.45, 1.4, tol=0.6)
    assert r.phase == "9" and "Other candidates" in r.explanation and "backward CRH" in r.explanation
    # NaN exponents without z_flat
    r = classify_phase(float("nan"), 1.0)
    assert r.phase == "none" and "z_flat=True" in r.explanation
    with pytest.raises(ValueError, match="needs alignments"):
        classify_phase(float("nan"), float("nan"), z_flat=True)
    with pytest.raises(ValueError, match="unknown keys"):
        classify_phase(0, 0, alignments={"RGA": 1.0})
    with pytest.raises(ValueError, match="tol must be > 0"):
        classify_phase(0, 0, tol=0)
    # flat z: pairs, sides, none, missing values
    one = dict.fromkeys(RELATIONS, 0.0)
    assert classify_phase(0, 0, z_flat=True, alignments=one).phase == "none"
    al = dict(one, backward_RWA=0.8, forward_RWA=0.9)
    assert classify_phase(0, 0, z_flat=True, alignments=al).phase == "2"
    al = dict(one, backward_RGA=0.9, backward_RWA=0.9, backward_GWA=0.9, forward_RGA=float("nan"))
    assert classify_phase(0, 0, z_flat=True, alignments=al).phase == "backward CRH"
    al = dict(one, forward_RGA=0.9, forward_RWA=0.9, forward_GWA=0.9)
    assert classify_phase(0, 0, z_flat=True, alignments=al).phase == "forward CRH"
    al = dict.fromkeys(RELATIONS, 0.95)
    assert classify_phase(0, 0, z_flat=True, alignments=al).phase == "CRH"
    assert classify_phase(0, 0, z_flat=True, alignments=al, alpha_threshold=0.99).phase == "none"
    json.dumps(classify_phase(float("nan"), 0.0).to_dict(), allow_nan=False)


def test_phase_point_table():
    assert phase_point("backward CRH") == (1, 1) and phase_point("forward CRH") == (0, 2)
    assert [phase_point(str(k)) for k in range(4, 10)] == [(0, 0), (1, 3), (2, 2), (-1, 1),
                                                          (1, 2), (0, 1)]
    assert phase_point(5) == (1, 3)
    for ph in ("1", "2", "3", "CRH", "none"):
        assert phase_point(ph) is None
    with pytest.raises(ValueError, match="phase must be one of"):
        phase_point("10")


def test_is_flat():
    assert is_flat([2.0, 2.0, 2.1, 0.0, 1e-12])      # the support excludes the null modes
    assert not is_flat([1.0, 0.5])
    assert is_flat(torch.tensor([1.0, 0.5]), tol=1.0)
    assert not is_flat([0.0, 0.0]) and not is_flat([])
    with pytest.raises(ValueError):
        is_flat([1.0, float("nan")])


# ------------------------------------------------------------------------- commutation
@FAST
@given(seed=SEEDS, shape=st.sampled_from([(10, 10), (6, 10), (10, 6)]))
def test_commutation_error(seed, shape):
    g = gen(seed)
    d_out, d_in = shape
    W = torch.randn(d_out, d_in, generator=g, dtype=F64)
    U, s, Vh = torch.linalg.svd(W)             # full bases
    V = Vh.T
    r = s.numel()
    for B, side, d in ((V, "a", d_in), (U, "b", d_out)):
        # commuting: any function of z on the range, anything inside the null space
        f = torch.rand(r, generator=g, dtype=F64)
        H = B[:, :r] @ torch.diag(f) @ B[:, :r].T
        if d > r:
            N = B[:, r:]
            H = H + N @ rand_psd(d - r, g) @ N.T
        assert commutation_error(W, H, side=side) < 1e-20
        # random H does not commute; for a full-rank square W it matches the plain formula
        R = rand_psd(d, g)
        e = commutation_error(W, R, side=side)
        assert 0.05 < e < 1
        if d == r:
            M = (B.T @ R @ B).numpy()
            ref = (M**2).sum() - (np.diag(M) ** 2).sum()
            assert e == pytest.approx(ref / (M**2).sum(), rel=1e-9)
    # side chosen from H's size; errors name the expectation
    if d_out != d_in:
        assert commutation_error(W, rand_psd(d_out, g)) > 0
    with pytest.raises(ValueError, match=r"H must be D_in×D_in"):
        commutation_error(W, torch.eye(d_in + d_out))
    with pytest.raises(ValueError, match="side must be"):
        commutation_error(W, torch.eye(d_in), side="x")


def test_fit_exponents_argument_errors():
    W = torch.randn(3, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"H_a must be D_in×D_in = 4×4"):
        fit_exponents(W, torch.eye(3), torch.eye(4))
    with pytest.raises(ValueError, match=r"G_b must be D_out×D_out = 3×3"):
        fit_exponents(W, torch.eye(4), torch.eye(4), torch.eye(3), torch.eye(4))
    with pytest.raises(ValueError, match="floor must be"):
        fit_exponents(W, torch.eye(4), torch.eye(4), floor=1.5)
    bad = torch.eye(4, dtype=F64)
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="G_a has 1 non-finite"):
        fit_exponents(W, torch.eye(4), bad)
    # no forward matrices: no forward fit, pairing without the b keys
    fit = fit_exponents(W, torch.eye(4), torch.eye(4))
    assert fit.forward is None and set(fit.pairing) == {"lambda_H", "lambda_G"}


def test_fit_exponents_on_device(device):
    W, H_a, G_a, H_b, G_b = build_point_phase(2.0, 2.0, 16, 16, 0)
    fit = fit_exponents(*(m.to(device) for m in (W, H_a, G_a, H_b, G_b)))
    assert (fit.p.slope, fit.q.slope, fit.forward.slope) == pytest.approx((2, 2, 3), abs=1e-8)


def test_pairing_fit():
    """The sorted-spectrum slope (paper Fig. 3) lives in analysis: exact on a power law, ranks
    below the floor or non-finite left out, None when it cannot be fitted."""
    lam_g = np.array([1.0, 0.5, 0.25, 0.1, 0.01])
    slope, intercept = pairing_fit(3.0 * lam_g ** 2, lam_g)
    assert slope == pytest.approx(2.0) and math.exp(intercept) == pytest.approx(3.0)
    lam_h = lam_g ** 2
    lam_h[-1] = 1e-30                                     # below floor × max: left out
    assert pairing_fit(np.append(lam_h, np.nan), np.append(lam_g, 1.0))[0] == pytest.approx(2.0)
    assert pairing_fit([1.0, 0.5], [1.0, 0.5]) is None    # fewer than 3 ranks
    assert pairing_fit([1.0, 0.5, 0.2], [1.0, 1.0, 1.0]) is None  # flat λ_G
    assert pairing_fit([], []) is None
