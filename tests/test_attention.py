"""Per-head streams (heads=, nn.MultiheadAttention) against an independent naive capture:
attention head outputs rebuilt from the attention weights, padding masks, the MHA fast path."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from crh_kernels.collect import Collector

from ._collect_ref import assert_stream, np64, Naive, hook_dicts_empty, Block

# tiny tensors only: one thread avoids OpenMP barrier stalls on a busy shared machine
pytestmark = pytest.mark.usefixtures("one_thread")


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

