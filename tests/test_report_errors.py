"""Standard errors in the report, the verdicts, the α series and the figures (issue 16).

References: the six α of every leave-one-out set of steps are recomputed here from the rows
themselves (plain forward hooks, numpy float64 covariances and numpy's corrcoef: no code of
crh_kernels), and the jackknife formula is written out here; the other numbers (p, q, slopes,
effective ranks, α on second moments) are checked against reports of fresh collectors
without blocks fed only the steps of the other blocks (the leave-one-out view must be
analysed exactly as a layer with those rows).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crh_kernels.analysis import (RELATIONS, alpha_reading, exponent_reading, fit_exponents,
                                  layer_verdict, multiplier)
from crh_kernels.collect import Collector
from crh_kernels.report import Report, check_report_dict

from ._collect_ref import Naive, batches, mlp, ref_stats
from .test_verdicts import _power_law_layer

pytestmark = pytest.mark.usefixtures("one_thread")

K = 4
STEPS = 8
F64 = torch.float64
LAYERS = ("0", "2", "4")
NUMBERS = ("p", "q", "forward_slope", "pairing_slope", "effective_rank_h", "effective_rank_g")


def ref_jackknife(full, loo):
    """se, bias by the textbook formulas (Efron & Stein; Tukey)."""
    k = len(loo)
    mean = sum(loo) / k
    return math.sqrt((k - 1) / k * sum((v - mean) ** 2 for v in loo)), (k - 1) * (mean - full)


def np_alpha(a, b):
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def _run(model, data, **kw):
    col = Collector(model, state_dtype=F64, **kw)
    with col:
        for x, t in data:
            model.zero_grad()
            F.mse_loss(model(x), t).backward()
            col.step()
    return col


@pytest.fixture(scope="module")
def blocked():
    """An MLP measured for 8 steps with blocks=4 (no training: the weights stay, so each
    leave-one-out set of steps can be measured again from scratch), and the plain rows."""
    model = mlp()
    data = batches(STEPS)
    naive = Naive(model, LAYERS)
    col = _run(model, data, blocks=K)
    naive.remove()
    return model, data, naive, col, col.report()


def _rows(model, naive, name, steps):
    """h_a, h_b, g_a, g_b rows of the given steps (numpy float64); the first layer's input
    has no gradient, so its g_a is g_b·W, as the collector computes it."""
    w = model.get_submodule(name).weight.detach().double().numpy()
    out = {}
    for what in ("h_a", "h_b", "g_b"):
        out[what] = np.concatenate([naive.rows(name, what)[32 * s:32 * (s + 1)] for s in steps])
    out["g_a"] = out["g_b"] @ w
    return out, w


def _ref_alphas(model, naive, name, steps):
    rows, w = _rows(model, naive, name, steps)
    c = {k: ref_stats(v)[2] for k, v in rows.items()}
    za, zb = w.T @ w, w @ w.T
    return {"forward_RGA": np_alpha(c["h_b"], c["g_b"]), "forward_RWA": np_alpha(c["h_b"], zb),
            "forward_GWA": np_alpha(c["g_b"], zb), "backward_RGA": np_alpha(c["h_a"], c["g_a"]),
            "backward_RWA": np_alpha(c["h_a"], za), "backward_GWA": np_alpha(c["g_a"], za)}


def test_alpha_standard_errors_equal_a_float64_jackknife_of_the_rows(blocked):
    model, _, naive, col, rep = blocked
    m = multiplier(K)
    for name in LAYERS:
        se = rep.layers[name]["se"]
        assert se["k"] == K
        full = _ref_alphas(model, naive, name, range(STEPS))
        loo = [_ref_alphas(model, naive, name, [s for s in range(STEPS) if s % K != i])
               for i in range(K)]
        for rel in RELATIONS:
            want, bias = ref_jackknife(full[rel], [d[rel] for d in loo])
            assert rep.layers[name]["alpha_cov"][rel] == pytest.approx(full[rel], abs=1e-6)
            assert se["alpha_cov"][rel] == pytest.approx(want, rel=1e-4, abs=1e-7), (name, rel)
            assert se["bias"]["alpha_cov"][rel] == pytest.approx(bias, rel=1e-3, abs=1e-6)
            lo, hi = se["interval"]["alpha_cov"][rel]
            centre = full[rel] - bias
            assert (lo, hi) == pytest.approx((centre - m * want, centre + m * want), abs=1e-6)


@pytest.mark.parametrize("raw", [False, True], ids=["cov", "raw"])
def test_every_standard_error_is_the_jackknife_of_reports_on_the_other_blocks(raw):
    model = mlp()
    data = batches(STEPS)
    rep = _run(model, data, blocks=K, raw_moments=raw).report()
    loo = [_run(model, [d for s, d in enumerate(data) if s % K != i], raw_moments=raw).report()
           for i in range(K)]
    for name in LAYERS:
        e = rep.layers[name]
        if raw:
            assert e["exponent_moments"] == "raw"
        checked = 0
        for key, get in ([(f"alpha_second.{r}", lambda x, r=r: x["alpha_second"][r]) for r in RELATIONS]
                         + [(k, lambda x, k=k: x[k]) for k in NUMBERS]):
            full, vals = get(e), [get(r.layers[name]) for r in loo]
            got = e["se"][key.split(".")[0]]
            got = got[key.split(".")[1]] if "." in key else got
            if full is None or None in vals:
                assert got is None, key
                continue
            want, _ = ref_jackknife(full, vals)
            assert got == pytest.approx(want, rel=1e-4, abs=1e-8), (name, key)
            checked += 1
        assert checked >= 10, name


def test_the_json_round_trip_keeps_the_standard_errors_and_meta(blocked, tmp_path):
    *_, rep = blocked
    jk = rep.meta["jackknife"]
    assert jk["k"] == K and jk["by"] == "step" and jk["method"] == "delete-one-block jackknife"
    assert jk["z"] == pytest.approx(3.182446, abs=1e-5)      # t_3 at 0.975
    back = Report.from_json(rep.to_json(tmp_path / "r.json"))
    assert back.layers == rep.layers and back.meta["jackknife"] == jk
    for e in back.layers.values():
        assert set(e["se"]) >= {"alpha_cov", "alpha_second", *NUMBERS, "k", "bias", "interval",
                                "reasons"}
        assert set(e["se"]["alpha_cov"]) == set(RELATIONS)


def _mutated(rep, tmp_path, fn):
    d = json.loads(json.dumps(rep.to_dict()))
    fn(d)
    p = tmp_path / "m.json"
    p.write_text(json.dumps(d))
    return p


@pytest.mark.parametrize("fn, needle", [
    (lambda d: d["layers"]["2"]["se"].update(k=1), 'layers["2"].se.k must be an integer ≥ 2'),
    (lambda d: d["layers"]["2"]["se"].update(p="x"), 'layers["2"].se.p must be a finite number'),
    (lambda d: d["layers"]["2"]["se"]["alpha_cov"].update(forward_RGA=[1]),
     'layers["2"].se.alpha_cov["forward_RGA"] must be a finite number'),
    (lambda d: d["layers"]["2"]["se"]["interval"].update(q=[0.5, 0.1]),
     'layers["2"].se.interval["q"] must be null or [lo, hi] with lo ≤ hi'),
    (lambda d: d["layers"]["2"]["se"].update(reasons={"p": 3}), 'layers["2"].se.reasons["p"] must be a string'),
    (lambda d: d["layers"]["2"].update(se=[]), 'layers["2"].se must be an object'),
    (lambda d: d["meta"]["jackknife"].update(z="big"), "meta.jackknife.z must be a finite number"),
    (lambda d: d["layers"]["2"]["verdict"]["alpha"]["relations"]["forward_RGA"].update(se="x"),
     'relations["forward_RGA"].se must be a finite number'),
])
def test_malformed_standard_errors_are_refused_naming_the_field(blocked, tmp_path, fn, needle):
    *_, rep = blocked
    with pytest.raises(ValueError) as info:
        Report.from_json(_mutated(rep, tmp_path, fn))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_without_blocks_there_are_no_standard_errors():
    model = mlp()
    rep = _run(model, batches(4)).report()
    assert rep.meta["jackknife"] is None
    assert all(e["se"] is None for e in rep.layers.values())
    assert "±" not in rep.table()
    v = rep.layers["2"]["verdict"]["alpha"]
    assert "undetermined" not in v and all("se" not in r for r in v["relations"].values())
    check_report_dict(rep.to_dict())


def test_empty_blocks_give_no_standard_error_and_say_why():
    """Fewer collected steps than blocks: deleting an empty block changes nothing, so a
    jackknife over the K blocks would understate the error; every se is None with the reason,
    in the report and in the α series."""
    model = mlp()
    col = _run(model, batches(K - 1), blocks=K, alpha_every=1)
    assert any(0 in c for c in col.layers["2"].block_counts().values())
    rep = col.report()
    se = rep.layers["2"]["se"]
    assert se["k"] == K and all(v is None for v in se["alpha_cov"].values())
    assert se["p"] is None and "only 3 of 4 blocks hold rows" in se["reasons"]["alpha_cov.forward_RGA"]
    v = rep.layers["2"]["verdict"]["alpha"]
    assert all(r.get("se") is None for r in v["relations"].values())
    assert all(x is None for xs in col.alpha_series.to_dict()["se"]["2"].values() for x in xs)
    check_report_dict(rep.to_dict())
    # one more step fills the last block: the standard errors are back
    full = _run(model, batches(K), blocks=K).report().layers["2"]["se"]
    assert all(v is not None and v > 0 for v in full["alpha_cov"].values())


def test_the_table_shows_value_plus_minus_se_and_the_legend_says_how(blocked):
    *_, rep = blocked
    text = rep.table()
    row = next(line for line in text.splitlines() if line.startswith("2 "))
    e = rep.layers["2"]
    a, s = e["alpha_cov"]["backward_RGA"], e["se"]["alpha_cov"]["backward_RGA"]
    d = 2 if s >= 0.01 else 3
    assert f"{a:.{d}f}±{s:.{d}f}" in row
    assert "± : delete-one-block jackknife standard error over K=4 blocks (by step)" in text
    assert "3.18·se" in text
    legend = rep.legend()
    assert "whole 95 % interval clears the bar" in " ".join(legend.split())


def test_the_alpha_figure_draws_the_intervals(blocked, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from crh_kernels import plots
    *_, rep = blocked
    figs = {}
    real = plots.save_figure

    def keep(fig, path):
        figs[str(path).rsplit("/", 1)[-1]] = fig
        return real(fig, path)

    monkeypatch.setattr(plots, "save_figure", keep)
    rep.plot(tmp_path, heatmaps=False)
    fig = figs["alpha.png"]
    assert "bars: 95 % intervals" in fig._suptitle.get_text()
    ax = fig.axes[0]
    segs = [s for c in ax.collections if hasattr(c, "get_segments") for s in c.get_segments()]
    want = {tuple(np.round(rep.layers[n]["se"]["interval"]["alpha_cov"]["forward_RGA"], 9))
            for n in LAYERS}
    vertical = {tuple(np.round(sorted([s[0][1], s[1][1]]), 9)) for s in segs
                if len(s) == 2 and s[0][0] == s[1][0]}
    assert want <= vertical


# ----------------------------------------------------------------------------- the verdict
def _iv(lo, hi, se=0.01):
    return {"lo": lo, "hi": hi, "se": se, "reason": ""}


def test_alpha_reading_by_interval_holds_straddles_or_not():
    alphas = {r: 0.9 for r in RELATIONS}
    base = {r: {"baseline": 0.1, "ranks": [3, 3]} for r in RELATIONS}   # bar = max(0.7, 0.6)
    ivs = {r: _iv(0.85, 0.95) for r in RELATIONS}
    ivs["forward_RGA"] = _iv(0.65, 0.95)                  # straddles 0.7
    ivs["forward_RWA"] = {"lo": None, "hi": None, "se": None, "reason": "undefined without block 2"}
    ivs["backward_GWA"] = _iv(0.5, 0.6)                    # wholly below: not holding
    al = alpha_reading(alphas, base, intervals=ivs)
    rel = al["relations"]
    assert rel["forward_RGA"]["status"] == "undetermined"
    assert "[0.650, 0.950] straddles the bar 0.700" in rel["forward_RGA"]["why"]
    assert rel["forward_RWA"]["status"] == "undetermined" and "block 2" in rel["forward_RWA"]["why"]
    assert rel["backward_GWA"]["status"] == "above baseline"
    assert al["holds"] == ["forward_GWA", "backward_RGA", "backward_RWA"]
    assert al["undetermined"] == ["forward_RGA", "forward_RWA"]
    # fRGA, fRWA could each hold or not: backward-only rows differ from the full "forward CRH"
    assert al["name"] == "undetermined" and len(al["candidates"]) > 1
    assert rel["backward_RGA"]["interval"] == [0.85, 0.95] and rel["backward_RGA"]["se"] == 0.01
    # the point estimate alone would have called every relation but bGWA's (α = 0.9 ≥ 0.7)
    assert alpha_reading(alphas, base)["holds"] == list(RELATIONS)


def test_an_undetermined_relation_that_cannot_change_the_row_leaves_the_name():
    alphas = {r: 0.9 for r in RELATIONS}
    ivs = {r: _iv(0.1, 0.2) for r in RELATIONS}           # all wholly below: none hold
    ivs["backward_RGA"] = _iv(0.8, 0.95)                  # holds
    al = alpha_reading(alphas, None, intervals=ivs)
    assert al["name"] == "partial" and al["candidates"] == ["partial"]
    ivs["backward_RWA"] = _iv(0.6, 0.8)                   # undetermined: partial either way
    al = alpha_reading(alphas, None, intervals=ivs)
    assert al["undetermined"] == ["backward_RWA"] and al["name"] == "partial"
    v = layer_verdict(alphas, dims={"a": 8, "b": 8}, intervals={"alpha": ivs})
    assert v.verdict == "partial" and v.label == "partial: bRGA ?bRWA"
    assert "undetermined (the interval straddles the bar, or has none): bRWA" in v.explanation
    ivs["forward_RGA"] = _iv(0.6, 0.8)       # with fRGA, bRGA would make phase 1: undetermined
    al = alpha_reading(alphas, None, intervals=ivs)
    assert al["name"] == "undetermined" and al["candidates"] == ["1", "partial"]


def test_an_undetermined_alpha_name_makes_no_agreement():
    alphas = {r: 0.9 for r in RELATIONS}
    ivs = {r: _iv(0.6, 0.95) for r in RELATIONS}
    v = layer_verdict(alphas, dims={"a": 8, "b": 8}, intervals={"alpha": ivs})
    assert v.verdict == "undetermined" and v.agreement is None and v.agree_text == "?"
    assert v.label.startswith("undet: ") and "CRH" in v.label
    assert "could be" in v.explanation and "the α reading names no row" in v.explanation


def _line_ivs(fit, half):
    """Intervals of width ±half around each line's signed distance at the fit's (p, q)."""
    from crh_kernels.analysis import LINES
    p, q = fit.p.slope, fit.q.slope
    out = {}
    for r, ln in LINES.items():
        s = (ln.a * p + ln.b * q - ln.c) / math.hypot(ln.a, ln.b)
        out[r] = _iv(s - half, s + half, half / 2)
    return {"p": _iv(p - half, p + half), "q": _iv(q - half, q + half), "lines": out}


def test_exponent_reading_names_the_phase_only_when_the_intervals_agree():
    W, Ha, Ga, Hb, Gb = _power_law_layer(0.0, 0.0, 12, 3)        # phase 4 at (0, 0)
    fit = fit_exponents(W, Ha, Ga, Hb, Gb)
    assert exponent_reading(fit)["phase"] == "4"
    tight = exponent_reading(fit, intervals=_line_ivs(fit, 0.05))
    assert tight["phase"] == "4" and tight["gates"]["interval"]["passed"]
    assert tight["lines"]["backward_RGA"]["status"] == "holds"
    assert tight["lines"]["forward_RGA"]["status"] == "out"
    assert set(tight["holds"]) == {"backward_RGA", "forward_RWA"}
    assert tight["p_interval"] == pytest.approx([fit.p.slope - 0.05, fit.p.slope + 0.05])
    # wide enough to reach the q = 1 line (distance 1) and both lines through (0, 0) might not
    # hold: the phase could be 4 or none -> undetermined through the interval gate
    wide = exponent_reading(fit, intervals=_line_ivs(fit, 0.3))
    assert wide["phase"] == "undetermined" and wide["failed"] == ["interval"]
    assert "possible phases" in wide["reason"] and "4" in wide["reason"]
    assert not wide["gates"]["interval"]["passed"]
    # a missing interval of a line is undetermined, and names why
    ivs = _line_ivs(fit, 0.05)
    ivs["lines"]["backward_RGA"] = {"lo": None, "hi": None, "se": None, "reason": "undefined without block 0"}
    r = exponent_reading(fit, intervals=ivs)
    assert r["lines"]["backward_RGA"]["status"] == "undetermined"
    assert "block 0" in r["lines"]["backward_RGA"]["why"] and r["phase"] == "undetermined"


def test_the_collector_verdict_reads_its_intervals(blocked):
    *_, rep = blocked
    for name in LAYERS:
        v = rep.layers[name]["verdict"]
        for rel, r in v["alpha"]["relations"].items():
            lo_hi = rep.layers[name]["se"]["interval"]["alpha_cov"][rel]
            assert r["interval"] == lo_hi
            if r["status"] == "holds":
                assert lo_hi[0] >= r["required"]
            elif r["status"] == "undetermined":
                assert lo_hi is None or lo_hi[0] < r["required"] <= lo_hi[1]
            elif r["alpha"] is not None:
                assert lo_hi[1] < r["required"]
        assert "for the whole 95 % interval" in v["alpha"]["rule"]


# ----------------------------------------------------------------------------- α series
def test_the_series_records_the_standard_error_of_each_point(tmp_path, monkeypatch):
    model = mlp()
    data = batches(STEPS)
    naive = Naive(model, LAYERS)
    col = _run(model, data, blocks=K, alpha_every=4)
    naive.remove()
    s = col.alpha_series
    assert s.steps == [4, 8] and s.k == K
    for name in LAYERS:
        for j, step in enumerate(s.steps):
            seen = range(step)
            full = _ref_alphas(model, naive, name, seen)
            loo = [_ref_alphas(model, naive, name, [t for t in seen if t % K != i]) for i in range(K)]
            for rel in RELATIONS:
                want, _ = ref_jackknife(full[rel], [d[rel] for d in loo])
                assert s.se[name][rel][j] == pytest.approx(want, rel=1e-4, abs=1e-7)
    other = Collector(model, blocks=K, alpha_every=4, state_dtype=F64)
    other.load_state_dict(col.state_dict())                 # the checkpoint carries the se
    assert other.alpha_series.se == s.se and other.alpha_series.k == K
    want_se = json.loads(json.dumps(s.se))
    col.alpha_series.clear()
    assert col.alpha_series.se is None and col.alpha_series.to_dict().get("se") is None
    col.load_state_dict(other.state_dict())
    rep = col.report()
    back = Report.from_json(rep.to_json(tmp_path / "r.json"))
    assert back.alpha_series["se"] == rep.alpha_series["se"] and back.alpha_series["k"] == K
    from crh_kernels.collect.series import AlphaSeries
    assert AlphaSeries.from_dict(rep.alpha_series).se == want_se == col.alpha_series.se
    d = json.loads(json.dumps(rep.alpha_series))
    d["se"]["2"]["forward_RGA"] = [0.1]
    from crh_kernels.report import check_alpha_series
    with pytest.raises(ValueError, match=r'alpha_series\.se\["2"\]\.forward_RGA must be a list of 2'):
        check_alpha_series(d)
    pytest.importorskip("matplotlib")
    from crh_kernels import plots
    figs = {}
    real = plots.save_figure
    monkeypatch.setattr(plots, "save_figure",
                        lambda fig, path: figs.setdefault(str(path).rsplit("/", 1)[-1], fig) and real(fig, path))
    rep.plot(tmp_path / "f", heatmaps=False)
    fig = figs["alpha_series.png"]
    assert "error bars: α ± 3.18·se" in fig._suptitle.get_text()
    assert any(type(c).__name__ == "LineCollection" for c in fig.axes[1].collections)
