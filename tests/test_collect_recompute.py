"""Gradient checkpointing (issue 12, item 6): with ``torch.utils.checkpoint`` (reentrant or
not) every row is counted once, in every stream, and the states equal those of the same run
without checkpointing, checked against float64 hooks on that run (tests/_collect_ref.py)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from crh_kernels.collect import Collector

from ._collect_ref import Naive, assert_stream

# tiny tensors only: one thread avoids OpenMP barrier stalls on a busy shared machine
pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = ["p", "a", "q", "k", "b", "o"]


class Net(nn.Module):
    """p, then a checkpointed segment (a; q and k on one tensor; b, split into heads), then o."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.p, self.a = nn.Linear(8, 12), nn.Linear(12, 12)
        self.q, self.k = nn.Linear(12, 10), nn.Linear(12, 10)
        self.b, self.o = nn.Linear(10, 10), nn.Linear(10, 4)

    def segment(self, z):
        u = torch.tanh(self.a(z))
        return torch.tanh(self.b(torch.tanh(self.q(u)) * torch.tanh(self.k(u))))

    def forward(self, x, ck):
        h = torch.tanh(self.p(x))
        if ck is None:
            h = self.segment(h)
        else:
            h = checkpoint(self.segment, h, use_reentrant=ck)
        return self.o(h)


def _data(k=3):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 8, generator=g) for _ in range(k)]


def _run(ck, stage_rows=4096):
    net = Net()
    col = Collector(net, heads={"b": 2}, state_dtype=torch.float64, stage_rows=stage_rows)
    with col:
        for x in _data():
            net(x, ck).square().mean().backward()
            col.step()
    return col


@pytest.mark.parametrize("stage_rows", [0, 4096])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_checkpointed_run_equals_plain_run(reentrant, stage_rows):
    plain = Net()
    naive = Naive(plain, LAYERS)
    for x in _data():
        plain(x, None).square().mean().backward()
    naive.remove()
    col = _run(reentrant, stage_rows)
    ref = _run(None, stage_rows)
    for n in LAYERS:
        st = col.layers[n]
        ns = {s: m.n for s, m in st.moments().items()}
        assert set(ns.values()) == {3 * 16}, (n, ns)          # each row once, in every stream
        assert st.forward_only_calls == 0 and st.grad_calls == st.forward_calls == 3, n
        for s, m in st.moments().items():
            if n == "p" and s == "g_a":              # the data needs no grad: g_a = g_b W
                rows = naive.rows(n, "g_b") @ plain.p.weight.detach().double().numpy()
            else:
                rows = naive.rows(n, s)
            assert_stream(m, rows, what=f"{n}.{s}")
            o = ref.layers[n].moments()[s]
            assert torch.allclose(m.mean, o.mean, rtol=1e-9, atol=1e-12), (n, s)
            assert torch.allclose(m.scatter, o.scatter, rtol=1e-9, atol=1e-12), (n, s)
    hb, gb = naive.rows("b", "h_b"), naive.rows("b", "g_b")
    for i in range(2):
        st = col.layers[f"b.head{i}"]
        assert st.H_b.n == st.G_b.n == 48 and st.forward_only_calls == 0
        assert_stream(st.H_b, hb[:, 5 * i:5 * i + 5], what=f"head{i}.h_b")
        assert_stream(st.G_b, gb[:, 5 * i:5 * i + 5], what=f"head{i}.g_b")
    assert col.layers["q"].H_a is col.layers["k"].H_a          # still one tensor, one H_a
    assert not any("without gradients" in s for s in col.meta["notes"])


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_checkpoint_keeps_the_same_rows_for_h_and_g(reentrant):
    """max_rows under checkpointing: g rows are those of the h rows' call. W = I and the loss
    ½‖y‖² give g_b = h_b row by row, so equal states prove the same rows were kept."""
    lin = nn.Linear(6, 6)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(6))
        lin.bias.zero_()
    pre = nn.Linear(6, 6)
    class Seg(nn.Module):
        """tanh, lin, then an identity that keeps lin's output for backward (relu(y+10)-10):
        the recomputation must run lin again."""
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, z):
            return torch.relu(self.lin(torch.tanh(z)) + 10.0) - 10.0

    seg = Seg()
    model = nn.Sequential(pre, seg)
    col = Collector(model, ["1.lin"], max_rows=7, seed=2, state_dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    with col:
        for _ in range(3):
            y = checkpoint(seg, pre(torch.randn(20, 6, generator=g)), use_reentrant=reentrant)
            (0.5 * y.square().sum()).backward()
            col.step()
    st = col.layers["1.lin"]
    assert st.H_b.n == st.G_b.n == st.H_a.n == st.G_a.n == 21
    # h_b = h_a exactly; g_b = relu(h_b + 10) - 10 = h_b up to fp32 rounding; g_a = g_b
    assert torch.allclose(st.H_b.scatter, st.H_a.scatter, atol=1e-12)
    assert torch.allclose(st.G_b.scatter, st.G_a.scatter, atol=1e-12)
    assert torch.allclose(st.H_b.scatter, st.G_b.scatter, atol=1e-5)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
def test_checkpoint_without_backward_counts_forward_only(reentrant):
    """Under no_grad a checkpointed segment is an ordinary forward-only pass: counted once."""
    net = Net()
    col = Collector(net)
    with col, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch: "None of the inputs have requires_grad"
        net(torch.randn(5, 8), reentrant)
    for n in LAYERS:
        st = col.layers[n]
        assert st.H_a.n == st.H_b.n == 5 and st.G_b is None, n
    assert col.meta["forward_only"] is True


def test_multihead_attention_in_a_checkpoint():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    pre = nn.Linear(8, 8)
    model = nn.ModuleDict({"pre": pre, "attn": mha})
    cols = {}
    for ck in (None, True, False):
        col = Collector(model, state_dtype=torch.float64)
        g = torch.Generator().manual_seed(3)
        with col:
            for _ in range(2):
                h = pre(torch.randn(2, 5, 8, generator=g))
                f = lambda z: mha(z, z, z, need_weights=False)[0]
                out = f(h) if ck is None else checkpoint(f, h, use_reentrant=ck)
                out.square().mean().backward()
                col.step()
        cols[ck] = col
    for ck in (True, False):
        for n, st in cols[None].layers.items():
            for s, m in st.moments().items():
                o = cols[ck].layers[n].moments()[s]
                if m is None:
                    assert o is None, (ck, n, s)
                    continue
                assert o.n == m.n == 20, (ck, n, s, o.n)
                assert torch.allclose(o.scatter, m.scatter, rtol=1e-9, atol=1e-12), (ck, n, s)
