"""A layer's verdict with its evidence (issue 13): the α reading against the layer's own random
baseline, the exponent reading through quality gates, the effective support, trivial layers,
and the report's verdict block.

References are independent of the package: numpy (corrcoef, svd, polyfit) written here; the
synthetic matrices are docs/spec.md §4's construction (tests/test_analysis.py's builders);
the known answers come from real training of small MLPs (a second or so each), whose regime
is known by construction (large weight decay → CRH; white inputs; d_out = 1; gradients that
span two directions; a barely trained layer).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from crh_kernels import analysis as A
from crh_kernels.analysis import (FLAT_FAMILY, PHASES, RELATIONS, VerdictGates, alpha_reading,
                                  commutation_error, effective_support, exponent_reading,
                                  fit_exponents, isotropy, layer_verdict, name_relations,
                                  random_baseline, relation_baselines, six_alignments,
                                  trivial_reasons)
from crh_kernels.collect import Collector
from crh_kernels.report import Report

from .test_analysis import Layer, build_flat_phase, build_point_phase, gen, np_alpha, rand_orth

pytestmark = pytest.mark.usefixtures("one_thread")

SEEDS = st.integers(0, 2**32 - 1)
F64 = torch.float64
POINT_PHASES = [ph for ph, v in PHASES.items() if v.point is not None]
G = VerdictGates()


# ----------------------------------------------------------------------------- references
def np_support(z, energy):
    """The fewest largest z carrying `energy` of Σ z², by a plain loop."""
    z = np.asarray(z, dtype=float)
    order = sorted(range(z.size), key=lambda i: -z[i])
    total, acc, keep = float((z * z).sum()), 0.0, []
    for i in order:
        if acc >= energy * total * (1 - 1e-12):
            break
        keep.append(i)
        acc += z[i] ** 2
    mask = np.zeros(z.size, dtype=bool)
    mask[keep] = True
    if keep:                                  # ties at the cut are kept
        mask |= z >= z[keep[-1]]
    return mask


def np_commutation(W, H):
    """Off-diagonal energy of VᵀHV (numpy full SVD); W here has distinct singular values."""
    _, s, vh = np.linalg.svd(np.asarray(W, dtype=float), full_matrices=True)
    m = vh @ np.asarray(H, dtype=float) @ vh.T
    z = np.zeros(m.shape[0])
    z[: s.size] = s**2
    same = np.abs(z[:, None] - z[None, :]) <= 1e-8 * z.max()
    return float((m**2)[~same].sum() / (m**2).sum())


def np_floor_fit(W, H, Gm, floor=1e-6):
    """(n_modes, R²_p, R²_q) of the floor-support fit, numpy only."""
    _, s, vh = np.linalg.svd(np.asarray(W, dtype=float), full_matrices=False)
    z = s**2
    h = np.einsum("ri,ij,rj->r", vh, np.asarray(H, dtype=float), vh)
    g = np.einsum("ri,ij,rj->r", vh, np.asarray(Gm, dtype=float), vh)
    keep = (z > floor * z.max()) & (h > floor * h.max()) & (g > floor * g.max())
    x = np.log(z[keep])

    def r2(y):
        if keep.sum() < 2:
            return float("nan")
        c = np.polyfit(x, y, 1)
        res = y - np.polyval(c, x)
        return 1 - (res**2).sum() / ((y - y.mean()) ** 2).sum()

    return int(keep.sum()), r2(np.log(h[keep])), r2(np.log(g[keep]))


def layer_inputs(W, H_a, G_a, H_b, G_b, n=None):
    """What the report hands layer_verdict, computed here from the matrices."""
    lay = Layer(W, H_a, G_a, H_b, G_b)
    al = six_alignments(lay)
    er = {"H_a": A.effective_rank(H_a), "G_a": A.effective_rank(G_a),
          "H_b": A.effective_rank(H_b), "G_b": A.effective_rank(G_b),
          "Z_a": A.effective_rank(W.T @ W), "Z_b": A.effective_rank(W @ W.T)}
    dims = {"a": W.shape[1], "b": W.shape[0]}
    return al, dims, relation_baselines(dims, er)


# ============================================================== baseline at the effective rank
def test_random_baseline_two_ranks_matches_dense_numpy():
    rng = np.random.default_rng(2024)
    d, k1, k2, trials = 50, 4, 15, 40
    vals = []
    for _ in range(trials):
        cs = []
        for k in (k1, k2):
            P = rng.standard_normal((d, k)) @ rng.standard_normal((d, k)).T
            cs.append(P @ P.T)
        vals.append(np_alpha(*cs))
    ref, spread = float(np.mean(vals)), float(np.std(vals))
    got = random_baseline(d, k1, rank_b=k2, trials=trials, seed=3)
    assert abs(got - ref) < 6 * spread * math.sqrt(2 / trials)
    # the factor form is the dense α up to rounding
    g = torch.Generator().manual_seed(5)
    a1, a2 = (torch.randn(d, k, generator=g, dtype=F64) for k in (k1, k2))
    c1, c2 = (torch.randn(k, k, generator=g, dtype=F64) for k in (k1, k2))
    c1, c2 = c1 @ c1.T, c2 @ c2.T
    dense = np_alpha((a1 @ c1 @ a1.T).numpy(), (a2 @ c2 @ a2.T).numpy())
    assert A.align._alpha_of_factors(a1, c1, a2, c2) == pytest.approx(dense, abs=1e-12)
    with pytest.raises(ValueError, match="rank_b must be a positive int"):
        random_baseline(10, 2, rank_b=0)
    with pytest.raises(ValueError, match="rank must be at most"):
        random_baseline(10, 2, rank_b=11)


def test_baseline_grows_with_rank_as_the_issue_measured():
    # issue 13: "D = 100: 0.02 at rank 2, 0.14 at 20, 0.25 at 50"; a fixed rank D/5 is wrong
    got = [random_baseline(100, k) for k in (2, 20, 50)]
    assert got == pytest.approx([0.02, 0.14, 0.25], abs=0.01)
    assert got[0] < got[1] < got[2]


def test_relation_baselines_use_each_relations_own_ranks():
    er = {"H_a": 3.4, "G_a": 1.2, "Z_a": 7.6, "H_b": 2.0, "G_b": 9.5, "Z_b": 7.6}
    out = relation_baselines({"a": 40, "b": 30}, er)
    want = {"backward_RGA": (40, 3, 1), "backward_RWA": (40, 3, 8), "backward_GWA": (40, 1, 8),
            "forward_RGA": (30, 2, 10), "forward_RWA": (30, 2, 8), "forward_GWA": (30, 10, 8)}
    for rel, (d, k1, k2) in want.items():
        assert out[rel]["dim"] == d and out[rel]["ranks"] == [k1, k2], rel
        assert out[rel]["baseline"] == pytest.approx(
            random_baseline(d, min(k1, k2), rank_b=max(k1, k2), trials=out[rel]["trials"]), abs=1e-12)
    # a missing matrix or a 1-dimensional side has no baseline
    out = relation_baselines({"a": 40, "b": 1}, {"H_a": 3.0, "Z_a": 2.0, "Z_b": 1.0, "H_b": 1.0})
    assert out["backward_RWA"]["baseline"] is not None
    assert out["backward_RGA"]["baseline"] is None          # no G_a
    assert all(out[r]["baseline"] is None for r in ("forward_RGA", "forward_RWA", "forward_GWA"))


@settings(max_examples=10, deadline=None)
@given(seed=SEEDS)
def test_effective_rank_of_spectrum_equals_effective_rank(seed):
    g = gen(seed)
    d = int(torch.randint(2, 30, (1,), generator=g))
    b = torch.randn(d, int(torch.randint(1, d + 1, (1,), generator=g)), generator=g, dtype=F64)
    M = b @ b.T
    lam = np.linalg.eigvalsh(M.numpy())
    assert A.effective_rank_of_spectrum(lam) == pytest.approx(A.effective_rank(M), rel=1e-9)
    assert A.effective_rank_of_spectrum(np.zeros(4)) == 0.0


def test_large_ranks_are_rounded_to_two_digits_for_the_baseline():
    out = relation_baselines({"a": 1000, "b": 1000},
                             {"H_a": 366.4, "G_a": 99.6, "Z_a": 1234.0, "H_b": 2.4, "G_b": 0.3,
                              "Z_b": 1234.0})
    assert out["backward_RGA"]["ranks"] == [370, 100]
    assert out["backward_RWA"]["ranks"] == [370, 1000]          # at most the dimension
    assert out["forward_RGA"]["ranks"] == [2, 1]                # at least 1
    assert out["backward_RGA"]["trials"] == 3


# ===================================================================== support and isotropy
@settings(max_examples=20, deadline=None)
@given(seed=SEEDS, energy=st.sampled_from([0.5, 0.9, 0.95, 1.0]))
def test_effective_support_matches_a_plain_loop(seed, energy):
    rng = np.random.default_rng(seed)
    z = np.exp(rng.normal(0, 2, size=int(rng.integers(1, 40))))
    if rng.random() < 0.3:
        z[: z.size // 2] = 0.0                            # a null space
    got = effective_support(z, energy)
    assert got.dtype == bool and (got == np_support(z, energy)).all()


def test_effective_support_known_spectra():
    # fc1 at γ = 3e-3, layer 2 (issue 13): one dominant mode, a second at 0.174, a tail
    z = np.array([1.0, 0.174] + [0.002] * 98)
    assert effective_support(z, 0.95).sum() == 1          # 1 / (1 + 0.03 + 0.0004) ≥ 0.95
    assert effective_support(z, 0.99).sum() == 2
    # a rank-3 projection plus a tiny tail: the three, ties kept
    z = np.array([4.0, 4.0, 4.0] + [1e-3] * 10)
    assert effective_support(z, 0.95).tolist() == [True] * 3 + [False] * 10
    assert not effective_support(np.zeros(5)).any()
    with pytest.raises(ValueError, match="≥ 0"):
        effective_support([1.0, -1.0])
    with pytest.raises(ValueError, match="energy"):
        effective_support([1.0], 0.0)


def test_isotropy():
    d = 30
    assert isotropy(torch.eye(d)) == pytest.approx(1.0)
    v = torch.randn(d, 1, dtype=F64)
    assert isotropy(v @ v.T) == pytest.approx(1 / d)
    # sample covariances of n white rows: the correction (1 + (d+1)/n) brings them to ≈ 1
    rng = np.random.default_rng(0)
    for n in (100, 1000, 10_000):
        x = rng.standard_normal((n, d))
        x /= np.linalg.norm(x, axis=1, keepdims=True)     # normalized rows, as collected
        S = np.cov(x.T, bias=True)
        pr = np.trace(S) ** 2 / (S**2).sum()
        assert isotropy(S) == pytest.approx(pr / d)
        assert isotropy(S, n) == pytest.approx(1.0, abs=0.05), n
    # two levels a factor 3 apart are not white
    assert isotropy(np.diag([1.0] * 15 + [3.0] * 15), 10_000) < G.white_isotropy


# ============================================================================== α reading
def test_alpha_reading_rule_and_names():
    base = {r: {"baseline": 0.1, "ranks": [3, 4]} for r in RELATIONS}
    base["forward_RGA"] = {"baseline": 0.38, "ranks": [90, 95]}   # a high-rank relation
    al = {"forward_RGA": 0.85, "forward_RWA": 0.71, "forward_GWA": 0.69,
          "backward_RGA": 0.2, "backward_RWA": float("nan"), "backward_GWA": 0.05}
    r = alpha_reading(al, base)
    rel = r["relations"]
    assert rel["forward_RGA"]["required"] == pytest.approx(0.88)   # max(0.7, 0.38 + 0.5)
    assert rel["forward_RGA"]["status"] == "above baseline"
    assert rel["forward_RWA"]["status"] == "holds" and rel["forward_RWA"]["required"] == 0.7
    assert rel["forward_GWA"]["status"] == "above baseline"
    assert rel["backward_RGA"]["status"] == "above baseline"
    assert rel["backward_RWA"]["status"] == "undefined"
    assert rel["backward_GWA"]["status"] == "not above baseline"
    assert r["holds"] == ["forward_RWA"] and r["name"] == "partial"
    # every α ≥ 0.9 holds whatever the baseline (it stays below 0.4)
    hi = {k: 0.9 for k in RELATIONS}
    assert alpha_reading(hi, {k: {"baseline": 0.39} for k in RELATIONS})["name"] == "CRH"
    assert random_baseline(60, 60) < 0.4                             # full rank: ≈ 1/3


def test_no_alpha_at_all_is_undefined_not_none():
    # a forward-only report (no gradients): every α is NaN, which is no evidence against CRH
    r = alpha_reading({k: float("nan") for k in RELATIONS})
    assert r["name"] == "undefined" and r["holds"] == []
    assert all(x["status"] == "undefined" for x in r["relations"].values())
    v = layer_verdict({k: float("nan") for k in RELATIONS}, dims={"a": 8, "b": 8})
    assert v.verdict == "undefined" and v.agreement is None


@pytest.mark.parametrize("holds, name, extra", [
    (RELATIONS, "CRH", []),
    (("backward_RGA", "backward_RWA", "backward_GWA"), "backward CRH", []),
    (("forward_RGA", "forward_RWA", "forward_GWA", "backward_GWA"), "forward CRH", ["backward_GWA"]),
    (("backward_RGA", "forward_RWA"), "4", []),
    (("backward_RWA", "forward_GWA"), "8", []),
    (("backward_GWA", "forward_GWA"), "3", []),
    (("forward_RGA",), "partial", ["forward_RGA"]),
    ((), "none", []),
])
def test_name_relations(holds, name, extra):
    assert name_relations(holds) == (name, extra)


def test_name_relations_tie_goes_to_the_stronger_pair():
    # RGA on both sides (1) and RWA on both sides (2): the pair with the larger smaller α wins
    hs = ("backward_RGA", "forward_RGA", "backward_RWA", "forward_RWA")
    al = {"backward_RGA": 0.95, "forward_RGA": 0.8, "backward_RWA": 0.9, "forward_RWA": 0.85}
    assert name_relations(hs, al)[0] == "2"


# =========================================================== exponent reading on docs/spec.md §4 matrices
@pytest.mark.parametrize("phase", POINT_PHASES)
@settings(max_examples=4, deadline=None)
@given(seed=SEEDS, shape=st.sampled_from([(16, 16), (24, 24), (12, 20), (20, 12)]))
def test_each_point_phase_is_named_when_the_fit_is_clean(phase, seed, shape):
    p, q = PHASES[phase].point
    W, H_a, G_a, H_b, G_b = build_point_phase(p, q, *shape, seed)
    fit = fit_exponents(W, H_a, G_a, H_b, G_b)
    ex = exponent_reading(fit, commutation_g=commutation_error(W, G_a))
    assert ex["phase"] == phase, ex["reason"]
    assert ex["failed"] == [] and all(g["passed"] for g in ex["gates"].values())
    assert not ex["support"]["flat"] and ex["support"]["modes"] >= 2
    assert ex["gates"]["modes"]["value"] == fit.p.n_modes >= 5
    assert (ex["p"], ex["q"]) == pytest.approx((p, q), abs=1e-8)
    assert set(ex["holds"]) == set(PHASES[phase].relations)
    al, dims, base = layer_inputs(W, H_a, G_a, H_b, G_b)
    v = layer_verdict(al, dims=dims, fit=fit, baselines=base,
                      commutation_g=commutation_error(W, G_a))
    assert v.exponent["phase"] == phase and not v.trivial
    # the phase's own relations hold by α too (α = 1 there, docs/spec.md §4's check)
    assert set(PHASES[phase].relations) <= set(v.alpha["holds"])
    json.dumps(v.to_dict(), allow_nan=False)


@pytest.mark.parametrize("phase", FLAT_FAMILY)
@settings(max_examples=4, deadline=None)
@given(seed=SEEDS, jitter=st.sampled_from([0.0, 0.02]))
def test_flat_phases_are_flat_and_agree_with_the_alpha_reading(phase, seed, jitter):
    W, H_a, G_a, H_b, G_b = build_flat_phase(phase, 20, 8, seed, jitter)
    fit = fit_exponents(W, H_a, G_a, H_b, G_b)
    al, dims, base = layer_inputs(W, H_a, G_a, H_b, G_b)
    # the generic matrices of this construction can align by chance with a projection; a bar
    # of 0.99 (as tests/test_analysis.py uses) separates "holds by construction" from that
    v = layer_verdict(al, dims=dims, fit=fit, baselines=base,
                      gates=VerdictGates(alpha_threshold=0.99 if jitter == 0 else 0.9))
    assert v.exponent["phase"] == "flat", v.exponent["reason"]
    assert v.exponent["support"]["modes"] == 8 and v.exponent["gates"] == {}
    assert v.verdict == phase, v.explanation
    assert v.agreement is True and v.agree_text == "yes"


def _power_law_layer(p, q, d, seed, *, noise_h=0.0, angle=0.0, decades=2.0):
    """docs/spec.md §4's construction with s over ``decades`` (z over twice as many); ``noise_h``:
    log-normal noise of h only; ``angle``: rotation of H_a's eigenbasis away from W's."""
    g = gen(seed)
    U, V = rand_orth(d, g), rand_orth(d, g)
    s = torch.logspace(0, -decades, d, dtype=F64)
    W = U @ torch.diag(s) @ V.T
    z = s * s
    h = z**p * torch.exp(noise_h * torch.randn(d, generator=g, dtype=F64))
    Vh = V
    if angle:
        k = torch.randn(d, d, generator=g, dtype=F64)
        Vh = torch.linalg.matrix_exp(angle * (k - k.T) / 2) @ V
    H_a = Vh @ torch.diag(h) @ Vh.T
    G_a = V @ torch.diag(z**q) @ V.T
    G_b = U @ torch.diag(z ** (q - 1)) @ U.T
    return W, H_a, G_a, W @ H_a @ W.T, G_b


def test_gate_modes_fails_below_five_modes():
    # phase 5 on 4 modes, z = 1, 0.6, 0.36, 0.22: three carry 95 % of Σ z², 2.8× apart (not flat)
    W, H_a, G_a, H_b, G_b = _power_law_layer(1.0, 3.0, 4, seed=11, decades=0.33)
    fit = fit_exponents(W, H_a, G_a, H_b, G_b)
    ex = exponent_reading(fit)
    assert ex["support"] == {"modes": 3, "energy": 0.95, "flat": False, "flat_limit": math.log(2),
                             "log_span": pytest.approx(math.log(10 ** (2 * 0.22)))}
    assert ex["phase"] == "undetermined" and ex["failed"] == ["modes"]
    assert ex["gates"]["modes"] == {"value": 4, "limit": 5, "passed": False,
                                    "text": "modes in the fit 4 (need ≥ 5)"}
    assert "modes in the fit 4 (need ≥ 5)" in ex["reason"]
    # the same fit with the gate lowered names the phase: the gate is what stopped it
    assert exponent_reading(fit, VerdictGates(min_modes=4))["phase"] == "5"


def test_gate_r2_fails_on_a_scattered_p_and_names_it():
    W, H_a, G_a, H_b, G_b = _power_law_layer(1.0, 2.0, 24, seed=3, noise_h=1.5)   # phase 8
    fit = fit_exponents(W, H_a, G_a, H_b, G_b)
    n, r2p, r2q = np_floor_fit(W, H_a, G_a)
    assert n == fit.p.n_modes and r2q == pytest.approx(1.0)
    ex = exponent_reading(fit)
    assert ex["phase"] == "undetermined" and ex["failed"] == ["p"], ex["reason"]
    gp = ex["gates"]["p"]
    assert gp["value"] == pytest.approx(r2p, abs=1e-9) and r2p < 0.8
    assert gp["scatter"] > 0.25 and "R² " in gp["text"]
    assert ex["gates"]["q"]["passed"]


def test_near_zero_slope_passes_by_its_small_scatter():
    # forward CRH, (0, 2), with 3 % noise on h: R² of p is tiny (nothing to explain) but the
    # points hug a flat line, so p = 0 is well determined and the phase is named
    W, H_a, G_a, H_b, G_b = _power_law_layer(0.0, 2.0, 24, seed=4, noise_h=0.03)
    fit = fit_exponents(W, H_a, G_a, H_b, G_b)
    _, r2p, _ = np_floor_fit(W, H_a, G_a)
    assert r2p < 0.5
    ex = exponent_reading(fit)
    assert ex["gates"]["p"]["passed"] and ex["gates"]["p"]["scatter"] < 0.05
    assert ex["phase"] == "forward CRH", ex["reason"]


def test_gate_commutation_fails_when_H_a_is_rotated_off_Ws_basis():
    W, H_a, G_a, H_b, G_b = _power_law_layer(2.0, 2.0, 24, seed=5, angle=0.6)     # phase 6
    fit = fit_exponents(W, H_a, G_a, H_b, G_b)
    want = np_commutation(W.numpy(), H_a.numpy())
    assert want > 0.2
    ex = exponent_reading(fit, commutation_g=commutation_error(W, G_a))
    assert "commutation" in ex["failed"] and ex["phase"] == "undetermined"
    c = ex["gates"]["commutation"]
    assert c["value"] == pytest.approx(want, rel=1e-9) and c["H_a"] == pytest.approx(want, rel=1e-9)
    assert c["G_a"] == pytest.approx(np_commutation(W.numpy(), G_a.numpy()), abs=1e-12)
    assert f"{want:.3g}" in ex["reason"]


# ========================================================================== trivial layers
def test_trivial_reasons():
    assert [t["kind"] for t in trivial_reasons({"a": 100, "b": 1})] == ["d_out=1"]
    assert [t["kind"] for t in trivial_reasons({"a": 1, "b": 8})] == ["d_in=1"]
    assert [t["kind"] for t in trivial_reasons({"a": 2, "b": 8})] == ["tiny"]
    assert [t["kind"] for t in trivial_reasons({"a": 8, "b": 8}, isotropy_a=0.95)] == ["white input"]
    assert trivial_reasons({"a": 8, "b": 8}, isotropy_a=0.5) == []
    assert trivial_reasons({"a": 3, "b": 3}) == []
    al = {k: 1.0 for k in RELATIONS}
    v = layer_verdict(al, dims={"a": 8, "b": 1})
    assert v.verdict == "trivial" and v.label == "trivial: d_out=1"
    assert v.agreement is None and v.agree_text == "-"
    assert "backward GWA holds by construction" in v.explanation


def test_agreement_flag():
    W, H_a, G_a, H_b, G_b = build_point_phase(1.0, 3.0, 16, 16, seed=7)          # phase 5
    fit = fit_exponents(W, H_a, G_a, H_b, G_b)
    dims = {"a": 16, "b": 16}
    five = {k: (1.0 if k in PHASES["5"].relations else 0.1) for k in RELATIONS}
    assert layer_verdict(five, dims=dims, fit=fit).agreement is True
    # α says CRH (a flat z) where the exponents put a clean fit at (1, 3): a real conflict
    crh = {k: 1.0 for k in RELATIONS}
    v = layer_verdict(crh, dims=dims, fit=fit)
    assert v.verdict == "CRH" and v.agreement is False and v.agree_text == "no"
    # an undetermined exponent reading cannot confirm or contradict
    v = layer_verdict(crh, dims=dims, fit=fit, gates=VerdictGates(min_modes=50))
    assert v.agreement is None and v.agree_text == "?"
    assert v.exponent["failed"] == ["modes"]
    # no weight (an attention head): not applicable
    v = layer_verdict(five, dims={"a": None, "b": 16}, applicable=False)
    assert v.exponent["phase"] == "not applicable" and v.agreement is None


# ================================================================ known answers: real training
def _teacher(d_in, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    Wt = torch.randn(32, d_in, generator=g, dtype=F64) / d_in**0.5
    bt = torch.randn(32, generator=g, dtype=F64)
    ut = torch.randn(32, 1, generator=g, dtype=F64) / 32**0.5
    return lambda x: (torch.sin(x.double() @ Wt.T + bt) @ ut).float()


def train_mlp(dims, *, act=nn.ReLU, weight_decay=0.0, steps=2000, seed=0, d_target=None):
    """An MLP ``dims[0] → … → dims[-1]`` trained by online SGD (lr 0.1, batch 100) on a sin
    teacher with x ~ N(0, I) (white inputs), then measured on 1000 fresh points."""
    torch.manual_seed(seed)
    mods = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            mods.append(act())
    net = nn.Sequential(*mods)
    teach = _teacher(dims[0], seed)
    out = dims[-1]
    opt = torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)

    def loss_of(x):
        y = teach(x)
        return (net(x) - y.expand(-1, out)).pow(2).mean()

    for _ in range(steps):
        loss = loss_of(torch.randn(100, dims[0], generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    col = Collector(net, state_dtype=torch.float64)
    with col:
        loss_of(torch.randn(1000, dims[0], generator=g)).backward()
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    return net, col, col.report(), names


def _no_phase_from_a_failed_gate(rep):
    for name, e in rep.layers.items():
        ex = e["verdict"]["exponent"]
        if ex["phase"] not in ("undetermined", "flat", "not applicable"):
            assert all(g["passed"] for g in ex["gates"].values()), (name, ex)
            assert e["phase"] == ex["phase"]
        if ex["phase"] == "undetermined":
            assert ex["failed"] and all(not ex["gates"][f]["passed"] for f in ex["failed"]
                                        if f in ex["gates"])


@pytest.fixture(scope="module")
def crh_net():
    # large weight decay: the hidden layers collapse onto a shared low-rank structure
    return train_mlp([16, 16, 16, 16, 1], weight_decay=1e-2, steps=2000, seed=1)


def test_large_weight_decay_hidden_layers_are_called_crh(crh_net):
    _, col, rep, names = crh_net
    hidden = names[1:-1]
    high = [n for n in hidden
            if all(v is not None and v >= 0.9 for v in rep.layers[n]["alpha_cov"].values())]
    assert high, {n: rep.layers[n]["alpha_cov"] for n in hidden}   # the regime was reached
    for n in high:
        v = rep.layers[n]["verdict"]
        assert v["verdict"] == "CRH", v["explanation"]
        assert v["alpha"]["holds"] == list(RELATIONS)
        # the evidence: every α against its own baseline, the support, the gates' values
        for rel, r in v["alpha"]["relations"].items():
            assert r["alpha"] == pytest.approx(rep.layers[n]["alpha_cov"][rel])
            assert r["baseline"] is not None and r["baseline"] < 0.4
            assert r["required"] == pytest.approx(max(0.7, r["baseline"] + 0.5))
        ex = v["exponent"]
        assert ex["support"]["modes"] >= 1 and ex["support"]["log_span"] is not None
        if ex["phase"] == "flat":
            assert v["agreement"] is True
    _no_phase_from_a_failed_gate(rep)


def test_white_input_first_layer_is_flagged_trivial(crh_net):
    _, col, rep, names = crh_net
    v = rep.layers[names[0]]["verdict"]
    assert v["verdict"] == "trivial" and v["trivial"][0]["kind"] == "white input"
    H = col.layers[names[0]].H_a.cov().numpy()
    n = col.layers[names[0]].H_a.n
    d = H.shape[0]
    pr = np.trace(H) ** 2 / (H**2).sum()
    assert v["isotropy_a"] == pytest.approx(pr * (1 + (d + 1) / n) / d, rel=1e-9)
    assert v["isotropy_a"] >= 0.9 and v["agree"] == "-"
    # the hidden layers' inputs are not white
    for name in names[1:]:
        assert rep.layers[name]["verdict"]["isotropy_a"] < 0.9


def test_output_layer_with_one_unit_is_flagged_trivial(crh_net):
    _, _, rep, names = crh_net
    e = rep.layers[names[-1]]
    assert e["verdict"]["verdict"] == "trivial"
    assert [t["kind"] for t in e["verdict"]["trivial"]] == ["d_out=1"]
    assert e["alpha_cov"]["backward_GWA"] == pytest.approx(1.0, abs=1e-6)  # by construction


def test_a_hidden_layer_whose_p_is_no_power_law_is_undetermined():
    # Three hidden layers, 500 steps at γ = 1e-3: the third layer's h is no power law of z
    # (log h against log z scatters: low R² and wide residuals), so no phase is named
    _, col, rep, names = train_mlp([16, 32, 32, 32, 1], weight_decay=1e-3, steps=500)
    name = names[2]
    st_ = col.layers[name]
    n_modes, r2p, _ = np_floor_fit(st_.weight().double(), st_.H_a.cov(), st_.G_a.cov())
    e = rep.layers[name]
    ex = e["verdict"]["exponent"]
    assert not ex["support"]["flat"] and n_modes >= 5
    assert ex["gates"]["modes"]["passed"] and ex["gates"]["modes"]["value"] == n_modes
    assert ex["phase"] == "undetermined" and "p" in ex["failed"], ex
    gp = ex["gates"]["p"]
    assert gp["value"] == pytest.approx(r2p, abs=1e-9) and r2p < 0.8
    assert gp["scatter"] > 0.25 and not gp["passed"]
    assert e["phase"] == "undetermined" and e["phase_explanation"].startswith("not named: ")
    assert gp["text"] in e["phase_explanation"]
    assert e["verdict"]["agreement"] is None and e["verdict"]["agree"] == "?"
    _no_phase_from_a_failed_gate(rep)


def test_barely_trained_layer_fails_the_commutation_gate():
    _, col, rep, names = train_mlp([16, 32, 32, 1], steps=20)
    st_ = col.layers[names[1]]
    W = st_.weight().double()
    want = max(np_commutation(W, st_.H_a.cov()), np_commutation(W, st_.G_a.cov()))
    ex = rep.layers[names[1]]["verdict"]["exponent"]
    assert want > 0.2
    assert ex["phase"] == "undetermined" and "commutation" in ex["failed"]
    assert ex["gates"]["commutation"]["value"] == pytest.approx(want, rel=1e-7)
    _no_phase_from_a_failed_gate(rep)


# ============================================================================ report block
def test_report_json_and_table_carry_the_verdict(crh_net, tmp_path):
    _, _, rep, names = crh_net
    assert rep.meta["verdict_gates"] == VerdictGates().to_dict()
    back = Report.from_json(rep.to_json(tmp_path / "report.json"))
    assert back.layers == rep.layers
    for name in names:
        v = back.layers[name]["verdict"]
        assert set(v) >= {"verdict", "label", "agreement", "agree", "trivial", "alpha",
                          "exponent", "explanation", "gates", "isotropy_a", "effective_ranks"}
        assert set(v["alpha"]["relations"]) == set(RELATIONS)
    text = rep.table()
    header = text.splitlines()[0].split()
    assert header[-2:] == ["agree", "verdict"]
    rows = {line.split()[0]: line for line in text.splitlines()[2:2 + len(names)]}
    for name in names:
        v = rep.layers[name]["verdict"]
        assert rows[name].rstrip().endswith(v["label"]), rows[name]
        assert f"  {v['agree']}  " in rows[name]
    legend = rep.legend()
    for key in ("agree", "verdict", "flat", "undet:…"):
        assert f"\n  {key}" in legend or f"\n    {key}" in legend, key
    assert "max(0.7, baseline + 0.5)" in " ".join(legend.split())


def test_report_rejects_a_verdict_block_of_the_wrong_type(crh_net, tmp_path):
    _, _, rep, names = crh_net
    d = rep.to_dict()
    d["layers"][names[1]]["verdict"]["agreement"] = "yes"
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"verdict\.agreement"):
        Report.from_json(p)
