"""Hooks of weight layers (Linear, Conv2d, HF Conv1D) against an independent naive capture:
every stream, in-place activations, bias columns, conv patches, shared-input dedup and
g_a_source. Patches are cut with numpy's sliding windows (independent of F.unfold)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from crh_kernels.collect import Collector

from ._collect_ref import (assert_stream, np64, Naive, hook_dicts_empty, mlp, batches,
                           ConvNet, Block)

# tiny tensors only: one thread avoids OpenMP barrier stalls on a busy shared machine
pytestmark = pytest.mark.usefixtures("one_thread")


def np_patches(x, conv):
    """(B·H'·W', C·kh·kw) patches with numpy sliding windows (independent of F.unfold)."""
    x = np64(x)
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    if isinstance(conv.padding, str):
        ph, pw = (kh - 1) // 2, (kw - 1) // 2
        mode = "reflect" if conv.padding_mode == "reflect" else "constant"
        x = np.pad(x, ((0, 0), (0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw)), mode=mode)
    else:
        ph, pw = conv.padding
        x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    b, c, ho, wo = win.shape[:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(b * ho * wo, c * kh * kw)



def chan_rows(t):
    t = np64(t)
    return t.transpose(0, 2, 3, 1).reshape(-1, t.shape[1])



class Conv1D(nn.Module):
    """GPT-2's Conv1D: y = x @ weight + bias with weight (nx, nf)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)



def test_mlp_matches_naive_capture():
    model = mlp()
    names = ["0", "2", "4"]
    naive = Naive(model, names)
    col = Collector(model)
    assert set(col.layers) == set(names)
    with col:
        for x, t in batches(3):
            F.mse_loss(model(x), t).backward()
            col.step()
    naive.remove()
    assert hook_dicts_empty(model)
    for n in names:
        st = col.layers[n]
        assert st.kind == "linear"
        w = np64(model[int(n)].weight)
        for s in ("h_a", "h_b", "g_b"):
            assert_stream(getattr(st, s.upper()[0] + "_" + s[-1]), naive.rows(n, s), what=f"{n}.{s}")
        # g_a: the input hook where the input requires grad; g_b @ W for the data layer
        ga = naive.rows(n, "g_b") @ w if n == "0" else naive.rows(n, "g_a")
        assert_stream(st.G_a, ga, what=f"{n}.g_a")
        assert torch.allclose(st.weight(), model[int(n)].weight)
        assert torch.allclose(st.Z_a(), (model[int(n)].weight.T @ model[int(n)].weight).double(),
                              atol=1e-5)



def test_inplace_activation_and_full_agreement():
    """ReLU(inplace=True) after a Linear: activations are read before the in-place op and g_b is
    the gradient of the pre-activation, so the states equal those of the out-of-place twin."""
    a, b = mlp(inplace=True), mlp(inplace=False)
    cols = [Collector(a), Collector(b)]
    for model, col in zip((a, b), cols):
        with col:
            for x, t in batches(2):
                F.mse_loss(model(x), t).backward()
                col.step()
    for n in cols[0].layers:
        for s, m in cols[0].layers[n].moments().items():
            o = cols[1].layers[n].moments()[s]
            assert m.n == o.n
            assert torch.allclose(m.scatter, o.scatter, rtol=1e-5, atol=1e-9), (n, s)



def test_bias_column():
    model = mlp()
    naive = Naive(model, ["2"])
    col = Collector(model, ["2"], include_bias=True)
    with col:
        for x, t in batches(2):
            F.mse_loss(model(x), t).backward()
    naive.remove()
    st = col.layers["2"]
    lin = model[2]
    wb = np.concatenate([np64(lin.weight), np64(lin.bias)[:, None]], 1)
    assert st.weight().shape == (16, 25)
    ha = naive.rows("2", "h_a")
    assert_stream(st.H_a, np.concatenate([ha, np.ones((ha.shape[0], 1))], 1), what="h_a+1")
    assert_stream(st.G_a, naive.rows("2", "g_b") @ wb, what="g_a with bias")
    assert col.memory_plan()[0][2] == (25, 25)



@pytest.mark.filterwarnings("ignore:Moments.*zero-norm:RuntimeWarning")
def test_conv_net_matches_naive_capture():
    net = ConvNet()
    col = Collector(net)
    assert set(col.layers) == {"c1", "c2", "c3", "fc"}          # groups=2 conv skipped
    assert col.layers["c2"].kind == "conv2d"
    naive = Naive(net, ["c1", "c2", "c3"])
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 3, 9, 8, generator=g) for _ in range(2)]
    with col:
        for x in xs:
            net(x).square().sum().backward()
    naive.remove()
    for n in ("c1", "c2", "c3"):
        conv, st = getattr(net, n), col.layers[n]
        patches = np.concatenate([np_patches(x, conv) for x, _ in naive.calls[n]])
        hb = np.concatenate([chan_rows(y) for _, y in naive.calls[n]])
        gb = np.concatenate([chan_rows(y.grad) for _, y in naive.calls[n]])
        w = np64(conv.weight).reshape(conv.out_channels, -1)
        assert st.weight().shape == w.shape
        assert_stream(st.H_a, patches, what=f"{n}.h_a patches")
        assert_stream(st.H_b, hb, what=f"{n}.h_b")
        assert_stream(st.G_b, gb, what=f"{n}.g_b")
        assert_stream(st.G_a, gb @ w, what=f"{n}.g_a = g_b W")
    # a (B,) mask applies to every position of an image
    col2 = Collector(net, ["c1"], streams=("h_b",))
    keep = torch.tensor([True, False, True, True])
    col2.set_mask(keep)
    with col2:
        y = net.c1(xs[0])
    assert_stream(col2.layers["c1"].H_b, chan_rows(y)[np.repeat(keep.numpy(), 9 * 8)], what="masked conv")



def test_hf_conv1d():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(20, 10), nn.GELU(), Conv1D(6, 20))
    col = Collector(model)
    assert [st.kind for st in col.layers.values()] == ["conv1d", "conv1d"]
    assert col.memory_plan()[0][2] == (10, 10) and col.memory_plan()[1][2] == (20, 20)
    naive = Naive(model, ["0", "2"])
    x = torch.randn(3, 7, 10)
    with col:
        model(x).square().mean().backward()
    naive.remove()
    st = col.layers["2"]
    assert torch.equal(st.weight(), model[2].weight.detach().t())
    for s in ("h_a", "h_b", "g_a", "g_b"):
        assert_stream(st.moments()[s], naive.rows("2", s), what=f"conv1d {s}")
    assert_stream(col.layers["0"].G_a, naive.rows("0", "g_b") @ np64(model[0].weight).T,
                  what="conv1d g_a = g_b W")



def test_shared_input_dedup_is_per_tensor():
    """Two different tensors are two sets of rows; the same tensor twice in a step is the same
    rows for two layers, but a second call of one layer on it counts again; a layer that then
    gets a tensor of its own stops sharing (test_collect_shared.py checks every case)."""
    torch.manual_seed(0)
    a, b = nn.Linear(5, 3), nn.Linear(5, 4)
    model = nn.ModuleDict({"a": a, "b": b})
    col = Collector(model, streams=("h_a", "h_b"))
    x1, x2 = torch.randn(6, 5), torch.randn(6, 5)
    with col:
        a(x1), b(x1)                # shared
        assert col.layers["b"].H_a is col.layers["a"].H_a and col.layers["a"].H_a.n == 6
        b(input=x2)                 # new tensor (passed by keyword): b continues on its own
        a(x1)                       # a's second call on x1 counts again
    assert col.layers["b"].H_a is not col.layers["a"].H_a
    assert col.layers["a"].H_a.n == 12 and col.layers["b"].H_a.n == 12
    assert col.layers["b"].H_b.n == 12 and col.layers["b"].shared == {}


def test_g_a_source_weight_gives_each_layer_its_own_share():
    blk = Block()
    x, keep = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    naive = Naive(blk, ["q", "k"])
    col = Collector(blk, ["q", "k"], g_a_source="weight")
    with col:
        blk(x, keep).square().sum().backward()
    naive.remove()
    q, k = col.layers["q"], col.layers["k"]
    assert q.H_a is k.H_a and q.G_a is not k.G_a and "g_a" not in k.shared
    for n, st in (("q", q), ("k", k)):
        assert_stream(st.G_a, naive.rows(n, "g_b") @ np64(getattr(blk, n).weight), what=f"{n} own g_a")



@pytest.mark.filterwarnings("ignore:Moments.*zero-norm:RuntimeWarning")
def test_raw_streams_of_conv_layers_and_masks():
    """raw_moments=True: the patches with a ones column where the conv has a bias (c2 has
    none; c3 pads by reflection), the output gradients unscaled under a sum loss, the mask's
    rows only; and H_b = W̃ H̃_a W̃ᵀ against the layer's actual outputs (issue 13, item 2)."""
    net = ConvNet()
    col = Collector(net, ["c1", "c2", "c3"], raw_moments=True, loss_reduction="sum")
    naive = Naive(net, ["c1", "c2", "c3"])
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 3, 9, 8, generator=g) for _ in range(2)]
    keep = torch.tensor([True, False, True, True])
    with col:
        for i, x in enumerate(xs):
            col.set_mask(keep if i else None)       # second batch: image 1 masked out
            net(x).square().sum().backward()
    naive.remove()
    for n in ("c1", "c2", "c3"):
        conv, st = getattr(net, n), col.layers[n]
        rows, hb, gb = [], [], []
        for i, (x, y) in enumerate(naive.calls[n]):
            per_image = y.shape[2] * y.shape[3]
            m = np.ones(x.shape[0] * per_image, bool) if i == 0 else np.repeat(keep.numpy(), per_image)
            rows.append(np_patches(x, conv)[m])
            hb.append(chan_rows(y)[m])
            gb.append(chan_rows(y.grad)[m])
        ha, hb, gb = (np.concatenate(r) for r in (rows, hb, gb))
        if conv.bias is not None:
            ha = np.concatenate([ha, np.ones((ha.shape[0], 1))], 1)
        w = np64(conv.weight).reshape(conv.out_channels, -1)
        if conv.bias is not None:
            w = np.concatenate([w, np64(conv.bias)[:, None]], 1)
        assert torch.equal(st.raw_weight().double(), torch.from_numpy(w))
        assert st.H_a_raw.n == st.G_b_raw.n == ha.shape[0] == st.H_a.n
        for m, r in ((st.H_a_raw, ha), (st.G_b_raw, gb)):
            got = m.second_moment().double().numpy()
            ref = r.T @ r / r.shape[0]
            assert np.linalg.norm(got - ref) <= 2e-5 * np.linalg.norm(ref), n
        h = st.H_a_raw.second_moment().double().numpy()
        ref = hb.T @ hb / hb.shape[0]
        assert np.linalg.norm(w @ h @ w.T - ref) <= 2e-5 * np.linalg.norm(ref), n


def test_raw_streams_are_per_layer_on_a_shared_input():
    """q and k share one H_a (the dedup), but each keeps its own raw states, of the same rows
    (those the first taker kept under max_rows)."""
    blk = Block()
    x, keep = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    col = Collector(blk, ["q", "k"], raw_moments=True, max_rows=7)
    with col:
        blk(x, keep).square().sum().backward()
    q, k = col.layers["q"], col.layers["k"]
    assert q.H_a is k.H_a and q.H_a_raw is not k.H_a_raw
    assert q.H_a_raw.n == k.H_a_raw.n == q.G_b_raw.n == 7
    assert torch.equal(q.H_a_raw.scatter, k.H_a_raw.scatter)
    assert torch.equal(q.H_a_raw.mean, k.H_a_raw.mean)
