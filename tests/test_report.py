"""Report: table, JSON round trip, figures, and numbers equal to the analysis functions."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from crh_kernels import analysis as A
from crh_kernels.collect import Collector
from crh_kernels.report import Report

PNG = b"\x89PNG\r\n\x1a\n"


# tiny tensors only: one thread avoids OpenMP barrier stalls on a busy shared machine
pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(10, 24)
        self.mix = nn.Linear(24, 24)      # its output is also split into 3 heads
        self.fc2 = nn.Linear(24, 4)

    def forward(self, x):
        return self.fc2(torch.tanh(self.mix(F.relu(self.fc1(x)))))


@pytest.fixture(scope="module")
def collected():
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, weight_decay=1e-3)
    g = torch.Generator().manual_seed(0)
    col = Collector(net, heads={"mix": 3})
    with col:
        for _ in range(20):
            x = torch.randn(64, 10, generator=g)
            loss = F.mse_loss(net(x), x[:, :4])
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step()
    return col, col.report()


def test_table_lists_every_layer(collected):
    col, rep = collected
    text = rep.table()
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["layer", "kind", "n"]
    for name in col.layers:
        assert any(line.split() and line.split()[0] == name for line in lines), name
    assert "only the forward RGA applies" in text
    assert str(rep) == text


def test_json_round_trip_is_exact_and_strict(collected, tmp_path):
    _, rep = collected
    path = rep.to_json(tmp_path / "sub" / "report.json")

    def no_nan(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    with open(path) as f:
        raw = json.load(f, parse_constant=no_nan)
    assert raw["format"] == "crh_kernels.Report/1"
    back = Report.from_json(path)
    assert back.layers == rep.layers
    assert back.meta == rep.meta
    assert back.table() == rep.table()
    for e in back.layers.values():
        for key in ("kind", "alpha_cov", "alpha_second", "r_h", "r_g", "effective_rank_h",
                    "effective_rank_g", "p", "q", "forward_slope", "phase", "commutation", "n",
                    "streams", "exponents"):
            assert key in e
        assert set(e["alpha_cov"]) == set(A.RELATIONS) == set(e["alpha_second"])


def test_values_match_the_analysis_functions(collected):
    col, rep = collected
    for name in ("fc1", "mix", "fc2"):
        st, e = col.layers[name], rep.layers[name]
        for kind, key in (("cov", "alpha_cov"), ("second_moment", "alpha_second")):
            want = A.six_alignments(st, kind=kind)
            for rel, v in want.items():
                assert (e[key][rel] is None and math.isnan(v)) or e[key][rel] == pytest.approx(v, abs=1e-12)
        ha, ga, hb, gb = (m.cov() for m in (st.H_a, st.G_a, st.H_b, st.G_b))
        fit = A.fit_exponents(st.weight().double(), ha, ga, hb, gb, floor=1e-6)
        assert e["p"] == pytest.approx(fit.p.slope, abs=1e-9)
        assert e["q"] == pytest.approx(fit.q.slope, abs=1e-9)
        assert e["forward_slope"] == pytest.approx(fit.forward.slope, abs=1e-9)
        assert e["commutation"] == pytest.approx(A.commutation_error(st.weight().double(), ha), abs=1e-9)
        assert e["effective_rank_h"] == pytest.approx(A.effective_rank(ha), rel=1e-9)
        assert e["effective_rank_g"] == pytest.approx(A.effective_rank(ga), rel=1e-9)
        assert e["r_h"] == pytest.approx(st.H_a.mean_ratio(), rel=1e-12)
        assert e["r_g"] == pytest.approx(st.G_a.mean_ratio(), rel=1e-12)
        # the phase is the gated exponent reading (issue 13), recomputed independently here
        ex = A.exponent_reading(fit, A.VerdictGates(),
                                commutation_g=A.commutation_error(st.weight().double(), ga))
        assert e["phase"] == ex["phase"]
        assert e["verdict"]["exponent"]["failed"] == ex["failed"]
        assert e["n"] == st.H_a.n == 20 * 64
        assert e["streams"] == ["h_a", "h_b", "g_a", "g_b"]
        assert e["exponents"]["p"]["slope"] == pytest.approx(fit.p.slope, abs=1e-9)
    head = rep.layers["mix.head1"]
    st = col.layers["mix.head1"]
    assert head["kind"] == "head" and head["p"] is None and head["phase"] is None
    assert head["alpha_cov"]["forward_RGA"] == pytest.approx(A.alignment(st.H_b.cov(), st.G_b.cov()))
    assert head["streams"] == ["h_b", "g_b"]
    assert head["forward_slope_source"] == "sorted spectra"
    lam = rep.spectra("mix.head1")
    assert set(lam) == {"H_b", "G_b"}
    assert lam["H_b"] == pytest.approx(A.eigh(st.H_b.cov())[0].numpy(), abs=1e-12)


def test_other_kind_uses_second_moments(collected):
    col, _ = collected
    rep = col.report(kind="second_moment", tol=0.5)
    st = col.layers["fc1"]
    fit = A.fit_exponents(st.weight().double(), st.H_a.second_moment(), st.G_a.second_moment(),
                          floor=1e-6)
    assert rep.layers["fc1"]["p"] == pytest.approx(fit.p.slope, abs=1e-9)
    assert rep.meta["kind"] == "second_moment" and rep.meta["tol"] == 0.5
    with pytest.raises(ValueError):
        col.report(kind="median")


def test_plot_writes_png_files(collected, tmp_path):
    pytest.importorskip("matplotlib")
    _, rep = collected
    paths = rep.plot(tmp_path / "figs")
    names = sorted(p.split("/")[-1] for p in paths)
    assert names == sorted(["alpha.png", "spectra.png", "exponents.png", "phase.png",
                            "heatmap_fc1.png", "heatmap_mix.png", "heatmap_fc2.png"])
    for p in paths:
        with open(p, "rb") as f:
            head = f.read(8)
        assert head == PNG, p
        assert (tmp_path / "figs" / p.split("/")[-1]).stat().st_size > 1000
    # a report read back from JSON has no matrices: every figure but the heatmaps
    back = Report.from_json(rep.to_json(tmp_path / "r.json"))
    paths2 = back.plot(tmp_path / "figs2")
    assert sorted(p.split("/")[-1] for p in paths2) == ["alpha.png", "exponents.png",
                                                         "phase.png", "spectra.png"]


# ----------------------------------------------------------------------------- issue 12, item 9
def _mutated(rep, tmp_path, fn, name="r.json"):
    d = json.loads(json.dumps(rep.to_dict()))
    d = fn(d) or d
    path = tmp_path / name
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("fn, needle", [
    (lambda d: d.update(layers=[1, 2]), "r.json: layers must be an object, got a list of 2 items"),
    (lambda d: d["layers"]["fc1"].update(p="abc"), 'r.json: layers["fc1"].p must be a finite number or null, got the string "abc"'),
    (lambda d: d["layers"]["fc1"].update(n=1.5), 'layers["fc1"].n must be an integer ≥ 0'),
    (lambda d: d["layers"]["mix.head1"].update(head="1"), 'layers["mix.head1"].head must be an integer'),
    (lambda d: d["layers"]["fc2"].update(streams=["h_a", "x"]), 'layers["fc2"].streams[1] must be one of'),
    (lambda d: d["layers"]["fc2"]["exponents"]["p"].update(slope=True), 'layers["fc2"].exponents.p.slope must be a finite number'),
    (lambda d: d["layers"]["mix.head0"].update(spectra={"H_b": [1.0, "x"]}), 'layers["mix.head0"].spectra["H_b"][1] must be'),
    (lambda d: d["layers"].update(fc1=[]), 'layers["fc1"] must be an object'),
    (lambda d: d.update(meta={"kind": "median"}), "meta.kind must be one of"),
    (lambda d: [d], "the top level must be an object"),
])
def test_from_json_refuses_wrong_types_naming_the_field(collected, tmp_path, fn, needle):
    _, rep = collected
    with pytest.raises(ValueError) as info:
        Report.from_json(_mutated(rep, tmp_path, fn))
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def test_read_json_is_strict_and_depth_limited(tmp_path):
    from crh_kernels.report import MAX_JSON_DEPTH, read_json
    p = tmp_path / "x.json"
    p.write_text("[" * 10 ** 6 + "]" * 10 ** 6)  # would exhaust the recursion limit of json
    with pytest.raises(ValueError, match=r"x.json: nested 1000000 levels deep"):
        read_json(p)
    p.write_text("[" * MAX_JSON_DEPTH + '"[[[["' + "]" * MAX_JSON_DEPTH)  # brackets in strings do not count
    assert read_json(p) is not None
    for text, needle in (('{"a": NaN}', "NaN is not a JSON number"), ('{"a": -Infinity}', "-Infinity"),
                         ('{"a": 1e400}', "overflows"), ('{"a": ', "not valid JSON"), ("\xff", "not UTF-8")):
        p.write_bytes(text.encode("latin-1"))
        with pytest.raises(ValueError, match=needle):
            read_json(p)


# ----------------------------------------------------------------------------- issue 15, item 3
def test_table_has_a_legend_for_every_column_and_phase_name(collected):
    from crh_kernels.analysis import PHASES
    _, rep = collected
    text = rep.table()
    header = text.splitlines()[0].split()
    legend = rep.legend()
    assert legend in text and text.index(legend) > text.index(header[-1])
    keys = " ".join(line[:20] for line in legend.splitlines()[1:])  # the left column
    for col in header:
        assert col in keys, f"column {col!r} has no legend entry"
    for name in PHASES:
        assert f"  {name}  " in legend, f"phase {name!r} has no legend entry"
    assert "  none  " in legend and "\n  -  " in legend
    # forward and backward are named by what they are, never "f = forward/b side"
    assert "forward side = the layer's output side (h_b, g_b, Z_b" in " ".join(legend.split())
    assert "backward side = the layer's input side (h_a, g_a, Z_a" in " ".join(legend.split())
    assert "b side" not in text and "a side" not in text
    assert rep.table(legend=False) == text[:text.index("\n\n" + legend)]


def _saved_figures(monkeypatch):
    """Every matplotlib Figure written from now on (with the path)."""
    from matplotlib.figure import Figure
    saved = []
    original = Figure.savefig

    def savefig(self, path, *args, **kwargs):
        saved.append((str(path), self))
        return original(self, path, *args, **kwargs)
    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def _texts(fig):
    out = [fig._suptitle.get_text() if fig._suptitle is not None else ""]
    for ax in fig.axes:
        out.append(ax.get_title())
        out += [t.get_text() for t in ax.texts]
    return out


def _title(fig) -> str:
    sup = fig._suptitle.get_text() if fig._suptitle is not None else ""
    if sup:
        return sup
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    return axes[0].get_title() if len(axes) == 1 else ""


class Degenerate(nn.Module):
    """A layer with one output (one mode: no exponent, no spectrum slope) and a layer whose W
    is a projection (flat z: p, q undefined)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(6, 6, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(6))
        self.hidden = nn.Linear(6, 12)
        self.out = nn.Linear(12, 1)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(self.proj(x))))


def test_every_figure_has_a_title_and_degenerate_panels_say_why(collected, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    net = Degenerate()
    col = Collector(net)
    with col:
        for _ in range(4):
            x = torch.randn(64, 6)
            (net(x) - x[:, :1]).pow(2).mean().backward()
            col.step()
    rep = col.report()
    assert rep.layers["out"]["p"] is None and rep.layers["proj"]["p"] is None
    saved = _saved_figures(monkeypatch)
    paths = rep.plot(tmp_path / "figs") + collected[1].plot(tmp_path / "figs2")
    assert len(saved) == len(paths) >= 10
    for path, fig in saved:
        assert len(_title(fig)) >= 20, f"{path}: no title"
    figs = {(path.split("/")[-2], path.split("/")[-1]): fig for path, fig in saved}
    exponents = " ".join(_texts(figs["figs", "exponents.png"]))
    assert "p=- q=-" in exponents                      # the one-mode and the flat-z panels …
    assert "a fit needs ≥ 2 modes" in exponents and "this layer\nhas 1" in exponents  # … say why
    assert "z is flat on its 6 modes" in exponents
    spectra = " ".join(_texts(figs["figs", "spectra.png"]))
    assert "no slope: a fit needs ≥ 3 ranks" in spectra and "(this layer has 1)" in spectra
    phase = " ".join(_texts(figs["figs", "phase.png"]))
    assert "not placed, p or q undefined: proj, out" in phase
    # a healthy report has no such notes
    assert not any("undefined" in t or "no slope" in t
                   for t in _texts(figs["figs2", "exponents.png"]) + _texts(figs["figs2", "spectra.png"]))
