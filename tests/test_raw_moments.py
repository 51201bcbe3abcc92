"""Raw moments (issue 13, item 2; docs/spec.md §4 "Which moments the lines are about").

``Collector(raw_moments=True)`` also keeps, per layer with a weight, the raw (unnormalized,
uncentered, bias folded in) second moments of ``(h_a, 1)`` and of the per-sample ``g_b``; the
report fits exponents on them and shows the identity residual of the normalized covariances.
Everything is checked against float64 numpy computed from plain hooks (tests/_collect_ref.py),
on a network trained for real (a second of SGD) where that matters.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from crh_kernels.collect import Collector
from crh_kernels.report import Report, check_report_dict

from ._collect_ref import Naive, np64, ref_stats

# tiny tensors only: one thread avoids OpenMP barrier stalls on a busy shared machine
pytestmark = pytest.mark.usefixtures("one_thread")

B = 64          # rows per batch
FP32 = 2e-5     # relative Frobenius error of an fp32 state against a float64 reference


def net(bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32, bias=bias), nn.ReLU(), nn.Linear(32, 16, bias=bias),
                         nn.Tanh(), nn.Linear(16, 4, bias=bias))


def teacher_batches(k, seed=1):
    """(x, y) of a fixed nonlinear teacher: a task a small MLP learns in a few hundred steps."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(10, 4, generator=torch.Generator().manual_seed(7))
    out = []
    for _ in range(k):
        x = torch.randn(B, 10, generator=g)
        out.append((x, torch.tanh(x @ t) + 0.5))
    return out


def trained(bias=True, steps=300):
    """A tiny MLP trained for real (SGD, weight decay): about a second on a CPU."""
    model = net(bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for x, y in teacher_batches(steps, seed=2):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    return model


def measure(model, k=4, naive=True, **kw):
    """Collect on k fresh batches with frozen weights (as the experiments do); also the plain
    hooks' tensors."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ref = Naive(model, names) if naive else None
    col = Collector(model, raw_moments=True, **kw)
    with col:
        for x, y in teacher_batches(k, seed=3):
            F.mse_loss(model(x), y).backward()
            col.step()
            model.zero_grad(set_to_none=True)
    if ref is not None:
        ref.remove()
    return col, ref


def with_ones(rows):
    return np.concatenate([rows, np.ones((rows.shape[0], 1))], 1)


def second(rows):
    return rows.T @ rows / rows.shape[0]


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def w_tilde(lin):
    w = np64(lin.weight)
    return w if lin.bias is None else np.concatenate([w, np64(lin.bias)[:, None]], 1)


def per_sample_grads(ref, name, what):
    """F.mse_loss averages over B·4 entries: B × autograd's rows are the per-sample gradients
    of ℓ_i = mean over the 4 outputs (what the collector's default N = rows gives)."""
    return B * ref.rows(name, what)


@pytest.fixture(scope="module")
def trained_run():
    model = trained()
    col, ref = measure(model)
    return model, col, ref


# ----------------------------------------------------------------------------- the states
def test_raw_states_match_float64_reference(trained_run):
    model, col, ref = trained_run
    for name in ("0", "2", "4"):
        st, lin = col.layers[name], model[int(name)]
        assert st.raw and st.H_a_raw is not None and st.G_b_raw is not None
        assert not st.H_a_raw.normalize and not st.G_b_raw.normalize
        assert st.H_a.normalize                          # the ordinary streams are unchanged
        ha = with_ones(ref.rows(name, "h_a"))
        gb = per_sample_grads(ref, name, "g_b")
        assert st.H_a_raw.dim == lin.in_features + 1 and st.G_b_raw.dim == lin.out_features
        assert st.H_a_raw.n == st.G_b_raw.n == ha.shape[0] == 4 * B
        # uncentered second moment = the Moments' second_moment() view
        assert rel(st.H_a_raw.second_moment().double().numpy(), second(ha)) < FP32, name
        assert rel(st.G_b_raw.second_moment().double().numpy(), second(gb)) < FP32, name
        assert float(st.H_a_raw.mean[-1]) == 1.0            # the bias column
        assert torch.equal(st.raw_weight0, st.raw_weight())   # frozen while measuring


def test_identities_hold_for_raw_moments_not_for_normalized(trained_run):
    """The point: H_b = W̃ H̃_a W̃ᵀ and G_a = Wᵀ G_b W hold to fp32 rounding for the raw moments
    (checked against the layer's actual outputs and autograd's input gradients), while the
    normalized covariances miss them by a visible margin, which the report shows."""
    model, col, ref = trained_run
    rep = col.report()
    for name in ("0", "2", "4"):
        st, lin = col.layers[name], model[int(name)]
        wt = w_tilde(lin)
        ha = st.H_a_raw.second_moment().double().numpy()
        gb = st.G_b_raw.second_moment().double().numpy()
        hb_data = second(ref.rows(name, "h_b"))
        assert rel(wt @ ha @ wt.T, hb_data) < FP32, name
        if name != "0":    # the data needs no grad: no input gradient to compare with
            ga_data = second(per_sample_grads(ref, name, "g_a"))
            d = lin.in_features
            assert rel((wt.T @ gb @ wt)[:d, :d], ga_data) < FP32, name
        # on the normalized covariances α uses: an independent residual and α
        _, _, ca = ref_stats(ref.rows(name, "h_a"))
        _, _, cb = ref_stats(ref.rows(name, "h_b"))
        w = np64(lin.weight)
        m = w @ ca @ w.T
        cos = (cb * m).sum() / (np.linalg.norm(cb) * np.linalg.norm(m))
        want = math.sqrt(1 - cos * cos)
        ident = rep.layers[name]["identity"]
        assert ident["on"] == "cov" and ident["raw"]["source"] == "raw_moments"
        assert ident["raw"]["weight_change"] == 0.0
        assert ident["H_b"]["residual"] == pytest.approx(want, abs=2e-4), name
        assert ident["H_b"]["alpha"] == pytest.approx(
            np.corrcoef(cb.ravel(), m.ravel())[0, 1], abs=2e-4), name
        assert want > 0.01, (name, want)       # normalization breaks the identity visibly
        assert rep.layers[name]["identity_residual"] >= ident["H_b"]["residual"]
    # a layer whose g_a comes from the input hook: G_a ≟ Wᵀ G_b W on normalized covariances
    _, _, ga = ref_stats(ref.rows("2", "g_a"))
    _, _, gbn = ref_stats(ref.rows("2", "g_b"))
    w = np64(model[2].weight)
    m = w.T @ gbn @ w
    cos = (ga * m).sum() / (np.linalg.norm(ga) * np.linalg.norm(m))
    assert rep.layers["2"]["identity"]["G_a"]["residual"] == pytest.approx(
        math.sqrt(1 - cos * cos), abs=2e-4)


def np_exponents(w, h_a, g_a, floor=1e-6):
    """p, q by numpy: slopes of log v_iᵀHv_i and log v_iᵀGv_i against log s_i² (docs/spec.md §4)."""
    _, s, vt = np.linalg.svd(w, full_matrices=False)
    z = s * s
    h = np.einsum("ij,jk,ik->i", vt, h_a, vt)
    g = np.einsum("ij,jk,ik->i", vt, g_a, vt)
    keep = np.ones_like(z, dtype=bool)
    for x in (z, h, g):
        keep &= (x > 0) & (x > floor * x.max())
    lz = np.log(z[keep])
    return np.polyfit(lz, np.log(h[keep]), 1)[0], np.polyfit(lz, np.log(g[keep]), 1)[0]


def test_report_fits_exponents_on_raw_moments(trained_run):
    model, col, ref = trained_run
    rep = col.report()
    kind = col.report(exponent_moments="kind")
    for name in ("0", "2", "4"):
        e, lin = rep.layers[name], model[int(name)]
        wt = w_tilde(lin)
        ha = second(with_ones(ref.rows(name, "h_a")))
        ga = wt.T @ second(per_sample_grads(ref, name, "g_b")) @ wt
        p, q = np_exponents(wt, ha, ga)
        assert e["exponent_moments"] == "raw" and "raw_moments=True" in e["exponent_moments_why"]
        assert e["p"] == pytest.approx(p, abs=1e-3) and e["q"] == pytest.approx(q, abs=1e-3)
        assert len(e["exponents"]["z"]) == min(wt.shape)        # W̃'s modes, bias included
        k = kind.layers[name]
        assert k["exponent_moments"] == "cov" and "exponent_moments='kind'" in k["exponent_moments_why"]
        # spectra and the paper's pairing slope stay on the normalized covariances
        assert e["pairing_slope"] == pytest.approx(k["pairing_slope"], rel=1e-9)
        for s, lam in rep.spectra(name).items():
            np.testing.assert_allclose(lam, kind.spectra(name)[s], rtol=1e-9, atol=1e-15)
    assert any(abs(rep.layers[n]["p"] - kind.layers[n]["p"]) > 0.05 for n in ("0", "2", "4"))
    text = rep.table()
    lines = text.splitlines()
    spans = [m.span() for m in re.finditer(r"-+", lines[1])]     # the fixed-width columns
    row = next(ln for ln in lines if ln.split()[:1] == ["2"])
    cells = {lines[0][a:b].strip(): row[a:b].strip() for a, b in spans}
    assert cells["fit"] == "raw" and cells["ident"] == f"{rep.layers['2']['identity_residual']:.3f}"
    assert "on raw second moments (bias folded in) for 3 of 3 layers" in text
    legend = " ".join(rep.legend().split())
    assert "identity residual" in legend and "raw = raw second moments" in legend
    assert rep.meta["raw_moments"] is True and rep.meta["exponent_moments"] == "auto"


def test_without_raw_moments_the_report_says_so(tmp_path):
    model = trained(steps=50)
    col = Collector(model)
    with col:
        for x, y in teacher_batches(2, seed=3):
            F.mse_loss(model(x), y).backward()
    rep = col.report()
    for e in rep.layers.values():
        assert e["exponent_moments"] == "cov"
        assert "normalized rows, not raw moments" in e["exponent_moments_why"]
        assert "raw_moments=True" in e["exponent_moments_why"]
        assert e["identity"]["raw"] is None and e["identity_residual"] is not None
    assert "for 0 of 3 layers; on the covariances of the normalized rows" in rep.table()
    path = rep.to_json(tmp_path / "r.json")
    back = Report.from_json(path)
    assert back.layers["2"]["identity"] == rep.layers["2"]["identity"]
    assert back.table() == rep.table()
    d = rep.to_dict()
    d["layers"]["2"]["exponent_moments"] = "normalized"
    with pytest.raises(ValueError, match="exponent_moments"):
        check_report_dict(d)
    d["layers"]["2"]["exponent_moments"] = "cov"
    d["layers"]["2"]["identity"]["H_b"]["residual"] = "big"
    with pytest.raises(ValueError, match=r"identity\.H_b\.residual"):
        check_report_dict(d)


def test_normalize_false_with_bias_column_is_raw_already():
    """normalize=False, include_bias=True: H_a and G_b are raw moments; the report uses them
    without the option, and they equal the option's raw states."""
    model = trained(steps=50)
    col, _ = measure(model, k=2, naive=False, normalize=False, include_bias=True, loss_terms=B)
    for name, st in col.layers.items():
        assert rel(st.H_a.second_moment().double().numpy(),
                   st.H_a_raw.second_moment().double().numpy()) < FP32
        assert rel(st.G_b.second_moment().double().numpy(),
                   st.G_b_raw.second_moment().double().numpy()) < FP32
    plain = Collector(model, normalize=False, include_bias=True, loss_terms=B)
    with plain:
        for x, y in teacher_batches(2, seed=3):
            F.mse_loss(model(x), y).backward()
    r1, r2 = col.report(), plain.report()
    for name in col.layers:
        assert r2.layers[name]["exponent_moments"] == "raw"
        assert r2.layers[name]["identity"]["raw"]["source"] == "normalize=False streams"
        assert r2.layers[name]["p"] == pytest.approx(r1.layers[name]["p"], abs=1e-4)
    no_bias_col = Collector(model, normalize=False, loss_terms=B)
    with no_bias_col:
        F.mse_loss(model(teacher_batches(1)[0][0]), teacher_batches(1)[0][1]).backward()
    e = no_bias_col.report().layers["2"]
    assert e["exponent_moments"] == "cov" and "lacks the bias column" in e["exponent_moments_why"]


# ---------------------------------------------------------------------------- model kinds
def test_model_without_bias():
    model = trained(bias=False, steps=100)
    col, ref = measure(model, k=2)
    rep = col.report()
    for name in ("0", "2", "4"):
        st, lin = col.layers[name], model[int(name)]
        assert st.H_a_raw.dim == lin.in_features                      # no bias column
        assert torch.equal(st.raw_weight(), lin.weight.detach())
        ha = st.H_a_raw.second_moment().double().numpy()
        assert rel(ha, second(ref.rows(name, "h_a"))) < FP32
        w = np64(lin.weight)
        assert rel(w @ ha @ w.T, second(ref.rows(name, "h_b"))) < FP32
        assert rep.layers[name]["exponent_moments"] == "raw"
        assert rep.layers[name]["p"] is not None


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.mha(h, h, h)
        return self.out(torch.tanh(self.mix(a)))


def test_heads_and_attention_have_no_raw_moments():
    model = Attn()
    col = Collector(model, heads={"mix": 2}, raw_moments=True, normalize=False,
                    include_bias=True, loss_reduction="sum")
    x = torch.randn(3, 5, 6)
    with col:
        model(x).square().sum().backward()
    heads = [st for st in col.layers.values() if st.kind == "head"]
    assert len(heads) == 4                                     # mha: 2, mix: 2
    for st in heads:
        assert not st.raw and st.raw_moments() == {} and st.raw_dims == {}
        assert st.H_a_raw is None and st.G_b_raw is None and st.raw_weight() is None
    # out_proj is applied through F.linear: its raw rows come through the same path
    op = col.layers["mha.out_proj"]
    assert op.raw and op.H_a_raw.n == op.G_b_raw.n == 15
    w = op.raw_weight().double()
    hb = op.H_b.second_moment().double()          # unnormalized h_b, collected on its own
    assert float(torch.linalg.matrix_norm(w @ op.H_a_raw.second_moment().double() @ w.T - hb)
                 / torch.linalg.matrix_norm(hb)) < FP32
    assert sum(1 for *_, in col.memory_plan()) == 4 * 4 + 4 * 2 + 4 * 2    # 4 layers, 4 heads
    rep = col.report()
    for st in heads:
        e = rep.layers[st.name]
        assert e["exponent_moments"] is None and e["identity"] is None
        assert "no weight" in e["exponent_moments_why"] and "no raw moments" in e["phase_explanation"]
    assert rep.layers["mha.out_proj"]["exponent_moments"] == "raw"
    check_report_dict(rep.to_dict())


# --------------------------------------------------------------------------- life cycle
def test_state_dict_round_trip_and_resume():
    model = trained(steps=50)
    data = teacher_batches(4, seed=5)

    def run(col, batches):
        with col:
            for x, y in batches:
                F.mse_loss(model(x), y).backward()
                col.step()
                model.zero_grad(set_to_none=True)

    whole = Collector(model, raw_moments=True, state_dtype=torch.float64)
    run(whole, data)
    first = Collector(model, raw_moments=True, state_dtype=torch.float64)
    run(first, data[:2])
    sd = first.state_dict()
    assert sd["config"]["raw_moments"] is True
    assert set(sd["layers"]["2"]["raw"]) == {"h_a_raw", "g_b_raw", "weight0"}
    second_ = Collector(model, raw_moments=True, state_dtype=torch.float64)
    second_.load_state_dict(sd)
    for name, st in second_.layers.items():
        o = first.layers[name]
        for a in ("H_a_raw", "G_b_raw"):
            assert getattr(st, a).n == getattr(o, a).n
            assert torch.equal(getattr(st, a).scatter, getattr(o, a).scatter)
        assert torch.equal(st.raw_weight0, o.raw_weight0)
    run(second_, data[2:])
    for name, st in second_.layers.items():
        for a in ("H_a_raw", "G_b_raw"):
            m, o = getattr(st, a), getattr(whole.layers[name], a)
            assert m.n == o.n
            # the same rows, in fp32 batches of other sizes (the stager flushed at the stop)
            assert rel(m.scatter.numpy(), o.scatter.numpy()) < 1e-6, (name, a)
    # the option must match: the raw states would not count the same rows as the others
    with pytest.raises(ValueError, match="raw_moments=True, this collector False"):
        Collector(model).load_state_dict(sd)
    plain = Collector(model)
    run(plain, data[:1])
    old = plain.state_dict()
    with pytest.raises(ValueError, match="raw_moments=False, this collector True"):
        Collector(model, raw_moments=True).load_state_dict(old)
    del old["config"]["raw_moments"]                 # a state dict from before the option
    Collector(model).load_state_dict(old)
    # a bad raw entry is named, and nothing changes
    bad = second_.state_dict()
    bad["layers"]["2"]["raw"]["h_a_raw"]["dim"] = 99
    before = second_.layers["2"].H_a_raw
    with pytest.raises(ValueError, match=r"layers\['2'\]\['raw'\]\['h_a_raw'\]: state dim 99"):
        second_.load_state_dict(bad)
    assert second_.layers["2"].H_a_raw is before
    bad = second_.state_dict()
    bad["layers"]["2"]["raw"]["weight0"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="weight0"):
        second_.load_state_dict(bad)
    bad["layers"]["2"]["raw"]["weight0"] = torch.full_like(second_.layers["2"].raw_weight0,
                                                           float("nan"))
    with pytest.raises(ValueError, match="weight0.*non-finite"):
        second_.load_state_dict(bad)
    # reset forgets the raw rows and the weight they were taken with
    second_.reset()
    assert second_.layers["2"].H_a_raw is None and second_.layers["2"].raw_weight0 is None


def test_weight_changing_during_accumulation_is_reported():
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    col = Collector(model, raw_moments=True)
    with col:
        for x, y in teacher_batches(5, seed=4):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
            col.step()
    rep = col.report()
    e = rep.layers["2"]
    w0 = w_tilde(model[2])
    assert e["identity"]["raw"]["weight_change"] > 1e-3
    got = e["identity"]["raw"]["weight_change"]
    first = col.layers["2"].raw_weight0.double().numpy()
    assert got == pytest.approx(np.linalg.norm(w0 - first) / np.linalg.norm(w0), rel=1e-9)
    assert any("W changed by" in w for w in e["warnings"])


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_gradient_checkpointing_counts_raw_rows_once(reentrant):
    model = net()
    col = Collector(model, raw_moments=True)
    x = torch.randn(B, 10)
    with col:
        h = checkpoint(lambda z: model[1](model[0](z)), x.requires_grad_(), use_reentrant=reentrant)
        model[4](model[3](model[2](h))).square().mean().backward()
    for name, st in col.layers.items():
        assert st.H_a_raw.n == st.G_b_raw.n == B, name


def test_memory_plan_and_bytes_count_the_raw_streams():
    model = net()
    plan = Collector(model, raw_moments=True).memory_plan()
    by = {(n, s): shape for n, s, shape, _ in plan}
    assert by[("0", "h_a_raw")] == (11, 11) and by[("0", "g_b_raw")] == (32, 32)
    assert [s for n, s, *_ in plan if n == "2"] == ["h_a", "h_b", "g_a", "g_b", "h_a_raw",
                                                     "g_b_raw"]
    est = Collector.estimate_bytes(model, raw_moments=True)
    assert est == sum(b for *_, b in plan)
    assert est > Collector.estimate_bytes(model)
    col, _ = measure(model, k=1, naive=False)
    assert col.nbytes() == est
    with pytest.raises(TypeError, match="raw_moments must be a bool"):
        Collector(model, raw_moments=1)


def test_identity_residual_known_answers():
    from crh_kernels.analysis import identity_residual
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    a = torch.randn(7, 7, generator=g, dtype=torch.float64)
    h_a = a @ a.T
    b = torch.randn(5, 5, generator=g, dtype=torch.float64)
    g_b = b @ b.T
    out = identity_residual(w, h_a, 3 * (w @ h_a @ w.T), 0.5 * (w.T @ g_b @ w), g_b)
    for k, c in (("H_b", 3.0), ("G_a", 0.5)):          # holds up to a factor
        assert out[k]["residual"] == pytest.approx(0, abs=1e-7)
        assert out[k]["scale"] == pytest.approx(c, rel=1e-12)
        assert out[k]["alpha"] == pytest.approx(1, abs=1e-12)
    # B = M + E with E ⟂ M (Frobenius): the residual is |E| / |B|, by Pythagoras
    m = w @ h_a @ w.T
    e = torch.randn(5, 5, generator=g, dtype=torch.float64)
    e = e + e.T
    e = e - (e * m).sum() / (m * m).sum() * m
    r = identity_residual(w, h_a, m + e)["H_b"]
    want = float(torch.linalg.matrix_norm(e) / torch.linalg.matrix_norm(m + e))
    assert r["residual"] == pytest.approx(want, rel=1e-10) and r["scale"] == pytest.approx(1)
    assert identity_residual(w, h_a, -m)["H_b"]["residual"] == 1.0     # no c ≥ 0 helps
    assert identity_residual(w, h_a)["H_b"] is None                    # H_b not given
    with pytest.raises(ValueError, match="H_b must be D_out×D_out = 5×5"):
        identity_residual(w, h_a, h_a)
