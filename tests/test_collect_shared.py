"""Shared-input dedup (issue 12, item 3): layers fed the very same input tensor share one H_a
(and input-hook G_a) exactly as long as they have seen the same rows. Every layer's streams
are checked against float64 hooks that capture each layer's own calls (tests/_collect_ref.py),
over random sequences of calls: inputs shared, then separate, then shared again; a layer called
twice on one tensor; reads of the states in the middle of a step; staged or not."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from crh_kernels.collect import Collector

from ._collect_ref import Naive, assert_stream

# tiny tensors only: one thread avoids OpenMP barrier stalls on a busy shared machine
pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("a", "b", "c", "d", "e")


def _model():
    torch.manual_seed(0)
    return nn.ModuleDict({n: nn.Linear(8, 4 + i) for i, n in enumerate(NAMES)})


def _check_all(col, ref):
    """Every stream of every layer that ran against ``ref(name, stream)`` (float64 rows)."""
    for n in NAMES:
        for s in ("h_a", "h_b", "g_a", "g_b"):
            rows = ref(n, s)
            if rows is not None:
                assert_stream(col.layers[n].moments()[s], rows, what=f"{n}.{s}")


def _run(col, model, naive, steps, seed, p_same, reads=True, backward=True):
    """Random calls: each step a pool of three fresh leaf tensors (requires_grad, so g_a comes
    from the input hook), 2-6 calls (layer, tensor), a read of the states now and then."""
    rnd = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    with col:
        for i in range(steps):
            pool = [torch.randn(rnd.randint(3, 9), 8, generator=g, requires_grad=True)
                    for _ in range(3)]
            outs = []
            same = rnd.random() < p_same
            names = NAMES[:2 + i // 6]              # layers that start late join then
            for _ in range(rnd.randint(2, 7)):
                n = rnd.choice(names)
                x = pool[0] if same else rnd.choice(pool)
                outs.append(model[n](x))
                if reads and rnd.random() < 0.15:
                    col.layers                      # a read settles whatever waits
            if backward:
                sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs).backward()
            if rnd.random() < 0.8:
                col.step()


@pytest.mark.parametrize("stage_rows", [0, 4096])
@pytest.mark.parametrize("g_a_source", ["auto", "weight"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_each_layer_counts_exactly_its_own_rows(stage_rows, g_a_source, seed):
    model = _model()
    naive = Naive(model, list(NAMES))
    col = Collector(model, stage_rows=stage_rows, g_a_source=g_a_source,
                    state_dtype=torch.float64)
    _run(col, model, naive, steps=25, seed=seed, p_same=0.4)
    naive.remove()

    def ref(n, s):
        if not naive.calls[n]:
            return None
        if s == "g_a" and g_a_source == "weight":   # each layer's own share g_b @ W
            return naive.rows(n, "g_b") @ model[n].weight.detach().double().numpy()
        return naive.rows(n, s)

    _check_all(col, ref)
    # and no Moments is held by layers with different rows
    for s in ("h_a", "g_a"):
        held = {}
        for n in NAMES:
            m = col.layers[n].moments()[s]
            if m is not None:
                held.setdefault(id(m), []).append(n)
        for group in held.values():
            rows = [ref(n, s) for n in group]
            assert all(r.shape == rows[0].shape and np.allclose(r, rows[0]) for r in rows), group


@pytest.mark.parametrize("stage_rows", [0, 4096])
@pytest.mark.parametrize("first", ["shared", "separate"])
def test_staged_rows_are_not_overlooked_and_sharing_ends(stage_rows, first):
    """The cases of the issue, exactly: a and b sharing one tensor in the first step and then
    getting separate inputs (sticky sharing); b's rows still staged (n == 0) when b and a get
    the same tensor."""
    torch.manual_seed(0)
    a, b = nn.Linear(8, 3), nn.Linear(8, 4)
    model = nn.ModuleDict({"a": a, "b": b})
    naive = Naive(model, ["a", "b"])
    col = Collector(model, streams=("h_a",), stage_rows=stage_rows, state_dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = lambda n: torch.randn(n, 8, generator=g)
    with col:
        if first == "separate":
            a(x(100)), b(x(100))
            col.step()
        s = x(100)
        a(s), b(s)                               # separate first: b has staged rows only
        col.step()
        for _ in range(2):
            a(x(50)), b(x(50))                   # separate: no more sharing
            col.step()
        s = x(50)
        a(s), b(s)
        col.step()
    naive.remove()
    for n in ("a", "b"):
        assert_stream(col.layers[n].H_a, naive.rows(n, "h_a"), what=n)
    want = 250 + (100 if first == "separate" else 0)
    assert col.layers["a"].H_a.n == col.layers["b"].H_a.n == want
    assert col.layers["a"].H_a is not col.layers["b"].H_a


def test_layers_that_always_share_keep_one_moments():
    """q, k and v of one tensor every step: one H_a and one G_a, updated once per step, whatever
    the order of the calls and with reads of the states between steps."""
    torch.manual_seed(0)
    model = nn.ModuleDict({n: nn.Linear(8, 8) for n in "qkv"})
    naive = Naive(model, list("qkv"))
    col = Collector(model, state_dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    with col:
        for i in range(5):
            x = torch.randn(6, 8, generator=g, requires_grad=True)
            order = "qkv" if i % 2 else "vqk"
            sum(model[n](x).square().sum() for n in order).backward()
            col.step()
            col.layers
    naive.remove()
    q, k, v = (col.layers[n] for n in "qkv")
    assert q.H_a is k.H_a is v.H_a and q.G_a is k.G_a is v.G_a
    assert q.H_a.n == 30 and q.G_a.n == 30
    for n in "qkv":
        for s in ("h_a", "g_a", "h_b", "g_b"):
            assert_stream(col.layers[n].moments()[s], naive.rows(n, s), what=f"{n}.{s}")
    names = {n: col.layers[n].shared for n in "qkv"}
    assert sum(1 for d in names.values() if d == {}) == 1            # one owner, two aliases
    assert all(set(d) == {"h_a", "g_a"} for d in names.values() if d)


def test_shared_call_keeps_the_same_rows_in_every_stream():
    """max_rows: a layer that takes a shared tensor keeps the rows its first taker kept, for
    its own h_b and g_b too (W = I, so h_b = h_a row by row and equal states prove it)."""
    torch.manual_seed(0)
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    for lin in (a, b):
        with torch.no_grad():
            lin.weight.copy_(torch.eye(6))
            lin.bias.zero_()
    model = nn.ModuleDict({"a": a, "b": b})
    col = Collector(model, max_rows=5, seed=3, state_dtype=torch.float64)
    x = torch.randn(20, 6, requires_grad=True)
    with col:
        (a(x) + b(x)).square().sum().backward()
    sa, sb = col.layers["a"], col.layers["b"]
    assert sa.H_a is sb.H_a and sa.H_a.n == 5
    for st in (sa, sb):
        assert torch.allclose(st.H_b.scatter, sa.H_a.scatter, atol=1e-12)
        assert torch.allclose(st.H_b.mean, sa.H_a.mean, atol=1e-12)


@pytest.mark.parametrize("stage_rows", [0, 4096])
def test_split_then_late_claims(stage_rows):
    """q, k, v share x; q takes y alone and a read splits q off (its copy holds x's rows); then
    a fresh layer w takes x, and k and q take a tensor z together: no row is counted twice."""
    torch.manual_seed(0)
    model = nn.ModuleDict({n: nn.Linear(8, 4) for n in "qkvw"})
    naive = Naive(model, list("qkvw"))
    col = Collector(model, stage_rows=stage_rows, state_dtype=torch.float64)
    g = torch.Generator().manual_seed(2)
    x, y, z = (torch.randn(5, 8, generator=g, requires_grad=True) for _ in range(3))
    with col:
        outs = [model[n](x) for n in "qkv"] + [model["q"](y)]
        col.layers
        outs += [model["w"](x), model["k"](z), model["q"](z)]
        sum(o.square().sum() for o in outs).backward()
    naive.remove()
    for n in "qkvw":
        for s in ("h_a", "g_a", "h_b", "g_b"):
            assert_stream(col.layers[n].moments()[s], naive.rows(n, s), what=f"{n}.{s}")
    assert col.layers["q"].H_a.n == 15 and col.layers["k"].H_a.n == 10
    assert col.layers["v"].H_a.n == col.layers["w"].H_a.n == 5
