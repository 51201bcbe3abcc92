"""The α series of a Collector (``alpha_every=K``, crh_kernels.collect.series): each point is
what a full report says at that step (taken from the running states, no second pass), the last
point is the final report's α when K divides the step count, the series survives JSON (report
and state dict), malformed series are refused with a line naming the field, and the figure
has its title, labels and legend."""
import json

import pytest
import torch
import torch.nn as nn

from crh_kernels import Collector, Report
from crh_kernels.analysis import RELATIONS
from crh_kernels.collect.series import AlphaSeries
from crh_kernels.report import check_alpha_series


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.b = nn.Linear(12, 3)
        self.unused = nn.Linear(3, 3)      # never called: no rows, every α undefined

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _train(col, model, steps, on_step=None):
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with col:
        for _ in range(steps):
            x = torch.randn(16, 6, generator=g)
            loss = (model(x) - x[:, :3]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            col.step()
            if on_step is not None:
                on_step(col)


def test_each_point_is_the_report_of_its_step_and_the_last_is_the_final_report():
    torch.manual_seed(0)
    model = _Net()
    col = Collector(model, alpha_every=3)
    seen = {}

    def report_now(c):   # an independent path: the full report taken at the step itself
        if c.steps % 3 == 0:
            seen[c.steps] = {n: e["alpha_cov"] for n, e in c.report().layers.items()}

    _train(col, model, 9, report_now)
    series = col.alpha_series
    assert series.steps == [3, 6, 9] and len(series) == 3
    for i, step in enumerate(series.steps):
        for name in ("a", "b", "unused"):
            assert {r: series.layers[name][r][i] for r in RELATIONS} == seen[step][name]
    assert len({series.layers["a"]["backward_RGA"][i] for i in range(3)}) == 3  # it moves
    final = col.report()
    assert final.alpha_series["steps"] == [3, 6, 9]
    assert series.last() == {n: e["alpha_cov"] for n, e in final.layers.items()}
    assert all(v is None for r in RELATIONS for v in series.layers["unused"][r])
    assert final.meta["alpha_every"] == 3


def test_the_last_point_lags_when_k_does_not_divide_the_steps():
    torch.manual_seed(0)
    model = _Net()
    col = Collector(model, alpha_every=4)
    _train(col, model, 6)
    assert col.alpha_series.steps == [4]
    final = col.report()
    assert col.alpha_series.last()["a"] != final.layers["a"]["alpha_cov"]


def test_no_series_without_alpha_every():
    model = _Net()
    col = Collector(model)
    _train(col, model, 2)
    rep = col.report()
    assert col.alpha_series is None and rep.alpha_series is None
    assert "alpha_series" not in rep.to_dict()


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_alpha_every_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="alpha_every"):
        Collector(_Net(), alpha_every=bad)


def test_json_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _Net()
    col = Collector(model, alpha_every=2)
    _train(col, model, 4)
    rep = col.report()
    path = rep.to_json(tmp_path / "report.json")
    back = Report.from_json(path)
    assert back.alpha_series == rep.alpha_series
    assert back.alpha_series == json.loads(json.dumps(col.alpha_series.to_dict()))
    again = AlphaSeries.from_dict(back.alpha_series)
    assert (again.every, again.steps, again.layers) == (2, [2, 4], col.alpha_series.layers)
    assert back.to_dict()["alpha_series"] == rep.alpha_series


def _series_dict():
    return {"kind": "cov", "every": 2, "steps": [2, 4],
            "layers": {"l": {r: [0.5, None] for r in RELATIONS}}}


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.update(every=0), "alpha_series.every"),
    (lambda d: d.update(kind="second"), "alpha_series.kind"),
    (lambda d: d.update(steps=[4, 2]), "alpha_series.steps[1]"),
    (lambda d: d.update(steps=[2, "4"]), "alpha_series.steps[1]"),
    (lambda d: d["layers"]["l"].pop("forward_RGA"), 'alpha_series.layers["l"]'),
    (lambda d: d["layers"]["l"].update(forward_RGA=[0.5]), 'alpha_series.layers["l"].forward_RGA'),
    (lambda d: d["layers"]["l"].update(backward_GWA=[0.5, "x"]),
     'alpha_series.layers["l"].backward_GWA[1]'),
])
def test_malformed_series_are_refused_naming_the_field(tmp_path, edit, field):
    d = _series_dict()
    check_alpha_series(d)
    edit(d)
    with pytest.raises(ValueError) as info:
        check_alpha_series(d)
    assert field in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="alpha_series"):
        AlphaSeries.from_dict(d)
    model = _Net()
    col = Collector(model)
    _train(col, model, 1)
    doc = col.report().to_dict()
    doc["alpha_series"] = d
    path = tmp_path / "report.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError) as info:
        Report.from_json(path)
    assert str(info.value).startswith("report.json: ") and field in str(info.value)


def test_state_dict_carries_the_series_and_reset_keeps_it():
    torch.manual_seed(0)
    model = _Net()
    col = Collector(model, alpha_every=2)
    _train(col, model, 4)
    sd = col.state_dict()
    other = Collector(model, alpha_every=2)
    other.load_state_dict(sd)
    assert other.alpha_series.steps == [2, 4]
    assert other.alpha_series.layers == col.alpha_series.layers
    _train(other, model, 2)               # continues at step 6
    assert other.alpha_series.steps == [2, 4, 6]
    with pytest.raises(ValueError, match="alpha_every=3"):
        Collector(model, alpha_every=3).load_state_dict(sd)
    bad = dict(sd, alpha_series=dict(sd["alpha_series"], steps=[4, 2]))
    before = (other.steps, other.alpha_series.steps, other.layers["a"].H_a.n)
    with pytest.raises(ValueError, match=r"^state dict: alpha_series\.steps\[1\]"):
        other.load_state_dict(bad)        # refused before anything changes
    assert (other.steps, other.alpha_series.steps, other.layers["a"].H_a.n) == before
    plain = Collector(model)
    plain.load_state_dict(sd)             # a collector without a series ignores it
    assert plain.alpha_series is None
    no_series = Collector(model).state_dict()
    col.load_state_dict(no_series)        # the restored states had no series: none is kept
    assert col.alpha_series.steps == []
    _train(col, model, 2)
    col.reset()
    assert col.alpha_series.steps == [2]


def test_the_figure_has_title_labels_and_legend(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from crh_kernels import plots
    torch.manual_seed(0)
    model = _Net()
    col = Collector(model, alpha_every=1)
    _train(col, model, 3)
    rep = col.report()
    figs = {}
    real = plots.save_figure

    def keep(fig, path):
        figs[str(path).rsplit("/", 1)[-1]] = fig
        return real(fig, path)

    monkeypatch.setattr(plots, "save_figure", keep)
    paths = rep.plot(tmp_path, heatmaps=False)
    assert str(tmp_path / "alpha_series.png") in paths
    assert (tmp_path / "alpha_series.png").stat().st_size > 0
    fig = figs["alpha_series.png"]
    assert "α over training" in fig._suptitle.get_text()
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["a", "b", "unused"]
    assert all(ax.get_xlabel() == "training step" and ax.get_ylabel() for ax in axes)
    legend = axes[0].get_legend()
    assert legend is not None and len(legend.get_texts()) == 6
    line = next(ln for ln in axes[0].get_lines() if ln.get_label() == "backward RGA")
    assert list(line.get_xdata()) == [1, 2, 3]
    assert list(line.get_ydata()) == pytest.approx(col.alpha_series.layers["a"]["backward_RGA"])
    assert "no α yet" in axes[2].texts[0].get_text()   # the layer that saw no rows says why
