"""Sub-states (issue 16, deliverable 1): ``Collector(blocks=K, block_by="step"|"row")``.

Checked against float64 references computed from plain hooks on the same run (no code shared
with crh_kernels.collect): every block holds exactly its rows (round robin over the collected
steps, or each call's rows cut into K contiguous slices), the merged point estimate equals the
no-blocks collector's state and the reference over all rows, and every leave-one-out state
equals the reference over the rows of the other blocks; for every stream (raw streams, heads,
``nn.MultiheadAttention``, shared inputs), with masks, ``every``, staging, gradients that come
after ``step()``, gradient checkpointing; checkpoints (round trip, refusals, fault injection),
the blocked update's all-or-nothing (fault injection, with a mutation check), sync across two
gloo ranks, reset and the memory accounting.
"""
from __future__ import annotations

import copy
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from crh_kernels import Moments
from crh_kernels.collect import Collector
from crh_kernels.collect.blocks import Block, BlockClock, BlockedMoments
from crh_kernels.collect.layer import LeaveOneOut

from ._collect_ref import assert_stream, mlp, np64

# tiny tensors only: one thread avoids OpenMP barrier stalls on a busy shared machine
pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = ["0", "2", "4"]          # the Linear layers of _collect_ref.mlp()


# ------------------------------------------------------------------ float64 reference
class Rec:
    """Plain forward hooks: per call of each named module, the step it was made in, its input,
    its output (gradient retained) and the mask in force."""

    def __init__(self, model, names, col):
        self.col = col
        self.mask = None
        self.calls = {n: [] for n in names}
        mods = dict(model.named_modules())
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in names]
        self.model = model

    def _hook(self, name):
        def hook(module, args, out):
            y = out[0] if isinstance(out, tuple) else out
            if y.requires_grad:
                y.retain_grad()
            self.calls[name].append((self.col.steps, args[0].detach(), y, self.mask, module))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _stream_rows(call, stream):
    """float64 rows (R, D) of one call for ``stream`` (loss_reduction="sum": the gradient rows
    are per-sample already; g_a = g_b W)."""
    _, x, y, _, module = call
    x64, y64 = np64(x).reshape(-1, x.shape[-1]), np64(y).reshape(-1, y.shape[-1])
    g64 = np64(y.grad).reshape(-1, y.shape[-1]) if y.grad is not None else None
    w = np64(module.weight)
    if stream == "h_a":
        return x64
    if stream == "h_b":
        return y64
    if stream == "g_b" or stream == "g_b_raw":
        return g64
    if stream == "g_a":
        return g64 @ w
    if stream == "h_a_raw":
        return np.concatenate([x64, np.ones((x64.shape[0], 1))], axis=1)
    raise KeyError(stream)


def _block_of_rows(call, r, k, by, every):
    step = call[0]
    if by == "step":
        return np.full(r, (step // every) % k)
    # block j holds rows floor(j·R/K) .. floor((j+1)·R/K) − 1 of the call
    i = np.arange(r)
    return sum((i >= (j * r) // k).astype(int) for j in range(1, k))


def ref_rows(rec, name, stream, k, by, every=1, keep=lambda b: True, cols=None):
    """(rows, mask) over the collected calls of ``name``, the rows of the blocks ``keep``
    accepts."""
    rows, masks = [], []
    for call in rec.calls[name]:
        if call[0] % every:
            continue
        x = _stream_rows(call, stream)
        if cols is not None:
            x = x[:, cols]
        blk = _block_of_rows(call, x.shape[0], k, by, every)
        sel = np.array([keep(int(b)) for b in blk], dtype=bool)
        m = np.ones(x.shape[0], bool) if call[3] is None else np.asarray(call[3]).reshape(-1)
        rows.append(x[sel])
        masks.append(m[sel])
    return np.concatenate(rows), np.concatenate(masks)


def check_stream(m, rec, name, stream, k, by, every=1, normalize=True, cols=None):
    """Every block, the merge and every leave-one-out of ``m`` against the reference."""
    assert isinstance(m, BlockedMoments) and m.k == k, (name, stream)
    what = f"{name}.{stream}"
    for b in range(k):
        rows, mask = ref_rows(rec, name, stream, k, by, every, lambda j: j == b, cols)
        if mask.sum() == 0:
            assert m.blocks[b].n == 0, f"{what} block {b}"
            continue
        assert_stream(m.blocks[b], rows, mask, normalize, f"{what} block {b}")
    rows, mask = ref_rows(rec, name, stream, k, by, every, cols=cols)
    assert_stream(m, rows, mask, normalize, f"{what} merged")
    loo = m.leave_one_out()
    assert len(loo) == k
    for i in range(k):
        rows, mask = ref_rows(rec, name, stream, k, by, every, lambda j: j != i, cols)
        assert type(loo[i]) is Moments
        assert_stream(loo[i], rows, mask, normalize, f"{what} without block {i}")


def _close(a: Moments, b: Moments, what):
    """Two states of the same rows: counts equal, mean and scatter to fp32 merge rounding."""
    assert (a.n, a.n_skipped) == (b.n, b.n_skipped), what
    sa, sb = a.scatter.double(), b.scatter.double()
    assert torch.allclose(a.mean.double(), b.mean.double(), rtol=1e-5, atol=1e-6), what
    assert (sa - sb).norm() <= 1e-5 * sb.norm() + 1e-9, what


# ------------------------------------------------------------------ runs
def _masks(n, b, seed=5):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        if i % 3 == 1:
            m = torch.rand(b, generator=g) > 0.3
            m[0] = True
            out.append(m)
        else:
            out.append(None)
    return out


def _train(kw, steps=7, b=20, masks=True, grad_after_step=False, seed=3):
    """An MLP run with a recorder; returns (collector, recorder)."""
    model = mlp()
    col = Collector(model, g_a_source="weight", loss_reduction="sum", raw_moments=True, **kw)
    rec = Rec(model, LAYERS, col)
    g = torch.Generator().manual_seed(seed)
    ms = _masks(steps, b) if masks else [None] * steps
    col.start()
    for i in range(steps):
        col.set_mask(ms[i])
        rec.mask = ms[i]
        x = torch.randn(b, 12, generator=g)
        x[3] = 0.0 if i == 2 else x[3]                  # a zero row: skipped when normalizing
        loss = model(x).square().sum()
        if grad_after_step:
            col.step()
            loss.backward()
        else:
            loss.backward()
            col.step()
    col.stop()
    rec.remove()
    return col, rec


STREAMS4 = ("h_a", "h_b", "g_a", "g_b")


def _check_run(col, rec, k, by, every=1):
    for n in LAYERS:
        st = col.layers[n]
        assert st.n_blocks == k
        for s in STREAMS4:
            check_stream(st.moments()[s], rec, n, s, k, by, every)
        for s in ("h_a_raw", "g_b_raw"):
            check_stream(st.raw_moments()[s], rec, n, s, k, by, every, normalize=False)


# ------------------------------------------------------------------ routing
@pytest.mark.parametrize("stage_rows", [0, 4096])
@pytest.mark.parametrize("every", [1, 2])
def test_step_blocks_hold_the_rows_of_their_steps(every, stage_rows):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        col, rec = _train({"blocks": 3, "every": every, "stage_rows": stage_rows}, steps=8)
    _check_run(col, rec, 3, "step", every)
    # the merge is the no-blocks collector's state of the same rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain, _ = _train({"every": every, "stage_rows": stage_rows}, steps=8)
    for n in LAYERS:
        for s in STREAMS4:
            _close(col.layers[n].moments()[s], plain.layers[n].moments()[s], f"{n}.{s}")
        for s in ("h_a_raw", "g_b_raw"):
            _close(col.layers[n].raw_moments()[s], plain.layers[n].raw_moments()[s], f"{n}.{s}")


@pytest.mark.parametrize("k", [3, 4])
def test_row_blocks_cut_every_call(k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        col, rec = _train({"blocks": k, "block_by": "row"}, steps=5, b=22)
        plain, _ = _train({}, steps=5, b=22)
    _check_run(col, rec, k, "row")
    for n in LAYERS:
        for s in STREAMS4:
            _close(col.layers[n].moments()[s], plain.layers[n].moments()[s], f"{n}.{s}")
    # 22 rows in 4 (3) slices of 5 or 6 (7 or 8), whatever the mask: every block has rows
    counts = col.layers["0"].H_b.block_counts()
    assert min(counts) > 0 and sum(counts) == col.layers["0"].H_b.n


def test_gradients_after_step_land_in_the_block_of_their_forward_pass():
    """``col.step()`` between forward and backward: the gradient rows still go to the block of
    the forward call (the hooks carry it), so H and G of a step share a block."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        col, rec = _train({"blocks": 3}, steps=6, grad_after_step=True)
    _check_run(col, rec, 3, "step")
    for n in LAYERS:
        st = col.layers[n]
        assert st.H_b.block_counts() == st.G_b.block_counts() == st.G_a.block_counts()


@pytest.mark.parametrize("by", ["step", "row"])
def test_max_rows_keeps_the_same_rows_in_the_same_block(by):
    """With a subsample, h and g rows of a call are the same rows: W = I and the loss ½‖y‖²
    make g_b = h_b row by row, so per block the two states must be equal."""
    lin = nn.Linear(6, 6)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(6))
        lin.bias.zero_()
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), lin)
    col = Collector(model, modules=["2"], max_rows=9, blocks=3, block_by=by,
                    state_dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    with col:
        for _ in range(5):
            (0.5 * model(torch.randn(25, 5, generator=g)).square().sum()).backward()
            col.step()
    st = col.layers["2"]
    assert st.H_b.n == 45
    for b in range(3):
        hb, gb = st.H_b.blocks[b], st.G_b.blocks[b]
        assert hb.n == gb.n > 0
        assert torch.allclose(hb.mean, gb.mean, atol=1e-12)
        assert torch.allclose(hb.scatter, gb.scatter, atol=1e-12)


# ------------------------------------------------------------------ other streams
class QKV(nn.Module):
    """q, k and v of one tensor (one shared H_a and input-hook G_a), v split into two heads."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v = (nn.Linear(6, 6) for _ in range(3))

    def forward(self, x):
        return self.q(x) * self.k(x) + self.v(x)


def test_shared_inputs_and_heads_keep_their_blocks():
    model = QKV()
    col = Collector(model, heads={"v": 2}, blocks=3, loss_reduction="sum")
    rec = Rec(model, ["q", "v"], col)
    g = torch.Generator().manual_seed(1)
    col.start()
    for i in range(5):
        x = torch.randn(7, 6, generator=g, requires_grad=True)
        x.retain_grad()
        model(x).square().sum().backward()
        rec.calls["q"][-1] = rec.calls["q"][-1][:1] + (x, ) + rec.calls["q"][-1][2:]
        col.step()
    col.stop()
    rec.remove()
    layers = col.layers
    assert layers["q"].H_a is layers["k"].H_a is layers["v"].H_a      # still one shared state
    assert layers["q"].G_a is layers["k"].G_a
    check_stream(layers["q"].H_a, rec, "q", "h_a", 3, "step")
    # the input-hook g_a: the gradient of the shared input (all three consumers)
    for b in range(3):
        rows = np.concatenate([np64(c[1].grad) for c in rec.calls["q"] if c[0] % 3 == b])
        assert_stream(layers["q"].G_a.blocks[b], rows, what=f"G_a block {b}")
    for i in range(2):
        st = layers[f"v.head{i}"]
        assert st.n_blocks == 3
        check_stream(st.H_b, rec, "v", "h_b", 3, "step", cols=slice(3 * i, 3 * i + 3))
        check_stream(st.G_b, rec, "v", "g_b", 3, "step", cols=slice(3 * i, 3 * i + 3))
    loo = layers["k"].leave_one_out()
    assert loo[1].H_a is layers["q"].leave_one_out()[1].H_a            # shared, built once


def test_multihead_attention_streams_are_blocked():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(3, 5, 8, generator=g) for _ in range(4)]

    def run(**kw):
        col = Collector(mha, **kw)
        with col:
            for x in xs:
                mha(x, x, x)[0].square().mean().backward()
                col.step()
        return col

    a, b = run(), run(blocks=2)
    for name, st in a.layers.items():
        sb = b.layers[name]
        for s, m in st.moments().items():
            if m is None:
                continue
            mb = sb.moments()[s]
            assert isinstance(mb, BlockedMoments)
            assert mb.block_counts() == [30, 30], (name, s)        # steps 0, 2 | 1, 3
            _close(mb, m, f"{name}.{s}")


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_gradient_checkpointing_counts_each_row_once_in_its_block(reentrant):
    from .test_collect_recompute import LAYERS as NET_LAYERS, Net, _data

    def run(ck):
        net = Net()
        col = Collector(net, heads={"b": 2}, state_dtype=torch.float64, blocks=2)
        with col:
            for x in _data():
                net(x, ck).square().mean().backward()
                col.step()
        return col

    col, ref = run(reentrant), run(None)
    for n in NET_LAYERS + ["b.head0", "b.head1"]:
        for s, m in col.layers[n].moments().items():
            if m is None:
                continue
            o = ref.layers[n].moments()[s]
            assert m.block_counts() == o.block_counts() == [32, 16], (n, s)
            for mb, ob in zip(m.blocks, o.blocks):
                assert torch.allclose(mb.mean, ob.mean, rtol=1e-9, atol=1e-12), (n, s)
                assert torch.allclose(mb.scatter, ob.scatter, rtol=1e-9, atol=1e-12), (n, s)


# ------------------------------------------------------------------ leave-one-out views
def test_leave_one_out_views_are_layers_without_one_block():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        col, _ = _train({"blocks": 4}, steps=8)
    st = col.layers["2"]
    views = st.leave_one_out()
    assert st.leave_one_out() is views                     # cached: cheap to call twice
    assert len(views) == 4 and all(isinstance(v, LeaveOneOut) for v in views)
    for i, v in enumerate(views):
        assert v.block == i and v.source is st
        assert (v.name, v.kind, v.dims, v.streams, v.raw_dims, v.shared, v.parent, v.head) == (
            st.name, st.kind, st.dims, st.streams, st.raw_dims, st.shared, st.parent, st.head)
        assert torch.equal(v.weight(), st.weight()) and torch.equal(v.Z_a(), st.Z_a())
        for s, m in v.moments().items():
            assert m is st.moments()[s].leave_one_out()[i]
            assert m.n == st.moments()[s].n - st.moments()[s].blocks[i].n
        assert v.raw_moments()["g_b_raw"] is st.G_b_raw.leave_one_out()[i]
        with pytest.raises(AttributeError):
            v.H_a = None
    m0 = views[0].H_a
    # an update invalidates the cache: new views, new merges
    col.set_mask(None)
    col.start()
    col.model(torch.randn(4, 12)).sum().backward()
    col.stop()
    views2 = col.layers["2"].leave_one_out()
    assert views2 is not views and views2[0].H_a is not m0
    assert views2[0].H_a.n == m0.n + 4 * (col._block_now() != 0)
    st.release_leave_one_out()
    assert st.H_a._loo is None


def test_without_blocks_nothing_changes():
    col = Collector(mlp())
    assert col.blocks is None and col.meta["blocks"] is None
    with col:
        col.model(torch.randn(5, 12)).sum().backward()
    st = col.layers["0"]
    assert st.n_blocks is None and st.leave_one_out() is None
    assert type(st.H_a) is Moments and st.block_counts() == {}
    assert col.state_dict()["config"]["blocks"] is None


@pytest.mark.parametrize("kw", [{"blocks": 1}, {"blocks": True}, {"blocks": 2.0},
                                {"blocks": 2, "block_by": "hash"}])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        Collector(mlp(), **kw)


def test_meta_memory_and_reset():
    model = mlp()
    col = Collector(model, blocks=5, block_by="row", raw_moments=True)
    assert (col.blocks, col.block_by) == (5, "row")
    assert col.meta["blocks"] == {"k": 5, "by": "row"}
    plain = Collector(model, raw_moments=True)
    plan, plan1 = col.memory_plan(), plain.memory_plan()
    assert [p[:3] for p in plan] == [p[:3] for p in plan1]
    assert all(p[3] == 5 * q[3] for p, q in zip(plan, plan1))
    est = Collector.estimate_bytes(model, raw_moments=True, blocks=5)
    assert est == 5 * Collector.estimate_bytes(model, raw_moments=True) == sum(p[3] for p in plan)
    with col:
        model(torch.randn(9, 12)).sum().backward()
    assert col.nbytes() == est
    assert col.layers["0"].H_a.n == 9
    col.reset()
    st = col.layers["0"]
    assert st.H_a is None and st.n_blocks == 5 and st.leave_one_out()[0].H_a is None
    with col:
        model(torch.randn(6, 12)).sum().backward()
    assert col.layers["0"].H_a.block_counts() == [1, 1, 1, 1, 2]


# ------------------------------------------------------------------ checkpoints
def _blocks_fp(col):
    """Every block of every state, and the rows staged for each block (nothing flushed)."""
    out, where = {}, {}
    for name, st in col._layers.all.items():
        for s, m in list(st.moments().items()) + list(st.raw_moments().items()):
            if m is None:
                out[(name, s)] = None
                continue
            out[(name, s)] = [(b.n, b.n_skipped, b.mean.clone(), b.scatter.clone())
                              for b in m.blocks]
            for i, b in enumerate(m.blocks):
                where.setdefault(id(b), (name, s, i))
    for buf in col._stager._bufs.values():
        if buf.filled:
            out[("staged",) + where.get(id(buf.moments), ("?",))] = [
                (buf.filled, 0, buf.x[:buf.filled].clone(), buf.x[:0].clone())]
    return out


def _same_fp(a, b):
    if a.keys() != b.keys():
        return False
    for k in a:
        if (a[k] is None) != (b[k] is None):
            return False
        if a[k] is None:
            continue
        for x, y in zip(a[k], b[k]):
            if x[:2] != y[:2] or not torch.equal(x[2], y[2]) or not torch.equal(x[3], y[3]):
                return False
    return True


def test_checkpoint_round_trip_and_resume():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src, _ = _train({"blocks": 3}, steps=4)
    sd = copy.deepcopy(src.state_dict())
    assert sd["config"]["blocks"] == {"k": 3, "by": "step"}
    assert len(sd["layers"]["0"]["h_a"]["blocks"]) == 3
    dst = Collector(src.model, g_a_source="weight", loss_reduction="sum", raw_moments=True,
                    blocks=3)
    dst.load_state_dict(sd)
    assert _same_fp(_blocks_fp(dst), _blocks_fp(src))
    assert dst.steps == src.steps and dst._block_now() == src._block_now() == 1
    # both continue the same way: the next step goes to block 4 mod 3 = 1 on both
    g = torch.Generator().manual_seed(9)
    x = torch.randn(6, 12, generator=g)
    for col in (src, dst):
        with col:
            col.model(x).square().sum().backward()
            col.step()
    assert _same_fp(_blocks_fp(dst), _blocks_fp(src))
    assert dst.layers["0"].H_a.block_counts()[1] == src.layers["0"].H_a.block_counts()[1]


def _sd_from(kw, steps=2):
    model = mlp()
    col = Collector(model, **kw)
    with col:
        for _ in range(steps):
            model(torch.randn(5, 12)).sum().backward()
            col.step()
    return col.state_dict()


def test_old_checkpoints_without_blocks_still_load():
    sd = _sd_from({})
    del sd["config"]["blocks"]                 # a state dict from before the option
    col = Collector(mlp())
    col.load_state_dict(sd)
    assert col.layers["0"].H_a.n == 10


@pytest.mark.parametrize("case", ["none_into_blocks", "blocks_into_none", "other_k", "other_by",
                                  "short_list", "block_dim", "bad_block", "bad_config"])
def test_checkpoints_that_do_not_fit_are_refused_and_change_nothing(case):
    mine = {"blocks": 3}
    if case == "none_into_blocks":
        sd = _sd_from({})
    elif case == "blocks_into_none":
        sd, mine = _sd_from({"blocks": 3}), {}
    elif case == "other_k":
        sd = _sd_from({"blocks": 4})
    elif case == "other_by":
        sd = _sd_from({"blocks": 3, "block_by": "row"})
    else:
        sd = _sd_from({"blocks": 3})
        e = sd["layers"]["2"]["g_b"]
        if case == "short_list":
            e["blocks"] = e["blocks"][:2]
        elif case == "block_dim":
            e["blocks"][1] = dict(e["blocks"][1], dim=7)
        elif case == "bad_block":
            e["blocks"][2] = dict(e["blocks"][2], mean=torch.full((16,), float("nan")))
        else:
            sd["config"]["blocks"] = {"k": 3}
    col = Collector(mlp(), **mine)
    with col:
        col.model(torch.randn(4, 12)).sum().backward()
    before = {n: {s: (m.n, m.scatter.clone()) for s, m in st.moments().items()}
              for n, st in col.layers.items()}
    with pytest.raises((ValueError, KeyError, TypeError)) as err:
        col.load_state_dict(sd)
    assert "\n" not in str(err.value)
    if case in ("short_list", "block_dim", "bad_block"):
        assert "layers['2']['g_b']['blocks']" in str(err.value) or "blocks" in str(err.value)
    after = {n: {s: (m.n, m.scatter.clone()) for s, m in st.moments().items()}
             for n, st in col.layers.items()}
    assert all(before[n][s][0] == after[n][s][0] and torch.equal(before[n][s][1], after[n][s][1])
               for n in before for s in before[n])


def test_restore_with_blocks_is_all_or_nothing_under_fault_injection(monkeypatch):
    from . import test_collect_restore as tcr

    def make():
        model = QKV()
        col = Collector(model, heads={"v": 2}, blocks=2)
        g = torch.Generator().manual_seed(3)
        col.start()
        for _ in range(2):
            model(torch.randn(7, 6, generator=g, requires_grad=True)).square().mean().backward()
            col.step()
        return col

    src = make()
    with src:
        src.model(torch.randn(5, 6, requires_grad=True)).square().mean().backward()
        src.step()
    sd = src.state_dict()
    plain_fp = tcr.fingerprint

    def fingerprint(col):                      # the merged views and every block
        fp = plain_fp(col)
        fp["blocks"] = {k: v for k, v in _blocks_fp(col).items()}
        return fp
    monkeypatch.setattr(tcr, "fingerprint", fingerprint)
    n_lines, bad = tcr.check_atomic(make, sd, stride=7)
    assert n_lines > 100 and not bad, bad


# ------------------------------------------------------------------ the blocked update
def _blocked(by, k=3, d=7, seed=0, rows=30):
    clock = BlockClock(k, by, lambda: 4)
    m = BlockedMoments.new(d, clock, normalize=True, device="cpu", backend="torch",
                           dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    m.update(torch.randn(rows, d, generator=g, dtype=torch.float64))
    return m


def _batch(d=7, n=31, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x[4] = float("nan")
    x[20] = 0.0
    mask = torch.rand(n, generator=g) > 0.2
    mask[4] = mask[20] = True
    return x, mask


def _block_snapshot(m):
    return (tuple(b.n for b in m.blocks), tuple(b.n_skipped for b in m.blocks), m.device,
            torch.cat([b.mean for b in m.blocks]), torch.cat([b.scatter for b in m.blocks]))


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt], ids=["RuntimeError", "KeyboardInterrupt"])
@pytest.mark.parametrize("call", ["update_row", "update_step", "reset"])
def test_blocked_changes_are_all_or_nothing(monkeypatch, call, exc):
    from . import test_atomic as ta
    monkeypatch.setattr(ta, "snapshot", _block_snapshot)
    by = "step" if call == "update_step" else "row"
    template = _blocked(by)
    x, mask = _batch()
    calls = {"update_row": lambda m: m.update(x, mask), "update_step": lambda m: m.update(x, mask),
             "reset": lambda m: m.reset()}
    k = ta.check_atomic(lambda: copy.deepcopy(template), calls[call], exc)
    assert k >= 3


def _update_without_rollback(self, x, mask=None, block=None):
    for b, xs, ms in self.route(x, mask, block):
        b.update(xs, ms)
    return self


def test_harness_catches_a_blocked_update_without_rollback(monkeypatch):
    from . import test_atomic as ta
    monkeypatch.setattr(ta, "snapshot", _block_snapshot)
    monkeypatch.setattr(BlockedMoments, "update", _update_without_rollback)
    template = _blocked("row")
    x, mask = _batch()
    _, torn = ta.inject(lambda: copy.deepcopy(template), lambda m: m.update(x, mask),
                        RuntimeError)
    assert torn


def test_blocked_moments_refuse_what_would_lose_the_blocks():
    m = _blocked("step")
    for f in (lambda: m.merge(Moments(7)), lambda: m.replace_state(0, 0),
              lambda: m.load_packed(torch.zeros(7), torch.zeros(28)),
              lambda: m.update_staged(None, None, None, None)):
        with pytest.raises(TypeError):
            f()
    assert m.block_counts() == [0, 30, 0]            # clock at 4: block 4 mod 3
    plain = Moments(7, backend="torch", dtype=torch.float64).merge(m)   # read as one Moments
    assert plain.n == 30 and torch.equal(plain.scatter, m.blocks[1].scatter)
    c = m.copy()
    assert c.blocks[1] is not m.blocks[1] and torch.equal(c.scatter, m.scatter)
    with pytest.raises(ValueError):
        BlockedMoments(m.blocks[:2], m.clock)
    with pytest.raises(ValueError):
        BlockClock(1, "step")


# ------------------------------------------------------------------ sync
def _sync_worker(rank, world, init_file, out_dir):
    import torch.distributed as dist
    from datetime import timedelta
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=60))
    try:
        model = mlp()
        col = Collector(model, blocks=3, state_dtype=torch.float64, raw_moments=True)
        g = torch.Generator().manual_seed(50 + rank)
        data = [torch.randn(6 + rank, 12, generator=g) for _ in range(4 + rank)]
        with col:
            for x in data:
                model(x).square().sum().backward()
                col.step()
        col.sync(timeout=60)
        out = {n: {s: [(b.n, b.mean.clone(), b.scatter.clone()) for b in m.blocks]
                   for s, m in list(st.moments().items()) + list(st.raw_moments().items())}
               for n, st in col.layers.items()}
        out["merged"] = col.layers["2"].G_b.scatter.clone()
        torch.save({"data": data, "out": out}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sync_merges_block_i_with_block_i(tmp_path):
    import torch.multiprocessing as mp
    mp.start_processes(_sync_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       join=True, start_method="spawn")
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    # reference: each rank's own run on one process, its block i merged with the other's
    model = mlp()
    ref = {}
    for r in range(2):
        col = Collector(model, blocks=3, state_dtype=torch.float64, raw_moments=True)
        with col:
            for x in res[r]["data"]:
                model(x).square().sum().backward()
                col.step()
        ref[r] = col
    for n in LAYERS:
        for s in ("h_a", "h_b", "g_a", "g_b", "h_a_raw", "g_b_raw"):
            ms = [ref[r].layers[n].moments().get(s) or ref[r].layers[n].raw_moments()[s]
                  for r in range(2)]
            for i in range(3):
                want = Moments(ms[0].dim, normalize=ms[0].normalize, dtype=torch.float64)
                want.merge(ms[0].blocks[i]).merge(ms[1].blocks[i])
                for r in range(2):
                    n_, mu, sc = res[r]["out"][n][s][i]
                    assert n_ == want.n, (n, s, i)
                    assert torch.allclose(mu, want.mean, atol=1e-12)
                    assert torch.allclose(sc, want.scatter, rtol=1e-10, atol=1e-12)
    assert torch.equal(res[0]["out"]["merged"], res[1]["out"]["merged"])


# ------------------------------------------------------------------ monitoring presets
def test_monitor_presets_configure_the_collector():
    from crh_kernels.collect.collector import MONITOR_PRESETS
    assert set(MONITOR_PRESETS) == {"light", "default", "full"}
    for name, cfg in MONITOR_PRESETS.items():
        col = Collector.monitor(mlp(), name)
        assert (col.every, col.max_rows, col.blocks, col.block_by) == (
            cfg["every"], cfg["max_rows"], cfg["blocks"], "step"), name
        assert col.blocks >= 2                  # every preset gives standard errors
    col = Collector.monitor(mlp(), "light", every=3, raw_moments=True)
    assert col.every == 3 and col.max_rows == MONITOR_PRESETS["light"]["max_rows"]
    assert col.raw_moments
    with pytest.raises(ValueError):
        Collector.monitor(mlp(), "heavy")
    # a monitored run: rows land every `every` steps, round robin over the blocks
    model = mlp()
    col = Collector.monitor(model, "default", every=2, max_rows=5)
    with col:
        for _ in range(8):
            model(torch.randn(9, 12)).sum().backward()
            col.step()
    assert col.layers["0"].H_a.block_counts() == [5, 5, 5, 5, 0, 0, 0, 0]
