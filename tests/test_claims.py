"""The claims of fc1 and fc2 as the paper states them (issue 13, item 3): intervals and the
verdicts that use them, checked against independent computations (a printed t table, numpy's
least squares); hidden layers as the paper counts them; the paper's slope measure; both readings
of the small-γ claim; several seeds in one run directory, with the paper's words in claims.md."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from crh_kernels.experiments import Context, SavedRunError, fc1, fc2, fcnet, rebuild, run_experiment
from crh_kernels.experiments import claims as C

PAPER = Path("/work/shared/paper/formation-of-representations.txt")

# Student t quantiles t_{0.975, df} and t_{0.95, df} as printed in any statistics table (3 decimals):
# an independent reference for the scipy-free quantile function.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}
T95 = {1: 6.314, 2: 2.920, 5: 2.015, 10: 1.812, 30: 1.697}


# ----------------------------------------------------------------------------- statistics
def test_t_quantile_matches_the_printed_table():
    for df, t in T975.items():
        assert C.t_quantile(0.975, df) == pytest.approx(t, abs=6e-4), df
        assert C.t_quantile(0.025, df) == pytest.approx(-t, abs=6e-4), df
    for df, t in T95.items():
        assert C.t_quantile(0.95, df) == pytest.approx(t, abs=6e-4), df
    assert C.t_quantile(0.5, 7) == 0.0
    # a large df tends to the normal quantile 1.95996
    assert C.t_quantile(0.975, 1e6) == pytest.approx(1.959966, abs=1e-5)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7.5, 25, 400):
        for p in (0.6, 0.9, 0.975, 0.999):
            assert C.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9, abs=1e-10)


def test_mean_interval_is_the_t_interval():
    v = [0.61, 0.64, 0.58, 0.66]
    iv = C.mean_interval(v)
    half = T975[3] * np.std(v, ddof=1) / math.sqrt(4)
    assert iv.estimate == pytest.approx(np.mean(v), abs=1e-15)
    assert (iv.lo, iv.hi) == pytest.approx((np.mean(v) - half, np.mean(v) + half), abs=5e-4)
    assert iv.df == 3 and iv.n == 4
    one = C.mean_interval([0.7])
    assert one.estimate == 0.7 and not one.defined
    assert math.isnan(C.mean_interval([]).estimate)
    assert C.mean_interval([0.98, 1.0, 0.9], bounds=(0.0, 1.0)).hi == 1.0  # clipped to the range


def test_slope_interval_against_numpy_least_squares():
    rng = np.random.default_rng(3)
    for n in (3, 4, 12, 40):
        x = np.log10(np.geomspace(1e-5, 3e-3, n))
        y = 0.3 + 0.07 * x + rng.normal(0, 0.05, n)
        iv = C.slope_interval(list(x), list(y))
        X = np.stack([np.ones(n), x], 1)
        beta, ssr, *_ = np.linalg.lstsq(X, y, rcond=None)
        s2 = float(ssr[0]) / (n - 2)
        se = math.sqrt(s2 * np.linalg.inv(X.T @ X)[1, 1])
        t = T975.get(n - 2) or C.t_quantile(0.975, n - 2)
        assert iv.estimate == pytest.approx(beta[1], rel=1e-10, abs=1e-12)
        assert iv.df == n - 2
        # the table has 3 decimals: compare the half width to that precision
        assert (iv.hi - iv.lo) / 2 == pytest.approx(t * se, rel=3e-4)
    # two points: a slope, no interval; one x value: no slope
    two = C.slope_interval([0, 1], [0.2, 0.5])
    assert two.estimate == pytest.approx(0.3) and not two.defined
    assert math.isnan(C.slope_interval([1, 1, 1], [0, 1, 2]).estimate)
    # non-finite points are left out
    assert C.slope_interval([0, 1, 2, 3], [0, 1, float("nan"), 3]).n == 3


def _iv(lo, hi, est=None):
    est = (lo + hi) / 2 if est is None else est
    return C.Interval(est, lo, hi, 3, 2, "test")


@pytest.mark.parametrize("lo, hi, above, want", [
    (0.72, 0.80, True, "holds"),          # wholly above the threshold 0.7
    (0.55, 0.65, True, "FAILS"),          # wholly below
    (0.65, 0.75, True, "undetermined"),   # straddles
    (0.70, 0.80, True, "undetermined"),   # touches: not cleared
    (0.55, 0.65, False, "holds"),         # "below 0.7" claimed
    (0.72, 0.80, False, "FAILS"),
    (0.65, 0.75, False, "undetermined"),
])
def test_interval_verdicts(lo, hi, above, want):
    assert C.interval_verdict(_iv(lo, hi), 0.7, above=above) == want


def test_verdicts_without_an_interval():
    assert C.interval_verdict(C.mean_interval([0.99]), 0.7) == "undetermined"   # one seed
    assert C.interval_verdict(C.mean_interval([]), 0.7) == "n/a"
    c = C.make_claim("x", "s", "m", "r", "undetermined")
    assert c.holds is None and c.verdict == "undetermined"
    assert C.make_claim("x", "s", "m", "r", "n/a").verdict == "n/a"
    with pytest.raises(ValueError):
        C.make_claim("x", "s", "m", "r", "maybe")


def test_all_of_and_most_of():
    H, F, U, N = "holds", "FAILS", "undetermined", "n/a"
    assert C.all_of([H, H, N]) == H and C.all_of([H, U]) == U and C.all_of([U, F, H]) == F
    assert C.all_of([N, N]) == N
    assert C.most_of([H, H, U]) == H           # 2 of 3
    assert C.most_of([H, U, U, F]) == U        # the undetermined could still make a majority
    assert C.most_of([H, F, U, F]) == F        # 1 + 1 of 4 is no majority
    assert C.most_of([H, H, F, F]) == F        # half is not most
    assert C.most_of([N]) == N


def test_trend_claim_verdicts_follow_the_slope_interval():
    rng = np.random.default_rng(0)
    x = [g for g in np.log10([1e-5, 1e-4, 1e-3, 3e-3]) for _ in range(3)]
    rising = [0.5 + 0.05 * g + rng.normal(0, 0.01) for g in x]
    flat = [0.5 + d for _ in range(4) for d in (-0.05, 0.0, 0.05)]  # slope 0, spread around it
    c = C.trend_claim("α rises", "s", x, rising, x_name="log10 γ", y_name="α")
    assert c.verdict == "holds" and c.value == pytest.approx(np.polyfit(x, rising, 1)[0], rel=1e-9)
    assert "[" in c.measured and "12 points, 10 df" in c.measured
    assert C.trend_claim("α falls", "s", x, rising, x_name="g", y_name="α", increasing=False).verdict == "FAILS"
    assert C.trend_claim("α rises", "s", x, flat, x_name="g", y_name="α").verdict == "undetermined"
    two = C.trend_claim("α rises", "s", [0, 1], [0.1, 0.2], x_name="g", y_name="α")
    assert two.verdict == "undetermined" and "--seeds 3" in two.measured


# ----------------------------------------------------------------------------- hidden layers
def test_hidden_layers_are_the_papers():
    names = [f"layers.{i}" for i in range(6)]
    hid = fcnet.hidden_representations({"depth": 6}, names)       # fc2: 6 Linear layers
    assert [h["k"] for h in hid] == [1, 2, 3, 4, 5]               # Fig. 8's "five hidden layers"
    assert [h["forward"] for h in hid] == names[:5]                # never the output's forward side
    assert [h["backward"] for h in hid] == names[1:]               # never the input's backward side
    hid = fcnet.hidden_representations({"depth": 4}, [f"layers.{i}" for i in range(4)])  # fc1
    assert [(h["forward"], h["backward"]) for h in hid] == [("layers.0", "layers.1"), ("layers.1", "layers.2"),
                                                            ("layers.2", "layers.3")]
    # a measured subset: a side whose layer was not measured is None
    part = fcnet.hidden_representations({"depth": 4}, ["layers.1"])
    assert part == [{"k": 1, "forward": None, "backward": "layers.1"},
                    {"k": 2, "forward": "layers.1", "backward": None}]
    layers = {"layers.1": {"alpha": {"forward_RGA": 0.3, "backward_RGA": 0.9}},
              "layers.2": {"alpha_cov": {"forward_RGA": 0.1, "backward_RGA": 0.5}}}
    h2 = {"k": 2, "forward": "layers.1", "backward": "layers.2"}
    assert fcnet.hidden_alpha(layers, h2, "forward_RGA") == 0.3   # from the layer before
    assert fcnet.hidden_alpha(layers, h2, "backward_RGA") == 0.5  # from the layer after
    assert fcnet.hidden_rga(layers, h2) == pytest.approx(0.4)


# ----------------------------------------------------------------------------- synthetic runs
_D = 12


def _spectra(k_hg: float, k_gz: float):
    z = np.geomspace(1.0, 1e-2, _D)
    g = z ** k_gz
    h = g ** k_hg
    return {"lambda_H": list(h), "lambda_G": list(g), "lambda_Hb": list(h), "lambda_Gb": list(g)}, list(z)


def _entry(alphas, *, k_hg=1.0, k_gz=1.0, p=None):
    pairing, z = _spectra(k_hg, k_gz)
    return {"alpha_cov": dict(alphas), "alpha": dict(alphas), "dims": {"h_a": _D, "h_b": _D},
            "effective_rank_h": 4.0, "p": p, "q": 1.0,
            "exponents": {"pairing": pairing, "z": z, "p": {"r2": 0.1}, "q": {"r2": 0.9}}}


def _layers(depth, alpha_of, **kw):
    """``{layers.i: entry}`` with α of relation ``rel`` of layer i given by ``alpha_of(i, rel)``."""
    return {f"layers.{i}": _entry({r: alpha_of(i, r) for r in C.RELATIONS}, **kw) for i in range(depth)}


def _fc2_runs(n_seeds, alpha_of, gammas=(1e-6, 1e-4, 3e-3), **kw):
    """Synthetic fc2 runs: ``alpha_of(seed, γ, i, rel)``."""
    runs = []
    for s in range(n_seeds):
        recs = [{"weight_decay": g, "layers": _layers(6, lambda i, r, g=g: alpha_of(s, g, i, r), **kw)}
                for g in gammas]
        base = recs[1]
        rep = SimpleNamespace(layers=base["layers"], meta={"floor": 1e-6})
        runs.append((s, rep, {"base": base, "weight_decay": recs}))
    return runs


_CFG2 = dict(fc2.PROFILES["cpu"])


def _by_claim(claims, needle):
    hits = [c for c in claims if needle in c.claim]
    assert len(hits) == 1, (needle, [c.claim for c in claims])
    return hits[0]


def test_both_readings_of_the_small_gamma_claim_are_reported_separately():
    # At the smallest γ: forward RWA and backward GWA are the strongest (eq. 10's reading), the
    # backward RGA is weak; at larger γ everything is high.
    def alpha(seed, g, i, rel):
        jitter = 0.01 * ((seed * 7 + i * 3 + len(rel)) % 5 - 2)
        if g > 1e-6:
            return 0.9 + jitter
        return {"forward_RWA": 0.85, "forward_RGA": 0.4, "forward_GWA": 0.5,
                "backward_GWA": 0.8, "backward_RGA": 0.3, "backward_RWA": 0.45}[rel] + jitter
    claims = fc2.claims_over_seeds(_fc2_runs(3, alpha), _CFG2)
    six = _by_claim(claims, "(reading of §6)")
    ten = _by_claim(claims, "(reading of eq. 10")
    assert six.verdict == "FAILS" and ten.verdict == "holds"
    assert six.quote == fc2.QUOTE_READING_6 and ten.quote == fc2.QUOTE_READING_10
    assert _by_claim(claims, "all six α high at large γ").verdict == "holds"
    assert _by_claim(claims, "at least one forward and one backward").verdict == "holds"
    assert _by_claim(claims, "alignment rises with weight decay").verdict == "holds"
    # the other way round: the §6 reading holds, eq. 10's fails
    def alpha6(seed, g, i, rel):
        a = alpha(seed, g, i, rel)
        if g == 1e-6 and rel in ("backward_GWA", "backward_RGA"):
            a = 1.1 - a
        return a
    claims = fc2.claims_over_seeds(_fc2_runs(3, alpha6), _CFG2)
    assert _by_claim(claims, "(reading of §6)").verdict == "holds"
    assert _by_claim(claims, "(reading of eq. 10").verdict == "FAILS"


def test_small_gamma_claim_is_undetermined_when_seeds_disagree():
    def alpha(seed, g, i, rel):
        if rel == "forward_RWA":
            return 0.8
        if rel.startswith("forward"):
            return 0.2
        # backward: GWA and RGA swap places from seed to seed
        top = "backward_GWA" if seed % 2 == 0 else "backward_RGA"
        return 0.8 if rel == top else 0.6 if rel != "backward_RWA" else 0.1
    claims = fc2.claims_over_seeds(_fc2_runs(3, alpha), _CFG2)
    assert _by_claim(claims, "(reading of §6)").verdict == "undetermined"
    assert _by_claim(claims, "(reading of eq. 10").verdict == "undetermined"


def test_rga_significance_counts_hidden_layers_only():
    # every hidden side aligns well; the input layer's backward side and the output layer's
    # forward side (not hidden layers) are anti-aligned: they must not decide the verdict
    def alpha(seed, g, i, rel):
        if (i == 0 and rel.startswith("backward")) or (i == 5 and rel.startswith("forward")):
            return -0.3
        return 0.8 + 0.01 * seed
    claims = fc2.claims_over_seeds(_fc2_runs(3, alpha), _CFG2)
    c = _by_claim(claims, "RGA is significant")
    assert c.verdict == "holds" and "10/10" in c.measured
    sides = {k: v["layer"] for k, v in c.details.items()}
    assert sides == {**{f"h{k} fwd": f"layers.{k - 1}" for k in range(1, 6)},
                     **{f"h{k} bwd": f"layers.{k}" for k in range(1, 6)}}
    # "most": a minority of weak hidden sides does not fail the claim, a majority does
    def weak(n):
        def alpha2(seed, g, i, rel):
            if rel.startswith("forward") and i < n:
                return 0.0
            return alpha(seed, g, i, rel)
        return alpha2
    assert _by_claim(fc2.claims_over_seeds(_fc2_runs(3, weak(2)), _CFG2), "RGA is significant").verdict == "holds"
    # 5 forward sides below the baseline + 0 margin for none: 5/10 above is not most
    assert _by_claim(fc2.claims_over_seeds(_fc2_runs(3, weak(5)), _CFG2), "RGA is significant").verdict == "FAILS"


def test_exponent_claim_uses_the_sorted_eigenvalue_slopes():
    const = lambda seed, g, i, rel: 0.8  # noqa: E731
    # λ_H = λ_G², λ_G = z: every exponent (2, 2, 1) in [1/3, 3], though p (W basis) is a
    # near-flat 0.15 with R² 0.1, which the old rule counted as out of range
    c = _by_claim(fc2.claims_over_seeds(_fc2_runs(3, const, k_hg=2.0, k_gz=1.0, p=0.15), _CFG2),
                  "within [1/3, 3]")
    assert c.verdict == "holds" and c.value == 1.0
    assert c.quote == fcnet.QUOTE_EXPONENTS
    old = C.exponent_range_claim(_fc2_runs(1, const, k_hg=2.0, k_gz=1.0, p=0.15)[0][1])
    assert "p=0.15" in old.measured  # what the old rule counted as a failure
    # λ_H = λ_G⁵: H–G = 5 and H–Z = 5 outside, G–Z = 1 inside: a third in range
    c = _by_claim(fc2.claims_over_seeds(_fc2_runs(3, const, k_hg=5.0, k_gz=1.0), _CFG2), "within [1/3, 3]")
    assert c.verdict == "FAILS" and c.value == pytest.approx(1 / 3)
    # the measure itself: analysis.pairing_fit on the sorted spectra
    e = _entry({}, k_hg=2.0, k_gz=0.5)
    assert C.pairing_exponents(e, "a") == pytest.approx({"H–G": 2.0, "H–Z": 1.0, "G–Z": 0.5}, abs=1e-9)


def test_one_seed_leaves_numbers_over_seeds_undetermined():
    const = lambda seed, g, i, rel: 0.9  # noqa: E731
    claims = fc2.claims_over_seeds(_fc2_runs(1, const), _CFG2)
    c = _by_claim(claims, "all six α high at large γ")
    assert c.verdict == "undetermined" and "--seeds 3" in c.measured


# ----------------------------------------------------------------------------- the paper's words
def _fragments(quote: str):
    return [f.strip() for f in quote.split("[…]") if f.strip()]


def _quotes():
    return {"fc1." + k: v for k, v in vars(fc1).items() if k.startswith("QUOTE_")} | \
           {"fc2." + k: v for k, v in vars(fc2).items() if k.startswith("QUOTE_")} | \
           {"fcnet." + k: v for k, v in vars(fcnet).items() if k.startswith("QUOTE_")}


def test_quotes_are_verbatim_from_the_paper():
    if not PAPER.is_file():
        pytest.skip(f"the paper's text is not here ({PAPER})")
    text = " ".join(PAPER.read_text().split())
    quotes = _quotes()
    assert len(quotes) >= 10
    for name, q in quotes.items():
        for frag in _fragments(q):
            assert " ".join(frag.split()) in text, (name, frag)


# ----------------------------------------------------------------------------- several seeds, end to end
_QUICK = dict(steps=40, checkpoints=1)


def test_a_tiny_run_over_three_seeds(tmp_path):
    out = tmp_path / "fc2"
    result, claims, _, saved = run_experiment("fc2", out, Context(seed=5), profile="tiny", plots=False,
                                              overrides=dict(_QUICK, seeds=3))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["seeds"] == [5, 6, 7] and cfg["seed"] == 5 and len(cfg["seed_wall_s"]) == 3
    for s in (6, 7):
        d = out / "seeds" / f"seed-{s}"
        assert json.loads((d / "config.json").read_text())["seed"] == s
        for f in ("report.json", "extras.json", "table.txt"):
            assert (d / f).is_file(), (s, f)
    # the seeds differ (teacher, initialization, data)
    a = json.loads((out / "report.json").read_text())["layers"]["layers.1"]["alpha_cov"]["forward_RGA"]
    b = json.loads((out / "seeds/seed-6/report.json").read_text())["layers"]["layers.1"]["alpha_cov"]["forward_RGA"]
    assert a != b
    md = (out / "claims.md").read_text()
    assert "### Claims: fc2 (3 seeds: 5, 6, 7)" in md and "Student-t" in md
    assert "#### The paper's words" in md
    for q in (fc2.QUOTE_LARGE, fc2.QUOTE_READING_6, fc2.QUOTE_READING_10, fc2.QUOTE_RANK,
              fcnet.QUOTE_RGA, fcnet.QUOTE_EXPONENTS):
        assert f'"{q}"' in md, q[:40]
    # every claim shows numbers with intervals, and its verdict is one of the four words
    rows = [line for line in md.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(rows) == len(claims) == 8
    for row, c in zip(rows, claims):
        assert re.search(r"\[-?[\d.]+(e-?\d+)?, -?[\d.]+(e-?\d+)?\]", row), row
        assert c.verdict in ("holds", "FAILS", "undetermined", "n/a")
    # `crh report` recomputes the same claims from the saved seeds
    before = md
    (out / "claims.md").unlink()
    rebuild(out, plots=False)
    assert (out / "claims.md").read_text() == before
    # a seed directory that went missing is named
    import shutil
    shutil.rmtree(out / "seeds" / "seed-7")
    with pytest.raises(SavedRunError, match="lists seed 7"):
        rebuild(out, plots=False)


def test_overwriting_a_run_over_seeds_leaves_no_stale_seed(tmp_path):
    out = tmp_path / "fc1"
    run_experiment("fc1", out, Context(), profile="tiny", plots=False, overrides=dict(_QUICK, seeds=3))
    assert (out / "seeds" / "seed-2").is_dir()
    run_experiment("fc1", out, Context(), profile="tiny", plots=False, overrides=dict(_QUICK, seeds=1),
                   overwrite=True)
    assert not (out / "seeds").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert "seeds" not in cfg
    md = (out / "claims.md").read_text()
    assert "One seed (0)" in md and "undetermined" in md
    for q in (fc1.QUOTE_GAMMA, fc1.QUOTE_GRADUAL, fc1.QUOTE_BATCH):
        assert f'"{q}"' in md


def test_seeds_only_where_claims_aggregate_them(tmp_path, monkeypatch):
    # every experiment aggregates claims over seeds now; one that did not would be refused
    from crh_kernels.cli import main
    from crh_kernels.experiments import ExperimentError, resnet
    monkeypatch.delattr(resnet, "claims_over_seeds")
    with pytest.raises(ExperimentError, match="does not aggregate claims over seeds"):
        run_experiment("resnet", tmp_path / "r", Context(), profile="tiny", plots=False, overrides={"seeds": 2})
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as info:
        main(["run", "fc1", "--tiny", "--seeds", "0"])
    assert info.value.code == 2


def test_baseline_at_the_sides_own_rank():
    from crh_kernels.analysis import effective_rank, random_baseline
    rng = np.random.default_rng(1)
    a = rng.normal(size=(9, 4))
    m = a @ a.T
    lam = list(np.linalg.eigvalsh(m))[::-1]
    assert C.spectrum_effective_rank(lam) == pytest.approx(effective_rank(m), rel=1e-9)
    assert C.spectrum_effective_rank([0.0, 0.0]) is None
    e = _entry({})                                   # H, G of rank ≈ effective rank of the spectra
    b = C.side_baseline(e, "a")
    pairing = e["exponents"]["pairing"]
    want = max(effective_rank(np.diag(pairing["lambda_H"])), effective_rank(np.diag(pairing["lambda_G"])))
    assert b["rank"] == round(want) and b["dim"] == _D
    assert b["baseline"] == pytest.approx(random_baseline(_D, round(want), trials=10))
    # without spectra: the old rank D/5, and it says so
    bare = {"dims": {"h_a": 100, "h_b": 100}}
    assert C.side_baseline(bare, "b")["rank"] == 20 and "D/5" in C.side_baseline(bare, "b")["how"]
    assert math.isnan(C.side_baseline({"dims": {"h_a": 1}}, "a")["baseline"])


def test_spectra_are_those_alpha_uses_even_when_exponents_are_raw():
    e = _entry({}, k_hg=2.0, k_gz=1.0)
    raw = dict(e, exponent_moments="raw",
               exponents=dict(e["exponents"], pairing={k: [1.0] * _D for k in e["exponents"]["pairing"]}))
    assert C.side_spectra(raw, "a")["H"] is None                     # raw pairing: not the paper's
    kind = {"H_a": e["exponents"]["pairing"]["lambda_H"], "G_a": e["exponents"]["pairing"]["lambda_G"]}
    raw["spectra"] = kind                                            # the kind matrices' spectra
    assert C.side_spectra(raw, "a")["H"] == kind["H_a"]
    assert C.pairing_exponents(raw, "a")["H–G"] == pytest.approx(2.0, abs=1e-9)


def test_the_layer_verdicts_baseline_is_used_where_the_report_has_one():
    e = _entry({})
    e["verdict"] = {"alpha": {"relations": {"backward_RGA": {"baseline": 0.123, "ranks": [5, 2]}}}}
    b = C.side_baseline(e, "a", "backward_RGA")
    assert b["baseline"] == 0.123 and b["rank"] == [5, 2] and "verdict" in b["how"]
    assert C.side_baseline(e, "a", "forward_RGA")["baseline"] != 0.123   # none for it: own rule
    assert C.side_baseline(e, "a")["baseline"] == C.side_baseline(_entry({}), "a")["baseline"]
