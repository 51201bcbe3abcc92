"""Collector against an independent naive capture (issue 4, tests part).

The references here share no code with crh_kernels.collect: plain forward hooks that keep the
tensors, ``retain_grad`` for gradients, patches cut with numpy's sliding windows, attention head
outputs rebuilt from the attention weights, and float64 covariances computed with numpy.
"""
from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from crh_kernels.collect import Collector

RTOL = 2e-4   # fp32 activations/gradients against a float64 reference (SPEC §2: ≤ 1e-4 on cov)


# tiny tensors only: one thread avoids OpenMP barrier stalls on a busy shared machine
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------ float64 reference
def ref_stats(rows, mask=None, normalize=True):
    """(n, mean, cov) of the rows (R, D) in float64: masked rows dropped, rows normalized."""
    x = np.asarray(rows, dtype=np.float64).reshape(-1, np.shape(rows)[-1])
    if mask is not None:
        x = x[np.asarray(mask).reshape(-1)]
    if normalize:
        nrm = np.linalg.norm(x, axis=1)
        x = x[nrm > 0] / nrm[nrm > 0, None]
    mu = x.mean(0)
    y = x - mu
    return x.shape[0], mu, y.T @ y / x.shape[0]


def assert_stream(m, rows, mask=None, normalize=True, what=""):
    n, mu, cov = ref_stats(rows, mask, normalize)
    assert m is not None, f"{what}: stream missing"
    assert m.n == n, f"{what}: n={m.n}, reference {n}"
    got_mu = m.mean.double().cpu().numpy()
    got_cov = m.cov().double().cpu().numpy()
    scale = max(np.abs(mu).max(), 1e-30)
    assert np.abs(got_mu - mu).max() <= 1e-5 * scale + 1e-12, f"{what}: mean differs"
    err = np.linalg.norm(got_cov - cov) / np.linalg.norm(cov)
    assert err <= RTOL, f"{what}: relative cov error {err:.2e}"


def np64(t):
    return t.detach().double().cpu().numpy()


class Naive:
    """Plain forward hooks keeping every call's input and output (with retain_grad)."""

    def __init__(self, model, names):
        self.calls = {n: [] for n in names}
        self.handles = []
        mods = dict(model.named_modules())
        for n in names:
            self.handles.append(mods[n].register_forward_hook(self._hook(n)))

    def _hook(self, name):
        def hook(module, args, out):
            x = args[0]
            y = out[0] if isinstance(out, tuple) else out
            if x.requires_grad and not x.is_leaf:
                x.retain_grad()
            if y.requires_grad:
                y.retain_grad()
            self.calls[name].append((x, y))
        return hook

    def rows(self, name, what):
        """Concatenated rows (R, D) over the calls: what in h_a, h_b, g_a, g_b (input grads)."""
        out = []
        for x, y in self.calls[name]:
            t = {"h_a": x, "h_b": y, "g_a": x.grad, "g_b": y.grad}[what]
            out.append(np64(t).reshape(-1, t.shape[-1]))
        return np.concatenate(out)

    def remove(self):
        for h in self.handles:
            h.remove()


def hook_dicts_empty(model):
    for m in model.modules():
        for d in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if len(getattr(m, d)):
                return False
    return True


# --------------------------------------------------------------------------------- MLP
def mlp(inplace=False, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.ReLU(inplace=inplace), nn.Linear(24, 16),
                         nn.Tanh(), nn.Linear(16, 5))


def batches(k, b=32, d=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, d, generator=g), torch.randn(b, 5, generator=g)) for _ in range(k)]


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


# ----------------------------------------------------------------------------- gradient scale
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


# ------------------------------------------------------------------------------ small conv net
class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, (3, 2), stride=2, padding=(1, 0), bias=False)
        self.c3 = nn.Conv2d(8, 4, 3, padding="same", padding_mode="reflect")
        self.g = nn.Conv2d(4, 4, 1, groups=2)                 # unsupported: groups != 1
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = self.c3(F.relu(self.c2(F.relu(self.c1(x)))))
        return self.fc(self.g(F.relu(x)).mean((2, 3)))


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


# -------------------------------------------------------------------------- HF-style Conv1D
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


# ------------------------------------------------------------------ transformer block, padding
class Block(nn.Module):
    def __init__(self, d=16, h=4):
        super().__init__()
        torch.manual_seed(0)
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.heads = nn.Identity()                           # per-head streams of the attention
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, keep):
        b, t, d = x.shape
        a = self.ln1(x)
        q, k, v = (f(a).view(b, t, self.h, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        att = self.heads(att.transpose(1, 2).reshape(b, t, d))
        x = x + self.o(att)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def test_transformer_block_with_padding_mask():
    blk = Block()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 7, 16, generator=g)
    keep = torch.ones(3, 7, dtype=torch.bool)
    keep[0, 5:] = False
    keep[2, 3:] = False
    x[~keep] = 50.0 + torch.randn(int((~keep).sum()), 16, generator=g)   # junk padding tokens
    names = ["q", "k", "v", "o", "fc1", "fc2", "heads"]
    naive = Naive(blk, names)
    col = Collector(blk, mask=keep, heads={"heads": 4})
    assert {"q", "k", "v", "o", "fc1", "fc2"} <= set(col.layers)
    with col:
        y = blk(x, keep)
        (y.square().sum(-1) * keep).sum().div(keep.sum()).backward()
    naive.remove()
    m = keep.numpy()
    # q, k, v read the same tensor: one shared H_a (and input-hook G_a), counted once
    q, k, v = (col.layers[n] for n in "qkv")
    assert q.H_a is k.H_a is v.H_a and q.G_a is k.G_a is v.G_a
    assert k.shared == {"h_a": "q", "g_a": "q"} and q.H_a.n == int(keep.sum())
    assert_stream(q.H_a, naive.rows("q", "h_a"), m, what="shared h_a")
    assert_stream(q.G_a, naive.rows("q", "g_a"), m, what="shared g_a (total grad of ln1 out)")
    for n in ("q", "k", "v", "o", "fc1", "fc2"):
        st = col.layers[n]
        for s in ("h_a", "h_b", "g_b"):
            assert_stream(st.moments()[s], naive.rows(n, s), m, what=f"{n}.{s}")
    assert_stream(col.layers["fc2"].G_a, naive.rows("fc2", "g_a"), m, what="fc2.g_a")
    hb, gb = naive.rows("heads", "h_b"), naive.rows("heads", "g_b")
    for i in range(4):
        st = col.layers[f"heads.head{i}"]
        assert st.kind == "head" and st.H_a is None and st.Z_a() is None and st.weight() is None
        assert_stream(st.H_b, hb[:, 4 * i:4 * i + 4], m, what=f"head{i}.h_b")
        assert_stream(st.G_b, gb[:, 4 * i:4 * i + 4], m, what=f"head{i}.g_b")
    # memory plan counts every layer (shared inputs as an upper bound) before anything ran; the
    # width of a heads split is read from the module (unknown for an Identity until it runs)
    plan = Collector(Block(), heads={"heads": 4, "v": 4}).memory_plan()
    assert ("v.head0", "h_b", (4, 4), 4 * (4 + 16)) in plan          # float32 states by default
    assert ("heads.head0", "h_b", None, 0) in plan
    assert ("fc1", "h_b", (64, 64), 4 * (64 + 64 * 64)) in plan
    assert Collector.estimate_bytes(Block(), heads={"heads": 4, "v": 4}) == sum(p[3] for p in plan)
    assert ("heads.head0", "h_b", (4, 4), 4 * (4 + 16)) in col.memory_plan()   # known once run
    plan64 = Collector(Block(), state_dtype=torch.float64).memory_plan()
    assert ("fc1", "h_b", (64, 64), 8 * (64 + 64 * 64)) in plan64
    assert col.nbytes() == sum(m.nbytes() for m in {id(m): m for st in col.layers.values()
                                                    for m in st.moments().values() if m}.values())


def test_shared_input_dedup_is_per_tensor():
    """Two different tensors are two sets of rows; the same tensor twice in a step is the same
    rows for two layers, but a second call of one layer on it counts again."""
    torch.manual_seed(0)
    a, b = nn.Linear(5, 3), nn.Linear(5, 4)
    model = nn.ModuleDict({"a": a, "b": b})
    col = Collector(model, streams=("h_a", "h_b"))
    x1, x2 = torch.randn(6, 5), torch.randn(6, 5)
    with col:
        a(x1), b(x1)                # shared
        b(input=x2)                 # new tensor (passed by keyword): b shares a's H_a, so it gets x2
    assert col.layers["b"].H_a is col.layers["a"].H_a
    assert col.layers["a"].H_a.n == 12
    assert col.layers["b"].H_b.n == 12


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


# ----------------------------------------------------------------------- nn.MultiheadAttention
@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_per_head(batch_first):
    torch.manual_seed(0)
    e, h, b, t = 12, 3, 2, 5
    mha = nn.MultiheadAttention(e, h, batch_first=batch_first)
    model = nn.ModuleDict({"attn": mha})
    keep = torch.ones(b, t, dtype=torch.bool)
    keep[1, 3:] = False
    x = torch.randn(b, t, e)
    xin = (x if batch_first else x.transpose(0, 1)).clone().requires_grad_(True)
    col = Collector(model)
    assert set(col.layers) == {"attn.out_proj"} | {f"attn.head{i}" for i in range(h)}
    col.set_mask(keep if batch_first else keep.t())
    with col:
        out, w = mha(xin, xin, xin, key_padding_mask=~keep, need_weights=True,
                     average_attn_weights=False)
        out.retain_grad()
        (out.square().sum(-1) * (keep if batch_first else keep.t())).sum().backward()
    assert torch.nn.functional.linear is torch._C._nn.linear      # spy removed
    assert hook_dicts_empty(model)
    # reference: per-head outputs from the attention weights and v; g = g_out @ W_o
    xb = x.double()
    wv = mha.in_proj_weight[2 * e:].double()
    bv = mha.in_proj_bias[2 * e:].double()
    vv = (xb @ wv.T + bv).view(b, t, h, e // h).transpose(1, 2)            # (B, h, T, dh)
    heads = (w.double() @ vv)                                              # (B, h, T, dh)
    gout = out.grad if batch_first else out.grad.transpose(0, 1)
    gpre = (gout.double() @ mha.out_proj.weight.double()).view(b, t, h, e // h)
    m = keep.numpy()
    for i in range(h):
        st = col.layers[f"attn.head{i}"]
        assert st.kind == "head" and st.parent == "attn" and st.head == i
        assert_stream(st.H_b, np64(heads[:, i]).reshape(-1, e // h), m, what=f"head{i}.h_b")
        assert_stream(st.G_b, np64(gpre[:, :, i]).reshape(-1, e // h), m, what=f"head{i}.g_b")
    # out_proj is measured through the same F.linear call
    op = col.layers["attn.out_proj"]
    pre = np64(heads.transpose(1, 2).reshape(b, t, e))
    assert_stream(op.H_a, pre, m, what="out_proj.h_a")
    assert_stream(op.H_b, np64(out if batch_first else out.transpose(0, 1)), m, what="out_proj.h_b")
    assert_stream(op.G_b, np64(gout), m, what="out_proj.g_b")


def test_multihead_attention_eval_no_grad_fast_path_off():
    """Under eval + no_grad MHA and TransformerEncoderLayer take a fused path that bypasses the
    hooks; the collector switches it off while it runs and restores it on exit."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True).eval()
    col = Collector(layer, streams=("h_b",))
    assert {"self_attn.head0", "self_attn.head1", "self_attn.out_proj", "linear1", "linear2"} <= set(col.layers)
    x = torch.randn(2, 4, 8)
    with col, torch.no_grad():
        assert not torch.backends.mha.get_fastpath_enabled()
        layer(x)
        layer.self_attn(x, x, x)
    assert torch.backends.mha.get_fastpath_enabled()
    assert col.layers["self_attn.head0"].H_b.n == 16
    assert col.layers["self_attn.out_proj"].H_b.n == 16
    assert col.layers["linear1"].H_b.n == 8
    assert col.report().meta["forward_only"] is True


# ---------------------------------------------------------------- every, max_rows, eval, resume
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


@pytest.mark.parametrize("stage_rows", [0, 4096])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
def test_state_dict_resume_equals_one_pass(state_dtype, stage_rows):
    data = batches(6)
    heads = {"2": 4}
    kw = dict(max_rows=20, heads=heads, state_dtype=state_dtype, stage_rows=stage_rows)

    def run(col, model, part):
        with col:
            for x, t in part:
                model(x)[:, :3].square().mean().backward()
                col.step()

    m1 = mlp()
    one = Collector(m1, **kw)
    run(one, m1, data)

    m2 = mlp()
    first = Collector(m2, **kw)
    run(first, m2, data[:3])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    m3 = mlp()
    second = Collector(m3, **kw)
    second.load_state_dict(torch.load(buf))
    assert second.steps == 3
    run(second, m3, data[3:])
    for n, st in one.layers.items():
        for s, m in st.moments().items():
            o = second.layers[n].moments()[s]
            if m is None:
                assert o is None
                continue
            assert (m.n, m.n_skipped) == (o.n, o.n_skipped), (n, s)
            assert m.scatter.dtype == o.scatter.dtype == state_dtype
            if stage_rows == 0:  # one update per call: same operations, same order
                assert torch.equal(m.mean, o.mean), (n, s)
                assert torch.equal(m.scatter, o.scatter), (n, s)
            else:  # staged: the checkpoint cut the gathered rows into two updates
                tol = 1e-5  # the batch kernels accumulate in fp32 whatever the state dtype
                assert torch.allclose(m.mean, o.mean, rtol=tol, atol=tol), (n, s)
                assert (m.scatter - o.scatter).norm() <= tol * m.scatter.norm(), (n, s)


def test_state_dict_keeps_shared_moments_shared():
    blk = Block()
    col = Collector(blk)
    x, keep = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.bool)
    with col:
        blk(x, keep).sum().backward()
    sd = col.state_dict()
    assert sd["layers"]["k"]["h_a"] == {"alias": ["q", "h_a"]}
    col2 = Collector(Block())
    col2.load_state_dict(sd)
    assert col2.layers["k"].H_a is col2.layers["q"].H_a is col2.layers["v"].H_a
    assert torch.equal(col2.layers["q"].H_a.scatter, col.layers["q"].H_a.scatter)
    with pytest.raises(ValueError):
        Collector(Block(), normalize=False).load_state_dict(sd)


# ------------------------------------------------------------------ selection and life cycle
def test_module_selection():
    net = ConvNet()
    assert set(Collector(net, r"^c").layers) == {"c1", "c2", "c3"}
    assert set(Collector(net, ["c2", "fc"]).layers) == {"c2", "fc"}
    assert set(Collector(net, lambda n, m: isinstance(m, nn.Linear)).layers) == {"fc"}
    assert set(Collector(net, lambda m: isinstance(m, nn.Conv2d)).layers) == {"c1", "c2", "c3"}
    with pytest.raises(KeyError):
        Collector(net, ["nope"])
    with pytest.raises(TypeError):
        Collector(net, ["g"])                               # groups=2 named explicitly
    with pytest.raises(ValueError):
        Collector(net, streams=("h_a", "x"))
    with pytest.raises(ValueError):
        Collector(mlp(), heads={"2": 5})                     # 16 features, 5 heads


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

    def fake(ms, group=None):
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
