"""Collector facade against an independent naive capture (tests/_collect_ref.py): gradient
scale, step/every, max_rows, forward-only passes, life cycle, sync and report."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from crh_kernels.collect import Collector

from ._collect_ref import assert_stream, Naive, hook_dicts_empty, mlp, batches, Block

# tiny tensors only: one thread avoids OpenMP barrier stalls on a busy shared machine
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradient_scale_unnormalized(reduction):
    """normalize=False returns per-sample gradients: the gradient of each sample's own loss.
    Reference: the same batch through a sum-reduced loss, whose gradient rows are exactly the
    per-sample gradients (no hook involved)."""
    model = mlp()
    data = batches(2)
    ref = copy.deepcopy(model)
    naive = Naive(ref, ["2"])
    for x, t in data:
        F.mse_loss(ref(x), t, reduction="sum").backward()
    naive.remove()
    col = Collector(model, ["2"], normalize=False, loss_reduction=reduction,
                    loss_terms=32 * 5 if reduction == "mean" else None)
    with col:
        for x, t in data:
            F.mse_loss(model(x), t, reduction=reduction).backward()
    st = col.layers["2"]
    assert_stream(st.G_b, naive.rows("2", "g_b"), normalize=False, what="g_b per-sample")
    assert_stream(st.G_a, naive.rows("2", "g_a"), normalize=False, what="g_a per-sample")
    assert_stream(st.H_a, naive.rows("2", "h_a"), normalize=False, what="h_a unnormalized")



def test_gradient_scale_default_terms_and_normalized_invariance():
    model = mlp()
    data = batches(2)
    # default N = rows of the call (32 here), with a warning; per-sample = 32 x mean-loss grads
    ref = copy.deepcopy(model)
    naive = Naive(ref, ["4"])
    for x, t in data:
        (F.mse_loss(ref(x), t, reduction="none").mean(1).sum()).backward()
    naive.remove()
    col = Collector(model, ["4"], normalize=False)
    with col, pytest.warns(UserWarning, match="set_loss_terms"):
        for x, t in data:
            F.mse_loss(model(x), t, reduction="none").mean(1).mean().backward()
    assert_stream(col.layers["4"].G_b, naive.rows("4", "g_b"), normalize=False, what="default N")
    # normalize=True: the loss scale cancels exactly
    c1, c2 = Collector(copy.deepcopy(model), ["4"]), None
    m2 = copy.deepcopy(model)
    c2 = Collector(m2, ["4"])
    with c1, c2:
        for x, t in data:
            F.mse_loss(c1.model(x), t).backward()
            (1000.0 * F.mse_loss(m2(x), t, reduction="sum")).backward()
    for s in ("g_a", "g_b"):
        a, b = c1.layers["4"].moments()[s], c2.layers["4"].moments()[s]
        assert torch.allclose(a.cov(), b.cov(), rtol=1e-4, atol=1e-9)



def test_every_and_step():
    model = mlp()
    col = Collector(model, ["0"], every=2)
    with col:
        for i, (x, t) in enumerate(batches(5)):
            assert col.collecting == (i % 2 == 0)
            F.mse_loss(model(x), t).backward()
            col.step()
    assert col.steps == 5
    assert all(m.n == 3 * 32 for m in col.layers["0"].moments().values())



def test_max_rows_subsamples_the_same_rows_for_every_stream():
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(6))
        lin.bias.zero_()
    col = Collector(nn.Sequential(lin), max_rows=10, seed=3)
    x = torch.randn(4, 9, 6, requires_grad=True)
    with col:
        (lin(x) * torch.randn(4, 9, 6)).sum().backward()
        lin(x[:2, :2]).sum().backward()                     # 4 rows < max_rows: all kept
    st = col.layers["0"]
    assert all(m.n == 14 for m in st.moments().values())
    # W = I: h_b = h_a and g_a = g_b row by row, so equal states prove the rows are the same
    assert torch.allclose(st.H_a.scatter, st.H_b.scatter, atol=1e-6)
    assert torch.allclose(st.G_a.scatter, st.G_b.scatter, atol=1e-6)
    # the subset is a random one, not the first rows
    assert not torch.allclose(st.H_a.mean.float(), F.normalize(x[0, :10].detach(), dim=-1).mean(0),
                              atol=1e-3)



def test_eval_no_grad_forward_only_and_report_says_so():
    model = mlp().eval()
    col = Collector(model)
    naive = Naive(model, ["2"])
    with col, torch.no_grad():
        for x, _ in batches(2):
            model(x)
    naive.remove()
    st = col.layers["2"]
    assert st.G_a is None and st.G_b is None
    assert_stream(st.H_a, naive.rows("2", "h_a"), what="no_grad h_a")
    rep = col.report()
    assert rep.meta["forward_only"] is True
    assert any("forward streams only" in n for n in rep.meta["notes"])
    assert rep.layers["2"]["streams"] == ["h_a", "h_b"]
    assert rep.layers["2"]["alpha_cov"]["forward_RWA"] is not None
    assert rep.layers["2"]["alpha_cov"]["forward_RGA"] is None and rep.layers["2"]["p"] is None



def test_hooks_removed_and_tensor_hooks_inert_after_stop():
    model = mlp()
    col = Collector(model).start()
    assert not hook_dicts_empty(model)
    x, t = batches(1)[0]
    loss = F.mse_loss(model(x), t)
    col.stop()
    assert hook_dicts_empty(model)
    loss.backward()                 # gradient hooks of that pass are inert once stopped
    assert col.layers["0"].G_b is None or col.layers["0"].G_b.n == 0
    assert col.layers["0"].H_a.n == 32
    with col:
        pass
    assert hook_dicts_empty(model)



def test_sync_reduces_every_moments_once(monkeypatch):
    import crh_kernels.distributed as dist
    seen = {}

    def fake(ms, group=None, **kw):
        seen["ms"], seen["group"] = ms, group

    monkeypatch.setattr(dist, "all_reduce_moments", fake)
    blk = Block()
    col = Collector(blk, streams=("h_a", "h_b"))
    with col:
        blk(torch.randn(2, 3, 16), torch.ones(2, 3, dtype=torch.bool))
    col.sync(group="g")
    ids = [id(m) for m in seen["ms"]]
    assert len(ids) == len(set(ids)) and seen["group"] == "g"
    # 6 linear layers x 2 streams, minus the two h_a shared by k and v with q
    assert len(ids) == 6 * 2 - 2



def test_report_runs_on_collector_with_heads():
    blk = Block()
    col = Collector(blk, heads={"heads": 4})
    g = torch.Generator().manual_seed(0)
    with col:
        for _ in range(3):
            blk(torch.randn(4, 6, 16, generator=g), torch.ones(4, 6, dtype=torch.bool)).square().mean().backward()
            col.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # analysis warnings are captured per layer
        rep = col.report()
    assert rep.layers["heads.head0"]["kind"] == "head"
    assert rep.layers["heads.head0"]["alpha_cov"]["backward_RGA"] is None
    assert rep.layers["heads.head0"]["alpha_cov"]["forward_RGA"] is not None
    assert rep.layers["fc1"]["p"] is not None
    assert any("only the forward RGA" in n for n in rep.meta["notes"])


@pytest.mark.parametrize("stage_rows", [0, 4096])
def test_the_skipped_row_warning_points_at_the_users_line(stage_rows):
    """The warning names the user's call (the forward that fed the row, or the `with` whose
    exit flushed the staged rows), never the collector's hooks or row stager (staging.py)."""
    import inspect
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(8, 4)
    x[0] = 0.0                                    # a zero row of h_a: skipped when normalizing
    col = Collector(model, stage_rows=stage_rows)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        here = inspect.currentframe().f_lineno
        with col:                                 # here + 1: its exit flushes staged rows
            model(x).sum().backward()             # here + 2: the hooks see the zero row
            col.step()
    hits = [w for w in caught if "skipped" in str(w.message)]
    assert hits, [str(w.message) for w in caught]
    assert {w.filename for w in hits} == {__file__}, [(w.filename, w.lineno) for w in hits]
    # unstaged: the forward; staged: the flush, at col.step() or at the exit of `with col`
    assert hits[0].lineno in ({here + 2} if stage_rows == 0 else {here + 1, here + 3})
