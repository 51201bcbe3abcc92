"""Interval claims on hand-made reports (issue 13 item 3, issue 16): one seed with and without the
report's jackknife standard errors, several seeds; every verdict reached (holds, FAILS,
undetermined, n/a); malformed standard errors are ignored, never trusted; and resnet,
transformer, minilm take --seeds like fc1 and fc2."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

from crh_kernels.experiments import Context, MissingData, get, rebuild, run_experiment
from crh_kernels.experiments import claims as C

RELS = ("forward_RGA", "forward_RWA", "forward_GWA", "backward_RGA", "backward_RWA", "backward_GWA")


def _entry(alpha, se=None, baseline=0.1, dims=(20, 10), bias=None):
    """A report entry with the six α given (dict or one value for all), its own baseline fixed
    through the layer verdict, and optionally ``entry["se"]`` as IFACE16 writes it (with
    ``bias``: its jackknife bias estimates)."""
    if not isinstance(alpha, dict):
        alpha = {r: alpha for r in RELS}
    e = {"alpha_cov": dict(alpha), "alpha_second": dict(alpha), "dims": {"h_a": dims[0], "h_b": dims[1]},
         "verdict": {"alpha": {"relations": {r: {"baseline": baseline, "ranks": [3, 3]} for r in RELS}}}}
    if se is not None:
        if not isinstance(se, dict):
            se = {r: se for r in RELS}
        e["se"] = {"alpha_cov": dict(se), "alpha_second": dict(se), "p": None, "q": None, "k": 10}
        if bias is not None:
            if not isinstance(bias, dict):
                bias = {r: bias for r in RELS}
            e["se"]["bias"] = {"alpha_cov": dict(bias), "alpha_second": dict(bias)}
    return e


def _rep(layers, z=None):
    meta = {} if z is None else {"jackknife": {"k": 10, "by": "step", "method": "delete-one-block jackknife",
                                               "z": z}}
    return SimpleNamespace(layers=layers, meta=meta)


def _runs(*reps):
    return [(i, r, {}) for i, r in enumerate(reps)]


def _sig(runs, layers=("l1",), rels=("forward_RGA",)):
    return C.significance_claim(runs, [(f"{n} {r}", n, r) for n in layers for r in rels],
                                claim="x", source="y")


# ----------------------------------------------------------------------------- reading entry["se"]
def test_entry_se_reads_the_interface_and_ignores_anything_else():
    e = _entry(0.5, se=0.05)
    assert C.alpha_se(e, "forward_RGA") == 0.05
    assert C.alpha_se(e, "backward_GWA", kind="second") == 0.05
    assert C.entry_se(e, "p") is None                    # a quantity without one
    assert C.alpha_se(_entry(0.5), "forward_RGA") is None  # a report without se (no blocks, older)
    assert C.alpha_se({"se": None}, "forward_RGA") is None
    assert C.alpha_se(None, "forward_RGA") is None
    for bad in ("0.05", -0.01, float("nan"), float("inf"), True, [0.05], {"x": 1}):
        assert C.alpha_se(_entry(0.5, se=bad), "forward_RGA") is None, bad
    assert C.alpha_se({"se": {"alpha_cov": "oops"}}, "forward_RGA") is None
    assert C.alpha_se({"se": {"alpha_cov": {}}}, "forward_RGA") is None
    assert C.alpha_se(_entry(0.5, se=0), "forward_RGA") == 0.0  # zero is a value


def test_jackknife_z_from_the_report_meta_or_the_default():
    assert C.jackknife_z(_rep({})) == C.JACKKNIFE_Z == 1.96
    assert C.jackknife_z(_rep({}, z=2.5)) == 2.5
    for bad in ("2", None, -1, float("nan"), True):
        assert C.jackknife_z(SimpleNamespace(layers={}, meta={"jackknife": {"z": bad}})) == 1.96, bad
    assert C.jackknife_z(SimpleNamespace(layers={}, meta={"jackknife": "x"})) == 1.96


def test_se_bound_is_the_triangle_inequality():
    assert C.se_bound([0.5, 0.5], [0.1, 0.3]) == pytest.approx(0.2)
    assert C.se_bound([1.0, -1.0], [0.1, 0.3]) == pytest.approx(0.4)
    assert C.se_bound([0.5, 0.5], [0.1, None]) is None
    # it bounds the sd of a mean of perfectly correlated and of independent variables alike
    import numpy as np
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200_000)
    for y in (x * 3.0, rng.standard_normal(200_000) * 3.0, -x * 3.0):
        sd = np.std(0.5 * x + 0.5 * y)
        assert sd <= C.se_bound([0.5, 0.5], [np.std(x), np.std(y)]) * (1 + 1e-2)


# ----------------------------------------------------------------------------- one seed
def test_one_seed_without_se_is_undetermined_and_says_how_to_get_an_interval():
    c = _sig(_runs(_rep({"l1": _entry(0.5)})))
    assert c.verdict == "undetermined"
    assert "--seeds 3" in c.measured and "blocks" in c.measured


def test_one_seed_with_se_holds_fails_or_stays_undetermined_by_its_interval():
    # margin 0.4 ± 1.96·0.05 = [0.302, 0.498] > 0
    c = _sig(_runs(_rep({"l1": _entry(0.5, se=0.05)})))
    assert c.verdict == "holds"
    iv = c.details["l1 forward_RGA"]["margin"]
    assert iv["lo"] == pytest.approx(0.4 - 1.96 * 0.05) and iv["hi"] == pytest.approx(0.4 + 1.96 * 0.05)
    # margin −0.05 ± 0.0196 < 0
    assert _sig(_runs(_rep({"l1": _entry(0.05, se=0.01)}))).verdict == "FAILS"
    # margin 0.05 ± 0.098 straddles 0
    assert _sig(_runs(_rep({"l1": _entry(0.15, se=0.05)}))).verdict == "undetermined"
    # the report's own z: 0.4 ± 9·0.05 straddles 0
    assert _sig(_runs(_rep({"l1": _entry(0.5, se=0.05)}, z=9.0))).verdict == "undetermined"
    # a malformed se is not trusted: no interval
    assert _sig(_runs(_rep({"l1": _entry(0.5, se="0.05")}))).verdict == "undetermined"
    # a NaN α is not evaluated
    assert _sig(_runs(_rep({"l1": _entry(float("nan"), se=0.05)}))).verdict == "n/a"


def test_one_seed_interval_is_centred_on_the_bias_corrected_alpha():
    # issue 16: the report's interval is (α − bias) ± z·se; α 0.5, bias 0.3, baseline 0.1, se 0.05:
    # margin 0.1 ± 0.098 = [0.002, 0.198]
    c = _sig(_runs(_rep({"l1": _entry(0.5, se=0.05, bias=0.3)})))
    iv = c.details["l1 forward_RGA"]["margin"]
    assert iv["estimate"] == pytest.approx(0.1) and iv["lo"] == pytest.approx(0.1 - 0.098)
    assert c.verdict == "holds"
    # a bias that moves the interval across the baseline changes the verdict
    assert _sig(_runs(_rep({"l1": _entry(0.5, se=0.05, bias=0.35)}))).verdict == "undetermined"
    assert _sig(_runs(_rep({"l1": _entry(0.5, se=0.05, bias=0.5)}))).verdict == "FAILS"
    # a negative bias raises it; a malformed one counts as none
    assert _sig(_runs(_rep({"l1": _entry(0.15, se=0.02, bias=-0.1)}))).verdict == "holds"
    for bad in ("0.3", float("nan"), True, None, [0.3]):
        e = _entry(0.5, se=0.05, bias={r: bad for r in RELS})
        assert C.alpha_bias(e, "forward_RGA") == 0.0, bad
        assert _sig(_runs(_rep({"l1": e}))).details["l1 forward_RGA"]["margin"]["estimate"] == pytest.approx(0.4)
    assert C.alpha_bias(_entry(0.5), "forward_RGA") == 0.0  # no se at all
    # the RGA of a layer: the mean of the two biases
    a = {r: 0.5 for r in RELS}
    e = _entry(a, se=0.01, bias={r: 0.0 for r in RELS} | {"forward_RGA": 0.1, "backward_RGA": 0.3})
    v, se, b = C.rga_of(_rep({"l": e}), "l")
    assert (v, se, b) == (pytest.approx(0.5), pytest.approx(0.01), pytest.approx(0.2))
    lv = C.level_claim(_runs(_rep({"l": e})), ["l"], 0.2, claim="x", source="y")
    assert lv.details["l"]["estimate"] == pytest.approx(0.3) and lv.verdict == "holds"


def test_all_and_most_modes():
    rep = _rep({"l1": _entry(0.5, se=0.05), "l2": _entry(0.05, se=0.01), "l3": _entry(0.6, se=0.01)})
    items = [(n, n, "forward_RGA") for n in ("l1", "l2", "l3")]
    assert C.significance_claim(_runs(rep), items, claim="x", source="y").verdict == "FAILS"
    c = C.significance_claim(_runs(rep), items, claim="x", source="y", mode="most")
    assert c.verdict == "holds" and c.value == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        C.significance_claim(_runs(rep), items, claim="x", source="y", mode="some")


def test_level_and_difference_claims_use_the_bound_on_the_se_of_a_mean():
    a = {r: 0.9 for r in RELS} | {"forward_RGA": 0.8, "backward_RGA": 0.9}
    rep = _rep({"fc": _entry(a, se={"forward_RGA": 0.02, "backward_RGA": 0.04}), "conv": _entry(0.3, se=0.02)})
    c = C.level_claim(_runs(rep), ["fc"], 0.7, claim="x", source="y")
    iv = c.details["fc"]
    assert iv["estimate"] == pytest.approx(0.85)
    assert iv["hi"] - iv["estimate"] == pytest.approx(1.96 * 0.03)  # se bound (0.02 + 0.04) / 2
    assert c.verdict == "holds"
    assert C.level_claim(_runs(rep), ["fc"], 0.84, claim="x", source="y").verdict == "undetermined"
    assert C.level_claim(_runs(rep), ["conv"], 0.7, claim="x", source="y").verdict == "FAILS"
    d = C.difference_claim(_runs(rep), ["fc"], ["conv"], claim="x", source="y")
    # 0.85 − 0.3 ± 1.96·(0.03 + 0.02)
    assert d.details["difference"]["lo"] == pytest.approx(0.55 - 1.96 * 0.05)
    assert d.verdict == "holds"
    assert C.difference_claim(_runs(rep), ["conv"], ["fc"], claim="x", source="y").verdict == "FAILS"
    # without se: undetermined with one seed
    plain = _rep({"fc": _entry(0.85), "conv": _entry(0.3)})
    assert C.difference_claim(_runs(plain), ["fc"], ["conv"], claim="x", source="y").verdict == "undetermined"


# ----------------------------------------------------------------------------- several seeds
def test_several_seeds_use_the_t_interval_over_seeds_not_the_se():
    # margins 0.30, 0.40, 0.50: mean 0.4, s = 0.1, t_{0.975,2} = 4.303 → ± 0.2484 (printed table)
    reps = [_rep({"l1": _entry(a, se=1e-6)}) for a in (0.4, 0.5, 0.6)]
    c = _sig(_runs(*reps))
    iv = c.details["l1 forward_RGA"]["margin"]
    assert iv["estimate"] == pytest.approx(0.4)
    assert iv["hi"] - iv["estimate"] == pytest.approx(4.303 * 0.1 / math.sqrt(3), abs=1e-3)
    assert c.verdict == "holds"
    reps = [_rep({"l1": _entry(a, se=1e-6)}) for a in (0.0, 0.1, 0.3)]  # margins −0.1, 0, 0.2
    assert _sig(_runs(*reps)).verdict == "undetermined"  # a tiny se does not rescue a wide spread
    reps = [_rep({"l1": _entry(a)}) for a in (0.01, 0.02, 0.03)]
    assert _sig(_runs(*reps)).verdict == "FAILS"


def test_seed_interval_and_within_verdict():
    iv = C.seed_interval([0.5], [0.1], z=2.0, bounds=(0.0, 0.6))
    assert (iv.lo, iv.hi, iv.n) == (pytest.approx(0.3), 0.6, 1)
    assert not C.seed_interval([0.5], [None]).defined
    assert not C.seed_interval([0.5]).defined
    assert math.isnan(C.seed_interval([float("nan")], [0.1]).estimate)
    three = C.seed_interval([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert three.lo == pytest.approx(2.0 - 4.303 / math.sqrt(3), abs=1e-3)
    mk = lambda e, lo, hi: C.Interval(e, lo, hi, 3, 2, "m")  # noqa: E731
    assert C.within_verdict(mk(1.0, 0.8, 1.2), 0.65, 1.35) == "holds"
    assert C.within_verdict(mk(2.0, 1.8, 2.2), 0.65, 1.35) == "FAILS"
    assert C.within_verdict(mk(1.3, 1.2, 1.4), 0.65, 1.35) == "undetermined"
    assert C.within_verdict(C.Interval(1.0, float("nan"), float("nan"), 1, 0, "m"), 0.65, 1.35) == "undetermined"
    assert C.within_verdict(C.Interval(float("nan"), 0, 1, 1, 0, "m"), 0.65, 1.35) == "n/a"


def test_r_g_and_exponent_claims_over_seeds():
    reps = [SimpleNamespace(layers={"a": {"r_g": v, "r_h": 0.3}, "b": {"r_g": v, "r_h": 0.2}}, meta={})
            for v in (0.001, 0.002, 0.003)]
    assert C.r_g_claim(_runs(*reps), lambda r: list(r.layers)).verdict == "holds"
    reps = [SimpleNamespace(layers={"a": {"r_g": v, "r_h": 0.3}}, meta={}) for v in (0.3, 0.4, 0.5)]
    assert C.r_g_claim(_runs(*reps), lambda r: list(r.layers)).verdict == "FAILS"
    assert C.r_g_claim(_runs(reps[0]), lambda r: list(r.layers)).verdict == "undetermined"
    # exponents: sorted spectra with λ_H = λ_G² (slope 2, in range) for every seed
    g = [10.0 / (i + 1) for i in range(8)]
    e = {"spectra": {"H_a": [v ** 2 for v in g], "G_a": g}, "exponents": {}, "dims": {"h_a": 8}}
    reps = [SimpleNamespace(layers={"l": dict(e)}, meta={}) for _ in range(3)]
    c = C.pairing_exponent_claim(_runs(*reps), [("l", "l", "a")], source="s")
    assert c.details["counts"] == [(1, 1, 1)] * 3 and c.verdict == "holds"
    e5 = {"spectra": {"H_a": [v ** 5 for v in g], "G_a": g}, "exponents": {}, "dims": {"h_a": 8}}
    reps = [SimpleNamespace(layers={"l": dict(e5)}, meta={}) for _ in range(3)]
    assert C.pairing_exponent_claim(_runs(*reps), [("l", "l", "a")], source="s").verdict == "FAILS"


# ----------------------------------------------------------------------------- --seeds for every experiment
@pytest.mark.parametrize("name, overrides", [
    ("resnet", {}),
    ("transformer", {}),
    ("minilm", {}),
    ("simclr", {"weight_decays": [], "batch_sizes": [], "steps": 4}),
])
def test_every_experiment_takes_seeds(tmp_path, name, overrides):
    out = tmp_path / name
    try:
        result, claims, _, saved = run_experiment(name, out, Context(seed=3), profile="tiny", plots=False,
                                                  overrides=dict(overrides, seeds=2))
    except MissingData as exc:
        pytest.skip(f"{name}: optional data not installed: {exc}")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["seeds"] == [3, 4]
    assert (out / "seeds" / "seed-4" / "report.json").is_file()
    assert json.loads((out / "seeds" / "seed-4" / "config.json").read_text())["seed"] == 4
    md = (out / "claims.md").read_text()
    assert f"### Claims: {name} (2 seeds: 3, 4)" in md and "#### The paper's words" in md
    assert any("2 seeds" in c.measured for c in claims)
    assert all(c.verdict in ("holds", "FAILS", "undetermined", "n/a") for c in claims)
    # the measurement collectors accumulate raw moments: exponents fitted on them
    raw = [e.get("exponent_moments") for e in result.report.layers.values() if e.get("kind") != "head"]
    assert raw and all(m == "raw" for m in raw), raw
    # `crh report` recomputes the same claims from the saved seeds
    _, _, again, _ = rebuild(out, plots=False)
    assert [c.verdict for c in again] == [c.verdict for c in claims]
    assert [c.measured for c in again] == [c.measured for c in claims]


def test_one_seed_claims_are_those_over_one_seed():
    for name in ("resnet", "transformer", "minilm", "simclr"):
        mod = get(name)
        assert "seeds" in mod.PROFILES["cpu"] and "blocks" in mod.PROFILES["cpu"]
        assert hasattr(mod, "claims_over_seeds")


def test_blocks_setting_is_checked():
    from crh_kernels.experiments import ExperimentError
    from crh_kernels.experiments.resnet import collector_options
    assert collector_options({"blocks": 0}, 4) == {"raw_moments": True}
    assert collector_options({"blocks": 5}, 4) == {"raw_moments": True, "blocks": 5, "block_by": "row"}
    assert collector_options({"blocks": 4}, 4) == {"raw_moments": True, "blocks": 4, "block_by": "step"}
    for bad in (1, -2, True, 2.5):
        with pytest.raises(ExperimentError, match="blocks"):
            collector_options({"blocks": bad}, 4)
    # with blocks, the measurement pass is cut into at least K batches where the samples allow it
    from crh_kernels.experiments.resnet import block_batch_size
    for n, bs, k in ((512, 128, 10), (2000, 500, 10), (64, 16, 10), (100, 7, 3), (40, 40, 20)):
        got = block_batch_size({"blocks": k}, n, bs)
        assert 2 <= got <= bs and math.ceil(n / got) >= k, (n, bs, k, got)
    assert block_batch_size({"blocks": 0}, 512, 128) == 128
    assert block_batch_size({"blocks": 10}, 15, 8) == 8  # too few samples: rows are dealt instead
    assert block_batch_size({"blocks": 4}, 2000, 500) == 500  # already 4 batches


def test_the_new_claims_quote_the_paper_verbatim():
    from pathlib import Path
    paper = Path("/work/shared/paper/formation-of-representations.txt")
    if not paper.is_file():
        pytest.skip(f"the paper's text is not here ({paper})")
    text = " ".join(paper.read_text().split())
    quotes = {f"{name}.{k}": v for name in ("resnet", "transformer", "minilm", "simclr")
              for k, v in vars(get(name)).items() if k.startswith("QUOTE_")}
    assert len(quotes) >= 9
    for name, q in quotes.items():
        for frag in (f.strip() for f in q.split("[…]") if f.strip()):
            assert " ".join(frag.split()) in text, (name, frag)


def test_one_seed_with_blocks_gives_jackknife_intervals(tmp_path):
    import inspect

    from crh_kernels.collect import Collector
    if "blocks" not in inspect.signature(Collector).parameters:
        pytest.skip("the collector has no blocks (issue 16) in this tree")
    result, claims, _, _ = run_experiment("resnet", tmp_path / "r", Context(seed=0), profile="tiny", plots=False,
                                          overrides={"blocks": 8, "n_measure": 128})
    # 128 images in batches of 32 are 4 batches: cut into 8 so that blocks are whole batches
    assert result.report.meta["jackknife"]["k"] == 8 and result.report.meta["jackknife"]["by"] == "step"
    e = result.report.layers["fc1"]
    assert C.alpha_se(e, "forward_RGA") is not None
    sig = claims[0]
    assert "one seed: jackknife" in json.dumps(sig.details)
    # every item has an interval: the verdict is decided by it, never "no interval"
    assert all(d["margin"]["lo"] is not None and math.isfinite(d["margin"]["lo"]) for d in sig.details.values())
    assert "no interval" not in sig.measured
    # the interval is the report's own: (α − bias − baseline) ± z·se with the report's z
    d = sig.details["fc1 fRGA"]["margin"]
    z = C.jackknife_z(result.report)
    se, bias = C.alpha_se(e, "forward_RGA"), C.alpha_bias(e, "forward_RGA")
    base = sig.details["fc1 fRGA"]["baseline"][0]
    assert d["lo"] == pytest.approx(e["alpha_cov"]["forward_RGA"] - bias - base - z * se, abs=1e-12)
    lo, hi = e["se"]["interval"]["alpha_cov"]["forward_RGA"]
    assert d["lo"] == pytest.approx(lo - base, abs=1e-9) and d["hi"] == pytest.approx(hi - base, abs=1e-9)
